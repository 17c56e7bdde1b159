"""The request models are the one definition of every option: the commands' flags, their help and defaults come
from the fields (`portq.client.options.takes`), and `--help`, `-h`, `--version` and the option checks behave as a
user expects. In-process (Typer's CliRunner) where the command line's own parsing is what is tested."""

from __future__ import annotations

import inspect
import re

import pytest
import typer
from portq.client.commands import app
from portq.client.options import parameters, takes
from portq.tasks.core.contract import Target
from portq.tasks.core.errors import ConfigError
from portq.tasks.core.requests import ConvertRequest, FuseRequest, OptimizeRequest, PackageRequest, Request
from portq.tasks.fusion.methods import FUSION_METHODS
from typer.testing import CliRunner

from tests.conftest import run_cli

WIDE = {"COLUMNS": "250", "TERMINAL_WIDTH": "250"}


def _help(*args: str) -> str:
    res = CliRunner().invoke(app, [*args, "--help"], env=WIDE)
    assert res.exit_code == 0, res.output
    return " ".join(res.output.replace("│", " ").split())


@pytest.mark.parametrize("command, model", [("submit", ConvertRequest), ("optimize", OptimizeRequest),
                                            ("fuse", FuseRequest), ("package", PackageRequest)])
def test_every_request_option_is_a_flag_of_its_command(command, model):
    click_command = typer.main.get_command(app).commands[command]
    names = {p.name for p in click_command.params}
    assert set(model.model_fields) <= names
    text = _help(command)
    for param in parameters(model):
        info = model.model_fields[param.name]
        assert " ".join((info.description or "").split()) in text, param.name  # the field's help, brackets kept


def test_help_shows_every_default():
    text = _help("submit")
    for shown in ("[default: cpu]", "[default: (onnx)]", "[default: (30)]", "[default: (5)]", "[default: (0.99)]",
                  "[default: (18)]", "[default: (./portq-store)]", "[default: (1e-4 for fp32)]",
                  "'name:dtype[d0,d1]'"):
        assert shown in text, shown
    fuse = _help("fuse")
    for shown in ("[default: (0.5)]", "[default: (0.2)]", "[default: (5)]", "[default: (1e-3)]", "[default: (64)]"):
        assert shown in fuse, shown
    assert "[default: auto]" in _help("optimize")


def test_short_help_and_version():
    runner = CliRunner()
    assert runner.invoke(app, ["-h"]).exit_code == 0 and "Usage" in runner.invoke(app, ["-h"]).output
    res = runner.invoke(app, ["submit", "-h"])
    assert res.exit_code == 0 and "--manifest" in res.output
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and re.fullmatch(r"portq \d+\.\d+\.\d+\n", res.output)


def test_fuse_has_no_dash_m():
    """-m is --manifest for submit: fuse's method is --method only."""
    res = CliRunner().invoke(app, ["fuse", "a.pt", "b.pt", "-m", "soup"])
    assert res.exit_code == 2 and "No such option: -m" in res.output


def test_the_command_hands_over_the_request_with_what_was_given():
    seen: list[Request] = []
    cli = typer.Typer()

    @cli.command()
    @takes(ConvertRequest, step="submit")
    def go(*, request: ConvertRequest) -> None:
        seen.append(request)

    @cli.command()
    def other() -> None:
        pass

    runner = CliRunner()
    res = runner.invoke(cli, ["go", "--target", "gpu", "--batch-sizes", "1,8", "--no-localise", "-f", "pt2",
                              "--output-tol", "out:atol=1e-3", "--arch-kwargs", '{"n": 2}'])
    assert res.exit_code == 0, res.output
    (req,) = seen
    assert req.target is Target.cuda and req.batch_sizes == [1, 8] and req.localise is False
    assert req.formats == ["pt2"] and req.output_tol == {"out": {"atol": 1e-3}} and req.arch_kwargs == {"n": 2}
    assert req.given() == ["--target", "--format", "--output-tol", "--no-localise", "--batch-sizes", "--arch-kwargs"]
    assert runner.invoke(cli, ["go", "--target", "tpu"]).exit_code == 2
    res = runner.invoke(cli, ["go", "--batch-sizes", "1,x"])
    assert isinstance(res.exception, ConfigError) and "--batch-sizes '1,x' is not a comma-separated list of " \
        "integers" in res.exception.message


def test_the_python_api_takes_the_same_options():
    import portq

    for function, model in ((portq.submit, ConvertRequest), (portq.optimize, OptimizeRequest),
                            (portq.fuse, FuseRequest), (portq.package, PackageRequest)):
        params = inspect.signature(function).parameters
        assert params["request"].annotation in (model.__name__, f"{model.__name__} | None")
        assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    assert ConvertRequest.build(target="gpu", formats=("onnx",)).target is Target.cuda
    with pytest.raises(ConfigError, match=r"\[step submit\] timeout: Input should be greater than or equal to 0"):
        ConvertRequest.build(timeout=-5)
    with pytest.raises(ConfigError, match=r"\[step submit\] nonsense: Extra inputs are not permitted"):
        ConvertRequest.build(nonsense=1)


def test_the_fuse_method_help_names_every_method():
    listed = FuseRequest.model_fields["method"].description.removeprefix("How to fuse: ").rstrip(".").split(", ")
    assert sorted(listed) == sorted(name for name, _ in FUSION_METHODS)


def test_a_negative_timeout_is_refused_before_anything_runs(example_models, store_dir):
    res = run_cli("submit", str(example_models["mlp"]), "--timeout", "-5", env={"PORTQ_STORE": str(store_dir)})
    assert res.returncode == 2 and res.stderr.strip() == ("[error] [step submit] timeout: Input should be greater "
                                                          "than or equal to 0"), res.stderr
    assert not (store_dir / "batches").exists()
