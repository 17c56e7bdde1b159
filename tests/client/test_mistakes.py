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


def test_path_mistakes_queue_nothing(tmp_path, example_models):
    """A directory, a pattern that matched nothing, a missing file or a lone sample file: exit 2, one line naming
    the path, and no batch made (the good file given beside it is not submitted either)."""
    store = tmp_path / "store"
    env = {"PORTQ_STORE": str(store)}
    good = str(example_models["mlp"])
    models = example_models["mlp"].parent
    cases = [
        ([str(models)], [f"[step submit, file {models}] the folder has no config.json", f"{models}/*"]),
        ([str(models / "*.pth")], ["matches no file"]),
        ([str(tmp_path / "nope.pt")], [f"file {tmp_path / 'nope.pt'}] file does not exist"]),
        ([str(models / "textcls.npz")], ["is a sample file (.npz), not a model"]),
    ]
    for paths, fragments in cases:
        res = run_cli("submit", good, *paths, "--batch", "typo", env=env)
        one_line_error(res, *fragments)
    assert not (store / "batches").exists() or not any((store / "batches").iterdir())


def test_sample_files_beside_their_models_are_skipped(tmp_path, example_models):
    """`models/*` picks up each model's sample .npz: skipped by rule (it is that model's sample), with a note."""
    files = sorted(str(p) for p in example_models["mlp"].parent.iterdir() if p.stem in ("mlp", "textcls"))
    assert any(f.endswith(".npz") for f in files)
    res = run_cli("submit", *files, "--batch", "star", "--json", env={"PORTQ_STORE": str(tmp_path / "store")})
    assert res.returncode == 0, res.stderr
    import json

    doc = json.loads(res.stdout)
    assert sorted(j["model"] for j in doc["jobs"]) == ["mlp", "textcls"]
    assert "mlp.npz: skipped, the sample inputs of" in res.stderr


def test_api_raises_for_a_path_that_does_not_exist(tmp_path):
    import portq
    from portq.tasks.core.errors import ConfigError

    with pytest.raises(ConfigError, match="file does not exist"):
        portq.submit(str(tmp_path / "absent.pt"), store=str(tmp_path / "store"))
    assert not (tmp_path / "store" / "batches").exists()


def test_unknown_batch_is_a_usage_mistake_everywhere(tmp_path):
    env = {"PORTQ_STORE": str(tmp_path / "store")}
    for command in ("status", "report", "wait", "cancel", "retry"):
        res = run_cli(command, "nosuch", env=env)
        one_line_error(res, f"[step {command}]", "no batch 'nosuch'")
    res = run_cli("compare", "nosuch", "other", env=env)
    assert res.returncode == 2


def test_switches_take_no_value_and_say_so(tmp_path):
    res = run_cli("submit", "-h")
    assert res.returncode == 0 and "<bool>" not in res.stdout and "--json" in res.stdout
    for command in ("cancel", "workers", "worker"):
        text = " ".join(run_cli(command, "--help").stdout.split())
        assert "queue to act on" in text and "run jobs locally" not in text, command
