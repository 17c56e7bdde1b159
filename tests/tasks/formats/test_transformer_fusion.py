"""Transformer fusions on the graphs portq's own routes export: a tiny transformers BERT (sdpa and eager attention)
and an nn.TransformerEncoder, traced and exported by the TorchScript route (the BERT also by dynamo). The fused
graph must hold one Attention per layer and two SkipLayerNormalizations per layer, say so in its facts
(`fused_ops`), and match the eager model at portq's fp32 tolerance; int8 on top keeps the fusion (QAttention)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from portq.tasks.checks.runtimes import call
from portq.tasks.core.contract import ArtifactRequest
from portq.tasks.formats import FORMATS, ExportRequest
from portq.tasks.formats.base import config_options
from portq.tasks.sources.loaded import LoadedModel
from torch import nn

from tests.models_optimize import Encoder

LAYERS = 2
ATOL, RTOL = 1e-4, 1e-3  # portq's fp32 tolerance (tests/tasks/formats/test_optimizations.py)


class TextTuple(nn.Module):
    """BertModel with tuple outputs, as people trace it."""

    def __init__(self, attention: str) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        self.model = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=LAYERS,
                                          num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                                          attn_implementation=attention))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)


def _bert_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (2, 16), generator=g)
    mask = torch.ones(2, 16, dtype=torch.int64)
    mask[-1, 9 + seed:] = 0  # a padded row: the mask must reach the fused Attention
    return ids, mask


def _encoder_inputs(seed: int) -> tuple[torch.Tensor]:
    return (torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(seed)),)


#: case -> (model, inputs(seed), input names, export route)
CASES = {
    "bert-sdpa-traced": (lambda: TextTuple("sdpa").eval(), _bert_inputs, ["input_ids", "attention_mask"],
                         "torchscript"),
    "bert-eager-traced": (lambda: TextTuple("eager").eval(), _bert_inputs, ["input_ids", "attention_mask"],
                          "torchscript"),
    "encoder-traced": (lambda: (torch.manual_seed(0), Encoder(d=64, heads=4, layers=LAYERS).eval())[1],
                       _encoder_inputs, ["x"], "torchscript"),
    "bert-sdpa-dynamo": (lambda: TextTuple("sdpa").eval(), _bert_inputs, ["input_ids", "attention_mask"], "dynamo"),
    "encoder-dynamo": (lambda: (torch.manual_seed(0), Encoder(d=64, heads=4, layers=LAYERS).eval())[1],
                       _encoder_inputs, ["x"], "dynamo"),
}


def _export(model: nn.Module, args: tuple[torch.Tensor, ...], names: list[str], route: str, out: Path) -> Path:
    """The default ONNX artifact by portq's route: a traced source takes the TorchScript-based exporter."""
    with torch.no_grad():
        outputs = model(*args)
        if route == "torchscript":
            script = torch.jit.trace(model, args, strict=False)
            source = LoadedModel(kind="torchscript", module=script, script=script, input_names=names)
        else:
            source = LoadedModel(kind="state_dict", module=model, input_names=names)
    handler = FORMATS.get("onnx")
    n_out = len(outputs) if isinstance(outputs, tuple) else 1
    out.mkdir(parents=True, exist_ok=True)
    req = ExportRequest(model=source, args=args, input_names=names, output_names=[f"out{i}" for i in range(n_out)],
                        dynamic={}, out_dir=out, device="cpu",
                        options=handler.resolve(ArtifactRequest(format="onnx")).options, display="model.pt")
    return handler.export(req, only=[route]).path


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """case -> (model, its exported default artifact), each exported once for the module's tests."""
    made: dict[str, tuple[nn.Module, Path]] = {}

    def get(case: str) -> tuple[nn.Module, Path]:
        if case not in made:
            build, inputs, names, route = CASES[case]
            model = build()
            made[case] = model, _export(model, inputs(0), names, route, tmp_path_factory.mktemp(case))
        return made[case]

    return get


def _optimize(variant_name: str, base: Path, out: Path, **extra: object) -> tuple[dict, object]:
    """Run the variant's recipe with the options a job gives it; the artifact opened as the job opens it."""
    handler = FORMATS.get("onnx")
    variant = handler.variants.get(variant_name)
    opts = {"target": "cpu", **variant.fixed, **config_options(variant.config), **extra}
    facts = variant.transform(str(base), str(out), opts)
    options = handler.resolve(ArtifactRequest(format="onnx", variant=variant_name)).options
    options = handler.adopt(base, out, facts, options) if handler.adopt is not None else options
    return facts, handler.open_runner(out, "cpu", options)


def _assert_matches_eager(model: nn.Module, runner: object, inputs, atol: float, rtol: float) -> None:
    for seed in (1, 2):
        args = inputs(seed)
        with torch.no_grad():
            expected = model(*args)
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = call(runner, [a.numpy() for a in args])
        assert len(got) == len(expected)
        for (_, g), e in zip(got, expected):
            e = e.numpy()
            np.testing.assert_allclose(g, e, atol=atol * max(1.0, float(np.abs(e).max())), rtol=rtol)


@pytest.mark.parametrize("case", list(CASES))
def test_one_attention_and_two_skip_layer_norms_per_layer(case: str, exported, tmp_path: Path) -> None:
    inputs = CASES[case][1]
    model, base = exported(case)
    facts, runner = _optimize("ort-transformer", base, tmp_path / "fused.onnx", skip_layer_norm=True)
    fused = facts["fused_ops"]
    assert fused.get("com.microsoft:Attention") == LAYERS, fused
    assert fused.get("com.microsoft:SkipLayerNormalization") == 2 * LAYERS, fused
    assert facts["attention_rewrite"]["attention"] == LAYERS
    # the padding mask is passed as Attention's integer mask_index (what QAttention takes too), not a float bias
    assert facts["attention_rewrite"]["attention_bias"] == 0
    _assert_matches_eager(model, runner, inputs, ATOL, RTOL)


def test_the_variant_fuses_attention_with_its_defaults(exported, tmp_path: Path) -> None:
    """`onnx.ort-transformer` as a job runs it (SkipLayerNormalization as its config says for a CPU target)."""
    inputs = CASES["bert-sdpa-traced"][1]
    model, base = exported("bert-sdpa-traced")
    facts, runner = _optimize("ort-transformer", base, tmp_path / "fused.onnx")
    assert facts["fused_ops"].get("com.microsoft:Attention") == LAYERS, facts["fused_ops"]
    _assert_matches_eager(model, runner, inputs, ATOL, RTOL)


@pytest.mark.parametrize("case", ["bert-sdpa-traced", "encoder-traced", "encoder-dynamo"])
def test_dynamic_int8_quantizes_the_fused_attention(case: str, exported, tmp_path: Path) -> None:
    inputs = CASES[case][1]
    model, base = exported(case)
    facts, runner = _optimize("transformer-int8-dynamic", base, tmp_path / "int8.onnx")
    assert facts["fused_ops"].get("com.microsoft:QAttention") == LAYERS, facts["fused_ops"]
    assert "com.microsoft:Attention" not in facts["fused_ops"] and facts["attention_kept_float"] == []
    assert facts["fusion"]["fused_ops"]["com.microsoft:Attention"] == LAYERS
    assert facts["ops_changed"].get("MatMulInteger", [0, 0])[1] >= 2 * LAYERS  # the FFN's MatMuls are int8 too
    _assert_matches_eager(model, runner, inputs, 0.15, 0.15)  # portq's int8 tolerance in the variant tests


def test_static_int8_keeps_the_fused_attention(exported, tmp_path: Path) -> None:
    """QDQ has no quantized Attention: the fused Attention stays, the MatMuls around it get QDQ."""
    from portq.tasks.formats.onnx.optimize import save_samples

    _, inputs, names, _ = CASES["bert-sdpa-traced"]
    model, base = exported("bert-sdpa-traced")
    samples = [{n: a.numpy() for n, a in zip(names, inputs(seed))} for seed in range(4)]
    calibration = save_samples(str(tmp_path / "calibration.npz"), samples)
    facts, runner = _optimize("transformer-int8-static", base, tmp_path / "int8.onnx", calibration=calibration)
    assert facts["fused_ops"].get("com.microsoft:Attention") == LAYERS, facts["fused_ops"]
    assert facts["ops_changed"].get("QuantizeLinear", [0, 0])[1] > 0
    _assert_matches_eager(model, runner, inputs, 0.15, 0.15)


@pytest.mark.slow  # a whole job with two variants and a reproduce run: about 40 s on 2 cores
def test_a_job_reports_the_fused_operators_and_reproduces_them(tmp_path: Path) -> None:
    """Through the job: a traced BERT with `--optimize ort-transformer,transformer-int8-dynamic --precision int8`;
    each artifact's optimization facts count the fused operators, parity passes, and the fused artifact's reproduce
    script (which carries the attention rewrite) makes it again and passes."""
    from portq.tasks.core.contract import Format, InputSpec
    from portq.tasks.execution.run import run_job
    from portq.tasks.state.store import Store

    from tests.jobs import prepare
    from tests.tasks.formats.test_reproduce import _run_script

    model = TextTuple("sdpa").eval()
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(model, _bert_inputs(0), strict=False), tmp_path / "bert.pt")
    store = Store(str(tmp_path / "store"))
    sub = prepare([str(tmp_path / "bert.pt")], store, batch="f", options={
        "inputs": [InputSpec.parse("input_ids:int64[2,16]{0,100}"), InputSpec.parse("attention_mask:int64[2,16]{0,2}")],
        "formats": [Format.onnx], "latency": {"warmup": 0, "runs": 1},
        "optimize": {"candidates": ["ort-transformer", "transformer-int8-dynamic"], "precisions": ["int8"]}})
    report = run_job(sub.specs[0], store)
    arts = {a.id: a for a in report.artifacts}
    fused, int8 = arts["onnx.ort-transformer"], arts["onnx.transformer-int8-dynamic"]
    for art in (fused, int8):
        assert art.status.value == "succeeded" and art.parity.passed, art.error
    assert fused.optimization.facts["fused_ops"]["com.microsoft:Attention"] == LAYERS
    assert int8.optimization.facts["fused_ops"]["com.microsoft:QAttention"] == LAYERS
    res = _run_script(report.url(fused.reproduce))
    assert res.returncode == 0 and res.stdout.rstrip().endswith("parity passed"), res.stdout + res.stderr
    assert '"Attention": 2' in res.stdout  # the script's own run fused the same


class BiasedAttention(nn.Module):
    """Self-attention with a learned additive bias per head (as relative-position models have), and LayerNorm."""

    def __init__(self, d: int = 32, heads: int = 4, seq: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.heads, self.size = heads, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.bias = nn.Parameter(torch.randn(1, heads, seq, seq) * 3)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, self.heads, self.size).transpose(1, 2)

        scores = split(self.q(x)) @ split(self.k(x)).transpose(-1, -2) / self.size ** 0.5 + self.bias
        out = (scores.softmax(-1) @ split(self.v(x))).transpose(1, 2).reshape(b, s, d)
        return self.norm(x + self.o(out))


def _biased_inputs(seed: int) -> tuple[torch.Tensor]:
    return (torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(seed)),)


def test_an_attention_with_a_float_bias_stays_float_in_int8(tmp_path: Path) -> None:
    """onnxruntime's quantizer drops attention_bias when it makes a QAttention: such an Attention is left fp32."""
    model = BiasedAttention().eval()
    base = _export(model, _biased_inputs(0), ["x"], "torchscript", tmp_path / "base")
    facts, runner = _optimize("ort-transformer", base, tmp_path / "fused.onnx")
    assert facts["attention_rewrite"] == {"attention": 1, "attention_bias": 1}
    _assert_matches_eager(model, runner, _biased_inputs, ATOL, RTOL)
    facts, runner = _optimize("transformer-int8-dynamic", base, tmp_path / "int8.onnx")
    fused = facts["fused_ops"]
    assert fused.get("com.microsoft:Attention") == 1 and "com.microsoft:QAttention" not in fused, fused
    assert len(facts["attention_kept_float"]) == 1
    _assert_matches_eager(model, runner, _biased_inputs, 0.15, 0.15)


def test_a_rewrite_that_does_not_check_out_falls_back_to_ort_alone(exported, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The recipe checks each candidate on a padded row: a fused Attention that ignores its mask is refused, and
    onnxruntime's own fusions are kept instead (exact, without Attention on these graphs)."""
    from onnx import helper
    from portq.tasks.formats.onnx import attention, transformer

    def ignores_the_mask(model):
        found = attention.fuse_attention(model)
        for node in model.graph.node:
            for attr in node.attribute:
                if node.op_type == "Attention" and attr.name == "mask_filter_value":
                    attr.CopyFrom(helper.make_attribute("mask_filter_value", 0.0))
        return found

    monkeypatch.setattr(transformer, "fuse_attention", ignores_the_mask)
    model, base = exported("bert-eager-traced")
    facts, runner = _optimize("ort-transformer", base, tmp_path / "fused.onnx")
    assert facts["attention_rewrite"]["fell_back"] is True
    assert "com.microsoft:Attention" not in facts["fused_ops"], facts["fused_ops"]
    _assert_matches_eager(model, runner, CASES["bert-eager-traced"][1], ATOL, RTOL)


def test_no_fused_graph_that_runs_is_a_skip_with_each_tries_error(exported, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime's optimizer made graphs that fail at run time on a ts2ep export of nn.TransformerEncoder (MatMul
    dimension mismatch at every level): that is the optimizer's limit on the graph, so the variant does not apply
    (skipped, each try named), rather than a failed artifact in a search that has working ones."""
    from portq.tasks.formats.onnx import transformer
    from portq.tasks.formats.recipes import NotApplicable

    def none_runs(kind, src, in_path, td, levels, opts, fo, tol, external, tried, best):
        tried += [{"source": kind, "opt_level": level, "ok": False,
                   "error": "[ONNXRuntimeError] : 1 : FAIL : MatMul dimension mismatch\nmore"} for level in levels]
        return best

    monkeypatch.setattr(transformer, "_try_levels", none_runs)
    _, base = exported("bert-eager-traced")
    with pytest.raises(NotApplicable) as e:
        _optimize("ort-transformer", base, tmp_path / "fused.onnx")
    assert "made no graph that loads and matches" in str(e.value)
    assert "at opt level 0: [ONNXRuntimeError] : 1 : FAIL : MatMul dimension mismatch;" in str(e.value)
    assert "more" not in str(e.value)
