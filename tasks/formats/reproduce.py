"""Reproduce scripts: beside each artifact, a small Python file that redoes its conversion and parity check by hand.

`reproduce_<format>.py` carries a copy of the recipes portq ran (`portq.tasks.formats.recipes` and
`unfuse`), the settings of the job, and reads the job's samples from `reproduce_inputs.npz` beside it. It
needs torch and numpy (and onnxruntime for ONNX), not portq, so it can go into an upstream bug report.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import numpy as np

INPUTS_FILE = "reproduce_inputs.npz"


def script_name(fmt: str) -> str:
    return f"reproduce_{fmt}.py"


def write_inputs(directory: Path, samples: list[list[np.ndarray]]) -> Path:
    """All parity samples, as s<sample>_<input> arrays: written once per job, into its result folder, and
    shared by every format's script (`portq.tasks.execution.run` writes it before the format steps)."""
    path = directory / INPUTS_FILE
    arrays = {f"s{i}_{j}": a for i, sample in enumerate(samples) for j, a in enumerate(sample)}
    np.savez(path, **arrays)  # type: ignore[arg-type]  # numpy's stubs type **kwds as bool
    return path


def _module_source(module: Any) -> str:
    """A module's source without its portq imports and `from __future__` line (the script has its own)."""
    lines = []
    for line in inspect.getsource(module).splitlines():
        if "portq-only" in line or line.startswith("from __future__"):
            continue
        lines.append(line)
    return "\n".join(lines).strip() + "\n"


def render(
    *, fmt: str, filename: str, route: str, recipe: str, kind: str, display: str, model_path: str,
    arch: str | None, arch_kwargs: dict[str, Any], opts: dict[str, Any], tolerances: dict[str, dict[str, Any]],
    default_tolerance: dict[str, Any], n_samples: int, n_inputs: int, export_sample: int, toolchain: dict[str, str],
) -> str:
    """The text of one reproduce script.

    `tolerances` maps each output's name to the check portq held it to ({"mode", "atol", "rtol", "q",
    "origin"}); `default_tolerance` is the job's own, for an output the script meets that portq did not.
    """
    from portq.tasks.formats import recipes, unfuse

    settings = {
        "format": fmt, "route": route, "kind": kind, "model": model_path, "arch": arch, "arch_kwargs": arch_kwargs,
        "opts": opts, "tolerances": tolerances, "tolerance": default_tolerance, "samples": n_samples,
        "inputs": n_inputs, "export_sample": export_sample, "filename": filename,
    }
    made_with = ", ".join(f"{k} {v}" for k, v in toolchain.items() if k != "portq")
    doc = (inspect.getdoc(getattr(recipes, recipe)) or "").splitlines()[0]
    checks = "\n".join(f"    {_doc_safe(name)}: {_describe(t)}" for name, t in tolerances.items())
    return _TEMPLATE.format(
        fmt=fmt, display=display, route=route, route_doc=doc, checks=checks or "    (no outputs)",
        made_with=made_with or "-", script=script_name(fmt), settings=json.dumps(settings, indent=1, sort_keys=True),
        recipe=recipe, inputs_file=INPUTS_FILE, unfuse=_module_source(unfuse), recipes=_module_source(recipes),
    )


def _describe(tol: dict[str, Any]) -> str:
    stat = f"quantile q={tol['q']:g}" if tol["mode"] == "quantile" else tol["mode"]
    text = f"{stat} atol {tol['atol']:g} / rtol {tol['rtol']:g}"
    return text + (f" ({_doc_safe(tol['origin'])})" if tol.get("origin") else "")


def _doc_safe(text: str) -> str:
    # shown inside the script's docstring: no backslashes or quotes that could end it
    return text.replace("\\", "/").replace('"', "'")


def write_script(directory: Path, **kw: Any) -> Path:
    path = directory / script_name(kw["fmt"])
    path.write_text(render(**kw))
    return path


_TEMPLATE = '''#!/usr/bin/env python3
"""Redo portq's {fmt} conversion of {display} by hand, then its parity check.

portq converted it by the route `{route}`: {route_doc}
This script runs that same recipe (copied below) on the same example inputs, runs the new artifact on
every sample portq checked ({inputs_file}, beside this file), and compares it with the source model by
the check portq's report applied to each output (`OutputCheck` below says how each mode judges):
{checks}
Exit status 0 when parity passes.

    python {script} [--model PATH] [--out PATH]

portq ran with: {made_with}. Needs torch and numpy (and onnxruntime for ONNX); not portq.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np

SETTINGS = json.loads(r"""{settings}""")


# ----------------------------------------------------------------- copied from portq.tasks.formats.unfuse
{unfuse}

# ---------------------------------------------------------------- copied from portq.tasks.formats.recipes
{recipes}

# ------------------------------------------------------------------------------------------- the source

def load_source(path: str) -> Any:
    """The source model as portq loaded it: .module (callable), .script, .program."""
    import torch

    kind = SETTINGS["kind"]
    if kind == "torchscript":
        script = torch.jit.load(path, map_location="cpu").eval()
        return types.SimpleNamespace(module=script, script=script, program=None)
    if kind == "exported_program":
        program = torch.export.load(path)
        return types.SimpleNamespace(module=program.module(), script=None, program=program)
    if kind == "pickled_module":  # portq loaded it with --trust-pickle: this runs code from the file
        return types.SimpleNamespace(module=torch.load(path, map_location="cpu", weights_only=False).eval(),
                                     script=None, program=None)
    if kind == "safetensors":
        from safetensors.torch import load_file

        state = load_file(path, device="cpu")
    else:  # a state dict, or a training checkpoint holding one
        state = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model_state_dict", "model_state", "model", "module", "net", "weights"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
    module_name, _, attr = SETTINGS["arch"].partition(":")
    cls: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        cls = getattr(cls, part)
    module = cls(**SETTINGS["arch_kwargs"])
    if state and all(k.startswith("module.") for k in state):
        state = {{k[len("module."):]: v for k, v in state.items()}}
    module.load_state_dict(state, strict=True)
    return types.SimpleNamespace(module=module.eval(), script=None, program=None)


def main() -> int:
    import torch

    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=SETTINGS["model"], help="the source model file")
    parser.add_argument("--out", default=str(here / ("reproduced_" + SETTINGS["filename"])),
                        help="where to write the new artifact")
    cli = parser.parse_args()
    opts = SETTINGS["opts"]
    device = opts.get("device", "cpu")
    data = np.load(here / "{inputs_file}")
    samples = [[data[f"s{{i}}_{{j}}"] for j in range(SETTINGS["inputs"])] for i in range(SETTINGS["samples"])]

    source = load_source(cli.model)
    source.module = source.module.to(device) if hasattr(source.module, "to") else source.module
    example = tuple(torch.from_numpy(a).to(device) for a in samples[SETTINGS["export_sample"]])
    {recipe}(source, example, cli.out, opts)
    print(f"converted {{cli.model}} -> {{cli.out}} by route {{SETTINGS['route']}}")

    artifact = load_artifact(SETTINGS["format"], cli.out, device)
    checks: dict[str, OutputCheck] = {{}}
    passed = True
    for i, sample in enumerate(samples):
        tensors = tuple(torch.from_numpy(a).to(device) for a in sample)
        with torch.inference_mode():
            reference = flatten(source.module(*tensors))
            if SETTINGS["format"] == "onnx":
                raw = artifact(*sample, names=opts["input_names"])
                actual = [(n, np.asarray(a)) for (n, _), a in zip(reference, raw)]
            else:
                actual = flatten(artifact(*tensors))
        if len(actual) != len(reference):
            print(f"sample {{i}}: the artifact returns {{len(actual)}} outputs, the source {{len(reference)}}")
            passed = False
            continue
        for (name, ref), (_, act) in zip(reference, actual):
            tol = SETTINGS["tolerances"].get(name, SETTINGS["tolerance"])
            check = checks.setdefault(name, OutputCheck(tol))
            abs_err, rel_err, failing = check.add(ref, act)
            shape = "x".join(map(str, ref.shape))
            line = f"sample {{i}} {{name}} [{{shape}}]: max abs err {{abs_err:.3g}}, max rel err {{rel_err:.3g}}"
            if check.mode == "elementwise":  # the statistic modes judge all samples together, below
                line += " ok" if not failing else f" FAIL ({{failing}} elements over atol and rtol)"
            print(line)
    for name, check in checks.items():
        ok, why = check.verdict()
        print(f"{{name}}: {{check.describe()}}: {{why}}: {{'ok' if ok else 'FAIL'}}")
        passed &= ok
    print("parity passed" if passed else "parity FAILED")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
'''



def write_for_artifact(
    handler: Any, result: Any, req: Any, spec: Any, model: Any, evidence: Any, store: Any, precision: str
) -> Path:
    """Write `reproduce_<format>.py` beside a freshly exported artifact (the job writes the samples once).

    The script holds each output to the tolerance the report held it to (mode, atol, rtol, q, per-output
    overrides included), so it passes exactly when the report's parity passes on the same numbers.
    """
    from portq.tasks.checks.tolerances import ResolvedTolerance, resolve
    from portq.tasks.core.toolchain import toolchain

    def plain(t: ResolvedTolerance) -> dict[str, Any]:
        return {"mode": t.mode.value, "atol": t.atol, "rtol": t.rtol, "q": t.q, "origin": t.origin}

    tolerances = {name: plain(resolve(spec.tolerance, precision, name)) for name in evidence.output_names}
    # the job's own tolerance, as parity.compare reports it: no per-output override leaks into it
    default = plain(resolve(spec.tolerance.model_copy(update={"outputs": {}}), precision, ""))
    route = handler.route(result.route)
    return write_script(
        result.path.parent, fmt=handler.format.value, filename=handler.filename, route=route.name,
        recipe=route.recipe.__name__, kind=model.kind, display=spec.source.name,
        model_path=store.url(spec.source.key), arch=spec.arch, arch_kwargs=spec.arch_kwargs, opts=req.opts(),
        tolerances=tolerances, default_tolerance=default, n_samples=len(evidence.samples),
        n_inputs=len(evidence.input_names), export_sample=evidence.export_index, toolchain=toolchain(),
    )
