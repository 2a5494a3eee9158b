"""How a model's tensors are made from the tensors its checkpoint stores, as transformers' `from_pretrained` makes
them: the renamings and conversions of `transformers.conversion_mapping` (a Mixtral checkpoint stores
`model.layers.0.block_sparse_moe.experts.3.w1.weight` and `.w3.`, one per expert, which loading stacks and joins
into the 3-D `model.layers.0.mlp.experts.gate_up_proj`), worked out once from the key names and applied one
tensor at a time, so a model read block by block gets what loading it whole gets.

    layout = StoredLayout(skeleton, checkpoint_keys)
    layout.targets()                                   # the model tensors the checkpoint holds
    layout.read(["model.layers.0.mlp.experts.gate_up_proj"], read_stored, torch.float32)

`SavedNames` goes the other way: the names and layout `save_pretrained` writes a model's tensors under, which a
checkpoint written block by block takes too.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
from torch import nn
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    PrefixChange,
    WeightConverter,
    WeightRenaming,
    apply_renamings,
    dot_natural_key,
    rename_source_key,
    revert_weight_conversion,
)

__all__ = ["SavedNames", "StoredLayout"]

# read_stored(keys, dtype) -> {key: tensor}: stored tensors by their checkpoint names
ReadStored = Callable[[list[str], torch.dtype | None], dict[str, torch.Tensor]]


class StoredLayout:
    """Where each tensor of `model` (a skeleton, on the meta device, with transformers' own modules) comes from
    among `stored_keys`: the checkpoint key(s) and the conversion that joins them, if any. Stored keys the model
    has no tensor for are left out, as loading leaves them out. `hf_quantizer`: the quantizer that loads the
    checkpoint, whose conversions are then the ones loading applies."""

    def __init__(self, model: nn.Module, stored_keys: Iterable[str], hf_quantizer=None):
        # a quantizer changes the conversions, as it does when loading (hfcompress's merges no experts it stores)
        transforms = get_model_conversion_mapping(model, hf_quantizer=hf_quantizer)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        self._converters = {pattern: c for c in converters for pattern in c.source_patterns}
        self._config = model.config
        expected = model.state_dict()
        prefix = getattr(model, "base_model_prefix", None)
        # each conversion is keyed by its first target: [(stored key, the converter's source pattern or None)]
        self._sources: dict[str, list[tuple[str, str | None]]] = {}
        # every target the checkpoint fills -> the first target of the conversion that makes it
        self._made_by: dict[str, str] = {}
        for key in sorted(stored_keys, key=dot_natural_key):  # experts in order, as loading stacks them
            target, pattern = rename_source_key(key, renamings, converters, prefix, expected)
            if target not in expected and key in expected:
                target, pattern = key, None
            if target not in expected:
                continue
            self._sources.setdefault(target, []).append((key, pattern))
            outputs = self._converters[pattern].target_patterns if pattern is not None else []
            for output in outputs[1:]:  # a converter splitting one tensor into several (a fused qkv)
                self._made_by[target.replace(outputs[0], output)] = target
            self._made_by[target] = target
        self._targets = frozenset(self._made_by)

    def targets(self) -> frozenset[str]:
        """The names of the model tensors the checkpoint holds."""
        return self._targets

    def renamed(self) -> dict[str, str]:
        """{stored key: model tensor name} of the tensors stored whole under another name (GPT-NeoX's `embed_out`,
        LLaVA's `language_model.model.`): what reading a shard file by its keys must rename."""
        return {sources[0][0]: name for name, sources in self._sources.items() if sources[0][1] is None}

    def is_identity(self) -> bool:
        """Whether every model tensor is stored under its own name, unconverted."""
        return all(self.is_direct(name) for name in self._made_by)

    def is_direct(self, name: str) -> bool:
        """Whether model tensor `name` is stored under its own name, unconverted."""
        return self._sources.get(name) == [(name, None)]

    def read(self, names: Iterable[str], read_stored: ReadStored, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """The model tensors `names` (all among `targets()`), floating ones as `dtype` (None: as stored): renamed
        ones read directly, converted ones made one conversion at a time from their stored tensors."""
        wanted = list(dict.fromkeys(names))
        unknown = [n for n in wanted if n not in self._made_by]
        if unknown:
            raise KeyError(f"the checkpoint holds no tensors for {unknown[:3]}")
        tensors: dict[str, torch.Tensor] = {}
        renamed = {n: self._sources[n][0][0] for n in wanted if n in self._sources and self._sources[n][0][1] is None}
        stored = read_stored(list(renamed.values()), dtype)
        tensors.update({name: stored[key] for name, key in renamed.items()})
        for first in dict.fromkeys(self._made_by[n] for n in wanted if n not in renamed):
            for name, tensor in self._convert(first, read_stored).items():
                if name in wanted:
                    tensors[name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        return tensors

    def read_part(
        self, name: str, index: int, parts: int, read_stored: ReadStored, dtype: torch.dtype | None
    ) -> torch.Tensor | None:
        """Part `index` of `parts` along the first dimension of model tensor `name` (expert `index` of a fused
        experts tensor) made from that part's stored tensors alone, when the conversion stacks one stored tensor
        per part from each source (`MergeModulelist`, what loading does to per-expert checkpoints); None when it
        does not (the caller then reads the whole tensor)."""
        sources = self._sources.get(name)
        if sources is None or self._made_by[name] != name or sources[0][1] is None:
            return None
        by_pattern: dict[str, list[str]] = {}
        for key, pattern in sources:
            by_pattern.setdefault(pattern, []).append(key)
        if any(len(keys) != parts for keys in by_pattern.values()):
            return None
        keys = {pattern: keys[index] for pattern, keys in by_pattern.items()}
        stored = read_stored(list(keys.values()), None)
        converter = copy.deepcopy(self._converters[sources[0][1]])
        for pattern, key in keys.items():
            converter.add_tensor(name, key, pattern, stored.pop(key))
        made = converter.convert(name, config=self._config).get(name)
        made = made[0] if isinstance(made, list) else made
        if made is None or made.shape[0] != 1:
            return None
        part = made[0]
        return part.to(dtype) if dtype is not None and part.is_floating_point() else part

    def _convert(self, first: str, read_stored: ReadStored) -> dict[str, torch.Tensor]:
        sources = self._sources[first]
        stored = read_stored([key for key, _ in sources], None)  # converted as stored, cast after, as loading does
        converter = copy.deepcopy(self._converters[sources[0][1]])
        for key, pattern in sources:
            converter.add_tensor(first, key, pattern, stored.pop(key))
        made = converter.convert(first, config=self._config)
        return {name: value[0] if isinstance(value, list) else value for name, value in made.items()}


class SavedNames:
    """The names and layout `save_pretrained` writes a model's tensors under: the conversion mapping's renamings
    reversed, as `transformers.core_model_loading.revert_weight_conversion` applies them (GPT-NeoX's `lm_head`
    saved as `embed_out`, ViT's `layer.N.attention.q_proj` as `encoder.layer.N.attention.attention.query`, LLaVA's
    `model.language_model.` as `language_model.model.`), and back (`model_name`); where the mapping also converts
    tensors, `saved` converts them back as well (a mixture of experts' fused `mlp.experts.gate_up_proj` split into
    Mixtral's `block_sparse_moe.experts.N.w1.weight` and `.w3.`, one per expert).

    Use `SavedNames.of(model)`: None where the model's tensors are saved as they are."""

    def __init__(self, renamings: list[WeightRenaming], converting: nn.Module | None = None):
        self._loading = renamings
        self._saving = [r.reverse_transform() for r in reversed(renamings)]
        self._converting = converting  # the model whose conversions `saved` reverts, where it has any

    @classmethod
    def of(cls, model: nn.Module) -> SavedNames | None:
        # the mapping of a model made without `from_pretrained`, as `save_pretrained` takes it for one: no legacy
        # renamings, no prefix changes (nothing says whether a prefix was stored)
        transforms = get_model_conversion_mapping(model, add_legacy=False)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming) and not isinstance(t, PrefixChange)]
        converts = any(isinstance(t, WeightConverter) for t in transforms)
        if not renamings and not converts:
            return None
        return cls(renamings, model if converts else None)

    def saved(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`tensors` (by model names; each conversion's inputs all among them, as a block's are) as
        `save_pretrained` writes them."""
        if self._converting is None:
            return {self.saved_name(name): tensor for name, tensor in tensors.items()}
        return revert_weight_conversion(self._converting, tensors)

    def saved_name(self, name: str) -> str:
        """The key `save_pretrained` writes model tensor `name` (or a compressed layer's tensor in it) under, for
        a tensor that is only renamed (a converted one is written as `saved` writes it)."""
        return apply_renamings(name, self._saving)

    def saved_module(self, name: str) -> str:
        """The prefix `save_pretrained` writes module `name`'s tensors under (the renamings match whole keys)."""
        saved = self.saved_name(f"{name}.weight")
        return saved.removesuffix(".weight") if saved.endswith(".weight") else name

    def model_name(self, key: str) -> str:
        """The model tensor name of saved `key`; a tensor `saved` converted keeps its saved layout under the
        renamed key (`mlp.experts.N.w1.weight`), which `saved` writes back as it was."""
        return apply_renamings(key, self._loading)
