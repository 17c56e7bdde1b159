"""Every registered route, forced on a small model built for it; the ladder; errors when every route fails.

`ROUTE_CASES` must name a case for each (format, route) in `FORMATS`: registering a route without a
small-model test fails `test_every_registered_route_has_a_case` (optimum's test_all_models_tested).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from portq.tasks.checks.runners import call
from portq.tasks.formats import FORMATS, ExportRequest, RoutesExhausted
from portq.tasks.formats.base import native_output_to_log
from portq.tasks.sources.loading import LoadedModel
from torch import nn

warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.lin(x)
        return {"logits": h, "top": h.topk(2, dim=-1)[0]}


class Fused(nn.Module):
    """nn.TransformerEncoder: traced under no_grad in eval, it records the fused fast-path kernel."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc(x)


def _module(m: nn.Module) -> LoadedModel:
    return LoadedModel(kind="state_dict", module=m.eval(), input_names=["x"])


def _script(m: nn.Module) -> LoadedModel:
    s = torch.jit.script(m.eval())
    return LoadedModel(kind="torchscript", module=s, script=s, input_names=["x"])


def _traced_fused() -> LoadedModel:
    with torch.no_grad():
        s = torch.jit.trace(Fused().eval(), (torch.randn(2, 5, 16),))
    return LoadedModel(kind="torchscript", module=s, script=s, input_names=["x"])


def _program(m: nn.Module, x: torch.Tensor) -> LoadedModel:
    program = torch.export.export(m.eval(), (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    return LoadedModel(kind="exported_program", module=program.module(), program=program, input_names=["x"])


def _fused_program() -> LoadedModel:
    """A program holding aten._transformer_encoder_layer_fwd (from the traced archive), as a .pt2 could."""
    from torch._export.converter import TS2EPConverter

    traced = _traced_fused()
    program = TS2EPConverter(traced.script, (torch.randn(2, 5, 16),)).convert()
    return LoadedModel(kind="exported_program", module=program.module(), program=program, input_names=["x"])


def _onnx_file() -> LoadedModel:
    """An ONNX file as a source (portq optimize), written from Small with a dynamic batch."""
    import tempfile

    from portq.tasks.sources.loading import LoadRequest, load_model

    path = Path(tempfile.mkdtemp()) / "small.onnx"
    torch.onnx.export(Small().eval(), (torch.randn(*SMALL_X),), str(path), input_names=["x"], dynamo=True,
                      output_names=["output.logits", "output.top"], dynamic_shapes=({0: torch.export.Dim("batch")},),
                      external_data=False)
    return load_model(LoadRequest(path=path, display="small.onnx"))


SMALL_X = (2, 6)
FUSED_X = (2, 5, 16)

#: (format, route) -> (source builder, example input shape, dynamic batch)
ROUTE_CASES: dict[tuple[str, str], tuple[Callable[[], LoadedModel], tuple[int, ...], bool]] = {
    ("onnx", "passthrough"): (_onnx_file, SMALL_X, True),
    ("onnx", "dynamo"): (lambda: _module(Small()), SMALL_X, True),
    ("onnx", "dynamo_decomposed"): (_fused_program, FUSED_X, False),
    ("onnx", "torchscript"): (lambda: _module(nn.Sequential(nn.Linear(6, 3), nn.GELU())), SMALL_X, True),
    ("onnx", "ts2ep"): (lambda: _script(Small()), SMALL_X, False),
    ("onnx", "ts2ep_decomposed"): (_traced_fused, FUSED_X, False),
    ("torchscript", "passthrough"): (lambda: _script(Small()), SMALL_X, False),
    ("torchscript", "trace"): (lambda: _program(Small(), torch.randn(*SMALL_X)), SMALL_X, True),
    ("torchscript", "script"): (lambda: _module(Small()), SMALL_X, True),
    ("pt2", "export"): (lambda: _module(Small()), SMALL_X, True),
    ("aoti", "inductor"): (lambda: _module(Small()), SMALL_X, True),
}
SLOW_ROUTES = {("aoti", "inductor")}  # an AOTInductor compile takes 5-15 s on 2 cores


def test_every_registered_route_has_a_case() -> None:
    registered = {(fmt, route.name) for fmt, handler in FORMATS for route in handler.routes}
    assert registered - set(ROUTE_CASES) == set(), "routes registered without a small-model test"
    assert set(ROUTE_CASES) - registered == set(), "test cases for routes that are not registered"


def _request(model: LoadedModel, shape: tuple[int, ...], dynamic: bool, out_dir: Path, **kw: Any) -> ExportRequest:
    torch.manual_seed(1)
    x = torch.randn(*shape)
    names = [n for n, _ in _flat(model.module(x))]
    return ExportRequest(model=model, args=(x,), input_names=["x"], output_names=names,
                         dynamic={0: {0: "batch"}} if dynamic else {}, out_dir=out_dir, device="cpu",
                         display="small.pt", **kw)


def _flat(out: Any) -> list[tuple[str, Any]]:
    from portq.tasks.checks.runtimes import flatten

    return flatten(out)


@pytest.mark.parametrize("fmt, route", [pytest.param(*k, marks=[pytest.mark.slow] if k in SLOW_ROUTES else [])
                                        for k in ROUTE_CASES], ids=[f"{f}:{r}" for f, r in ROUTE_CASES])
def test_route_converts_its_small_model(fmt: str, route: str, tmp_path: Path) -> None:
    build, shape, dynamic = ROUTE_CASES[(fmt, route)]
    model = build()
    handler = FORMATS.get(fmt)
    req = _request(model, shape, dynamic, tmp_path)
    result = handler.export(req, only=[route])
    assert result.route == route and result.path.exists()
    assert [(a.route, a.error) for a in req.attempts] == [(route, None)]
    runner = handler.open_runner(result.path, "cpu")
    # the artifact agrees with the source, at the example's batch size and (when dynamic) at another
    sizes = [shape, (shape[0] + 3, *shape[1:])] if dynamic else [shape]
    for size in sizes:
        sample = [np.random.default_rng(2).standard_normal(size).astype(np.float32)]
        with torch.no_grad():
            expected = _flat(model.module(torch.from_numpy(sample[0])))
        got = call(runner, sample)
        assert [n for n, _ in got] == [n for n, _ in expected]
        for (_, a), (_, e) in zip(got, expected):
            np.testing.assert_allclose(a, e, atol=1e-4, rtol=1e-3)


def test_onnx_ladder_rewrites_a_fused_kernel_for_the_torchscript_exporter(tmp_path: Path) -> None:
    """TorchScript with aten::_transformer_encoder_layer_fwd: the dynamo routes do not apply to an archive, and the
    TorchScript-based exporter takes it once the fused kernel is rewritten into plain ops; the result says so."""
    req = _request(_traced_fused(), FUSED_X, False, tmp_path)
    result = FORMATS.get("onnx").export(req)
    assert result.route == "torchscript" and result.opset == 18
    assert result.notes == ["rewrote 1 x aten::_transformer_encoder_layer_fwd into plain ops"]
    attempts = {a.route: a for a in req.attempts}
    assert list(attempts) == ["passthrough", "dynamo", "dynamo_decomposed", "torchscript"]
    assert not attempts["dynamo"].applicable and attempts["dynamo"].error.startswith("not applicable")
    assert attempts["torchscript"].error is None and attempts["torchscript"].seconds > 0


def test_a_program_whose_kernels_dynamo_rejects_is_decomposed_first(tmp_path: Path) -> None:
    req = _request(_fused_program(), FUSED_X, False, tmp_path)
    result = FORMATS.get("onnx").export(req)
    assert result.route == "dynamo_decomposed"
    assert "aten::_transformer_encoder_layer_fwd" in req.attempts[1].error  # [0]: passthrough, not applicable


class Eigh(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.eigh(x @ x.transpose(0, 1))[0]


def test_when_every_route_fails_the_error_names_file_format_routes_and_operator(tmp_path: Path) -> None:
    req = _request(_script(Eigh()), (3, 3), False, tmp_path)
    with pytest.raises(RoutesExhausted) as exc:
        FORMATS.get("onnx").export(req)
    message = exc.value.message
    assert message.startswith("[step export:onnx, file small.pt] could not convert small.pt to onnx: tried 3 route(s)")
    for route in ("torchscript: unsupported operator aten::linalg_eigh", "ts2ep: unsupported operator",
                  "ts2ep_decomposed: unsupported operator"):
        assert route in message
    assert "(aten::linalg_eigh is the first operator no route could convert" in message
    assert len(message) < 900, "one sentence, not a page of exporter output"
    assert not (tmp_path / "model.onnx").exists()


def test_guard_failures_name_the_dim(tmp_path: Path) -> None:
    class FixedBatch(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.reshape(2, -1).sum(-1)

    req = _request(_module(FixedBatch()), SMALL_X, True, tmp_path)
    with pytest.raises(RoutesExhausted) as exc:
        FORMATS.get("pt2").export(req)
    assert "guard failed for dynamic dim batch" in exc.value.message
    assert "drop --dynamic batch" in exc.value.message


def test_native_exporter_output_goes_to_the_log_not_the_terminal(capfd: pytest.CaptureFixture[str]) -> None:
    import os

    with native_output_to_log("test"):
        os.write(1, b"graph dump from C++\n")
        os.write(2, b"more from C++\n")
    out = capfd.readouterr().out
    assert "[portq] native output during test:\ngraph dump from C++\nmore from C++" in out


def test_opset_request_is_honoured(tmp_path: Path) -> None:
    import onnx

    req = _request(_module(Small()), SMALL_X, False, tmp_path, options={"opset": 17})
    result = FORMATS.get("onnx").export(req)
    assert result.opset == 17
    assert any(o.version == 17 for o in onnx.load(str(result.path)).opset_import if o.domain in ("", "ai.onnx"))


def test_a_file_at_another_opset_than_asked_is_not_the_artifact(tmp_path: Path) -> None:
    """The dynamo exporter converts opset 18 down with onnx's version converter, which gives up on some graphs
    with only a warning (seen on the example ConvNet): such a file fails its route, and the ladder goes on."""
    import onnx
    from onnx import helper
    from portq.tasks.formats.onnx.handler import _finish

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    req = ExportRequest(model=_module(Small()), args=(), input_names=["x"], output_names=["y"], dynamic={},
                        out_dir=tmp_path, device="cpu", options={"opset": 17})
    with pytest.raises(RuntimeError, match="the exporter wrote opset 18, not the requested 17"):
        _finish(req, path, "dynamo")
    req.options = {"opset": 18}
    assert _finish(req, path, "dynamo").opset == 18


def test_the_example_convnet_reaches_opset_17(example_models: dict[str, Path], tmp_path: Path) -> None:
    import onnx
    from portq.tasks.sources.loading import LoadRequest, load_model

    model = load_model(LoadRequest(path=example_models["convnet"], display="convnet.pt2"))
    req = _request(model, tuple(model.example_inputs[0].shape), False, tmp_path, options={"opset": 17})
    result = FORMATS.get("onnx").export(req)
    assert result.opset == 17
    assert [o.version for o in onnx.load(str(result.path)).opset_import if o.domain in ("", "ai.onnx")] == [17]


@pytest.mark.parametrize("text, reason, operator", [
    ("Exporting the operator 'prim::DictConstruct' to ONNX opset version 18 is not supported",
     "unsupported operator prim::DictConstruct (no ONNX symbolic at opset 18)", "prim::DictConstruct"),
    ("Failed to convert the exported program to an ONNX model.\n## Exception summary\n\n<class 'torch.onnx._internal."
     "exporter._errors.DispatchError'>: No ONNX function found for <OpOverload(op='aten._native_multi_head_attention',"
     " overload='default')>. Failure message: No decompositions registered",
     "unsupported operator aten::_native_multi_head_attention (no ONNX function or decomposition for "
     "aten._native_multi_head_attention.default)", "aten::_native_multi_head_attention"),
    ("Constraints violated (batch)! For more information, run with TORCH_LOGS=\"+dynamic\".\n  - You marked batch as "
     "dynamic but your code specialized it to be a constant (2). If you're using mark_dynamic, either remove it",
     "guard failed for dynamic dim batch: You marked batch as dynamic but your code specialized it to be a constant "
     "(2)", None),
    ("Could not guard on data-dependent expression Eq(u0, 1) (unhinted: Eq(u0, 1)).",
     "guard failed: the code branches on data-dependent value Eq(u0, 1)", None),
])
def test_exporter_errors_are_read_down_to_the_operator_or_guard(text, reason, operator):
    from portq.tasks.formats.diagnose import blocker

    found = blocker(RuntimeError("\x1b[96m" + text + "\x1b[0m"))
    assert (found.reason, found.operator) == (reason, operator)


def test_the_cause_behind_a_wrapper_is_found():
    from portq.tasks.formats.diagnose import blocker

    try:
        try:
            raise ValueError("Exporting the operator 'aten::diff' to ONNX opset version 17 is not supported")
        except ValueError as inner:
            raise RuntimeError("export failed") from inner
    except RuntimeError as outer:
        assert blocker(outer).operator == "aten::diff"


@pytest.mark.parametrize("route", [r for f, r in ROUTE_CASES if f == "onnx"])
def test_every_onnx_route_writes_its_weights_beside_the_file_when_asked(route: str, tmp_path: Path) -> None:
    """`external_data: always` (the onnx.external variant; what weights over 1 GiB get): whatever the exporter
    wrote, the artifact is model.onnx plus one model.onnx.data, its size both, and onnxruntime opens it."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    build, shape, dynamic = ROUTE_CASES[("onnx", route)]
    model = build()
    handler = FORMATS.get("onnx")
    req = _request(model, shape, dynamic, tmp_path, options={"external_data": "always"})
    result = handler.export(req, only=[route])
    data = tmp_path / "model.onnx.data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert result.data == [data] and result.size_bytes == result.path.stat().st_size + data.stat().st_size
    header = onnx.load(str(result.path), load_external_data=False)
    weights = [t for t in header.graph.initializer if len(t.dims) >= 2]  # the matrices; a few scalars stay inline
    assert weights and all(uses_external_data(t) for t in weights)
    runner = handler.open_runner(result.path, "cpu")
    sample = [np.random.default_rng(2).standard_normal(shape).astype(np.float32)]
    with torch.no_grad():
        expected = _flat(model.module(torch.from_numpy(sample[0])))
    for (_, a), (_, e) in zip(call(runner, sample), expected):
        np.testing.assert_allclose(a, e, atol=1e-4, rtol=1e-3)


def test_small_weights_stay_inside_the_file_by_default(tmp_path: Path) -> None:
    result = FORMATS.get("onnx").export(_request(_module(Small()), SMALL_X, False, tmp_path))
    assert result.data == [] and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
    assert result.size_bytes == result.path.stat().st_size


def test_weights_over_the_threshold_go_to_external_data_on_their_own(tmp_path: Path, monkeypatch) -> None:
    """"auto": the exporter's output is moved to model.onnx.data once the weights pass the threshold (1 GiB;
    lowered here), for the TorchScript-based exporter too, which would otherwise inline them up to 2 GB."""
    from portq.tasks.formats.onnx import export as recipes

    monkeypatch.setattr(recipes, "EXTERNAL_DATA_BYTES", 50)
    build, shape, dynamic = ROUTE_CASES[("onnx", "torchscript")]
    result = FORMATS.get("onnx").export(_request(build(), shape, dynamic, tmp_path), only=["torchscript"])
    assert [p.name for p in result.data] == ["model.onnx.data"]


def test_every_variant_declares_a_frozen_versioned_config() -> None:
    """Each variant's settings are a frozen dataclass with a version (torchao's style); an export setting's config is
    the options it fixes; a variant that needs something the step cannot provide is refused at registration."""
    import dataclasses

    from portq.tasks.formats.base import NEEDS, Variant, config_options

    for fmt, handler in FORMATS:
        for name, variant in handler.variants:
            if name == "default":
                continue
            config = variant.config
            assert dataclasses.is_dataclass(config), f"{fmt}.{name} declares no config"
            assert type(config).__dataclass_params__.frozen, f"{fmt}.{name}: {type(config).__name__} is not frozen"
            assert isinstance(type(config).version, int), f"{fmt}.{name}: {type(config).__name__} has no version"
            if variant.transform is None and not variant.routes:  # a route variant's config names its routes
                assert variant.fixed == config_options(config), f"{fmt}.{name}"
            if variant.routes:
                assert config.routes == variant.routes and not variant.fixed, f"{fmt}.{name}"
    with pytest.raises(ValueError, match="unknown needs.*known: " + ", ".join(sorted(NEEDS))):
        Variant("x", "a variant that needs a GPU", needs=frozenset({"gpu"}))
