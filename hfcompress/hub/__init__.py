"""The Hub side: compression records, model cards, push. Names are imported on first use."""

from .._lazy import lazy_namespace

_EXPORTS = {
    "RECORD_FILE": ".record",
    "CompressionRecord": ".record",
    "HubError": ".push",
    "Step": ".record",
    "check_model_folder": ".push",
    "generate_card": ".card",
    "push_to_hub": ".push",
    "render_card": ".card",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_namespace(__name__, _EXPORTS)
