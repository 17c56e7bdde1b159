"""`portq fuse A B [C ...] --method M`: one job that fuses several models into one, then converts, checks
and times it like any model, on the queue or here.

The request is checked before anything is uploaded or runs (the method and its parameters against
`FUSION_METHODS`, the data files' arrays, every file's size): each refusal says exactly what is wrong and
exits 2. What needs the models loaded (architectures, output shapes, labels against outputs) is checked
when the job starts, before any conversion, and fails the job at step `fuse`.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from portq.client.cli import BrokerOpt, StoreOpt, app, resolve
from portq.client.options import (
    ArchKwargsOpt,
    ArchOpt,
    AtolOpt,
    BatchOpt,
    BatchSizesOpt,
    DynamicOpt,
    ForceOpt,
    FormatsOpt,
    InputsOpt,
    JobFlags,
    LocaliseOpt,
    LossyPrecisionOpt,
    OpsetOpt,
    OptimizeOpt,
    OutputTolOpt,
    QuantileOpt,
    RtolOpt,
    RunsOpt,
    SeedOpt,
    TargetOpt,
    TimeoutOpt,
    ToleranceModeOpt,
    TolerancePrecisionOpt,
    TrustPickleOpt,
    WaitOpt,
    WarmupOpt,
    validation_problems,
)
from portq.client.submit import send
from portq.tasks.core.contract import Target
from portq.tasks.core.errors import ConfigError
from portq.tasks.fusion.data import read_data
from portq.tasks.fusion.methods import FUSION_METHODS, FusionMethod, validate_request
from portq.tasks.state.store import Store
from portq.tasks.state.submission import FusionRequest, prepare_fusion
from pydantic import ValidationError

STEP = "fuse"


class Metric(str, Enum):
    accuracy = "accuracy"
    loss = "loss"


class TieBreak(str, Enum):
    probability = "probability"
    lowest_index = "lowest-index"


def _weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise ConfigError(f"--weights {text!r} is not a comma-separated list of numbers, e.g. 0.7,0.3",
                          step=STEP) from None


def exact_output_tolerance(method: FusionMethod, options: dict[str, Any], user_overrides: bool) -> None:
    """A method returning class indices (vote) is held to exact equality: an index off by one is a different
    class, however small the relative error (unless the user set per-output tolerances)."""
    if method.exact_outputs and not user_overrides:
        tolerance = options.setdefault("tolerance", {})
        tolerance.setdefault("outputs", {})["*"] = {"mode": "elementwise", "atol": 0.0, "rtol": 0.0}


def _finetune(data: str | None, epochs: int | None, lr: float | None, batch: int | None,
              seed: int) -> dict[str, Any] | None:
    given = [flag for flag, value in (("--epochs", epochs), ("--lr", lr), ("--finetune-batch", batch))
             if value is not None]
    if data is None:
        if given:
            raise ConfigError(f"{', '.join(given)} set up a fine-tune: give its data with --finetune DATA.npz (an "
                              ".npz of inputs and labels)", step=STEP)
        return None
    values = {"epochs": epochs, "lr": lr, "batch_size": batch}
    return {"data": data, "seed": seed, **{k: v for k, v in values.items() if v is not None}}


@app.command()
def fuse(
    models: Annotated[list[str], typer.Argument(help="The models to fuse (two or more; for task-arithmetic and "
                                                     "ties, the fine-tuned models, with --base).")],
    method: Annotated[str, typer.Option("--method", "-m", help="How to fuse: " + ", ".join(
        f"{name} ({m.summary})" for name, m in FUSION_METHODS) + ".")],
    weights: Annotated[str | None, typer.Option(help="One weight per model, comma-separated, e.g. 0.7,0.3 "
                                                     "(ensemble, vote, soup: normalised; task-arithmetic, ties: "
                                                     "as given). [default: equal]")] = None,
    t: Annotated[float | None, typer.Option("--t", help="slerp: 0 gives the first model, 1 the second. "
                                                        "[default: 0.5]")] = None,
    base: Annotated[str | None, typer.Option(help="task-arithmetic, ties: the model the others were "
                                                  "fine-tuned from.")] = None,
    density: Annotated[float | None, typer.Option(help="ties: the share of each task vector kept, in (0, 1]. "
                                                       "[default: 0.2]")] = None,
    scale: Annotated[float | None, typer.Option(help="task-arithmetic, ties: the merged task vector's scale "
                                                     "(lambda). [default: 1.0]")] = None,
    tie_break: Annotated[TieBreak | None, typer.Option(help="vote: who wins a tied vote. [default: "
                                                            "probability]")] = None,
    dim: Annotated[int | None, typer.Option(help="stack: the new dim, 1 (N, models, ...) or 0. "
                                                 "[default: 1]")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="greedy-soup: keep a model only if the soup improves "
                                                          "(not if it stays equal).")] = False,
    eval_data: Annotated[str | None, typer.Option("--eval-data", help="An .npz of inputs and `labels` to score "
                                                                      "the models and the fused one (greedy-soup "
                                                                      "needs it).")] = None,
    metric: Annotated[Metric | None, typer.Option(help="Score on --eval-data: accuracy, or the loss "
                                                       "(cross-entropy for class labels, else MSE). [default: "
                                                       "accuracy for class labels]")] = None,
    calibration: Annotated[str | None, typer.Option(help="Weight-space methods: an .npz of inputs to recompute "
                                                         "BatchNorm statistics on (else they are merged like "
                                                         "the weights).")] = None,
    finetune: Annotated[str | None, typer.Option("--finetune", help="Fine-tune the fused model on this .npz of "
                                                                    "inputs and `labels` (Adam, on the target "
                                                                    "device).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Fine-tune epochs. [default: 5]")] = None,
    lr: Annotated[float | None, typer.Option(help="Fine-tune learning rate. [default: 1e-3]")] = None,
    finetune_batch: Annotated[int | None, typer.Option(help="Fine-tune examples per step. [default: 64]")] = None,
    name: Annotated[str | None, typer.Option(help="The fused model's name in reports. [default: "
                                                  "METHOD-MODEL-MODEL...]")] = None,
    target: TargetOpt = Target.cpu,
    formats: FormatsOpt = None,
    batch: BatchOpt = None,
    wait: WaitOpt = False,
    timeout: TimeoutOpt = 0,
    inputs: InputsOpt = None,
    dynamic: DynamicOpt = None,
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    tolerance_mode: ToleranceModeOpt = None,
    quantile: QuantileOpt = None,
    tolerance_precision: TolerancePrecisionOpt = None,
    optimize: OptimizeOpt = None,
    precision: LossyPrecisionOpt = None,
    output_tol: OutputTolOpt = None,
    localise: LocaliseOpt = True,
    opset: OpsetOpt = None,
    seed: SeedOpt = 0,
    runs: RunsOpt = None,
    warmup: WarmupOpt = None,
    batch_sizes: BatchSizesOpt = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    force: ForceOpt = False,
    broker: BrokerOpt = None,
    store: StoreOpt = None,
) -> None:
    """Fuse models into one (an ensemble, a chain, a merge of their weights), optionally fine-tune it, then
    convert and check it like any model: one job, on the queue or here."""
    given = {"weights": _weights(weights), "t": t, "density": density, "scale": scale, "dim": dim,
             "tie_break": tie_break.value if tie_break else None, "metric": metric.value if metric else None,
             "strict": strict or None}
    params = {k: v for k, v in given.items() if v is not None}
    tune = _finetune(finetune, epochs, lr, finetune_batch, seed)
    fusion, applied = validate_request(method, len(models), params, base=base is not None,
                                       eval_data=eval_data is not None, calibration=calibration is not None,
                                       finetune=tune is not None)
    for path, flag, labels in ((eval_data, "--eval-data", True), (calibration, "--calibration", False),
                               (finetune, "--finetune", True)):
        if path is not None and Path(path).is_file():  # a missing file is refused with the others, below
            read_data(Path(path), path, flag, labels, ConfigError, STEP)
    settings = resolve(broker, store)
    flags = JobFlags(target=target, formats=formats, inputs=inputs, dynamic=dynamic, atol=atol, rtol=rtol,
                     tolerance_mode=tolerance_mode, quantile=quantile, tolerance_precision=tolerance_precision,
                     optimize=optimize, precision=precision, output_tol=output_tol, localise=localise, opset=opset,
                     seed=seed, runs=runs, warmup=warmup, batch_sizes=batch_sizes, arch=arch, arch_kwargs=arch_kwargs,
                     trust_pickle=trust_pickle)
    options, load = flags.job_options(STEP), flags.load_options(STEP)
    exact_output_tolerance(fusion, options, bool(output_tol))
    request = FusionRequest(members=models, method=fusion.name, params=applied, base=base, eval_data=eval_data,
                            calibration=calibration, finetune=tune, name=name)
    st = Store(settings.store)
    try:
        sub = prepare_fusion(request, st, batch=batch, options=options, load=load, force=force,
                             max_bytes=settings.max_model_bytes, max_sample_bytes=settings.max_sample_bytes)
    except ValidationError as e:  # pydantic validation of the options
        raise ConfigError(validation_problems(e), step=STEP) from None
    send(sub, st, settings, wait=wait, timeout=timeout)
