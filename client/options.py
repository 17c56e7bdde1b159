"""The options every job-making command shares (`portq submit`, `portq fuse`): each flag declared once, as an
`Annotated` type the commands put in their signatures, and `JobFlags`, which turns their values into the
job's options (checked before anything is uploaded) and its load options.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from portq.tasks.core.contract import InputSpec, Precision, Target, ToleranceMode
from portq.tasks.core.errors import ConfigError
from pydantic import ValidationError

TargetOpt = Annotated[Target, typer.Option(help="Serving device: cpu routes to the `cpu` queue, cuda to `gpu`.")]
FormatsOpt = Annotated[list[str] | None, typer.Option(
    "--format", "-f", help="Artifact to produce: a format (onnx, torchscript, pt2, aoti) or a variant of one by its "
                           "id (onnx.opset17); repeat for several. [default: onnx]")]
BatchOpt = Annotated[str | None, typer.Option(help="Batch name (a fresh id otherwise).")]
WaitOpt = Annotated[bool, typer.Option("--wait", help="Follow the batch with a progress bar; exit 1 if a job failed.")]
TimeoutOpt = Annotated[float, typer.Option(help="With --wait: give up after this many seconds (exit 3).")]
InputsOpt = Annotated[list[str] | None, typer.Option(
    "--input", "-i", help="Input spec 'name:dtype[d0,d1]' (integers need a range: 'ids:int64[2,16]{0,30000}'); "
                          "repeat in forward-argument order. Default: a sidecar <stem>.npz, or a .pt2's own example "
                          "inputs.")]
DynamicOpt = Annotated[list[str] | None, typer.Option("--dynamic", help="Export this dim as dynamic, e.g. 'batch'; "
                                                                        "repeatable.")]
AtolOpt = Annotated[float | None, typer.Option(help="Parity: absolute tolerance. [default: 1e-4 for fp32]")]
RtolOpt = Annotated[float | None, typer.Option(help="Parity: relative tolerance. [default: 1e-3 for fp32]")]
ToleranceModeOpt = Annotated[ToleranceMode | None, typer.Option(
    help="Parity check: elementwise (an element fails when it exceeds atol and rtol), or the max, mean, median or "
         "quantile of the errors. [default: the precision's, see README]")]
QuantileOpt = Annotated[float | None, typer.Option(help="q for --tolerance-mode quantile. [default: 0.99]")]
TolerancePrecisionOpt = Annotated[Precision | None, typer.Option(
    help="Hold every artifact to this precision's default tolerances. [default: each artifact's own precision (an "
         "fp16 or int8 variant's), else inferred from the model's weights]")]
OptimizeOpt = Annotated[str | None, typer.Option(help="Also try optimization variants and pick the fastest that "
                                                      "passes parity: 'auto' (the candidates for the target), or "
                                                      "variant names, e.g. ort-all,int8-dynamic.")]
LossyPrecisionOpt = Annotated[str | None, typer.Option("--precision", help="Lossy precisions --optimize may use, "
                                                       "e.g. fp16,int8 (each judged against its precision's "
                                                       "tolerance). [default: none: lossless variants only]")]
CalibrationOpt = Annotated[list[Path] | None, typer.Option(help="Static int8 calibration samples: an .npz file or a "
                                                                "directory of them; repeatable. [default: the job's "
                                                                "own samples]")]
OutputTolOpt = Annotated[list[str] | None, typer.Option(
    "--output-tol", help="Per-output tolerance 'NAME:atol=1e-3,rtol=1e-2,mode=max' (NAME may be a pattern such as "
                         "'output.*'); repeatable.")]
LocaliseOpt = Annotated[bool, typer.Option("--localise/--no-localise", help="When parity fails, find the first "
                                                                            "operator that diverges.")]
OpsetOpt = Annotated[int | None, typer.Option(help="ONNX opset. [default: 18]")]
SeedOpt = Annotated[int, typer.Option(help="Seed for the random parity inputs.")]
RunsOpt = Annotated[int | None, typer.Option(help="Latency: timed runs at least, per model and artifact. "
                                                  "[default: 30]")]
WarmupOpt = Annotated[int | None, typer.Option(help="Latency: warm-up runs before timing. [default: 5]")]
BatchSizesOpt = Annotated[str | None, typer.Option(help="Latency: batch sizes to sweep when the batch dim is "
                                                        "dynamic, e.g. 1,8,32. [default: 1, the sample's, 8]")]
ArchOpt = Annotated[str | None, typer.Option(help="Model code for state dicts: package.module:Class.")]
ArchKwargsOpt = Annotated[str | None, typer.Option(help="JSON keyword arguments for --arch.")]
TrustPickleOpt = Annotated[bool, typer.Option("--trust-pickle", help="Allow full unpickling of torch.save files "
                                                                     "(runs code from the file).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Convert again even if an identical job is cached.")]


def parse_inputs(specs: list[str], step: str = "submit") -> list[InputSpec]:
    parsed = []
    for text in specs:
        try:
            parsed.append(InputSpec.parse(text))
        except ValueError as e:
            raise ConfigError(str(e), step=step) from None
    return parsed


def output_tolerances(specs: list[str], step: str = "submit") -> dict[str, dict[str, Any]]:
    """`--output-tol 'NAME:atol=1e-3,rtol=1e-2,mode=max'` (NAME may be an fnmatch pattern) -> overrides."""
    keys = {"atol": float, "rtol": float, "quantile": float, "mode": str}
    overrides: dict[str, dict[str, Any]] = {}
    for text in specs:
        name, sep, rest = text.partition(":")
        fields: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in rest.split(","))):
            key, eq, value = part.partition("=")
            key = key.strip()
            if not eq or key not in keys:
                raise ConfigError(f"--output-tol {text!r}: {part!r} is not KEY=VALUE with KEY one of "
                                  f"{', '.join(keys)}", step=step)
            try:
                fields[key] = keys[key](value.strip())
            except ValueError:
                raise ConfigError(f"--output-tol {text!r}: {key} needs a number, not {value!r}", step=step) from None
        if not sep or not name.strip() or not fields:
            raise ConfigError(f"--output-tol {text!r} is not of the form NAME:atol=..,rtol=..,mode=..,quantile=..",
                              step=step)
        overrides[name.strip()] = fields
    return overrides


def validation_problems(e: ValidationError) -> str:
    """pydantic's errors as one line of portq's: where, and what is wrong (no documentation URLs)."""
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'value'}: {err['msg']}" for err in e.errors())


def batch_sizes_list(text: str | None, step: str = "submit") -> list[int]:
    if not text:
        return []
    try:
        return [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise ConfigError(f"--batch-sizes {text!r} is not a comma-separated list of integers, e.g. 1,8,32",
                          step=step) from None


def json_object(text: str | None, flag: str, step: str = "submit") -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"{flag} is not valid JSON: {e}", step=step) from None
    if not isinstance(value, dict):
        raise ConfigError(f"{flag} must be a JSON object", step=step)
    return value


@dataclass
class JobFlags:
    """The shared flags' values, as one command received them."""

    target: Target = Target.cpu
    formats: list[str] | None = None
    inputs: list[str] | None = None
    dynamic: list[str] | None = None
    atol: float | None = None
    rtol: float | None = None
    tolerance_mode: ToleranceMode | None = None
    quantile: float | None = None
    tolerance_precision: Precision | None = None
    optimize: str | None = None  # --optimize: auto, or variant names
    precision: str | None = None  # --precision: the lossy precisions --optimize may use
    calibration: list[Path] | None = None
    output_tol: list[str] | None = None
    localise: bool = True
    opset: int | None = None
    seed: int = 0
    runs: int | None = None
    warmup: int | None = None
    batch_sizes: str | None = None
    arch: str | None = None
    arch_kwargs: str | None = None
    trust_pickle: bool = False

    def given(self) -> list[str]:
        """The flags set to anything but their defaults, as a user typed them (for refusals)."""
        spelled = {"localise": "--no-localise", "formats": "--format", "inputs": "--input"}
        return [spelled.get(name, f"--{name.replace('_', '-')}") for name, value in vars(self).items()
                if value != getattr(JobFlags, name)]

    def api_kwargs(self, step: str = "submit") -> dict[str, Any]:
        """The flags as `portq.client.api`'s keyword arguments (text flags parsed: --output-tol, --batch-sizes,
        --arch-kwargs)."""
        return dict(target=self.target, formats=self.formats or ["onnx"], inputs=self.inputs or [],
                    dynamic=self.dynamic or [], atol=self.atol, rtol=self.rtol, tolerance_mode=self.tolerance_mode,
                    quantile=self.quantile, tolerance_precision=self.tolerance_precision, optimize=self.optimize,
                    precision=self.precision, output_tol=output_tolerances(self.output_tol or [], step),
                    localise=self.localise, opset=self.opset, seed=self.seed, runs=self.runs, warmup=self.warmup,
                    batch_sizes=batch_sizes_list(self.batch_sizes, step), arch=self.arch,
                    arch_kwargs=json_object(self.arch_kwargs, "--arch-kwargs", step), trust_pickle=self.trust_pickle)

    def job_options(self, step: str = "submit") -> dict[str, Any]:
        """The JobOptions fields (the sample is added per job), checked as `portq.client.api` checks them."""
        from portq.client.api import job_options

        return job_options(**self.api_kwargs(step), step=step)[0]

    def calibration_files(self, step: str = "submit") -> list[Path]:
        from portq.client.api import calibration_files

        return calibration_files(self.calibration or [], step)

    def load_options(self, step: str = "submit") -> dict[str, Any]:
        """How model files are loaded: arch, arch_kwargs, trust_pickle."""
        return {"arch": self.arch, "arch_kwargs": json_object(self.arch_kwargs, "--arch-kwargs", step),
                "trust_pickle": self.trust_pickle}
