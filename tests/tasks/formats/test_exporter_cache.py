"""The dynamo exporter's translation registry is built once per process, and each export gets its own table."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch
from portq.tasks.formats import exporter_cache


def test_each_export_gets_its_own_copy_of_one_built_registry(tmp_path) -> None:
    assert exporter_cache.install() and exporter_cache.install()  # idempotent
    from torch.onnx._internal.exporter import _registration

    first, second = _registration.ONNXRegistry.from_torchlib(), _registration.ONNXRegistry.from_torchlib()
    assert first is not second and first.functions is not second.functions
    assert first.functions.keys() == second.functions.keys() and len(first.functions) > 100
    target = next(iter(first.functions))
    assert first.functions[target] is not second.functions[target]
    first.functions[target].append("a custom translation")  # what an export's custom table does to its copy
    assert "a custom translation" not in _registration.ONNXRegistry.from_torchlib().functions[target]

    # and exports through it are right, one after another
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.GELU())
    x = torch.randn(2, 4)
    for i in range(2):
        path = tmp_path / f"m{i}.onnx"
        torch.onnx.export(model, (x,), str(path), dynamo=True, external_data=False)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        np.testing.assert_allclose(got[0], model(x).detach().numpy(), atol=1e-5)


def test_the_fast_torchlib_listing_is_onnxscripts_own() -> None:
    """The registry is built from a listing that skips parsing each traced function's source: it must list the
    same functions with the same domains as onnxscript's `get_torchlib_ops`, or the exporter translates wrongly."""
    original = exporter_cache._apis_module().get_torchlib_ops
    own, fast = original(), exporter_cache.fast_torchlib_ops(original)
    assert len(own) > 400
    assert [(m.qualified_name, m.function, m.domain, m.name, m.is_complex) for m in fast] == \
        [(m.qualified_name, m.function, m.domain, m.name, m.is_complex) for m in own]
    exporter_cache.warm()
    assert exporter_cache._apis_module().get_torchlib_ops is original  # replaced only while the registry is built
