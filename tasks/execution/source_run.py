"""The job's first half: build the source, resolve its inputs, and record what it does on them.

The evidence (`portq.tasks.checks.evidence.SourceEvidence`) is gathered once per job, where the job's steps run:
in the kept step process under step isolation (`portq.tasks.execution.isolation`), which then holds the model for
the job's steps, so the job's own process never loads the model nor imports torch; in the job's process
otherwise. Every artifact step is then held to it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from portq.tasks.checks.evidence import SourceEvidence
from portq.tasks.core.contract import JobSpec
from portq.tasks.core.errors import InputError, first_line
from portq.tasks.execution.timings import Stopwatch
from portq.tasks.sources.inputs import InputSignature
from portq.tasks.sources.loading import LoadedModel
from portq.tasks.state.store import Store


@dataclass
class SourceRun:
    """What the source stage hands the job: the evidence, and what its report says of the source."""

    evidence: SourceEvidence
    notes: list[str] = field(default_factory=list)  # the loader's notes on the model
    inputs: list[dict[str, Any]] = field(default_factory=list)  # the input signature, described
    sections: dict[str, Any] = field(default_factory=dict)  # the kind's own report sections (fuse: `fusion`)
    model: LoadedModel | None = None  # the model itself: only where it was built, never sent between processes


def run_source(spec: JobSpec, store: Store, clock: Stopwatch,
               on_phase: Callable[[str], None] = lambda phase: None) -> SourceRun:
    """Build the job's source on its target's device, resolve its inputs, run and time it on every sample.

    Each stage goes into `clock` as it ends (a failure still shows where the time went); `on_phase` is told each
    stage as it starts. Raises the `PortqError` that stops the job (a missing CUDA device, a model that does not
    load, inputs it rejects).
    """
    from portq.tasks.checks.runners import torch_device
    from portq.tasks.sources.builders import build_source, builder_for

    on_phase("load")
    with clock.stage("load"):
        device = torch_device(spec.target)
        model = build_source(spec, store, device)
    on_phase("inputs")
    with clock.stage("inputs"):
        sig = resolve_inputs(spec, store, model)
    on_phase("source")  # the source model runs on every sample and is timed
    with clock.stage("source"):
        evidence = gather_evidence(spec, model, sig, device)
    annotate = builder_for(spec.kind.value).annotate
    sections = annotate(spec, model, evidence) if annotate is not None else {}
    return SourceRun(evidence=evidence, notes=list(model.notes), inputs=sig.describe(), sections=sections, model=model)


def resolve_inputs(spec: JobSpec, store: Store, model: LoadedModel) -> InputSignature:
    """The model's input signature: from --input specs, the sidecar .npz, or the program's own example."""
    from portq.tasks.sources.inputs import apply_dynamic, check_dynamic_support, load_npz, resolve_signature

    options = spec.options
    npz = None
    if options.sample is not None:
        with store.local_file(options.sample.key) as sample_path:
            npz = load_npz(sample_path, options.sample.name)
    sig = resolve_signature(options.inputs, npz, model.example_inputs, model.input_names, spec.display,
                            model_specs=model.input_specs)
    apply_dynamic(sig, options.dynamic)
    check_dynamic_support(model.program, sig, spec.display)
    if options.optimize is not None and options.optimize.calibration:
        from portq.tasks.sources.calibration import read_calibration

        read_calibration(options.optimize.calibration, store, sig)  # refused here, before any artifact
    return sig


def gather_evidence(spec: JobSpec, model: LoadedModel, sig: InputSignature, device: str) -> SourceEvidence:
    """Run the source on every parity sample and time it: the reference each artifact is held to."""
    from portq.tasks.checks.fingerprint import environment
    from portq.tasks.checks.latency import time_source
    from portq.tasks.checks.memory import MemoryProbe
    from portq.tasks.checks.runners import TorchRunner, call
    from portq.tasks.checks.tolerances import infer_precision
    from portq.tasks.sources.inputs import export_sample, export_sample_index, parity_samples

    parity = spec.options.parity
    samples = parity_samples(sig, parity.random_samples, parity.seed)
    export_index = export_sample_index(sig, samples)
    if export_index is None:  # every sample has a dynamic dim of size 1: export (and check) one more
        samples.append(export_sample(sig, parity.seed))
        export_index = len(samples) - 1
    probe = MemoryProbe(device).start()
    runner = TorchRunner(model.module, device)
    reference = []
    for i, sample in enumerate(samples):
        try:
            reference.append(call(runner, sample))
        except Exception as e:
            shapes = ", ".join(f"{s.name}:{a.dtype}{list(a.shape)}" for s, a in zip(sig.specs, sample))
            which = "the example inputs" if i < len(sig.samples) or i == 0 else f"random sample {i}"
            raise InputError(f"the model rejected {which} ({shapes}): {type(e).__name__}: {first_line(e)}",
                             step="inputs", file=spec.display,
                             hint="check the sidecar .npz or --input specs against the model's forward()") from e
    env = environment(device)
    batch, sweep = time_source(runner, sig, samples, spec.options.latency, seed=parity.seed)
    probe.warm()
    memory = probe.stop()
    dynamic = {i: dict(s.dynamic) for i, s in enumerate(sig.specs) if s.dynamic}
    return SourceEvidence(device=device, samples=samples, reference=reference,
                          input_names=sig.names, output_names=[n for n, _ in reference[0]], dynamic=dynamic,
                          precision=infer_precision(model.module).value, user_samples=len(sig.samples),
                          batch_size=batch, sweep=sweep, memory=memory, environment=env,
                          export_index=export_index, input_specs=list(sig.specs), source_kind=model.kind)
