"""What `--optimize auto` buys against eager PyTorch, per model and precision: the issue's targets, side by side.

    python benchmarks/optimize.py [--quick] [--only NAME] [--out results.md]

Builds three models in code with random weights, each saved as TorchScript by torch.jit.trace (what users submit):

- `bert`: a BERT-style encoder, 4 layers, hidden 256, 4 heads, sequence 128, batch 4 (transformers' BertModel from a
  config, eager attention, when transformers is installed; else a hand-written encoder of the same shape);
- `transformer-encoder`: a 2-layer nn.TransformerEncoder classifier, d=128, 4x64 tokens;
- `resnet-cnn`: a ResNet-style CNN at 8x3x64x64.

For each, portq's own job runs in this process (no isolation: the source and every artifact are timed in one
process with the same threads), once lossless (`--optimize auto`) and once with int8 allowed (the CNN lossless
only). Prints, per model and mode: every candidate's speedup over the TorchScript source (the job's paired
numbers), what auto tried and pruned, and the pick against **eager PyTorch** (the nn.Module before tracing): a paired
comparison of the two in this process after the job (`portq.tasks.checks.latency.compare_paired`). With no pick
(nothing beats the source), the source itself is what a user serves, and that is what is compared with eager.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: the issue's targets: (model, mode) -> the pick's speedup over eager PyTorch it must reach
TARGETS = {("bert", "lossless"): 1.25, ("bert", "int8 allowed"): 1.6, ("transformer-encoder", "lossless"): 1.0,
           ("transformer-encoder", "int8 allowed"): 1.3, ("resnet-cnn", "lossless"): 2.9}


def bert(quick: bool) -> tuple[Any, dict[str, Any], str]:
    """(eager module, inputs by name, what it is): transformers' BertModel when installed, else a hand-written one."""
    import torch

    batch, seq = (2, 32) if quick else (4, 128)
    ids = torch.randint(0, 1000, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.int64)
    try:
        from transformers import BertConfig, BertModel
    except ImportError:
        return HandBert(quick).eval(), {"input_ids": ids}, "hand-written BERT-style encoder (no transformers)"
    config = BertConfig(vocab_size=1000, hidden_size=256 if not quick else 64, num_hidden_layers=4 if not quick else 1,
                        num_attention_heads=4, intermediate_size=1024 if not quick else 128,
                        max_position_embeddings=512, attn_implementation="eager")
    model = BertModel(config, add_pooling_layer=False).eval()

    class LastHidden(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    import transformers

    return (LastHidden(model).eval(), {"input_ids": ids, "attention_mask": mask},
            f"transformers {transformers.__version__} BertModel, eager attention")


def HandBert(quick: bool) -> Any:  # noqa: N802  (a class built on demand so torch loads late)
    import torch
    from torch import nn

    d, layers = (64, 1) if quick else (256, 4)

    class Bert(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok, self.pos = nn.Embedding(1000, d), nn.Embedding(512, d)
            self.norm = nn.LayerNorm(d)
            layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, activation="gelu", batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            pos = torch.arange(input_ids.shape[1], device=input_ids.device)
            return self.encoder(self.norm(self.tok(input_ids) + self.pos(pos)))

    return Bert()


def models(quick: bool) -> list[tuple[str, Any, dict[str, Any], str, list[str]]]:
    """(name, eager module, inputs by name, description, lossy precisions to also try)."""
    import torch
    from torch import nn

    from tests.models_optimize import Encoder, ResidualCNN, randomize_batchnorm

    torch.manual_seed(0)
    module, inputs, what = bert(quick)
    d = 64 if quick else 128

    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = Encoder(d=d, heads=4, layers=1 if quick else 2)
            self.head = nn.Linear(d, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.encoder(x).mean(1))

    cnn = randomize_batchnorm(ResidualCNN(width=16 if quick else 32, blocks=1 if quick else 3)).eval()
    return [
        ("bert", module, inputs, what, ["int8"]),
        ("transformer-encoder", Classifier().eval(), {"x": torch.randn(4, 16 if quick else 64, d)},
         f"nn.TransformerEncoder classifier, 2 layers, d={d}", ["int8"]),
        ("resnet-cnn", cnn, {"x": torch.randn(*((8, 3, 32, 32) if quick else (8, 3, 64, 64)))},
         "ResNet-style CNN, 3 residual blocks, width 32", []),
    ]


def input_specs(inputs: dict[str, Any]) -> list[dict[str, Any]]:
    from portq.tasks.core.contract import InputSpec

    out = []
    for name, t in inputs.items():
        shape = ",".join(map(str, t.shape))
        if t.dtype.is_floating_point:
            out.append(f"{name}:float32[{shape}]")
        else:  # token ids below the vocabulary; a mask of ones
            out.append(f"{name}:int64[{shape}]" + ("{0,1000}" if "ids" in name else "{1,2}"))
    return [InputSpec.parse(s).model_dump(mode="json") for s in out]


def run(path: Path, store: Any, options: dict[str, Any]) -> Any:
    from portq.tasks.execution.run import run_job
    from portq.tasks.state.submission import prepare

    (spec,) = prepare([str(path)], store, batch="bench", options=options, force=True, max_bytes=1 << 34).specs
    return run_job(spec, store)


def against_eager(report: Any, eager: Any, inputs: dict[str, Any], script: Any, latency: Any) -> tuple[str, Any]:
    """The pick (or, with none, the TorchScript source) against the eager module, paired, in this process."""
    from portq.tasks.checks.latency import compare_paired
    from portq.tasks.checks.runners import TorchRunner
    from portq.tasks.formats import FORMATS

    sample = [t.numpy() for t in inputs.values()]
    pick = report.artifact(report.best) if report.best else None
    if pick is None:
        served, runner, reopen = "the source (no pick)", TorchRunner(script, "cpu"), None
    else:
        handler = FORMATS.get(pick.format.value)
        path = report.url(pick.path)
        served = pick.id
        runner = handler.open_runner(path, "cpu", pick.options)
        reopen = lambda: handler.open_runner(path, "cpu", pick.options)  # noqa: E731
    return served, compare_paired(TorchRunner(eager, "cpu"), runner, sample, latency, device="cpu", reopen=reopen)


def candidate_rows(name: str, mode: str, report: Any) -> list[list[str]]:
    rows = []
    for a in report.artifacts:
        if a.requested_by != "optimize" and a.requested_by != "request" and not a.requested_by.startswith("base"):
            continue
        parity = "-" if a.parity is None else ("pass" if a.parity.passed else "FAIL")
        if a.latency is None:
            what = a.status.value + (f": {a.error[:90]}" if a.error else "")
            rows.append([name, mode, a.id, "-", parity, what])
            continue
        lat = a.latency
        interval = f" ({lat.speedup_interval[0]:.2f}-{lat.speedup_interval[1]:.2f})" if lat.speedup_interval else ""
        note = ("best" if a.best else "") + (" inconclusive" if lat.inconclusive else "")
        rows.append([name, mode, a.id, f"{lat.speedup:.2f}x{interval}", parity, note.strip()])
    return rows


def markdown(table: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in table]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller models and measurements (checks the benchmark "
                                                         "runs; the numbers mean little)")
    ap.add_argument("--only", action="append", help="only this model (repeatable): bert, transformer-encoder, "
                                                    "resnet-cnn")
    ap.add_argument("--out", type=Path, help="also write the tables (Markdown) here")
    args = ap.parse_args()

    import numpy as np
    import torch
    from portq.tasks.checks.fingerprint import environment
    from portq.tasks.core.contract import LatencyOptions
    from portq.tasks.reports.content import environment_line, search_facts
    from portq.tasks.state.store import Store

    tmp = Path(tempfile.mkdtemp(prefix="portq-optimize-bench-"))
    store = Store(str(tmp / "store"))
    latency = {"warmup": 3, "runs": 10, "max_seconds": 5} if args.quick else {}
    pair_opts = LatencyOptions(**latency)
    candidates = [["model", "mode", "artifact", "speedup over the TorchScript source", "parity", ""]]
    picks = [["model", "mode", "pick", "pick vs eager PyTorch", "target", "met", "source vs eager"]]
    searched = []
    start = time.perf_counter()
    load = os.getloadavg()
    for name, eager, inputs, what, lossy in models(args.quick):
        if args.only and name not in args.only:
            continue
        with torch.no_grad():
            script = torch.jit.trace(eager, tuple(inputs.values()), strict=False, check_trace=False)
        path = tmp / f"{name}.pt"
        torch.jit.save(script, path)
        np.savez(tmp / f"{name}.npz", **{k: v.numpy() for k, v in inputs.items()})
        modes = [("lossless", {"candidates": ["auto"]})]
        modes += [(f"{p} allowed", {"candidates": ["auto"], "precisions": [p]}) for p in lossy]
        from portq.tasks.checks.latency import compare_paired
        from portq.tasks.checks.runners import TorchRunner

        sample = [t.numpy() for t in inputs.values()]
        source_vs_eager = compare_paired(TorchRunner(eager, "cpu"), TorchRunner(script, "cpu"), sample, pair_opts,
                                         device="cpu")
        for mode, optimize in modes:
            report = run(path, store, {"optimize": optimize, "latency": latency, "parity": {"localise": False},
                                       "inputs": input_specs(inputs)})
            candidates += candidate_rows(name, mode, report)
            served, paired = against_eager(report, eager, inputs, script, pair_opts)
            target = TARGETS.get((name, mode))
            met = "-" if target is None else ("yes" if paired.speedup >= target else "no")
            picks.append([name, mode, served + (f" ({report.best_note})" if report.best_note else ""),
                          f"{paired.speedup:.2f}x ({paired.low:.2f}-{paired.high:.2f})"
                          + (" inconclusive" if paired.inconclusive else ""),
                          f">= {target}x" if target else "-", met, f"{source_vs_eager.speedup:.2f}x"])
            searched.append(f"- {name}, {mode}: " + "; ".join(f.value for f in search_facts(report)))
        print(f"[{name}: {what}; {time.perf_counter() - start:.0f} s so far]", file=sys.stderr, flush=True)
    text = "\n".join([
        f"machine: {environment_line(environment('cpu'))}",
        f"(ran {time.perf_counter() - start:.0f} s{'; --quick' if args.quick else ''}; load average at the start "
        f"{load[0]:.2f}, at the end {os.getloadavg()[0]:.2f})", "",
        "The pick against eager PyTorch:", "", *markdown(picks), "",
        "Every candidate against the TorchScript source (the job's report):", "", *markdown(candidates), "",
        "What auto tried and pruned:", "", *searched,
    ])
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
