"""Reverse-mode differentiation on the IR.

``grad_program(program, wrt=[...])`` builds a new, verified IR program that computes the gradients of
a program's outputs, JAX-style: ``ADJOINTS`` maps each op name to a rule that, given a value, the
cotangent of its result and a builder, emits the IR ops computing the cotangents of its operands
(vector-Jacobian products). Ops whose results carry no gradient are listed, with the reason, in
``NOT_DIFFERENTIABLE``; every op of ``mpdsl.ops.OPS`` must be in one table or the other
(``missing_adjoints()``).

The gradient program's inputs are the forward program's inputs and parameters plus one cotangent
per differentiated output (``input`` ``d_<output>``, or a ``param`` for a param-domain output); its
outputs are ``d_<param>`` for every parameter in ``wrt`` (then ``d_<input>`` for the inputs asked
for). It contains the forward values it needs (the forward program's own values, shared), so it is
best built from the reference IR and then optimized like any program: the passes fuse the backward
graph ops too (the transpose of a gather by src is a sum by src, which becomes a g-SpMM).
``split_program`` then cuts an optimized gradient program into a forward part (outputs and the
residuals the backward reads) and a backward part, so that training computes forward values once,
except what the backward recomputes instead of saving (``rematerialized``): pure elementwise functions
and gathers of other residuals (a ReLU's mask), and edge values of gathered node values when those
take fewer bytes (GAT's leaky-ReLU scores from their per-node halves ``el[src] + er[dst]``: no E x H
residual).

Rules worth knowing:

* graph movement: ``gather by src`` <-> ``sum by src`` (likewise dst; ``batch`` <-> ``by graph``);
  ``mean`` divides by max(count, 1) before gathering; ``max``/``min`` route the cotangent to the
  elements equal to the result, split evenly among ties (as torch's amax/scatter_reduce): for a
  gathered operand the optimizer runs the tie mask's sums as ``match_gspmm`` (no E x F mask);
  segment ``softmax``: y * (g - sum(y * g) [gathered]).
* elementwise ops un-broadcast: a param operand's cotangent is summed over rows (``contract_rows``)
  and over broadcast feature axes; ``maximum``/``minimum`` split ties in half (as torch).
* ``matmul``: the left cotangent is g @ b^T (a matmul), a param right operand gets
  sum over rows of a^T g (``contract_rows``, one BLAS product).
* ``take`` (W[etype]): the cotangent is scattered back per type with one_hot(etype) contracted
  against it over the rows.
* ``dropout`` is differentiated with inference semantics (identity). For training, first replace each
  dropout by a multiplication with a mask input (``mask_dropout``) so that the forward and backward
  programs use the same mask.
* ``batch_norm`` in its training form (mode "train") is differentiated through the batch statistics,
  as torch's BatchNorm; its running statistics get no gradient there. Mode "auto" (what the source
  language emits) is differentiated with inference semantics, like dropout: for training, first fix
  the mode (``set_batch_norm_mode``).
* fused ops are differentiated by emitting their unfused definition (``OpDef.unfused``) and
  differentiating that, except ``attention``: its adjoint is the fused backward, a destination pass
  for the scores (``attention_score_grad``) and a source pass for the values
  (``attention_value_grad``), both recomputing the softmax weights from the scores and the per-node
  log-sum-exp (``segment_logsumexp``), the only statistic saved from the forward. Programs in which
  the optimizer fused the attention before differentiation (``PRE_GRADIENT_PASSES``) so get a
  backward with no E x S tensor. The max / min adjoint's tie counts and routed cotangent become
  ``match_gspmm`` sums in the optimizer (``fuse_match_aggregate``), with no E x S mask.
* ``global_attention`` (a primitive: attention among all nodes of each graph) saves its per-node
  log-sum-exp beside its output (one packed value); its adjoint is a query pass
  (``global_attention_query_grad``) and a key pass (``global_attention_key_grad``) that recompute the
  softmax weights block by block, flash-attention style. Those two are fused ops defined by
  ``global_attention`` itself (a global attention of wider per-node values), so they are
  differentiated again through that definition.

The builder keeps the emitted IR narrow: products and broadcasts it made are folded into the
contractions that consume them, ``W[etype]`` enters contractions as one_hot(etype) x W (no per-edge
weight tensor), param factors leave sum aggregations, and a row sum of x[src] times edge values sums
the edge values per node first.

Adjoints build masks with the comparisons (``gt``, ``eq``, ...: float 0/1 values, no gradient) and
``where`` (its own adjoint routes the cotangent to the side each element selected), and some need IR
ops the source language does not expose (``mpdsl.ops``, "ops used by gradients"): ``contract_rows``
(einsum that also sums the row axis: a param result), ``broadcast`` (expand to a declared type; the
language's ``full`` is one), ``slice`` and ``pad`` (a feature-axis range and its transpose).
Piecewise-constant ops (comparisons, logic, ``sign``, ``floor``, ``ceil``, ``round``, ``trunc``) and
the constants (``arange``, ``linspace``) carry no gradient: what depends on a parameter only through
them gets a zero gradient, as torch's backward gives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from mpdsl.diagnostics import CompileError
from mpdsl.ir import Program, Value, make_value, verify
from mpdsl.ops import OPS, MissingRule, Trait, is_pure, parse_subscripts, running_statistic
from mpdsl.passes.rewrite import Rewriter, prune, rewrite, specialize
from mpdsl.types import FLOAT_DTYPES, ITEMSIZE, Dim, Domain, Space, TensorType, TypeRuleError

LETTERS = "abcdefghijklmnopqrstuvwxyz"
OPPOSITE = {"src": "dst", "dst": "src"}
GATHER_FOR = {"src": "src", "dst": "dst", "graph": "batch"}      # aggregate by -> gather index
AGGREGATE_FOR = {"src": "src", "dst": "dst", "batch": "graph"}   # gather index -> aggregate by


# =====================================================================================================
# The builder and helpers the rules emit through
# =====================================================================================================


class GradBuilder(Rewriter):
    """A Rewriter whose emitted values carry the span of the value being differentiated (``like``),
    with shorthands for the ops the rules use.

    It simplifies what it emits (the rules stay literal): a ``broadcast`` it made is not
    materialised when an elementwise op broadcasts anyway; param factors leave sum / mean
    aggregations (sum(m * p) by dst = sum(m) by dst * p); and ``contract`` merges the products,
    broadcasts and contractions it made, and ``W[ids]`` values, into one contraction."""

    def __init__(self, dtype: str):
        super().__init__()
        self.dtype = dtype
        self.like: Value | None = None
        self._emitted: set[int] = set()

    def emit(self, op: str, operands, attrs: dict | None = None, like: Value | None = None,
             declared: TensorType | None = None) -> Value:
        try:
            value = super().emit(op, list(operands), attrs, like if like is not None else self.like, declared)
        except TypeRuleError as err:
            raise AssertionError(f"adjoint of {self.like!r} built an ill-typed {op}: {err.message}") from None
        self._emitted.add(id(value))
        return value

    def _made(self, v: Value, op: str) -> bool:
        return v.op == op and id(v) in self._emitted

    def c(self, value: float) -> Value:
        return self.const(value, self.dtype, like=self.like)

    def binary(self, op: str, a: Value | float, b: Value | float) -> Value:
        a = self.c(a) if not isinstance(a, Value) else a
        b = self.c(b) if not isinstance(b, Value) else b
        want = OPS[op].infer([a.type, b.type], {})
        for _ in range(2):  # use a broadcast's source when the op broadcasts it the same way
            if self._made(a, "broadcast") and OPS[op].infer([a.operands[0].type, b.type], {}) == want:
                a = a.operands[0]
            a, b = b, a
        return self.emit(op, [a, b])

    def add(self, a, b): return self.binary("add", a, b)
    def sub(self, a, b): return self.binary("sub", a, b)
    def mul(self, a, b): return self.binary("mul", a, b)
    def div(self, a, b): return self.binary("div", a, b)
    def gt(self, a, b): return self.binary("gt", a, b)
    def eq(self, a, b): return self.binary("eq", a, b)
    def maximum(self, a, b): return self.binary("maximum", a, b)
    def minimum(self, a, b): return self.binary("minimum", a, b)

    def unary(self, op: str, x: Value, **attrs) -> Value:
        return self.emit(op, [x], attrs)

    def neg(self, x): return self.unary("neg", x)

    def reshape(self, x: Value, shape: Sequence[Dim]) -> Value:
        shape = tuple(shape)
        if x.type.shape == shape:
            return x
        if self._made(x, "reshape") and x.operands[0].type.shape == shape:
            return x.operands[0]
        return self.emit("reshape", [x], declared=x.type.with_(shape=shape))

    def broadcast(self, x: Value, t: TensorType) -> Value:
        if x.type == t:
            return x
        return self.emit("broadcast", [x], declared=t)

    def gather(self, x: Value, index: str, edges: str = "") -> Value:
        """x[index] onto the edge set ``edges`` ("": the graph's own edges; none for batch)."""
        attrs = {"index": index, "edges": edges}
        if self._made(x, "broadcast") and x.operands[0].type.space == x.type.space:  # gather the narrow source
            moved = self.emit("gather", [x.operands[0]], attrs)
            return self.broadcast(moved, OPS["gather"].infer([x.type], attrs))
        return self.emit("gather", [x], attrs)

    def aggregate(self, x: Value, reduce: str, by: str) -> Value:
        """reduce(x) by ``by``, over the edge set x lives on."""
        attrs = {"reduce": reduce, "by": by, "edges": x.type.rowset if by != "graph" else ""}
        if reduce in ("sum", "mean") and self._made(x, "mul"):
            want = OPS["aggregate"].infer([x.type], attrs)
            for factor, rest in (x.operands, x.operands[::-1]):
                if factor.type.domain is Domain.PARAM and rest.type.space == x.type.space:
                    inner = rest.type.with_(domain=want.domain)
                    if OPS["mul"].infer([inner, factor.type], {}) == want:
                        return self.mul(self.aggregate(rest, reduce, by), factor)
        return self.emit("aggregate", [x], attrs)

    def reduce_sum(self, x: Value, axis: int) -> Value:
        return self.emit("reduce", [x], {"reduce": "sum", "axis": axis})

    def zeros(self, t: TensorType) -> Value:
        return self.broadcast(self.c(0.0), t)

    def contract(self, operands: Sequence[Value], terms: Sequence[str], target: str,
                 out: TensorType) -> Value:
        """The sum over all other letters (and over rows when ``out`` is a param and an operand has
        rows) of the product of ``operands``, laid out as ``target`` and expanded to ``out``: letters
        of ``target`` in no operand, and rows when no operand has any, are broadcast.

        Operands that are products or contractions themselves are merged in (the muls, broadcasts and
        einsums emitted here, and ``W[ids]`` as one_hot(ids) x W), so that no wide intermediate (an
        E x D x K weight per edge, an E x F product) is built when a narrower order exists: the
        backend's einsum picks the order. A row sum of a gathered value times edge values sums the
        edge values per node first: sum_e x[src_e] w_e = sum_j x_j (sum_{e from j} w_e)."""
        operands, terms = self._merge(list(operands), list(terms), target)
        if out.domain is Domain.PARAM:
            operands, terms = self._aggregate_before_row_sum(operands, terms, target)
        present = set("".join(terms))
        reduced = "".join(ch for ch in target if ch in present)
        rows = any(o.type.domain is not Domain.PARAM for o in operands)
        spec = f"{','.join(terms)}->{reduced}"
        if len(operands) == 1 and terms[0] == reduced and (operands[0].type.space == out.space
                                                             or operands[0].type.domain is Domain.PARAM):
            result = operands[0]
        elif out.domain is Domain.PARAM and rows:
            result = self.emit("contract_rows", operands, {"spec": spec})
        else:
            result = self.emit("einsum", operands, {"spec": spec})
        if reduced != target:
            shape = tuple(dim if ch in present else Dim(1) for ch, dim in zip(target, out.shape))
            result = self.reshape(result, shape)
        return self.broadcast(result, out)

    def _merge(self, operands: list[Value], terms: list[str], target: str) -> tuple[list[Value], list[str]]:
        used = set("".join(terms)) | set(target)
        several = len(operands) > 1

        def fresh() -> str:
            letter = next(ch for ch in LETTERS if ch not in used)
            used.add(letter)
            return letter

        def aligned(o: Value, outer: Value) -> bool:  # broadcast to outer by size-1 / missing trailing axes
            return ((o.type.space == outer.type.space or o.type.domain is Domain.PARAM)
                    and o.type.rank <= outer.type.rank
                    and all(d == e or d == Dim(1) for d, e in zip(o.type.shape, outer.type.shape)))

        def letters_of(o: Value, outer: Value, term: str) -> str:
            return "".join(term[i] if o.type.shape[i] == outer.type.shape[i] else fresh()
                           for i in range(o.type.rank))

        merged_ops: list[Value] = []
        merged_terms: list[str] = []
        pending = list(zip(operands, terms))
        while pending:
            o, term = pending.pop(0)
            if self._made(o, "einsum"):
                inner_terms, inner_out = parse_subscripts(o.attr["spec"])
                names = dict(zip(inner_out, term))
                for letter in sorted(set("".join(inner_terms)) - set(inner_out)):
                    names[letter] = fresh()
                pending[:0] = [(x, "".join(names[c] for c in t)) for x, t in zip(o.operands, inner_terms)]
            elif self._made(o, "mul") and all(aligned(x, o) for x in o.operands):
                pending[:0] = [(x, letters_of(x, o, term)) for x in o.operands]
            elif self._made(o, "broadcast") and o.operands[0].type.space == o.type.space:
                (x,) = o.operands
                pending.insert(0, (x, letters_of(x, o, term)))
            elif (self._made(o, "reshape")
                  and [d for d in o.type.shape if d != Dim(1)] == list(o.operands[0].type.shape)):
                # a reshape that only inserted size-1 axes: its source takes the other letters
                pending.insert(0, (o.operands[0], "".join(ch for ch, d in zip(term, o.type.shape) if d != Dim(1))))
            elif (several and o.op == "take" and o.type.domain is not Domain.PARAM
                  and o.operands[0].type.shape[0].is_static):
                w, index = o.operands
                r = fresh()
                one_hot = self.emit("one_hot", [index], {"classes": w.type.shape[0].value},
                                    declared=TensorType(index.type.domain, (w.type.shape[0],), self.dtype,
                                                        index.type.rowset))
                merged_ops += [one_hot, w]
                merged_terms += [r, r + term]
            else:
                merged_ops.append(o)
                merged_terms.append(term)
        return merged_ops, merged_terms

    def _aggregate_before_row_sum(self, operands: list[Value], terms: list[str], target: str
                                  ) -> tuple[list[Value], list[str]]:
        """For a row sum of x[idx] times edge values w1, w2...: the product of the w's, reduced to the
        letters x has, summed per idx node first, then the row sum over nodes (when that product is
        no wider than x)."""
        rows = [i for i, o in enumerate(operands) if o.type.domain is not Domain.PARAM]
        gathers = [i for i in rows if operands[i].op == "gather"]
        if len(gathers) != 1 or len(rows) < 2:
            return operands, terms
        (g,) = gathers
        gathered = operands[g]
        others = [i for i in rows if i != g]
        needed = set(terms[g]) | set(target) | {ch for i, t in enumerate(terms) if i not in rows for ch in t}
        letters = "".join(ch for ch in dict.fromkeys("".join(terms[i] for i in others)) if ch in needed)
        if not set(letters) <= set(terms[g]):
            return operands, terms
        if len(others) == 1 and terms[others[0]] == letters:
            edge = operands[others[0]]
        else:
            edge = self.emit("einsum", [operands[i] for i in others],
                             {"spec": f"{','.join(terms[i] for i in others)}->{letters}"})
        summed = self.aggregate(edge, "sum", AGGREGATE_FOR[gathered.attr["index"]])
        keep = [i for i in range(len(operands)) if i not in rows]
        return ([operands[i] for i in keep] + [gathered.operands[0], summed],
                [terms[i] for i in keep] + [terms[g], letters])

    def unbroadcast(self, g: Value, t: TensorType) -> Value:
        """The cotangent of an operand of type ``t`` broadcast to ``g``'s type: summed over the rows (a
        param operand of a row value) and over the feature axes ``t`` has as 1 or lacks."""
        if g.type == t:
            return g
        letters = LETTERS[:g.type.rank]
        target = "".join(letters[i] for i in range(t.rank))
        kept = "".join(letters[i] for i in range(t.rank) if t.shape[i] == g.type.shape[i])
        reduced_type = TensorType(t.domain, tuple(d for d, ch in zip(t.shape, target) if ch in kept), t.dtype,
                                  t.rowset)
        result = self.contract([g], [letters], kept, reduced_type)
        return self.reshape(result, t.shape)


def _static(dim: Dim, v: Value, what: str) -> int:
    if not dim.is_static:
        raise CompileError(f"differentiating {what} needs the size of dimension {dim}, which is bound at run time",
                           v.span, "pass dims= to grad_program (or differentiate the specialised program)")
    return dim.value


# =====================================================================================================
# Adjoint rules: rule(v, g, b, needed) -> one cotangent (or None) per operand of v
# =====================================================================================================

AdjointRule = Callable[[Value, Value, GradBuilder, Sequence[bool]], Sequence["Value | None"]]
ADJOINTS: dict[str, AdjointRule] = {}
# Why an op carries no gradient, from its definition (``OpDef.no_gradient``).
NOT_DIFFERENTIABLE: dict[str, str] = {name: d.no_gradient for name, d in OPS.items() if d.no_gradient is not None}


def adjoint(*names: str):
    def register(rule: AdjointRule) -> AdjointRule:
        for name in names:
            ADJOINTS[name] = rule
        return rule
    return register


def missing_adjoints(ops: Iterable[str] | None = None) -> list[str]:
    """Ops with neither an adjoint rule nor a not-differentiable entry."""
    return sorted(set(OPS if ops is None else ops) - set(ADJOINTS) - set(NOT_DIFFERENTIABLE))


# ---- elementwise ---------------------------------------------------------------------------------


def _elementwise_adjoint(v, g, b, needed):
    """An elementwise op's declared local vjp (``OpDef.vjp``), un-broadcast to each operand's type."""
    grads = OPS[v.op].vjp(b, v, g, needed)
    return [None if grad is None else b.unbroadcast(grad, o.type) for o, grad in zip(v.operands, grads)]


for _name, _opdef in OPS.items():
    if _opdef.vjp is not None:
        ADJOINTS[_name] = _elementwise_adjoint


# ---- dense algebra -------------------------------------------------------------------------------


@adjoint("matmul")
def _matmul_adjoint(v, g, b, needed):
    x, w = v.operands
    p = LETTERS[:x.type.rank - 1]
    k = LETTERS[x.type.rank - 1]
    m = LETTERS[x.type.rank:x.type.rank + w.type.rank - 1]
    gx = gw = None
    if needed[0]:
        if w.type.domain is Domain.PARAM and w.type.rank >= 2 and x.type.domain is not Domain.PARAM:
            # g @ w^T as one matmul: w^T is [prod(M), K], g flattened to [..., prod(M)].
            flat = _shape_size(w.type.shape[1:])
            wt = b.emit("einsum", [w], {"spec": f"{k}{m}->{m}{k}"})
            wt = b.reshape(wt, (flat, w.type.shape[0]))
            gx = b.emit("matmul", [b.reshape(g, x.type.shape[:-1] + (flat,)), wt])
        else:
            gx = b.contract([g, w], [p + m, k + m], p + k, x.type)
    if needed[1]:
        gw = b.contract([x, g], [p + k, p + m], k + m, w.type)
    return [gx, gw]


def _shape_size(shape) -> Dim:
    size = Dim(1)
    for d in shape:
        size = size * d
    return size


def _einsum_terms(v: Value, b: GradBuilder) -> tuple[list[str], str]:
    inputs, out = parse_subscripts(v.attr["spec"])
    for term in inputs:
        if len(set(term)) != len(term):
            raise CompileError(f"cannot differentiate {v.op} {v.attr['spec']!r}: a letter repeats within one "
                               "operand (a diagonal)", v.span, "write the diagonal with other ops")
    return inputs, out


@adjoint("einsum", "contract_rows")
def _einsum_adjoint(v, g, b, needed):
    inputs, out = _einsum_terms(v, b)
    grads = []
    for i, (operand, term) in enumerate(zip(v.operands, inputs)):
        if not needed[i]:
            grads.append(None)
            continue
        others = [o for j, o in enumerate(v.operands) if j != i]
        other_terms = [t for j, t in enumerate(inputs) if j != i]
        grads.append(b.contract([g] + others, [out] + other_terms, term, operand.type))
    return grads


@adjoint("reduce")
def _reduce_adjoint(v, g, b, needed):
    (x,) = v.operands
    axis = v.attr["axis"] % x.type.rank
    kept = x.type.shape[:axis] + (Dim(1),) + x.type.shape[axis + 1:]
    kind = v.attr["reduce"]
    if kind == "sum":
        return [b.broadcast(b.reshape(g, kept), x.type)]
    if kind == "mean":
        n = _static(x.type.shape[axis], v, f"mean over an axis of size {x.type.shape[axis]}")
        return [b.broadcast(b.reshape(b.div(g, float(n)), kept), x.type)]
    if kind in ("max", "min"):  # the cotangent goes to the elements equal to the result, split evenly among ties
        mask = b.eq(x, b.reshape(v, kept))
        count = b.reduce_sum(mask, axis)
        return [b.mul(mask, b.reshape(b.div(g, count), kept))]
    raise MissingRule(f"autodiff has no adjoint for reduce(reduce={kind!r})")


@adjoint("axis_softmax")
def _axis_softmax_adjoint(v, g, b, needed):
    (x,) = v.operands
    axis = v.attr["axis"] % x.type.rank
    kept = x.type.shape[:axis] + (Dim(1),) + x.type.shape[axis + 1:]
    total = b.reshape(b.reduce_sum(b.mul(v, g), axis), kept)
    return [b.mul(v, b.sub(g, total))]


@adjoint("concat")
def _concat_adjoint(v, g, b, needed):
    axis = v.attr["axis"] % v.type.rank
    grads, start = [], 0
    for operand, need in zip(v.operands, needed):
        size = _static(operand.type.shape[axis], v, f"concat along an axis of size {operand.type.shape[axis]}")
        grads.append(b.emit("slice", [g], {"axis": axis, "start": start, "stop": start + size}) if need else None)
        start += size
    return grads


@adjoint("reshape")
def _reshape_adjoint(v, g, b, needed):
    return [b.reshape(g, v.operands[0].type.shape)]


@adjoint("broadcast")
def _broadcast_adjoint(v, g, b, needed):
    return [b.unbroadcast(g, v.operands[0].type)]


@adjoint("slice")
def _slice_adjoint(v, g, b, needed):
    (x,) = v.operands
    axis = v.attr["axis"] % x.type.rank
    size = x.type.shape[axis].value
    return [b.emit("pad", [g], {"axis": axis, "before": v.attr["start"], "after": size - v.attr["stop"]})]


@adjoint("pad")
def _pad_adjoint(v, g, b, needed):
    (x,) = v.operands
    axis = v.attr["axis"] % x.type.rank
    start = v.attr["before"]
    return [b.emit("slice", [g], {"axis": axis, "start": start, "stop": start + x.type.shape[axis].value})]


@adjoint("select")
def _select_adjoint(v, g, b, needed):
    (x,) = v.operands
    n = _static(x.type.shape[0], v, f"an index into an axis of size {x.type.shape[0]}")
    i = v.attr["index"]
    row = b.reshape(g, (Dim(1),) + g.type.shape)
    return [b.emit("pad", [row], {"axis": 0, "before": i, "after": n - i - 1})]


@adjoint("take")
def _take_adjoint(v, g, b, needed):
    w, index = v.operands
    r = _static(w.type.shape[0], v, f"W[ids] with {w.type.shape[0]} entries")
    one_hot = b.emit("one_hot", [index], {"classes": r},
                     declared=TensorType(index.type.domain, (Dim(r),), b.dtype, index.type.rowset))
    letters = LETTERS[1:1 + g.type.rank]
    return [b.contract([one_hot, g], ["a", letters], "a" + letters, w.type), None]


# ---- normalisation -------------------------------------------------------------------------------


@adjoint("batch_norm")
def _batch_norm_adjoint(v, g, b, needed):
    x, running_mean, running_var, gamma, _beta = v.operands
    letters = LETTERS[:x.type.rank]
    per_feature = gamma.type

    def row_sum(*values: Value) -> Value:
        return b.contract(list(values), [letters] * len(values), letters, per_feature)

    if v.attr["mode"] != "train":
        # The inference form (as "auto": like dropout, differentiated with inference semantics):
        # y = (x - m) r gamma + beta with r = (v + eps)^-1/2, so dy/dv = -1/2 (x - m) gamma r^3.
        r = b.unary("rsqrt", b.add(running_var, v.attr["eps"]))
        scale = b.mul(r, gamma)
        centred = b.sub(x, running_mean) if needed[2] or needed[3] else None
        summed = row_sum(g) if needed[1] or needed[4] else None
        crossed = row_sum(g, centred) if needed[2] or needed[3] else None
        return [b.mul(g, scale) if needed[0] else None,
                b.neg(b.mul(summed, scale)) if needed[1] else None,
                b.mul(b.mul(crossed, gamma), b.mul(b.mul(b.mul(r, r), r), -0.5)) if needed[2] else None,
                b.mul(crossed, r) if needed[3] else None,
                summed if needed[4] else None]
    # The training form: the batch statistics depend on x (torch's BatchNorm backward); the running
    # statistics do not enter the output. With xhat = (x - mu) r, r = (var + eps)^-1/2 over N rows:
    # dx = gamma r (g - sum(g) / N - xhat sum(g xhat) / N), dgamma = sum(g xhat), dbeta = sum(g).
    ones = b.broadcast(b.c(1.0), TensorType(x.type.domain, (), b.dtype, x.type.rowset))
    count = b.contract([ones], [""], "", TensorType(Domain.PARAM, (), b.dtype))
    centred = b.sub(x, b.div(row_sum(x), count))
    r = b.unary("rsqrt", b.add(b.div(row_sum(centred, centred), count), v.attr["eps"]))
    xhat = b.mul(centred, r)
    summed = row_sum(g)
    crossed = row_sum(g, xhat)
    dx = None
    if needed[0]:
        inner = b.sub(b.sub(g, b.div(summed, count)), b.mul(xhat, b.div(crossed, count)))
        dx = b.mul(inner, b.mul(gamma, r))
    return [dx, None, None, crossed if needed[3] else None, summed if needed[4] else None]


# ---- graph movement ------------------------------------------------------------------------------


@adjoint("gather")
def _gather_adjoint(v, g, b, needed):
    return [b.aggregate(g, "sum", AGGREGATE_FOR[v.attr["index"]])]


def _group_count(b: GradBuilder, by: str, edges: str) -> Value:
    """Rows per group of an aggregation ``by`` (node[] for src / dst over the edge set ``edges``,
    graph[] for graph)."""
    if by == "graph":
        ones = b.broadcast(b.c(1.0), TensorType(Domain.NODE, (), b.dtype))
        return b.aggregate(ones, "sum", "graph")
    return b.emit("degree", [], {"dir": "in" if by == "dst" else "out", "edges": edges},
                  declared=TensorType(Domain.NODE, (), b.dtype))


@adjoint("aggregate")
def _aggregate_adjoint(v, g, b, needed):
    (x,) = v.operands
    by, kind, edges = v.attr["by"], v.attr["reduce"], v.attr["edges"]
    index = GATHER_FOR[by]
    if kind == "sum":
        return [b.gather(g, index, edges)]
    if kind == "mean":
        return [b.gather(b.div(g, b.maximum(_group_count(b, by, edges), 1.0)), index, edges)]
    if kind in ("max", "min"):
        # Route to the rows equal to the result (the arg-extremes), split evenly among ties.
        mask = b.eq(x, b.gather(v, index, edges))
        count = b.aggregate(mask, "sum", by)
        return [b.mul(mask, b.gather(b.div(g, b.maximum(count, 1.0)), index, edges))]
    if kind == "std":
        # d std / dx_e = (x_e - mean) / (n std); a zero std (all rows equal) gets 0.
        count = b.maximum(_group_count(b, by, edges), 1.0)
        centred = b.sub(x, b.gather(b.aggregate(x, "mean", by), index, edges))
        denominator = b.mul(v, count)
        scale = b.div(g, b.add(denominator, b.eq(denominator, 0.0)))
        return [b.mul(centred, b.gather(scale, index, edges))]
    raise MissingRule(f"autodiff has no adjoint for aggregate(reduce={kind!r})")


@adjoint("softmax")
def _softmax_adjoint(v, g, b, needed):
    by = v.attr["by"]
    total = b.aggregate(b.mul(v, g), "sum", by)
    return [b.mul(v, b.sub(g, b.gather(total, GATHER_FOR[by], v.attr["edges"])))]


@adjoint("carry")
def _carry_adjoint(v, g, b, needed):
    """carry is linear (affine with a constant fill): its transpose, carry_grad."""
    return [b.emit("carry_grad", [g], {"edges": v.attr["edges"], "base": v.operands[0].type.rowset,
                                       "fill": v.attr["fill"]})]


@adjoint("carry_grad")
def _carry_grad_adjoint(v, g, b, needed):
    """carry_grad is linear: its transpose is carry with the same fill, without the constant."""
    return [b.emit("carry", [g], {"edges": v.attr["edges"], "fill": v.attr["fill"], "value": 0.0})]


# ---- fused ops ------------------------------------------------------------------------------------


def _unfuse(v: Value, b: GradBuilder) -> Value:
    """Emit the composition of primitive ops a fused value stands for (its root): the op's
    declared unfused definition (``OpDef.unfused``)."""
    unfused = OPS[v.op].unfused
    if unfused is None:
        raise MissingRule(f"autodiff has no unfused definition of the fused op {v.op}: give its OpDef one")
    return unfused(b, v)


@adjoint(*(name for name, d in OPS.items() if d.has(Trait.FUSED) and name != "attention"))
def _fused_adjoint(v, g, b, needed):
    """A fused op differentiated through its unfused definition."""
    start = len(b.values)
    root = _unfuse(v, b)
    assert root.type == v.type, (v, root)
    local = b.values[start:]
    leaves = {id(o) for o, need in zip(v.operands, needed) if need}
    cotangents = {id(root): g}
    _backprop(b, local, cotangents, _active(local, leaves))
    b.like = v
    return [cotangents.get(id(o)) if need else None for o, need in zip(v.operands, needed)]


@adjoint("attention")
def _attention_adjoint(v, g, b, needed):
    """out = attention(s, x) by dst: with a_e = exp(s_e - lse_i) (lse the per-node log-sum-exp, the
    one statistic kept from the forward), d s_e = a_e (<g_i, x_j> - <g_i, out_i>) is a destination
    pass and d x_j = sum_{e: j->i} a_e g_i a source pass; neither builds an E x S tensor (by src,
    the two ends swap roles)."""
    s, x = v.operands
    by, edges = v.attr["by"], v.attr["edges"]
    lse = b.emit("segment_logsumexp", [s], {"by": by, "edges": edges})
    ds = dx = None
    if needed[0]:
        letters = LETTERS[:x.type.rank]
        delta = b.contract([g, v], [letters, letters], letters[:s.type.rank],
                           TensorType(Domain.NODE, s.type.shape, s.type.dtype, g.type.rowset))
        ds = b.emit("attention_score_grad", [s, lse, x, g, delta], {"by": by, "edges": edges})
    if needed[1]:
        dx = b.emit("attention_value_grad", [s, lse, g], {"by": OPPOSITE[by], "edges": edges})
    return [ds, dx]


@adjoint("global_attention")
def _global_attention_adjoint(v, g, b, needed):
    """[out, lse] = global_attention(q, k, v): with p_ij = exp(s_ij - lse_i) recomputed from the saved
    log-sum-exp (flash-attention style), d s_ij = p_ij (<g_i, v_j> - delta_i) with delta_i = <g_i, out_i>
    less the cotangent of lse_i (d lse_i / d s_ij = p_ij); dq is a pass over each query node's graph
    (``global_attention_query_grad``), dk and dv one over each key node's
    (``global_attention_key_grad``). No pair of nodes is materialised."""
    q, k, val = v.operands
    heads, keys = q.type.shape
    width = val.type.shape[1].value
    scale = v.attr["scale"]
    per_head = TensorType(Domain.NODE, (heads,), v.type.dtype)

    def split(x: Value) -> tuple[Value, Value]:
        head = b.emit("slice", [x], {"axis": 1, "start": 0, "stop": width})
        tail = b.emit("slice", [x], {"axis": 1, "start": width, "stop": width + 1})
        return head, b.reshape(tail, (heads,))

    out, lse = split(v)
    delta = None
    if b._made(g, "pad") and g.attr == {"axis": 1, "before": 0, "after": 1}:
        g_out = g.operands[0]  # the cotangent of the attention alone (the source form's): none for lse
    else:
        g_out, g_lse = split(g)
        delta = b.neg(g_lse)
    inner = b.contract([g_out, out], ["ab", "ab"], "a", per_head)
    delta = inner if delta is None else b.add(inner, delta)
    operands = [q, k, val, lse, g_out, delta]
    dq = dk = dv = None
    if needed[0]:
        dq = b.emit("global_attention_query_grad", operands, {"scale": scale})
    if needed[1] or needed[2]:
        both = b.emit("global_attention_key_grad", operands, {"scale": scale})
        dk = b.emit("slice", [both], {"axis": 1, "start": 0, "stop": keys.value}) if needed[1] else None
        dv = b.emit("slice", [both], {"axis": 1, "start": keys.value, "stop": keys.value + width}) \
            if needed[2] else None
    return [dq, dk, dv]


# =====================================================================================================
# Reverse mode
# =====================================================================================================


def _active(values: Sequence[Value], leaves: set[int]) -> set[int]:
    """Ids of the leaves and of the values that depend on them through differentiable ops."""
    active = set(leaves)
    for v in values:
        if id(v) not in active and v.op not in NOT_DIFFERENTIABLE and any(id(o) in active for o in v.operands):
            active.add(id(v))
    return active


def _source(name: str, t: TensorType, init: str, span=None) -> Value:
    """A new interface value of type ``t``: a param (initialised ``init``) in the param domain, an
    input otherwise."""
    if t.domain is Domain.PARAM:
        return make_value("param", [], {"name": name, "init": init}, t, span)
    return make_value("input", [], {"name": name}, t, span)


def _fresh_name(base: str, taken: set[str]) -> str:
    """``base``, prefixed with underscores until no name in ``taken`` has it; added to ``taken``."""
    name = base
    while name in taken:
        name = "_" + name
    taken.add(name)
    return name


def _accumulate(b: GradBuilder, cotangents: dict[int, Value], target: Value, g: Value) -> None:
    if g.type != target.type:
        raise AssertionError(f"the cotangent of {target!r} has type {g.type}")
    earlier = cotangents.get(id(target))
    cotangents[id(target)] = g if earlier is None else b.add(earlier, g)


def _backprop(b: GradBuilder, values: Sequence[Value], cotangents: dict[int, Value], active: set[int]) -> None:
    """Walk ``values`` backwards, turning the cotangent of each active value into its operands'."""
    for v in reversed(values):
        g = cotangents.get(id(v))
        if g is None or OPS[v.op].has(Trait.INTERFACE) or id(v) not in active:
            continue
        needed = [id(o) in active for o in v.operands]
        if not any(needed):
            continue
        rule = ADJOINTS.get(v.op)
        if rule is None:
            reason = NOT_DIFFERENTIABLE.get(v.op)
            if reason is not None:
                continue
            where = f" (at {v.span.location})" if v.span is not None else ""
            raise MissingRule(f"op '{v.op}'{where} has no adjoint rule: add one to mpdsl.autodiff.ADJOINTS (or give "
                              "its OpDef a no_gradient reason)")
        b.like = v
        grads = rule(v, g, b, needed)
        for operand, need, grad in zip(v.operands, needed, grads):
            if need and grad is not None:
                _accumulate(b, cotangents, operand, grad)


def grad_program(program: Program, wrt: Sequence[str] | None = None, outputs: Sequence[str] | None = None, *,
                 inputs: Sequence[str] = (), dims: dict[str, int] | None = None,
                 keep_outputs: bool = False) -> Program:
    """The reverse-mode gradient program of ``program``.

    ``wrt``: parameter names (default: every parameter); ``outputs``: the outputs differentiated
    (default: all float outputs); ``inputs``: float inputs whose gradients are wanted too; ``dims``:
    bind these dims first (adjoints of concat, select, take and axis means need static sizes).
    The result's inputs are the program's inputs and params plus one cotangent ``d_<output>`` per
    differentiated output; its outputs are ``d_<param>`` per ``wrt`` entry then ``d_<input>`` (then,
    with ``keep_outputs``, the program's own outputs: see ``split_program``)."""
    if dims:
        program = specialize(program, dict(dims))
    params = {v.attr["name"]: v for v in program.params}
    sources = {v.attr["name"]: v for v in program.inputs}
    wrt = list(params) if wrt is None else list(wrt)
    for name in wrt:
        if name not in params:
            raise CompileError(f"'{program.name}' has no parameter named '{name}'", None,
                               f"its parameters are: {', '.join(params) or 'none'}")
    for name in inputs:
        if name not in sources or not sources[name].type.is_float:
            raise CompileError(f"'{program.name}' has no float input named '{name}'", None)
    out_map = dict(program.outputs)
    names = [n for n, v in program.outputs if v.type.is_float] if outputs is None else list(outputs)
    for name in names:
        if name not in out_map or not out_map[name].type.is_float:
            raise CompileError(f"'{program.name}' has no float output named '{name}'", None)
    taken = set(params) | set(sources)
    dtype = program.float_dtype

    b = GradBuilder(dtype)
    cotangents: dict[int, Value] = {}
    for name in names:
        cname = f"d_{name}"
        if cname in taken:
            raise CompileError(f"cannot name the cotangent of output '{name}' {cname!r}: the program already "
                               "has an input or parameter of that name", None)
        source = _source(cname, out_map[name].type, "zeros")
        b.values.append(source)
        _accumulate(b, cotangents, out_map[name], source)

    leaves = {id(params[n]) for n in wrt} | {id(sources[n]) for n in inputs}
    _backprop(b, program.values, cotangents, _active(program.values, leaves))

    b.like = None
    results = []
    for name in wrt:
        v = params[name]
        results.append((f"d_{name}", cotangents.get(id(v)) or b.zeros(v.type)))
    for name in inputs:
        v = sources[name]
        results.append((f"d_{name}", cotangents.get(id(v)) or b.zeros(v.type)))
    if not results:
        raise CompileError("nothing to differentiate with respect to", None, "name parameters in wrt= or inputs=")
    if keep_outputs:
        clash = sorted({n for n, _ in program.outputs} & {n for n, _ in results})
        if clash:
            raise CompileError(f"output name(s) {', '.join(clash)} clash with gradient names", None)
        results += list(program.outputs)
    values = tuple(program.values) + tuple(b.values)
    return verify(prune(program.rebuilt(values, tuple(results), name=f"{program.name}_grad")))


def split_program(program: Program, forward_outputs: Sequence[str], cotangents: Sequence[str],
                  prefix: str = "residual") -> tuple[Program, Program, list[str]]:
    """Split a gradient program built with ``keep_outputs`` (and optimized, typically) into the part
    that runs before the cotangents are known and the part that needs them: (forward, backward,
    residual names). ``forward`` computes ``forward_outputs`` and the residuals: the values of the
    forward part that the backward part reads (as inputs ``<prefix><k>``, params for param values);
    ``backward`` computes the remaining outputs from the inputs, params, cotangents and residuals.
    So a training step computes the forward values once, except the values ``rematerialized`` gives,
    which the backward recomputes instead of reading them saved: pure elementwise functions and
    gathers of other residuals (a ReLU's mask, a leaky ReLU's slope), and those of forward values that
    take fewer bytes saved than they do (an edge value of gathered node values), sized at the plan's
    assumed rows (``mpdsl.plan.space_rows``: the training programs serve every graph)."""
    cotangent_ids = {id(v) for v in program.values if v.op in ("input", "param") and v.name in set(cotangents)}
    late: set[int] = set(cotangent_ids)
    for v in program.values:
        if any(id(o) in late for o in v.operands):
            late.add(id(v))
    out_map = dict(program.outputs)
    needed = {id(o): o for v in program.values if id(v) in late for o in v.operands if id(o) not in late}
    needed.update((id(v), v) for name, v in program.outputs if name not in forward_outputs and id(v) not in late)
    from mpdsl.plan import space_rows

    recomputed = rematerialized(needed, space_rows(program))
    taken = {v.name for v in program.values if v.name is not None} | set(out_map)
    residuals: dict[int, Value] = {}     # forward value -> its source in the backward program
    residual_names: list[str] = []
    mapping: dict[int, Value] = {}
    back_values: list[Value] = []

    def early(v: Value) -> Value:
        """A forward-part value as seen by the backward program."""
        if OPS[v.op].has(Trait.SOURCE):  # recomputed (or re-read) by the backward part, not a residual
            if id(v) not in mapping:
                mapping[id(v)] = v
                back_values.append(v)
            return v
        if id(v) in recomputed:
            if id(v) not in mapping:
                nv = Value(v.op, tuple(early(o) for o in v.operands), v.attrs, v.type, v.span)
                mapping[id(v)] = nv
                back_values.append(nv)
            return mapping[id(v)]
        if id(v) not in residuals:
            name = _fresh_name(f"{prefix}{len(residual_names)}", taken)
            residual_names.append(name)
            source = _source(name, v.type, "zeros", v.span)
            residuals[id(v)] = source
            back_values.append(source)
        return residuals[id(v)]

    for v in program.values:
        if id(v) in cotangent_ids:
            mapping[id(v)] = v
            back_values.append(v)
        elif id(v) in late:
            operands = tuple(mapping[id(o)] if id(o) in late else early(o) for o in v.operands)
            nv = Value(v.op, operands, v.attrs, v.type, v.span)
            mapping[id(v)] = nv
            back_values.append(nv)
    back_outputs = []
    for name, v in program.outputs:
        if name not in forward_outputs:
            back_outputs.append((name, mapping[id(v)] if id(v) in late else early(v)))
    forward_values = tuple(v for v in program.values if id(v) not in late)
    by_id = {id(v): v for v in forward_values}
    residual_outputs = [(name, by_id[key]) for key, name in zip(residuals, residual_names)]  # creation order
    forward = program.rebuilt(forward_values, tuple((n, out_map[n]) for n in forward_outputs) + tuple(residual_outputs))
    backward = program.rebuilt(tuple(back_values), tuple(back_outputs))
    return verify(prune(forward)), verify(prune(backward)), residual_names


def rematerialized(needed: dict[int, Value], rows: Mapping[Space, int] | None = None) -> set[int]:
    """The ids of the values the backward part recomputes rather than reads as residuals, given the
    forward values it ``needed`` (by id).

    A needed value is recomputed with its cone: the values it is computed from, walked back through
    pure elementwise ops and gathers (row copies along the edges) that are not needed themselves.
    The cone ends at sources, at needed values (residuals, or recomputed in turn), and at other
    values, its leaves, which become residuals in its place. With no leaf, recomputing saves no
    other array: a ReLU's mask, a leaky ReLU's slope. With leaves (``rows``, the rows of each space,
    sizes them; without it a value with leaves stays a residual), the value is recomputed when its
    leaves that are not residuals yet take fewer bytes than it: an edge value of gathered node values
    (a GAT score from its per-node halves, ``el[src] + er[dst]``) is recomputed from them, which are
    then saved at node rows instead of the scores at edge rows. Decisions are repeated until none
    changes, so that a value whose leaves another decision saved is recomputed too: the residual
    bytes only shrink."""
    def recomputable(v: Value) -> bool:
        return (OPS[v.op].has(Trait.ELEMENTWISE) or v.op == "gather") and is_pure(v)

    def size(v: Value) -> int | None:
        if rows is None or v.type.space not in rows:
            return None
        count = rows[v.type.space]
        for d in v.type.shape:
            if d.value is None:
                return None
            count *= d.value
        return count * ITEMSIZE[v.type.dtype]

    cones: dict[int, tuple[list[Value], list[Value]]] = {}  # needed value -> (its cone, its leaves)
    for v in needed.values():
        if OPS[v.op].has(Trait.SOURCE) or not recomputable(v):
            continue
        cone, leaves, stack, seen = [v], [], list(v.operands), set()
        while stack:
            o = stack.pop()
            if id(o) in needed or id(o) in seen or OPS[o.op].has(Trait.SOURCE):
                continue
            seen.add(id(o))
            if recomputable(o):
                cone.append(o)
                stack.extend(o.operands)
            else:
                leaves.append(o)
        cones[id(v)] = cone, leaves
    recomputed: set[int] = set()
    saved_leaves: set[int] = set()  # leaves that became residuals
    changed = True
    while changed:
        changed = False
        for key, (cone, leaves) in cones.items():
            if key in recomputed:
                continue
            new = [o for o in leaves if id(o) not in saved_leaves]
            if new:
                sizes = [size(o) for o in new]
                own = size(needed[key])
                if own is None or any(n is None for n in sizes) or sum(n for n in sizes if n is not None) >= own:
                    continue
            recomputed.update(id(c) for c in cone)
            saved_leaves.update(id(o) for o in new)
            changed = True
    return recomputed


# =====================================================================================================
# Training programs: dropout masks as inputs
# =====================================================================================================


def mask_dropout(program: Program, prefix: str = "dropout_mask") -> tuple[Program, list[tuple[str, TensorType, float]]]:
    """The training form of ``program``: each ``dropout(x, p)`` with p > 0 becomes ``x * mask`` with the
    mask a new input (a param for param values) of x's type, holding keep / (1 - p) per element; the
    same masks are then fed to the forward and the gradient program. Returns the program and the masks
    (name, type, p) in program order."""
    taken = {v.name for v in program.values if v.name is not None}
    masks: list[tuple[str, TensorType, float]] = []

    def rule(v: Value, rw: Rewriter) -> Value | None:
        if v.op != "dropout":
            return None
        (x,) = v.operands
        if v.attr["p"] == 0:
            return x
        name = _fresh_name(f"{prefix}{len(masks)}", taken)
        source = _source(name, v.type, "ones", v.span)
        rw.values.append(source)
        masks.append((name, v.type, float(v.attr["p"])))
        return rw.emit("mul", [x, source], like=v)

    result, _ = rewrite(program, rule)
    return verify(result), masks


# =====================================================================================================
# Batch norm: the form of each batch_norm fixed for training or inference
# =====================================================================================================


def set_batch_norm_mode(program: Program, training: bool) -> Program:
    """The program with every batch_norm of mode "auto" fixed to its training form ("train": batch
    statistics, running statistics updated, differentiated through the batch statistics) or its
    inference form ("eval"), so that the program computes the same thing whatever ``training`` flag
    it is run with, and its gradient program is the gradient of that form."""
    mode = "train" if training else "eval"

    def rule(v: Value, rw: Rewriter) -> Value | None:
        if v.op != "batch_norm" or v.attr["mode"] != "auto":
            return None
        return rw.emit("batch_norm", list(v.operands), {**v.attr, "mode": mode}, like=v)

    result, _ = rewrite(program, rule)
    return verify(result)


def batch_norm_statistics(program: Program) -> list[str]:
    """The parameters holding batch_norm running statistics (updated in training, never trained),
    in program order."""
    names: dict[str, None] = {}
    for v in program.values:
        if v.op == "batch_norm":
            for operand in v.operands[1:3]:
                where = running_statistic(operand)
                if where is not None:
                    names[where[0]] = None
    return list(names)


def retype(program: Program, dtype: str) -> Program:
    """The program with every float value's dtype set to ``dtype`` (one of ``FLOAT_DTYPES``: "f32",
    "f64", "f16", "bf16"); a ValueError for any other."""
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"unknown float dtype {dtype!r} (one of {', '.join(FLOAT_DTYPES)})")
    if program.float_dtype == dtype:
        return program
    mapping: dict[int, Value] = {}
    values = []
    for v in program.values:
        t = v.type.with_(dtype=dtype) if v.type.is_float else v.type
        nv = Value(v.op, tuple(mapping[id(o)] for o in v.operands), v.attrs, t, v.span)
        mapping[id(v)] = nv
        values.append(nv)
    return program.rebuilt(tuple(values), tuple((n, mapping[id(v)]) for n, v in program.outputs))


__all__ = ["ADJOINTS", "NOT_DIFFERENTIABLE", "GradBuilder", "batch_norm_statistics", "grad_program",
           "mask_dropout", "missing_adjoints", "retype", "set_batch_norm_mode", "split_program"]
