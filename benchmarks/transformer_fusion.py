"""Transformer fusions against eager PyTorch: a transformers BERT and an nn.TransformerEncoder, traced, exported by
portq's TorchScript route, then each ONNX recipe, all timed in one process.

    python benchmarks/transformer_fusion.py [--quick] [--threads 1] [--only bert-sdpa,encoder] [--recipes ...]

Models: BERT from transformers (4 layers, hidden 256, 4 heads, sequence 128, batch 4; sdpa attention, the default,
and eager attention) and a 2-layer nn.TransformerEncoder classifier body (d=128, 4 heads, 4x64 tokens). Each is
saved with torch.jit.trace, exported by portq's `torchscript` route (the one a traced source takes), and then:
  default            the exported graph
  ort-transformer    `transformer.ort_transformer` (Attention rewrite + onnxruntime's fusions), SkipLayerNorm off
  ort-transformer+sln  the same with SkipLayerNormalization fused
  int8-dynamic       `precision.int8_dynamic` on the exported graph
  fused-int8-dynamic `fused_int8.transformer_int8_dynamic` (int8 on the fused graph: QAttention, int8 MatMuls)
  fused-int8-static  `fused_int8.transformer_int8_static` (QDQ MatMuls on the fused graph, calibrated)
Each artifact is opened as its facts' `load_with` says. Timing: rounds that run the eager model, the traced
TorchScript and every artifact in turn (so load changes hit all alike), the median of each; the speedup is eager's
median over the artifact's. Prints the fused-operator counts and the largest error against eager.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(name: str, quick: bool):
    import torch
    from torch import nn

    torch.manual_seed(0)
    if name.startswith("bert"):
        from transformers import BertConfig, BertModel

        hidden, layers, seq, batch = (64, 2, 32, 2) if quick else (256, 4, 128, 4)
        cfg = BertConfig(vocab_size=1000, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                         intermediate_size=4 * hidden, max_position_embeddings=512,
                         attn_implementation=name.split("-")[1])

        class TextTuple(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = BertModel(cfg)

            def forward(self, input_ids, attention_mask):
                return self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)

        ids = torch.randint(0, 1000, (batch, seq))
        mask = torch.ones(batch, seq, dtype=torch.int64)
        mask[-1, seq // 2:] = 0
        return TextTuple().eval(), (ids, mask), ["input_ids", "attention_mask"]
    from tests.models_optimize import Encoder

    d, layers, shape = (64, 1, (2, 16, 64)) if quick else (128, 2, (4, 64, 128))
    return Encoder(d=d, heads=4, layers=layers).eval(), (torch.randn(*shape),), ["x"]


def export(model, args, names, out: Path) -> tuple[Path, object]:
    import torch
    from portq.tasks.core.contract import ArtifactRequest
    from portq.tasks.formats import FORMATS, ExportRequest
    from portq.tasks.sources.loaded import LoadedModel

    with torch.no_grad():
        script = torch.jit.trace(model, args, strict=False)
        outputs = script(*args)
    n_out = len(outputs) if isinstance(outputs, tuple) else 1
    handler = FORMATS.get("onnx")
    options = handler.resolve(ArtifactRequest(format="onnx")).options
    req = ExportRequest(model=LoadedModel(kind="torchscript", module=script, script=script, input_names=names),
                        args=args, input_names=names, output_names=[f"out{i}" for i in range(n_out)], dynamic={},
                        out_dir=out, device="cpu", options=options, display="model.pt")
    return handler.export(req, only=["torchscript"]).path, script


RECIPES = ["default", "ort-transformer", "ort-transformer+sln", "int8-dynamic", "fused-int8-dynamic",
           "fused-int8-static"]


def make(recipe: str, base: Path, out: Path, calibration: str) -> dict:
    from portq.tasks.formats.onnx import fused_int8, precision, transformer

    opts: dict = {"target": "cpu"}
    if recipe == "default":
        return {"load_with": {"graph_optimization_level": "ORT_ENABLE_ALL", "disabled_optimizers": []}, "path": base}
    if recipe == "ort-transformer":
        facts = transformer.ort_transformer(str(base), str(out), opts)
    elif recipe == "ort-transformer+sln":
        facts = transformer.ort_transformer(str(base), str(out), {**opts, "skip_layer_norm": True})
    elif recipe == "int8-dynamic":
        facts = precision.int8_dynamic(str(base), str(out), opts)
    elif recipe == "fused-int8-dynamic":
        facts = fused_int8.transformer_int8_dynamic(str(base), str(out), opts)
    elif recipe == "fused-int8-static":
        facts = fused_int8.transformer_int8_static(str(base), str(out), {**opts, "calibration": calibration})
    else:
        raise SystemExit(f"unknown recipe {recipe}; known: {', '.join(RECIPES)}")
    return {**facts, "path": out}


THREADS = 0  # 0: each runtime's default (every core); --threads sets torch's and onnxruntime's alike


def session(path: Path, load_with: dict):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if THREADS:
        so.intra_op_num_threads = THREADS
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, load_with["graph_optimization_level"])
    so.log_severity_level = 3
    kw = {"disabled_optimizers": load_with["disabled_optimizers"]} if load_with.get("disabled_optimizers") else {}
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"], **kw)


def measure(name: str, recipes: list[str], quick: bool) -> list[list[str]]:
    import numpy as np
    import torch
    from portq.tasks.formats.onnx.optimize import save_samples

    model, args, names = build(name, quick)
    tmp = Path(tempfile.mkdtemp(prefix="portq-fusion-bench-"))
    (tmp / "base").mkdir()
    base, script = export(model, args, names, tmp / "base")
    feeds = {n: a.numpy() for n, a in zip(names, args)}
    gen = torch.Generator().manual_seed(1)
    calib = [{n: (a if a.dtype != torch.float32 else torch.randn(a.shape, generator=gen)).numpy()
              for n, a in zip(names, args)} for _ in range(8)]
    calibration = save_samples(str(tmp / "calibration.npz"), calib)
    with torch.no_grad():
        ref = model(*args)
    ref = (ref if isinstance(ref, tuple) else (ref,))[0].numpy()
    runners: dict = {}
    info: dict = {}
    for recipe in recipes:
        facts = make(recipe, base, tmp / f"{recipe}.onnx", calibration)
        sess = session(facts["path"], facts["load_with"])
        got = sess.run(None, feeds)[0]
        runners[recipe] = lambda s=sess: s.run(None, feeds)
        info[recipe] = (facts.get("fused_ops", {}), float(np.abs(got - ref).max()) / max(1.0, float(np.abs(ref).max())))

    def eager():
        with torch.no_grad():
            model(*args)

    def traced():
        with torch.no_grad():
            script(*args)

    timers = {"eager PyTorch": eager, "TorchScript (traced)": traced, **runners}
    for fn in timers.values():  # warm up
        for _ in range(3):
            fn()
    rounds, per = (3, 3) if quick else (11, 5)
    times: dict = {k: [] for k in timers}
    for _ in range(rounds):
        for k, fn in timers.items():
            start = time.perf_counter()
            for _ in range(per):
                fn()
            times[k].append((time.perf_counter() - start) / per * 1e3)
    p50 = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for k in timers:
        fused, err = info.get(k, ({}, None))
        ops = ", ".join(f"{op} {n}" for op, n in fused.items()) or "-"
        rows.append([name, k, f"{p50[k]:.2f}", f"{p50['eager PyTorch'] / p50[k]:.2f}x",
                     "-" if err is None else f"{err:.1e}", ops])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small models, few rounds (checks the script runs)")
    ap.add_argument("--only", default="bert-sdpa,bert-eager,encoder", help="models: bert-sdpa, bert-eager, encoder")
    ap.add_argument("--recipes", default=",".join(RECIPES), help="recipes to time: " + ", ".join(RECIPES))
    ap.add_argument("--threads", type=int, default=0, help="threads for torch and onnxruntime alike (default: "
                                                           "each runtime's own, every core)")
    args = ap.parse_args()
    import onnxruntime
    import torch

    global THREADS
    THREADS = args.threads
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {os.cpu_count()} CPUs, "
          f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f} at start")
    header = ["model", "artifact", "p50 ms", "vs eager", "max rel err", "fused operators"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for name in args.only.split(","):
        for row in measure(name, args.recipes.split(","), args.quick):
            print("| " + " | ".join(row) + " |", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
