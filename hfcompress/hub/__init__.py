"""The Hub side: compression records, model cards, push."""

from .card import generate_card, render_card
from .push import HubError, check_model_folder, push_to_hub
from .record import RECORD_FILE, CompressionRecord, Step

__all__ = [
    "RECORD_FILE",
    "CompressionRecord",
    "HubError",
    "Step",
    "check_model_folder",
    "generate_card",
    "push_to_hub",
    "render_card",
]
