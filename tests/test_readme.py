"""The README's two commands stay what CI runs, and the main one points at commands that exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)


def test_exactly_two_commands_and_ci_runs_the_test_one():
    main_cmd, test_cmd = commands()
    assert "\n" not in main_cmd and "\n" not in test_cmd
    assert "torch==2.13.0" in main_cmd and main_cmd.index("torch==2.13.0") < main_cmd.index("pip install -q .")
    assert "portq examples" in main_cmd and "portq submit" in main_cmd
    assert "pytest" in test_cmd
    assert test_cmd in (ROOT / ".ci/run").read_text()
