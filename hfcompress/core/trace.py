"""What a block does when it runs: the order its submodules are entered, which linears share an input, and
which submodules return their last linear's output unchanged."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch.nn as nn

from .capture import BlockInputs, run_block

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
    grouped by the tensor they read (q/k/v together, gate/up together), ordered by first call.
    `passthroughs`: submodules whose output is one of their linears' output.
    """

    order: list[str]
    calls: Counter
    groups: list[list[str]]
    passthroughs: dict[str, Passthrough] = field(default_factory=dict)

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


def _relative(name: str, prefix: str) -> str:
    return name[len(prefix) + 1 :]


def trace_block(block: nn.Module, prefix: str, targets: list[str], sample: BlockInputs) -> BlockTrace:
    """Run `block` once on `sample` and record its call structure (target names are full names)."""
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
    trace = BlockTrace(order, calls, groups)
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
