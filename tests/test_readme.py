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


def test_the_nightly_manifest_example_is_a_valid_manifest(tmp_path):
    from portq.tasks.core.manifest import load_manifest

    section = (ROOT / "README.md").read_text().split("## Nightly batches", 1)[1]
    example = re.search(r"```yaml\n(.+?)```", section, flags=re.S).group(1)
    for rel in ("vision/resnet.pt2", "text/bert.pt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "nightly.yaml").write_text(example)
    plan = load_manifest(tmp_path / "nightly.yaml")
    assert plan.series == "vision" and [len(g.paths) for g in plan.groups] == [1, 1]
def test_the_python_api_example_runs(tmp_path):
    """The README's Python example, as a user would run it: a fresh interpreter, the embedded default."""
    import os
    import subprocess
    import sys

    text = (ROOT / "README.md").read_text()
    section = text.split("### Python API", 1)[1].split("\n### ", 1)[0]
    (example,) = re.findall(r"```python\n(.+?)\n```", section, flags=re.S)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTQ_")}
    done = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "'succeeded': 1" in lines[0]
    assert any(line.startswith("sequential <in-memory Sequential>") and " onnx True " in line for line in lines)
    assert lines[-1].endswith("summary.html") and (tmp_path / "portq-store" / "batches").is_dir()
