"""The fusion section of a job report, built once as facts and table rows and rendered by both the Markdown
(`content.job_markdown`) and the HTML (`html.job_html`) report: the method and its parameters, each member
with its score and its distance to the fused model, greedy-soup's steps, the check that an output-space
fusion computes what its members do together, BatchNorm statistics, and the fine-tune's loss curve.
"""

from __future__ import annotations

from portq.tasks.core.contract import FusionMemberReport, FusionReport
from portq.tasks.reports.facts import Fact
from portq.tasks.reports.facts import fmt as _fmt

MEMBER_COLUMNS = ["model", "file", "role", "score", "kept", "max abs diff to fused", "mean abs diff",
                  "top-1 agreement"]
GREEDY_COLUMNS = ["step", "candidate added", "soup score", "kept"]
LOSS_COLUMNS = ["epoch", "mean loss"]


def _params(f: FusionReport) -> str:
    shown = {k: v for k, v in f.params.items() if v is not None}
    if "weights" in shown:
        shown["weights"] = [round(w, 6) for w in shown["weights"]]
    return ", ".join(f"{k}={v}" for k, v in shown.items()) or "defaults"


def fusion_facts(f: FusionReport) -> list[Fact]:
    """The section's lines: method, parameters, scores, the output-space check, BatchNorm, fine-tune, notes."""
    space = "output space (one graph calling every member)" if f.space == "output" else \
        "weight space (one model with merged weights)"
    facts = [Fact("method", f"{f.method}, {space}", strong=True), Fact("parameters", _params(f))]
    if f.base is not None:
        facts.append(Fact("base", f"{f.base.name} ({f.base.file})"))
    if f.metric:
        better = "higher is better" if f.metric == "accuracy" else "lower is better"
        facts.append(Fact("metric", f"{f.metric} on the eval data ({better})"))
    if f.soup_score is not None:
        kept = [m.name for m in f.members if m.kept]
        facts.append(Fact("greedy soup", f"kept {len(kept)} of {len(f.members)} ({', '.join(kept)}); soup score "
                                         f"{_fmt(f.soup_score, 4)}"))
    if f.fused_score is not None:
        facts.append(Fact("fused model's score", _fmt(f.fused_score, 4) + (" (after the fine-tune)"
                                                                           if f.finetune else ""), strong=True))
    c = f.combine_check
    if c is not None:
        verdict = "equal" if c.passed else "DIFFERENT"
        facts.append(Fact("fused vs its members run separately",
                          f"{verdict} within the job's tolerance on {c.samples} samples (max abs err "
                          f"{_fmt(c.max_abs_err)}): {c.how}", bad=not c.passed))
    if f.bn_stats:
        facts.append(Fact("BatchNorm statistics", {"recomputed": "recomputed on the calibration data",
                                                   "none": "none (no BatchNorm layers)"}.get(
                                                       f.bn_stats, f"{f.bn_stats} like the other weights "
                                                                   "(no calibration data)")))
    t = f.finetune
    if t is not None:
        first, last = (t.curve[0], t.curve[-1]) if t.curve else (None, None)
        facts.append(Fact("fine-tune", f"{t.epochs} epoch(s) of Adam (lr {t.lr:g}, seed {t.seed}) on {t.examples} "
                                       f"examples on {t.device}, {t.loss} loss: {_fmt(first, 4)} -> {_fmt(last, 4)}"))
    facts += [Fact("note", n) for n in f.notes]
    return facts


def _member_row(m: FusionMemberReport) -> list[str]:
    kept = "-" if m.kept is None else ("yes" if m.kept else "no")
    agreement = "-" if m.top1_agreement is None else f"{m.top1_agreement:.1%}"
    return [m.name, m.file, m.role, _fmt(m.score, 4), kept, _fmt(m.max_abs_diff), _fmt(m.mean_abs_diff), agreement]


def member_rows(f: FusionReport) -> list[list[str]]:
    return [_member_row(m) for m in [*f.members, *([f.base] if f.base is not None else [])]]


def greedy_rows(f: FusionReport) -> list[list[str]]:
    return [[str(i + 1), s.candidate, _fmt(s.score, 4), "yes" if s.accepted else "no"]
            for i, s in enumerate(f.greedy_steps)]


def loss_rows(f: FusionReport) -> list[list[str]]:
    return [[str(i + 1), _fmt(loss, 4)] for i, loss in enumerate(f.finetune.curve)] if f.finetune else []
