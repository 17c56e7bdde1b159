"""The zoo's fixtures, and the success table printed at the end of any run that converted zoo files."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from tests.zoo.build import ZooFile, save_case

#: (case, family, file kind, format, passed, reason) for every conversion the zoo tests ran
RESULTS: list[tuple[str, str, str, str, bool, str]] = []


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("zoo")


@pytest.fixture(scope="session")
def zoo_file(zoo_dir: Path) -> Any:
    """zoo_file(case, kind) -> the saved ZooFile (each case is built and saved once per session)."""
    saved: dict[str, list[ZooFile]] = {}

    def get(case: str, kind: str) -> ZooFile:
        if case not in saved:
            saved[case] = save_case(case, zoo_dir)
        return next(f for f in saved[case] if f.kind == kind)

    return get


_WHERE = re.compile(r"^\[[^]]*\] ")  # "[step export:onnx, file /tmp/...] ": the table says which file


def success_table(results: list[tuple[str, str, str, str, bool, str]]) -> list[str]:
    """Rows: per family and file kind, then per format overall; each cell passed/total."""
    formats = sorted({r[3] for r in results}, key=["onnx", "torchscript", "pt2", "aoti"].index)
    cells: dict[tuple[str, str], dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for _, family, kind, fmt, passed, _ in results:
        cell = cells[(family, kind)][fmt]
        cell[0] += passed
        cell[1] += 1
        totals[fmt][0] += passed
        totals[fmt][1] += 1

    def show(c: list[int]) -> str:
        return f"{c[0]}/{c[1]}" if c[1] else "-"

    width = max([len(f"{f} / {k}") for f, k in cells] + [20])
    lines = [f"{'family / file kind':<{width}}  " + "  ".join(f"{f:>12}" for f in formats)]
    for (family, kind), row in sorted(cells.items()):
        lines.append(f"{family + ' / ' + kind:<{width}}  " + "  ".join(f"{show(row[f]):>12}" for f in formats))
    rates = [f"{t[0]}/{t[1]} ({100 * t[0] / t[1]:.0f}%)" if t[1] else "-" for t in (totals[f] for f in formats)]
    lines.append(f"{'all files':<{width}}  " + "  ".join(f"{r:>12}" for r in rates))
    failures = [f"  {case}:{kind} {fmt}: {_WHERE.sub('', reason)}"
                for case, _, kind, fmt, passed, reason in results if not passed]
    if failures:
        lines += ["", "conversions that did not pass, with the reason the report gives:", *failures]
    return lines


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not RESULTS:
        return
    terminalreporter.write_sep("=", "model zoo: converted with parity passing, by family and format")
    for line in success_table(RESULTS):
        terminalreporter.write_line(line)
