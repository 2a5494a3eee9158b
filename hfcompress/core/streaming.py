"""Models bigger than memory: the model as a skeleton on the meta device, whose weights are read from the
checkpoint's safetensors shards one block at a time (`core.block_stream` puts each block in memory and takes it
out again).

    checkpoint = ShardedCheckpoint(path)
    model = checkpoint.skeleton()                    # no weights in memory
    checkpoint.materialize(model, stored_names(model, "model.layers.0"), torch.float32)

Shards are opened for one read and closed again: a memory map left open keeps every page it touched resident.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import transformers
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from torch import nn
from transformers import AutoConfig
from transformers.quantizers.auto import AutoHfQuantizer

from .experts import expert_sources
from .packing import dense_from_bitmask
from .shard_writer import INDEX_FILE
from .stored_formats import stored_format
from .stored_layout import SavedNames, StoredLayout
from .tasks import AUTO_CLASSES
from .tensor_file import SAFETENSORS_DTYPES, read_header, read_tensors

__all__ = [
    "ShardedCheckpoint",
    "output_names",
    "release",
    "stored_names",
    "stored_weight_map",
    "streaming_obstacle",
    "tied_keys",
]

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"


def streaming_obstacle(folder: str | os.PathLike, compressed: bool = False) -> str | None:
    """Why the model at `folder` cannot be streamed from disk (None when it can): not a local folder, no
    safetensors weights, code of its own that the skeleton would have to run, or weights quantized by another
    library. With `compressed` (a pass that runs the model as stored: `ShardedCheckpoint.skeleton(compressed=True)`),
    a format some technique registered a reader for (`core.stored_formats`: compressed-tensors) streams too."""
    path = Path(folder)
    if not path.is_dir():
        return f"{os.fspath(folder)!r} is not a local folder (a Hub id is downloaded whole)"
    if not (path / INDEX_FILE).is_file() and not (path / SINGLE_FILE).is_file():
        return f"{os.fspath(folder)!r} has no safetensors weights ({INDEX_FILE} or {SINGLE_FILE})"
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if config.get("auto_map"):
        return f"{os.fspath(folder)!r} needs code of its own (auto_map), which hfcompress never runs"
    quantization = config.get("quantization_config") or {}
    method, stored = quantization.get("quant_method"), stored_format(quantization.get("quant_method"))
    if method in (None, "hfcompress"):
        return None
    if stored is None:
        return f"{os.fspath(folder)!r} is quantized with {method}, which streaming does not read (hfcompress's does)"
    if not compressed:
        return f"{os.fspath(folder)!r} is quantized with {method}, which streams only to be evaluated"
    return None if stored.obstacle is None else stored.obstacle(path, quantization)


def _weights_quantizer(quantization_config):
    """For an hfcompress checkpoint whose compressed layers all hold ordinary weights under their own names
    (factorized linears, resized layers: the quantizer `is_trainable`), the quantizer that rebuilds them, so a
    technique compresses them again as it does once `from_pretrained` loaded them; otherwise None."""
    if not isinstance(quantization_config, dict) or quantization_config.get("quant_method") != "hfcompress":
        return None
    quantizer = AutoHfQuantizer.from_config(quantization_config, pre_quantized=True)
    return quantizer if quantizer.is_trainable else None


def stored_weight_map(folder: str | os.PathLike) -> dict[str, str]:
    """{stored tensor: the file that holds it} of a model folder's safetensors weights."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        return json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    with open(folder / SINGLE_FILE, "rb") as f:
        return dict.fromkeys(read_header(f)[0], SINGLE_FILE)


class ShardedCheckpoint:
    """The safetensors weights of a local model folder, read tensor by tensor."""

    def __init__(self, folder: str | os.PathLike):
        obstacle = streaming_obstacle(folder, compressed=True)  # `skeleton` refuses the rest for other passes
        if obstacle is not None:
            raise ValueError(f"cannot stream the model: {obstacle}")
        self.folder = Path(folder)
        self.weight_map: dict[str, str] = stored_weight_map(self.folder)
        self.layout: StoredLayout | None = None  # set by `skeleton`: how the model's names map to the stored ones
        self.bitmask_layers: dict[str, tuple[str, str, int]] = {}  # set by `skeleton(dense_bitmask=True)`
        self._known: frozenset[str] | None = None  # set by `skeleton`: the model tensors the checkpoint fills
        self.reader = None  # set by `skeleton(compressed=True)` for another library's format (`core.stored_formats`)

    def stored_dtype(self) -> torch.dtype:
        """The dtype the config says the weights are stored in (float32 when it does not say)."""
        config = json.loads((self.folder / "config.json").read_text(encoding="utf-8"))
        dtype = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "float32"), None)
        return dtype if isinstance(dtype, torch.dtype) else torch.float32

    def skeleton(
        self,
        task: str = "causal-lm",
        dtype: torch.dtype = torch.float32,
        compressed: bool = False,
        dense_bitmask: bool = False,
    ) -> nn.Module:
        """The model with its parameters on the meta device (buffers such as rotary frequencies are computed on
        the CPU as usual); every key of its state dict must be in the checkpoint, except tied weights.

        With `compressed`, a checkpoint whose config holds a `quantization_config` gets the layers it stores
        (packed codes, factors, bitmasks) in place of the dense ones, by the quantizer transformers' own
        `from_pretrained` would run (for hfcompress's: the rebuild registry), their tensors on the meta device too:
        for passes that run a compressed model (streamed perplexity), not for compressing it again.

        With `dense_bitmask` instead, the layers of an hfcompress checkpoint stored as bitmask + non-zero values
        (its manifest's `sparse` section) are plain linears whose weights are read dense, zeros included: to
        compress a pruned model again (quantization densifies them in memory too).

        Another library's format streams with `compressed` only, read by the reader registered for it
        (`core.stored_formats`: compressed-tensors integer checkpoints into hfcompress's packed layers)."""
        obstacle = None if compressed else streaming_obstacle(self.folder)
        if obstacle is not None:
            raise ValueError(f"cannot stream the model: {obstacle}")
        config = AutoConfig.from_pretrained(self.folder)
        stored_config = getattr(config, "quantization_config", None)
        quantized = stored_config if compressed else None
        stored = stored_format(quantized.get("quant_method")) if isinstance(quantized, dict) else None
        reader = None if stored is None else stored.reader
        if reader is not None:
            delattr(config, "quantization_config")  # the reader puts the stored layers in; transformers must not
        with init_empty_weights(include_buffers=False):
            model = getattr(transformers, AUTO_CLASSES[task]).from_config(config, dtype=dtype)
        self.reader = None if reader is None else reader(self.folder, model, quantized, self._stored_dtypes())
        quantizer = None if compressed else _weights_quantizer(stored_config)
        if quantized is not None and reader is None:
            quantizer = AutoHfQuantizer.from_config(quantized, pre_quantized=True)
        if quantizer is not None:
            with init_empty_weights(include_buffers=True):  # the rebuilt layers' codes and scales too
                quantizer.preprocess_model(model, dtype=dtype)
        if quantizer is not None and not compressed:  # the manifest as `from_pretrained` leaves it, to be extended
            model.config.quantization_config = quantizer.quantization_config
        model.tie_weights()
        model.config._name_or_path = os.fspath(self.folder)
        # a compressed checkpoint's names are renamed as loading renames them (GPT-NeoX's `embed_out`, as
        # `save_pretrained` writes it), its experts not merged (`checkpoint.hf_quantizer`); a reader maps its own
        as_stored = quantized is not None or quantizer is not None
        self.layout = None if self.reader is not None else StoredLayout(model, self.weight_map, quantizer)
        self.bitmask_layers = self._bitmask_layers(config, model) if dense_bitmask and not as_stored else {}
        if self.reader is not None:
            known = self.reader.filled(self.weight_map)
        else:
            known = self.layout.targets() if self.layout is not None else self.weight_map.keys()
        self._known = frozenset(known) | frozenset(self.bitmask_layers)
        found = self._found()
        missing = [k for k in model.state_dict() if k not in found and k not in tied_keys(model)]
        if missing:
            raise ValueError(
                f"cannot stream the model: {len(missing)} weights of {type(model).__name__} are not in the checkpoint, "
                f"under their own names or any transformers converts on loading (first: {missing[:3]})"
            )
        reshaped = self._reshaped(model) if self.reader is None else []  # a reader converts what it reads
        if reshaped:
            name, stored, expected = reshaped[0]
            raise ValueError(
                f"cannot stream the model: {len(reshaped)} tensors are stored in another shape than "
                f"{type(model).__name__} has (first: {name!r}, stored {stored}, expected {expected}); a checkpoint "
                "whose layers are compressed streams only to be evaluated"
            )
        return model.eval()

    def _bitmask_layers(self, config, model: nn.Module) -> dict[str, tuple[str, str, int]]:
        """{dense weight name: (bitmask key, values key, columns)} of the layers the checkpoint's hfcompress
        manifest stores as bitmask + values (`sparse`); values are `weight`, or `weight_values` before format 6."""
        manifest = getattr(config, "quantization_config", None)  # `AutoConfig` leaves it a dict
        if not isinstance(manifest, dict) or manifest.get("quant_method") != "hfcompress":
            return {}
        shapes = {n: t.shape for n, t in model.state_dict().items()}
        renamed = SavedNames.of(model)

        def stored(key: str) -> str:  # under the model's name, or the one `save_pretrained` writes (LLaVA's)
            return key if key in self.weight_map or renamed is None else renamed.saved_name(key)

        layers = {}
        for layer in manifest.get("sparse") or {}:
            legacy = stored(f"{layer}.weight_values")
            values = legacy if legacy in self.weight_map else stored(f"{layer}.weight")
            layers[f"{layer}.weight"] = (stored(f"{layer}.weight_bitmask"), values, shapes[f"{layer}.weight"][1])
        return layers

    def _stored_dtypes(self) -> dict[str, torch.dtype]:
        """Each stored tensor's dtype, from the shards' headers."""
        dtypes = {}
        for file in dict.fromkeys(self.weight_map.values()):
            with open(self.folder / file, "rb") as f:
                dtypes.update({n: SAFETENSORS_DTYPES[info["dtype"]] for n, info in read_header(f)[0].items()})
        return dtypes

    def _reshaped(self, model: nn.Module) -> list[tuple[str, list[int], list[int]]]:
        """The model tensors stored under their own names in another shape (a compressed layer's values)."""
        expected = {n: list(t.shape) for n, t in model.state_dict().items() if n not in self.bitmask_layers}
        direct = [n for n in expected if n in self.weight_map and (self.layout is None or self.layout.is_direct(n))]
        shapes = {}
        for file in dict.fromkeys(self.weight_map[n] for n in direct):
            with open(self.folder / file, "rb") as f:
                shapes.update({n: info["shape"] for n, info in read_header(f)[0].items()})
        return [(n, shapes[n], expected[n]) for n in direct if n in shapes and shapes[n] != expected[n]]

    def read(self, names: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The tensors `names`, cast to `dtype` (None: as stored), each read from its shard into memory of its own
        (`core.tensor_file`: a memory map of the shard would keep the pages read resident while any of its tensors
        lives, and a copy out of it holds each tensor twice)."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.weight_map[name], []).append(name)
        tensors = {}
        for file, keys in by_file.items():
            tensors.update(read_tensors(self.folder / file, keys, dtype))
        return tensors

    def materialize(self, model: nn.Module, names: list[str], dtype: torch.dtype) -> None:
        """Load the stored tensors `names` (full names in `model`, a `skeleton`), floating ones as `dtype`, as
        `from_pretrained` would have loaded them (renamed, converted: `core.stored_layout`). Experts the model
        holds as one linear each (`core.experts.ExpertLinears`) are sliced out of their fused tensors."""
        found = self._found()
        loaded = self._model_tensors([n for n in names if n in found], dtype)
        for name, tensor in loaded.items():
            set_module_tensor_to_device(model, name, "cpu", value=tensor)
        # a weight tied to a loaded one is that tensor (T5's encoder embeddings are its shared ones): loading the
        # source replaced its parameter, which the tie had shared
        tied = getattr(model, "all_tied_weights_keys", None) or {}
        for name in names:
            if name not in found and tied.get(name) in loaded:
                set_module_tensor_to_device(model, name, "cpu", value=loaded[tied[name]])
        experts = expert_sources(model, [n for n in names if n not in found])
        by_fused: dict[str, list[str]] = {}
        for name, (fused, _, _) in experts.items():
            by_fused.setdefault(fused, []).append(name)
        for fused, members in by_fused.items():
            count = model.get_submodule(fused.rpartition(".")[0]).num_experts
            whole = None  # read only where an expert cannot be made from its own stored tensors
            for name in members:
                _, expert, transposed = experts[name]
                # a per-expert checkpoint: each expert made from its own stored tensors, a block's never in memory twice
                piece = None if self.layout is None else self.layout.read_part(fused, expert, count, self.read, None)
                if piece is None:
                    whole = self._model_tensors([fused], None)[fused] if whole is None else whole  # as stored
                    piece = whole[expert]
                piece = piece.t() if transposed else piece
                cast = dtype is not None and piece.is_floating_point() and piece.dtype != dtype
                set_module_tensor_to_device(model, name, "cpu", value=piece.to(dtype) if cast else piece.clone())
            del whole

    def _found(self):
        return self._known if self._known is not None else self.weight_map

    def _model_tensors(self, names: list[str], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        tensors = {}
        for name in [n for n in names if n in self.bitmask_layers]:
            bitmask, values, columns = self.bitmask_layers[name]
            stored = self.read([bitmask, values])
            dense = dense_from_bitmask(stored[bitmask], stored[values], columns)
            tensors[name] = dense if dtype is None else dense.to(dtype)
        names = [n for n in names if n not in self.bitmask_layers]
        if self.reader is not None:
            read = self.read(list(dict.fromkeys(s for n in names for s in self.reader.sources[n])), dtype)
            return tensors | {n: self.reader.as_loaded(n, [read[s] for s in self.reader.sources[n]]) for n in names}
        if self.layout is None:
            return tensors | self.read(names, dtype)
        return tensors | self.layout.read(names, self.read, dtype)


def stored_names(model: nn.Module, prefix: str = "") -> list[str]:
    """The full names of the stored tensors (parameters, persistent buffers) of the submodule `prefix`."""
    module = model.get_submodule(prefix) if prefix else model
    lead = f"{prefix}." if prefix else ""
    return [lead + k for k in module.state_dict(keep_vars=True)]


def output_names(model: nn.Module) -> set[str]:
    """The stored tensors of the model's output layer (not needed to reach the first block)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return set()
    names = {id(m): n for n, m in model.named_modules()}
    return set(stored_names(model, names[id(head)]))


def tied_keys(model: nn.Module) -> set[str]:
    """The state-dict keys `save_pretrained` leaves out because they are tied to another weight: the output
    embedding, and a submodule's own ties (BART's encoder and decoder embeddings are its shared one)."""
    expanded = getattr(model, "all_tied_weights_keys", None)  # transformers' expansion, the config's flags applied
    if expanded is not None:
        return set(expanded)
    tied = getattr(model, "_tied_weights_keys", None) or {}
    config = model.config
    if not getattr(config, "tie_word_embeddings", False) and not getattr(
        config.get_text_config(), "tie_word_embeddings", False
    ):
        return set()
    return set(tied)


def release(module: nn.Module) -> None:
    """Put the stored tensors (parameters and persistent buffers) of `module` back on the meta device, freeing
    their memory; buffers computed at construction (rotary frequencies) stay. Compressed layers forget the kernels
    built from their codes (`drop_kernel`), which may hold a repacked copy of them: kept, they made a streamed run
    grow by that copy with every block."""
    for name in stored_names(module):
        set_module_tensor_to_device(module, name, "meta")
    for submodule in module.modules():
        if hasattr(submodule, "drop_kernel"):
            submodule.drop_kernel()
