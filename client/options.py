"""Command-line options built from the request models (`portq.tasks.core.requests`), so that an option is defined
once: `takes(ConvertRequest)` gives a command one `typer.Option` per request field (its flags, help text and
default read from the field) and hands the command the validated request. The settings' options (`--broker`,
`--store`) are declared here, once, for every command.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable
from enum import Enum
from typing import Annotated, Any

import typer
from portq.tasks.core.requests import Options, flag_of
from portq.tasks.core.settings import Settings

BrokerOpt = Annotated[
    str | None,
    typer.Option("--broker", envvar="PORTQ_BROKER_URL", show_envvar=True,
                 help="Redis URL of the queue (redis://host:6379/0, rediss:// for TLS). Unset: run jobs locally."),
]
#: `--broker` on the commands that act on a queue (there is no "run locally" for them)
QueueBrokerOpt = Annotated[
    str | None,
    typer.Option("--broker", envvar="PORTQ_BROKER_URL", show_envvar=True,
                 help="Redis URL of the queue to act on (redis://host:6379/0, rediss:// for TLS)."),
]
#: `--json` on every command that reports: one JSON document on stdout, nothing else there
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as one JSON document on stdout.")]
StoreOpt = Annotated[
    str | None,
    typer.Option("--store", envvar="PORTQ_STORE", show_envvar=True, show_default="./portq-store",
                 help="Shared storage for models, artifacts and reports: a directory or an fsspec URL."),
]


def resolve(broker: str | None = None, store: str | None = None, **flags: object) -> Settings:
    return Settings.resolve(broker_url=broker, store=store, **flags)


def _shown(value: Any) -> bool | str:
    """What help shows as a field's default: False for nothing worth saying (None, empty, a switch's False)."""
    if value is None or value == [] or value == {} or value is False:
        return False
    if isinstance(value, list):
        return ", ".join(str(getattr(v, "value", v)) for v in value)
    return True


def parameters(model: type[Options], skip: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """One keyword parameter per field of `model`: `Annotated[type, typer.Option(...)]` with the field's default
    (None for a list or a dict, which the request fills in)."""
    params = []
    first = [n for n, info in model.model_fields.items() if info.is_required()]  # required options first
    for name in [*first, *(n for n in model.model_fields if n not in first)]:
        if name in skip:
            continue
        info, meta = model.model_fields[name], flag_of(model, name)
        annotation = meta.text if meta.text is not None else info.annotation
        if typing.get_origin(annotation) is typing.Literal or _literal_in(annotation):
            annotation = str | None
        required = info.is_required()
        default = ... if required else info.default
        cli_default = None if isinstance(default, (list, dict)) else default
        if isinstance(meta.text, type) and issubclass(meta.text, Enum) and cli_default is not None:
            cli_default = meta.text(getattr(cli_default, "value", cli_default))  # the command line's own enum
        shown: bool | str = meta.shown_default or (False if required else _shown(default))
        # Rich reads help as markup: a literal '[d0,d1]' or '[default: ...]' would vanish
        option = typer.Option(*meta.decls, help=(info.description or "").replace("[", r"\["), show_default=shown)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[annotation, option],
                                        default=inspect.Parameter.empty if required else cli_default))
    return params


def _literal_in(annotation: Any) -> bool:
    return isinstance(annotation, types.UnionType) and any(typing.get_origin(a) is typing.Literal
                                                           for a in typing.get_args(annotation))


def takes(model: type[Options], step: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command the options of `model`: the command declares its own parameters (arguments, --broker,
    --store...) and one named `request`, which receives the validated request (its `model_fields_set` being the
    options the user gave)."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        own = [p for p in inspect.signature(command).parameters.values() if p.name != "request"]
        hints = typing.get_type_hints(command, include_extras=True)
        own = [p.replace(annotation=hints.get(p.name, p.annotation), kind=inspect.Parameter.KEYWORD_ONLY)
               for p in own]
        generated = parameters(model, skip=tuple(p.name for p in own))
        defaults = {p.name: p.default for p in generated}

        @functools.wraps(command)
        def run(**values: Any) -> Any:
            given: dict[str, Any] = {}
            for name, default in defaults.items():
                value = values.pop(name)
                if value is None or value == default:
                    continue  # not given: the request's own default
                meta = flag_of(model, name)
                given[name] = meta.parse(value, step) if meta.parse is not None else value
            return command(request=model.build(step=step, **given), **values)

        del run.__wrapped__  # typer must read the signature below, not the command's
        settings = [p for p in own if p.name in ("broker", "store")]  # after the request's options
        params = [*(p for p in own if p not in settings), *generated, *settings]
        run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in params}
        return run

    return decorate
