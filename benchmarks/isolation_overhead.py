"""What running each format step in a child process costs: in-process vs isolated, side by side, one run.

    python benchmarks/isolation_overhead.py [--repeat 5] [--formats onnx torchscript pt2]

Each job is run with `--force` (no cache) on the example models, in three modes that alternate so that
machine noise hits all of them: in-process, isolated in a fresh process per step (`PORTQ_STEP_REUSE=1`), and
isolated in a kept step process (the default). Prints the median job duration per mode and each isolated mode's
difference to in-process per format step, plus the one-off cost of starting the forkserver (importing torch and
the exporters once per worker process).
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
    from portq.tasks.execution import step_process
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

    modes = {"in-process": InProcess(), "fresh": ChildProcess(reuse=1), "kept": ChildProcess()}
    print(f"{'model':10} {'format':12} {'in-process s':>13} {'fresh s':>8} {'kept s':>8} {'fresh +s':>9} "
          f"{'kept +s':>8}")
    for model in models:
        for fmt in args.formats:
            times: dict[str, list[float]] = {m: [] for m in modes}
            for i in range(args.repeat + 1):  # the first round warms caches in this process; not counted
                for name, iso in modes.items():
                    # the kept mode's process waits aside while the fresh mode runs: it is neither handed to the
                    # fresh mode's step nor stopped by it
                    aside = step_process.set_aside() if name == "fresh" else None
                    (spec,) = prepare([str(model)], store, batch="bench", max_bytes=1 << 30, force=True,
                                      options={"artifacts": [{"format": Format(fmt).value}]}).specs
                    t = time.perf_counter()
                    report = run_job(spec, store, isolation=iso)
                    if i:
                        times[name].append(time.perf_counter() - t)
                    if aside is not None:
                        step_process.keep(aside)
                    if report.status.value != "succeeded":
                        print(f"  ({name} {model.name} {fmt}: {report.error})")
            a, b, c = (statistics.median(times[m]) for m in ("in-process", "fresh", "kept"))
            print(f"{model.stem:10} {fmt:12} {a:13.3f} {b:8.3f} {c:8.3f} {b - a:9.3f} {c - a:8.3f}")


if __name__ == "__main__":
    main()
