"""Registering the `hfcompress` quantization method with transformers without importing transformers.

`import hfcompress` must make `from_pretrained` understand hfcompress checkpoints, but importing transformers'
quantizer registry imports torch (1.5 s or more), which `hfcompress --help` must not pay. So: if the registry is
already imported, register now; otherwise register the moment it is (a meta-path finder that wraps the loader of
`transformers.quantizers.auto` and registers right after the module has run). Either way the registration is
in place before any `from_pretrained` can look for it.
"""

from __future__ import annotations

import importlib.abc
import logging
import sys

__all__ = ["register_when_imported"]

logger = logging.getLogger(__name__)

REGISTRY_MODULE = "transformers.quantizers.auto"


QUANTIZER_MODULE = __name__.rpartition(".")[0] + ".hf_quantizer"


def _register() -> None:
    if QUANTIZER_MODULE in sys.modules:  # it is importing the registry itself, and registers when it is done
        return
    try:
        from .hf_quantizer import register

        register()
    except Exception:  # never break the user's `import transformers`; loading an hfcompress checkpoint will fail
        logger.exception("could not register the hfcompress quantization method with transformers")


class _RegisteringLoader(importlib.abc.Loader):
    """The registry module's own loader, registering hfcompress once the module has run."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _remove_finder()
        _register()

    def __getattr__(self, name):  # get_source, get_code, ... for tracebacks and inspect
        return getattr(self._loader, name)


class _RegistryFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != REGISTRY_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


_FINDER = _RegistryFinder()


def _remove_finder() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def register_when_imported() -> None:
    """Register the quantization method with transformers now if its quantizer registry is imported, else as soon
    as it is. Idempotent."""
    if REGISTRY_MODULE in sys.modules:
        _register()
    elif _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
