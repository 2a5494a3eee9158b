"""What an hfcompress checkpoint is: the manifest every technique records its changes in, one merge function,
the rebuild registry that loading consults, and the `HfQuantizer` that lets `from_pretrained` in. Imports no
technique: each registers how its layers are rebuilt."""

from .hf_quantizer import QUANT_METHOD, HfcompressHfQuantizer, attach_config, register
from .manifest import FORMAT_VERSION, PLAIN_ATTRIBUTE, CheckpointManifest, HfcompressQuantizationConfig, manifest_of
from .merge import update_manifest
from .rebuild import Rebuilder, linear_to_replace, register_dequantizer, register_rebuilder
from .verify import CheckpointError

__all__ = [
    "FORMAT_VERSION",
    "PLAIN_ATTRIBUTE",
    "QUANT_METHOD",
    "CheckpointError",
    "CheckpointManifest",
    "HfcompressHfQuantizer",
    "HfcompressQuantizationConfig",
    "Rebuilder",
    "attach_config",
    "linear_to_replace",
    "manifest_of",
    "register",
    "register_dequantizer",
    "register_rebuilder",
    "update_manifest",
]

register()
