"""One small model as a new user first runs it, against the tools people would use instead, side by side.

    python benchmarks/first_run.py [--runs 3] [--optimum PATH] [--navigator PYTHON] [--quick]

- **tiny BERT, ONNX**: `portq submit bert.pt2 --format onnx` (the embedded default: export, parity, latency of
  the source and the artifact, reports; a fresh process and a fresh store each run) against
  `optimum-cli export onnx --model DIR --task feature-extraction OUT` (export, then its validation of the
  outputs against PyTorch's) on the same model: a BertModel of 2 layers, hidden size 64, random weights,
  saved both as a Hugging Face folder (for optimum) and as a torch.export program (for portq).
- **small ResNet-style CNN, ONNX and TorchScript**: `portq submit cnn.pt2 -f onnx -f torchscript` against
  NVIDIA Model Navigator's `nav.torch.optimize` limited to ONNX and TorchScript on the CPU (its exports,
  correctness and performance steps, the performance at the example's batch size, as portq measures it), in a
  script this benchmark writes. Model Navigator 0.14 on a CPU-only torch needs one fix to run its Torch and
  TorchScript performance steps at all: its timer calls `torch.cuda.synchronize()` unconditionally
  (`model_navigator/runners/torch.py`); without it those steps fail and the call ends sooner.

optimum-cli and Model Navigator are not portq's dependencies: pass where they are (`--optimum` an `optimum-cli`
executable, `--navigator` a Python interpreter that imports `model_navigator`); each one not given or not found
is reported as not measured. Every tool runs as a whole process, its imports included, alternately, `--runs`
times; the table gives each one's range. The building needs `transformers` (the test extra).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: the CNN, as source: Model Navigator's script defines it from this text, portq gets its torch.export program
CNN_SOURCE = '''
import sys
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return torch.relu(x + self.body(x))


class SmallResNet(nn.Module):
    def __init__(self, c=32, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.blocks = nn.Sequential(Block(c), Block(c), Block(c))
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def build():
    torch.manual_seed(0)
    return SmallResNet().eval(), torch.randn(1, 3, 64, 64)
'''

NAVIGATOR_SCRIPT = CNN_SOURCE + '''

import model_navigator as nav


def main():
    model, example = build()
    package = nav.torch.optimize(
        model=model,
        dataloader=[torch.randn_like(example) for _ in range(10)],
        target_formats=(nav.Format.TORCHSCRIPT, nav.Format.ONNX),
        target_device=nav.DeviceKind.CPU,
        runners=("TorchCPU", "TorchScriptCPU", "OnnxCPU"),  # the source's runner is the correctness reference
        optimization_profile=nav.OptimizationProfile(batch_sizes=[1]),  # the example's shape, as portq measures
        workspace={workspace!r},
    )
    checks = [(key, runner, str(command), status.name) for key, model_status in package.status.models_status.items()
              for runner, runner_status in model_status.runners_status.items()
              for command, status in runner_status.status.items()]
    bad = [check for check in checks if check[3] != "OK"]
    print(f"navigator checks: {{len(checks) - len(bad)}} of {{len(checks)}} OK" + (f"; not OK: {{bad}}" if bad else ""))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":  # Model Navigator's export processes import this script again
    main()
'''


def build_bert(folder: Path) -> tuple[Path, Path]:
    """A tiny BertModel: its Hugging Face folder and its torch.export program (input_ids, attention_mask)."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=128)
    model = BertModel(config).eval()
    hf = folder / "bert"
    model.save_pretrained(hf)

    class Tuple(torch.nn.Module):
        def __init__(self, m: torch.nn.Module):
            super().__init__()
            self.m = m

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):  # type: ignore[no-untyped-def]
            return self.m(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)

    ids = torch.randint(0, 1000, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.int64)
    program = torch.export.export(Tuple(model).eval(), (ids, mask))
    pt2 = folder / "bert.pt2"
    torch.export.save(program, pt2)
    return hf, pt2


def build_cnn(folder: Path) -> Path:
    import torch

    (folder / "cnn_model.py").write_text(CNN_SOURCE)
    namespace: dict[str, object] = {}
    exec(compile(CNN_SOURCE, "cnn_model.py", "exec"), namespace)
    model, example = namespace["build"]()  # type: ignore[operator]
    pt2 = folder / "cnn.pt2"
    torch.export.save(torch.export.export(model, (example,)), pt2)
    return pt2


def timed(argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> tuple[float, str]:
    """Seconds the whole process took, and what went wrong if it failed."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("PORTQ_")} | (env or {})
    start = time.perf_counter()
    res = subprocess.run(argv, capture_output=True, text=True, env=full, cwd=cwd)
    seconds = time.perf_counter() - start
    said = [line for line in res.stdout.splitlines() if line.startswith("navigator checks:")]
    tail = said[-1] if said else (res.stderr or res.stdout)[-400:]
    return seconds, "" if res.returncode == 0 else f"exit {res.returncode}: {tail}"


def span(values: list[float]) -> str:
    if not values:
        return "not measured"
    lo, hi = min(values), max(values)
    return f"{lo:.1f} s" if len(values) == 1 or hi - lo < 0.05 else f"{lo:.1f}-{hi:.1f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--optimum", default=shutil.which("optimum-cli"), help="an optimum-cli executable")
    ap.add_argument("--navigator", help="a Python interpreter that imports model_navigator")
    ap.add_argument("--quick", action="store_true", help="one run each: checks the benchmark works")
    args = ap.parse_args()
    from portq.tasks.checks.fingerprint import environment
    from portq.tasks.reports.content import environment_line

    runs = 1 if args.quick else args.runs
    tmp = Path(tempfile.mkdtemp(prefix="portq-first-run-"))
    hf, bert = build_bert(tmp)
    cnn = build_cnn(tmp)
    portq = [sys.executable, "-m", "portq.client", "submit"]
    times: dict[str, list[float]] = {}
    failures: dict[str, str] = {}

    def measure(name: str, argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        seconds, failed = timed(argv, env, cwd)
        if failed:
            failures[name] = f"{seconds:.1f} s, then {failed}"
        else:
            times.setdefault(name, []).append(seconds)

    print(f"machine: {environment_line(environment('cpu'))}")
    for i in range(runs):
        measure("bert: portq (embedded, ONNX, parity and latency)",
                [*portq, str(bert), "--format", "onnx"], {"PORTQ_STORE": str(tmp / f"store-bert-{i}")})
        if args.optimum:
            measure("bert: optimum-cli export onnx (with its validation)",
                    [args.optimum, "export", "onnx", "--model", str(hf), "--task", "feature-extraction",
                     str(tmp / f"optimum-{i}")])
        measure("cnn: portq (embedded, ONNX and TorchScript, parity and latency)",
                [*portq, str(cnn), "--format", "onnx", "--format", "torchscript"],
                {"PORTQ_STORE": str(tmp / f"store-cnn-{i}")})
        if args.navigator:
            script = tmp / f"navigator_{i}.py"
            script.write_text(NAVIGATOR_SCRIPT.format(workspace=str(tmp / f"navigator-{i}")))
            measure("cnn: Model Navigator optimize (ONNX and TorchScript, CPU)", [args.navigator, str(script)],
                    cwd=tmp)
    if not args.optimum:
        failures["bert: optimum-cli export onnx"] = "not measured: no optimum-cli (--optimum PATH)"
    if not args.navigator:
        failures["cnn: Model Navigator optimize"] = "not measured: no interpreter with model_navigator (--navigator)"
    print(f"{runs} run(s) each, alternating; whole processes, imports included")
    width = max(map(len, [*times, *failures]))
    for name, values in times.items():
        print(f"  {name:{width}}  {span(values)}")
    for name, why in failures.items():
        print(f"  {name:{width}}  {why}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
