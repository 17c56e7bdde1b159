"""torch's private parts that portq relies on are all there: a torch upgrade that moves one fails here, by name."""

import torch
from portq.tasks.compat import torch as torch_compat


def test_every_private_api_portq_relies_on_is_there():
    assert torch_compat.check() == [], f"torch {torch.__version__} moved what portq relies on"


def test_a_moved_api_is_named_with_its_user(monkeypatch):
    monkeypatch.delattr(torch._C, "_freeze_module")
    (problem,) = torch_compat.check()
    assert problem.startswith("torch._C._freeze_module (formats/rewrites/script_complex")


def test_every_listed_api_is_used_where_it_says():
    from pathlib import Path

    tasks = Path(torch_compat.__file__).resolve().parents[1]
    for module, attribute, _used_by in torch_compat.PRIVATE_APIS:
        name = (attribute or module).split(".")[-1]
        users = [p for p in tasks.rglob("*.py") if p.name != "torch.py" and name in p.read_text()]
        assert users, f"{module}.{attribute} is listed but no module uses it: drop it from PRIVATE_APIS"
