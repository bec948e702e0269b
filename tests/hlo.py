"""Count collectives in compiled HLO text, so tests can pin communication.

A compiled executable's text (``jax.jit(f).lower(*args).compile().as_text()``,
likewise for ``jax.pmap``) is a list of computations::

    %region_2.0 (a: f32[], b: f32[]) -> f32[] {
      ...
    }
    ENTRY %main (p: f32[1,4]) -> f32[1,4] {
      %psum.14 = f32[4]{0} all-reduce(%bitcast), ..., to_apply=%region_2.0
      %cond = (f32[4]{0}) conditional(%p, %t, %f), branch_computations={%a, %b}
    }

:func:`count_collectives` starts at the ENTRY computation and follows the
computations an instruction calls unconditionally (``calls=``, ``to_apply=``,
``condition=``, ``called_computations=``) but, unless asked, not the branches
of a ``conditional`` (``branch_computations=``, ``true_computation=``,
``false_computation=``) nor the ``body=`` of a ``while`` (jaxbn traces neither;
a test that builds them counts the code only some executions run apart): what
it counts is what every execution runs. Each
reachable computation is counted once, so this is a static count of
instructions, and an async pair (``all-reduce-start`` / ``all-reduce-done``, or
``async-start`` / ``async-done`` sharing a wrapped computation) counts as one.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any

__all__ = [
    "compiled_text",
    "count_collectives",
    "count_in_branches",
    "count_per_execution",
    "memory_traffic",
    "named_instructions",
    "parse_computations",
    "reduced_shapes",
]

_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"\s*([a-z][a-z0-9\-]*)\(")
_NAMES = r"(%?[\w.\-]+|\{[^}]*\})"
_CALL_EDGES = re.compile(r"\b(?:calls|to_apply|condition|called_computations)=" + _NAMES)
_BRANCH_EDGES = re.compile(
    r"\b(?:branch_computations|true_computation|false_computation)=" + _NAMES
)
_LOOP_EDGES = re.compile(r"\bbody=" + _NAMES)


def compiled_text(fn: Any, *args: Any) -> str:
    """The optimized HLO text of ``fn`` (a ``jax.jit``/``jax.pmap`` object) for ``args``."""
    return fn.lower(*args).compile().as_text()


def feature_rows(hlo_text: str, shape: tuple[int, ...]) -> set[tuple[int, ...]]:
    """The shapes of HLO text's reshapes of an array of ``shape`` into rows of several of its
    feature vectors (its last axis): a last axis a multiple of ``shape[-1]``, of the same size
    (unit axes aside: a reshape that inserts one, as the stacked sums' axis, is the same rows)."""
    reshaped = {
        tuple(int(n) for n in dims.split(",") if n != "1")
        for dims in re.findall(r"= \w+\[([\d,]+)\]\S* reshape\(", hlo_text)
    }
    features, size = shape[-1], math.prod(shape)
    return {
        dims
        for dims in reshaped
        if math.prod(dims) == size and dims[-1] > features and dims[-1] % features == 0
    }


def _opcode(rest: str) -> str | None:
    """The opcode of an instruction's right-hand side ``TYPE OPCODE(operands), attrs``."""
    rest = rest.lstrip()
    if rest.startswith("("):  # a tuple type: skip to its matching parenthesis
        depth = 0
        for i, char in enumerate(rest):
            depth += char == "("
            depth -= char == ")"
            if depth == 0:
                rest = rest[i + 1 :]
                break
    else:  # an array type such as f32[2,3]{1,0} has no spaces
        parts = rest.split(None, 1)
        rest = parts[1] if len(parts) == 2 else ""
    match = _OPCODE.match(rest)
    return match.group(1) if match else None


def _names(group: str) -> list[str]:
    return [name.strip().lstrip("%") for name in group.strip("{}").split(",") if name.strip()]


def _computation_lines(hlo_text: str) -> tuple[str, dict[str, list[str]]]:
    """``(entry_name, {computation name: its instruction lines})``; raises without an ENTRY."""
    bodies: dict[str, list[str]] = {}
    entry = current = None
    for line in hlo_text.splitlines():
        if current is None:
            header = _HEADER.match(line)
            if header:
                current = header.group(2)
                bodies[current] = []
                if header.group(1):
                    entry = current
        elif line.strip() == "}":
            current = None
        else:
            bodies[current].append(line)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text; pass compiled HLO text.")
    return entry, bodies


def parse_computations(hlo_text: str) -> tuple[str, dict[str, list[tuple[str | None, str]]]]:
    """Splits HLO text into computations.

    Returns:
      ``(entry_name, computations)`` where ``computations`` maps a name to its
      instructions as ``(opcode, text after '=')`` pairs.

    Raises:
      ValueError: when the text has no ENTRY computation.
    """
    entry, named = named_instructions(hlo_text)
    return entry, {name: [(op, rest) for _, op, rest in body] for name, body in named.items()}


def named_instructions(hlo_text: str) -> tuple[str, dict[str, list[tuple[str, str | None, str]]]]:
    """:func:`parse_computations` with each instruction's name: ``(name, opcode, text after '=')``
    triples (a kernel's name is what a profiler trace calls it)."""
    entry, bodies = _computation_lines(hlo_text)
    computations = {
        name: [
            (m.group(1), _opcode(m.group(2)), m.group(2))
            for m in map(_INSTRUCTION.match, lines)
            if m
        ]
        for name, lines in bodies.items()
    }
    return entry, computations


def reduced_shapes(hlo_text: str) -> list[tuple[int, ...]]:
    """The shape of the operand of every ``reduce`` in compiled HLO text (every computation, fused
    ones included: a kernel's reduction), in text order."""
    _, computations = named_instructions(hlo_text)
    shapes = []
    for body in computations.values():
        types = {name: _type_text(rest, op) for name, op, rest in body}
        for _, op, rest in body:
            if op == "reduce":
                operand = _operand_names(rest, op)[0]
                dims = _ARRAY_TYPE.findall(types.get(operand, ""))[0][1]
                shapes.append(tuple(int(n) for n in dims.split(",") if n))
    return shapes


def _reachable(entry: str, computations: dict, include_branches: bool) -> set[str]:
    edges = [_CALL_EDGES] + ([_BRANCH_EDGES, _LOOP_EDGES] if include_branches else [])
    seen, stack = set(), [entry]
    while stack:
        name = stack.pop()
        if name in seen or name not in computations:
            continue
        seen.add(name)
        for _, rest in computations[name]:
            for pattern in edges:
                for group in pattern.findall(rest):
                    stack.extend(_names(group))
    return seen


def count_collectives(hlo_text: str, op: str = "all-reduce", include_branches: bool = False) -> int:
    """Counts ``op`` instructions reachable from ENTRY in compiled HLO text.

    Args:
      hlo_text: the text of a compiled executable.
      op: the collective's opcode: ``all-reduce``, ``all-gather``,
        ``reduce-scatter``, ``collective-permute``, ``all-to-all``. Its async
        form ``op-start`` counts too (``op-done`` does not: one per pair).
      include_branches: also follow the branches of ``conditional``
        instructions and the bodies of ``while`` loops (code that only some
        executions run).

    Returns:
      The number of such instructions, each reachable computation counted once.
    """
    entry, computations = parse_computations(hlo_text)
    wanted = {op, op + "-start"}
    return sum(
        opcode in wanted
        for name in _reachable(entry, computations, include_branches)
        for opcode, _ in computations[name]
    )


def count_per_execution(hlo_text: str, op: str = "all-reduce") -> int:
    """Counts the ``op`` instructions one steady-state execution runs.

    Like :func:`count_collectives`, but a ``conditional`` is charged its
    cheapest branch, so a collective that XLA sinks into both branches of a
    conditional counts once (a ``while`` loop, its condition only).
    """
    entry, computations = parse_computations(hlo_text)
    wanted = {op, op + "-start"}

    @functools.cache
    def count(name: str) -> int:
        total = 0
        for opcode, rest in computations.get(name, []):
            total += opcode in wanted
            if opcode == "conditional":
                total += min(
                    count(b) for group in _BRANCH_EDGES.findall(rest) for b in _names(group)
                )
                continue
            total += sum(
                count(callee) for group in _CALL_EDGES.findall(rest) for callee in _names(group)
            )
        return total

    return count(entry)


def count_in_branches(hlo_text: str, op: str = "all-reduce") -> int:
    """Counts ``op`` instructions reachable only through ``conditional`` branches or loop bodies."""
    return count_collectives(hlo_text, op, include_branches=True) - count_collectives(
        hlo_text, op, include_branches=False
    )


_ARRAY_TYPE = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128|f8\w*)\[([\d,]*)\]")
_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}
# Instructions that move no data themselves: bookkeeping, or control flow whose
# bodies do the work (a conditional is charged its cheapest branch).
_NOT_KERNELS = {
    "parameter",
    "constant",
    "get-tuple-element",
    "tuple",
    "bitcast",
    "conditional",
    "while",
    "call",
    "after-all",
    "partition-id",
    "replica-id",
}
_NAMED = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_PARAMETER = re.compile(r"\bparameter\((\d+)\)")
_FUSED = re.compile(r"\bcalls=%?([\w.\-]+)")


def _type_bytes(type_text: str) -> int:
    total = 0
    for dtype, dims in _ARRAY_TYPE.findall(type_text):
        size = 1
        for dim in filter(None, dims.split(",")):
            size *= int(dim)
        total += size * _BYTES.get(dtype, 1)
    return total


def _operand_names(rest: str, opcode: str) -> list[str]:
    """The names of the operands of the instruction whose text after '=' is ``rest``."""
    operands = rest[rest.index(f" {opcode}(") + len(opcode) + 2 :]
    depth, end = 1, 0
    for end, char in enumerate(operands):
        depth += (char == "(") - (char == ")")
        if depth == 0:
            break
    return re.findall(r"%([\w.\-]+)", operands[:end])


def _type_text(rest: str, opcode: str | None) -> str:
    return rest[: rest.index(f" {opcode}(")] if opcode and f" {opcode}(" in rest else ""


def _elements(type_text: str) -> int:
    total = 0
    for _, dims in _ARRAY_TYPE.findall(type_text):
        size = 1
        for dim in filter(None, dims.split(",")):
            size *= int(dim)
        total += size
    return total


def _sliced_parameters(lines: list[str]) -> dict[int, int]:
    """For a fused computation: ``{parameter index: bytes read}`` for each parameter that reaches the
    rest of the computation only through static ``slice`` instructions, possibly after element-wise
    ``convert``/``bitcast`` steps: a fused kernel computes those on the sliced elements only, so it
    reads the slices' elements of the parameter, not the whole operand."""
    parameters: dict[str, tuple[int, str]] = {}
    uses: dict[str, list[tuple[str, str | None, str]]] = {}
    gather_operands: dict[str, str] = {}  # gather -> the operand it gathers from
    for line in lines:
        named = _NAMED.match(line)
        if not named:
            continue
        name, rest = named.groups()
        opcode = _opcode(rest)
        if opcode == "parameter":
            parameters[name] = (int(_PARAMETER.search(rest).group(1)), _type_text(rest, opcode))
        elif opcode is not None and f" {opcode}(" in rest:
            operands = _operand_names(rest, opcode)
            if opcode == "gather" and operands:
                gather_operands[name] = operands[0]
            for operand in operands:
                uses.setdefault(operand, []).append((name, opcode, _type_text(rest, opcode)))

    def demanded(name: str, elements: int) -> int | None:
        """Elements of ``name`` (of ``elements`` in all) the computation reads; None: all of them."""
        total = 0
        for user, opcode, type_text in uses.get(name, []) or [("", None, "")]:
            if opcode in (
                "slice",
                "gather",
            ):  # at most one element of the operand per output element
                if (
                    opcode == "gather" and gather_operands.get(user) != name
                ):  # the indices, not the data
                    return None
                more = demanded(user, _elements(type_text))
                total += _elements(type_text) if more is None else more
            elif opcode in ("convert", "bitcast") and _elements(type_text) == elements:
                more = demanded(user, elements)
                if more is None:
                    return None
                total += more
            else:
                return None
        return total

    result = {}
    for name, (index, type_text) in parameters.items():
        elements = _elements(type_text)
        read = demanded(name, elements) if elements else None
        if read is not None and read < elements:
            result[index] = _type_bytes(type_text) * read // elements
    return result


def memory_traffic(hlo_text: str) -> tuple[int, int]:
    """Bytes read and written by the kernels one steady-state execution runs, and their number.

    Each kernel (a fusion, a library call, a reduce, a copy, ...) of the ENTRY
    computation is charged the bytes of its operands plus those of its output;
    bookkeeping instructions (parameters, tuples, bitcasts) are free. A fusion
    operand that the fused computation only slices or gathers from (``slice``,
    ``gather``, perhaps after element-wise converts) is charged the bytes
    taken: one element per feature of x does not read x. A
    ``conditional`` is charged its cheapest branch and a ``while`` loop its
    condition only (zero trips). This is the static traffic model of the
    performance issue: a kernel that reads x and writes y costs 2S for a
    tensor of S bytes.

    Returns:
      ``(bytes, kernels)``.
    """
    entry, bodies = _computation_lines(hlo_text)

    def cost(computation: str) -> tuple[int, int]:
        types: dict[str, str] = {}
        traffic = kernels = 0
        for line in bodies.get(computation, []):
            named = _NAMED.match(line)
            if not named:
                continue
            name, rest = named.groups()
            opcode = _opcode(rest)
            type_text = _type_text(rest, opcode)
            types[name] = type_text
            if opcode in ("conditional", "while"):  # the cheapest branch; a loop's zero trips
                edges = _BRANCH_EDGES if opcode == "conditional" else _CALL_EDGES
                branches = [b for group in edges.findall(rest) for b in _names(group)]
                branch_traffic, branch_kernels = min(cost(b) for b in branches)
                traffic, kernels = traffic + branch_traffic, kernels + branch_kernels
                continue
            if opcode is None or opcode in _NOT_KERNELS:
                continue
            read = [_type_bytes(types.get(n, "")) for n in _operand_names(rest, opcode)]
            fused = _FUSED.search(rest) if opcode == "fusion" else None
            if fused:
                for index, sliced in _sliced_parameters(bodies.get(fused.group(1), [])).items():
                    if index < len(read):
                        read[index] = min(read[index], sliced)
            traffic += _type_bytes(type_text) + sum(read)
            kernels += 1
        return traffic, kernels

    return cost(entry)
