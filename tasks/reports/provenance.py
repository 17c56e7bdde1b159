"""Provenance beside every artifact, and its verification.

Each artifact folder of a job's result gets `provenance.intoto.json`: an in-toto Statement (v1) whose subjects
are the artifact's files (the model file first, then its data files, e.g. ONNX external data) with their SHA-256,
and whose predicate is SLSA Provenance v1: what was asked (`buildDefinition.externalParameters`: the job's source
and options, the artifact requested), what it was built from (`resolvedDependencies`: the uploaded model, sample
and calibration files with their digests), who built it and with what (`runDetails.builder`: the worker host and
the toolchain's versions), when (`runDetails.metadata`), the job's report (`byproducts`: report.json and the
reproduce script with their digests), and portq's verdicts (`portq_checks`, an extension field named as SLSA asks
extension fields to be: `<vendor>_<name>`).

The statement is written as plain JSON and never changed afterwards, so a signature can wrap it later without a
change to it: a DSSE envelope (payloadType `application/vnd.in-toto+json`, payload its bytes) in a Sigstore
bundle beside it. Verifying recomputes the digest of every subject through the store (a directory or any fsspec
URL), so a result folder, a whole store and a packaged Triton repository are checked by the same code.

Subject names are paths relative to the job's result folder (`onnx/model.onnx`). A subject is found:

- in a result folder (the record in `<result>/<artifact id>/`): at `<result>/<name>`;
- in a Triton model folder (the record in `<model>/<version>/`, `<model>/config.pbtxt` beside the version): the
  first subject (the model file) under Triton's file name for its platform (`model.onnx`, `model.pt`), the others
  (data files) under their own base names, all in the version folder.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from portq.tasks.core.contract import ArtifactReport, JobReport, JobSpec, SourceRef
from portq.tasks.core.errors import InputError, StoreError
from portq.tasks.state.records import list_records, read_report, require_batch
from portq.tasks.state.store import Store

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
#: what kind of build a portq statement describes: one artifact of one job (its parameters are documented in
#: docs/serving.md)
BUILD_TYPE = "urn:portq:buildtype:artifact:v1"
#: the builder: portq on a worker host
BUILDER_PREFIX = "urn:portq:worker:"
#: the record's file name, in the artifact's folder
PROVENANCE_FILE = "provenance.intoto.json"
#: how a signature would name the statement it wraps (a DSSE envelope's payloadType)
PAYLOAD_TYPE = "application/vnd.in-toto+json"
#: Triton's default model file name per platform (the model file's name in a packaged version folder)
TRITON_FILENAMES = {"onnxruntime_onnx": "model.onnx", "pytorch_libtorch": "model.pt"}


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _timestamp(iso: str | None) -> str | None:
    """An ISO time in UTC as RFC 3339 with `Z`, as SLSA's timestamps are written."""
    return iso.replace("+00:00", "Z") if iso else None


def record_path(artifact: ArtifactReport) -> str | None:
    """Where an artifact's provenance record is, relative to the job's result folder (None: no files)."""
    return f"{posixpath.dirname(artifact.path)}/{PROVENANCE_FILE}" if artifact.path else None


def _dependency(ref: SourceRef, role: str, store: Store | None) -> dict[str, Any]:
    dep: dict[str, Any] = {"name": ref.name, "digest": {"sha256": ref.sha256}}
    if store is not None:
        dep["uri"] = store.url(ref.key)
    dep["annotations"] = {"portq_role": role, "size": ref.size}
    return dep


def _dependencies(spec: JobSpec, store: Store | None) -> list[dict[str, Any]]:
    deps = [_dependency(r, "model", store) for r in spec.source.model_files()]
    deps += [_dependency(r, "data", store) for r in spec.source.data_files()]
    if spec.options.sample is not None:
        deps.append(_dependency(spec.options.sample, "sample", store))
    if spec.options.optimize is not None:
        deps += [_dependency(r, "calibration", store) for r in spec.options.optimize.calibration]
    return deps


def _checks(artifact: ArtifactReport, report: JobReport) -> dict[str, Any]:
    """portq's verdicts on the artifact: parity against the source, and its speed."""
    checks: dict[str, Any] = {"artifact": artifact.id, "format": artifact.format.value,
                              "precision": artifact.precision.value if artifact.precision else None,
                              "best": artifact.id == report.best, "job_status": report.status.value}
    p = artifact.parity
    if p is not None:
        checks["parity"] = {"passed": p.passed, "max_abs_err": p.max_abs_err, "max_rel_err": p.max_rel_err,
                            "atol": p.atol, "rtol": p.rtol, "mode": p.mode.value, "samples": p.samples,
                            "device": p.device}
    lat = artifact.latency
    if lat is not None:
        checks["latency"] = {"device": lat.device, "p50_ms": lat.p50_ms, "source_p50_ms": lat.source_p50_ms,
                             "speedup": lat.speedup, "speedup_interval": lat.speedup_interval,
                             "inconclusive": lat.inconclusive}
    return checks


def statement(spec: JobSpec, report: JobReport, artifact: ArtifactReport, folder: Path,
              store: Store | None = None) -> dict[str, Any]:
    """The in-toto Statement for one artifact of a finished job whose files (and report.json) are in `folder`."""
    assert artifact.path is not None
    subjects = [{"name": name, "digest": {"sha256": _sha256_file(folder / name)}}
                for name in [artifact.path, *artifact.data]]
    byproducts = [{"name": name, "digest": {"sha256": _sha256_file(folder / name)}, "mediaType": media}
                  for name, media in (("report.json", "application/json"),
                                      (artifact.reproduce, "text/x-python")) if name and (folder / name).exists()]
    tools = report.toolchain
    host = socket.gethostname()  # written where the job ran: a worker's host, or the embedded default's
    requested = next((a for a in spec.options.artifacts if a.id == artifact.id), None)
    return {
        "_type": STATEMENT_TYPE,
        "subject": subjects,
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {
                    "kind": spec.kind.value, "model": spec.model,
                    "source": spec.source.model_dump(mode="json"),
                    "options": spec.options.model_dump(mode="json"),
                    "artifact": {"id": artifact.id, "format": artifact.format.value, "variant": artifact.variant,
                                 "options": requested.options if requested else {},
                                 "requested_by": artifact.requested_by},
                    "force": spec.force,
                },
                "internalParameters": {"job_key": report.job_key, "worker": report.worker,
                                       "target": report.target.value, "route": artifact.route, "opset": artifact.opset,
                                       "resolved_options": artifact.options},
                "resolvedDependencies": _dependencies(spec, store),
            },
            "runDetails": {
                "builder": {
                    "id": f"{BUILDER_PREFIX}{host}",
                    "version": {"portq": tools.get("portq", "unknown")},
                    "builderDependencies": [{"name": name, "uri": f"pkg:pypi/{name}@{version}"
                                             if name != "python" else f"pkg:generic/python@{version}"}
                                            for name, version in sorted(tools.items())],
                },
                "metadata": {"invocationId": report.job_id, "startedOn": _timestamp(report.started_at),
                             "finishedOn": _timestamp(report.finished_at)},
                "byproducts": byproducts,
            },
            "portq_checks": _checks(artifact, report),
        },
    }


def write_records(spec: JobSpec, report: JobReport, folder: Path, store: Store | None = None) -> list[Path]:
    """Write the provenance record of every artifact that has files, after report.json (whose digest they hold)."""
    written = []
    for artifact in report.artifacts:
        relative = record_path(artifact)
        if relative is None or not (folder / artifact.path).exists():  # type: ignore[operator]
            continue
        path = folder / relative
        path.write_text(json.dumps(statement(spec, report, artifact, folder, store), indent=2) + "\n")
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------- verifying


@dataclass(frozen=True)
class Problem:
    """A file that does not match its provenance record: changed, missing, or a record that cannot be read."""

    file: str  # where the user finds it (a path or URL)
    what: str
    record: str

    def line(self) -> str:
        return f"{self.file}: {self.what} (provenance record {self.record})"


@dataclass
class Verification:
    """What `verify` checked: the records read, the files whose digests matched, and each problem."""

    records: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.records) and not self.problems

    def merge(self, other: Verification) -> Verification:
        self.records += other.records
        self.files += other.files
        self.problems += other.problems
        return self


def read_statement(store: Store, key: str) -> dict[str, Any]:
    """A provenance record, checked for the shape verification relies on (an InputError naming it otherwise)."""
    data = store.read_json(key)
    subjects = data.get("subject") if isinstance(data, dict) else None
    if not (isinstance(data, dict) and data.get("_type") == STATEMENT_TYPE and isinstance(subjects, list) and subjects
            and all(isinstance(s, dict) and isinstance(s.get("name"), str)
                    and isinstance((s.get("digest") or {}).get("sha256"), str) for s in subjects)):
        raise InputError(f"{store.url(key)} is not an in-toto Statement v1 with sha256 subjects",
                         step="verify", file=store.url(key))
    return data


def subject_keys(store: Store, record_key: str, data: dict[str, Any]) -> list[tuple[str, str]]:
    """Each subject's store key and expected digest, found as the module's docstring says."""
    folder = posixpath.dirname(record_key)
    parent = posixpath.dirname(folder)
    config = posixpath.join(parent, "config.pbtxt")
    out = []
    triton = store.exists(config)
    model_file = triton_model_file(store.read_bytes(config).decode(errors="replace")) if triton else None
    for i, subject in enumerate(data["subject"]):
        name = subject["name"]
        if triton:
            key = posixpath.join(folder, model_file if i == 0 and model_file else posixpath.basename(name))
        else:
            key = posixpath.join(parent, name)
        out.append((key, subject["digest"]["sha256"]))
    return out


def triton_model_file(config: str) -> str | None:
    """The model file a Triton config names: its `default_model_filename`, else its platform's default."""
    import re

    named = re.search(r'^\s*default_model_filename\s*:\s*"([^"]+)"', config, re.M)
    if named:
        return named.group(1)
    platform = re.search(r'^\s*platform\s*:\s*"([^"]+)"', config, re.M)
    return TRITON_FILENAMES.get(platform.group(1)) if platform else None


def verify_record(store: Store, record_key: str) -> Verification:
    """Recompute every subject's digest of one record."""
    result = Verification()
    shown = store.url(record_key)
    try:
        data = read_statement(store, record_key)
    except StoreError as e:
        what = "missing" if isinstance(e.__cause__, FileNotFoundError) else f"unreadable: {e.cause}"
        result.problems.append(Problem(shown, what, shown))
        return result
    except InputError as e:
        result.problems.append(Problem(shown, "not a provenance record: " + e.cause, shown))
        return result
    result.records.append(shown)
    for key, expected in subject_keys(store, record_key, data):
        try:
            actual = store.sha256(key)
        except StoreError as e:
            missing = isinstance(e.__cause__, (FileNotFoundError, IsADirectoryError))
            result.problems.append(Problem(store.url(key), "missing" if missing else f"unreadable: {e.cause}",
                                           shown))
            continue
        if actual != expected:
            result.problems.append(Problem(store.url(key), f"changed: sha256 {actual[:16]}..., recorded "
                                                           f"{expected[:16]}...", shown))
        else:
            result.files.append(store.url(key))
    return result


def verify_records(store: Store, record_keys: list[str]) -> Verification:
    result = Verification()
    for key in record_keys:
        result.merge(verify_record(store, key))
    return result


def records_under(store: Store, key: str = "") -> list[str]:
    """Every provenance record under `key` (a result folder, a Triton repository, a whole store)."""
    return [k for k in store.find(key) if posixpath.basename(k) == PROVENANCE_FILE]


def verify_tree(store: Store, key: str = "") -> Verification:
    """Verify every record under `key`; a tree without any is a problem (nothing vouches for its files)."""
    found = records_under(store, key)
    if not found:
        raise InputError(f"no provenance record ({PROVENANCE_FILE}) under {store.url(key)}", step="verify",
                         hint="give a batch id, a result folder, a packaged Triton repository or a record file")
    return verify_records(store, found)


def verify_batch(store: Store, batch: str) -> Verification:
    """Verify the records of every artifact of a batch's jobs; an artifact without one is a problem."""
    require_batch(store, batch)
    result = Verification()
    for record in list_records(store, batch):
        report = read_report(store, record)
        if report is None or record.result is None:
            continue
        for artifact in report.artifacts:
            relative = record_path(artifact)
            if relative is None:
                continue
            key = f"{record.result}/{relative}"
            if not store.exists(key):
                result.problems.append(Problem(store.url(f"{record.result}/{artifact.path}"),
                                               "has no provenance record (made before portq wrote them: submit "
                                               "its model again with --force)", store.url(key)))
                continue
            result.merge(verify_record(store, key))
    if not result.records and not result.problems:
        raise InputError(f"batch {batch!r} has no artifact to verify", step="verify",
                         hint=f"`portq status {batch}`: its jobs may have failed before making any")
    return result


def verify_file(path: Path) -> Verification:
    """A record file, or an artifact file with its record beside it: verify that record (and that it names the
    file)."""
    folder = path.resolve().parent
    store = Store(str(folder.parent))
    if path.name.endswith(".intoto.json"):
        return verify_record(store, f"{folder.name}/{path.name}")
    record = f"{folder.name}/{PROVENANCE_FILE}"
    if not store.exists(record):
        raise InputError(f"{path} has no provenance record beside it ({folder / PROVENANCE_FILE})", step="verify",
                         file=str(path), hint="verify the batch or folder it came from")
    result = verify_record(store, record)
    try:
        named = {key for key, _ in subject_keys(store, record, read_statement(store, record))}
    except (InputError, StoreError):
        return result
    if f"{folder.name}/{path.name}" not in named:
        result.problems.append(Problem(str(path), "is not a subject of its provenance record", store.url(record)))
    return result


__all__ = ["BUILD_TYPE", "PAYLOAD_TYPE", "PREDICATE_TYPE", "PROVENANCE_FILE", "STATEMENT_TYPE", "Problem",
           "Verification", "record_path", "statement", "verify_batch", "verify_file",
           "verify_record", "verify_tree", "write_records"]
