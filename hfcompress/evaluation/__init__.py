"""Perplexity, stored size and bits per weight, latency, and `evaluate`, which reports them together. Names are
imported on first use."""

from .._lazy import lazy_namespace

_EXPORTS = {
    "bits_per_weight": ".footprint",
    "evaluate": ".report",
    "evaluate_streamed": ".report",
    "evaluate_tasks": ".tasks",
    "forward_latency": ".latency",
    "perplexity": ".perplexity",
    "streamed_perplexity": ".streamed",
    "weights_size_bytes": ".footprint",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_namespace(__name__, _EXPORTS)
