"""Source builders: how each kind of job turns its source description into the model it converts.

The job's process, each isolated step's process and the reproduce scripts all build the source through
the builder of the job's kind, so all three hold the same model. A builder has two halves: `build` loads
the model for portq (with portq's errors), and `script_settings` says what a reproduce script needs to
build it again with the plain-torch code in `script_modules` (the last such module has a
`build_source(settings, path)` function). A kind may add its own sections to the job report (`annotate`,
called once the source's evidence is in, where the source was built: it returns the report's fields by name).

`convert` is registered here; a kind whose builder lives in its own module (`fuse`: `portq.tasks.fusion`;
`huggingface`: `portq.tasks.sources.huggingface`) registers when `builder_for` first looks it up, so loading this
module imports neither torch nor that module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from portq.tasks.core.contract import ConvertSource, JobKind, JobSpec
from portq.tasks.core.registry import Registry
from portq.tasks.sources import dequantize, recipes
from portq.tasks.sources.loading import LoadedModel, LoadRequest, load_model
from portq.tasks.state.store import Store


@dataclass(frozen=True)
class SourceBuilder:
    build: Callable[[JobSpec, Store], LoadedModel]
    # (spec, the model as built, store) -> the reproduce script's SOURCE settings
    script_settings: Callable[[JobSpec, LoadedModel, Store], dict[str, Any]]
    # the plain modules a reproduce script carries to rebuild the source; the last defines build_source()
    # (a function, so that a kind whose modules import torch is not imported with this registry)
    script_modules: Callable[[], tuple[ModuleType, ...]]
    # (spec, model, the source's evidence) -> the kind's own sections of the job report, by field name (picklable)
    annotate: Callable[[JobSpec, LoadedModel, Any], dict[str, Any]] | None = None


SOURCE_BUILDERS: Registry[SourceBuilder] = Registry("job kind")

#: kinds whose builders register themselves in their own module, imported on first use
_KIND_MODULES = {"fuse": "portq.tasks.fusion.builder", "huggingface": "portq.tasks.sources.huggingface"}


def builder_for(kind: str) -> SourceBuilder:
    """The source builder of a job kind (an unknown kind fails with the known ones)."""
    if kind not in SOURCE_BUILDERS and kind in _KIND_MODULES:
        import importlib

        importlib.import_module(_KIND_MODULES[kind])
    return SOURCE_BUILDERS.get(kind)


def build_source(spec: JobSpec, store: Store, device: str = "cpu") -> LoadedModel:
    """The job's source model, built by its kind's builder and moved to `device`."""
    model = builder_for(spec.kind.value).build(spec, store)
    if device != "cpu" and hasattr(model.module, "to"):
        model.module = model.module.to(device)
        if model.script is not None and model.script is not model.module:
            model.script = model.script.to(device)
    return model


def _build_convert(spec: JobSpec, store: Store) -> LoadedModel:
    source = spec.source
    assert isinstance(source, ConvertSource)
    with store.local_file(source.model.key) as path:
        return load_model(LoadRequest(path=path, display=source.model.name, arch=source.arch,
                                      arch_kwargs=source.arch_kwargs, trust_pickle=source.trust_pickle))


def _convert_script_settings(spec: JobSpec, model: LoadedModel, store: Store) -> dict[str, Any]:
    source = spec.source
    assert isinstance(source, ConvertSource)
    return {"kind": model.kind, "model": store.url(source.model.key), "arch": source.arch,
            "arch_kwargs": source.arch_kwargs}


SOURCE_BUILDERS.add(JobKind.convert.value, SourceBuilder(build=_build_convert,
                                                         script_settings=_convert_script_settings,
                                                         script_modules=lambda: (dequantize, recipes)))
