"""Parity tolerances: the defaults per precision (one table), the check modes, and per-output overrides.

Every parity check resolves, for each output, one `ResolvedTolerance`: a mode, `atol`, `rtol` and (for
the quantile mode) `q`. Resolution order, first set wins, field by field: the first per-output override
whose pattern matches the output's name (fnmatch, exact names first), then the job's `--atol/--rtol/
--tolerance-mode`, then the row of `PRECISION_DEFAULTS` for the artifact's precision.

Modes (`ToleranceMode`):

- ``elementwise`` (default): an element fails when its absolute error exceeds `atol` AND its relative error
  exceeds `rtol`; the output passes when no element fails (Polygraphy's default semantics).
- ``max`` / ``mean`` / ``median`` / ``quantile``: the statistic is taken over every element of the output on
  every sample, once of the absolute and once of the relative error; the output fails when the absolute
  statistic exceeds `atol` AND the relative statistic exceeds `rtol` (Polygraphy's `--check-error-stat`).
  ``quantile`` uses the `q`-quantile (linear interpolation, numpy's default), e.g. q=0.99 ignores the worst 1%.

In every mode a non-finite mismatch (NaN or Inf on one side where the other side differs) fails the output.

This module imports neither torch nor onnxruntime (precision inference imports torch inside the function).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

from portq.tasks.core.contract import Precision, ToleranceMode


@dataclass(frozen=True)
class ResolvedTolerance:
    """The tolerance one output is held to, and where each part came from."""

    mode: ToleranceMode
    atol: float
    rtol: float
    q: float | None = None  # only for ToleranceMode.quantile
    origin: str = ""  # e.g. "fp32 default", "job", "override 'logits*'"


#: The defaults per precision: the one table the README reproduces. fp32 is what a correct conversion
#: reaches comfortably (op-level errors are ~1e-6; whole networks accumulate to ~1e-5). Half precisions
#: round every activation (unit roundoff 4.9e-4 for fp16, 3.9e-3 for bf16), so whole-network errors of a
#: few 1e-3 (fp16) and 1e-2 (bf16) are expected. Quantized int8 artifacts err by up to a quantization step
#: per element by design, so they are judged on the 99th percentile instead of the single worst element.
PRECISION_DEFAULTS: dict[Precision, ResolvedTolerance] = {
    Precision.fp32: ResolvedTolerance(ToleranceMode.elementwise, 1e-4, 1e-3, None, "fp32 default"),
    Precision.fp16: ResolvedTolerance(ToleranceMode.elementwise, 1e-2, 1e-2, None, "fp16 default"),
    Precision.bf16: ResolvedTolerance(ToleranceMode.elementwise, 5e-2, 5e-2, None, "bf16 default"),
    Precision.int8: ResolvedTolerance(ToleranceMode.quantile, 1e-1, 1e-1, 0.99, "int8 default"),
}

DEFAULT_QUANTILE = 0.99


def defaults_table_markdown() -> str:
    """PRECISION_DEFAULTS as a Markdown table (the README's copy is checked against this)."""
    lines = ["| precision | mode | atol | rtol |", "|---|---|---|---|"]
    for p, t in PRECISION_DEFAULTS.items():
        mode = t.mode.value if t.mode is not ToleranceMode.quantile else f"quantile (q={t.q:g})"
        lines.append(f"| {p.value} | {mode} | {t.atol:g} | {t.rtol:g} |")
    return "\n".join(lines)


def _field(obj: Any, name: str) -> Any:
    return getattr(obj, name, None) if obj is not None else None


def matching_override(overrides: dict[str, Any], output: str) -> tuple[str, Any] | None:
    """The override for an output: an exact name first, else the first fnmatch pattern (in given order)."""
    if output in overrides:
        return output, overrides[output]
    for pattern, value in overrides.items():
        if fnmatch.fnmatchcase(output, pattern):
            return pattern, value
    return None


def resolve(tolerance: Any, precision: Precision | str, output: str) -> ResolvedTolerance:
    """The tolerance for one output, from the job's `Tolerance` (contract), the precision and the output's name."""
    base = PRECISION_DEFAULTS[Precision(precision)]
    layers: list[tuple[str, Any]] = []
    hit = matching_override(_field(tolerance, "outputs") or {}, output)
    if hit is not None:
        layers.append((f"override {hit[0]!r}", hit[1]))
    layers.append(("job", tolerance))

    def pick(name: str) -> tuple[Any, str | None]:
        for origin, layer in layers:
            value = _field(layer, name)
            if value is not None:
                return value, origin
        return None, None

    mode_value, mode_origin = pick("mode")
    atol, atol_origin = pick("atol")
    rtol, rtol_origin = pick("rtol")
    q, q_origin = pick("quantile")
    mode = ToleranceMode(mode_value) if mode_value is not None else base.mode
    if mode is ToleranceMode.quantile:
        q = q if q is not None else (base.q if base.q is not None else DEFAULT_QUANTILE)
    else:
        q, q_origin = None, None
    chosen = [(f, o) for f, o in (("mode", mode_origin), ("atol", atol_origin), ("rtol", rtol_origin),
                                  ("q", q_origin)) if o]
    origin = base.origin if not chosen else base.origin + "; " + ", ".join(f"{f} from {o}" for f, o in chosen)
    return ResolvedTolerance(
        mode=mode,
        atol=float(atol if atol is not None else base.atol),
        rtol=float(rtol if rtol is not None else base.rtol),
        q=q,
        origin=origin,
    )


def infer_precision(module: Any) -> Precision:
    """The precision a source model computes in, from its parameters and buffers (most elements win).

    Quantized tensors or int8 weights mean int8; float16 / bfloat16 mean fp16 / bf16; anything else fp32.
    """
    import torch

    counts: dict[Precision, int] = {}
    tensors: list[Any] = []
    for getter in ("parameters", "buffers"):
        fn = getattr(module, getter, None)
        if callable(fn):
            try:
                tensors.extend(fn())
            except Exception:  # ScriptModules and AOTI wrappers may not enumerate; fp32 is the safe reading
                continue
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        if t.is_quantized or t.dtype in (torch.int8, torch.uint8, torch.qint8, torch.quint8):
            p = Precision.int8
        elif t.dtype == torch.float16:
            p = Precision.fp16
        elif t.dtype == torch.bfloat16:
            p = Precision.bf16
        elif t.is_floating_point():
            p = Precision.fp32
        else:
            continue
        counts[p] = counts.get(p, 0) + t.numel()
    if not counts:
        return Precision.fp32
    return max(counts, key=lambda p: counts[p])
