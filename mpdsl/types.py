"""Types of mpdsl values: a domain, a feature shape of (possibly symbolic) dimensions and a dtype.

A dimension (``Dim``) is a sum of products of symbols with integer coefficients (``16``, ``H*C``,
``2*F + FE``), normalised so that equal dims are equal values; ``solve_dim`` finds the value of a
symbol from a dim and its size (binding dims from data and from a layer's arguments).

A value of domain node / edge / graph has one row per node / edge / graph; its ``shape`` is
the per-row feature shape (the row axis is implicit). A ``param`` value has no row axis.

Broadcasting (elementwise ops): a param operand is uniform over the rows of the other
operand; feature shapes are aligned from the *left* (the shorter one is padded with 1s on
the right), then dims must be equal or 1. So a per-node scalar ``node[]`` scales a
``node[H, C]``, an attention weight ``edge[H]`` scales per-head messages ``edge[H, C]``, and
a bias ``param[C]`` adds to ``node[C]``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
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


Monomial = tuple[str, ...]
"""A product of symbols, sorted, a symbol repeated for its powers (() is the constant 1)."""


def _term_order(term: tuple[Monomial, int]) -> tuple[int, Monomial]:
    """Terms print highest degree first, then by their symbols; the constant last."""
    return -len(term[0]), term[0]


@dataclass(frozen=True, init=False)
class Dim:
    """A dimension: a polynomial in symbols with integer coefficients, such as ``16``, ``H*C`` or
    ``2*F + FE``. ``Dim(coeff, symbols)`` is one term (``coeff`` times the product of ``symbols``);
    sums and products of dims are dims. The terms are normalised (one per monomial, no zero
    coefficient, in a fixed order), so equal dims compare equal, hash equal and print the same.

    The language writes no subtraction, so the dims of types have positive coefficients; a
    difference of dims (``Dim.__sub__``) only arises while solving a dim for a symbol."""

    terms: tuple[tuple[Monomial, int], ...]

    def __init__(self, coeff: int = 0, symbols: Iterable[str] = ()):
        object.__setattr__(self, "terms", ((tuple(sorted(symbols)), coeff),) if coeff else ())

    @staticmethod
    def _of_terms(terms: Mapping[Monomial, int]) -> Dim:
        dim = Dim()
        object.__setattr__(dim, "terms", tuple(sorted(((m, c) for m, c in terms.items() if c), key=_term_order)))
        return dim

    @staticmethod
    def of(value: int | str | Dim) -> Dim:
        if isinstance(value, Dim):
            return value
        if isinstance(value, int):
            return Dim(value)
        return Dim(1, (value,))

    @staticmethod
    def parse(text: str) -> Dim:
        """A dim from its printed form (``2*F + FE``; the IR's text format)."""
        result = Dim(0)
        for term in text.split("+"):
            product = Dim(1)
            for factor in term.split("*"):
                factor = factor.strip()
                product = product * Dim.of(int(factor) if factor.isdigit() else factor)
            result = result + product
        return result

    # ---- what it is ------------------------------------------------------------------------

    @property
    def is_static(self) -> bool:
        return all(not m for m, _ in self.terms)

    @property
    def value(self) -> int:
        if not self.is_static:
            raise ValueError(f"dimension {self} is symbolic")
        return self.terms[0][1] if self.terms else 0

    @property
    def symbols(self) -> tuple[str, ...]:
        """The symbols it depends on, each once, sorted."""
        return tuple(sorted({s for m, _ in self.terms for s in m}))

    @property
    def name(self) -> str | None:
        """The symbol when the dim is one plain symbol (``F``), else None."""
        if len(self.terms) == 1 and self.terms[0][1] == 1 and len(self.terms[0][0]) == 1:
            return self.terms[0][0][0]
        return None

    @property
    def is_positive(self) -> bool:
        """Whether it is nonzero with positive coefficients only (so at least 1 wherever its symbols
        are): what a solved dim must be."""
        return bool(self.terms) and all(c > 0 for _, c in self.terms)

    def at_ones(self) -> int:
        """Its value with every symbol 1 (the least a dim of positive coefficients is when its
        symbols are at least 1; a static dim's value)."""
        return sum(c for _, c in self.terms)

    def degree(self, symbol: str) -> int:
        return max((m.count(symbol) for m, _ in self.terms), default=0)

    # ---- arithmetic ------------------------------------------------------------------------

    def _combine(self, other: Dim, sign: int) -> Dim:
        terms = dict(self.terms)
        for m, c in Dim.of(other).terms:
            terms[m] = terms.get(m, 0) + sign * c
        return Dim._of_terms(terms)

    def __add__(self, other: Dim | int) -> Dim:
        return self._combine(Dim.of(other), 1)

    __radd__ = __add__

    def __sub__(self, other: Dim | int) -> Dim:
        return self._combine(Dim.of(other), -1)

    def __mul__(self, other: Dim | int) -> Dim:
        terms: dict[Monomial, int] = {}
        for m1, c1 in self.terms:
            for m2, c2 in Dim.of(other).terms:
                m = tuple(sorted(m1 + m2))
                terms[m] = terms.get(m, 0) + c1 * c2
        return Dim._of_terms(terms)

    __rmul__ = __mul__

    def substitute(self, env: Mapping[str, Dim | int]) -> Dim:
        if not any(s in env for s in self.symbols):
            return self
        result = Dim(0)
        for m, c in self.terms:
            term = Dim(c)
            for sym in m:
                term = term * (Dim.of(env[sym]) if sym in env else Dim(1, (sym,)))
            result = result + term
        return result

    def split(self, symbol: str) -> tuple[Dim, Dim]:
        """(a, b) with self = a * symbol + b, for a dim at most linear in ``symbol``."""
        a: dict[Monomial, int] = {}
        b: dict[Monomial, int] = {}
        for m, c in self.terms:
            if symbol in m:
                rest = list(m)
                rest.remove(symbol)
                a[tuple(rest)] = c
            else:
                b[m] = c
        return Dim._of_terms(a), Dim._of_terms(b)

    def divide(self, divisor: Dim) -> Dim | None:
        """The exact quotient by a one-term ``divisor`` (``2``, ``H``, ``2*H``), or None when some
        term does not divide (or the divisor has several terms)."""
        if len(divisor.terms) != 1:
            return None
        (dm, dc), = divisor.terms
        terms: dict[Monomial, int] = {}
        for m, c in self.terms:
            rest = list(m)
            for sym in dm:
                if sym not in rest:
                    return None
                rest.remove(sym)
            if c % dc:
                return None
            terms[tuple(rest)] = c // dc
        return Dim._of_terms(terms)

    # ---- text ------------------------------------------------------------------------------

    def render(self, values: Mapping[str, int] | None = None) -> str:
        """The printed form (``2*F + FE``); with ``values``, each symbol that has one shown as its
        number, the arithmetic left undone (``2*16 + 4``)."""
        values = values or {}
        if not self.terms:
            return "0"
        parts = []
        for m, c in self.terms:
            factors = [str(values[s]) if s in values else s for s in m]
            parts.append("*".join(([str(abs(c))] if abs(c) != 1 or not m else []) + factors))
        text = ("-" if self.terms[0][1] < 0 else "") + parts[0]
        for (_, c), part in zip(self.terms[1:], parts[1:]):
            text += f" {'-' if c < 0 else '+'} {part}"
        return text

    def __str__(self) -> str:
        return self.render()

    def __repr__(self) -> str:
        return f"Dim({self})"


class DimSolveError(Exception):
    """A dim that cannot be solved for a symbol; ``reason`` completes a sentence that names the
    symbol ("D " + "= 31/2, which is not an integer")."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _grouped(dim: Dim) -> str:
    return f"({dim})" if len(dim.terms) > 1 else str(dim)


def solve_dim(dim: Dim, symbol: str, target: Dim) -> Dim:
    """The value of ``symbol`` that makes ``dim`` equal ``target``: a positive integer (a
    positive dim when ``target`` is symbolic). ``dim`` may hold other symbols, taken as known (as
    ``target`` does). Linear in ``symbol`` (``2*D + FE``): solved exactly; of higher degree in
    ``symbol`` alone with a static target (``F*F``): found by bisection (the dim increases with
    the symbol, its coefficients being positive). Raises ``DimSolveError`` otherwise."""
    others = [s for s in dim.symbols if s != symbol]
    if dim.degree(symbol) > 1:
        if others or not target.is_static or not dim.is_positive:
            raise DimSolveError("= a root of a polynomial, which is solved only against a number with no "
                                "other unknown")
        want = target.value
        lo, hi = 0, max(want, 1)
        while lo < hi:
            mid = (lo + hi) // 2
            if dim.substitute({symbol: mid}).value < want:
                lo = mid + 1
            else:
                hi = mid
        if dim.substitute({symbol: lo}).value != want:
            if lo == 0:
                raise DimSolveError("= a negative number, which is not positive")
            raise DimSolveError(f"= a number between {lo - 1} and {lo}, which is not an integer")
        solution = Dim(lo)
    else:
        a, b = dim.split(symbol)
        if not a.terms:
            raise DimSolveError(f"does not appear in {dim}")
        rest = target - b
        if a.is_static and rest.is_static:
            numerator, denominator = rest.value, a.value
            if numerator % denominator:
                g = math.gcd(numerator, denominator)
                raise DimSolveError(f"= {numerator // g}/{denominator // g}, which is not an integer")
            solution = Dim(numerator // denominator)
        else:
            quotient = rest.divide(a)
            if quotient is None:
                raise DimSolveError(f"= {_grouped(rest)}/{_grouped(a)}, which is not a sum of products of dims")
            solution = quotient
    if not solution.is_positive:
        raise DimSolveError(f"= {solution}, which is not positive")
    return solution


Shape = tuple[Dim, ...]


def shape_str(shape: Shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


@dataclass(frozen=True)
class Space:
    """The rows a value lives on: a domain and, within it, a named set of rows. ``name`` is "" for
    the graph's own rows of the domain (its nodes, the edges of its ``edge_index``, its graphs); an
    edge value may instead live on another edge set of the program (``edge<pairs>``: an edge set the
    graph carries beside its edges, or one derived from another, such as ``self_loops(edge)``), and a
    node value on a node type of a typed graph (``node<paper>``; a typed edge set's name carries its
    endpoint types, ``typed_edge_set``). Two values combine row by row only when they live on the same
    space."""

    domain: Domain
    name: str = ""

    def __str__(self) -> str:
        return f"{self.domain}<{self.name}>" if self.name else str(self.domain)


TYPED_SET_MARK = ":"  # a typed edge set's IR name: ``writes:author->paper``


def typed_edge_set(name: str, src: str, dst: str) -> str:
    """The IR name of the edge set ``name`` from nodes of type ``src`` to nodes of type ``dst``
    (``writes:author->paper``): the name carries its endpoint types, so that every type rule reads
    them off the op's ``edges`` attribute."""
    return f"{name}{TYPED_SET_MARK}{src}->{dst}"


def edge_set_ends(name: str) -> tuple[str, str]:
    """The node types (source, destination) of the edge set ``name`` (an IR name): ("", "") for the
    graph's own edges and for a set over the graph's own nodes."""
    if TYPED_SET_MARK not in name:
        return "", ""
    src, _, dst = name.split(TYPED_SET_MARK, 1)[1].partition("->")
    return src, dst


def edge_set_relation(name: str) -> str:
    """An edge set's name as the source language writes it (``writes`` for ``writes:author->paper``)."""
    return name.split(TYPED_SET_MARK, 1)[0]


def node_label(node_type: str) -> str:
    """A node set as the source language names it: ``node`` for the graph's own nodes, else
    ``node<paper>``."""
    return f"node<{node_type}>" if node_type else "node"


@dataclass(frozen=True)
class TensorType:
    domain: Domain
    shape: Shape
    dtype: str
    rowset: str = ""  # an edge value's edge set, a node value's node type ("": the graph's own); see ``Space``

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
        if {s.domain for s in spaces} == {Domain.NODE}:
            raise TypeRuleError(
                f"{what} combines {kinds} values, which live on different node types",
                "values of two node types never combine row by row: move values between types along a typed "
                "edge set (sum(h[writes.src]) by dst) first",
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
