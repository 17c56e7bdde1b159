"""The smallest pieces of a human-readable report, shared by every section (`content`, `fusion`, `html`): a
`Fact` (one `label: value` line) and how a number is printed. They sit below the section modules so each
section imports them without importing the others.
"""

from __future__ import annotations

from dataclasses import dataclass


def fmt(x: float | None, digits: int = 3) -> str:
    """A number for a report: `-` for none, `digits` significant digits below 0.01, else `digits` decimals."""
    return "-" if x is None else f"{x:.{digits}g}" if abs(x) < 1e-2 else f"{x:.{digits}f}"


@dataclass(frozen=True)
class Fact:
    """One line of a report: `label: value`."""

    label: str
    value: str
    strong: bool = False  # the line's point (status, best pick): bold
    bad: bool = False  # something went wrong: shown as a failure
