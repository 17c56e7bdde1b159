"""Every registered optimization variant, run on a small model built for it; the repair of an overflowing fp16
model. `VARIANT_CASES` must name a case for each optimization variant in `FORMATS` (a variant registered
without a small-model test fails `test_every_optimization_variant_has_a_case`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from portq.tasks.checks.runtimes import call
from portq.tasks.core.contract import Format
from portq.tasks.formats import FORMATS
from portq.tasks.formats.base import config_options
from portq.tasks.formats.recipes import NotApplicable
from portq.tasks.formats.selection import optimization_variants

from tests.models_optimize import Encoder, Fp16Overflow, ResidualCNN, randomize_batchnorm

TOL = {None: (1e-4, 1e-3), "fp16": (2e-2, 2e-2), "bf16": (5e-2, 5e-2), "int8": (0.15, 0.15)}


def _cnn() -> tuple[torch.nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    return randomize_batchnorm(ResidualCNN(width=8, blocks=1)), (2, 3, 16, 16)


def _encoder() -> tuple[torch.nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    return Encoder(d=32, heads=2, layers=1).eval(), (2, 8, 32)


def _mlp() -> tuple[torch.nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval(), (4, 16)


#: (format, variant) -> model builder
VARIANT_CASES: dict[tuple[str, str], Callable[[], tuple[torch.nn.Module, tuple[int, ...]]]] = {
    ("onnx", "ort-basic"): _cnn,
    ("onnx", "ort-extended"): _cnn,
    ("onnx", "ort-all"): _cnn,
    ("onnx", "ort-transformer"): _encoder,
    ("onnx", "slim"): _cnn,
    ("onnx", "shape-inference"): _encoder,
    ("onnx", "fp16"): _mlp,
    ("onnx", "fp16-mixed"): _mlp,
    ("onnx", "int8-dynamic"): _encoder,
    ("onnx", "int8-static"): _cnn,
    ("onnx", "transformer-int8-dynamic"): _encoder,
    ("onnx", "transformer-int8-static"): _encoder,
    ("torchscript", "frozen"): _cnn,
    ("aoti", "max-autotune"): _mlp,
    ("pt2", "fp16"): _mlp,
    ("pt2", "bf16"): _cnn,
    ("aoti", "fp16"): _mlp,
    ("aoti", "bf16"): _cnn,
}
#: an AOTInductor compile takes most of a minute on 2 CPU cores
SLOW_VARIANTS = {("aoti", "max-autotune"), ("aoti", "fp16"), ("aoti", "bf16")}


def _route_family(fmt: Format, variant) -> bool:
    """A route variant (`onnx.ts2ep`) or a copy of an optimization made from one (`onnx.ts2ep-ort-all`): the copy runs
    its original's recipe (tested here) on the route's export; tests/tasks/execution/test_auto_search.py covers them."""
    variants = FORMATS.get(fmt.value).variants
    return bool(variant.routes or (variant.base not in (None, "default") and variants.get(variant.base).routes))


def test_every_optimization_variant_has_a_case() -> None:
    registered = {(fmt.value, v.name) for fmt in Format for v in optimization_variants(fmt)
                  if not _route_family(fmt, v)}
    assert registered - set(VARIANT_CASES) == set(), "optimization variants registered without a small-model test"
    assert set(VARIANT_CASES) - registered == set(), "test cases for variants that are not registered"


def _base_file(fmt: str, model: torch.nn.Module, x: torch.Tensor, out: Path) -> Path:
    if fmt == "onnx":
        path = out / "base.onnx"
        torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["y"], dynamo=True,
                          opset_version=18, external_data=False)
        return path
    path = out / "base.pt"
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(model, (x,)), str(path))
    return path


def _samples_npz(path: Path, xs: list[np.ndarray]) -> str:
    np.savez(path, input_names=np.array(["x"]), **{f"s{i}_0": x for i, x in enumerate(xs)})
    return str(path)


@pytest.mark.parametrize("fmt, name", [pytest.param(*k, marks=[pytest.mark.slow] if k in SLOW_VARIANTS else [])
                                       for k in VARIANT_CASES], ids=[f"{f}.{n}" for f, n in VARIANT_CASES])
def test_variant_optimizes_its_small_model(fmt: str, name: str, tmp_path: Path) -> None:
    handler = FORMATS.get(fmt)
    variant = handler.variants.get(name)
    model, shape = VARIANT_CASES[(fmt, name)]()
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(shape).astype(np.float32) for _ in range(3)]
    if variant.transform is None:  # an export setting: the format's own routes, with the variant's options
        _check_setting_variant(fmt, name, model, xs, tmp_path)
        return
    base = _base_file(fmt, model, torch.from_numpy(xs[0]), tmp_path)
    atol, rtol = TOL[variant.precision]
    opts: dict = {"target": "cpu", **variant.fixed, **config_options(variant.config)}
    if "calibration" in variant.needs:
        opts["calibration"] = _samples_npz(tmp_path / "calibration.npz", xs)
    if "samples" in variant.needs:
        opts.update(samples=_samples_npz(tmp_path / "samples.npz", xs), atol=atol, rtol=rtol)
    out = tmp_path / handler.filename
    try:
        facts = variant.transform(str(base), str(out), opts)
    except NotApplicable as e:  # pragma: no cover - every case is built so that its variant applies
        pytest.fail(f"{fmt}.{name} does not apply to its own test model: {e}")
    assert out.exists() and isinstance(facts, dict)
    options = handler.resolve(handler.variants.get(name) and
                              __import__("portq.tasks.core.contract", fromlist=["ArtifactRequest"])
                              .ArtifactRequest(format=fmt, variant=name)).options
    if handler.adopt is not None:
        options = handler.adopt(base, out, facts, options)
    runner = handler.open_runner(out, "cpu", options)
    for x in xs:
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        (_, got), = call(runner, [x])
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, expected, atol=atol * max(1.0, float(np.abs(expected).max())), rtol=rtol)


def test_an_overflowing_fp16_model_is_repaired_by_keeping_the_diverging_nodes_in_float32(tmp_path: Path) -> None:
    from portq.tasks.formats.onnx import precision as onnx_precision

    torch.manual_seed(0)
    model = Fp16Overflow().eval()
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((4, 32)).astype(np.float32) for _ in range(3)]
    base = _base_file("onnx", model, torch.from_numpy(xs[0]), tmp_path)
    plain = tmp_path / "fp16.onnx"
    onnx_precision.fp16(str(base), str(plain), {"target": "cpu"})
    runner = FORMATS.get("onnx").open_runner(plain, "cpu", {})
    (_, broken), = call(runner, [xs[0]])
    assert not np.isfinite(broken).all(), "plain fp16 should overflow on this model"
    samples = _samples_npz(tmp_path / "samples.npz", xs)
    fixed = tmp_path / "mixed.onnx"
    facts = onnx_precision.fp16_repair_recipe(str(base), str(fixed), {"samples": samples, "atol": 1e-2,
                                                                     "rtol": 1e-2, "target": "cpu"})
    assert facts["passed"] and 0 < facts["nodes_kept_fp32"] < 30 and facts["node_block_list"]
    runner = FORMATS.get("onnx").open_runner(fixed, "cpu", {})
    for x in xs:
        (_, got), = call(runner, [x])
        with torch.no_grad():
            np.testing.assert_allclose(got, model(torch.from_numpy(x)).numpy(), atol=1e-2, rtol=1e-2)


def _check_setting_variant(fmt: str, name: str, model: torch.nn.Module, xs: list[np.ndarray], out: Path) -> None:
    from portq.tasks.core.contract import ArtifactRequest
    from portq.tasks.formats import ExportRequest
    from portq.tasks.sources.loading import LoadedModel

    handler = FORMATS.get(fmt)
    options = handler.resolve(ArtifactRequest(format=fmt, variant=name)).options
    source = LoadedModel(kind="state_dict", module=model, input_names=["x"])
    x = torch.from_numpy(xs[0])
    req = ExportRequest(model=source, args=(x,), input_names=["x"], output_names=["output"], dynamic={}, out_dir=out,
                        device="cpu", options=options, display="small.pt")
    result = handler.export(req)
    runner = handler.open_runner(result.path, "cpu", options)
    precision = handler.variants.get(name).precision
    atol, rtol = TOL[precision]
    with torch.no_grad():
        (_, got), = call(runner, [xs[0]])
        assert got.dtype == np.float32  # a half-precision artifact keeps float32 outputs
        np.testing.assert_allclose(got, model(x).numpy(), atol=atol, rtol=rtol)
    if precision in ("fp16", "bf16"):  # and computes in half precision: the graph holds the casts autocast made
        assert any("autocast" in note for note in result.notes), result.notes
        if fmt == "pt2":
            program = torch.export.load(result.path)
            half = getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[precision])
            casts = [n for n in program.graph.nodes if n.op == "call_function" and "_to_copy" in str(n.target)
                     and n.kwargs.get("dtype") == half]
            assert casts, program.graph


def test_shape_inference_types_every_intermediate_value(tmp_path: Path) -> None:
    """`onnx.shape-inference` (added as one module, `portq.tasks.formats.onnx.shape_inference`): from a file whose
    intermediate values carry no types, it writes every value's type and shape; its config is registered with it."""
    import onnx

    handler = FORMATS.get("onnx")
    variant = handler.variants.get("shape-inference")
    model, shape = _encoder()
    base = _base_file("onnx", model, torch.randn(*shape), tmp_path)
    proto = onnx.load(str(base))
    del proto.graph.value_info[:]
    onnx.save(proto, str(base))
    out = tmp_path / "shapes.onnx"
    facts = variant.transform(str(base), str(out), {"target": "cpu", **config_options(variant.config)})
    typed = {v.name for v in onnx.load(str(out)).graph.value_info if v.type.tensor_type.HasField("shape")}
    produced = {o for n in proto.graph.node for o in n.output if o} - {o.name for o in proto.graph.output}
    assert produced and produced <= typed, sorted(produced - typed)[:5]
    assert facts["value_info_before"] == 0 and facts["value_info_after"] == len(typed)
    assert (variant.config.strict_mode, variant.config.data_prop, type(variant.config).version) == (True, True, 1)
