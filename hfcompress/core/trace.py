"""What a block does when it runs: the order its submodules are entered, which linears share an input, and
which submodules return their last linear's output unchanged."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch.nn as nn

from .capture import BlockInputs, run_block
from .experts import ExpertLinears, running_every_expert

__all__ = ["BlockTrace", "Passthrough", "trace_block"]


@dataclass
class Passthrough:
    """Module `module` returns the output of its linear `linear` as is (`index` None), or as element `index`
    of a tuple of length `length` whose other elements are None (an attention module's `(out, None)`)."""

    module: str
    linear: str
    index: int | None
    length: int = 1

    def wrap(self, output):
        if self.index is None:
            return output
        items = [None] * self.length
        items[self.index] = output
        return tuple(items)


@dataclass
class BlockTrace:
    """One call of a block, observed through hooks; names are relative to the block.

    `order`: submodule names by first entry. `calls`: entries per submodule. `groups`: the target linears
    grouped by the tensor they read (q/k/v together, gate/up together), ordered by first call, except that the
    groups of one projection of a mixture-of-experts layer follow each other (every expert's gate/up, then
    every expert's down). `stages`: runs of consecutive groups whose inputs do not depend on one another, so
    they can be calibrated in one pass: each expert's projection (an expert's input never passes through
    another expert), otherwise one group each. `passthroughs`: submodules whose output is one of their
    linears' output.
    """

    order: list[str]
    calls: Counter
    groups: list[list[str]]
    passthroughs: dict[str, Passthrough] = field(default_factory=dict)
    stages: list[list[int]] = field(default_factory=list)

    def __post_init__(self):
        if not self.stages:
            self.stages = [[g] for g in range(len(self.groups))]

    def group_of(self) -> dict[str, int]:
        return {name: g for g, names in enumerate(self.groups) for name in names}

    def settled_after(self, module: str, exclude: str | None = None) -> int:
        """Index of the last group that must be quantized before `module`'s output stops changing: the groups
        of the targets called before it and of those inside it, other than `exclude` (-1: none)."""
        start = self.order.index(module)
        relevant = [
            g
            for name, g in self.group_of().items()
            if name != exclude and (self.order.index(name) < start or name.startswith(module + "."))
        ]
        return max(relevant, default=-1)

    def last_called(self, names: list[str]) -> str:
        """Of the submodules `names`, the one entered last in the block's first call."""
        return max(names, key=self.order.index)


def _relative(name: str, prefix: str) -> str:
    return name[len(prefix) + 1 :]


def _expert_projections(block: nn.Module) -> list[str]:
    """The projections of the block's mixture-of-experts layers (`mlp.experts.gate_up_proj`), each a list of
    one linear per expert."""
    return [
        f"{name}.{projection}"
        for name, module in block.named_modules()
        if isinstance(module, ExpertLinears)
        for projection in ("gate_up_proj", "up_proj", "down_proj")
        if hasattr(module, projection)
    ]


def _expert_stages(groups: list[list[str]], projections: list[str]) -> tuple[list[list[str]], list[list[int]]]:
    """`groups` with the groups of each expert projection (`<projection>.<expert>`, or a linear inside it such as
    a factor) moved together where the first of them was, and the stages: each such run, and every other group
    alone."""

    def role(name: str) -> str | None:
        for projection in projections:
            if name.startswith(projection + "."):
                expert, dot, rest = name[len(projection) + 1 :].partition(".")
                if expert.isdigit():
                    return f"{projection}.*{dot}{rest}"
        return None

    roles = [role(names[0]) for names in groups]
    ordered, stages, done = [], [], set()
    for names, r in zip(groups, roles, strict=True):
        if r is None:
            stages.append([len(ordered)])
            ordered.append(names)
        elif r not in done:
            done.add(r)
            members = [g for g, other in zip(groups, roles, strict=True) if other == r]
            stages.append(list(range(len(ordered), len(ordered) + len(members))))
            ordered.extend(members)
    return ordered, stages


def trace_block(block: nn.Module, prefix: str, targets: list[str], sample: BlockInputs) -> BlockTrace:
    """Run `block` once on `sample` and record its call structure (target names are full names). Every expert runs
    while traced, so each one is seen whatever the sample routes to it: experts that all read every token
    (`core.experts.routing_all_tokens`) share a group, routed experts form one group each."""
    order: list[str] = []
    calls: Counter = Counter()
    readers: dict[int, list[str]] = {}
    outputs: dict[str, object] = {}
    keepalive = []
    target_set = {_relative(t, prefix) for t in targets}

    def pre_hook(name):
        def hook(module, args, kwargs):
            calls[name] += 1
            if calls[name] == 1:
                order.append(name)
            if name in target_set:
                x = args[0] if args else kwargs.get("input")
                keepalive.append(x)
                readers.setdefault(id(x), []).append(name)

        return hook

    def post_hook(name):
        def hook(module, args, kwargs, output):
            outputs[name] = output

        return hook

    handles = []
    for full_name, module in block.named_modules(prefix=prefix):
        if module is not block:
            name = _relative(full_name, prefix)
            handles.append(module.register_forward_pre_hook(pre_hook(name), with_kwargs=True))
            handles.append(module.register_forward_hook(post_hook(name), with_kwargs=True))
    try:
        with running_every_expert(block):
            run_block(block, [sample], keep_outputs=False)
    finally:
        for handle in handles:
            handle.remove()
    seen, groups = set(), []
    for names in readers.values():
        names = [n for n in dict.fromkeys(names) if n not in seen]
        seen.update(names)
        if names:
            groups.append(names)
    groups, stages = _expert_stages(groups, _expert_projections(block))
    trace = BlockTrace(order, calls, groups, stages=stages)
    trace.passthroughs = _find_passthroughs(trace, outputs, target_set)
    return trace


def _find_passthroughs(trace: BlockTrace, outputs: dict, targets: set[str]) -> dict[str, Passthrough]:
    found = {}
    for module, output in outputs.items():
        if module in targets or trace.calls[module] != 1:
            continue
        for linear in targets:
            if not linear.startswith(module + ".") or trace.calls[linear] != 1:
                continue
            produced = outputs.get(linear)
            if output is produced:
                found[module] = Passthrough(module, linear, None)
            elif isinstance(output, tuple) and any(o is produced for o in output):
                index = next(i for i, o in enumerate(output) if o is produced)
                if all(o is None for i, o in enumerate(output) if i != index):
                    found[module] = Passthrough(module, linear, index, len(output))
    return found
