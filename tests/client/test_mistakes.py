"""A user's mistakes end in one line that names the problem and the fix, with exit 2 and no traceback."""

import pytest

from tests.conftest import run_cli


def one_line_error(res, *fragments):
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("[error] "), res.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_examples_into_a_folder_that_cannot_be_made(tmp_path):
    res = run_cli("examples", "/proc/portq-nope")
    one_line_error(res, "[step examples]", "/proc/portq-nope", "give a folder you can write to")


def test_a_store_that_is_a_file(tmp_path, example_models):
    (tmp_path / "afile").write_text("x")
    res = run_cli("status", "demo", "--store", str(tmp_path / "afile"))
    one_line_error(res, "[step store]", f"{tmp_path / 'afile'} is a file, not a folder", "PORTQ_STORE")
    res = run_cli("submit", str(example_models["mlp"]), "--store", str(tmp_path / "afile"))
    one_line_error(res, "is a file, not a folder")


@pytest.mark.parametrize("store", ["/sys/portq-store", "/proc/portq-store"])
def test_a_store_that_cannot_be_written(store, example_models):
    res = run_cli("submit", str(example_models["mlp"]), "--store", store)
    one_line_error(res, "[step store]", f"cannot write to the store {store}", "a folder you can write to")
