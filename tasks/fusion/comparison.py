"""The fusion section of a job report: how the fused model compares with its members, on the job's own
parity samples and, with eval data, by score.

- Output-space methods: each member of the fused module runs on its own, and their outputs are combined
  here, in numpy float64 (the weighted mean, the vote with its tie rule, concatenation, stacking; a chain
  hands each output to the next member), then compared with the fused model's outputs under the job's
  tolerance: the fused graph must compute exactly what its members do together.
- Each member's (and the base's) distance to the fused model, where their outputs have the same shapes
  (every weight-space method, ensemble): the largest and mean absolute difference over every output
  element, and top-1 agreement for classifier-like outputs.
- With eval data: every member's score and the fused model's (after any fine-tune); greedy-soup's own
  scores, choices and steps.

Runs once, in the job's process, after the source's evidence; a comparison that cannot run becomes a
note, never the job's failure.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from portq.tasks.core.contract import CombineCheck, FusionMemberReport, FusionReport, GreedyStep, JobSpec
from portq.tasks.core.errors import first_line

if TYPE_CHECKING:
    from portq.tasks.checks.evidence import SourceEvidence
    from portq.tasks.fusion.fused import FusedModel, Member

NamedArrays = list[tuple[str, np.ndarray]]


def _combine(module: Any, outs: list[NamedArrays]) -> tuple[NamedArrays, str]:
    """The members' outputs (flattened, per member) combined as the fused module's method says, in numpy
    (`OutputFusion.reference`), and how."""
    names = [n for n, _ in outs[0]]
    combined, how = module.reference([[a.astype(np.float64) for _, a in member] for member in outs])
    return list(zip(names, combined)), how


def _chain_outputs(module: Any, sample: list[np.ndarray], device: str) -> NamedArrays:
    import torch
    from portq.tasks.checks.runners import flatten, to_tensors
    from portq.tasks.fusion.output_space import call_next

    with torch.inference_mode():
        out = module.members[0](*to_tensors(sample, device))
        for m in module.members[1:]:
            out = call_next(m, out)
    return flatten(out)


def combine_check(spec: JobSpec, model: FusedModel, evidence: SourceEvidence) -> CombineCheck:
    """The fused model's outputs against its members run one by one and combined outside it."""
    from portq.tasks.checks.parity import output_check
    from portq.tasks.checks.runners import TorchRunner, call
    from portq.tasks.checks.tolerances import resolve

    module, device = model.module, evidence.device
    checks: dict[str, Any] = {}
    worst, how = 0.0, "each member's output handed to the next member, one call at a time"
    for i, (sample, reference) in enumerate(zip(evidence.samples, evidence.reference)):
        if module.hands_over:
            combined = _chain_outputs(module, sample, device)
        else:
            outs = [call(TorchRunner(m, device), sample) for m in module.members]
            combined, how = _combine(module, outs)
        for (name, ref), (_, got) in zip(reference, combined):
            check = checks.setdefault(name, output_check(resolve(spec.options.tolerance, evidence.precision, name)))
            errors = check.add(ref, got.astype(ref.dtype) if ref.dtype.kind in "iub" else got, i)
            if errors is not None and errors.abs_err.size:
                worst = max(worst, float(errors.abs_err.max()))
        if len(combined) != len(reference):
            checks.setdefault("outputs", output_check(resolve(spec.options.tolerance, evidence.precision, "")))
            checks["outputs"].problems.append(f"sample {i}: {len(combined)} outputs, the fused model "
                                              f"{len(reference)}")
    passed = all(check.verdict()[0] for check in checks.values())
    return CombineCheck(passed=passed, max_abs_err=worst, samples=len(evidence.samples),
                        how=f"each member run on its own, outputs {how}")


def _distance(member: Member, evidence: SourceEvidence, row: FusionMemberReport) -> None:
    from portq.tasks.checks.parity import is_classifier_like
    from portq.tasks.checks.runners import TorchRunner, call

    runner = TorchRunner(member.loaded.module, evidence.device)
    worst, total, count, agree, rows = 0.0, 0.0, 0, 0, 0
    for sample, reference in zip(evidence.samples, evidence.reference):
        for (_, ref), (_, got) in zip(reference, call(runner, sample)):
            if ref.ndim == 1 and ref.dtype.kind in "iu" and is_classifier_like(got) and got.ndim == 2 \
                    and got.shape[0] == ref.shape[0]:  # a vote's class indices against a member's scores
                agree, rows = agree + int((got.argmax(1) == ref).sum()), rows + ref.shape[0]
            if ref.shape != got.shape:
                continue
            diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
            diff = diff[np.isfinite(diff)]
            if diff.size:
                worst, total, count = max(worst, float(diff.max())), total + float(diff.sum()), count + diff.size
            if is_classifier_like(ref):
                c = ref.shape[-1]
                agree += int((got.reshape(-1, c).argmax(1) == ref.reshape(-1, c).argmax(1)).sum())
                rows += ref.size // c
    if count:  # outputs of another shape than the fused model's (concat, stack, chain, vote) have no distance
        row.max_abs_diff, row.mean_abs_diff = worst, total / count
    row.top1_agreement = agree / rows if rows else None


def _score(module: Any, model: FusedModel, metric: str | None) -> tuple[str, float]:
    from portq.tasks.fusion.training import evaluate

    assert model.eval_data is not None
    inputs, labels = model.eval_data.tensors()
    return evaluate(module, inputs, labels, metric)


def fusion_report(spec: JobSpec, model: FusedModel, evidence: SourceEvidence) -> FusionReport:
    """The `fusion` section of the job's report."""
    assert model.method is not None
    facts = model.facts
    report = FusionReport(method=model.method.name, space=model.method.space, params=model.params,
                          bn_stats=facts.get("bn_stats"), notes=list(facts.get("notes", [])),
                          finetune=model.finetune)
    rows = {m.name: FusionMemberReport(name=m.name, file=m.spec.model.name, role="member") for m in model.members}
    report.members = list(rows.values())
    if model.base is not None:
        report.base = FusionMemberReport(name=model.base.name, file=model.base.spec.model.name, role="base")
    if "chosen" in facts:  # greedy-soup's own account
        report.metric, report.soup_score = facts["metric"], facts["soup_score"]
        report.greedy_steps = [GreedyStep(**s) for s in facts["steps"]]
        for name, row in rows.items():
            row.kept, row.score = name in facts["chosen"], facts["member_scores"][name]
    checks = [(m, rows[m.name]) for m in model.members] + \
        ([(model.base, report.base)] if model.base is not None and report.base is not None else [])
    try:
        if model.method.space == "output":
            report.combine_check = combine_check(spec, model, evidence)
        for member, row in checks:
            _distance(member, evidence, row)
    except Exception as e:  # a comparison that cannot run is reported, not fatal
        report.notes.append(f"comparison with the members did not run: {type(e).__name__}: {first_line(e)}")
    if model.eval_data is not None:
        try:
            metric = report.metric or model.params.get("metric")
            for member, row in checks:
                if row.score is None:
                    metric, row.score = _score(member.loaded.module, model, metric)
            report.metric, report.fused_score = _score(model.module, model, metric)
        except Exception as e:
            report.notes.append(f"scoring on the eval data did not run: {type(e).__name__}: {first_line(e)}")
        if report.metric == "loss":
            report.notes.append("scores are the mean loss on the eval data: lower is better")
    return report
