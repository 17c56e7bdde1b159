"""The quick start as a user meets it: in a real pseudo-terminal, where the live progress display runs.

A piped run never starts Rich's live display, so it cannot see what a terminal shows; this one can.
"""

import os
import re
import shutil
import sys

import pexpect


def test_quick_start_in_a_terminal_ends_with_the_table_and_the_report_paths(example_models, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    for path in example_models.values():
        shutil.copy(path, models / path.name)
        sidecar = path.with_suffix(".npz")
        if sidecar.exists():
            shutil.copy(sidecar, models / sidecar.name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTQ_")}
    env.update(TERM="xterm-256color", PATH=f"{os.path.dirname(sys.executable)}:{env.get('PATH', '')}")
    term = pexpect.spawn("bash", ["-c", "portq submit models/*.pt* --batch demo; echo EXIT=$?"], cwd=tmp_path,
                         env=env, timeout=300, encoding="utf-8", dimensions=(50, 200))
    term.expect(pexpect.EOF)
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", term.before)  # the colours and cursor moves, not the text

    assert "EXIT=0" in screen, screen[-3000:]
    assert "batch demo" in screen
    for name in example_models:
        assert re.search(rf"│ {name}\s+│.*│ succeeded\s+│ onnx\s+│ succeeded\s+│ pass", screen), screen[-3000:]
    summary = tmp_path / "portq-store" / "batches" / "demo" / "summary.html"
    assert f"reports: summary page {summary}" in screen
    assert summary.is_file()
