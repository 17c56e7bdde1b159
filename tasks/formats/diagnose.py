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
_CONSTRAINT = re.compile(r"Constraints violated \(([^)]*)\)!")
_SPECIALIZED = re.compile(r"^\s*- (.*)$", re.M)
_DATA_DEPENDENT = re.compile(r"Could not (?:guard on|extract specialized integer from) data-dependent expression "
                             r"(.+?)(?: \(|$)", re.M)
_ANY_OP = re.compile(r"\b((?:aten|prim|onnx)::\w+|aten\.\w+(?:\.\w+)?)")


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
        return Blocker(f"guard failed for dynamic dim {m[1]}: {why}",
                       hint=f"the model's code fixes the size of {m[1]}: drop --dynamic {m[1]} or make that code "
                            "size-agnostic")
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
