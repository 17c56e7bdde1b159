"""The dynamo ONNX exporter's translation registry, built once per process instead of once per export.

`torch.onnx.export(dynamo=True)` rebuilds its registry of ONNX translations (about 500 onnxscript
functions, each parsed from its Python source) on every call: on 2 CPU cores that is about 0.4 s of a
small model's 1 s export, every time, even in a warm process. `install` memoizes
`ONNXRegistry.from_torchlib` per opset and hands each export its own copy of the table (the exporter
may register custom translations into it); the forkserver builds it once (`warm`), so each isolated
step's child starts with it.

Building it, onnxscript lists its torchlib functions with each one's domain, which for a traced function
(most of them) it finds by parsing the function's Python source and translating its signature: 1.1 of the
build's 1.5 s on 2 cores, on the critical path of a first run (the forkserver's start). The domain of a traced
function is its opset's; `_fast_listing` lists them so while the registry is built (torch does not even read
the domain), and a test checks that the listing equals onnxscript's own.

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
            with _quiet(), _fast_listing():  # _quiet: "torchvision is not installed. Skipping ...", and so on
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


def _apis_module() -> Any:
    """The onnxscript module whose `get_torchlib_ops` the exporter's registry calls (torch picks it by release)."""
    import importlib

    from torch.onnx._internal import _lazy_import

    lazy: Any = _lazy_import.onnxscript_apis  # a _LazyModule: the module's name, imported on first use
    return importlib.import_module(lazy._name)


def fast_torchlib_ops(original: Any) -> list[Any]:
    """What onnxscript's `get_torchlib_ops` (`original`) returns, the same list, without parsing each traced
    function's source for its domain (a traced function's domain is its opset's)."""
    import sys

    from onnxscript._internal.values import TracedOnnxFunction
    from onnxscript.function_libs.torch_lib import ops, registration  # noqa: F401  (ops: their registration)

    meta = sys.modules[original.__module__]._OnnxFunctionMeta

    def domain(function: Any) -> str:
        if isinstance(function, TracedOnnxFunction):
            return function._opset.domain  # what its function_ir's signature translation sets
        return function.function_ir.domain  # a scripted function holds its IR already

    listing = []
    for name, overloads in registration.default_registry.items():
        if name.startswith("internal::"):  # onnxscript's own helpers, not ATen operators
            continue
        for functions, is_complex in ((overloads.overloads, False), (overloads.complex, True)):
            listing += [meta(qualified_name=name, function=f, domain=domain(f), name=f.name, is_complex=is_complex)
                        for f in functions]
    return listing


@contextmanager
def _fast_listing() -> Iterator[None]:
    """`fast_torchlib_ops`'s listing in place of onnxscript's while the registry is built; where onnxscript or torch
    is not laid out as expected (the listing cannot be made), onnxscript's own is used."""
    try:
        module = _apis_module()
        original = module.get_torchlib_ops
        listing = fast_torchlib_ops(original)
    except Exception as e:
        log.debug("onnxscript's torchlib listing is used as it is: %s", e)
        yield
        return
    module.get_torchlib_ops = lambda: listing
    try:
        yield
    finally:
        module.get_torchlib_ops = original


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
