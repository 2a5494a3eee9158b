"""The Python verbs behind every command and recipe step: a model folder in, a compressed model folder out, with
its compression record and card. The command line and the recipe runner are thin layers over these. Names are
imported on first use."""

from .._lazy import lazy_namespace

_EXPORTS = {
    "DistillArguments": ".options",
    "OutputOptions": ".options",
    "check_step": ".compress",
    "compress_folder": ".compress",
    "distill_folder": ".distill",
    "load_model": ".loading",
    "load_tokenizer": ".loading",
    "merge_lora_folder": ".merge",
    "resolve_model_path": ".loading",
    "verify_folder": ".verify",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_namespace(__name__, _EXPORTS)
