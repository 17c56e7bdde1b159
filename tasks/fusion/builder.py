"""The `fuse` job kind's source builder: the members loaded, checked and fused into the job's source model.

The job's process, each isolated step's process and the reproduce scripts build the fused model through
the same plain code (`portq.tasks.fusion.recipe`), so all three hold the same model: the method is
deterministic, and so is the fine-tune for a seed. Here the members are loaded by portq's loaders (with
portq's errors); the request is checked again (`methods.validate_request`), then everything that needs the
models loaded, before any conversion: mismatched architectures, outputs that do not combine, labels that do
not fit. Each such refusal fails the job at step `fuse`, naming the files.
"""

from __future__ import annotations

from typing import Any

from portq.tasks.core.contract import FinetuneReport, FuseMember, FuseSource, JobKind, JobSpec, SourceRef
from portq.tasks.core.errors import ConfigError, InputError
from portq.tasks.fusion.data import read_data
from portq.tasks.fusion.fused import Data, FusedModel, Member
from portq.tasks.fusion.methods import validate_request
from portq.tasks.sources.builders import SOURCE_BUILDERS, SourceBuilder
from portq.tasks.sources.loading import LoadedModel, LoadRequest, load_model
from portq.tasks.state.store import Store

STEP = "fuse"
#: eval rows the labels are checked on when the job starts (the report scores every row)
LABEL_CHECK_ROWS = 16

__all__ = ["Data", "FusedModel", "Member", "build_fused", "script_settings", "trace_example"]


def _files(source: FuseSource) -> str:
    return ", ".join(m.name for m in source.all_members())


def _load_member(member: FuseMember, store: Store, role: str) -> Member:
    with store.local_file(member.model.key) as path:
        loaded = load_model(LoadRequest(path=path, display=member.name, arch=member.arch,
                                        arch_kwargs=member.arch_kwargs, trust_pickle=member.trust_pickle))
    return Member(spec=member, loaded=loaded, role=role)


def _data(store: Store, ref: SourceRef | None, flag: str, need_labels: bool) -> Data | None:
    if ref is None:
        return None
    with store.local_file(ref.key) as path:
        inputs, labels = read_data(path, ref.name, flag, need_labels, InputError, STEP)
    return Data(ref=ref, inputs=inputs, labels=labels)


def _signature(spec: JobSpec, store: Store, first: LoadedModel) -> Any:
    """The job's inputs as the job will see them: the sidecar sample or --input specs, else what the first
    member carries (a .pt2's example inputs)."""
    from portq.tasks.sources.inputs import apply_dynamic, load_npz, resolve_signature

    npz = None
    if spec.options.sample is not None:
        with store.local_file(spec.options.sample.key) as path:
            npz = load_npz(path, spec.options.sample.name)
    sig = resolve_signature(spec.options.inputs, npz, first.example_inputs, first.input_names, spec.display)
    apply_dynamic(sig, spec.options.dynamic)
    return sig


def _example(sig: Any, seed: int) -> tuple[Any, ...]:
    """One call's inputs to check the members' outputs with: the user's sample, else a seeded draw."""
    import numpy as np
    from portq.tasks.fusion.recipe import tensors_of
    from portq.tasks.sources.inputs import random_sample

    sample = sig.samples[0] if sig.samples else random_sample(sig, np.random.default_rng(seed))
    return tensors_of(sample)


def trace_example(sig: Any) -> list[dict[str, Any]]:
    """Inputs to trace with, described so a reproduce script makes the same ones: zeros (an integer input's
    low end), at the sample's sizes, dynamic dims at least 2 (as the exporters trace)."""
    described = []
    for s in sig.specs:
        shape = [max(size, 2) if axis in s.dynamic else size for axis, size in enumerate(s.shape)]
        integer = s.dtype.startswith(("int", "uint"))
        fill = int(s.low) if integer and s.low is not None else 0
        described.append({"dtype": s.dtype, "shape": shape, "fill": fill})
    return described


def build_fused(spec: JobSpec, store: Store) -> FusedModel:
    """Load the members and data, check everything that needs the models, fuse (and fine-tune)."""
    import copy

    import torch
    from portq.tasks.checks.runners import torch_device
    from portq.tasks.fusion import recipe
    from portq.tasks.fusion.training import evaluate
    from portq.tasks.fusion.validation import FusionError

    source = spec.source
    assert isinstance(source, FuseSource)
    try:
        method, params = validate_request(source.method, len(source.members), source.params,
                                          base=source.base is not None, eval_data=source.eval_data is not None,
                                          calibration=source.calibration is not None,
                                          finetune=source.finetune is not None)
    except ConfigError as e:  # a message from outside the CLI: the job's own failure, not a usage error
        raise InputError(e.cause, step=STEP, file=_files(source)) from None
    device = torch_device(spec.target)  # before loading: a cuda job on a worker without CUDA fails at once
    members = [_load_member(m, store, "member") for m in source.members]
    base = _load_member(source.base, store, "base") if source.base is not None else None
    eval_data = _data(store, source.eval_data, "--eval-data", True)
    calibration = _data(store, source.calibration, "--calibration", False)
    tune = _data(store, source.finetune.data, "--finetune", True) if source.finetune else None
    sig = _signature(spec, store, members[0].loaded)
    modules = [m.loaded.module for m in members]
    if method.space == "output" and tune is not None:  # the fine-tune trains copies: the members stay as given
        with torch.no_grad():  # (a ScriptModule's copy would otherwise hold non-leaf weights)
            modules = [copy.deepcopy(m) for m in modules]
    fused = FusedModel(kind="fused", module=None, input_names=list(sig.names),
                       example_inputs=members[0].loaded.example_inputs, method=method, params=params,
                       members=members, base=base, eval_data=eval_data, device=device)
    try:
        module, fused.facts = recipe.fuse_members(
            method.name, [(m.name, mod) for m, mod in zip(members, modules)], params,
            base=(base.name, base.loaded.module) if base is not None else None,
            eval_data=eval_data.tensors() if eval_data is not None else None,
            calibration=recipe.calibration_batches(calibration.inputs) if calibration is not None else None,
            example=_example(sig, spec.options.parity.seed) if method.space == "output" else None,
            input_names=list(sig.names))
        if eval_data is not None:  # labels that do not fit the outputs fail here, before any conversion
            inputs, labels = eval_data.tensors(LABEL_CHECK_ROWS)
            evaluate(module, inputs, labels, params.get("metric"))
        if source.finetune is not None and tune is not None:
            options = source.finetune.model_dump()
            loss, curve = recipe.finetune_fused(module, tune.tensors(), options, device)
            fused.finetune = FinetuneReport.model_validate({
                "epochs": source.finetune.epochs, "lr": source.finetune.lr, "seed": source.finetune.seed,
                "device": device, "loss": loss, "examples": int(tune.inputs[0].shape[0]), "curve": curve})
        fused.trace_example = trace_example(sig) if recipe.needs_trace(module) else None
        built = recipe.fused_source(module, device, fused.trace_example)
    except FusionError as e:
        raise InputError(str(e), step=STEP, file=_files(source)) from e
    fused.module, fused.script, fused.program = built.module, built.script, built.program
    return fused


def _member_settings(member: Member, store: Store) -> dict[str, Any]:
    return {"name": member.name, "source": {"kind": member.loaded.kind, "model": store.url(member.spec.model.key),
                                            "arch": member.spec.arch, "arch_kwargs": member.spec.arch_kwargs}}


def script_settings(spec: JobSpec, model: LoadedModel, store: Store) -> dict[str, Any]:
    """What a reproduce script's `build_source` reads to fuse the members again (files where portq stored them)."""
    assert isinstance(model, FusedModel) and model.method is not None
    source = spec.source
    assert isinstance(source, FuseSource)
    tune = None
    if source.finetune is not None:
        tune = {**source.finetune.model_dump(mode="json"), "data": store.url(source.finetune.data.key)}
    return {"kind": JobKind.fuse.value, "method": model.method.name, "params": model.params,
            "members": [_member_settings(m, store) for m in model.members],
            "base": _member_settings(model.base, store) if model.base is not None else None,
            "eval_data": store.url(source.eval_data.key) if source.eval_data else None,
            "calibration": store.url(source.calibration.key) if source.calibration else None,
            "finetune": tune, "device": model.device, "input_names": model.input_names,
            "trace_example": model.trace_example}


def _script_modules() -> tuple[Any, ...]:
    from portq.tasks.core import registry
    from portq.tasks.fusion import arrays, methods, output_space, recipe, training, validation, weight_space
    from portq.tasks.sources import dequantize, recipes

    return (dequantize, recipes, arrays, validation, training, output_space, weight_space, registry, methods,
            recipe)


def _annotate(spec: JobSpec, model: LoadedModel, evidence: Any) -> dict[str, Any]:
    from portq.tasks.fusion.comparison import fusion_report  # numpy's report code: imported when a report is made

    assert isinstance(model, FusedModel)
    return {"fusion": fusion_report(spec, model, evidence)}


SOURCE_BUILDERS.add(JobKind.fuse.value, SourceBuilder(build=build_fused, script_settings=script_settings,
                                                      script_modules=_script_modules, annotate=_annotate))
