"""Row-block fusion: the NumPy backend's execution schedule.

Most ops of a message-passing layer are row-wise: row i of the result depends only on row i of
its node (or edge) operands and on whole params (elementwise math, ``x @ W``, reshapes, feature
reductions, gathers of node rows onto edges). Run one at a time over 100k x 64 arrays, each streams
its operands through main memory. ``fuse_rows`` groups consecutive row-wise values of one domain
into a ``RowGroup``; the backend runs a group block by block (a few thousand rows, so that the
block's intermediates stay in cache), and materialises only the values used outside the group.

A sum over the rows (``Trait.ROW_SUM``: a weight gradient ``contract_rows``) joins the group of its
row space too: each block adds its partial sum, so a backward reads each residual once for all the
products and column sums that use it, while its block is in cache.

Contract: a schedule lists every value of the program exactly once, each after its operands; a
group's members share one row space (a row sum's operands have its rows; no member reads a row sum
of its own group), and every operand of a member is a param, a value of the group, or a value
scheduled before the group. Values that run before an open group (they do not
depend on it) are grouped among themselves the same way. A reshape of a value computed before the
group joins no group: run on its own it is a view, in a group a copy when used after it. Results
equal the op-by-op run (the same rules run on row slices).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mpdsl.ir import Program, Value, make_value, value_names
from mpdsl.ops import OPS, Trait, is_pure
from mpdsl.types import Domain, Space

ROW_DOMAINS = (Domain.NODE, Domain.EDGE)


@dataclass(frozen=True)
class RowGroup:
    """Values of one row space (a domain, and for edges one edge set) run together, block by block.
    ``exports`` are the members used after the group (or returned by the program); the others live
    one block at a time. Row sums (``is_row_sum``) are members whose blocks give partial sums."""

    space: Space
    members: tuple[Value, ...]
    exports: tuple[Value, ...]

    @property
    def domain(self) -> Domain:
        return self.space.domain


def is_row_wise(v: Value) -> bool:
    """Whether ``v`` may run block by block: a pure op with ``Trait.ROW_WISE`` whose operands are of its
    row domain or params (random ops stay whole: one draw per run, in row order), or a gather of node
    rows onto edges (row-wise in the edge rows; the backend gathers each block)."""
    if v.type.domain not in ROW_DOMAINS:
        return False
    if v.op == "gather":
        return v.attr["index"] in ("src", "dst") and v.type.is_float
    if not OPS[v.op].has(Trait.ROW_WISE) or not is_pure(v):
        return False
    return all(o.type.space == v.type.space or o.type.domain is Domain.PARAM for o in v.operands)


def is_row_sum(v: Value) -> bool:
    """Whether ``v`` is a pure sum over the rows of its operands of one row space (``Trait.ROW_SUM``)
    that may run block by block: each block of rows gives a partial sum."""
    if not OPS[v.op].has(Trait.ROW_SUM) or not is_pure(v) or v.type.domain is not Domain.PARAM:
        return False
    spaces = {o.type.space for o in v.operands if o.type.domain is not Domain.PARAM}
    return len(spaces) == 1 and next(iter(spaces)).domain in ROW_DOMAINS


def row_space(v: Value) -> Space:
    """The rows ``v`` runs over in a group: its own, or for a row sum its operands'."""
    if is_row_sum(v):
        return next(o.type.space for o in v.operands if o.type.domain is not Domain.PARAM)
    return v.type.space


def fuse_rows(program: Program) -> list[Value | RowGroup]:
    """The program's values in a schedule that groups row-wise values (see the module docstring).
    A value that is not row-wise and does not depend on the open group runs before it, so that
    e.g. ``x @ W_s + (mean(x[src]) by dst) @ W_n + b`` becomes one sparse product, then one group;
    the values moved before a group are grouped among themselves the same way (a row-wise chain of
    another row space met while a group is open, such as edge scores a backward recomputes from
    node values while a node group is open, runs as its own group, not op by op)."""
    users: dict[int, set[int]] = {}
    for v in program.values:
        for o in v.operands:
            users.setdefault(id(o), set()).add(id(v))
    outputs = {id(v) for _, v in program.outputs}
    return _fuse(list(program.values), users, outputs)


def _fuse(values: list[Value], users: dict[int, set[int]], outputs: set[int]) -> list[Value | RowGroup]:
    """``fuse_rows`` over ``values``, a sequence whose operands are each a value of it before them
    or a value scheduled before it; ``users``: the ids of each value's users in the program. A
    group's exports are its members that a value outside it reads or that are outputs."""
    schedule: list[Value | RowGroup] = []
    members: list[Value] = []
    in_group: set[int] = set()  # ids of members
    sums: set[int] = set()  # ids of the members that are row sums (complete only after the group)
    ahead: list[Value] = []  # values that run before the open group (they do not depend on it)

    def close() -> None:
        schedule.extend(_fuse(ahead, users, outputs) if len(ahead) >= 2 else ahead)
        if len(members) >= 2:
            exports = tuple(m for m in members if id(m) in outputs or users.get(id(m), set()) - in_group)
            schedule.append(RowGroup(row_space(members[0]), tuple(members), exports))
        else:
            schedule.extend(members)
        members.clear()
        in_group.clear()
        sums.clear()
        ahead.clear()

    def join(v: Value) -> None:
        members.append(v)
        in_group.add(id(v))
        if is_row_sum(v):
            sums.add(id(v))

    def groupable(v: Value) -> bool:
        # a reshape of a value computed before the group is a view of it on its own, a copy if exported
        if is_row_sum(v):
            return True
        return is_row_wise(v) and not (v.op == "reshape" and id(v.operands[0]) not in in_group)

    for v in values:
        depends = any(id(o) in in_group for o in v.operands)
        if groupable(v) and (not members or row_space(v) == row_space(members[0])) \
                and not any(id(o) in sums for o in v.operands):
            join(v)
        elif members and not depends:
            ahead.append(v)
        else:
            close()
            if groupable(v):
                join(v)
            else:
                schedule.append(v)
    close()
    return schedule


def group_program(program: Program, group: RowGroup) -> tuple[Program, tuple[Value, ...]]:
    """The group as a program of its own (for a compiled form of its blocks) and the values its
    members read from outside it: the k-th of these is its input (or, for a param value, its param)
    ``a<k>``; its outputs ``e<k>`` are the group's exports, in order."""
    members = {id(m) for m in group.members}
    outside: dict[int, Value] = {}
    for m in group.members:
        for o in m.operands:
            if id(o) not in members:
                outside.setdefault(id(o), o)
    renamed: dict[int, Value] = {}
    values: list[Value] = []
    for k, o in enumerate(outside.values()):
        if o.type.domain is Domain.PARAM:
            renamed[id(o)] = make_value("param", (), {"name": f"a{k}", "init": "zeros"}, o.type)
        else:
            renamed[id(o)] = make_value("input", (), {"name": f"a{k}"}, o.type)
        values.append(renamed[id(o)])
    for m in group.members:
        renamed[id(m)] = Value(m.op, tuple(renamed[id(o)] for o in m.operands), m.attrs, m.type, m.span)
        values.append(renamed[id(m)])
    outputs = tuple((f"e{k}", renamed[id(e)]) for k, e in enumerate(group.exports))
    return Program(f"{program.name}_rows", program.dims, tuple(values), outputs, program.edge_sets), \
        tuple(outside.values())


def describe(program: Program, schedule: list[Value | RowGroup], min_rows: int,
             how: Callable[[RowGroup], str] | None = None) -> list[str]:
    """One line per row group of ``schedule``, for ``--emit plan``: its members, how each block runs
    (``how(group)``, when given) and what it materialises; groups run block by block from
    ``min_rows`` rows on."""
    names = value_names(program)
    lines = []
    for step in schedule:
        if isinstance(step, RowGroup):
            members = ", ".join(f"{names[m]} {m.op}" for m in step.members)
            kept = ", ".join(names[m] for m in step.exports) or "nothing"
            blocks = f"; {how(step)}" if how is not None else ""
            lines.append(f"{step.space} row group [{members}] runs block by block over the {step.space} "
                         f"rows (numpy backend, from {min_rows} rows{blocks}); materialised in full: {kept}")
    return lines
