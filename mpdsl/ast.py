"""Abstract syntax of .mp programs. Every node keeps the span of the text it came from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from mpdsl.diagnostics import Span


@dataclass(frozen=True)
class Node:
    span: Span = field(repr=False, compare=False)


# ---- types -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DimExpr(Node):
    """A dimension as written: a name (``kind`` "name", ``value`` the name), an integer literal
    ("int"), or a sum or product of dimensions ("sum", "product": ``operands``, flattened, so
    ``F + G + H`` is one sum; parentheses nest a sum in a product). ``depth``: the nesting of sums
    and products (at most ``limits.MAX_NESTING``, checked by the parser)."""

    kind: str
    value: str | int | None = None
    operands: tuple[DimExpr, ...] = ()
    depth: int = field(default=0, compare=False, repr=False)

    @property
    def plain_name(self) -> str | None:
        """The name when the dimension is a single name (``F``), else None."""
        return self.value if self.kind == "name" and isinstance(self.value, str) else None

    def names(self) -> tuple[str, ...]:
        """The names it uses, each once, in the order written."""
        found: dict[str, None] = {}
        stack: list[DimExpr] = [self]
        while stack:
            d = stack.pop()
            if d.kind == "name":
                found.setdefault(str(d.value))
            stack.extend(reversed(d.operands))
        return tuple(found)

    def render(self, name_text: Callable[[str], str] = str) -> str:
        """The text (``2*D + FE``, ``2*(F + 1)``), each name shown as ``name_text`` gives it."""
        if self.kind == "name":
            return name_text(str(self.value))
        if self.kind == "int":
            return str(self.value)
        if self.kind == "sum":
            return " + ".join(d.render(name_text) for d in self.operands)
        return "*".join(f"({d.render(name_text)})" if d.kind == "sum" else d.render(name_text)
                        for d in self.operands)

    def __str__(self) -> str:
        return self.render()


@dataclass(frozen=True)
class TypeExpr(Node):
    domain: str  # node | edge | graph | param
    dims: tuple[DimExpr, ...]
    dtype: str  # float | int
    rowset: str | None = None  # edge<pairs>: the edge set named in angle brackets
    rowset_span: Span | None = field(default=None, repr=False, compare=False)

    def __str__(self) -> str:
        dims = ", ".join(str(d) for d in self.dims)
        suffix = " int" if self.dtype == "int" else ""
        rows = f"<{self.rowset}>" if self.rowset else ""
        return f"{self.domain}{rows}[{dims}]{suffix}"


@dataclass(frozen=True)
class Arg(Node):
    name: str
    type: TypeExpr
    init: str | float | None  # initializer name (glorot, zeros, ...) or a constant


@dataclass(frozen=True)
class Result(Node):
    name: str | None
    type: TypeExpr


# ---- expressions -------------------------------------------------------------------------


@dataclass(frozen=True)
class Expr(Node):
    pass


@dataclass(frozen=True)
class Number(Expr):
    """A number literal; ``int_value`` is its exact value when it is written as an integer of at
    most ``limits.MAX_INT`` (None otherwise: it is then usable as a float only)."""

    value: float
    is_int: bool
    int_value: int | None = None


@dataclass(frozen=True)
class Name(Expr):
    id: str


@dataclass(frozen=True)
class BinOp(Expr):
    op: str  # the IR op: add sub mul div matmul pow, lt le gt ge eq ne, logical_and logical_or
    lhs: Expr
    rhs: Expr


@dataclass(frozen=True)
class Neg(Expr):
    operand: Expr


@dataclass(frozen=True)
class Not(Expr):
    """``not x``: the logical negation of a mask."""

    operand: Expr


@dataclass(frozen=True)
class Index(Expr):
    """``base[index]``: a gather (h[src]), a broadcast (v[batch]) or a parameter lookup (W[etype])."""

    base: Expr
    index: Expr


@dataclass(frozen=True)
class Member(Expr):
    """``looped.src``: an endpoint (``src`` / ``dst``) of the edge set ``set``, used as an index
    (``h[looped.src]``)."""

    set: str
    attr: str
    set_span: Span = field(repr=False, compare=False)
    attr_span: Span = field(repr=False, compare=False)


@dataclass(frozen=True)
class String(Expr):
    """A string literal (einsum's subscripts)."""

    value: str


@dataclass(frozen=True)
class ShapeLiteral(Expr):
    dims: tuple[DimExpr, ...]


@dataclass(frozen=True)
class Keyword(Node):
    name: str
    value: Expr


@dataclass(frozen=True)
class Call(Expr):
    """``f(args...) [by axis]``; ``callee_span`` covers the function name."""

    func: str
    args: tuple[Expr, ...]
    keywords: tuple[Keyword, ...]
    by: str | None
    callee_span: Span = field(repr=False, compare=False)
    by_span: Span | None = field(repr=False, compare=False)
    by_set: str | None = None  # `by looped.dst`: the edge set named with the axis
    by_set_span: Span | None = field(default=None, repr=False, compare=False)


# ---- statements and definitions ----------------------------------------------------------


@dataclass(frozen=True)
class Assign(Node):
    targets: tuple[str, ...]
    value: Expr
    target_spans: tuple[Span, ...] = field(repr=False, compare=False)


@dataclass(frozen=True)
class Return(Node):
    values: tuple[Expr, ...]


@dataclass(frozen=True)
class For(Node):
    var: str
    start: str | int
    stop: str | int
    body: tuple[Node, ...]
    bounds_span: Span | None = field(default=None, repr=False, compare=False)  # `0..T`


@dataclass(frozen=True)
class DimDef(Node):
    name: str
    value: int


@dataclass(frozen=True)
class EdgesDef(Node):
    """``edges pairs`` (an input edge set, given with the graph as ``pairs_index``) or ``edges looped =
    self_loops(edge)`` (derived: ``kind`` the derivation, ``base`` the set it derives from, "edge" for
    the graph's own edges; ``count`` the text of a hop count, ``k_hop(edge, 2)``, as written: the
    checker reads it)."""

    name: str
    name_span: Span = field(repr=False, compare=False)
    kind: str | None = None
    base: str | None = None
    kind_span: Span | None = field(default=None, repr=False, compare=False)
    base_span: Span | None = field(default=None, repr=False, compare=False)
    count: str | None = None
    count_span: Span | None = field(default=None, repr=False, compare=False)
    src: str | None = None  # a typed input set (``edges writes: author -> paper``): its node types
    dst: str | None = None
    src_span: Span | None = field(default=None, repr=False, compare=False)
    dst_span: Span | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class NodesDef(Node):
    """``nodes paper``: a node type besides the graph's own nodes (values ``node<paper>[F]``)."""

    name: str
    name_span: Span = field(repr=False, compare=False)


@dataclass(frozen=True)
class Import(Node):
    """``import "path.mp"``: the dims and layers of another file (path relative to this one)."""

    path: str


@dataclass(frozen=True)
class FuncDef(Node):
    """A ``layer`` or a ``model``; ``kind`` says which."""

    kind: str
    name: str
    name_span: Span = field(repr=False, compare=False)
    args: tuple[Arg, ...] = ()
    results: tuple[Result, ...] = ()
    results_parenthesised: bool = False
    body: tuple[Node, ...] = ()


@dataclass(frozen=True)
class Module(Node):
    items: tuple[Import | DimDef | EdgesDef | NodesDef | FuncDef, ...]

    @property
    def imports(self) -> tuple[Import, ...]:
        return tuple(i for i in self.items if isinstance(i, Import))

    @property
    def dims(self) -> tuple[DimDef, ...]:
        return tuple(i for i in self.items if isinstance(i, DimDef))

    @property
    def edge_sets(self) -> tuple[EdgesDef, ...]:
        return tuple(i for i in self.items if isinstance(i, EdgesDef))

    @property
    def node_types(self) -> tuple[NodesDef, ...]:
        return tuple(i for i in self.items if isinstance(i, NodesDef))

    @property
    def layers(self) -> tuple[FuncDef, ...]:
        return tuple(i for i in self.items if isinstance(i, FuncDef) and i.kind == "layer")

    @property
    def models(self) -> tuple[FuncDef, ...]:
        return tuple(i for i in self.items if isinstance(i, FuncDef) and i.kind == "model")


def dump(node: object, indent: int = 0) -> str:
    """A readable indented dump of an AST (``mpdsl compile --emit ast``). Iterative, so a long
    chain such as a 1,000-term sum dumps as well as a short one."""
    lines: list[str] = []
    stack: list[tuple[object, int]] = [(node, indent)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, str):  # a field heading, already formatted
            lines.append(item)
            continue
        pad = "  " * level
        if not isinstance(item, Node):
            lines.append(f"{pad}{item!r}")
            continue
        head = f"{pad}{type(item).__name__}"
        if isinstance(item, (Name, Number)):
            lines.append(f"{head}({item.id if isinstance(item, Name) else item.value})")
            continue
        if isinstance(item, (TypeExpr, DimExpr)):
            lines.append(f"{head}({item})")
            continue
        lines.append(head)
        pending: list[tuple[object, int]] = []
        for f in item.__dataclass_fields__.values():
            if not f.compare or f.name == "span":
                continue
            value = getattr(item, f.name)
            if isinstance(value, tuple) and value and isinstance(value[0], Node):
                pending.append((f"{pad}  {f.name}:", 0))
                pending.extend((v, level + 2) for v in value)
            elif isinstance(value, Node):
                pending.append((f"{pad}  {f.name}:", 0))
                pending.append((value, level + 2))
            elif value not in (None, ()):
                pending.append((f"{pad}  {f.name}: {value!r}", 0))
        stack.extend(reversed(pending))
    return "\n".join(lines)
