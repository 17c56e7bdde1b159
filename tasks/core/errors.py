"""portq's exception hierarchy: every error a user sees names the step, the file and the cause.

The job runner (`portq.tasks.execution.run.run_job`) is the one boundary that turns these into a failed job record; the
CLI is the one boundary that turns them into `[error] ...` and an exit code.
"""

from __future__ import annotations

from typing import Any


def first_line(e: BaseException, limit: int = 400) -> str:
    """The first line of an exception's text (torch's messages run to pages), or its type name."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:limit]


class PortqError(Exception):
    """Base class: an error a user can act on.

    `step` is what portq was doing (load, inputs, export:onnx, parity:onnx, ...), `file` the file it was
    doing it to, `cause` what went wrong and `hint` what to try.
    """

    kind = "error"

    def __init__(self, cause: str, *, step: str | None = None, file: str | None = None, hint: str | None = None):
        self.cause = cause
        self.step = step
        self.file = file
        self.hint = hint
        super().__init__(self.message)

    @property
    def message(self) -> str:
        where = []
        if self.step:
            where.append(f"step {self.step}")
        if self.file:
            where.append(f"file {self.file}")
        head = f"[{', '.join(where)}] " if where else ""
        tail = f" ({self.hint})" if self.hint else ""
        return f"{head}{self.cause}{tail}"

    def at(self, *, step: str | None = None, file: str | None = None) -> PortqError:
        """Fill in step/file where the raiser did not know them."""
        self.step = self.step or step
        self.file = self.file or file
        self.args = (self.message,)
        return self

    def to_dict(self) -> dict[str, str | None]:
        return {"kind": self.kind, "step": self.step, "file": self.file, "cause": self.cause, "hint": self.hint}

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled whole (class, cause, step, file, hint): a step process sends its errors to the job this way."""
        return (_rebuilt, (type(self), self.cause, self.step, self.file, self.hint))


def _rebuilt(cls: type[PortqError], cause: str, step: str | None, file: str | None, hint: str | None) -> PortqError:
    return cls(cause, step=step, file=file, hint=hint)


class ConfigError(PortqError):
    """Settings or command-line options that cannot work."""

    kind = "config"


class UsageError(ConfigError):
    """A command's arguments name something that is not there or cannot be used so (an unknown batch, a batch
    compared with itself); the CLI exits with 2, as for bad options."""

    kind = "usage"


class InputError(PortqError):
    """The submitted file or its example inputs cannot be used (missing, unreadable, wrong shape...)."""

    kind = "input"


class OlderVersionError(InputError):
    """Stored data (a spec, a report) of another schema version than this portq reads."""

    kind = "version"


class ModelLoadError(InputError):
    """The model file is not a model portq can load."""

    kind = "load"


class UnsafeModelError(ModelLoadError):
    """Loading the file would execute code from it (a pickle) and the submission did not allow that."""

    kind = "unsafe"


class ConversionError(PortqError):
    """Every route to produce one format failed."""

    kind = "conversion"


class DeviceUnavailableError(PortqError):
    """The target device is not usable by this worker (no CUDA device, no CUDA execution provider)."""

    kind = "device"


class StoreError(PortqError):
    """Reading or writing the shared store failed. Transient by nature: the queue retries these."""

    kind = "store"

    def transient(self, step: str) -> TransientError:
        """This failure as the queue's retryable one, at `step` (store, publish): cause and hint kept.

        The one way a job turns storage trouble into a retry: `raise e.transient("store") from e`."""
        return TransientError(self.cause, step=step, hint=self.hint)


class TransientError(PortqError):
    """A failure worth retrying (broker or storage hiccup). The worker retries with backoff."""

    kind = "transient"


class IsolatedStepCrash(PortqError):
    """A step run in a child process died (signal, exit code, time limit, memory)."""

    kind = "crash"


class WaitTimeout(PortqError):
    """Following a batch gave up after its timeout; the jobs themselves carry on."""

    kind = "timeout"


class UnknownNameError(ConfigError, KeyError):
    """A registry lookup for a name that is not registered; the message lists the known names."""

    kind = "unknown"

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


def validation_problems(e: Any, names: dict[str, str] | None = None, prefix: str = "") -> str:
    """A pydantic ValidationError as one line of portq's: each problem as `where: what`, without pydantic's
    error codes, input echoes or documentation URLs. `names` renames locations (e.g. `batch_id` -> `--batch`);
    `prefix` goes before each location (`option `)."""
    problems = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"]) or "value"
        message = str(err["msg"])
        for code in ("Value error, ", "Assertion failed, "):
            message = message.removeprefix(code)
        problems.append(f"{prefix}{(names or {}).get(where, where)}: {message}")
    return "; ".join(problems)
