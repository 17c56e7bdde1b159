"""docker/ cannot be built here (no engine); check what can be checked without one."""

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_compose_references_existing_dockerfiles_and_queues():
    compose = yaml.safe_load((ROOT / "docker/compose.yaml").read_text())
    services = compose["services"]
    assert {"redis", "cpu-worker", "gpu-worker"} <= set(services)
    for name in ("cpu-worker", "gpu-worker"):
        build = services[name]["build"]
        assert (ROOT / "docker" / build["context"] / build["dockerfile"]).resolve().is_file()
        assert services[name]["environment"]["PORTQ_BROKER_URL"].startswith("redis://redis:")
    assert "--appendonly" in services["redis"]["command"]


def test_dockerfiles_copy_what_exists_and_pin_torch():
    for name, queue in (("Dockerfile.cpu", "cpu"), ("Dockerfile.gpu", "gpu")):
        text = (ROOT / "docker" / name).read_text()
        for src in re.findall(r"^COPY (\S+)", text, flags=re.M):
            assert (ROOT / src).exists(), f"{name} copies {src}, which does not exist"
        assert "torch==2.13.0" in text
        assert f'"--queue", "{queue}"' in text


def test_compose_limits_hold_and_flower_watches_portq():
    compose = yaml.safe_load((ROOT / "docker/compose.yaml").read_text())
    services = compose["services"]
    for name in ("cpu-worker", "gpu-worker", "flower"):
        env = services[name]["environment"]
        assert int(env["PORTQ_TASK_TIME_LIMIT"]) < int(env["PORTQ_VISIBILITY_TIMEOUT"])
    assert services["flower"]["command"][:4] == ["celery", "-A", "portq.worker.app", "flower"]
    for name in ("cpu-worker", "gpu-worker"):
        assert services[name]["stop_grace_period"]  # time for a warm shutdown to finish the running job
