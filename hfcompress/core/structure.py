"""Finding what to quantize by the model's structure, not by a table of model families."""

from __future__ import annotations

import re

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

__all__ = [
    "LINEAR_TYPES",
    "candidate_linears",
    "cast_unquantized",
    "find_layer_stack",
    "find_layer_stacks",
    "find_linears",
    "is_excluded",
    "is_plain_linear",
    "is_router",
    "linear_to_replace",
    "linear_weight",
    "set_linear_weight",
    "set_submodule",
    "task_head",
    "vision_modules",
]

# GPT-2 style models use transformers' Conv1D: a linear layer whose weight is stored transposed.
LINEAR_TYPES = (nn.Linear, Conv1D)


def linear_weight(module: nn.Module):
    """The [out, in] weight of a linear-like module."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def set_linear_weight(module: nn.Module, weight, exact: bool = False) -> None:
    """Write an [out, in] weight into a linear-like module, cast to its dtype; with `exact`, a weight of
    another dtype replaces the parameter instead (a float32 result in a bfloat16 model stays unrounded). A weight
    on the meta device (freed, or deferred: `core.deferred`) is replaced."""
    value = weight.t() if isinstance(module, Conv1D) else weight
    if module.weight.is_meta or (exact and value.dtype != module.weight.dtype):
        module.weight = nn.Parameter(value.contiguous(), requires_grad=False)
    else:
        module.weight.data.copy_(value)


def is_plain_linear(module: nn.Module) -> bool:
    """An `nn.Linear` nothing compressed: the class itself, or a subclass that changes only how it runs (its class
    sets `PLAIN_LINEAR = True`, as `quantization.decode_linear.DecodeLinear` does)."""
    return type(module) is nn.Linear or getattr(type(module), "PLAIN_LINEAR", False)


def find_linears(module: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    """All linear-like submodules of `module`, by their full name, in registration order."""
    found = {}
    for name, child in module.named_modules(prefix=prefix):
        if isinstance(child, LINEAR_TYPES):
            found[name] = child
    return found


def find_layer_stack(model: nn.Module, compressed: bool = False) -> tuple[str, nn.ModuleList]:
    """The repeated block stack (decoder or encoder layers) of a transformer.

    It is the `nn.ModuleList` of identical blocks that contain linear layers and hold the most parameters:
    `model.layers` for Llama/Mistral/Qwen2, `transformer.h` for GPT-2, `model.decoder.layers` for OPT,
    `encoder.layer` for BERT. With `compressed` (a model whose linears were replaced by packed or factorized
    layers, which are no `nn.Linear` and may hold their codes as buffers): the `nn.ModuleList` of blocks of one
    class, not linears themselves, that holds the most stored tensors, buffers included.
    """
    best, best_size = None, 0
    for name, module in model.named_modules():
        if not _is_block_stack(module, compressed):
            continue
        size = sum(p.numel() for p in module.parameters())
        if compressed:
            size += sum(b.numel() for b in module.buffers())
        if size > best_size:
            best, best_size = (name, module), size
    if best is None:
        raise ValueError(
            f"found no stack of transformer blocks (an nn.ModuleList of identical blocks with linear layers) in "
            f"{type(model).__name__}; hfcompress's calibrated methods need one"
        )
    return best


def find_layer_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Every stack of transformer blocks of `model` (outermost only), in the order the model registers them:
    one for a decoder or an encoder, the encoder's then the decoder's for T5, BART and Whisper, the vision
    tower's and the language model's for a vision-language model. A stack is an `nn.ModuleList` of identical
    blocks that hold linear layers (not a list of linears: the experts of a layer are not blocks)."""
    stacks: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if _is_block_stack(module) and not any(name.startswith(prefix + ".") for prefix, _ in stacks):
            stacks.append((name, module))
    return stacks


def _is_block_stack(module: nn.Module, compressed: bool = False) -> bool:
    """An `nn.ModuleList` of identical blocks that hold linear layers (not a list of linears); with `compressed`,
    blocks that hold parameters of any kind (their linears may have been replaced by compressed layers)."""
    return (
        isinstance(module, nn.ModuleList)
        and len(module) > 0
        and len({type(block) for block in module}) == 1
        and not isinstance(module[0], LINEAR_TYPES)
        and (any(True for _ in module[0].parameters()) if compressed else bool(find_linears(module[0])))
    )


def vision_modules(model: nn.Module) -> list[str]:
    """The vision tower and projector of a vision-language model (a model with a `language_model` and parts
    named for vision or projection beside it), which calibrated techniques leave out unless asked; none for
    other models (a ViT or CLIP is all vision, and compressed whole)."""
    names = [name for name, _ in model.named_modules()]
    language = [n for n in names if n.rpartition(".")[2] == "language_model"]
    if not language:
        return []
    parent = language[0].rpartition(".")[0]
    siblings = [n for n in names if n.rpartition(".")[0] == parent and n != language[0]]
    return [n for n in siblings if any(word in n.rpartition(".")[2] for word in ("vision", "visual", "projector"))]


def task_head(model: nn.Module) -> list[str]:
    """The task head of a model built on a base model: its children beside the base model (a classifier's
    `score` or `classifier`, `qa_outputs`, a masked LM's `cls`, a causal LM's `lm_head`), which techniques leave
    in full precision unless asked, as transformers' bitsandbytes loading does with the last layer; none for a
    model that is its own base model (T5, a model without a head)."""
    base = getattr(model, "base_model", model)
    if base is model:
        return []
    return [name for name, child in model.named_children() if child is not base]


def is_excluded(name: str, patterns: list[str]) -> bool:
    """Whether module `name` matches one of `patterns`: an exact name, a dotted suffix, or 're:<regex>'."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.fullmatch(pattern[3:], name):
                return True
        elif name == pattern or name.endswith("." + pattern):
            return True
    return False


def is_router(name: str, module: nn.Module, names: set[str]) -> bool:
    """Whether module `name` is a mixture-of-experts router, which stays in full precision (a few weights that
    decide where every token goes): its class or its name says so (DBRX's `ffn.router.layer`), it is the `gate`
    beside an `experts` module, or the gate of a shared expert (Qwen2-MoE's `shared_expert_gate`). `names`: every
    module name of the model."""
    parent = name.rpartition(".")[0]
    return (
        "router" in type(module).__name__.lower()
        or any("router" in part for part in name.split("."))
        or (name.endswith(".gate") and f"{parent}.experts" in names)
        or name.endswith(".shared_expert_gate")
    )


def candidate_linears(model: nn.Module, modules_to_not_convert: list[str] | None) -> dict[str, nn.Module]:
    """The linear layers a technique may change: all of them except mixture-of-experts routers and
    `modules_to_not_convert`, which defaults, when None, to the output embedding (lm_head), the task head
    (`task_head`) and a vision-language model's vision tower and projector (`vision_modules`)."""
    excluded = list(modules_to_not_convert or [])
    if modules_to_not_convert is None:
        excluded += [f"re:{re.escape(name)}(\\..*)?" for name in task_head(model) + vision_modules(model)]
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {name for name, _ in model.named_modules()}
    return {
        name: module
        for name, module in find_linears(model).items()
        if not is_excluded(name, excluded)
        and not (modules_to_not_convert is None and module is output_embeddings)
        and not is_router(name, module, names)
    }


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def linear_to_replace(model: nn.Module, name: str, verb: str) -> nn.Module:
    """The linear layer `name` that a checkpoint replaces, or an error saying what the checkpoint expected."""
    try:
        module = model.get_submodule(name)
    except AttributeError as e:
        raise ValueError(f"the checkpoint {verb} {name!r}, which {type(model).__name__} does not have") from e
    if not isinstance(module, LINEAR_TYPES):
        raise ValueError(f"the checkpoint {verb} {name!r}, a {type(module).__name__}, not a linear layer")
    return module


def cast_unquantized(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the floating-point parameters and buffers of every module to `dtype`, except those of compressed
    layers that declare `KEEPS_DTYPE` (quantized and codebook layers: their scales and codebooks keep their own
    storage dtype; their bias is cast)."""
    for module in model.modules():
        keeps = getattr(type(module), "KEEPS_DTYPE", False)
        for name, param in module.named_parameters(recurse=False):
            # a compressed layer's bias is a plain weight: it loads in the model's dtype, so it is saved in it
            if (not keeps or name == "bias") and param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
        if keeps:
            continue
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer.is_floating_point() and buffer.dtype != dtype:
                setattr(module, name, buffer.to(dtype))
    if hasattr(model, "config"):
        model.config.dtype = dtype
    return model
