"""Reading exporter failures: the one fact a user can act on, out of pages of torch.onnx / torch.export text.

`blocker(e)` returns a short reason that names the first unsupported operator or the guard that failed,
when the text holds one, and the exception's first line otherwise. `Blocker.operator` is set when an
operator is to blame, so the job's error can name it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# TorchScript-based exporter: "Exporting the operator 'aten::diff' to ONNX opset version 18 is not supported"
_LEGACY_OP = re.compile(r"Exporting the operator '?([\w:.]+)'? to ONNX opset version (\d+) is not supported")
# dynamo exporter: "No ONNX function found for <OpOverload(op='aten._foo', overload='default')>"
_DYNAMO_OP = re.compile(r"No ONNX function found for <OpOverload\(op='([\w.]+)', overload='(\w+)'\)>")
_UNSUPPORTED_FX = re.compile(r"Unsupported FX nodes: \{'call_function': \[([^\]]*)\]")
# TorchScript -> ExportedProgram converter
_TS2EP_OP = re.compile(r"(?:Unsupported node kind|Cannot convert|unsupported)\s*:?\s*'?((?:aten|prim)::\w+)", re.I)
# torch.export guards
_CONSTRAINT = re.compile(r"Constraints violated \((.+?)\)!")
_SPECIALIZED = re.compile(r"^\s*- (.*)$", re.M)
_DATA_DEPENDENT = re.compile(r"Could not (?:guard on|extract specialized integer from) data-dependent expression "
                             r"(.+?)(?: \(|$)", re.M)
_ANY_OP = re.compile(r"\b((?:aten|prim|onnx)::\w+|aten\.\w+(?:\.\w+)?)")
# torch.export unrolls aten.lstm / aten.gru over time, so their sequence length cannot stay dynamic
_RNN = re.compile(r"\b(?:aten[.:]+(?:lstm|gru|rnn_tanh|rnn_relu)|nn\.(?:LSTM|GRU|RNN)|torch/nn/modules/rnn\.py)")
# what the TorchScript rewrites refuse (script_unfuse.UnfuseError, script_complex.LoweringError,
# script_prepare.RewriteMismatch): their messages say what and where
_REWRITE_REFUSALS = ("UnfuseError", "LoweringError", "RewriteMismatch")


@dataclass
class Blocker:
    reason: str
    operator: str | None = None
    hint: str | None = None  # what to do about it, when the kind of failure says


def _canonical(op: str) -> str:
    """aten._foo.default -> aten::_foo (the spelling users see in TorchScript graphs and docs)."""
    if "::" in op:
        return op
    parts = op.split(".")
    if len(parts) >= 2 and parts[0] in ("aten", "prim", "quantized", "torchvision"):
        return f"{parts[0]}::{parts[1]}"
    return op


def _summary(text: str) -> str:
    """The innermost cause in torch.onnx's '## Exception summary' block, when there is one."""
    if "## Exception summary" not in text:
        return ""
    block = text.split("## Exception summary", 1)[1]
    causes = re.findall(r"<class '([\w.]+)'>: (.*)", block)
    return causes[0][1] if causes else ""


def blocker(e: BaseException) -> Blocker:
    """What stopped an exporter, in one clause."""
    text = _text(e)
    m = _LEGACY_OP.search(text)
    if m:
        return Blocker(f"unsupported operator {m[1]} (no ONNX symbolic at opset {m[2]})", m[1])
    m = _DYNAMO_OP.search(text)
    if m and "complex-valued input" in text:
        op = _canonical(m[1])
        return Blocker(f"complex-valued {op}: the dynamo exporter translates no complex tensors",
                       hint="compute rotary embeddings with real cos/sin rather than torch.polar/view_as_complex, "
                            "export without dynamic dims, or submit the model as TorchScript (torch.jit.trace), "
                            "whose complex arithmetic portq rewrites into real ops")
    if m:
        op = _canonical(m[1])
        return Blocker(f"unsupported operator {op} (no ONNX function or decomposition for {m[1]}.{m[2]})", op)
    m = _UNSUPPORTED_FX.search(text)
    if m:
        ops = [o.strip(" '\"") for o in m[1].split(",") if o.strip()]
        first_op = _canonical(ops[0]) if ops else None
        return Blocker(f"unsupported operator {first_op or m[1]}", first_op)
    m = _CONSTRAINT.search(text)
    if m:
        detail = _SPECIALIZED.search(text[m.end():])
        why = detail[1].split(". ")[0] if detail else "the code does not allow other sizes"
        if _RNN.search(text):
            return Blocker(f"guard failed for dynamic dim {m[1]}: {why}",
                           hint="torch.export unrolls nn.LSTM/GRU over time, so their sequence length cannot stay "
                                "dynamic on this route; the torchscript route keeps it dynamic")
        return Blocker(f"guard failed for dynamic dim {m[1]}: {why}",
                       hint=f"the model's code fixes the size of {m[1]}: drop --dynamic {m[1]} or make that code "
                            "size-agnostic")
    if "PendingUnbackedSymbolNotFound" in text or "Pending unbacked symbols" in text:
        return Blocker("the ExportedProgram's shape environment kept unbacked symbols from an earlier export "
                       "(data-dependent sizes, e.g. mixture-of-experts routing)",
                       hint="load the program again for this route (torch.export.load) instead of reusing it")
    if "min() arg is an empty sequence" in text and _raised_in(e, "registration.py"):
        return Blocker("the TorchScript-based exporter's registry holds an empty entry for an operator (a custom "
                       "symbolic was unregistered in this process)",
                       hint="run the export in a fresh process (PORTQ_ISOLATE=1 does)")
    for refusal in _REWRITE_REFUSALS:
        if refusal in type(e).__name__ or f"{refusal}:" in text:
            return Blocker(f"the TorchScript rewrite refused: {_clip(first_line_of(text))}",
                           hint="the job log has the rewrite's full error; another route may still convert it")
    m = _DATA_DEPENDENT.search(text)
    if m:
        return Blocker(f"guard failed: the code branches on data-dependent value {m[1]}",
                       hint="make that branch static (torch.cond) or compute it outside the model")
    if "torch.jit.trace records the size of dynamic dim" in text:
        return Blocker(text.strip().splitlines()[0],
                       hint="drop --dynamic for the TorchScript format, or submit the model as a state dict with "
                            "--arch so it can be scripted")
    m = _TS2EP_OP.search(text)
    if m:
        return Blocker(f"unsupported operator {m[1]}", m[1])
    cause = _summary(text)
    if cause:
        named = _ANY_OP.search(cause)
        return Blocker(_clip(cause), _canonical(named[1]) if named else None)
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return Blocker(f"{type(e).__name__}: {_clip(first)}")


def _raised_in(e: BaseException, filename: str) -> bool:
    import traceback

    return any(frame.filename.endswith(filename) for frame in traceback.extract_tb(e.__traceback__))


def first_line_of(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _text(e: BaseException) -> str:
    """The exception's text with its causes (exporters wrap the useful error one or two levels down)."""
    parts = []
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        parts.append(str(cur))
        cur = cur.__cause__ or cur.__context__
    # ANSI colour codes from torch.onnx's messages
    return re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(parts))


def _clip(text: str, limit: int = 240) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
