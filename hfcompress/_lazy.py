"""Lazy package namespaces: `import hfcompress` imports no torch, so `hfcompress --help` and argument errors
answer at once. A package lists its public names and the submodule that defines each; a name (or a submodule,
`hfcompress.quantization.save`) is imported the first time it is used.

    __getattr__, __dir__ = lazy_namespace(__name__, {"GPTQConfig": ".config", "quantize": ".api"})
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable

__all__ = ["lazy_namespace"]


def lazy_namespace(package: str, exports: dict[str, str]) -> tuple[Callable, Callable]:
    """`__getattr__` and `__dir__` for `package`: `exports` maps each public name to the relative module that
    defines it; any other attribute that names a submodule imports it."""

    def __getattr__(name: str):
        module = sys.modules[package]
        if name in exports:
            value = getattr(importlib.import_module(exports[name], package), name)
        elif not name.startswith("__") and importlib.util.find_spec(f"{package}.{name}") is not None:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(module, name, value)  # the next lookup is a plain attribute
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
