"""The IR's operations: names with per-op rule tables.

Each op is an ``OpDef``: its name, arity, the attributes it takes and its *type rule*
(operand types + attrs -> result type), plus a one-line contract. Everything else an op
has (evaluation in each backend, later differentiation) lives in per-op tables elsewhere,
keyed by the op's name. Source ops (``input``, ``param``, ``const``, ``degree``) have no
operands: their declared type is checked instead of inferred.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from mpdsl.types import (Dim, Domain, INT_DTYPE, TensorType, TypeRuleError, broadcast_shapes,
                         join_domains, shape_str)

Attrs = dict[str, Any]
TypeRule = Callable[[list[TensorType], Attrs, TensorType | None], TensorType]

AGGREGATIONS = ("sum", "mean", "max", "min", "std")
AXIS_REDUCTIONS = ("sum", "mean", "max", "min")
REDUCE_AXES = ("src", "dst", "graph")
GATHER_INDICES = ("src", "dst", "batch")
INITIALIZERS = ("glorot", "zeros", "ones", "normal", "uniform", "constant")


@dataclass(frozen=True)
class OpDef:
    name: str
    arity: int | None  # None: variadic (at least one operand)
    attrs: dict[str, Any]  # attr name -> tuple of allowed values, or a Python type
    rule: TypeRule = field(repr=False)
    doc: str = ""
    declared: bool = False  # the rule reads the value's declared type (sources, reshape, one_hot)

    def check_attrs(self, attrs: Attrs) -> None:
        if set(attrs) != set(self.attrs):
            raise TypeRuleError(f"op {self.name} takes attributes {sorted(self.attrs)}, got {sorted(attrs)}")
        for key, allowed in self.attrs.items():
            value = attrs[key]
            ok = value in allowed if isinstance(allowed, tuple) else isinstance(value, allowed)
            if not ok:
                raise TypeRuleError(f"op {self.name}: attribute {key}={value!r} is not one of {allowed}")

    def infer(self, types: list[TensorType], attrs: Attrs, declared: TensorType | None = None) -> TensorType:
        if self.arity is not None and len(types) != self.arity:
            raise TypeRuleError(f"{self.name} takes {self.arity} operand(s), got {len(types)}")
        if self.arity is None and not types:
            raise TypeRuleError(f"{self.name} takes at least one operand")
        self.check_attrs(attrs)
        return self.rule(types, attrs, declared)


OPS: dict[str, OpDef] = {}


def op(name: str, arity: int | None, attrs: dict[str, Any] | None = None, *, source: bool = False,
       declared: bool = False):
    """Register the decorated type rule as op ``name``; its docstring is the op's contract."""

    def register(rule: TypeRule) -> TypeRule:
        OPS[name] = OpDef(name, arity, attrs or {}, rule, (rule.__doc__ or "").strip(), source or declared)
        return rule

    return register


def _require_float(t: TensorType, what: str, operand: int = 0) -> None:
    if not t.is_float:
        raise TypeRuleError(f"{what} needs float values, got {t}",
                            "int inputs (edge types, node types, batch ids) can only index parameters: W[etype]",
                            operand)


def _require_declared(declared: TensorType | None, name: str) -> TensorType:
    if declared is None:
        raise TypeRuleError(f"source op {name} needs a declared type")
    return declared


def _normalize_axis(axis: int, rank: int, what: str) -> int:
    if not -rank <= axis < rank:
        raise TypeRuleError(f"{what}: axis {axis} is out of range for {rank} feature axes",
                            "feature axes count from 0 (the row axis is implicit); -1 is the last")
    return axis % rank


# ---- sources -----------------------------------------------------------------------------


@op("input", 0, {"name": str}, source=True)
def _input(types, attrs, declared):
    """A model input, looked up by name in the call's inputs, then in the graph's arrays."""
    t = _require_declared(declared, "input")
    if t.domain is Domain.PARAM:
        raise TypeRuleError("an input has domain node, edge or graph")
    return t


@op("param", 0, {"name": str, "init": str}, source=True)
def _param(types, attrs, declared):
    """A learnable parameter, read from the model's parameter store by name."""
    t = _require_declared(declared, "param")
    if t.domain is not Domain.PARAM or not t.is_float:
        raise TypeRuleError("a parameter is a float param value")
    return t


@op("const", 0, {"value": float}, source=True)
def _const(types, attrs, declared):
    """A float scalar constant (param[])."""
    t = _require_declared(declared, "const")
    if t.domain is not Domain.PARAM or t.shape or not t.is_float:
        raise TypeRuleError("a constant is a float param[] scalar")
    return t


@op("degree", 0, {"dir": ("in", "out")}, source=True)
def _degree(types, attrs, declared):
    """Per-node edge count as float: ``in`` counts edges j->i at i, ``out`` at j (multi-edges count)."""
    t = _require_declared(declared, "degree")
    if t.domain is not Domain.NODE or t.shape or not t.is_float:
        raise TypeRuleError("a degree is a float node[] value")
    return t


# ---- elementwise -------------------------------------------------------------------------

UNARY_OPS = ("neg", "relu", "sigmoid", "tanh", "exp", "log", "sqrt", "rsqrt", "abs", "gelu",
             "silu", "softplus")
UNARY_OPS_WITH_ATTR = {"leaky_relu": "slope", "elu": "alpha", "dropout": "p"}
BINARY_OPS = ("add", "sub", "mul", "div", "pow", "maximum", "minimum")

_UNARY_DOCS = {
    "neg": "-x", "relu": "max(x, 0)", "sigmoid": "1 / (1 + exp(-x))", "tanh": "tanh(x)",
    "exp": "exp(x)", "log": "natural log", "sqrt": "square root", "rsqrt": "1 / sqrt(x)",
    "abs": "|x|", "gelu": "x * Phi(x) (exact, erf form)", "silu": "x * sigmoid(x)",
    "softplus": "log(1 + exp(x))", "leaky_relu": "x if x > 0 else slope * x",
    "elu": "x if x > 0 else alpha * (exp(x) - 1)",
    "dropout": "identity at inference; in training, zero with probability p and scale by 1/(1-p)",
}
_BINARY_DOCS = {"add": "a + b", "sub": "a - b", "mul": "a * b", "div": "a / b", "pow": "a ** b",
                "maximum": "elementwise max", "minimum": "elementwise min"}


def _unary_rule(name):
    def rule(types, attrs, declared):
        _require_float(types[0], OPERATOR_SYMBOLS.get(name, f"'{name}'"))
        return types[0]
    rule.__doc__ = f"Elementwise {_UNARY_DOCS[name]}; type preserved."
    return rule


OPERATOR_SYMBOLS = {"add": "'+'", "sub": "'-'", "mul": "'*'", "div": "'/'", "pow": "'**'", "neg": "'-'"}


def _broadcast_float_type(types: list[TensorType], shown: str) -> TensorType:
    """The type of an elementwise op over float operands: joined domain, broadcast shape."""
    for i, t in enumerate(types):
        _require_float(t, shown, i)
    return TensorType(join_domains(types, shown), broadcast_shapes([t.shape for t in types], shown), types[0].dtype)


def _binary_rule(name):
    shown = OPERATOR_SYMBOLS.get(name, f"'{name}'")

    def rule(types, attrs, declared):
        return _broadcast_float_type(types, shown)
    rule.__doc__ = (f"Elementwise {_BINARY_DOCS[name]} with broadcasting (params uniform over rows, "
                    "feature shapes aligned from the left).")
    return rule


for _name in UNARY_OPS:
    op(_name, 1)(_unary_rule(_name))
for _name, _attr in UNARY_OPS_WITH_ATTR.items():
    op(_name, 1, {_attr: float})(_unary_rule(_name))
for _name in BINARY_OPS:
    op(_name, 2)(_binary_rule(_name))


# ---- dense algebra -----------------------------------------------------------------------


@op("matmul", 2)
def _matmul(types, attrs, declared):
    """Contract the last feature axis of a with the first of b: a[..., K] @ b[K, ...] -> [..., ...].

    With a param b, every row of a is multiplied by the same matrix; with b of a's domain
    (e.g. W[etype] on edges), each row by its own."""
    a, b = types
    _require_float(a, "matmul", 0)
    _require_float(b, "matmul", 1)
    if a.rank < 1:
        raise TypeRuleError(f"matmul needs a feature axis on the left, got {a}",
                            "scale by a scalar with * instead", 0)
    if b.rank < 1:
        raise TypeRuleError(f"matmul needs a feature axis on the right, got {b}",
                            "scale by a scalar with * instead", 1)
    if a.shape[-1] != b.shape[0]:
        raise TypeRuleError(
            f"matmul shape mismatch: {shape_str(a.shape)} @ {shape_str(b.shape)} "
            f"(inner dims {a.shape[-1]} and {b.shape[0]} differ)",
            "the last feature dim of the left operand must equal the first dim of the right one")
    domain = join_domains(types, "matmul")
    return TensorType(domain, a.shape[:-1] + b.shape[1:], a.dtype)


@op("reduce", 1, {"reduce": AXIS_REDUCTIONS, "axis": int})
def _reduce(types, attrs, declared):
    """Reduce one feature axis (sum, mean, max, min); rows are kept."""
    (t,) = types
    _require_float(t, "reduce")
    axis = _normalize_axis(attrs["axis"], t.rank, f"{attrs['reduce']}")
    return t.with_(shape=t.shape[:axis] + t.shape[axis + 1:])


@op("axis_softmax", 1, {"axis": int})
def _axis_softmax(types, attrs, declared):
    """Softmax along one feature axis of each row."""
    (t,) = types
    _require_float(t, "softmax")
    _normalize_axis(attrs["axis"], t.rank, "softmax")
    return t


@op("concat", None, {"axis": int})
def _concat(types, attrs, declared):
    """Concatenate along a feature axis; all operands share domain, rank and the other dims."""
    domains = {t.domain for t in types}
    if len(domains) > 1:
        raise TypeRuleError(f"concat of values of different domains ({', '.join(sorted(map(str, domains)))})",
                            "gather or reduce to one domain first", 1)
    rank = types[0].rank
    if rank == 0:
        raise TypeRuleError("concat needs values with a feature axis", "reshape scalars with reshape(x, [1])", 0)
    axis = _normalize_axis(attrs["axis"], rank, "concat")
    total = Dim(0)
    for i, t in enumerate(types):
        _require_float(t, "concat", i)
        if t.rank != rank or t.shape[:axis] + t.shape[axis + 1:] != types[0].shape[:axis] + types[0].shape[axis + 1:]:
            raise TypeRuleError(f"concat: {t} does not match {types[0]} outside axis {axis}",
                                "all operands need the same feature shape except along the concat axis", i)
        total = _add_dims(total, t.shape[axis])
    return types[0].with_(shape=types[0].shape[:axis] + (total,) + types[0].shape[axis + 1:])


def _add_dims(a: Dim, b: Dim) -> Dim:
    if a.is_static and b.is_static:
        return Dim(a.value + b.value)
    if a == Dim(0):
        return b
    if a.symbols == b.symbols:
        return Dim(a.coeff + b.coeff, a.symbols)
    raise TypeRuleError(f"concat along an axis of dims {a} and {b} needs their sum, which is not a product of dims",
                        "bind the dims to integers with `dim NAME = value`")


def parse_subscripts(spec: str) -> tuple[list[str], str]:
    """'hd,hde->he' -> (['hd', 'hde'], 'he'); letters name feature axes."""
    if spec.count("->") != 1:
        raise TypeRuleError(f"einsum subscripts {spec!r} need exactly one '->'", "e.g. \"hd,hde->he\"")
    lhs, out = spec.replace(" ", "").split("->")
    inputs = lhs.split(",")
    for term in inputs + [out]:
        if not all("a" <= c <= "z" for c in term):
            raise TypeRuleError(f"einsum subscripts {spec!r}: use the letters a-z, one per feature axis",
                                "the row axis is implicit and shared")
    return inputs, out


def _subscript_sizes(types, spec: str, what: str) -> tuple[dict[str, Dim], str]:
    """Check einsum-style subscripts against the operands (one letter per feature axis, a letter's
    axes of one size, distinct output letters from the inputs); the size of each letter and the
    output term."""
    inputs, out = parse_subscripts(spec)
    if len(inputs) != len(types):
        raise TypeRuleError(f"{what} subscripts {spec!r} name {len(inputs)} operand(s), got {len(types)}",
                            "one comma-separated term per operand, e.g. einsum(\"hd,hde->he\", a, b)")
    sizes: dict[str, Dim] = {}
    for i, (term, t) in enumerate(zip(inputs, types)):
        _require_float(t, what, i)
        if len(term) != t.rank:
            raise TypeRuleError(f"{what} term {term!r} has {len(term)} letters but operand {i + 1} is {t}",
                                "one letter per feature axis", i)
        for letter, dim in zip(term, t.shape):
            if sizes.setdefault(letter, dim) != dim:
                raise TypeRuleError(f"{what} axis {letter!r} is {sizes[letter]} in one operand and {dim} in another",
                                    "axes with the same letter need the same size", i)
    if len(set(out)) != len(out) or not set(out) <= set(sizes):
        raise TypeRuleError(f"{what} output {out!r} must use distinct letters from the inputs",
                            "each output letter once, each one a letter of an input term")
    return sizes, out


@op("einsum", None, {"spec": str})
def _einsum(types, attrs, declared):
    """Einstein summation over feature axes, e.g. "hd,hde->he" (per-head matmul); the row axis is
    implicit and shared by all non-param operands; letters absent from the output are summed."""
    sizes, out = _subscript_sizes(types, attrs["spec"], "einsum")
    domain = join_domains(types, "einsum")
    return TensorType(domain, tuple(sizes[c] for c in out), types[0].dtype)


def shape_size(shape) -> Dim:
    size = Dim(1)
    for d in shape:
        size = size * d
    return size


@op("reshape", 1, declared=True)
def _reshape(types, attrs, declared):
    """Reshape each row's features to the declared shape (same number of elements)."""
    (t,) = types
    target = _require_declared(declared, "reshape")
    if shape_size(t.shape) != shape_size(target.shape):
        raise TypeRuleError(f"cannot reshape {shape_str(t.shape)} ({shape_size(t.shape)} elements) to "
                            f"{shape_str(target.shape)} ({shape_size(target.shape)} elements)",
                            "the new shape must hold the same number of elements per row")
    return t.with_(shape=target.shape)


@op("one_hot", 1, {"classes": int}, declared=True)
def _one_hot(types, attrs, declared):
    """Float indicator vector of each row's int id: one_hot(etype, R)[r] = 1 if etype == r (ids >= R are
    refused at run time)."""
    (t,) = types
    target = _require_declared(declared, "one_hot")
    if t.dtype != INT_DTYPE or t.domain is Domain.PARAM or t.rank != 0:
        raise TypeRuleError(f"one_hot takes int ids (a node, edge or graph int input), got {t}",
                            "declare the ids as, e.g., etype: edge int", 0)
    if attrs["classes"] < 1:
        raise TypeRuleError("one_hot needs at least one class")
    if not target.is_float or target.domain is not t.domain or target.shape != (Dim(attrs["classes"]),):
        raise TypeRuleError(f"one_hot of {t} with {attrs['classes']} classes is {t.domain}[{attrs['classes']}] float")
    return target


# ---- normalisation -----------------------------------------------------------------------

BATCH_NORM_MODES = ("auto", "train", "eval")


@op("batch_norm", 5, {"eps": float, "momentum": float, "mode": BATCH_NORM_MODES})
def _batch_norm(types, attrs, declared):
    """Batch normalisation over the rows (Ioffe & Szegedy 2015), as torch.nn.BatchNorm1d: operands x
    (node, edge or graph values), running_mean, running_var, gamma, beta (params of x's feature
    shape). Training: (x - mu) / sqrt(var + eps) * gamma + beta with mu, var the mean and biased
    variance of each feature element over the rows, and the running statistics updated in place:
    running = (1 - momentum) * running + momentum * batch statistic (unbiased variance). Inference:
    the running statistics in place of mu and var. ``mode`` "train" / "eval" fixes the form; "auto"
    follows the run (train() / eval()) and is differentiated in its inference form."""
    x, *stats = types
    _require_float(x, "batch_norm")
    if x.domain is Domain.PARAM:
        raise TypeRuleError(f"batch_norm normalises over the rows of a node, edge or graph value, got {x}",
                            "apply it to per-node, per-edge or per-graph values", 0)
    names = ("running_mean", "running_var", "gamma", "beta")
    for i, (name, t) in enumerate(zip(names, stats), start=1):
        if t.domain is not Domain.PARAM or not t.is_float or t.shape != x.shape:
            raise TypeRuleError(f"batch_norm: {name} must be a param[{', '.join(map(str, x.shape))}] "
                                f"(the feature shape of x), got {t}", operand=i)
    if attrs["eps"] <= 0 or not 0 <= attrs["momentum"] <= 1:
        raise TypeRuleError(f"batch_norm needs eps > 0 and 0 <= momentum <= 1, got eps={attrs['eps']}, "
                            f"momentum={attrs['momentum']}")
    return x


def running_statistic(value) -> tuple[str, tuple[int, ...]] | None:
    """Where a batch_norm running statistic (operand 1 or 2, an IR value) lives: (param name, the
    static indices into it), for a param or a param indexed by constants (``bn_mean[t]`` in a loop);
    None for anything else (then training cannot update it)."""
    indices: list[int] = []
    while value.op == "select":
        indices.append(value.attr["index"])
        value = value.operands[0]
    if value.op != "param":
        return None
    return value.attr["name"], tuple(reversed(indices))


# ---- graph movement ----------------------------------------------------------------------


@op("gather", 1, {"index": GATHER_INDICES})
def _gather(types, attrs, declared):
    """Move values along the graph: node -> edge by ``src`` or ``dst`` endpoint; graph -> node by ``batch``."""
    (t,) = types
    index = attrs["index"]
    needed = Domain.GRAPH if index == "batch" else Domain.NODE
    if t.domain is not needed:
        if index == "batch":
            hint = "x[batch] broadcasts per-graph values to their nodes"
        elif t.domain is Domain.EDGE:
            hint = "it already has one row per edge: use it directly, or reduce it first: sum(...) by dst"
        else:
            hint = f"x[{index}] reads node values at each edge's {'source' if index == 'src' else 'destination'}"
        raise TypeRuleError(f"cannot gather {_a(t.domain)} value by {index}: [{index}] reads {needed} values", hint, 0)
    return t.with_(domain=Domain.NODE if index == "batch" else Domain.EDGE)


@op("take", 2)
def _take(types, attrs, declared):
    """Index a parameter's first axis by an int value per row: W[etype] gives each edge its W_r."""
    w, idx = types
    if w.domain is not Domain.PARAM or w.rank < 1:
        raise TypeRuleError(f"only a parameter with a leading axis can be indexed by {idx}, got {w}",
                            "declare it as param[R, ...] with R the number of types", 0)
    if idx.dtype != INT_DTYPE or idx.domain is Domain.PARAM or idx.rank != 0:
        raise TypeRuleError(f"a parameter index must be an int node, edge or graph value, got {idx}",
                            "declare the input as, e.g., etype: edge int", 1)
    return TensorType(idx.domain, w.shape[1:], w.dtype)


@op("select", 1, {"index": int})
def _select(types, attrs, declared):
    """Static index into the first feature axis: W[t] with t a loop counter or an integer."""
    (t,) = types
    if t.rank < 1:
        raise TypeRuleError(f"cannot index {t}: it has no feature axis")
    size = t.shape[0]
    if size.is_static and not 0 <= attrs["index"] < size.value:
        raise TypeRuleError(f"index {attrs['index']} is out of range for an axis of size {size}")
    return t.with_(shape=t.shape[1:])


def _a(domain: Domain) -> str:
    return f"an {domain}" if domain is Domain.EDGE else f"a {domain}"


def _reduced_domain(t: TensorType, by: str, what: str) -> Domain:
    if by == "graph":
        if t.domain is not Domain.NODE:
            raise TypeRuleError(f"{what} by graph reduces node values to their graphs, got {_a(t.domain)} value",
                                "reduce edges to nodes first (sum(...) by dst)", 0)
        return Domain.GRAPH
    if t.domain is not Domain.EDGE:
        hint = (f"gather node values onto edges first: {what}(h[src]) by {by}" if t.domain is Domain.NODE
                else f"{what} by {by} reduces edge values onto nodes")
        raise TypeRuleError(f"{what} by {by} reduces edge values to nodes, got {_a(t.domain)} value", hint, 0)
    return Domain.NODE


@op("aggregate", 1, {"reduce": AGGREGATIONS, "by": REDUCE_AXES})
def _aggregate(types, attrs, declared):
    """Reduce edge rows onto nodes (by dst: over in-edges; by src: over out-edges) or node rows onto
    graphs (by graph). sum, mean, max, min, std (population); an empty group gives 0."""
    (t,) = types
    _require_float(t, attrs["reduce"])
    return t.with_(domain=_reduced_domain(t, attrs["by"], attrs["reduce"]))


@op("softmax", 1, {"by": REDUCE_AXES})
def _softmax(types, attrs, declared):
    """Segment softmax: normalise each edge row over the edges sharing its dst (or src) node, or each
    node row over the nodes of its graph; per feature element, max-subtracted."""
    (t,) = types
    _require_float(t, "softmax")
    _reduced_domain(t, attrs["by"], "softmax")
    return t


# ---- fused ops (created by the optimizer; see mpdsl/passes) ----------------------------------

LAYOUTS = ("auto", "csr_dst", "csr_src", "coo")
GRAPH_REDUCTIONS = ("sum", "mean", "max", "min")


def is_prefix(prefix, shape) -> bool:
    """Whether ``prefix`` is a leading part of ``shape``."""
    return len(prefix) <= len(shape) and tuple(shape[:len(prefix)]) == tuple(prefix)


def _edge_weights(w: TensorType, x: TensorType, what: str) -> None:
    if w.domain is not Domain.EDGE or not w.is_float:
        raise TypeRuleError(f"{what}: weights must be float edge values, got {w}", operand=1)
    if not is_prefix(w.shape, x.shape):
        raise TypeRuleError(f"{what}: weight shape {shape_str(w.shape)} is not a prefix of {shape_str(x.shape)}",
                            operand=1)


@op("gspmm", None, {"reduce": GRAPH_REDUCTIONS, "by": ("src", "dst"), "layout": LAYOUTS})
def _gspmm(types, attrs, declared):
    """Fused gather -> weight -> reduce (g-SpMM): by dst, out_i = reduce over edges j->i of w_e * x_j
    (by src, over edges j->i into j, of w_e * x_i). Operands: x node[S], optionally w edge[P] with P a
    prefix of S (scalar or per-head weights). Never materialises an E x S tensor."""
    if len(types) not in (1, 2):
        raise TypeRuleError("gspmm takes x and optional edge weights")
    x = types[0]
    if x.domain is not Domain.NODE or not x.is_float:
        raise TypeRuleError(f"gspmm reads float node values, got {x}", operand=0)
    if len(types) == 2:
        _edge_weights(types[1], x, "gspmm")
    return x


@op("attention", 2, {"by": ("src", "dst"), "layout": LAYOUTS})
def _attention(types, attrs, declared):
    """Fused edge softmax and weighted aggregation: by dst, out_i = sum over edges j->i of
    softmax_i(s)_e * x_j, the softmax over each node's in-edges per score element (online softmax:
    no normalised E x S tensor). s edge[P], x node[S], P a prefix of S."""
    s, x = types
    if x.domain is not Domain.NODE or not x.is_float:
        raise TypeRuleError(f"attention aggregates float node values, got {x}", operand=1)
    if s.domain is not Domain.EDGE or not s.is_float or not is_prefix(s.shape, x.shape):
        raise TypeRuleError(f"attention scores must be edge values with a prefix shape of {shape_str(x.shape)}, "
                            f"got {s}", operand=0)
    return x


@op("typed_linear", 3, {"index": ("src", "dst")})
def _typed_linear(types, attrs, declared):
    """Relation-typed matmul with compact materialisation: out_e = h[index_e] @ W[t_e], computed once
    per distinct (node, type) pair and gathered to the edges. h node[..., D], W param[R, D, ...], t edge int."""
    h, w, t = types
    if h.domain is not Domain.NODE or w.domain is not Domain.PARAM or w.rank < 2:
        raise TypeRuleError(f"typed_linear takes node values and a param[R, D, ...], got {h} and {w}")
    if t.domain is not Domain.EDGE or t.dtype != INT_DTYPE or t.rank != 0:
        raise TypeRuleError(f"typed_linear indexes by an int edge value, got {t}", operand=2)
    if h.rank < 1 or h.shape[-1] != w.shape[1]:
        raise TypeRuleError(f"typed_linear shape mismatch: {shape_str(h.shape)} @ {shape_str(w.shape[1:])}")
    return TensorType(Domain.EDGE, h.shape[:-1] + w.shape[2:], h.dtype)


# ---- ops used by gradient programs (mpdsl.autodiff); not spelled in the source language ------------


def _comparison_rule(name: str, symbol: str):
    def rule(types, attrs, declared):
        return _broadcast_float_type(types, f"'{name}'")

    rule.__doc__ = (f"Elementwise comparison: 1.0 where a {symbol} b, else 0.0 (float), with the broadcasting "
                    "of binary ops. Piecewise constant: no gradient.")
    return rule


op("gt", 2)(_comparison_rule("gt", ">"))
op("eq", 2)(_comparison_rule("eq", "=="))


@op("contract_rows", None, {"spec": str})
def _contract_rows(types, attrs, declared):
    """Einstein summation like einsum (letters name feature axes) that also sums the implicit row
    axis shared by the non-param operands, e.g. "k,m->km" on two node values is the sum over nodes of
    their outer products: the result is a param value. At least one operand has rows."""
    sizes, out = _subscript_sizes(types, attrs["spec"], "contract_rows")
    if join_domains(types, "contract_rows") is Domain.PARAM:
        raise TypeRuleError("contract_rows sums over rows: at least one operand must be a node, edge or "
                            "graph value", "use einsum on param values")
    return TensorType(Domain.PARAM, tuple(sizes[c] for c in out), types[0].dtype)


@op("broadcast", 1, declared=True)
def _broadcast(types, attrs, declared):
    """Expand to the declared type: feature axes of size 1 (and missing trailing axes) are repeated,
    shapes aligned from the left; a param value may be repeated over the rows of a node, edge or
    graph domain."""
    (t,) = types
    declared = _require_declared(declared, "broadcast")
    _require_float(t, "broadcast")
    if t.domain is not declared.domain and t.domain is not Domain.PARAM:
        raise TypeRuleError(f"cannot broadcast {t} to {declared}: different rows")
    if t.rank > declared.rank or broadcast_shapes([t.shape, declared.shape], "broadcast") != declared.shape:
        raise TypeRuleError(f"cannot broadcast {t} to {declared}")
    if t.dtype != declared.dtype:
        raise TypeRuleError(f"broadcast keeps the dtype: {t} to {declared}")
    return declared


def _static_axis(t: TensorType, axis: int, what: str) -> tuple[int, int]:
    if t.rank < 1:
        raise TypeRuleError(f"{what} needs a feature axis, got {t}")
    axis = _normalize_axis(axis, t.rank, what)
    size = t.shape[axis]
    if not size.is_static:
        raise TypeRuleError(f"{what} along an axis of symbolic size {size}", "bind the dims first")
    return axis, size.value


@op("slice", 1, {"axis": int, "start": int, "stop": int})
def _slice(types, attrs, declared):
    """Elements start..stop-1 of one feature axis (of static size)."""
    (t,) = types
    axis, size = _static_axis(t, attrs["axis"], "slice")
    start, stop = attrs["start"], attrs["stop"]
    if not 0 <= start <= stop <= size:
        raise TypeRuleError(f"slice {start}:{stop} is out of range for an axis of size {size}")
    return t.with_(shape=t.shape[:axis] + (Dim(stop - start),) + t.shape[axis + 1:])


@op("pad", 1, {"axis": int, "before": int, "after": int})
def _pad(types, attrs, declared):
    """Zero-pad one feature axis (of static size) with ``before`` and ``after`` elements (the
    transpose of slice)."""
    (t,) = types
    _require_float(t, "pad")
    axis, size = _static_axis(t, attrs["axis"], "pad")
    if attrs["before"] < 0 or attrs["after"] < 0:
        raise TypeRuleError("pad widths are not negative")
    return t.with_(shape=t.shape[:axis] + (Dim(size + attrs["before"] + attrs["after"]),) + t.shape[axis + 1:])
