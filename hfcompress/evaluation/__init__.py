from .footprint import bits_per_weight, weights_size_bytes
from .latency import forward_latency
from .perplexity import perplexity
from .report import evaluate

__all__ = ["evaluate", "perplexity", "bits_per_weight", "weights_size_bytes", "forward_latency"]
