"""Why torch.export.load could not read a .pt2 file, in one actionable message.

torch.export.load hides the cause: `load_pt2` fails, the real error (a SerializeError naming the node) is only
logged (logger "torch.export", `exc_info`), and what is raised is "We ran into an error when deserializing the
saved file. Please check the warnings above for possible errors." `describe_load_failure(path, exc)` (called by
`portq.tasks.sources.loading`) reads the
archive itself (it is a zip: `<name>/models/model.json` holds the graph with `schema_version` {major, minor} and
`torch_version`; `<name>/archive_format` is "pt2", `<name>/archive_version`, `<name>/.data/version` the zip
record format, `<name>/byteorder`) and the real error, and names:
  - the node and operator that failed (a target that does not resolve in this torch: a custom op whose library is
    not loaded, or an aten op/overload this torch does not have),
  - or the serialization schema mismatch,
  - the torch version that saved the file and the one reading it,
  - and the fix: re-export with this torch, or submit the module as TorchScript (torch.jit.save) or as a state
    dict with --arch.
Older (torch <= 2.7) zips with `version` + `serialized_exported_program.json` are read too.

Nothing in the archive is unpickled or executed (the zip's JSON is read as text).
"""

from __future__ import annotations

import json
import logging
import re
import zipfile
from dataclasses import dataclass
from typing import Any

_RESOLVE = re.compile(r"failed to resolve (\S+) to an operator")
_SCHEMA = re.compile(r"schema version SchemaVersion\(major=(\d+), minor=(\d+)\) does not match our current "
                     r"schema version \((\d+), (\d+)\)")
_NODE = re.compile(r"Failed deserializing node Node\(target='([^']+)'")

FIX = ("re-export it with torch {this} (torch.export.export, then torch.export.save), or submit the model as "
       "TorchScript (torch.jit.save) or as a state dict with --arch")


def _read_archive(path: str) -> dict[str, Any]:
    """Facts from the zip: versions, and the serialized program (None when absent or unreadable)."""
    facts: dict[str, Any] = {"program": None, "torch_version": None, "schema_version": None}
    with zipfile.ZipFile(path) as z:
        names = z.namelist()

        def read(suffix: str) -> str | None:
            hit = next((n for n in names if n == suffix or n.endswith("/" + suffix)), None)
            return z.read(hit).decode(errors="replace").strip() if hit else None

        facts["archive_format"] = read("archive_format")
        facts["archive_version"] = read("archive_version")
        facts["data_version"] = read(".data/version")
        models = sorted(n for n in names if re.search(r"(^|/)models/[^/]+\.json$", n))
        legacy = next((n for n in names if n.endswith("serialized_exported_program.json")), None)
        facts["legacy"] = legacy is not None and not models
        blob = z.read(models[0]) if models else (z.read(legacy) if legacy else None)
        if facts["legacy"]:
            facts["schema_version"] = read("version")
    if blob is not None:
        try:
            program = json.loads(blob)
        except ValueError:
            program = None
        if isinstance(program, dict):
            facts["program"] = program
            facts["torch_version"] = program.get("torch_version")
            sv = program.get("schema_version")
            if isinstance(sv, dict):
                facts["schema_version"] = f"{sv.get('major')}.{sv.get('minor')}"
    return facts


def _nodes(obj: Any) -> Any:
    """Every serialized node, nested graphs (higher-order ops' subgraphs) included."""
    if isinstance(obj, dict):
        if isinstance(obj.get("target"), str) and "inputs" in obj and "outputs" in obj:
            yield obj
        for v in obj.values():
            yield from _nodes(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _nodes(v)


def resolves(target: str) -> bool:
    """Whether a serialized target ("torch.ops.aten.linear.default") names an operator this torch has."""
    import torch

    if not target.startswith("torch.ops."):
        return True  # python callables (operator.getitem, torch.sym_*): not the usual culprit
    parts = target.split(".")[2:]
    if len(parts) != 3:
        return False
    ns, op, overload = parts
    try:
        packet = getattr(getattr(torch.ops, ns), op)
        getattr(packet, overload)
        return True
    except (AttributeError, RuntimeError):
        return False


def unresolved_nodes(program: dict[str, Any]) -> list[tuple[str, str]]:
    """[(node name, target)] for serialized nodes whose operator does not resolve here."""
    out = []
    for node in _nodes(program):
        if not resolves(node["target"]):
            name = node.get("name")
            if not name:
                outs = node.get("outputs") or [{}]
                arg = outs[0].get("as_tensor") or {}
                name = arg.get("name", "?")
            out.append((str(name), node["target"]))
    return out


def _real_error(path: str, exc: BaseException, logged: str = "") -> str:
    """The text of the error behind torch.export.load's generic message: `logged` (what the load logged, with
    tracebacks), else the load is run again to catch the logged SerializeError when `exc` does not carry it."""
    parts: list[str] = []
    cur: BaseException | None = exc
    while cur is not None and len(parts) < 6:
        parts.append(str(cur))
        cur = cur.__cause__ or cur.__context__
    text = "\n".join(parts)
    if "check the warnings above" not in text:
        return text
    if logged:
        return f"{text}\n{logged}"
    import torch

    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect()
    logger = logging.getLogger("torch.export")
    logger.addHandler(handler)
    try:
        torch.export.load(path)
    except Exception:  # noqa: BLE001
        pass
    finally:
        logger.removeHandler(handler)
    for r in records:
        if r.exc_info and r.exc_info[1] is not None:
            inner: BaseException | None = r.exc_info[1]
            while inner is not None and len(parts) < 12:
                parts.append(str(inner))
                inner = inner.__cause__ or inner.__context__
    return "\n".join(parts)


@dataclass(frozen=True)
class LoadFailure:
    """What stopped torch.export.load (`cause`) and what to do about it (`hint`)."""

    cause: str
    hint: str


def describe_load_failure(path: str, exc: BaseException, logged: str = "") -> LoadFailure:
    """What failed (node + operator, or schema), which torch saved the file, and what to do. `logged`: what
    torch.export.load logged while failing (its real error), when the caller collected it."""
    import torch

    this = torch.__version__.split("+")[0]
    try:
        facts = _read_archive(path)
    except (zipfile.BadZipFile, OSError, KeyError) as e:
        return LoadFailure(f"cannot load the ExportedProgram: not a readable .pt2 archive ({e})",
                           "re-save it with torch.export.save")
    saved = facts.get("torch_version")
    saved_txt = f"saved with torch {saved}" if saved else "saved by a torch that did not record its version"
    try:
        from torch._export.serde.schema import SCHEMA_VERSION

        ours = f"{SCHEMA_VERSION[0]}.{SCHEMA_VERSION[1]}"
    except ImportError:  # pragma: no cover
        ours = "?"
    where = (f"{saved_txt}, serialization schema {facts.get('schema_version') or '?'}; this worker runs torch "
             f"{this} (schema {ours})")
    fix = FIX.format(this=this)
    text = _real_error(path, exc, logged)

    if facts.get("program") is None and not facts.get("legacy"):
        return LoadFailure(f"cannot load the ExportedProgram: the archive holds no serialized program "
                           f"(models/*.json missing or not JSON) ({where})", fix)

    m = _SCHEMA.search(text)
    if m or (facts.get("schema_version") and ours != "?" and
             str(facts["schema_version"]).split(".")[0] != ours.split(".")[0]):
        file_schema = f"{m[1]}.{m[2]}" if m else facts["schema_version"]
        newer = int(file_schema.split(".")[0]) > int(ours.split(".")[0])
        return LoadFailure(f"cannot load the ExportedProgram: it uses serialization schema {file_schema}, which this "
                           f"torch ({this}, schema {ours}) cannot read: the file comes from a "
                           f"{'newer' if newer else 'older'} torch ({saved or 'version not recorded'})", fix)

    bad = unresolved_nodes(facts["program"]) if facts.get("program") else []
    named = _RESOLVE.search(text) or _NODE.search(text)
    if named and not any(t == named[1] for _, t in bad):
        bad.insert(0, ("?", named[1]))
    if bad:
        node, target = bad[0]
        parts = target.split(".")
        ns = parts[2] if len(parts) > 2 else "?"
        same = sum(1 for _, t in bad[1:] if t == target)
        others = sorted({t for _, t in bad if t != target})
        more = "".join([f" (and {same} more node(s) calling it)" if same else "",
                        f" (other unknown operators: {', '.join(others[:3])})" if others else ""])
        if ns in ("aten", "prims", "quantized", "_quant"):
            same_torch = bool(saved) and str(saved).split("+")[0] == this
            what = (f"node '{node}' calls {target}, an operator (or overload) this torch does not have: " +
                    ("the file was edited, or made by a torch build with extra operators" if same_torch else
                     "the file was made by a different torch"))
        else:
            what = (f"node '{node}' calls custom operator {target} (namespace '{ns}'), which is not registered "
                    "here: the library that defines it is not loaded, and portq does not import it")
            fix = ("re-export without the custom op (its reference implementation), or submit the model as "
                   "TorchScript (torch.jit.save) or as a state dict with --arch")
        return LoadFailure(f"cannot load the ExportedProgram: {what}{more}; {where}", fix)

    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
    return LoadFailure(f"cannot load the ExportedProgram: {first[:300]} ({where})", fix)
