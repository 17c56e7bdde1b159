"""The dynamo ONNX exporter's translation registry, built once per process instead of once per export.

`torch.onnx.export(dynamo=True)` rebuilds its registry of ONNX translations (about 500 onnxscript
functions, each parsed from its Python source) on every call: on 2 CPU cores that is about 0.4 s of a
small model's 1 s export, every time, even in a warm process. `install` memoizes
`ONNXRegistry.from_torchlib` per opset and hands each export its own copy of the table (the exporter
may register custom translations into it); the forkserver builds it once (`warm`), so each isolated
step's child starts with it.

This reaches into a private torch module: where that module is not as expected (another torch
release), `install` does nothing and every export builds its registry as torch does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("portq.formats")

_installed = False


def install() -> bool:
    """Memoize the exporter's registry in this process; True when in place."""
    global _installed
    if _installed:
        return True
    try:
        from torch.onnx._internal.exporter import _constants, _registration

        cls: Any = _registration.ONNXRegistry
        build = cls.from_torchlib.__func__
    except (ImportError, AttributeError) as e:
        log.debug("the ONNX exporter's registry is not memoized: %s", e)
        return False
    built: dict[tuple[type, int], Any] = {}

    def from_torchlib(klass: type, opset_version: int = _constants.TORCHLIB_OPSET) -> Any:
        key = (klass, opset_version)
        if key not in built:
            with _quiet():  # "torchvision is not installed. Skipping torchvision::nms", and so on
                built[key] = build(klass, opset_version=opset_version)
        return _copy(built[key])

    cls.from_torchlib = classmethod(from_torchlib)
    _installed = True
    return True


@contextmanager
def _quiet() -> Iterator[None]:
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _copy(registry: Any) -> Any:
    """A registry of its own: the same translations, in a table an export may add to without touching ours."""
    fresh = object.__new__(type(registry))
    fresh.__dict__.update(registry.__dict__)
    fresh.functions = {target: list(decomps) for target, decomps in registry.functions.items()}
    return fresh


def warm() -> None:
    """Install and build the default opset's registry now (the forkserver does, before any step forks)."""
    if install():
        from torch.onnx._internal.exporter import _registration

        _registration.ONNXRegistry.from_torchlib()
