"""What `--optimize auto` buys, per model and precision: eager PyTorch against every candidate, side by side.

    python benchmarks/optimize.py [--quick] [--out results.md]

Builds three models in code (a ResNet-style CNN at 8x3x64x64, a 2-layer transformer encoder at d=128 with
4x64 tokens, and a model whose activations overflow float16), saves each as an ExportedProgram, and runs
portq's own job on it in this process (no isolation, so the source and every artifact are timed in one
process with the same threads): once lossless (`--optimize auto`), once with int8 allowed, and for the
overflowing model with fp16 allowed, which shows the repair. Prints, per model and mode: the source's p50,
each variant's p50, speedup and parity, and the pick, with the machine's description. The numbers are the
job reports' own (the criterion in the README's Latency section), so they say what a user would see.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def models(quick: bool) -> list[tuple[str, object, tuple[int, ...], list[str]]]:
    """(name, model, input shape, lossy precisions to also try)."""
    import torch

    from tests.models_optimize import Encoder, Fp16Overflow, ResidualCNN, randomize_batchnorm

    torch.manual_seed(0)
    cnn = randomize_batchnorm(ResidualCNN(width=16 if quick else 32, blocks=1 if quick else 3))
    return [
        ("resnet-cnn", cnn, (8, 3, 32, 32) if quick else (8, 3, 64, 64), ["int8"]),
        ("transformer-encoder", Encoder(d=64 if quick else 128, heads=4, layers=1 if quick else 2).eval(),
         (4, 16, 64) if quick else (4, 64, 128), ["int8"]),
        ("fp16-overflow", Fp16Overflow().eval(), (16, 32), ["fp16"]),
    ]


def run(path: Path, store: object, options: dict, force: bool = True) -> object:
    from portq.tasks.execution.run import run_job
    from portq.tasks.state.submission import prepare

    (spec,) = prepare([str(path)], store, batch="bench", options=options, force=force,  # type: ignore[arg-type]
                      max_bytes=1 << 34).specs
    return run_job(spec, store)  # type: ignore[arg-type]


def rows(name: str, mode: str, report: object) -> list[list[str]]:
    out = []
    source = None
    for a in report.artifacts:  # type: ignore[attr-defined]
        if a.latency is not None:
            source = a.latency.source_p50_ms
        parity = "-" if a.parity is None else ("pass" if a.parity.passed else "FAIL")
        if a.latency is None:
            out.append([name, mode, a.id, "-", "-", parity, a.status.value + (f": {a.error[:70]}" if a.error else "")])
            continue
        note = ("best" if a.best else "") + ("" if a.latency.stable else " (unstable)")
        out.append([name, mode, a.id, f"{a.latency.p50_ms:.3f}", f"{a.latency.speedup:.2f}x", parity, note.strip()])
    out.insert(0, [name, mode, "source (eager PyTorch)", f"{source:.3f}" if source else "-", "1.00x", "", ""])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller models and measurements (checks the benchmark "
                                                         "runs; the numbers mean little)")
    ap.add_argument("--out", type=Path, help="also write the table (Markdown) here")
    args = ap.parse_args()

    import torch
    from portq.tasks.checks.fingerprint import environment
    from portq.tasks.reports.content import environment_line
    from portq.tasks.state.store import Store

    tmp = Path(tempfile.mkdtemp(prefix="portq-optimize-bench-"))
    store = Store(str(tmp / "store"))
    latency = {"warmup": 3, "runs": 10, "max_seconds": 5} if args.quick else {}
    table = [["model", "mode", "artifact", "p50 ms", "speedup", "parity", ""]]
    picks = []
    start = time.perf_counter()
    for name, model, shape, lossy in models(args.quick):
        x = torch.randn(*shape)
        path = tmp / f"{name}.pt2"
        torch.export.save(torch.export.export(model, (x,)), path)
        modes = [("lossless", {"candidates": ["auto"]})]
        modes += [(f"{p} allowed", {"candidates": ["auto"] if p != "fp16" else ["fp16"], "precisions": [p]})
                  for p in lossy]
        for mode, optimize in modes:
            report = run(path, store, {"optimize": optimize, "latency": latency, "parity": {"localise": False}})
            table += rows(name, mode, report)
            best = next((a for a in report.artifacts if a.best), None)
            picks.append((name, mode, best.id if best else "none",
                          f"{best.latency.speedup:.2f}x" if best and best.latency else "-"))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in table]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    text = "\n".join([
        f"machine: {environment_line(environment('cpu'))}",
        f"(ran {time.perf_counter() - start:.0f} s{'; --quick' if args.quick else ''})", "", *lines, "",
        "picks: " + "; ".join(f"{n} {m}: {b} ({s})" for n, m, b, s in picks),
    ])
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
