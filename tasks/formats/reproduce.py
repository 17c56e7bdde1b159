"""Reproduce scripts: beside each artifact, a small Python file that redoes its conversion and parity check by hand.

`<artifact id>/reproduce_<artifact id>.py` carries copies of the plain modules portq itself ran: how the
source is built (the job kind's source builder), the shared export recipes (`portq.tasks.formats.recipes`,
`unfuse`), its own format's recipe module and the modules its route and variant list (such as the TorchScript
rewrites or the ONNX optimizers; never another format's), how the artifact is opened and called
(`portq.tasks.checks.runtimes`) and how each output is judged (`portq.tasks.checks.output_check`). The
variant's config is recorded in its settings.
It reads the job's samples from `reproduce_inputs.npz` in the job's folder. It needs torch and numpy (and
onnxruntime for ONNX), not portq, so it can go into an upstream bug report.
"""

from __future__ import annotations

import inspect
import json
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from portq.tasks.checks.evidence import SourceEvidence
from portq.tasks.core.contract import JobSpec
from portq.tasks.state.store import Store

INPUTS_FILE = "reproduce_inputs.npz"
#: recipe options that name a data file the step wrote into the artifact's folder
_DATA_FILES = ("calibration", "samples")


def script_name(artifact_id: str) -> str:
    return f"reproduce_{artifact_id}.py"


def write_inputs(directory: Path, samples: list[list[np.ndarray]]) -> Path:
    """All parity samples, as s<sample>_<input> arrays: written once per job, into its result folder, and
    shared by every artifact's script (`portq.tasks.execution.run` writes it before the artifact steps)."""
    path = directory / INPUTS_FILE
    arrays = {f"s{i}_{j}": a for i, sample in enumerate(samples) for j, a in enumerate(sample)}
    np.savez(path, **arrays)  # type: ignore[arg-type]  # numpy's stubs type **kwds as bool
    return path


@cache
def module_source(module: ModuleType) -> str:
    """A module's source without its portq imports (whole statements, however they wrap), lines marked
    `portq-only` and its `from __future__` line (the script has its own). Read once per process: parsing the
    modules a script copies took 0.1 s of every artifact's step; the step forkserver reads them before it forks
    (`warm_sources`)."""
    import ast

    text = inspect.getsource(module)
    dropped: set[int] = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(n == "portq" or n.startswith("portq.") for n in names):
                dropped.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    lines = []
    for number, line in enumerate(text.splitlines(), start=1):
        if number in dropped or "portq-only" in line or line.startswith("from __future__"):
            continue
        lines.append(line)
    return "\n".join(lines).strip() + "\n"


def copied_modules(builder: Any, route: Any, recipe_modules: tuple[ModuleType, ...] = ()) -> list[ModuleType]:
    """The modules a reproduce script copies, in order, each once: the source builder's, the shared recipes, the
    route's (its own recipe module last), the variant's recipe modules and the runners'."""
    from portq.tasks.checks import output_check, runtimes
    from portq.tasks.formats import recipes, unfuse

    own = sys.modules[route.recipe.__module__]
    modules = [*builder.script_modules(), unfuse, *route.modules, recipes, own, *recipe_modules, runtimes,
               output_check]
    return list(dict.fromkeys(modules))


def warm_sources() -> None:
    """Read every module a reproduce script may copy (each job kind's builder, each format's routes and variants),
    so that processes forked after this find them read."""
    from portq.tasks.formats import FORMATS
    from portq.tasks.sources.builders import SOURCE_BUILDERS

    for _, builder in SOURCE_BUILDERS:
        for _, handler in FORMATS:
            for route in handler.routes:
                for _, variant in handler.variants:
                    for module in copied_modules(builder, route, variant.recipe_modules):
                        module_source(module)


def _section(module: ModuleType) -> str:
    title = f" copied from {module.__name__} "
    return f"# {title:-^110}\n{module_source(module)}"


def render(*, settings: dict[str, Any], recipe_doc: str, tolerances: dict[str, dict[str, Any]], display: str,
           toolchain: dict[str, str], modules: list[ModuleType]) -> str:
    """The text of one reproduce script. `settings` is everything main() reads (JSON-able)."""
    made_with = ", ".join(f"{k} {v}" for k, v in toolchain.items() if k != "portq")
    checks = "\n".join(f"    {_doc_safe(name)}: {_describe(t)}" for name, t in tolerances.items())
    return _TEMPLATE.format(
        artifact=settings["artifact"], display=_doc_safe(display), route=settings["route"], route_doc=recipe_doc,
        checks=checks or "    (no outputs)", made_with=made_with or "-", script=script_name(settings["artifact"]),
        settings=json.dumps(settings, indent=1, sort_keys=True), inputs_file=INPUTS_FILE, data_files=_DATA_FILES,
        modules="\n\n".join(_section(m) for m in modules),
    )


def _describe(tol: dict[str, Any]) -> str:
    stat = f"quantile q={tol['q']:g}" if tol["mode"] == "quantile" else tol["mode"]
    text = f"{stat} atol {tol['atol']:g} / rtol {tol['rtol']:g}"
    return text + (f" ({_doc_safe(tol['origin'])})" if tol.get("origin") else "")


def _doc_safe(text: str) -> str:
    # shown inside the script's docstring: no backslashes or quotes that could end it
    return text.replace("\\", "/").replace('"', "'")


_TEMPLATE = '''#!/usr/bin/env python3
"""Redo portq's {artifact} artifact of {display} by hand, then its parity check.

portq converted it by the route `{route}`: {route_doc}
This script builds the source the way portq did, runs that same recipe (copied below) on the same
example inputs, runs the new artifact on every sample portq checked ({inputs_file}, in the job's
folder), and compares it with the source model by the check portq's report applied to each output
(`OutputCheck` below says how each mode judges):
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SETTINGS = json.loads(r"""{settings}""")


{modules}

# ------------------------------------------------------------------------------------------- the check

def main() -> int:
    import torch

    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="the source model file (default: where portq stored it)")
    parser.add_argument("--out", default=str(here / ("reproduced_" + SETTINGS["filename"])),
                        help="where to write the new artifact")
    cli = parser.parse_args()
    opts = SETTINGS["opts"]
    device = opts.get("device", "cpu")
    inputs = here / "{inputs_file}"
    data = np.load(inputs if inputs.exists() else here.parent / "{inputs_file}")
    samples = [[data[f"s{{i}}_{{j}}"] for j in range(SETTINGS["inputs"])] for i in range(SETTINGS["samples"])]

    source = build_source(SETTINGS["source"], cli.model)
    source.module = source.module.to(device) if hasattr(source.module, "to") else source.module
    source_runtime = TorchRuntime(source.module, device, move=False)
    # the source's outputs first: an exporter may leave the module changed (the TorchScript-based one leaves a
    # ScriptModule that no longer runs under inference_mode)
    references = [call(source_runtime, sample) for sample in samples]
    example = to_tensors(samples[SETTINGS["export_sample"]], device)
    if SETTINGS["transform"]:  # an optimization: export the base artifact, then run the optimization recipe
        out = Path(cli.out)
        base = str(out.with_name(out.stem + ".base" + out.suffix))
        notes = globals()[SETTINGS["recipe"]](source, example, base, opts)
        topts = {{k: (str(here / v) if k in {data_files!r} else v) for k, v in SETTINGS["transform_opts"].items()}}
        facts = globals()[SETTINGS["transform"]](base, cli.out, topts)
        print(f"converted the source by route {{SETTINGS['route']}}, then {{SETTINGS['transform']}} -> {{cli.out}}")
        print("optimizer facts: " + json.dumps({{k: facts[k] for k in sorted(facts) if k != "load_with"}},
                                              default=str)[:600])
    else:
        notes = globals()[SETTINGS["recipe"]](source, example, cli.out, opts)
        print(f"converted the source -> {{cli.out}} by route {{SETTINGS['route']}}")
    for note in notes or []:
        print(f"  {{note}}")

    artifact = globals()[SETTINGS["opener"]](cli.out, device, SETTINGS["options"])
    checks: dict[str, OutputCheck] = {{}}
    passed = True
    for i, sample in enumerate(samples):
        reference = references[i]
        actual = call(artifact, sample)
        if len(actual) != len(reference):
            print(f"sample {{i}}: the artifact returns {{len(actual)}} outputs, the source {{len(reference)}}")
            passed = False
            continue
        for (name, ref), (_, act) in zip(reference, actual):
            tol = SETTINGS["tolerances"].get(name, SETTINGS["tolerance"])
            check = checks.setdefault(name, OutputCheck(tol))
            errors = check.add(ref, act, i)
            shape = "x".join(map(str, ref.shape))
            if errors is None:
                print(f"sample {{i}} {{name}} [{{shape}}]: shape {{list(act.shape)}} differs")
                continue
            abs_err = float(errors.abs_err.max()) if errors.abs_err.size else 0.0
            rel = errors.rel_err[errors.finite & (ref.astype(np.float64) != 0)]
            line = (f"sample {{i}} {{name}} [{{shape}}]: max abs err {{abs_err:.3g}}, max rel err "
                    f"{{float(rel.max()) if rel.size else 0.0:.3g}}")
            if check.mode == "elementwise":  # the statistic modes judge all samples together, below
                failing = int(errors.failing.sum())
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


@dataclass(frozen=True)
class ScriptInputs:
    """What a reproduce script is written from, besides the export: the job, the artifact and its variant, its
    resolved options, the source's evidence and the built source."""

    spec: JobSpec
    artifact_id: str
    variant: Any  # portq.tasks.formats.base.Variant
    options: dict[str, Any]
    evidence: SourceEvidence
    source: Any  # the LoadedModel
    store: Store

    @property
    def display(self) -> str:
        return self.spec.display


def write_for_artifact(ctx: ScriptInputs, handler: Any, result: Any, req: Any, precision: str,
                       transform: tuple[Any, dict[str, Any]] | None = None) -> Path:
    """Write `reproduce_<artifact id>.py` beside a freshly exported artifact (the job writes the samples once).

    The script holds each output to the tolerance the report held it to (mode, atol, rtol, q, per-output
    overrides included), so it passes exactly when the report's parity passes on the same numbers.
    """
    from portq.tasks.checks.tolerances import ResolvedTolerance, resolve
    from portq.tasks.core.toolchain import toolchain
    from portq.tasks.formats.base import config_record
    from portq.tasks.sources.builders import builder_for

    def plain(t: ResolvedTolerance) -> dict[str, Any]:
        return {"mode": t.mode.value, "atol": t.atol, "rtol": t.rtol, "q": t.q, "origin": t.origin}

    tolerance = ctx.spec.options.tolerance
    ev = ctx.evidence
    tolerances = {name: plain(resolve(tolerance, precision, name)) for name in ev.output_names}
    # the job's own tolerance, as parity.compare reports it: no per-output override leaks into it
    default = plain(resolve(tolerance.model_copy(update={"outputs": {}}), precision, ""))
    route = handler.route(result.route)
    builder = builder_for(ctx.spec.kind.value)
    assert ctx.source is not None
    settings = {
        "artifact": ctx.artifact_id, "format": handler.format.value, "variant": ctx.variant.name,
        "config": config_record(ctx.variant.config),
        "route": route.name, "recipe": route.recipe.__name__, "opener": handler.opener.__name__,
        "filename": handler.filename, "source": builder.script_settings(ctx.spec, ctx.source, ctx.store),
        "opts": req.opts(), "options": ctx.options, "tolerances": tolerances, "tolerance": default,
        "samples": len(ev.samples), "inputs": len(ev.input_names), "export_sample": ev.export_index,
        "transform": None, "transform_opts": {},
    }
    if transform is not None:  # an optimization: the base export, then the recipe (its data files beside)
        fn, opts = transform
        settings["transform"] = fn.__name__
        settings["transform_opts"] = {k: (Path(v).name if k in _DATA_FILES else v) for k, v in opts.items()}
    modules = copied_modules(builder, route, ctx.variant.recipe_modules)
    doc = (inspect.getdoc(route.recipe) or "").splitlines()[0]
    path = result.path.parent / script_name(ctx.artifact_id)
    path.write_text(render(settings=settings, recipe_doc=doc, tolerances=tolerances, display=ctx.display,
                           toolchain=toolchain(), modules=modules))
    return path
