"""What an hfcompress checkpoint is: the manifest every technique records its changes in, one merge function,
the rebuild registry that loading consults, and the `HfQuantizer` that lets `from_pretrained` in. Imports no
technique: each registers how its layers are rebuilt. Names are imported on first use; `hfcompress/__init__`
registers the quantizer with transformers (`registration.py`)."""

from .._lazy import lazy_namespace

_EXPORTS = {
    "FORMAT_VERSION": ".manifest",
    "PLAIN_ATTRIBUTE": ".manifest",
    "QUANT_METHOD": ".hf_quantizer",
    "CheckpointError": ".verify",
    "CheckpointManifest": ".manifest",
    "HfcompressHfQuantizer": ".hf_quantizer",
    "HfcompressQuantizationConfig": ".manifest",
    "Rebuilder": ".rebuild",
    "attach_config": ".hf_quantizer",
    "linear_to_replace": "..core.structure",
    "manifest_of": ".manifest",
    "register": ".hf_quantizer",
    "register_dequantizer": ".rebuild",
    "register_rebuilder": ".rebuild",
    "update_manifest": ".merge",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_namespace(__name__, _EXPORTS)
