"""torch's private parts that portq relies on, listed in one place with `check()`: a torch upgrade that moves or
drops one fails `tests/tasks/compat/test_torch.py` by name, instead of an export far away.

The call sites stay where they are, for a reason: the TorchScript rewrites (`tasks/formats/rewrites/`) and the
export recipes are copied as plain text into every artifact's reproduce script, which must run with torch alone,
so they cannot import portq. Each entry below names the module that uses the private API and what happens when
it is gone (a fallback, or a failed route with the exporter's own message).
"""

from __future__ import annotations

import importlib
from typing import Any

#: (dotted path of a module, attribute path inside it or "", where portq uses it and what happens without it)
PRIVATE_APIS: tuple[tuple[str, str, str], ...] = (
    ("torch._C", "_jit_pass_inline", "formats/rewrites (TorchScript graph surgery before ONNX export)"),
    ("torch._C", "_jit_pass_peephole", "formats/rewrites/script_unfuse"),
    ("torch._C", "_jit_pass_constant_propagation", "formats/rewrites/script_unfuse"),
    ("torch._C", "_jit_pass_dce", "formats/rewrites, sources/dequantize"),
    ("torch._C", "_freeze_module", "formats/rewrites/script_complex (freezing before complex rewrites)"),
    ("torch._C", "_create_function_from_graph", "formats/rewrites/script_complex"),
    ("torch.onnx._internal.exporter._registration", "ONNXRegistry.from_torchlib",
     "formats/exporter_cache (memoized translation table; without it each export builds its own, slower)"),
    ("torch.onnx._internal.exporter._constants", "", "formats/exporter_cache"),
    ("torch.onnx._internal._lazy_import", "onnxscript_apis._name", "formats/exporter_cache (fast torchlib listing)"),
    ("torch.onnx._internal.torchscript_exporter.registration", "registry.get_function_group",
     "formats/onnx/symbolics (dropping empty symbolic groups after an export)"),
    ("torch.onnx._internal.torchscript_exporter.registration", "registry._registry", "formats/onnx/symbolics"),
    ("torch.onnx._internal.torchscript_exporter", "symbolic_helper", "formats/onnx/symbolics (custom symbolics)"),
    ("torch.onnx._internal.torchscript_exporter", "_type_utils", "formats/onnx/symbolics"),
    ("torch._export.converter", "TS2EPConverter", "formats/recipes (the TorchScript -> ExportedProgram route)"),
    ("torch._export.serde.schema", "SCHEMA_VERSION", "sources/load_failures (naming a .pt2 from another torch)"),
    ("torch._inductor", "aoti_compile_and_package", "formats/aoti (AOTInductor packages)"),
    ("torch._inductor", "aoti_load_package", "checks/runtimes (running AOTInductor packages)"),
)


def _resolve(module: str, attribute: str) -> Any:
    target: Any = importlib.import_module(module)
    for part in filter(None, attribute.split(".")):
        target = getattr(target, part)
    return target


def check() -> list[str]:
    """Each private API this torch no longer has, with where portq uses it (empty when all is there)."""
    missing = []
    for module, attribute, used_by in PRIVATE_APIS:
        try:
            _resolve(module, attribute)
        except (ImportError, AttributeError) as e:
            missing.append(f"{module}{'.' + attribute if attribute else ''} ({used_by}): {type(e).__name__}: {e}")
    return missing
