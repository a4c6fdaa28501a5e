"""Reading compiled (optimized) HLO text: kernels and memory traffic of a step.

Used by :mod:`benchmarks.studies.single_pass` and by ``tests/test_compiled_structure.py``,
which check *why* a step is fast from what XLA compiled, not from a timing:

* :func:`entry_kernels` counts the operations of the entry computation that run as
  kernels (on XLA:CPU each is one thunk, with a fixed dispatch cost);
* :func:`hlo_passes` counts the passes over the big arrays and the bytes per
  parameter they move.
"""

from __future__ import annotations

import collections
import re
from typing import Any

import numpy as np

_DT_BYTES = {"f32": 4, "s32": 4, "u32": 4, "f16": 2, "bf16": 2, "f64": 8, "pred": 1, "s64": 8}
_SHAPE = re.compile(r"\b(f32|s32|u32|f16|bf16|f64|pred|s64)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s*=\s*(.*?)\s+([a-z\-]+)\((.*?)\)(.*)$")
#: Entry-computation ops that move no data and launch nothing.
_FREE_OPS = frozenset({"parameter", "get-tuple-element", "tuple", "constant", "bitcast"})


def _shape_bytes(text: str) -> int:
    total = 0
    for dt, dims in _SHAPE.findall(text):
        total += _DT_BYTES[dt] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    return total


def computations(hlo: str) -> dict[str, list[str]]:
    comps: dict[str, list[str]] = {}
    cur = None
    for line in hlo.splitlines():
        m = re.match(r"^(ENTRY\s+)?%(\S+)\s.*\{\s*$", line)
        if m:
            cur = "ENTRY" if m.group(1) else m.group(2)
            comps[cur] = []
        elif line.startswith("}"):
            cur = None
        elif cur is not None:
            comps[cur].append(line)
    return comps


def _entry_instructions(hlo: str) -> list[tuple[str, str, str, str, str]]:
    out = []
    for line in computations(hlo).get("ENTRY", []):
        mt = _INSTR.match(re.sub(r", metadata=\{[^}]*\}", "", line))
        if mt:
            out.append(mt.groups())
    return out


def entry_kernels(hlo: str) -> collections.Counter[str]:
    """Counts, by opcode, the entry computation's ops that run as kernels."""
    return collections.Counter(
        op for _, _, op, _, _ in _entry_instructions(hlo) if op not in _FREE_OPS
    )


def hlo_passes(hlo: str, n: int) -> dict[str, Any]:
    """Element-wise passes over the big arrays and the bytes/param they move.

    A pass is a fusion, copy, custom-call or other op whose result is at least
    n/4 elements (or, inside a while body, the body's fusions). Bytes: each
    pass's distinct big operands read plus its big results written.
    """
    comps = computations(hlo)
    big = n  # bytes threshold: a quarter of an f32 array of n elements
    sizes: dict[str, int] = {}
    passes, moved, whiles = [], 0, []
    for name, shape, op, operands, rest in _entry_instructions(hlo):
        sizes[name] = _shape_bytes(shape)
        if op in _FREE_OPS:
            continue
        if op == "while":
            body = re.search(r"body=%(\S+?)[,\s]", rest + " ")
            whiles.append(body.group(1) if body else "?")
            continue
        ops = {o.strip().lstrip("%") for o in operands.split(",") if o.strip()}
        out_b = sizes[name]
        in_b = sum(sizes.get(o, 0) for o in ops if sizes.get(o, 0) >= big)
        if out_b >= big or (op == "custom-call" and in_b >= big):
            kind = re.search(r"kind=(\w+)", rest)
            passes.append(f"{op}{'(' + kind.group(1) + ')' if kind else ''}")
            moved += in_b + (out_b if out_b >= big else 0)
    out: dict[str, Any] = {"passes": len(passes), "ops": passes, "bytes_per_param": moved / n}
    if whiles:
        body = comps.get(whiles[0], [])
        out["while_body_fusions"] = sum(1 for ln in body if re.search(r"\bfusion\(", ln))
    out["copies"] = sum(1 for ln in comps.get("ENTRY", []) if re.search(r"\bcopy\(", ln))
    return out
