"""Types of mpdsl values: a domain, a feature shape of (possibly symbolic) dimensions and a dtype.

A value of domain node / edge / graph has one row per node / edge / graph; its ``shape`` is
the per-row feature shape (the row axis is implicit). A ``param`` value has no row axis.

Broadcasting (elementwise ops): a param operand is uniform over the rows of the other
operand; feature shapes are aligned from the *left* (the shorter one is padded with 1s on
the right), then dims must be equal or 1. So a per-node scalar ``node[]`` scales a
``node[H, C]``, an attention weight ``edge[H]`` scales per-head messages ``edge[H, C]``, and
a bias ``param[C]`` adds to ``node[C]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum


class Domain(str, Enum):
    NODE = "node"
    EDGE = "edge"
    GRAPH = "graph"
    PARAM = "param"

    def __str__(self) -> str:
        return self.value


FLOAT_DTYPES = ("f32", "f64", "f16", "bf16")
HALF_DTYPES = ("f16", "bf16")  # stored in 16 bits; the Triton backend computes them in float32
INT_DTYPE = "i64"
ITEMSIZE = {"f32": 4, "f64": 8, "f16": 2, "bf16": 2, "i64": 8}  # bytes per element of each dtype
DTYPE_NAMES = {"f32": "float32", "f64": "float64", "f16": "float16", "bf16": "bfloat16", "i64": "int64"}
"""Each IR dtype by its NumPy / torch name."""


@dataclass(frozen=True, order=True)
class Dim:
    """A dimension: ``coeff`` times a product of symbols (sorted, repeated for powers)."""

    coeff: int
    symbols: tuple[str, ...] = ()

    @staticmethod
    def of(value: int | str | Dim) -> Dim:
        if isinstance(value, Dim):
            return value
        if isinstance(value, int):
            return Dim(value)
        return Dim(1, (value,))

    @staticmethod
    def parse(text: str) -> Dim:
        result = Dim(1)
        for factor in text.split("*"):
            factor = factor.strip()
            result = result * Dim.of(int(factor) if factor.isdigit() else factor)
        return result

    @property
    def is_static(self) -> bool:
        return not self.symbols

    @property
    def value(self) -> int:
        if self.symbols:
            raise ValueError(f"dimension {self} is symbolic")
        return self.coeff

    def __mul__(self, other: Dim) -> Dim:
        other = Dim.of(other)
        return Dim(self.coeff * other.coeff, tuple(sorted(self.symbols + other.symbols)))

    def substitute(self, env: Mapping[str, Dim | int]) -> Dim:
        result = Dim(self.coeff)
        for sym in self.symbols:
            result = result * (Dim.of(env[sym]) if sym in env else Dim(1, (sym,)))
        return result

    def __str__(self) -> str:
        if not self.symbols:
            return str(self.coeff)
        parts = ([str(self.coeff)] if self.coeff != 1 else []) + list(self.symbols)
        return "*".join(parts)

    def __repr__(self) -> str:
        return f"Dim({self})"


Shape = tuple[Dim, ...]


def shape_str(shape: Shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


@dataclass(frozen=True)
class Space:
    """The rows a value lives on: a domain and, within it, a named set of rows. ``name`` is "" for
    the graph's own rows of the domain (its nodes, the edges of its ``edge_index``, its graphs); an
    edge value may instead live on another edge set of the program (``edge<pairs>``: an edge set the
    graph carries beside its edges, or one derived from another, such as ``self_loops(edge)``). Two
    values combine row by row only when they live on the same space."""

    domain: Domain
    name: str = ""

    def __str__(self) -> str:
        return f"{self.domain}<{self.name}>" if self.name else str(self.domain)


@dataclass(frozen=True)
class TensorType:
    domain: Domain
    shape: Shape
    dtype: str
    rowset: str = ""  # the edge set of an edge value ("": the graph's own edges); see ``Space``

    def __str__(self) -> str:
        return f"{self.space}{shape_str(self.shape)} {self.dtype}"

    @property
    def space(self) -> Space:
        """The rows of the value (its domain and row set)."""
        return Space(self.domain, self.rowset)

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES

    def with_(self, domain: Domain | None = None, shape: Shape | None = None,
              dtype: str | None = None, rowset: str | None = None) -> TensorType:
        """A copy with the given fields replaced; a new domain drops the row set unless ``rowset``
        gives one (the rows of another domain are another space)."""
        if rowset is None:
            rowset = self.rowset if domain is None or domain is self.domain else ""
        return TensorType(self.domain if domain is None else domain,
                          self.shape if shape is None else tuple(shape),
                          self.dtype if dtype is None else dtype, rowset)

    def on(self, space: Space) -> TensorType:
        """The same feature shape and dtype on the rows of ``space``."""
        return TensorType(space.domain, self.shape, self.dtype, space.name)

    def substitute(self, env: Mapping[str, Dim | int]) -> TensorType:
        return self.with_(shape=tuple(d.substitute(env) for d in self.shape))


class TypeRuleError(Exception):
    """Raised by an op's type rule; the checker turns it into a located ``CompileError``.

    ``operand`` is the index of the operand to blame (None: the whole expression).
    """

    def __init__(self, message: str, hint: str | None = None, operand: int | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.operand = operand


def join_spaces(types: list[TensorType], what: str) -> Space:
    """The common rows of operands combined row by row (param is uniform)."""
    spaces = list(dict.fromkeys(t.space for t in types if t.domain is not Domain.PARAM))
    if len(spaces) > 1:
        kinds = " and ".join(sorted(str(s) for s in spaces))
        if {s.domain for s in spaces} == {Domain.EDGE}:
            named = next(s.name for s in spaces if s.name)
            raise TypeRuleError(
                f"{what} combines {kinds} values, which live on different edge sets",
                f"values of two edge sets never combine row by row: gather node values onto one set "
                f"(h[{named}.src]), carry edge values onto a derived set (carry(x, looped, fill)), or reduce "
                "both to nodes first",
                operand=next(i for i, t in enumerate(types) if t.domain is not Domain.PARAM
                             and t.space != spaces[0]))
        raise TypeRuleError(
            f"{what} combines {kinds} values, which have different rows",
            "bring them to one domain first: gather node values onto edges with x[src] or x[dst], "
            "or reduce edges to nodes with sum(...) by dst")
    return spaces[0] if spaces else Space(Domain.PARAM)


def join_domains(types: list[TensorType], what: str) -> Domain:
    """The common row domain of operands combined elementwise (param is uniform); its row set is
    ``join_spaces``'."""
    return join_spaces(types, what).domain


def broadcast_shapes(shapes: list[Shape], what: str) -> Shape:
    rank = max((len(s) for s in shapes), default=0)
    result: list[Dim] = []
    one = Dim(1)
    for axis in range(rank):
        dim = one
        for i, shape in enumerate(shapes):
            d = shape[axis] if axis < len(shape) else one
            if d in (one, dim):
                continue
            if dim == one:
                dim = d
                continue
            raise TypeRuleError(
                f"{what}: feature shapes {' and '.join(shape_str(s) for s in shapes)} do not broadcast "
                f"(axis {axis}: {dim} vs {d})",
                "shapes align from the left; dims must be equal or 1 (reshape, or reduce an axis with sum(x, axis))",
                operand=i)
        result.append(dim)
    return tuple(result)
