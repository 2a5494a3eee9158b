"""Mixture-of-experts layers as per-expert linears, so every technique that handles `nn.Linear` handles experts.

transformers stores the experts of Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, GPT-OSS and most other MoE
models fused, as 3-D parameters of one module (`mlp.experts.gate_up_proj` [experts, 2·intermediate, hidden],
`mlp.experts.down_proj`), marked by `transformers.integrations.moe.use_experts_implementation`, which also
records their layout (`has_gate`, `has_bias`, `is_transposed`, the gate function `_apply_gate`).
`ExpertLinears` holds the same weights as one `nn.Linear` per expert and projection
(`mlp.experts.gate_up_proj.3` is expert 3's gate/up projection) and computes exactly what the fused module
computes, each expert on the tokens routed to it. So a quantized, pruned or factorized expert is just a
compressed linear, each expert's Hessian comes from its own tokens, and the CPU kernel serves expert matmuls.

`unfuse_experts(model)` swaps every fused experts module for an `ExpertLinears`; `fuse_dense_experts` puts the
3-D parameters back where every expert stayed a plain linear (a model transformers loads as it is).
During calibration an `ExpertLinears` can route every token through every expert (`routing_all_tokens`): each
expert's Hessian then sees all the calibration data, while the block's output is still the routed one (as
llm-compressor's `moe_calibrate_all_experts`); `expert_tokens` reports what each expert saw.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .structure import is_plain_linear, set_submodule

__all__ = [
    "ExpertLinears",
    "counting_every_expert",
    "expert_modules",
    "expert_sources",
    "expert_tokens",
    "fuse_dense_experts",
    "held_experts",
    "is_fused_experts",
    "keep_checkpoint_names",
    "routing_all_tokens",
    "run_on_expert_linears",
    "running_every_expert",
    "stored_state",
    "unfuse_experts",
]

logger = logging.getLogger(__name__)


def is_fused_experts(module: nn.Module) -> bool:
    """Whether `module` is a transformers experts module with fused 3-D weights whose layout it declares."""
    down = getattr(module, "down_proj", None)
    return (
        hasattr(module, "has_gate")
        and hasattr(module, "num_experts")
        and isinstance(down, torch.Tensor)
        and down.dim() == 3
    )


class ExpertLinears(nn.Module):
    """The experts of a fused transformers experts module as one linear per expert and projection.

    Children: `gate_up_proj` (or `up_proj` for experts without a gate) and `down_proj`, each an
    `nn.ModuleList` of `num_experts` linear-like modules, and `post_expert_norm` where the model has one. The
    fused module itself, emptied of its weights, is kept (not as a child) for its gate function and
    activation. `forward(hidden_states, routing indices, routing weights)` takes what the fused module takes.
    """

    def __init__(self, fused: nn.Module, projections: dict[str, nn.ModuleList]):
        super().__init__()
        self.num_experts = fused.num_experts
        self.has_gate = bool(fused.has_gate)
        self.is_transposed = bool(getattr(fused, "is_transposed", False))
        self.has_bias = bool(getattr(fused, "has_bias", False))
        for name, linears in projections.items():
            self.add_module(name, linears)
        if getattr(fused, "has_post_expert_norm", False):
            self.post_expert_norm = fused.post_expert_norm
        self._fused = (fused,)  # a tuple: not a child, so none of its (removed) parameters is saved
        self.route_all = False
        self.tracing = False
        self.checking = False

    @property
    def fused(self) -> nn.Module:
        return self._fused[0]

    @property
    def first_projection(self) -> nn.ModuleList:
        return self.gate_up_proj if self.has_gate else self.up_proj

    @classmethod
    def from_fused(cls, fused: nn.Module) -> ExpertLinears:
        """The experts of `fused` as linears (copies of its weights, which are removed from it)."""
        transposed = bool(getattr(fused, "is_transposed", False))
        has_bias = bool(getattr(fused, "has_bias", False))
        projections = {}
        for name in ("gate_up_proj" if fused.has_gate else "up_proj", "down_proj"):
            weight = getattr(fused, name)
            bias = getattr(fused, f"{name}_bias", None) if has_bias else None
            if weight.shape[0] != fused.num_experts:
                raise ValueError(
                    f"{type(fused).__name__}.{name} has shape {tuple(weight.shape)}, expected {fused.num_experts} "
                    "experts first"
                )
            linears = nn.ModuleList()
            for e in range(fused.num_experts):
                w = weight[e].t() if transposed else weight[e]
                linear = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
                linear.weight = nn.Parameter(w.detach().clone(), requires_grad=weight.requires_grad)
                if bias is not None:
                    linear.bias = nn.Parameter(bias[e].detach().clone(), requires_grad=bias.requires_grad)
                linears.append(linear)
            projections[name] = linears
            delattr(fused, name)  # the 3-D parameter goes as soon as its copies exist: one projection at a time
            if bias is not None:
                delattr(fused, f"{name}_bias")
        return cls(fused, projections)

    def to_fused(self) -> nn.Module:
        """The fused module again, its 3-D parameters stacked from the (plain `nn.Linear`) experts."""
        fused = self.fused
        trainable = {name: param.requires_grad for name, param in self.named_parameters()}
        for name, tensor in self.fused_tensors().items():
            setattr(fused, name, nn.Parameter(tensor, requires_grad=trainable[_first_expert(name)]))
        if hasattr(self, "post_expert_norm"):
            fused.post_expert_norm = self.post_expert_norm
        return fused

    def fused_tensors(self) -> dict[str, torch.Tensor]:
        """The fused module's 3-D weights (and biases) stacked from the (plain `nn.Linear`) experts, by name."""
        tensors = {}
        for name in ("gate_up_proj" if self.has_gate else "up_proj", "down_proj"):
            linears = getattr(self, name)
            weights = [linear.weight.t() if self.is_transposed else linear.weight for linear in linears]
            tensors[name] = torch.stack(weights).detach()
            if self.has_bias:
                tensors[f"{name}_bias"] = torch.stack([linear.bias for linear in linears]).detach()
        return tensors

    def expert_names(self) -> list[str]:
        """The linears' names relative to this module, expert by expert."""
        names = [p for p in ("gate_up_proj", "up_proj", "down_proj") if hasattr(self, p)]
        return [f"{p}.{e}" for e in range(self.num_experts) for p in names]

    def forward(self, hidden_states: torch.Tensor, *routing, **named_routing) -> torch.Tensor:
        indices, weights = _routing(*routing, *named_routing.values())
        output = torch.zeros_like(hidden_states)
        # mask[e, slot, token]: token's top-k slot `slot` goes to expert e (an index past the last expert is a
        # sentinel of expert parallelism, never computed)
        mask = nn.functional.one_hot(indices, self.num_experts + 1).permute(2, 1, 0)
        every = self.route_all or self.tracing or self.checking
        hit = range(self.num_experts) if every else mask[: self.num_experts].sum(dim=(1, 2)).nonzero()[:, 0].tolist()
        for e in hit:
            slot, token = torch.where(mask[e])
            if self.checking:  # each expert's output on every token counts, the routed ones' weight on top
                out = self._expert(e, hidden_states)
                gain = torch.ones(out.shape[0], dtype=out.dtype, device=out.device)
                gain.index_add_(0, token, weights[token, slot].to(out.dtype))
                output.add_((out * gain[:, None]).to(output.dtype))
                continue
            if every:  # every token through expert e (its linears see them all), the routed ones kept
                # traced for routed calibration, each expert reads a tensor of its own, as it will then
                x = hidden_states if self.route_all else hidden_states.view_as(hidden_states)
                out = self._expert(e, x)[token]
            else:
                out = self._expert(e, hidden_states[token])
            out = out * weights[token, slot, None]
            output.index_add_(0, token, out.to(output.dtype))
        return output

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        h = self.first_projection[e](x)
        h = self.fused._apply_gate(h) if self.has_gate else self.fused.act_fn(h)
        out = self.down_proj[e](h)
        if hasattr(self, "post_expert_norm"):
            out = self.post_expert_norm(out)
        return out

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, from={type(self.fused).__name__}"


def _first_expert(fused_name: str) -> str:
    """The parameter name of expert 0's slice of the fused tensor `fused_name` ("down_proj_bias": "down_proj.0.bias")."""
    projection, bias, _ = fused_name.partition("_bias")
    return f"{projection}.0.{'bias' if bias else 'weight'}"


def _routing(*tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert indices [tokens, k], routing weights [tokens, k]) from the fused module's routing arguments,
    whichever order or names the model passes them in (Mixtral: top_k_index, top_k_weights; GPT-OSS:
    router_indices=, routing_weights=)."""
    indices = [t for t in tensors if isinstance(t, torch.Tensor) and not t.is_floating_point()]
    weights = [t for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if len(indices) != 1 or len(weights) != 1:
        raise TypeError(
            f"expected the routing indices and weights after the hidden states, got {[type(t).__name__ for t in tensors]}"
        )
    return indices[0], weights[0]


def unfuse_experts(model: nn.Module) -> list[str]:
    """Replace every fused experts module of `model` by its `ExpertLinears`, in place; their names."""
    names = [name for name, module in model.named_modules() if is_fused_experts(module)]
    for name in names:
        set_submodule(model, name, ExpertLinears.from_fused(model.get_submodule(name)))
    return names


def fuse_dense_experts(model: nn.Module) -> list[str]:
    """Put the fused module back for every `ExpertLinears` whose experts are all plain `nn.Linear` (nothing
    compressed them); their names. Experts in compressed layers stay as they are."""
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, ExpertLinears) and all(is_plain_linear(m) for m in _linears(module))
    ]
    for name in names:
        set_submodule(model, name, model.get_submodule(name).to_fused())
    return names


def _linears(experts: ExpertLinears) -> Iterator[nn.Module]:
    for name in experts.expert_names():
        yield experts.get_submodule(name)


def expert_modules(model: nn.Module) -> dict[str, ExpertLinears]:
    return {name: module for name, module in model.named_modules() if isinstance(module, ExpertLinears)}


def expert_sources(model: nn.Module, names: list[str]) -> dict[str, tuple[str, int, bool]]:
    """For each of `names` (full tensor names) that is an expert's weight or bias in an `ExpertLinears`: the fused
    tensor it is a slice of (as the fused module names it), the expert, and whether the fused tensor holds it
    transposed. A model streamed from disk reads its experts this way (`core.streaming.ShardedCheckpoint`)."""
    experts = expert_modules(model)
    sources = {}
    for name in names:
        owner = next((p for p in experts if name.startswith(p + ".")), None)
        if owner is None:
            continue
        projection, _, rest = name[len(owner) + 1 :].partition(".")
        expert, _, leaf = rest.partition(".")
        if projection not in ("gate_up_proj", "up_proj", "down_proj") or leaf not in ("weight", "bias"):
            continue  # a norm after the experts: the fused module's own tensor, under the same name
        fused = f"{owner}.{projection}" + ("_bias" if leaf == "bias" else "")
        sources[name] = (fused, int(expert), experts[owner].is_transposed and leaf == "weight")
    return sources


def stored_state(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """`module.state_dict(prefix=prefix + ".")`, except that the experts of an `ExpertLinears` left all plain
    linears appear as the fused module's 3-D tensors (what `fuse_dense_experts` and saving would write), while
    `module` keeps its `ExpertLinears`."""
    state = module.state_dict(prefix=f"{prefix}.")
    for name, experts in expert_modules(module).items():
        if not all(is_plain_linear(m) for m in _linears(experts)):
            continue
        lead = f"{prefix}.{name}."
        for key in [k for k in state if k.startswith(lead)]:
            del state[key]
        state.update({lead + k: t for k, t in experts.fused_tensors().items()})
        if hasattr(experts, "post_expert_norm"):
            state.update(experts.post_expert_norm.state_dict(prefix=lead + "post_expert_norm."))
    return state


@contextlib.contextmanager
def routing_all_tokens(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Inside, every `ExpertLinears` of `model` runs each expert on every token (outputs unchanged), all experts
    reading the same tensor: they share one input Hessian."""
    with _setting(model, "route_all", enabled):
        yield


@contextlib.contextmanager
def counting_every_expert(model: nn.Module) -> Iterator[None]:
    """Inside, every `ExpertLinears` of `model` adds each expert's output on every token to its output, the
    routed tokens' routing weight on top: a change to any expert, to what feeds it or to the router shows in the
    block's output whatever the sample routes where. For checks (does a fold change nothing?), not for computing:
    a check on routed outputs alone passes for an expert the sample never reaches."""
    with _setting(model, "checking", True):
        yield


@contextlib.contextmanager
def running_every_expert(model: nn.Module) -> Iterator[None]:
    """Inside, every `ExpertLinears` of `model` runs each expert, on every token, so tracing a block sees them
    all; without `routing_all_tokens`, each expert reads a tensor of its own, as in routed calibration."""
    with _setting(model, "tracing", True):
        yield


@contextlib.contextmanager
def _setting(model: nn.Module, attribute: str, enabled: bool) -> Iterator[None]:
    """Set `attribute` of every `ExpertLinears` of `model` inside; each goes back to what it was on leaving."""
    experts = list(expert_modules(model).values()) if enabled else []
    before = [getattr(module, attribute) for module in experts]
    for module in experts:
        setattr(module, attribute, True)
    try:
        yield
    finally:
        for module, value in zip(experts, before, strict=True):
            setattr(module, attribute, value)


def expert_tokens(model: nn.Module, rows: dict[str, int]) -> dict[str, dict]:
    """What calibration each expert got, from the rows (tokens) each target saw (`calibrate_blocks(rows=)`): by
    experts module, `tokens` per expert (its first projection's) and `few`, the experts that saw fewer tokens
    than their projection has inputs (their Hessian is rank-deficient, held up by dampening alone)."""
    report = {}
    for name, module in expert_modules(model).items():
        projection = "gate_up_proj" if module.has_gate else "up_proj"
        tokens = [rows.get(f"{name}.{projection}.{e}") for e in range(module.num_experts)]
        if any(t is None for t in tokens):
            continue
        inputs = getattr(module.first_projection[0], "in_features", 0)
        report[name] = {"tokens": tokens, "few": [e for e, t in enumerate(tokens) if t < inputs]}
    for name, entry in report.items():
        tokens = entry["tokens"]
        logger.info("%s: calibration tokens per expert %s", name, tokens)
        if entry["few"]:
            logger.warning(
                "%s: experts %s saw fewer calibration tokens (%s) than they have inputs; their Hessians rest on "
                "dampening (route every token through every expert while calibrating, or add data)",
                name, entry["few"], [tokens[e] for e in entry["few"]],
            )  # fmt: skip
    return report


def run_on_expert_linears(model: nn.Module, run: Callable[[], Any]) -> Any:
    """`run()` (a technique compressing `model` in place) with `model`'s fused experts held as `ExpertLinears`;
    afterwards experts that stayed plain linears are fused again. Returns what `run` returned. (The manifest
    lists the experts held, `held_experts`, whenever a technique records its layers.)"""
    unfused = unfuse_experts(model)
    if unfused:
        logger.info("%d mixture-of-experts layers held as one linear per expert", len(unfused))
    try:
        return run()
    finally:
        fuse_dense_experts(model)


def held_experts(model: nn.Module) -> dict[str, dict]:
    """The `ExpertLinears` of `model` that stay so (some expert is no plain linear), as the manifest records
    them: {name: {"experts": n}}; loading unfuses them before their layers load."""
    return {
        name: {"experts": module.num_experts}
        for name, module in expert_modules(model).items()
        if any(type(m) is not nn.Linear for m in _linears(module))
    }


def keep_checkpoint_names(model: nn.Module) -> None:
    """Have `save_pretrained` write `model`'s tensors under their own names. transformers otherwise converts a
    mixture-of-experts model's fused experts back to its original checkpoint layout when saving (matching the
    fused names, which `ExpertLinears` keeps as the prefix of each expert's tensors); loading an hfcompress
    checkpoint skips those conversions (`checkpoint.hf_quantizer`)."""
    model._weight_conversions = []


def rebuild_experts(model: nn.Module, manifest) -> None:
    """The loader's rebuilder of manifest section `experts`: each fused experts module listed becomes its
    `ExpertLinears`, before the experts' compressed layers are rebuilt in it."""
    for name, spec in manifest.experts.items():
        try:
            module = model.get_submodule(name)
        except AttributeError as e:
            raise ValueError(
                f"the checkpoint holds the experts of {name!r}, which {type(model).__name__} does not have"
            ) from e
        if not is_fused_experts(module):
            raise ValueError(
                f"the checkpoint holds the experts of {name!r}, a {type(module).__name__}, not a fused experts module"
            )
        if module.num_experts != spec["experts"]:
            raise ValueError(
                f"the checkpoint holds {spec['experts']} experts in {name!r}; the model has {module.num_experts}"
            )
        set_submodule(model, name, ExpertLinears.from_fused(module))
