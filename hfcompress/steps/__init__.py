"""The Python verbs behind every command and recipe step: a model folder in, a compressed model folder out, with
its compression record and card. The command line and the recipe runner are thin layers over these."""

from .compress import check_step, compress_folder
from .distill import DistillArguments, distill_folder
from .loading import load_model, load_tokenizer, resolve_model_path
from .merge import merge_lora_folder
from .options import OutputOptions
from .verify import verify_folder

__all__ = [
    "DistillArguments",
    "OutputOptions",
    "check_step",
    "compress_folder",
    "distill_folder",
    "load_model",
    "load_tokenizer",
    "merge_lora_folder",
    "resolve_model_path",
    "verify_folder",
]
