"""Nightly manifests: which models a nightly batch converts, with which options, under which batch name.

A manifest is a YAML file validated against the models below. Every problem names the file, the line and
the key (`[step manifest, file nightly.yaml] line 7, groups[0].formats[1]: ...`):

    series: vision                # the series its nights form; default: the manifest's file name, less suffix
    batch: "{series}-{date}"      # placeholders {series}, {date} (YYYY-MM-DD) and {time} (HHMMSS), local time
    defaults:                     # options every group starts from
      targets: [cpu]
      latency: {runs: 30}
    groups:
      - name: vision              # names the group in messages (default: groups[i])
        models: ["vision/*.pt2"]  # globs, relative to the manifest; ** recurses
        formats: [onnx, pt2]
        tolerance: {atol: 1.0e-3}
      - models: [text/bert.safetensors]     # a group of one model: that model's own options
        arch: mypkg.models:Bert
        inputs: ["ids:int64[batch=2,16]{0,30000}"]
        dynamic: [batch]
      - models: [hf/*]            # Hugging Face model folders (a folder with config.json) match as models too
        sequence_length: 32

A group's options are the defaults with the group's keys laid over them: `tolerance`, `parity`, `latency` and
`format_options` merge key by key, lists replace. Each target in `targets` gives every model of the group a job.
This module is torch-free (the client reads manifests); it checks what it can without the format registry,
and `portq.tasks.execution.night` resolves the artifact ids against it.
"""

from __future__ import annotations

import glob
import hashlib
import os
import string
import typing
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from portq.tasks.core.contract import (
    SAFE_ID,
    SIDECAR_SUFFIX,
    ArtifactRequest,
    Format,
    InputSpec,
    LatencyOptions,
    ParityOptions,
    Precision,
    Target,
    Tolerance,
    model_name,
    safe_name,
)
from portq.tasks.core.errors import ConfigError
from portq.tasks.core.requests import HF_LOAD_FIELDS, ConvertRequest, JobRequest, description
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MANIFEST_STEP = "manifest"
BATCH_PLACEHOLDERS = ("series", "date", "time")
#: keys that later versions will give a meaning; today they are refused with this reason
RESERVED: dict[str, str] = {}

Loc = tuple[str | int, ...]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _described(name: str, request: type[JobRequest] = JobRequest, **constraints: Any) -> Any:
    """A manifest key named after a request option: no value unless set, described as that option is (the
    request models are the one definition of an option's meaning and default)."""
    return Field(None, description=description(request, name), **constraints)


class GroupOptions(_Strict):
    """The job options a manifest can set, for all groups (`defaults`) or for one group: the request options
    (`portq.tasks.core.requests.JobRequest`) under the same names, with `targets` for `target` and `tolerance`,
    `parity` and `latency` as the job contract's nested options. Unset, each takes the request's default."""

    targets: list[Target] | None = Field(None, min_length=1, description="one job per model and target; each: "
                                         + description(JobRequest, "target"))
    formats: list[str] | None = _described("formats", min_length=1)
    format_options: dict[Format, dict[str, Any]] | None = Field(
        None, description="each format's options, e.g. {onnx: {opset: 17}}, for variants that do not fix them")
    inputs: list[str] | None = _described("inputs")
    dynamic: list[str] | None = _described("dynamic")
    tolerance: Tolerance | None = None
    optimize: list[str] | None = _described("optimize", min_length=1)
    precision: list[Precision] | None = _described("precision")
    parity: ParityOptions | None = None
    latency: LatencyOptions | None = None
    arch: str | None = _described("arch")
    arch_kwargs: dict[str, Any] | None = _described("arch_kwargs")
    trust_pickle: bool | None = _described("trust_pickle")
    task: str | None = _described("task", ConvertRequest)
    trust_remote_code: bool | None = _described("trust_remote_code", ConvertRequest)
    sequence_length: int | None = _described("sequence_length", ConvertRequest, ge=1)
    batch_size: int | None = _described("batch_size", ConvertRequest, ge=1)

    @field_validator("formats")
    @classmethod
    def _artifact_ids(cls, v: list[str] | None) -> list[str] | None:
        for text in v or []:
            ArtifactRequest.parse(text)  # the syntax here; variants against the registry at submit
        return v

    @field_validator("inputs")
    @classmethod
    def _input_specs(cls, v: list[str] | None) -> list[str] | None:
        for text in v or []:
            InputSpec.parse(text)
        return v


class Group(GroupOptions):
    name: str | None = Field(None, description="names the group in messages")
    models: list[str] = Field(min_length=1, description="globs relative to the manifest's folder")


class Manifest(_Strict):
    version: typing.Literal[1] = 1
    series: str | None = Field(None, description="default: the manifest's file name without its suffix")
    batch: str = Field("{series}-{date}", description="the batch name template")
    defaults: GroupOptions = Field(default_factory=GroupOptions)
    groups: list[Group] = Field(min_length=1)

    @field_validator("series")
    @classmethod
    def _series_is_an_id(cls, v: str | None) -> str | None:
        if v is not None and not SAFE_ID.match(v):
            raise ValueError(f"{v!r} is not a valid series name (letters, digits, '.', '_', '-')")
        return v

    @field_validator("batch")
    @classmethod
    def _template(cls, v: str) -> str:
        try:
            names = {f for _, f, _, _ in string.Formatter().parse(v) if f is not None}
        except ValueError as e:
            raise ValueError(f"{v!r} is not a batch name template: {e}") from None
        unknown = names - set(BATCH_PLACEHOLDERS)
        if unknown:
            raise ValueError(f"unknown placeholder {{{sorted(unknown)[0]}}} in {v!r}; known: "
                             + ", ".join(f"{{{p}}}" for p in BATCH_PLACEHOLDERS))
        example = render_batch_name(v, "series", datetime(2000, 1, 1))
        if not SAFE_ID.match(example):
            raise ValueError(f"{v!r} does not make a valid batch name (letters, digits, '.', '_', '-'), e.g. "
                             f"{example!r}")
        return v


def render_batch_name(template: str, series: str, now: datetime) -> str:
    """`{series}-{date}` -> `vision-2026-03-14`."""
    return template.format(series=series, date=now.strftime("%Y-%m-%d"), time=now.strftime("%H%M%S"))


# --------------------------------------------------------------------------------------- YAML with lines


def _dotted(loc: Loc) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


@dataclass
class _Document:
    """The manifest's data, and the line of every key and list item in it (1-based)."""

    data: Any
    lines: dict[Loc, int]

    def line(self, loc: Loc) -> int:
        for end in range(len(loc), -1, -1):
            if loc[:end] in self.lines:
                return self.lines[loc[:end]]
        return 1


def _read_yaml(text: str, file: str) -> _Document:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{where}not valid YAML: {problem}", step=MANIFEST_STEP, file=file) from None
    if root is None:
        raise ConfigError("the manifest is empty", step=MANIFEST_STEP, file=file,
                          hint="it needs at least `groups: [{models: [\"*.pt\"]}]`")
    scalars = yaml.SafeLoader("")
    lines: dict[Loc, int] = {(): root.start_mark.line + 1}

    def entries(node: yaml.MappingNode) -> list[tuple[yaml.Node, yaml.Node]]:
        # explicit keys first, then those merged in with `<<: *anchor` that the mapping does not set itself
        own = [(k, v) for k, v in node.value if k.tag != "tag:yaml.org,2002:merge"]
        merged: list[tuple[yaml.Node, yaml.Node]] = []
        for k, v in node.value:
            if k.tag == "tag:yaml.org,2002:merge":
                for source in (v.value if isinstance(v, yaml.SequenceNode) else [v]):
                    if isinstance(source, yaml.MappingNode):
                        merged += entries(source)
        keys = {k.value for k, _ in own}
        return own + [(k, v) for k, v in merged if k.value not in keys]

    def walk(node: yaml.Node, loc: Loc, depth: int) -> Any:
        if depth > 50:
            raise ConfigError(f"line {node.start_mark.line + 1}, {_dotted(loc)}: nested too deeply (a recursive "
                              "alias?)", step=MANIFEST_STEP, file=file)
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for k, v in entries(node):
                if not isinstance(k, yaml.ScalarNode):
                    raise ConfigError(f"line {k.start_mark.line + 1}, {_dotted(loc)}: a key must be a plain value",
                                      step=MANIFEST_STEP, file=file)
                key = scalars.construct_object(k)
                if key in out:
                    raise ConfigError(f"line {k.start_mark.line + 1}, {_dotted((*loc, key))}: given twice (first on "
                                      f"line {lines[(*loc, key)]})", step=MANIFEST_STEP, file=file)
                lines[(*loc, key)] = k.start_mark.line + 1
                out[key] = walk(v, (*loc, key), depth + 1)
            return out
        if isinstance(node, yaml.SequenceNode):
            items = []
            for i, item in enumerate(node.value):
                lines[(*loc, i)] = item.start_mark.line + 1
                items.append(walk(item, (*loc, i), depth + 1))
            return items
        return scalars.construct_object(node)

    return _Document(walk(root, (), 0), lines)


def _model_at(model: type[BaseModel], loc: Loc) -> type[BaseModel] | None:
    """The pydantic model that validates the mapping at `loc` (to list its keys), if there is one."""
    current: type[BaseModel] | None = model
    skip_key = False
    for part in loc:
        if current is None:
            return None
        if isinstance(part, int):
            continue
        if skip_key:  # a key of a dict field, e.g. tolerance.outputs.<name>
            skip_key = False
            continue
        info = current.model_fields.get(str(part))
        if info is None:
            return None
        current, skip_key = _inner_model(info.annotation)
    return current


def _inner_model(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """The model inside an annotation such as `list[Group]`, `Tolerance | None` or `dict[str, X]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    is_dict = typing.get_origin(annotation) is dict
    for arg in typing.get_args(annotation)[1:] if is_dict else typing.get_args(annotation):
        found, _ = _inner_model(arg)
        if found is not None:
            return found, is_dict
    return None, False


def _problem(err: Any, doc: _Document) -> str:
    loc: Loc = tuple(err["loc"])
    message = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        key = loc[-1]
        if key in RESERVED:
            message = f"{key!r} is reserved: {RESERVED[str(key)]}"
        else:
            owner = _model_at(Manifest, loc[:-1])
            known = ", ".join(owner.model_fields) if owner is not None else ""
            message = f"unknown key {key!r}" + (f" (known keys here: {known})" if known else "")
    elif err["type"] == "missing":
        message = f"{loc[-1]!r} is required here" if loc else message
    return f"line {doc.line(loc)}, {_dotted(loc)}: {message}"


# ------------------------------------------------------------------------------------------- the plan


@dataclass
class PlannedGroup:
    """One group with its options resolved (defaults laid under it) and its globs expanded."""

    label: str
    index: int
    paths: list[Path]
    targets: list[Target]
    formats: list[str]
    format_options: dict[str, dict[str, Any]]
    options: dict[str, Any] = field(default_factory=dict)  # JobOptions fields but target and artifacts
    load: dict[str, Any] = field(default_factory=dict)  # ConvertSource and HuggingFaceSource fields


@dataclass
class ManifestPlan:
    """What one night of the manifest submits: its series, its batch name template and its groups."""

    path: Path
    sha256: str
    series: str
    batch_template: str
    groups: list[PlannedGroup]
    warnings: list[str]
    _doc: _Document

    def batch_name(self, now: datetime | None = None) -> str:
        return render_batch_name(self.batch_template, self.series, now or datetime.now())

    def error(self, group: PlannedGroup, key: str, cause: str, hint: str | None = None) -> ConfigError:
        """A problem with a group's option found after parsing (e.g. an unknown variant): file, line and key."""
        loc: Loc = ("groups", group.index, key)
        if loc not in self._doc.lines and ("defaults", key) in self._doc.lines:
            loc = ("defaults", key)
        return ConfigError(f"line {self._doc.line(loc)}, {_dotted(loc)}: {cause}", step=MANIFEST_STEP,
                           file=str(self.path), hint=hint)


_MERGED = ("tolerance", "parity", "latency")
#: a group's options where neither it nor `defaults` sets them: the request's own defaults
_DEFAULT = JobRequest()


def _merge(defaults: GroupOptions, group: Group) -> dict[str, Any]:
    base = defaults.model_dump(exclude_unset=True, exclude_none=True)
    own = group.model_dump(exclude_unset=True, exclude_none=True, exclude={"name", "models"})
    merged = {**base, **own}
    for key in _MERGED:
        if key in base and key in own:
            merged[key] = {**base[key], **own[key]}
    if "format_options" in base and "format_options" in own:
        merged["format_options"] = {f: {**base["format_options"].get(f, {}), **own["format_options"].get(f, {})}
                                    for f in {*base["format_options"], *own["format_options"]}}
    return merged


def _options(merged: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Merged group keys -> (JobOptions fields but target and artifacts, ConvertSource fields)."""
    options: dict[str, Any] = {}
    if "inputs" in merged:
        options["inputs"] = [InputSpec.parse(t).model_dump() for t in merged["inputs"]]
    for key in ("dynamic", "parity", "latency"):
        if key in merged:
            options[key] = merged[key]
    tolerance = dict(merged.get("tolerance", {}))
    if tolerance:
        options["tolerance"] = tolerance
    if "optimize" in merged or "precision" in merged:
        options["optimize"] = {"candidates": merged.get("optimize") or ["auto"],  # as `--precision` alone
                               "precisions": merged.get("precision") or []}
    load: dict[str, Any] = {k: merged[k] for k in ("arch", "arch_kwargs", "trust_pickle", *HF_LOAD_FIELDS)
                            if k in merged}
    return options, load


def load_manifest(path: str | os.PathLike[str]) -> ManifestPlan:
    """Read and validate a manifest, expand its globs and check its model names. Raises ConfigError."""
    path = Path(path)
    file = str(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read the manifest: {e.strerror or e}", step=MANIFEST_STEP, file=file) from None
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise ConfigError("the manifest is not UTF-8 text", step=MANIFEST_STEP, file=file) from None
    doc = _read_yaml(text, file)
    if not isinstance(doc.data, dict):
        raise ConfigError("line 1: the manifest must be a mapping with a `groups` list", step=MANIFEST_STEP,
                          file=file)
    try:
        manifest = Manifest.model_validate(doc.data)
    except ValidationError as e:
        problems = [_problem(err, doc) for err in e.errors()]
        cause = problems[0] if len(problems) == 1 else f"{len(problems)} problems:" + "".join(
            f"\n  {p}" for p in problems)
        raise ConfigError(cause, step=MANIFEST_STEP, file=file) from None
    return _plan(manifest, path, hashlib.sha256(raw).hexdigest(), doc)


def _plan(manifest: Manifest, path: Path, sha256: str, doc: _Document) -> ManifestPlan:
    base = path.resolve().parent
    series = manifest.series or safe_name(path.stem, fallback="nightly")
    warnings: list[str] = []
    groups: list[PlannedGroup] = []
    seen: dict[str, tuple[str, Path]] = {}  # model name -> (group label, path)
    for i, group in enumerate(manifest.groups):
        label = f"{group.name or f'groups[{i}]'} (line {doc.line(('groups', i))})"
        paths: list[Path] = []
        for j, pattern in enumerate(group.models):
            matches = sorted({os.path.normpath(m) for m in glob.glob(os.path.join(glob.escape(str(base)), pattern),
                                                                     recursive=True)
                              if (os.path.isfile(m) and not m.endswith(SIDECAR_SUFFIX))
                              or os.path.isfile(os.path.join(m, "config.json"))})  # a Hugging Face model folder
            if not matches:
                warnings.append(f"{path}, line {doc.line(('groups', i, 'models', j))}: glob {pattern!r} of group "
                                f"{group.name or f'groups[{i}]'} matches no model file (in {base})")
            for m in matches:
                p = Path(m)
                if p in paths:
                    continue  # two globs of one group may match one file
                name = model_name(m)
                if name in seen:
                    other, other_path = seen[name]
                    where = f"group {label}" if other == label else f"groups {other} and {label}"
                    if other_path == p:
                        raise ConfigError(f"{p} (model {name!r}) is in two {where}", step=MANIFEST_STEP,
                                          file=str(path), hint="a model belongs to one group; a group's `targets` "
                                                               "gives it one job per target")
                    raise ConfigError(f"model name {name!r} comes twice, from {where}: {other_path} and {p}",
                                      step=MANIFEST_STEP, file=str(path),
                                      hint="a model name (the file's stem) must be unique in a manifest, or nights "
                                           "cannot be compared; rename one file or drop it from a glob")
                seen[name] = (label, p)
                paths.append(p)
        merged = _merge(manifest.defaults, group)
        options, load = _options(merged)
        groups.append(PlannedGroup(
            label=label, index=i, paths=paths, targets=merged.get("targets", [_DEFAULT.target]),
            formats=merged.get("formats", list(_DEFAULT.formats)),
            format_options={Format(k).value: v for k, v in merged.get("format_options", {}).items()},
            options=options, load=load))
    if not seen:
        raise ConfigError("no glob matched a model file", step=MANIFEST_STEP, file=str(path),
                          hint="globs are relative to the manifest's folder; " + "; ".join(warnings))
    return ManifestPlan(path=path, sha256=sha256, series=series, batch_template=manifest.batch, groups=groups,
                        warnings=warnings, _doc=doc)
