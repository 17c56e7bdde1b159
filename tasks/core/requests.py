"""The request models: every option of a job-making request (convert, optimize, fuse) defined once, with its type,
default, help text and validation. The `portq` commands build their options from these fields
(`portq.client.options`), `portq.submit/optimize/fuse` take them as keyword arguments, and a nightly manifest's
`defaults` and groups take their defaults and descriptions from them.

A field's `Flag` (in its `Annotated` metadata, which pydantic keeps and ignores) says how the command line spells
it when that is not `--field-name`, what text the command line reads when it is not the field's type (e.g.
`--batch-sizes 1,8,32` for a list of ints) and how that text becomes the value, with a message naming the flag.
This module is torch-free and imports neither Typer nor Rich: the client and the manifest both read it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from portq.tasks.core.contract import InputSpec, Precision, Target, ToleranceMode
from portq.tasks.core.errors import ConfigError, validation_problems
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

R = TypeVar("R", bound="Options")

#: what `--target` also accepts, for the word users reach for first
TARGET_ALIASES = {"gpu": Target.cuda.value}


class TargetName(str, Enum):
    """The words `--target` accepts: the targets, and their aliases."""

    cpu = "cpu"
    cuda = "cuda"
    gpu = "gpu"


@dataclass(frozen=True)
class Flag:
    """How the command line spells a request field (see the module's docstring)."""

    decls: tuple[str, ...] = ()  # e.g. ("--format", "-f"); none: --field-name
    text: Any = None  # the type the command line reads, when it differs from the field's
    parse: Callable[[Any, str], Any] | None = None  # (text, step) -> the field's value; raises ConfigError
    shown_default: str | None = None  # what help shows as the default when the field's own is None or empty
    argument: bool = False  # a positional argument, not an option

    def spelled(self, name: str, value: Any = None) -> str:
        """The flag as a user types it (`--no-localise` for a switch turned off)."""
        if self.decls:
            first = self.decls[0]
            if "/" in first:
                on, off = first.split("/")
                return off if value is False else on
            return first
        return f"--{name.replace('_', '-')}"


def flag(*decls: str, **kwargs: Any) -> Flag:
    return Flag(decls=decls, **kwargs)


# ------------------------------------------------------------------------------ text the command line reads


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


def _number_list(kind: type, flag_name: str, example: str, noun: str) -> Callable[[str | None, str], list[Any]]:
    def parse(text: str | None, step: str = "submit") -> list[Any]:
        if not text:
            return []
        try:
            return [kind(b) for b in text.split(",") if b.strip()]
        except ValueError:
            raise ConfigError(f"{flag_name} {text!r} is not a comma-separated list of {noun}, e.g. {example}",
                              step=step) from None
    return parse


batch_sizes_list = _number_list(int, "--batch-sizes", "1,8,32", "integers")
weights_list = _number_list(float, "--weights", "0.7,0.3", "numbers")


def _json_object(flag_name: str) -> Callable[[str | None, str], dict[str, Any]]:
    def parse(text: str | None, step: str = "submit") -> dict[str, Any]:
        if not text:
            return {}
        try:
            value = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"{flag_name} is not valid JSON: {e}", step=step) from None
        if not isinstance(value, dict):
            raise ConfigError(f"{flag_name} must be a JSON object", step=step)
        return value
    return parse


json_object = _json_object("--arch-kwargs")


# ---------------------------------------------------------------------------------------------- the options


TargetField = Annotated[Target, Field(description="Serving device: cpu routes to the `cpu` queue, cuda (alias: "
                                                  "gpu) to `gpu`."), flag(text=TargetName)]
InputsField = Annotated[list[str | InputSpec], Field(
    description="Input spec 'name:dtype[d0,d1]' (integers need a range: 'ids:int64[2,16]{0,30000}'); repeat in "
                "forward-argument order. Default: a sidecar <stem>.npz, or a .pt2's own example inputs (optimize: a "
                "portq artifact's own, else the graph's)."), flag("--input", "-i", text=list[str] | None)]
OptimizeField = Annotated[str | list[str] | None, Field(
    description="Also try optimization variants and pick the fastest that passes parity: 'auto' (the candidates "
                "for the target), or variant names, e.g. ort-all,int8-dynamic."), flag(text=str | None)]
PrecisionField = Annotated[str | list[str] | None, Field(
    description="Lossy precisions --optimize may use, e.g. fp16,int8 (each judged against its precision's "
                "tolerance)."), flag(text=str | None, shown_default="none: lossless variants only")]
CalibrationField = Annotated[list[Path], Field(description="Static int8 calibration samples: an .npz file or a "
                                                           "directory of them; repeatable."),
                             flag(text=list[Path] | None, shown_default="the job's own samples")]


class Options(BaseModel):
    """A command's options as one validated model: `build` from keyword arguments, `given` as typed."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    @classmethod
    def build(cls: type[R], request: R | None = None, step: str = "submit", **options: Any) -> R:
        """The request from keyword arguments (laid over `request` if given), or a ConfigError naming each bad
        option."""
        try:
            if request is not None:
                return cls.model_validate({**request.model_dump(exclude_unset=True), **options})
            return cls(**options)
        except ValidationError as e:
            raise ConfigError(validation_problems(e), step=step) from None

    def given(self, skip: tuple[str, ...] = ()) -> list[str]:
        """The options set, as a user types them (for refusals), but those in `skip`."""
        return [flag_of(type(self), name).spelled(name, getattr(self, name)) for name in type(self).model_fields
                if name in self.model_fields_set and name not in skip]


class Request(Options):
    """What every request shares: where its jobs go and how the caller follows them."""

    target: TargetField = Target.cpu
    batch: Annotated[str | None, Field(description="Batch name (a fresh id otherwise).")] = None
    wait: Annotated[bool, Field(description="Follow the batch with a progress bar; exit 1 if a job failed (the "
                                            "Python API waits by default)."), flag("--wait")] = False
    timeout: Annotated[float, Field(ge=0, description="With --wait: give up after this many seconds (exit 3); 0: "
                                                      "no limit.")] = 0
    force: Annotated[bool, Field(description="Convert again even if an identical job is cached."),
                     flag("--force")] = False

    @field_validator("target", mode="before")
    @classmethod
    def _target_alias(cls, v: Any) -> Any:
        v = getattr(v, "value", v)
        return TARGET_ALIASES.get(v, v) if isinstance(v, str) else v

class OptimizeRequest(Request):
    """`portq optimize` / `portq.optimize`: optimization variants of existing ONNX files."""

    optimize: OptimizeField = "auto"
    precision: PrecisionField = None
    calibration: CalibrationField = []
    inputs: InputsField = []


class JobRequest(Request):
    """The options of every command that converts a model (convert, fuse)."""

    formats: Annotated[list[str], Field(
        description="Artifact to produce: a format (onnx, torchscript, pt2, aoti) or a variant of one by its id "
                    "(onnx.opset17); repeat for several."), flag("--format", "-f", text=list[str] | None)] = ["onnx"]
    inputs: InputsField = []
    dynamic: Annotated[list[str], Field(description="Export this dim as dynamic, e.g. 'batch'; repeatable."),
                       flag("--dynamic", text=list[str] | None)] = []
    atol: Annotated[float | None, Field(description="Parity: absolute tolerance."),
                    flag(shown_default="1e-4 for fp32")] = None
    rtol: Annotated[float | None, Field(description="Parity: relative tolerance."),
                    flag(shown_default="1e-3 for fp32")] = None
    tolerance_mode: Annotated[ToleranceMode | None, Field(
        description="Parity check: elementwise (an element fails when it exceeds atol and rtol), or the max, mean, "
                    "median or quantile of the errors."), flag(shown_default="the precision's")] = None
    quantile: Annotated[float | None, Field(description="q for --tolerance-mode quantile."),
                        flag(shown_default="0.99")] = None
    tolerance_precision: Annotated[Precision | None, Field(
        description="Hold every artifact to this precision's default tolerances."),
        flag(shown_default="each artifact's own precision, else inferred from the model's weights")] = None
    optimize: OptimizeField = None
    precision: PrecisionField = None
    output_tol: Annotated[dict[str, dict[str, Any]], Field(
        description="Per-output tolerance 'NAME:atol=1e-3,rtol=1e-2,mode=max' (NAME may be a pattern such as "
                    "'output.*'); repeatable."), flag("--output-tol", text=list[str] | None,
                                                      parse=output_tolerances)] = {}
    localise: Annotated[bool, Field(description="When parity fails, find the first operator that diverges."),
                        flag("--localise/--no-localise")] = True
    opset: Annotated[int | None, Field(description="ONNX opset."), flag(shown_default="18")] = None
    seed: Annotated[int, Field(description="Seed for the random parity inputs.")] = 0
    runs: Annotated[int | None, Field(description="Latency: timed runs at least, per model and artifact."),
                    flag(shown_default="30")] = None
    warmup: Annotated[int | None, Field(description="Latency: warm-up runs before timing."),
                      flag(shown_default="5")] = None
    batch_sizes: Annotated[list[int], Field(description="Latency: batch sizes to sweep when the batch dim is "
                                                        "dynamic, e.g. 1,8,32."),
                           flag(text=str | None, parse=batch_sizes_list, shown_default="1, the sample's, 8")] = []
    arch: Annotated[str | None, Field(description="Model code for state dicts: package.module:Class.")] = None
    arch_kwargs: Annotated[dict[str, Any], Field(description="JSON keyword arguments for --arch."),
                           flag(text=str | None, parse=json_object)] = {}
    trust_pickle: Annotated[bool, Field(description="Allow full unpickling of torch.save files (runs code from "
                                                    "the file)."), flag("--trust-pickle")] = False

    @field_validator("formats", mode="before")
    @classmethod
    def _format_values(cls, v: Any) -> Any:
        return [getattr(f, "value", f) for f in v] or ["onnx"] if isinstance(v, (list, tuple)) else v


class ConvertRequest(JobRequest):
    """`portq submit` / `portq.submit`: one job per model file or Hugging Face model folder."""

    calibration: CalibrationField = []
    task: Annotated[str | None, Field(
        description="Hugging Face folders: what to load the model for (feature-extraction, text-classification, "
                    "token-classification, fill-mask, question-answering, image-classification)."),
        flag(shown_default="the task of config.json's architectures")] = None
    trust_remote_code: Annotated[bool, Field(description="Hugging Face folders: allow model code shipped with the "
                                                         "folder (config.json auto_map; runs it)."),
                                 flag("--trust-remote-code")] = False
    sequence_length: Annotated[int, Field(ge=1, le=1_000_000, description="Hugging Face folders: the example "
                                          "inputs' sequence length (a dynamic dim).")] = 16
    batch_size: Annotated[int, Field(ge=1, le=4096, description="Hugging Face folders: the example inputs' batch "
                                     "size (a dynamic dim).")] = 2


#: ConvertRequest's fields that only a Hugging Face folder's source description takes
HF_LOAD_FIELDS = ("task", "trust_remote_code", "sequence_length", "batch_size")


class FuseRequest(JobRequest):
    """`portq fuse` / `portq.fuse`: one job that fuses several models into one, then converts it like any model.
    The method and its parameters are checked against `portq.tasks.fusion.methods.FUSION_METHODS`."""

    method: Annotated[str, Field(description="How to fuse: breadcrumbs, chain, concat, ensemble, greedy-soup, "
                                             "slerp, soup, stack, task-arithmetic, ties, vote."), flag("--method")]
    weights: Annotated[list[float] | None, Field(
        description="One weight per model, comma-separated, e.g. 0.7,0.3 (ensemble, vote, soup: normalised; "
                    "task-arithmetic, ties: as given)."), flag(text=str | None, parse=weights_list,
                                                               shown_default="equal")] = None
    t: Annotated[float | None, Field(description="slerp: 0 gives the first model, 1 the second."),
                 flag("--t", shown_default="0.5")] = None
    base: Annotated[str | None, Field(description="task-arithmetic, ties: the model the others were fine-tuned "
                                                  "from.")] = None
    density: Annotated[float | None, Field(description="ties: the share of each task vector kept, in (0, 1]."),
                       flag(shown_default="0.2")] = None
    scale: Annotated[float | None, Field(description="task-arithmetic, ties: the merged task vector's scale "
                                                     "(lambda)."), flag(shown_default="1.0")] = None
    tie_break: Annotated[Literal["probability", "lowest-index"] | None, Field(
        description="vote: who wins a tied vote: probability or lowest-index."),
        flag(shown_default="probability")] = None
    dim: Annotated[int | None, Field(description="stack: the new dim, 1 (N, models, ...) or 0."),
                   flag(shown_default="1")] = None
    strict: Annotated[bool, Field(description="greedy-soup: keep a model only if the soup improves (not if it "
                                              "stays equal)."), flag("--strict")] = False
    eval_data: Annotated[str | None, Field(description="An .npz of inputs and `labels` to score the models and the "
                                                       "fused one (greedy-soup needs it)."), flag("--eval-data")] = None
    metric: Annotated[Literal["accuracy", "loss"] | None, Field(
        description="Score on --eval-data: accuracy, or the loss (cross-entropy for class labels, else MSE)."),
        flag(shown_default="accuracy for class labels")] = None
    calibration: Annotated[str | None, Field(description="Weight-space methods: an .npz of inputs to recompute "
                                                         "BatchNorm statistics on (else they are merged like the "
                                                         "weights).")] = None  # type: ignore[assignment]
    finetune: Annotated[str | None, Field(description="Fine-tune the fused model on this .npz of inputs and "
                                                      "`labels` (Adam, on the target device)."),
                        flag("--finetune")] = None
    epochs: Annotated[int | None, Field(description="Fine-tune epochs."), flag(shown_default="5")] = None
    lr: Annotated[float | None, Field(description="Fine-tune learning rate."), flag(shown_default="1e-3")] = None
    finetune_batch: Annotated[int | None, Field(description="Fine-tune examples per step."),
                              flag(shown_default="64")] = None
    name: Annotated[str | None, Field(description="The fused model's name in reports."),
                    flag(shown_default="METHOD-MODEL-MODEL...")] = None

    def fusion_params(self) -> dict[str, Any]:
        """The method's parameters as given (for `validate_request`)."""
        given = {"weights": self.weights, "t": self.t, "density": self.density, "scale": self.scale,
                 "dim": self.dim, "tie_break": self.tie_break, "metric": self.metric, "strict": self.strict or None}
        return {k: v for k, v in given.items() if v is not None}

    def finetune_options(self) -> dict[str, Any] | None:
        """The fine-tune's options, or None; a fine-tune option without --finetune is refused."""
        given = [f for f, v in (("--epochs", self.epochs), ("--lr", self.lr), ("--finetune-batch",
                                                                               self.finetune_batch)) if v is not None]
        if self.finetune is None:
            if given:
                raise ConfigError(f"{', '.join(given)} set up a fine-tune: give its data with --finetune DATA.npz "
                                  "(an .npz of inputs and labels)", step="fuse")
            return None
        values = {"epochs": self.epochs, "lr": self.lr, "batch_size": self.finetune_batch}
        return {"data": self.finetune, "seed": self.seed, **{k: v for k, v in values.items() if v is not None}}


class PackageRequest(Options):
    """`portq package` / `portq.package`: a batch's servable artifacts as a Triton model repository."""

    triton: Annotated[Path, Field(description="The Triton model repository to write: created, or an existing one "
                                              "the models are added to (a model folder of the same name is "
                                              "refused)."), flag("--triton")]
    artifact: Annotated[str | None, Field(description="Package this artifact of every job (an id such as onnx or "
                                                      "onnx.ort-all) instead of its best pick."),
                        flag("--artifact", shown_default="each job's best")] = None
    max_batch_size: Annotated[int | None, Field(ge=1, description="max_batch_size of models whose batch dim is "
                                                                  "dynamic."),
                              flag(shown_default="the largest batch the job checked the artifact at")] = None


def flag_of(model: type[BaseModel], name: str) -> Flag:
    """A field's Flag (a plain one when the field declares none)."""
    return next((m for m in model.model_fields[name].metadata if isinstance(m, Flag)), Flag())


def description(model: type[BaseModel], name: str) -> str:
    return model.model_fields[name].description or ""
