from .footprint import bits_per_weight, weights_size_bytes
from .latency import forward_latency
from .perplexity import perplexity
from .report import evaluate

__all__ = ["bits_per_weight", "evaluate", "forward_latency", "perplexity", "weights_size_bytes"]
