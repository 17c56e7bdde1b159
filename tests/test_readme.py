"""The README's two commands stay what CI runs, its examples and docs/'s work, and every relative link resolves."""

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

    example = re.search(r"```yaml\n(.+?)```", (ROOT / "docs" / "nightly.md").read_text(), flags=re.S).group(1)
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


def markdown_files():
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def slug(heading):
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path):
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    seen = {}
    for heading in re.findall(r"^#+ (.+)$", text, flags=re.M):
        base = slug(heading)
        seen[base] = seen.get(base, -1) + 1
        yield base if seen[base] == 0 else f"{base}-{seen[base]}"


def links(path):
    """The link targets of a Markdown file, outside code blocks and code spans."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def broken_links(path):
    for target in links(path):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):
            continue  # https:, mailto:
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists():
            yield f"{target} (no such file)"
        elif anchor and resolved.suffix == ".md" and anchor not in set(anchors(resolved)):
            yield f"{target} (no such heading)"


def test_every_relative_link_resolves():
    """README.md and docs/: each relative link names a file of the repository, and a heading where it names one."""
    assert len(markdown_files()) > 5
    broken = {str(p.relative_to(ROOT)): list(broken_links(p)) for p in markdown_files()}
    assert not {k: v for k, v in broken.items() if v}
    assert sum(len(links(p)) for p in markdown_files()) > 20


def test_the_link_check_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Top\n\n[a](page.md#top) [b](missing.md) [c](page.md#nowhere) `[d](ignored.md)`\n")
    assert list(broken_links(page)) == ["missing.md (no such file)", "page.md#nowhere (no such heading)"]


def test_the_readme_is_a_front_page():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
