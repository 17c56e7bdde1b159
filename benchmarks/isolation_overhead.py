"""What running each format step in a child process costs: in-process vs isolated, side by side, one run.

    python benchmarks/isolation_overhead.py [--repeat 5] [--formats onnx torchscript pt2]

Each job is run with `--force` (no cache) on the example models; the two modes alternate so that
machine noise hits both. Prints the median job duration per mode and the difference per format step,
plus the one-off cost of starting the forkserver (importing torch and the exporters once per worker
process).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--formats", nargs="+", default=["onnx", "torchscript", "pt2"])
    args = ap.parse_args()

    from portq.tasks.core.contract import Format
    from portq.tasks.execution.forkserver import forkserver
    from portq.tasks.execution.isolation import ChildProcess, InProcess
    from portq.tasks.execution.run import run_job
    from portq.tasks.sources.examples import write_examples
    from portq.tasks.state.store import Store
    from portq.tasks.state.submission import prepare

    tmp = Path(tempfile.mkdtemp(prefix="portq-bench-"))
    models = write_examples(tmp / "models")
    store = Store(str(tmp / "store"))

    start = time.perf_counter()
    forkserver().Process(target=time.sleep, args=(0,)).start()  # start the forkserver (and its imports)
    print(f"forkserver start (once per worker process): {time.perf_counter() - start:.2f}s")

    modes = {"in-process": InProcess(), "isolated": ChildProcess()}
    print(f"{'model':10} {'format':12} {'in-process s':>13} {'isolated s':>11} {'overhead s':>11}")
    for model in models:
        for fmt in args.formats:
            times: dict[str, list[float]] = {m: [] for m in modes}
            for i in range(args.repeat + 1):  # the first round warms caches in this process; not counted
                for name, iso in modes.items():
                    (spec,) = prepare([str(model)], store, batch="bench", max_bytes=1 << 30, force=True,
                                      options={"artifacts": [{"format": Format(fmt).value}]}).specs
                    t = time.perf_counter()
                    report = run_job(spec, store, isolation=iso)
                    if i:
                        times[name].append(time.perf_counter() - t)
                    if report.status.value != "succeeded":
                        print(f"  ({name} {model.name} {fmt}: {report.error})")
            a, b = statistics.median(times["in-process"]), statistics.median(times["isolated"])
            print(f"{model.stem:10} {fmt:12} {a:13.3f} {b:11.3f} {b - a:11.3f}")


if __name__ == "__main__":
    main()
