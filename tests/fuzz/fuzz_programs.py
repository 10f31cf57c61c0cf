"""A grammar-aware, type-directed hypothesis generator of .mp programs (grammar/mpdsl.lark and
the README's language section).

``programs()`` draws a whole program: ``dim`` constants, layers (node, edge or domain-generic
``any`` layers, called with different dims at different call sites, sometimes from an imported
file), one model whose arguments are inputs (``x: node[F]`` bound from data, edge features,
per-graph features, ``edge int`` relation ids) and the parameters its expressions need, a body
of assignments and ``for`` loops (loop-carried state, stacked parameters ``W[t]``), and a
return of the declared result types. Expressions are generated for a wanted type (domain and
feature shape), so most programs type-check and run: gathers ``h[src]`` / ``h[dst]`` /
``v[batch]``, reductions ``sum|mean|max|min|std(...) by dst|src|graph``, ``softmax(...) by dst``,
feature-axis reductions, ``@`` with parameters (also per relation, ``W[etype]``), ``einsum``,
``concat``, ``reshape``, ``one_hot``, degrees, unary and binary functions, prelude layers
(``mlp2``, ``layer_norm``, ``gru_cell``) and ``batch_norm``; some programs declare a derived edge
set ``looped`` (``self_loops``, ``remaining_self_loops`` or ``k_hop`` of the graph's edges) and move values
onto it and back (``h[looped.src]``, ``sum(...) by dst`` of its values, ``softmax``,
``in_degree(looped)``, ``carry(e, looped, fill)``); comparisons, masks and ``where``, ``clamp``,
constant tensors (``arange``, ``linspace``, ``full``), concatenations through one weight over a sum
of widths (``param[F + 2 * 3, K]``) and ``global_attention(q, k, v) by graph`` over batches. A drawn
graph spec gives the sizes of the data the worker synthesises.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import strategies as st

from mpdsl.ops import AGGREGATIONS, UNARY_OPS

UNARY = tuple(name for name in UNARY_OPS if name != "neg")  # the language's unary functions
AGGREGATE = AGGREGATIONS
AXIS_REDUCE = ("sum", "mean", "max", "min")
INITS = ("", "", "", " = zeros", " = ones", " = normal", " = uniform", " = 0.5", " = -1", " = glorot")
NUMBERS = ("0.5", "2", "0.1", "3.0", "1", "0.001", "1e-3", "10", "0.25")
COMPARISONS = ("<", "<=", ">", ">=", "==", "!=")
CARRY_FILLS = ("1.0", "0.5", '"mean"', '"sum"', "fill=2", "-1")  # the fills of carry(e, looped, fill)

# A dim is an int (static: a literal or a `dim` constant) or a str (a symbol: bound from data in a
# model, bound per call in a layer). A type is (domain, shape).


@dataclass
class Layer:
    name: str
    domain: str  # node | edge | graph | any
    args: list[tuple[str, tuple]]  # (name, shape over D, K and ints) after the first argument h
    text: str = ""


@dataclass
class Context:
    """Where an expression is generated: a model body (possibly inside a loop), or a layer body."""

    env: dict[str, tuple]  # variable -> (domain, shape)
    base: str  # a variable every type can be reached from (x, or the layer's h)
    in_layer: bool = False
    domain_generic: bool = False  # an 'any' layer: row-wise operations only
    loop: str | None = None  # the loop counter inside a loop body
    loop_count: str | None = None  # the dim of the loop (stacked parameters' leading dim)
    layer_params: list[tuple[str, tuple]] = field(default_factory=list)


class ProgramBuilder:
    def __init__(self, draw):
        self.draw = draw
        self.dims: dict[str, int] = {}  # dim constants
        self.params: list[str] = []  # model parameter declarations
        self.layers: list[Layer] = []
        self.counter = 0
        self.has_etype = False
        self.relations = 2
        self.batch_graphs = True
        self.looped: str | None = None  # the derivation of the edge set `looped`, when the program declares it
        self.slips = False  # some programs get a few subexpressions of a wrong type (user errors)

    # ---- drawing helpers -----------------------------------------------------------------

    def choice(self, options):
        return options[self.draw(st.integers(0, len(options) - 1))]

    def chance(self, p: float) -> bool:
        return self.draw(st.integers(0, 99)) < p * 100

    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    # ---- dims and types ------------------------------------------------------------------

    def dim_text(self, d, ctx: Context) -> str:
        if isinstance(d, str):
            return d
        if not ctx.in_layer:
            names = [n for n, v in self.dims.items() if v == d]
            if names and self.chance(0.6):
                return self.choice(names)
        return str(d)

    def shape_text(self, shape, ctx: Context) -> str:
        return ", ".join(self.dim_text(d, ctx) for d in shape)

    def width(self, ctx: Context):
        """A feature width for an intermediate value."""
        if ctx.in_layer:
            return self.choice(("D", "K", 2, 3))
        return self.choice(("F", *sorted(set(self.dims.values()) - {0}), 2, 3, 1))

    def param(self, shape, ctx: Context) -> str:
        """A new parameter of ``shape``; returns the text that reads it."""
        name = self.fresh("W")
        if ctx.in_layer:
            ctx.layer_params.append((name, tuple(shape)))
            return name
        stacked = ctx.loop is not None and self.chance(0.7)
        full = ((ctx.loop_count,) if stacked else ()) + tuple(shape)
        init = self.choice(INITS)
        if init == " = glorot" and len(full) < 2:
            init = ""
        self.params.append(f"{name}: param[{self.shape_text(full, ctx)}]{init}")
        return f"{name}[{ctx.loop}]" if stacked else name

    # ---- expressions ---------------------------------------------------------------------

    @staticmethod
    def paren(text: str) -> str:
        """``text`` as an operand: parenthesised unless it is a name, a number or one call."""
        if text.replace("_", "").replace(".", "").isalnum():
            return text
        head = text.split("(", 1)[0]
        if head.isidentifier() and text.endswith(")"):
            depth = 0
            for i, c in enumerate(text):
                depth += (c == "(") - (c == ")")
                if depth == 0 and i >= len(head):
                    return text if i == len(text) - 1 else f"({text})"
        return f"({text})"

    def reach(self, dom: str, ctx: Context) -> str:
        """The base variable moved to domain ``dom`` (same feature shape)."""
        base_dom = ctx.env[ctx.base][0]
        if ctx.domain_generic or dom == base_dom:
            return ctx.base
        if dom == "edge":
            return f"{self.paren(self.reach('node', ctx))}[{self.choice(('src', 'dst'))}]"
        if dom == "graph":
            return f"{self.choice(('sum', 'mean', 'max'))}({self.reach('node', ctx)}) by graph"
        if dom == "looped":
            return f"{self.paren(self.reach('node', ctx))}[looped.{self.choice(('src', 'dst'))}]"
        if base_dom == "edge":
            return f"{self.choice(('sum', 'mean'))}({ctx.base}) by dst"
        return f"{ctx.base}[batch]"

    def leaf(self, t, ctx: Context) -> str:
        """Any type from the base variable (always valid)."""
        dom, shape = t
        base_shape = ctx.env[ctx.base][1]
        vars_ = [n for n, vt in ctx.env.items() if vt == t]
        if vars_:
            return self.choice(vars_)
        src = self.reach(dom, ctx)
        if not shape:
            return f"{self.choice(AXIS_REDUCE)}({src}, -1)"
        return f"{self.paren(src)} @ {self.param((base_shape[-1],) + tuple(shape), ctx)}"

    def slip(self, t):
        dom, shape = t
        if self.chance(0.5):
            return self.choice([d for d in ("node", "edge", "graph") if d != dom]), shape
        if shape and self.chance(0.5):
            return dom, tuple(shape[:-1])
        return dom, tuple(shape) + (self.choice((2, 3, "F")),)

    def expr(self, t, ctx: Context, depth: int) -> str:
        if self.slips and self.chance(0.06):
            t = self.slip(t)
        if depth <= 0:
            return self.leaf(t, ctx)
        rules = self.rules(t, ctx)
        name = self.choice(rules)
        return getattr(self, f"r_{name}")(t, ctx, depth - 1)

    def rules(self, t, ctx: Context) -> list[str]:
        dom, shape = t
        rules = ["leaf", "leaf", "unary", "unary", "binary", "binary", "scale", "bias", "axis_reduce"]
        if shape:
            rules += ["matmul", "matmul", "axis_softmax", "broadcast"]
            if isinstance(shape[-1], int) and shape[-1] >= 2:
                rules.append("concat")
            if len(shape) == 2:
                rules += ["einsum", "matmul2"]
            if len(shape) == 1 and isinstance(shape[0], int) and shape[0] >= 4 and shape[0] % 2 == 0:
                rules.append("reshape")
            if len(shape) == 1:
                rules += ["prelude", "layer_norm"] if not ctx.in_layer else []
        rules += ["select", "where", "clamp"]
        if len(shape) == 1 and not ctx.in_layer:
            rules += ["constant", "concat_sum"]
        if (dom == "node" and self.batch_graphs and not ctx.in_layer and len(shape) == 2
                and all(isinstance(d, int) and d > 0 for d in shape)):
            rules.append("global_attention")
        if not ctx.domain_generic:
            if dom == "edge":
                rules += ["gather", "gather", "softmax_by"]
                if self.has_etype and not ctx.in_layer and shape:
                    rules.append("typed_matmul")
                if self.has_etype and not ctx.in_layer and shape == (self.relations,):
                    rules.append("one_hot")
            if dom == "node":
                rules += ["aggregate", "aggregate", "aggregate"]
                if not shape:
                    rules.append("degree")
                if self.batch_graphs:
                    rules.append("broadcast_graph")
                if len(shape) == 1 and not ctx.in_layer:
                    rules.append("batch_norm")
            if dom == "graph":
                rules += ["readout", "readout"]
            if dom == "node" and self.looped:
                rules += ["aggregate_looped"] + (["degree_looped"] if not shape else [])
            if dom == "looped":
                rules += ["gather_looped", "gather_looped", "softmax_by"] + (["carry"] if self.looped != "k_hop" else [])
        if not ctx.in_layer and len(shape) == 1 and dom in ("node", "edge"):
            rules += ["layer", "layer"]
        return rules

    def r_leaf(self, t, ctx, depth):
        return self.leaf(t, ctx)

    def r_unary(self, t, ctx, depth):
        x = self.expr(t, ctx, depth)
        kind = self.draw(st.integers(0, 9))
        if kind == 0:
            return f"leaky_relu({x}, {self.choice(('0.2', '0.01', 'slope=0.1'))})"
        if kind == 1:
            return f"elu({x}, {self.choice(('1.0', 'alpha=0.5'))})"
        if kind == 2:
            return f"dropout({x}, {self.choice(('0.5', 'p=0.1', '0'))})"
        if kind == 3:
            return f"-{self.paren(x)}"
        if kind == 4:
            return f"{self.paren(x)} ** {self.choice(('2', '3', '0.5'))}"
        return f"{self.choice(UNARY)}({x})"

    def r_binary(self, t, ctx, depth):
        a, b = self.expr(t, ctx, depth), self.expr(t, ctx, depth)
        if self.chance(0.2):
            return f"{self.choice(('maximum', 'minimum'))}({a}, {b})"
        return f"{self.paren(a)} {self.choice(('+', '-', '*', '/', '+'))} {self.paren(b)}"

    def r_scale(self, t, ctx, depth):
        x = self.expr(t, ctx, depth)
        number = self.choice(NUMBERS)
        if ctx.loop and self.chance(0.3):
            number = ctx.loop
        op = self.choice(("*", "+", "-", "/"))
        return f"{self.paren(x)} {op} {number}" if self.chance(0.5) else f"{number} {op} {self.paren(x)}"

    def r_bias(self, t, ctx, depth):
        shape = t[1]
        x = self.expr(t, ctx, depth)
        return f"{self.paren(x)} + {self.param(shape, ctx)}"

    def r_broadcast(self, t, ctx, depth):
        """A per-row scalar (or a prefix of the shape) times a value: left-aligned broadcasting."""
        dom, shape = t
        prefix = shape[:self.draw(st.integers(0, len(shape) - 1))]
        s = self.expr((dom, prefix), ctx, depth)
        x = self.expr(t, ctx, depth)
        return f"{self.paren(s)} * {self.paren(x)}"

    def r_matmul(self, t, ctx, depth):
        dom, shape = t
        a = self.width(ctx)
        x = self.expr((dom, (a,)), ctx, depth)
        return f"{self.paren(x)} @ {self.param((a,) + tuple(shape), ctx)}"

    def r_matmul2(self, t, ctx, depth):
        dom, (h, b) = t
        a = self.width(ctx)
        x = self.expr((dom, (h, a)), ctx, depth)
        return f"{self.paren(x)} @ {self.param((a, b), ctx)}"

    def r_einsum(self, t, ctx, depth):
        dom, (h, e) = t
        d = self.width(ctx)
        x = self.expr((dom, (h, d)), ctx, depth)
        return f'einsum("hd,hde->he", {x}, {self.param((h, d, e), ctx)})'

    def r_axis_reduce(self, t, ctx, depth):
        dom, shape = t
        extra = self.width(ctx)
        if self.chance(0.7):
            x = self.expr((dom, tuple(shape) + (extra,)), ctx, depth)
            axis = self.choice(("-1", str(len(shape)), f"axis={len(shape)}"))
        else:
            x = self.expr((dom, (extra,) + tuple(shape)), ctx, depth)
            axis = self.choice(("0", f"-{len(shape) + 1}"))
        return f"{self.choice(AXIS_REDUCE)}({x}, {axis})"

    def r_axis_softmax(self, t, ctx, depth):
        return f"softmax({self.expr(t, ctx, depth)}, -1)"

    def r_concat(self, t, ctx, depth):
        dom, shape = t
        last = shape[-1]
        cut = self.draw(st.integers(1, last - 1))
        a = self.expr((dom, tuple(shape[:-1]) + (cut,)), ctx, depth)
        b = self.expr((dom, tuple(shape[:-1]) + (last - cut,)), ctx, depth)
        axis = self.choice((", axis=-1", "", f", axis={len(shape) - 1}"))
        return f"concat({a}, {b}{axis})"

    def r_reshape(self, t, ctx, depth):
        dom, (p,) = t
        a = self.choice([d for d in (2, 3, 4) if p % d == 0] or [1])
        x = self.expr((dom, (a, p // a)), ctx, depth)
        return f"reshape({x}, [{self.dim_text(a, ctx)} * {self.dim_text(p // a, ctx)}])"

    def r_select(self, t, ctx, depth):
        """A static index into the first feature axis: x[1], W[0], ..."""
        dom, shape = t
        n = self.choice((2, 3, 3, "F") if not ctx.in_layer else (2, 3))
        x = self.expr((dom, (n,) + tuple(shape)), ctx, depth)
        # a dim bound from data (F) is known only at run time, where the index may be past it
        return f"{self.paren(x)}[{self.draw(st.integers(0, n - 1 if isinstance(n, int) else 3))}]"

    def mask(self, t, ctx, depth) -> str:
        """A comparison of two values of type ``t`` (a 0/1 mask), sometimes combined with another."""
        a, b = self.expr(t, ctx, depth), self.expr(t, ctx, depth)
        cmp = f"{self.paren(a)} {self.choice(COMPARISONS)} {self.paren(b)}"
        if self.chance(0.2):
            return f"not ({cmp})"
        if self.chance(0.2):
            other = f"{self.paren(self.expr(t, ctx, depth))} {self.choice(COMPARISONS)} {self.choice(NUMBERS)}"
            return f"({cmp}) {self.choice(('&', '|'))} ({other})"
        return cmp

    def r_where(self, t, ctx, depth):
        return f"where({self.mask(t, ctx, depth)}, {self.expr(t, ctx, depth)}, {self.expr(t, ctx, depth)})"

    def r_clamp(self, t, ctx, depth):
        bounds = self.choice(("-1, 1", "0, 2.5", "min=0", "max=1", "min=-0.5, max=0.5", "1, 1"))
        return f"clamp({self.expr(t, ctx, depth)}, {bounds})"

    def r_constant(self, t, ctx, depth):
        """A constant tensor of the value's width beside it: arange, linspace or full."""
        (k,) = t[1]
        if k == 0:
            return self.expr(t, ctx, depth)      # every constant tensor has at least one element
        width = self.dim_text(k, ctx)
        constant = self.choice((f"arange({width})", f"arange(1, {width} + 1)", f"linspace(0, 1, {width})",
                                f"linspace(-pi, pi, {width})", f"full([{width}], 0.5)"))
        if isinstance(k, str) and constant.startswith("arange(1"):
            constant = f"arange({width})"        # a run-time dim is a length, not a compile-time bound
        return f"{self.paren(self.expr(t, ctx, depth))} {self.choice(('+', '*', '-'))} {constant}"

    def r_concat_sum(self, t, ctx, depth):
        """A concatenation of two widths (one maybe bound from data) through one weight over the sum."""
        dom, (k,) = t
        a, b = self.width(ctx), self.width(ctx)
        x = self.expr((dom, (a,)), ctx, depth)
        y = self.expr((dom, (b,)), ctx, depth)
        name = self.fresh("W")
        rows = f"{self.dim_text(a, ctx)} + {self.choice(('', '2 * '))}{self.dim_text(b, ctx)}"
        doubled = "2 * " in rows
        self.params.append(f"{name}: param[{rows}, {self.dim_text(k, ctx)}]")
        parts = f"{x}, {y}, {y}" if doubled else f"{x}, {y}"
        return f"concat({parts}) @ {name}"

    def r_global_attention(self, t, ctx, depth):
        h, d = t[1]
        c = self.choice((2, 3, d))
        q, k = (self.expr(("node", (h, c)), ctx, depth) for _ in range(2))
        v = self.expr(t, ctx, depth)
        scale = self.choice(("", ", scale=0.5", ", scale=2"))
        return f"global_attention({q}, {k}, {v}{scale}) by graph"

    def r_gather(self, t, ctx, depth):
        shape = t[1]
        x = self.expr(("node", shape), ctx, depth)
        return f"{self.paren(x)}[{self.choice(('src', 'dst'))}]"

    def r_broadcast_graph(self, t, ctx, depth):
        shape = t[1]
        return f"{self.paren(self.expr(('graph', shape), ctx, depth))}[batch]"

    def r_softmax_by(self, t, ctx, depth):
        return f"softmax({self.expr(t, ctx, depth)}) by dst"

    def r_aggregate(self, t, ctx, depth):
        shape = t[1]
        x = self.expr(("edge", shape), ctx, depth)
        return f"{self.choice(AGGREGATE)}({x}) by {self.choice(('dst', 'dst', 'src'))}"

    def r_gather_looped(self, t, ctx, depth):
        x = self.expr(("node", t[1]), ctx, depth)
        return f"{self.paren(x)}[looped.{self.choice(('src', 'dst'))}]"

    def r_aggregate_looped(self, t, ctx, depth):
        x = self.expr(("looped", t[1]), ctx, depth)
        by = self.choice(("dst", "dst", "src", "looped.dst"))
        return f"{self.choice(AGGREGATE)}({x}) by {by}"

    def r_degree_looped(self, t, ctx, depth):
        return f"{self.choice(('in_degree', 'out_degree'))}(looped)"

    def r_carry(self, t, ctx, depth):
        x = self.expr(("edge", t[1]), ctx, depth)
        fill = self.choice(CARRY_FILLS)
        return f"carry({x}, looped, {fill})"

    def r_readout(self, t, ctx, depth):
        shape = t[1]
        x = self.expr(("node", shape), ctx, depth)
        return f"{self.choice(AGGREGATE)}({x}) by graph"

    def r_degree(self, t, ctx, depth):
        return self.choice(("in_degree()", "out_degree()", "rsqrt(in_degree() + 1)"))

    def r_typed_matmul(self, t, ctx, depth):
        shape = t[1]
        a = self.width(ctx)
        x = self.expr(("edge", (a,)), ctx, depth) if self.chance(0.5) else \
            f"{self.paren(self.expr(('node', (a,)), ctx, depth))}[src]"
        name = self.fresh("R")
        self.params.append(f"{name}: param[{self.shape_text(('R', a) + tuple(shape), ctx)}]")
        return f"{self.paren(x)} @ {name}[etype]"

    def r_one_hot(self, t, ctx, depth):
        return self.choice(("one_hot(etype, R)", f"one_hot(etype, {self.relations})"))

    def r_batch_norm(self, t, ctx, depth):
        shape = t[1]
        x = self.expr(t, ctx, depth)
        stats = []
        for init in (" = zeros", " = ones", " = ones", " = zeros"):
            name = self.fresh("bn")
            self.params.append(f"{name}: param[{self.shape_text(shape, ctx)}]{init}")
            stats.append(name)
        return f"batch_norm({x}, {', '.join(stats)})"

    def r_prelude(self, t, ctx, depth):
        dom, (o,) = t
        d, k = self.width(ctx), self.width(ctx)
        x = self.expr((dom, (d,)), ctx, depth)
        if self.chance(0.7):
            ws = [self.param(s, ctx) for s in ((d, k), (k,), (k, o), (o,))]
            return f"mlp2({x}, {', '.join(ws)})"
        h = self.expr(t, ctx, depth)
        ws = [self.param(s, ctx) for s in ((d, 3, o), (o, 3, o), (3, o), (3, o))]
        return f"gru_cell({x}, {h}, {', '.join(ws)})"

    def r_layer_norm(self, t, ctx, depth):
        shape = t[1]
        x = self.expr(t, ctx, depth)
        return f"layer_norm({x}, {self.param(shape, ctx)}, {self.param(shape, ctx)})"

    # ---- layers --------------------------------------------------------------------------

    def r_layer(self, t, ctx, depth):
        dom, (k,) = t
        usable = [layer for layer in self.layers if layer.domain in (dom, "any")]
        if usable and self.chance(0.5):
            layer = self.choice(usable)
        else:
            layer = self.define_layer(dom, depth)
        d = self.width(ctx)
        arg = self.expr((dom, (d,)), ctx, depth)
        values = []
        for _, shape in layer.args:
            concrete = tuple(d if s == "D" else k if s == "K" else s for s in shape)
            values.append(self.param(concrete, ctx))
        return f"{layer.name}({', '.join([arg] + values)})"

    def define_layer(self, dom: str, depth: int) -> Layer:
        generic = dom in ("node", "edge") and self.chance(0.3)
        layer_dom = "any" if generic else dom
        name = self.fresh("layer")
        ctx = Context(env={"h": (dom, ("D",))}, base="h", in_layer=True, domain_generic=generic)
        body = []
        target = (dom, ("K",))
        for _ in range(self.draw(st.integers(0, 2))):
            var = self.fresh("v")
            vt = (dom, (self.choice(("D", "K", 2)),))
            body.append(f"    {var} = {self.expr(vt, ctx, min(depth, 2))}")
            ctx.env[var] = vt
        ret = self.expr(target, ctx, max(1, min(depth, 3)))
        args = [f"h: {layer_dom}[D]"] + [f"{n}: param[{', '.join(str(s) for s in shape)}]"
                                         for n, shape in ctx.layer_params]
        text = (f"layer {name}({', '.join(args)}) -> {layer_dom}[K] {{\n" + "".join(line + "\n" for line in body)
                + f"    return {ret}\n}}\n")
        layer = Layer(name, layer_dom, list(ctx.layer_params), text)
        self.layers.append(layer)
        return layer


def _result_types(b: ProgramBuilder) -> list[tuple]:
    count = b.draw(st.integers(1, 3)) if b.chance(0.25) else 1
    types = []
    for _ in range(count):
        dom = b.choice(("node", "node", "node", "edge", "graph"))
        rank = b.choice((1, 1, 1, 0, 2))
        shape = tuple(b.choice((2, 3, 4, *b.dims.values())) for _ in range(rank))
        types.append((dom, shape))
    return types


@st.composite
def programs(draw) -> dict:
    """One generated program case (see the module docstring)."""
    b = ProgramBuilder(draw)
    b.slips = b.chance(0.2)
    for name in ("H", "C", "K2")[:draw(st.integers(0, 3))]:
        b.dims[name] = draw(st.sampled_from((1, 2, 3, 4, 4, 5, 0) if name == "K2" else (2, 3, 4)))
    b.has_etype = b.chance(0.3)
    if b.chance(0.25):
        b.looped = draw(st.sampled_from(("self_loops", "remaining_self_loops", "k_hop")))
    if b.has_etype:
        b.relations = draw(st.integers(1, 3))
        b.dims["R"] = b.relations
    loop_count = None
    if b.chance(0.4):
        loop_count = draw(st.sampled_from(("T", "2", "3", "1", "0")))
        if loop_count == "T":
            b.dims["T"] = draw(st.integers(1, 3))
    # the leading dim of the parameters stacked per iteration (W[t]): at least 1
    stack_dim = "T" if loop_count == "T" else max(1, int(loop_count or 1))
    inputs = ["x: node[F]"]
    env: dict[str, tuple] = {"x": ("node", ("F",))}
    if b.chance(0.35):
        inputs.append("e: edge[FE]")
        env["e"] = ("edge", ("FE",))
    if b.chance(0.15):
        inputs.append("g: graph[FG]")
        env["g"] = ("graph", ("FG",))
    if b.has_etype:
        inputs.append("etype: edge int")
    ctx = Context(env=dict(env), base="x")
    depth = draw(st.integers(1, 4))
    body = []
    for _ in range(draw(st.integers(0, 3))):
        var = b.fresh("h")
        t = (b.choice(("node", "node", "edge", "graph")), (b.width(ctx),))
        body.append(f"    {var} = {b.expr(t, ctx, depth)}")
        ctx.env[var] = t
    if loop_count is not None:
        state = b.fresh("s")
        t = ("node", (b.width(ctx),))
        body.append(f"    {state} = {b.expr(t, ctx, 1)}")
        ctx.env[state] = t
        loop_ctx = Context(env=dict(ctx.env), base="x", loop="t", loop_count=stack_dim)
        inner = []
        for _ in range(draw(st.integers(0, 1))):
            var = b.fresh("m")
            vt = ("edge", t[1])
            inner.append(f"        {var} = {b.expr(vt, loop_ctx, 2)}")
            loop_ctx.env[var] = vt
        inner.append(f"        {state} = {b.expr(t, loop_ctx, 2)}")
        body.append(f"    for t in 0..{loop_count} {{\n" + "\n".join(inner) + "\n    }")
    results = _result_types(b)
    returns = [b.expr(t, ctx, depth) for t in results]
    if len(results) == 1 and b.chance(0.8):
        result_text = f"{results[0][0]}[{b.shape_text(results[0][1], ctx)}]"
    else:
        result_text = "(" + ", ".join(f"out{i}: {d}[{b.shape_text(s, ctx)}]" for i, (d, s) in enumerate(results)) + ")"
    args = inputs + b.params
    if b.chance(0.3):  # parameters first, inputs last
        args = b.params + inputs
    dims_text = "".join(f"dim {n} = {v}\n" for n, v in b.dims.items())
    if b.looped:
        hops = f", {draw(st.integers(1, 3))}" if b.looped == "k_hop" else ""
        dims_text += f"edges looped = {b.looped}(edge{hops})\n"
    layers_text = "".join(layer.text + "\n" for layer in b.layers)
    model = (f"model m({', '.join(args)}) -> {result_text} {{\n" + "".join(line + "\n" for line in body)
             + f"    return {', '.join(returns)}\n}}\n")
    files = {}
    if b.layers and b.chance(0.25):
        files["lib.mp"] = dims_text + layers_text
        main = '# generated\nimport "lib.mp"\n\n' + model
    else:
        main = "# generated\n" + dims_text + "\n" + layers_text + model
    files["main.mp"] = main
    components = []
    count = draw(st.integers(1, 3))
    for i in range(count):  # an empty graph, but not last in a batch (a batch vector cannot end with one)
        n = draw(st.sampled_from((0, 1, 2, 5, 8, 12, 20) if i < count - 1 or count == 1 else (1, 2, 5, 8, 12)))
        if b.chance(0.02):  # big enough for the backends' row-block and parallel paths
            n = 9000
        components.append([n, draw(st.integers(0, 3 * n)) if n else 0, draw(st.booleans())])
    graph = {"components": components, "seed": draw(st.integers(0, 2**16)),
             "sizes": {"F": draw(st.integers(1, 5)), "FE": draw(st.integers(1, 4)), "FG": draw(st.integers(1, 3))},
             "float64": draw(st.booleans())}
    options = {"dtype": draw(st.sampled_from(("float32", "float32", "float64"))),
               "optimize": draw(st.sampled_from((True, True, True, False))),
               "reference": b.chance(0.15), "train_mode": b.chance(0.15), "emit": b.chance(0.2),
               "seed": draw(st.integers(0, 3))}
    return {"kind": "program", "origin": "generated", "files": files, "main": "main.mp",
            "options": options, "graph": graph}
