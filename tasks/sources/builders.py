"""Source builders: how each kind of job turns its source description into the model it converts.

The job's process, each isolated step's process and the reproduce scripts all build the source through
the builder of the job's kind, so all three hold the same model. A builder has two halves: `build` loads
the model for portq (with portq's errors), and `script_settings` says what a reproduce script needs to
build it again with the plain-torch code in `script_modules` (each such module has a
`build_source(settings, path)` function).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from portq.tasks.core.contract import JobKind, JobSpec
from portq.tasks.core.registry import Registry
from portq.tasks.sources import dequantize, recipes
from portq.tasks.sources.loading import LoadedModel, LoadRequest, load_model
from portq.tasks.state.store import Store


@dataclass(frozen=True)
class SourceBuilder:
    build: Callable[[JobSpec, Store], LoadedModel]
    # (spec, the model as built, store) -> the reproduce script's SOURCE settings
    script_settings: Callable[[JobSpec, LoadedModel, Store], dict[str, Any]]
    # plain modules a reproduce script carries to rebuild the source; the last defines build_source()
    script_modules: tuple[ModuleType, ...]


SOURCE_BUILDERS: Registry[SourceBuilder] = Registry("job kind")


def build_source(spec: JobSpec, store: Store, device: str = "cpu") -> LoadedModel:
    """The job's source model, built by its kind's builder and moved to `device`."""
    model = SOURCE_BUILDERS.get(spec.kind.value).build(spec, store)
    if device != "cpu" and hasattr(model.module, "to"):
        model.module = model.module.to(device)
    return model


def _build_convert(spec: JobSpec, store: Store) -> LoadedModel:
    source = spec.source
    with store.local_file(source.model.key) as path:
        return load_model(LoadRequest(path=path, display=source.model.name, arch=source.arch,
                                      arch_kwargs=source.arch_kwargs, trust_pickle=source.trust_pickle))


def _convert_script_settings(spec: JobSpec, model: LoadedModel, store: Store) -> dict[str, Any]:
    source = spec.source
    return {"kind": model.kind, "model": store.url(source.model.key), "arch": source.arch,
            "arch_kwargs": source.arch_kwargs}


SOURCE_BUILDERS.add(JobKind.convert.value, SourceBuilder(build=_build_convert,
                                                         script_settings=_convert_script_settings,
                                                         script_modules=(dequantize, recipes)))
