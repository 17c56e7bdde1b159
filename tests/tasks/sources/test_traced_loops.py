"""A trace that baked a loop over a data-dependent tensor (experts chosen by nonzero) is refused at load; the
Hugging Face "every expert" formulation, which traces shape-generic, loads and runs at other sizes."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from portq.tasks.core.errors import ModelLoadError
from portq.tasks.sources.loading import LoadRequest, load_model

from tests.zoo.harder import HitExpertsMoE, TinyMixtral

warnings.filterwarnings("ignore")


def _saved(model: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path) -> Path:
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(model.eval(), args, check_trace=False), path)
    return path


def test_a_baked_expert_loop_is_refused_with_what_to_do(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = _saved(TinyMixtral(HitExpertsMoE, layers=1, experts=8), (torch.randint(0, 100, (1, 2)),),
                  tmp_path / "moe.pt")
    with pytest.raises(ModelLoadError) as e:
        load_model(LoadRequest(path=path, display="moe.pt"))
    assert "traced through a loop over a data-dependent tensor (aten::unbind of the result of aten::nonzero" \
        in e.value.message
    assert "re-trace a version that loops over every expert" in e.value.message and "--arch" in e.value.message


def test_the_every_expert_loop_loads_and_generalises(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyMixtral(layers=1).eval()
    path = _saved(model, (torch.randint(0, 100, (2, 5)),), tmp_path / "moe.pt")
    loaded = load_model(LoadRequest(path=path, display="moe.pt"))
    other = torch.randint(0, 100, (3, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(other), model(other))
