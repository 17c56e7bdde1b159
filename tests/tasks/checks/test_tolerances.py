"""Tolerance resolution: override > job > precision default, field by field; docs/usage.md carries the table."""

from pathlib import Path

import pytest
import torch
from portq.tasks.checks.tolerances import PRECISION_DEFAULTS, defaults_table_markdown, infer_precision, resolve
from portq.tasks.core.contract import OutputTolerance, Precision, Tolerance, ToleranceMode

README = Path(__file__).resolve().parents[3] / "docs" / "usage.md"


def test_defaults_per_precision():
    assert resolve(Tolerance(), "fp32", "y") == PRECISION_DEFAULTS[Precision.fp32]
    t = resolve(Tolerance(), "int8", "y")
    assert (t.mode, t.q) == (ToleranceMode.quantile, 0.99)
    assert resolve(Tolerance(), "fp16", "y").atol > resolve(Tolerance(), "fp32", "y").atol


def test_field_by_field_resolution():
    tol = Tolerance(atol=1e-3, outputs={"aux.*": OutputTolerance(rtol=0.5, mode="max"),
                                        "aux.0": OutputTolerance(atol=2.0)})
    plain = resolve(tol, "fp32", "logits")
    assert (plain.mode, plain.atol, plain.rtol) == (ToleranceMode.elementwise, 1e-3, 1e-3)
    assert "atol from job" in plain.origin
    pattern = resolve(tol, "fp32", "aux.1")
    assert (pattern.mode, pattern.atol, pattern.rtol) == (ToleranceMode.max, 1e-3, 0.5)
    exact = resolve(tol, "fp32", "aux.0")  # an exact name wins over a pattern
    assert (exact.mode, exact.atol, exact.rtol) == (ToleranceMode.elementwise, 2.0, 1e-3)
    q = resolve(Tolerance(mode="quantile"), "fp32", "y")
    assert q.q == 0.99 and resolve(Tolerance(mode="quantile", quantile=0.9), "fp32", "y").q == 0.9


def test_invalid_tolerances_are_refused():
    with pytest.raises(ValueError):
        Tolerance(mode="p99")
    with pytest.raises(ValueError):
        Tolerance(quantile=1.5)
    with pytest.raises(ValueError):
        Tolerance(atol=-1)


def test_precision_is_inferred_from_the_weights():
    assert infer_precision(torch.nn.Linear(3, 3)) is Precision.fp32
    assert infer_precision(torch.nn.Linear(3, 3).half()) is Precision.fp16
    assert infer_precision(torch.nn.Linear(3, 3).bfloat16()) is Precision.bf16
    assert infer_precision(torch.nn.ReLU()) is Precision.fp32


def test_readme_carries_the_defaults_table():
    assert defaults_table_markdown() in README.read_text()
