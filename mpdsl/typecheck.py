"""Stage 2: AST -> typed IR. Name resolution, domain and shape checking with symbolic dims,
layer instantiation (inlined at each call, dims unified per call) and loop unrolling.

Checking and lowering are one walk (elaboration): every expression is typed by the same
per-op type rules (``mpdsl.ops``) that the IR verifier re-runs, so the checker cannot
disagree with the IR. Every user error is a ``CompileError`` at the offending text.

Scoping: a name is bound to the value of its latest assignment in its block (``h = relu(h)``:
every assignment is a new IR value, so rebinding is SSA renaming; arguments may be rebound too).
A ``for`` body may assign names of the enclosing scopes (loop-carried state, e.g. ``h = step(h)``,
keeping their type); names first defined in the body are local to one iteration. Layers see their
arguments and the `dim` constants of their own file and of the files it imports; the other dims in a
layer's signature are local to it and bound at each call from the argument types (a dim written as
a sum or product, ``param[2 * D + FE, H]``, is solved for its one name not bound otherwise).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from mpdsl import ast
from mpdsl.diagnostics import CompileError, Span, abbreviate
from mpdsl.initialisation import UNWRITTEN
from mpdsl.ir import EdgeSetDef, Program, Value, make_value, prune, verify
from mpdsl.limits import MAX_INT, MAX_NESTING, MAX_STEPS
from mpdsl.ops import (
    AGGREGATIONS,
    AXIS_REDUCTIONS,
    CARRIED_EDGE_SETS,
    CARRY_FILLS,
    DERIVED_EDGE_SETS,
    HOP_EDGE_SETS,
    INITIALIZERS,
    OPS,
    REDUCE_AXES,
    UNARY_OPS,
    edge_set_label,
    global_attention_sizes,
    running_statistic,
)
from mpdsl.types import (
    INT_DTYPE,
    Dim,
    DimSolveError,
    Domain,
    Space,
    TensorType,
    TypeRuleError,
    edge_set_relation,
    node_label,
    solve_dim,
    typed_edge_set,
)

# How each derivation of an edge set is written (hints).
DERIVATION_FORMS = {"self_loops": "self_loops(edge)", "remaining_self_loops": "remaining_self_loops(edge)",
                    "k_hop": "k_hop(edge, k)"}

RESERVED = {"src", "dst", "batch", "graph"}
ANY = "any"  # env key of a layer's domain variable (identifiers cannot clash: 'any' is a keyword)
# A layer's environment: dims bound so far by name (Dim), and under ANY the domain that 'any' stands for.
Env = dict[str, Any]
BUILTIN_INDICES = ("src", "dst", "batch")
LEFT_ASSOCIATIVE = ("add", "sub", "mul", "div", "matmul", "logical_and", "logical_or")  # a + b + c == (a + b) + c
# Hints for the type rules that give none themselves.
OP_HINTS = {
    "one_hot": "one_hot(etype, R) encodes ids 0..R-1 with R >= 1",
    "batch_norm": "batch_norm(x, running_mean, running_var, gamma, beta, eps=1e-5, momentum=0.1): eps > 0, "
                  "0 <= momentum <= 1",
    "select": "x[i] with an integer i picks entry i of the first feature axis: 0 <= i < its size",
}


@dataclass(frozen=True)
class LoopCounter:
    value: int


class _SymbolicDim(Exception):
    """A compile-time number read a dim only known at run time while a layer is checked with its
    signature dims as symbols (``Checker.generic_depth``): the value is left to each call's check."""


# Named constants of the language (a name bound in the program, or a dim, takes precedence).
CONSTANTS = {"pi": math.pi}
_CONSTANT_CHAIN = ("add", "sub", "mul", "div")  # left-associative operators of constant expressions


class _Builder:
    """Collects emitted values in order."""

    def __init__(self):
        self.values: list[Value] = []

    def add(self, value: Value) -> Value:
        self.values.append(value)
        return value


class _Scope:
    def __init__(self, parent: _Scope | None, carries: bool):
        self.parent = parent
        self.carries = carries  # a for-body: may rebind names of enclosing scopes
        self.names: dict[str, object] = {}

    def lookup(self, name: str):
        scope: _Scope | None = self
        while scope is not None:
            if name in scope.names:
                return scope.names[name]
            scope = scope.parent
        return None

    def owner(self, name: str) -> _Scope | None:
        scope: _Scope | None = self
        while scope is not None:
            if name in scope.names:
                return scope
            scope = scope.parent
        return None

    def visible(self) -> set[str]:
        names: set[str] = set()
        scope: _Scope | None = self
        while scope is not None:
            names |= set(scope.names)
            scope = scope.parent
        return names


@dataclass(frozen=True)
class _Mismatch:
    """The error of an argument whose type does not fit its declaration (a detail in parentheses)."""

    checker: Checker
    declared: ast.TypeExpr
    actual: TensorType
    span: Span
    what: str

    def __call__(self, detail: str) -> CompileError:
        return self.error(f"{self.what}: expected {self.declared}, got {self.actual} ({detail})",
                          "pass a value of the declared domain and shape, or change the declaration")

    def error(self, message: str, hint: str) -> CompileError:
        return self.checker.error(message, self.span, hint)


@dataclass(frozen=True)
class _Pending:
    """A declared dim of a layer argument (as written) and the dim of the value passed."""

    dim: ast.DimExpr
    actual: Dim
    mismatch: _Mismatch


def _close(name: str, candidates) -> str | None:
    match = difflib.get_close_matches(name, sorted(candidates), n=1)
    return match[0] if match else None


class Checker:
    """Type-checks one model of a module and lowers it to IR."""

    def __init__(self, module: ast.Module, float_dtype: str = "f32",
                 dims: dict[str, int] | None = None, imported: list[ast.Module] | None = None,
                 prelude: ast.Module | None = None, imports: Mapping[int, Sequence[ast.Module]] | None = None):
        self.module = module
        self.imported = list(imported or [])
        self.prelude = prelude
        self.imports = imports
        # The `dim` constants each layer sees: those of its file and of the files that file imports.
        self.layer_dims: dict[str, frozenset[str]] = {}
        self.dim_defs: dict[str, ast.DimDef] = {}
        self.float_dtype = float_dtype
        self.overrides = dict(dims or {})
        self.layers: dict[str, ast.FuncDef] = {}
        self.global_dims: dict[str, int] = {}
        self.edge_sets: dict[str, ast.EdgesDef] = {}  # the declared edge sets, in declaration order
        self.node_types: dict[str, ast.NodesDef] = {}  # the declared node types
        self.call_stack: list[str] = []
        self.builder = _Builder()
        # > 0 while a layer is checked with its signature dims as symbols (its IR is thrown away):
        # a dim used as a number then stands for any value; each call checks it with real dims.
        self.generic_depth = 0
        # Compile-time work (limits.MAX_NESTING, limits.MAX_STEPS): the nesting level of the
        # expression being checked (through inlined layers), the steps of the current elaboration
        # (one model, or one layer checked alone) and the loops and layer calls being expanded.
        self.depth = 0
        self.steps = 0
        self.expanding: list[tuple[str, Span]] = []
        # Initialisers written on layer parameters, by the model parameter passed to them (first call wins).
        self.layer_inits: dict[str, str] = {}

    # ---- errors and emission -------------------------------------------------------------

    @staticmethod
    def error(message: str, span: Span | None, hint: str | None = None) -> CompileError:
        return CompileError(message, span, hint)

    def emit(self, op: str, operands: list[Value], attrs: dict, span: Span,
             operand_spans: list[Span] | None = None, declared: TensorType | None = None) -> Value:
        t = self.infer(op, [o.type for o in operands], attrs, span, operand_spans, declared)
        self.check_size(t.shape, span, "this value")
        return self.add(make_value(op, operands, attrs, t, span))

    def infer(self, op: str, types: list[TensorType], attrs: dict, span: Span,
              operand_spans: list[Span] | None = None, declared: TensorType | None = None) -> TensorType:
        """The result type of ``op`` on operands of ``types`` (its type rule), errors ``located``."""
        with self.located(op, span, operand_spans):
            return OPS[op].infer(types, attrs, declared)

    @contextmanager
    def located(self, op: str, span: Span, operand_spans: list[Span] | None = None):
        """A type rule's error (of ``op``) raised inside as a ``CompileError`` at the operand it blames
        (else at ``span``)."""
        try:
            yield
        except TypeRuleError as err:
            blame = span
            if err.operand is not None and operand_spans and err.operand < len(operand_spans):
                blame = operand_spans[err.operand]
            hint = err.hint or OP_HINTS.get(op) or "check the domains and shapes of the operands"
            raise self.error(err.message, blame, hint) from None

    def add(self, value: Value) -> Value:
        self.step(value.span)
        return self.builder.add(value)

    # ---- limits on compile-time work -----------------------------------------------------

    def step(self, span: Span | None) -> None:
        """Count one step of unrolling/inlining work; past ``MAX_STEPS`` the outermost loop or
        layer call being expanded (else ``span``) is blamed."""
        self.steps += 1
        if self.steps <= MAX_STEPS:
            return
        if not self.expanding:
            raise self.error(f"the program has more than {MAX_STEPS} IR values here", span,
                             "that is the compile-time limit of one model: split the computation into "
                             "several models")
        what, where = self.expanding[0]
        raise self.error(f"{what} expands to more than {MAX_STEPS} steps at compile time "
                         "(IR values, loop iterations and layer calls)", where,
                         "loops are unrolled and layers inlined for each call: unroll fewer iterations, "
                         "or call big layers from fewer places")

    @contextmanager
    def expanding_site(self, what: str, span: Span):
        self.expanding.append((what, span))
        try:
            yield
        finally:
            self.expanding.pop()

    @contextmanager
    def nested(self, span: Span):
        """One level deeper (``MAX_NESTING``), counted through inlined layers."""
        self.depth += 1
        try:
            if self.depth > MAX_NESTING:
                raise self.error(f"nested more than {MAX_NESTING} levels deep (counting the bodies of "
                                 "the layers called)", span,
                                 "assign inner results to names first (h1 = ..., then f(h1)), or call "
                                 "layers from fewer levels of other layers")
            yield
        finally:
            self.depth -= 1

    def fresh_budget(self):
        """Start a new elaboration (a model, or a layer checked alone): (steps, expanding) to restore."""
        saved = (self.steps, self.expanding)
        self.steps, self.expanding = 0, []
        return saved

    def check_size(self, shape, span: Span, what: str) -> None:
        """Static dims and per-row sizes fit int64 (``MAX_INT``)."""
        size = 1
        for d in shape:
            if d.at_ones() > MAX_INT:
                raise self.error(f"dimension {d} of {what} is larger than 2**63 - 1", span,
                                 "dimensions go up to 2**63 - 1")
            size *= d.at_ones()
        if size > MAX_INT:
            raise self.error(f"{what} has more than 2**63 - 1 elements per row ({' * '.join(map(str, shape))})",
                             span, "use smaller dimensions")

    def const(self, value: float, span: Span) -> Value:
        return self.emit("const", [], {"value": float(value)}, span,
                         declared=TensorType(Domain.PARAM, (), self.float_dtype))

    # ---- module level --------------------------------------------------------------------

    def collect(self) -> None:
        """Gather dims and layers: the prelude's (shadowable), the imported modules', then this module's."""
        seen: dict[str, ast.Node] = {}
        prelude_items = [i for i in (self.prelude.items if self.prelude is not None else ())
                         if not isinstance(i, ast.Import)]
        user_items = [i for m in self.imported + [self.module] for i in m.items if not isinstance(i, ast.Import)]
        user_names = {i.name for i in user_items}
        items = [i for i in prelude_items if i.name not in user_names] + user_items
        own = {id(i) for i in self.module.items}
        scopes = self.dim_scopes()
        module_of = {id(i): id(m) for m in self.imported + [self.module] + ([self.prelude] if self.prelude else [])
                     for i in m.items}
        for item in items:
            if isinstance(item, ast.FuncDef) and item.kind == "model" and id(item) not in own:
                continue  # only the compiled file's models are entry points
            name = item.name
            span = item.name_span if isinstance(item, (ast.FuncDef, ast.EdgesDef, ast.NodesDef)) else item.span
            if name in seen:
                first = seen[name].span
                where = f"line {first.line}" + ("" if first.source is span.source else f" of {first.source.name}")
                raise self.error(f"duplicate definition of '{name}'", span,
                                 f"'{name}' is already defined at {where}; rename one of them")
            if name in RESERVED:
                raise self.error(f"'{name}' is a reserved name", span, "src, dst, batch and graph are built in")
            seen[name] = item
            if isinstance(item, ast.DimDef):
                self.global_dims[name] = item.value
                self.dim_defs[name] = item
            elif isinstance(item, ast.EdgesDef):
                self.check_edges_def(item)
                self.edge_sets[name] = item
            elif isinstance(item, ast.NodesDef):
                if "__" in name:
                    raise self.error(f"node type names have no '__', got '{name}'", span,
                                     "'__' separates the parts of a typed graph's array names (paper__x)")
                self.node_types[name] = item
            elif item.kind == "layer":
                self.layers[name] = item
                self.layer_dims[name] = scopes[module_of[id(item)]]
        for key, value in self.overrides.items():
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_INT:
                raise CompileError(f"dimension override {key}={value!r} is not an integer from 0 to 2**63 - 1",
                                   None, "pass dims as NAME=INT (--dim H=32, dims={'H': 32})")
            self.global_dims[key] = value

    def dim_scopes(self) -> dict[int, frozenset[str]]:
        """By ``id`` of each module: the names of the `dim` constants its layers see, its own and
        those of the modules it imports, transitively (``imports``; without it, in the dependency
        order of ``imported``, those listed before it), and the prelude's."""
        modules = self.imported + [self.module]
        prelude = frozenset(d.name for d in self.prelude.dims) if self.prelude is not None else frozenset()
        scopes = {id(self.prelude): prelude} if self.prelude is not None else {}
        for i, mod in enumerate(modules):
            if self.imports is None:
                reached = modules[:i + 1]
            else:
                reached, stack = [], [mod]
                while stack:
                    m = stack.pop()
                    if all(m is not r for r in reached):
                        reached.append(m)
                        stack.extend(self.imports.get(id(m), ()))
            scopes[id(mod)] = prelude | {d.name for m in reached for d in m.dims}
        return scopes

    def invisible_dim_hint(self, name: str, env: Env) -> str | None:
        """A hint for a name not in ``env`` that is a `dim` of a file this code does not see (a
        layer of an imported file using a dim of the file importing it), else None."""
        item = self.dim_defs.get(name)
        if item is None or name in env:
            return None
        return (f"`dim {name}` is declared in {item.span.source.name} (line {item.span.line}), which this "
                "file does not import: a layer sees the dims of its own file and of the files it imports")

    def file_dims(self, layer: str) -> Env:
        """The environment a layer's body and signature start from: the `dim` constants it sees."""
        return {k: Dim(self.global_dims[k]) for k in self.layer_dims[layer] if k in self.global_dims}

    def check_edges_def(self, item: ast.EdgesDef) -> None:
        """An edge set declaration: an input set (typed: between two declared node types), or a
        derivation of a set declared before it."""
        if item.src is not None:
            for node_type, span in ((item.src, item.src_span), (item.dst, item.dst_span)):
                if node_type not in self.node_types:
                    close = _close(node_type or "", list(self.node_types))
                    raise self.error(f"unknown node type '{node_type}'", span,
                                     f"did you mean '{close}'?" if close else
                                     f"declare it before the edge set: `nodes {node_type}`")
            return
        if item.kind is None:
            return
        if item.kind not in DERIVED_EDGE_SETS:
            close = _close(item.kind, DERIVED_EDGE_SETS)
            forms = ", ".join(DERIVATION_FORMS[k] for k in DERIVED_EDGE_SETS)
            raise self.error(f"unknown edge set derivation '{item.kind}'", item.kind_span,
                             "the two-hop set is k_hop(edge, 2)" if item.kind in ("two_hop", "TwoHop") else
                             f"did you mean '{close}'?" if close else f"derive an edge set with one of {forms}")
        self.hop_count(item)
        if item.base != "edge" and item.base not in self.edge_sets:
            if item.base in ("node", "graph", "param", "any"):
                raise self.error(f"{item.kind} derives an edge set from an edge set, not from '{item.base}'",
                                 item.base_span, f"write {item.kind}(edge) for the graph's own edges")
            known = ["edge", *self.edge_sets]
            close = _close(item.base or "", known)
            raise self.error(f"unknown edge set '{item.base}'", item.base_span,
                             f"did you mean '{close}'?" if close else
                             "derive from edge (the graph's edges) or from an edge set declared before this one")
        if item.base != "edge" and self.edge_sets[item.base].src is not None:
            raise self.error(f"{item.kind} adds a self loop per node, and '{item.base}' runs between two node types",
                             item.base_span, "derive self-loop sets from sets over one node set (edge, or an "
                             "untyped `edges NAME`)")

    def hop_count(self, item: ast.EdgesDef) -> int:
        """The hop count of a derived set's declaration (``k_hop(edge, 2)``: 2; 0 for a kind without
        one): an integer literal from 1 to ``MAX_INT`` where the kind takes one, none otherwise."""
        form = DERIVATION_FORMS.get(item.kind or "", "")
        if item.kind not in HOP_EDGE_SETS:
            if item.count is not None:
                raise self.error(f"{item.kind} takes no hop count", item.count_span, f"write {form}")
            return 0
        if item.count is None:
            raise self.error(f"{item.kind} needs a hop count", item.kind_span,
                             f"write {form}: the pairs joined by a path of 1 to k edges")
        if not item.count.lstrip("-").isdigit():
            what = "a name" if item.count[:1].isalpha() or item.count[:1] == "_" else "not an integer"
            raise self.error(f"the hop count of {item.kind} must be an integer literal, and '{abbreviate(item.count)}' "
                             f"is {what}", item.count_span, f"write {form}, e.g. {item.kind}({item.base}, 2)")
        digits = item.count.lstrip("-").lstrip("0")
        value = int(item.count) if len(digits) <= len(str(MAX_INT)) else (-1 if item.count[0] == "-" else MAX_INT + 1)
        if value < 1:
            raise self.error(f"the hop count of {item.kind} must be at least 1, got {abbreviate(item.count)}",
                             item.count_span,
                             f"{item.kind}({item.base}, 1) is the base set's pairs; 2 adds those two hops away")
        if value > MAX_INT:
            raise self.error(f"the hop count {abbreviate(item.count)} is too large", item.count_span,
                             f"integers go up to 2**63 - 1 = {MAX_INT}")
        return value

    def edge_set_name(self, name: str, span: Span | None) -> str:
        """The declared edge set ``name`` ("" for ``edge``, the graph's own edges); an error otherwise."""
        if name == "edge":
            return ""
        if name not in self.edge_sets:
            close = _close(name, ["edge", *self.edge_sets])
            raise self.error(f"unknown edge set '{name}'", span,
                             f"did you mean '{close}'?" if close else
                             "declare it at the top of the file: `edges NAME` (given with the graph) or "
                             "`edges NAME = self_loops(edge)`")
        item = self.edge_sets[name]
        if item.src is not None:
            assert item.dst is not None
            return typed_edge_set(name, item.src, item.dst)
        return name

    def program_edge_sets(self, values) -> tuple[EdgeSetDef, ...]:
        """The definitions of the edge sets ``values`` use, with the sets they derive from (bases first)."""
        used: set[str] = set()
        for v in values:
            used |= {v.attr.get("edges", ""), v.attr.get("base", "")}
            if v.type.domain is Domain.EDGE:
                used.add(v.type.rowset)
        used = {edge_set_relation(u) for u in used if u}
        result = []
        for name, item in reversed(list(self.edge_sets.items())):
            if name in used:
                result.append(EdgeSetDef(self.edge_set_name(name, item.name_span),
                                         "input" if item.kind is None else item.kind,
                                         "" if item.base in (None, "edge") else item.base, item.span,
                                         self.hop_count(item)))
                if item.base not in (None, "edge"):
                    used.add(item.base)
        return tuple(reversed(result))

    def pick_model(self, name: str | None) -> ast.FuncDef:
        models = {m.name: m for m in self.module.models}
        if name is not None:
            if name not in models:
                raise CompileError(f"no model named '{name}'", None,
                                   f"models in this file: {', '.join(models) or 'none'}")
            return models[name]
        if not models:
            raise self.error("the program defines no model", self.module.span,
                             "add `model NAME(x: node[F], ...) -> node[C] { ... }`")
        if len(models) > 1:
            second = list(models.values())[1]
            raise self.error(f"the program defines several models ({', '.join(models)})", second.name_span,
                             "choose one with --model NAME (or model= in mpdsl.compile)")
        return next(iter(models.values()))

    def check(self, model_name: str | None = None) -> Program:
        self.collect()
        for layer in self.layers.values():
            self.check_layer_generic(layer)
        model = self.pick_model(model_name)
        return self.lower_model(model)

    # ---- types ---------------------------------------------------------------------------

    def eval_dim(self, expr: ast.DimExpr, env: Env, what: str) -> Dim:
        result = self._dim_value(expr, env, what)
        if result.at_ones() > MAX_INT:
            raise self.error(f"dimension {expr} = {result} in {what} is larger than 2**63 - 1", expr.span,
                             "dimensions go up to 2**63 - 1")
        return result

    def _dim_value(self, expr: ast.DimExpr, env: Env, what: str) -> Dim:
        if expr.kind == "int":
            return Dim(int(expr.value or 0))
        if expr.kind == "name":
            name = str(expr.value)
            if name not in env:
                raise self.error(f"unbound dimension '{name}' in {what}", expr.span,
                                 self.invisible_dim_hint(name, env)
                                 or f"declare it with `dim {name} = ...` or use it in an input's type so it is "
                                 "bound from data")
            return env[name]
        parts = [self._dim_value(d, env, what) for d in expr.operands]
        result = parts[0]
        for part in parts[1:]:
            result = result + part if expr.kind == "sum" else result * part
        return result

    def eval_type(self, texpr: ast.TypeExpr, env: Env, what: str) -> TensorType:
        shape = tuple(self.eval_dim(d, env, what) for d in texpr.dims)
        self.check_size(shape, texpr.span, what)
        dtype = INT_DTYPE if texpr.dtype == "int" else self.float_dtype
        if texpr.domain == ANY:
            if ANY not in env:
                raise self.error(f"'any' in {what} is not bound by an argument", texpr.span,
                                 "give at least one argument an 'any' type so the domain is known")
            if texpr.rowset is not None:
                raise self.error("'any' stands for a whole domain and takes no edge set", texpr.rowset_span,
                                 f"write edge<{texpr.rowset}>[...] for values of that edge set")
            space: Space = env[ANY]
            return TensorType(space.domain, shape, dtype, space.name)
        return TensorType(Domain(texpr.domain), shape, dtype, self.type_rowset(texpr))

    def type_rowset(self, texpr: ast.TypeExpr) -> str:
        """The edge set a type names (``edge<pairs>``), the node type (``node<paper>``): "" for none."""
        if texpr.rowset is None:
            return ""
        if texpr.domain == "node":
            if texpr.rowset in self.edge_sets:
                raise self.error("only edge values live on an edge set, not node values", texpr.rowset_span,
                                 f"write edge<{texpr.rowset}>[...] for values of the edge set {texpr.rowset}; node "
                                 "values live on the graph's nodes or on a node type (`nodes NAME`)")
            if texpr.rowset not in self.node_types:
                close = _close(texpr.rowset, list(self.node_types))
                raise self.error(f"unknown node type '{texpr.rowset}'", texpr.rowset_span,
                                 f"did you mean '{close}'?" if close else
                                 f"declare it at the top of the file: `nodes {texpr.rowset}`")
            return texpr.rowset
        if texpr.domain != "edge":
            raise self.error(f"only edge values live on an edge set and node values on a node type, not "
                             f"{texpr.domain} values", texpr.rowset_span,
                             f"write edge<{texpr.rowset}>[...] or node<{texpr.rowset}>[...], or drop <{texpr.rowset}>")
        return self.edge_set_name(texpr.rowset, texpr.rowset_span)

    def check_arg_type(self, arg: ast.Arg) -> None:
        t = arg.type
        if t.dtype == "int":
            if t.domain == "param":
                raise self.error("parameters are float", t.span, "declare it as param[...] (drop 'int')")
            if t.dims:
                raise self.error("int inputs are one index per row", t.span,
                                 f"declare it as {t.domain} int (no feature dims)")
        if arg.name in RESERVED:
            raise self.error(f"'{arg.name}' is a reserved name", arg.span,
                             "src, dst, batch and graph are built in; rename the argument")
        if t.domain == ANY and t.dtype == "int":
            raise self.error("an 'any' argument is float", t.span, "declare int ids with a concrete domain")

    def bind_pattern(self, texpr: ast.TypeExpr, actual: TensorType, env: Env,
                     span: Span, what: str) -> list[_Pending]:
        """Unify a declared argument type with an actual one, binding the declared dims in ``env``:
        a plain name at once, a dim whose names are bound is checked; the dims with names still
        unbound are returned, for ``bind_pending`` once every argument is seen."""
        mismatch = _Mismatch(self, texpr, actual, span, what)

        if texpr.domain == ANY:
            if actual.domain is Domain.PARAM:
                raise mismatch("'any' stands for a node, edge or graph value")
            if ANY in env and env[ANY] != actual.space:
                raise mismatch(f"'any' is already {env[ANY]} in this call")
            env[ANY] = actual.space
        elif actual.domain.value != texpr.domain:
            raise mismatch(f"domain {actual.domain} is not {texpr.domain}")
        elif actual.rowset != self.type_rowset(texpr):
            if actual.domain is Domain.NODE:
                raise mismatch(f"{node_label(actual.rowset)} is not {node_label(self.type_rowset(texpr))}")
            raise mismatch(f"edge set {edge_set_label(actual.rowset)} is not "
                           f"{edge_set_label(self.type_rowset(texpr))}")
        if (texpr.dtype == "int") != (actual.dtype == INT_DTYPE):
            raise mismatch("dtype differs")
        if len(texpr.dims) != actual.rank:
            raise mismatch(f"{actual.rank} feature axes, not {len(texpr.dims)}")
        later = []
        for dexpr, dim in zip(texpr.dims, actual.shape):
            if dexpr.plain_name is not None and dexpr.plain_name not in env:
                env[dexpr.plain_name] = dim
            else:
                later.append(_Pending(dexpr, dim, mismatch))
        pending = []
        for entry in later:
            if any(name not in env for name in entry.dim.names()):
                pending.append(entry)
                continue
            self.check_dim(entry, env)
        return pending

    def bind_pending(self, pending: list[_Pending], env: Env) -> None:
        """Bind the names of the dims ``bind_pattern`` left: a dim with one unbound name is solved
        for it (``2*D + FE`` against 36 with FE = 4: D = 16), in any order, until all are bound; a
        dim left with several unbound names is an error."""
        while pending:
            progress = False
            waiting = []
            for entry in pending:
                free = [name for name in entry.dim.names() if name not in env]
                if len(free) > 1:
                    waiting.append(entry)
                    continue
                progress = True
                if free:
                    env[free[0]] = self.solve_dim(entry, free[0], env)
                self.check_dim(entry, env)
            if not progress:
                entry = waiting[0]
                free = [name for name in entry.dim.names() if name not in env]
                names = " and ".join(free)
                raise entry.mismatch.error(
                    f"{entry.mismatch.what}: cannot bind {names} from {entry.dim} = {entry.actual}: "
                    "no other argument binds them",
                    f"give {free[0]} alone as the dim of another argument (e.g. `x: node[{free[0]}]`), or "
                    f"declare it with `dim {free[0]} = ...`")
            pending = waiting

    def check_dim(self, entry: _Pending, env: Env) -> None:
        """The declared dim, its names bound, equals the actual one (else an error showing the dim
        with the numbers its names stand for: ``2*D + FE = 2*16 + 4 = 36 but got 35``)."""
        expected = self.eval_dim(entry.dim, env, entry.mismatch.what)
        if expected == entry.actual:
            return
        shown = entry.dim.render(lambda name: str(env[name].value) if env[name].is_static else name)
        value = f"{shown} = {expected}" if entry.dim.plain_name is None and shown != str(expected) else f"{expected}"
        raise entry.mismatch(f"dim {entry.dim} = {value} but got {entry.actual}")

    def check_bindable(self, dims: Sequence[ast.DimExpr], known: set[str], source: str, one_source: str) -> None:
        """Every name of ``dims`` not in ``known`` can be bound from the values that ``source``
        names (``one_source``: one of them, with its article): it is some dim alone, or the one name
        left in a dim once the others are bound (``bind_pending`` and the run-time binding follow
        the same order). Else an error at the first dim that leaves several names unbound."""
        bound = set(known) | {d.plain_name for d in dims if d.plain_name is not None}
        progress = True
        while progress:
            progress = False
            for d in dims:
                free = [name for name in d.names() if name not in bound]
                if len(free) == 1:
                    bound.add(free[0])
                    progress = True
        for d in dims:
            free = [name for name in d.names() if name not in bound]
            if free:
                raise self.error(f"cannot bind {' and '.join(free)} in dimension {d}: no {source} has "
                                 f"{'it' if len(free) == 1 else 'any of them'} alone, and a dim is solved for "
                                 "one unknown only", d.span,
                                 f"give {free[0]} alone as the dim of {one_source} (node[{free[0]}]), or declare "
                                 f"it with `dim {free[0]} = ...`")

    def solve_dim(self, entry: _Pending, name: str, env: Env) -> Dim:
        """The value of ``name``, the one unbound name of ``entry``'s dim, from the actual dim."""
        placeholder = f"?{name}"  # not a name: cannot clash with a symbol of the actual dims
        dim = self.eval_dim(entry.dim, {**env, name: Dim(1, (placeholder,))}, entry.mismatch.what)
        try:
            return solve_dim(dim, placeholder, entry.actual)
        except DimSolveError as err:
            reason = err.reason.replace(placeholder, name)
            raise entry.mismatch(f"{entry.dim} = {entry.actual} gives {name} {reason}") from None

    # ---- layers and models ---------------------------------------------------------------

    def check_layer_generic(self, layer: ast.FuncDef) -> None:
        """Check a layer once with its signature dims as symbols (errors found even if uncalled)."""
        env: Env = {}
        if any(arg.type.domain == ANY for arg in layer.args):
            env[ANY] = Space(Domain.NODE)  # 'any' is checked with node as its stand-in
        args = []
        env.update(self.file_dims(layer.name))
        known = set(env)
        for arg in layer.args:
            self.check_arg_type(arg)
            for d in arg.type.dims:
                for name in d.names():
                    if name not in env:
                        env[name] = Dim(1, (name,))
        self.check_bindable([d for arg in layer.args for d in arg.type.dims], known, "other argument",
                            "another argument")
        self.check_unique_args(layer)
        saved, self.builder = self.builder, _Builder()
        budget = self.fresh_budget()
        self.call_stack.append(layer.name)
        self.generic_depth += 1
        try:
            for arg in layer.args:
                t = self.eval_type(arg.type, env, f"the type of '{arg.name}'")
                self.check_arg_init(arg, t)
                args.append(self.add(make_value("input" if t.domain is not Domain.PARAM else "param",
                                                [], self._generic_attrs(arg, t), t, arg.span)))
            self.elaborate_body(layer, args, env)
        finally:
            self.generic_depth -= 1
            self.call_stack.pop()
            self.builder = saved
            self.steps, self.expanding = budget

    @staticmethod
    def _generic_attrs(arg: ast.Arg, t: TensorType) -> dict:
        return {"name": arg.name} if t.domain is not Domain.PARAM else {"name": arg.name, "init": "zeros"}

    def check_unique_args(self, func: ast.FuncDef) -> None:
        seen: dict[str, ast.Arg] = {}
        for arg in func.args:
            if arg.name in seen:
                raise self.error(f"duplicate definition of argument '{arg.name}'", arg.span,
                                 "each argument needs its own name")
            if arg.name in self.layers or arg.name in self.edge_sets:
                what = "layer" if arg.name in self.layers else "edge set"
                raise self.error(f"argument '{arg.name}' shadows the {what} of the same name", arg.span,
                                 "rename the argument")
            seen[arg.name] = arg

    def lower_model(self, model: ast.FuncDef) -> Program:
        self.fresh_budget()
        self.check_unique_args(model)
        env: Env = {k: Dim(v) for k, v in self.global_dims.items()}
        run_time_dims: list[str] = []
        # Input types bind their dims from data: a name not yet defined becomes a run-time symbol.
        for arg in model.args:
            self.check_arg_type(arg)
            if arg.type.domain == ANY:
                raise self.error("a model's arguments have a concrete domain", arg.type.span,
                                 "'any' is for layers; declare node, edge, graph or param")
            if arg.type.domain == "param":
                continue
            for d in arg.type.dims:
                for name in d.names():
                    if name not in env:
                        env[name] = Dim(1, (name,))
                        run_time_dims.append(name)
        # Only the run-time symbols are checked: a name only parameters use is an unbound dim below.
        written = [d for arg in model.args for d in arg.type.dims]
        self.check_bindable(written, {n for d in written for n in d.names()} - set(run_time_dims),
                            "input or parameter", "an input or parameter")
        args: list[Value] = []
        for arg in model.args:
            t = self.eval_type(arg.type, env, f"the type of '{arg.name}'")
            init = self.check_arg_init(arg, t)
            if t.domain is Domain.PARAM:
                args.append(self.emit("param", [], {"name": arg.name, "init": init}, arg.span, declared=t))
            else:
                args.append(self.emit("input", [], {"name": arg.name}, arg.span, declared=t))
        self.call_stack.append(model.name)
        outputs = self.elaborate_body(model, args, env)
        self.call_stack.pop()
        names = self.output_names(model)
        dims = tuple((k, v) for k, v in sorted(self.global_dims.items())) + tuple((k, None) for k in run_time_dims)
        values, outputs = self.with_layer_inits(self.builder.values, outputs)
        program = prune(Program(model.name, dims, values, tuple(zip(names, outputs))))
        return verify(Program(program.name, program.dims, program.values, program.outputs,
                              self.program_edge_sets(program.values)))

    def check_arg_init(self, arg: ast.Arg, t: TensorType) -> str:
        """The initializer of a param argument (``UNWRITTEN`` when none is written); other arguments
        take none."""
        if t.domain is Domain.PARAM:
            return self.initializer(arg, t)
        if arg.init is not None:
            raise self.error(f"input '{arg.name}' cannot have an initializer", arg.span,
                             "only param arguments take `= init`")
        return UNWRITTEN

    def record_layer_inits(self, layer: ast.FuncDef, values: list[Value]) -> None:
        """A layer's ``gamma: param[D] = ones`` initialises the model parameter passed as ``gamma``
        (or indexed, ``gamma[t]``) unless the model writes one on it."""
        for arg, value in zip(layer.args, values):
            if arg.init is None or value.type.domain is not Domain.PARAM:
                continue
            init = self.initializer(arg, value.type)
            while value.op == "select":
                value = value.operands[0]
            if value.op == "param":
                self.layer_inits.setdefault(value.attr["name"], init)

    def with_layer_inits(self, values: list[Value], outputs: list[Value]) -> tuple[tuple[Value, ...], list[Value]]:
        """The program's values with the layers' initialisers on the params that have none written."""
        renamed: dict[Value, Value] = {}
        rebuilt = []
        for v in values:
            if v.op == "param" and v.attr["init"] == UNWRITTEN and v.attr["name"] in self.layer_inits:
                new = make_value("param", [], {**v.attr, "init": self.layer_inits[v.attr["name"]]}, v.type, v.span)
            elif any(o in renamed for o in v.operands):
                new = Value(v.op, tuple(renamed.get(o, o) for o in v.operands), v.attrs, v.type, v.span)
            else:
                new = v
            if new is not v:
                renamed[v] = new
            rebuilt.append(new)
        return tuple(rebuilt), [renamed.get(o, o) for o in outputs]

    @staticmethod
    def output_names(model: ast.FuncDef) -> list[str]:
        if len(model.results) == 1 and model.results[0].name is None:
            return ["out"]
        return [r.name or f"out{i}" for i, r in enumerate(model.results)]

    def initializer(self, arg: ast.Arg, t: TensorType) -> str:
        """The initializer written on param argument ``arg`` (checked), else ``UNWRITTEN``: then
        ``mpdsl.initialisation`` chooses it from the parameter's use."""
        if arg.init is None:
            return UNWRITTEN
        if isinstance(arg.init, float):
            return repr(arg.init)
        if arg.init == "constant":
            raise self.error("`= constant` needs its value", arg.span,
                             f"write the number itself, e.g. `{arg.name}: {arg.type} = 0.1`")
        if arg.init not in INITIALIZERS:
            close = _close(arg.init, INITIALIZERS)
            raise self.error(f"unknown initializer '{arg.init}'", arg.span,
                             f"did you mean '{close}'?" if close
                             else f"use one of {', '.join(INITIALIZERS)} or a number")
        if arg.init == "glorot" and t.rank < 2:
            raise self.error(f"glorot needs a parameter with at least 2 axes, '{arg.name}' has {t.rank}",
                             arg.span, "use torch, zeros, ones, normal, uniform or a number")
        return arg.init

    def elaborate_body(self, func: ast.FuncDef, args: list[Value], env: Env) -> list[Value]:
        scope = _Scope(None, carries=False)
        for arg, value in zip(func.args, args):
            scope.names[arg.name] = value
        returned = self.block(func.body, scope, env, top=True)
        if returned is None:
            raise self.error(f"{func.kind} '{func.name}' does not return a value", func.name_span,
                             "end the body with `return EXPR`")
        values, ret = returned
        if len(values) != len(func.results):
            raise self.error(f"{func.kind} '{func.name}' declares {len(func.results)} result(s) but returns "
                             f"{len(values)}", ret.span, "make the return statement match the declared results")
        for value, result, expr in zip(values, func.results, ret.values):
            expected = self.eval_type(result.type, env, f"the result type of '{func.name}'")
            if expected != value.type:
                raise self.error(f"{func.kind} '{func.name}' returns {value.type} where it declares {expected}",
                                 expr.span, "change the declared result type or the returned expression")
        return values

    # ---- statements ----------------------------------------------------------------------

    def block(self, stmts, scope: _Scope, env: Env, top: bool):
        for i, stmt in enumerate(stmts):
            if isinstance(stmt, ast.Return):
                if not top:
                    raise self.error("return inside a for loop", stmt.span, "return after the loop")
                if i != len(stmts) - 1:
                    raise self.error("statements after return are never run", stmts[i + 1].span,
                                     "move the return to the end of the body")
                return [self.expr(e, scope, env) for e in stmt.values], stmt
            if isinstance(stmt, ast.Assign):
                self.assign(stmt, scope, env)
            elif isinstance(stmt, ast.For):
                self.for_loop(stmt, scope, env)
        return None

    def assign(self, stmt: ast.Assign, scope: _Scope, env: Env) -> None:
        if isinstance(stmt.value, ast.Call) and stmt.value.func in self.layers:
            values = self.call_layer(stmt.value, scope, env)
        else:
            values = [self.expr(stmt.value, scope, env)]
        if len(values) != len(stmt.targets):
            raise self.error(f"{len(stmt.targets)} name(s) assigned from {len(values)} value(s)", stmt.span,
                             "assign as many names as the right-hand side returns")
        for name, span, value in zip(stmt.targets, stmt.target_spans, values):
            self.define(name, value, span, scope, env)

    def define(self, name: str, value: object, span: Span, scope: _Scope, env: Env) -> None:
        if name in RESERVED:
            raise self.error(f"'{name}' is a reserved name", span, "src, dst, batch and graph are built in")
        if name in self.layers or name in env or name in self.edge_sets:
            what = "layer" if name in self.layers else "dimension" if name in env else "edge set"
            raise self.error(f"'{name}' shadows the {what} of the same name", span, "choose another name")
        owner = scope.owner(name)
        if owner is None or owner is scope:  # a new name, or a rebinding in this block (the IR is SSA already)
            scope.names[name] = value
            return
        if not scope.carries:
            raise self.error(f"duplicate definition of '{name}'", span, "use a new name")
        old = owner.names[name]
        if isinstance(old, Value) and isinstance(value, Value) and old.type != value.type:
            raise self.error(f"loop-carried '{name}' changes type from {old.type} to {value.type}", span,
                             "a value rebound in a loop must keep its type")
        owner.names[name] = value

    def for_loop(self, stmt: ast.For, scope: _Scope, env: Env) -> None:
        def bound(b) -> int:
            if isinstance(b, int):
                return b
            if b in env and env[b].is_static:
                return env[b].value
            raise self.error(f"loop bound '{b}' is not a known integer", stmt.span,
                             self.invisible_dim_hint(b, env) or f"declare it with `dim {b} = ...`")

        start, stop = bound(stmt.start), bound(stmt.stop)
        if stmt.var in RESERVED or scope.lookup(stmt.var) is not None:
            raise self.error(f"loop counter '{stmt.var}' shadows an existing name", stmt.span, "rename the counter")
        where = stmt.bounds_span or stmt.span
        if stop - start > MAX_STEPS:
            raise self.error(f"the loop `for {stmt.var} in {stmt.start}..{stmt.stop}` runs {stop - start} "
                             f"iterations; at most {MAX_STEPS} can be unrolled", where,
                             "loops are unrolled at compile time (each iteration copies the body): "
                             "use fewer iterations")
        with self.expanding_site("this loop", where), self.nested(stmt.span):
            for i in range(start, stop):
                self.step(where)
                body_scope = _Scope(scope, carries=True)
                body_scope.names[stmt.var] = LoopCounter(i)
                self.block(stmt.body, body_scope, env, top=False)

    # ---- expressions ---------------------------------------------------------------------

    def expr(self, e: ast.Expr, scope: _Scope, env: Env) -> Value:
        if isinstance(e, ast.Number):
            return self.const(e.value, e.span)
        if isinstance(e, ast.Name):
            return self.name(e, scope, env)
        if isinstance(e, ast.BinOp) and e.op in LEFT_ASSOCIATIVE:
            return self.chain(e, scope, env)
        if isinstance(e, ast.Call) and e.func in self.layers:
            values = self.call_layer(e, scope, env)  # one level deeper, in call_layer
            if len(values) != 1:
                raise self.error(f"layer '{e.func}' returns {len(values)} values; it cannot be used in an expression",
                                 e.span, f"assign them: a, b = {e.func}(...)")
            return values[0]
        if isinstance(e, (ast.Neg, ast.Not, ast.BinOp, ast.Index, ast.Call)):
            with self.nested(e.span):
                return self.nested_expr(e, scope, env)
        if isinstance(e, ast.String):
            raise self.error("a string is only allowed as the subscripts of einsum", e.span,
                             'einsum("hd,hde->he", a, b) (and a fill of carry: carry(edge_attr, looped, "mean"))')
        if isinstance(e, ast.Member):
            self.endpoint(e)
            raise self.error(f"'{e.set}.{e.attr}' is an index, not a value", e.span,
                             f"use it in brackets: h[{e.set}.{e.attr}] reads node values at each edge of {e.set}")
        if isinstance(e, ast.ShapeLiteral):
            raise self.error("a shape literal is only allowed as the shape argument of reshape", e.span,
                             "reshape(x, [H * C])")
        raise AssertionError(f"unhandled expression {type(e).__name__}")  # grammar and AST are closed

    def chain(self, e: ast.BinOp, scope: _Scope, env: Env) -> Value:
        """A chain of left-associative operators (a + b - c * d ...), walked without recursion on
        its left operands: a 1,000-term sum is one nesting level."""
        links = []
        node: ast.Expr = e
        while isinstance(node, ast.BinOp) and node.op in LEFT_ASSOCIATIVE:
            links.append(node)
            node = node.lhs
        acc = self.expr(node, scope, env)
        for link in reversed(links):
            with self.nested(link.rhs.span):
                rhs = self.expr(link.rhs, scope, env)
            acc = self.emit(link.op, [acc, rhs], {}, link.span, [link.lhs.span, link.rhs.span])
        return acc

    def nested_expr(self, e: ast.Expr, scope: _Scope, env: Env) -> Value:
        if isinstance(e, ast.Neg):
            if isinstance(e.operand, ast.Number):
                return self.const(-e.operand.value, e.span)
            x = self.expr(e.operand, scope, env)
            return self.emit("neg", [x], {}, e.span, [e.operand.span])
        if isinstance(e, ast.Not):
            x = self.expr(e.operand, scope, env)
            return self.emit("logical_not", [x], {}, e.span, [e.operand.span])
        if isinstance(e, ast.BinOp):  # ** (right-associative) and the comparisons (non-associative)
            lhs = self.expr(e.lhs, scope, env)
            rhs = self.expr(e.rhs, scope, env)
            return self.emit(e.op, [lhs, rhs], {}, e.span, [e.lhs.span, e.rhs.span])
        if isinstance(e, ast.Index):
            return self.index(e, scope, env)
        assert isinstance(e, ast.Call), e  # the expression kinds not handled above
        return self.call(e, scope, env)

    def name(self, e: ast.Name, scope: _Scope, env: Env) -> Value:
        bound = scope.lookup(e.id)
        if isinstance(bound, Value):
            return bound
        if isinstance(bound, LoopCounter):
            return self.const(bound.value, e.span)
        if e.id in BUILTIN_INDICES or e.id == "graph":
            raise self.error(f"'{e.id}' is an index, not a value", e.span,
                             f"use it in brackets, e.g. h[{e.id if e.id != 'graph' else 'src'}]" if e.id != "graph"
                             else "use it in a reduction: sum(h) by graph")
        if e.id in env:
            if env[e.id].is_static:
                return self.const(env[e.id].value, e.span)
            if self.generic_depth:
                return self.const(1.0, e.span)
            raise self.error(f"dimension '{e.id}' is only known at run time and cannot be used as a number",
                             e.span, f"declare it with `dim {e.id} = ...`")
        if e.id in self.layers:
            raise self.error(f"layer '{e.id}' used as a value", e.span, f"call it: {e.id}(...)")
        if e.id in CONSTANTS:
            return self.const(CONSTANTS[e.id], e.span)
        if e.id in self.edge_sets:
            raise self.error(f"'{e.id}' is an edge set, not a value", e.span,
                             f"gather onto it with h[{e.id}.src] or h[{e.id}.dst], and name it in types: "
                             f"edge<{e.id}>[...]")
        close = _close(e.id, scope.visible() | set(CONSTANTS))
        raise self.error(f"unknown name '{e.id}'", e.span, self.invisible_dim_hint(e.id, env) or (
            f"did you mean '{close}'?" if close else "define it before use, or declare it as an argument"))

    def index(self, e: ast.Index, scope: _Scope, env: Env) -> Value:
        idx = e.index
        if isinstance(idx, ast.Name) and idx.id in BUILTIN_INDICES and scope.lookup(idx.id) is None:
            base = self.expr(e.base, scope, env)
            return self.emit("gather", [base], {"index": idx.id}, e.span, [e.base.span])
        if isinstance(idx, ast.Member):
            edges, end = self.endpoint(idx)
            base = self.expr(e.base, scope, env)
            return self.emit("gather", [base], {"index": end, "edges": edges}, e.span, [e.base.span])
        static = None
        if isinstance(idx, ast.Number) and idx.is_int:
            static = self.int_literal(idx, "index")
        elif isinstance(idx, ast.Name) and isinstance(scope.lookup(idx.id), LoopCounter):
            static = scope.lookup(idx.id).value
        base = self.expr(e.base, scope, env)
        if static is not None:
            return self.emit("select", [base], {"index": static}, e.span, [e.base.span])
        index_value = self.expr(idx, scope, env)
        if index_value.type.dtype != INT_DTYPE:
            raise self.error(f"cannot index by a {index_value.type} value", idx.span,
                             "index with src, dst, batch, an int input (W[etype]) or a loop counter (W[t])")
        return self.emit("take", [base, index_value], {}, e.span, [e.base.span, idx.span])

    def endpoint(self, m: ast.Member) -> tuple[str, str]:
        """(edge set, end) of ``looped.src``: the set must be declared and the end src or dst."""
        edges = self.edge_set_name(m.set, m.set_span)
        if m.attr not in ("src", "dst"):
            raise self.error(f"an edge set's endpoints are src and dst, not '{m.attr}'", m.attr_span,
                             f"write {m.set}.src (the source of each edge) or {m.set}.dst (its destination)")
        return edges, m.attr

    def call_layer(self, e: ast.Call, scope: _Scope, env: Env) -> list[Value]:
        layer = self.layers[e.func]
        if e.by is not None:
            raise self.error(f"layer '{e.func}' does not take `by`", e.by_span or e.span,
                             "`by` belongs to reductions such as sum(...) by dst")
        if e.keywords:
            raise self.error(f"layer '{e.func}' takes positional arguments only", e.keywords[0].span,
                             "pass arguments in declaration order")
        if len(e.args) != len(layer.args):
            raise self.error(f"layer '{e.func}' takes {len(layer.args)} argument(s), got {len(e.args)}", e.span,
                             f"signature: {e.func}({', '.join(f'{a.name}: {a.type}' for a in layer.args)})")
        if e.func in self.call_stack:
            raise self.error(f"layer '{e.func}' calls itself", e.callee_span,
                             "layers cannot recurse; repeat with `for t in 0..T { ... }`")
        with self.nested(e.span):
            values = [self.expr(a, scope, env) for a in e.args]
            layer_env: Env = self.file_dims(e.func)
            pending: list[_Pending] = []
            for i, (arg, value, aexpr) in enumerate(zip(layer.args, values, e.args)):
                pending += self.bind_pattern(arg.type, value.type, layer_env, aexpr.span,
                                             f"argument {i + 1} ('{arg.name}') of layer '{e.func}'")
            self.bind_pending(pending, layer_env)
            self.step(e.span)
            if not self.generic_depth:
                self.record_layer_inits(layer, values)
            self.call_stack.append(e.func)
            try:
                with self.expanding_site(f"the call of layer '{e.func}'", e.span):
                    return self.elaborate_body(layer, values, layer_env)
            finally:
                self.call_stack.pop()

    # ---- builtin functions ---------------------------------------------------------------

    def call(self, e: ast.Call, scope: _Scope, env: Env) -> Value:
        handler = BUILTINS.get(e.func)
        if handler is None:
            close = _close(e.func, list(BUILTINS) + list(self.layers))
            raise self.error(f"unknown function '{e.func}'", e.callee_span,
                             f"did you mean '{close}'?" if close
                             else "define it as a layer, or see the list of builtins in the README")
        if e.by is not None and e.func not in TAKES_BY:
            raise self.error(f"'{e.func}' does not take `by`", e.by_span,
                             "`by dst|src|graph` belongs to sum, mean, max, min, std and softmax (and `by graph` "
                             "to global_attention)")
        if e.by is not None and e.by not in REDUCE_AXES:
            raise self.error(f"unknown reduction axis '{e.by}'", e.by_span,
                             "reduce by dst (over in-edges), by src (over out-edges) or by graph "
                             "(over a graph's nodes)")
        if e.by_set is not None:
            self.edge_set_name(e.by_set, e.by_set_span)
            if e.by == "graph":
                raise self.error("`by graph` reduces node values per graph and takes no edge set", e.by_set_span,
                                 "write `by graph`, or `by {e.by_set}.dst` to reduce edges of that set onto nodes")
        return handler(self, e, scope, env)

    def reduction_edges(self, e: ast.Call, x: Value) -> str:
        """The edge set a reduction ``by src`` / ``by dst`` runs over: the one its operand lives on, which
        an explicit ``by looped.dst`` must name."""
        if e.by == "graph" or x.type.domain is not Domain.EDGE:
            return ""
        if e.by_set is not None:
            named = self.edge_set_name(e.by_set, e.by_set_span)
            if named != x.type.rowset:
                raise self.error(f"{e.func}(...) by {e.by_set}.{e.by} reduces values of the edge set {e.by_set}, "
                                 f"but its operand lives on {x.type.space}", e.by_set_span,
                                 f"reduce it by {edge_set_label(x.type.rowset)}.{e.by} (or just by {e.by}: "
                                 "the set is the operand's), or gather the operand onto "
                                 f"{e.by_set}")
        return x.type.rowset

    def args_exactly(self, e: ast.Call, n: int, keywords: tuple[str, ...] = ()) -> None:
        for kw in e.keywords:
            if kw.name not in keywords:
                raise self.error(f"'{e.func}' has no keyword argument '{kw.name}'", kw.span,
                                 f"keywords of {e.func}: {', '.join(keywords) or 'none'}")
        if len(e.args) != n:
            raise self.error(f"'{e.func}' takes {n} argument(s), got {len(e.args)}", e.span,
                             f"call it as {SIGNATURES.get(e.func, e.func + '(...)')}")

    def edge_set_argument(self, e: ast.Call, position: int) -> str:
        """Argument ``position`` of ``e`` as an edge set name ("" for ``edge`` is not spellable: the
        default is to leave the argument out)."""
        arg = e.args[position]
        if not isinstance(arg, ast.Name):
            raise self.error(f"'{e.func}' takes an edge set here", arg.span,
                             f"name a declared edge set, e.g. {SIGNATURES.get(e.func, e.func + '(...)')}")
        return self.edge_set_name(arg.id, arg.span)

    def static_number(self, e: ast.Expr, what: str, integer: bool, scope: _Scope) -> float:
        node, sign = e, 1
        if isinstance(node, ast.Neg):
            node, sign = node.operand, -1
        if isinstance(node, ast.Number) and (node.is_int or not integer):
            return sign * (self.int_literal(node, what) if integer else node.value)
        if isinstance(node, ast.Name) and isinstance(scope.lookup(node.id), LoopCounter):
            return sign * scope.lookup(node.id).value
        raise self.error(f"{what} must be {'an integer' if integer else 'a number'} literal", e.span,
                         f"write the {what} as a constant, e.g. {'2' if integer else '0.2'}")

    def int_literal(self, node: ast.Number, what: str) -> int:
        """The exact value of an integer literal used as an integer (at most ``MAX_INT``)."""
        if node.int_value is None:
            span = node.span
            text = span.source.line(span.line)[span.col - 1:span.end_col - 1] if span.end_line == span.line else ""
            raise self.error(f"{what} {abbreviate(text)} is too large", node.span,
                             f"integers go up to 2**63 - 1 = {MAX_INT}")
        return node.int_value

    def constant(self, e: ast.Expr, scope: _Scope, env: Env, what: str) -> int | float:
        """The value of a compile-time number: a literal, ``pi``, a loop counter, a dim known at
        compile time, or + - * / ** of those (an int while only ints are added, subtracted,
        multiplied and raised to non-negative int powers). ``_SymbolicDim`` for a dim known only at run
        time in a layer checked with symbolic dims (each call checks it again with the real ones)."""
        links = []
        node: ast.Expr = e
        while isinstance(node, ast.BinOp) and node.op in _CONSTANT_CHAIN:  # left spines without recursion
            links.append(node)
            node = node.lhs
        value = self.constant_atom(node, scope, env, what)
        for link in reversed(links):
            value = self.constant_op(link, value, self.constant(link.rhs, scope, env, what), what)
        return value

    def constant_atom(self, e: ast.Expr, scope: _Scope, env: Env, what: str) -> int | float:
        if isinstance(e, ast.Number):
            return self.int_literal(e, what) if e.is_int else e.value
        if isinstance(e, ast.Neg):
            return -self.constant(e.operand, scope, env, what)
        if isinstance(e, ast.BinOp) and e.op == "pow":
            return self.constant_op(e, self.constant(e.lhs, scope, env, what), self.constant(e.rhs, scope, env, what),
                                    what)
        if isinstance(e, ast.Name):
            bound = scope.lookup(e.id)
            if isinstance(bound, LoopCounter):
                return bound.value
            if bound is None and isinstance(env.get(e.id), Dim):
                dim = env[e.id]
                if dim.is_static:
                    return dim.value
                if self.generic_depth:
                    raise _SymbolicDim
                raise self.error(f"dimension '{e.id}' is only known at run time, but {what} is needed at compile time",
                                 e.span, f"declare it with `dim {e.id} = ...`")
            if bound is None and e.id in CONSTANTS:
                return CONSTANTS[e.id]
            if bound is None:
                self.name(e, scope, env)  # an unknown name (or an index, a layer): its own error
        raise self.error(f"{what} must be a constant number", e.span,
                         "write a number, pi, a dim or a loop counter, or + - * / ** of them")

    def constant_op(self, e: ast.BinOp, a: int | float, b: int | float, what: str) -> int | float:
        value: int | float | complex
        if e.op == "div" and b == 0:
            raise self.error(f"{what}: division by zero", e.span, "the constant expression has no value")
        if e.op == "pow" and isinstance(a, int) and isinstance(b, int) and b >= 0:
            value = a ** b if b <= 64 or abs(a) <= 1 else MAX_INT + 1  # past 64 bits either way
        elif e.op == "pow":
            try:
                value = float(a) ** float(b)
            except (OverflowError, ZeroDivisionError):
                value = float("inf")
        else:
            value = {"add": a + b, "sub": a - b, "mul": a * b}[e.op] if e.op != "div" else a / b
        if isinstance(value, int):
            if abs(value) > MAX_INT:
                raise self.error(f"{what} is larger than 2**63 - 1", e.span, "integers go up to 2**63 - 1")
            return value
        if isinstance(value, complex) or not math.isfinite(value):
            raise self.error(f"{what} is not a finite real number", e.span,
                             "the constant expression overflows or has no real value")
        return value

    def static_option(self, e: ast.Call, position: int, keyword: str, default, integer: bool, scope: _Scope):
        for kw in e.keywords:
            if kw.name == keyword:
                return self.static_number(kw.value, keyword, integer, scope)
        if len(e.args) > position:
            return self.static_number(e.args[position], keyword, integer, scope)
        return default


def _unary(op: str):
    def handler(ch: Checker, e: ast.Call, scope, env) -> Value:
        ch.args_exactly(e, 1)
        x = ch.expr(e.args[0], scope, env)
        return ch.emit(op, [x], {}, e.span, [e.args[0].span])
    return handler


def _unary_with(op: str, attr: str, default: float):
    def handler(ch: Checker, e: ast.Call, scope, env) -> Value:
        ch.args_exactly(e, 2 if len(e.args) == 2 else 1, (attr,))
        value = ch.static_option(e, 1, attr, default, False, scope)
        x = ch.expr(e.args[0], scope, env)
        return ch.emit(op, [x], {attr: float(value)}, e.span, [e.args[0].span])
    return handler


def _binary(op: str):
    def handler(ch: Checker, e: ast.Call, scope, env) -> Value:
        ch.args_exactly(e, 2)
        a, b = [ch.expr(x, scope, env) for x in e.args]
        return ch.emit(op, [a, b], {}, e.span, [x.span for x in e.args])
    return handler


def _reduction(name: str):
    def handler(ch: Checker, e: ast.Call, scope, env) -> Value:
        if e.by is not None:
            ch.args_exactly(e, 1)
            x = ch.expr(e.args[0], scope, env)
            edges = ch.reduction_edges(e, x)
            if name == "softmax":
                return ch.emit("softmax", [x], {"by": e.by, "edges": edges}, e.span, [e.args[0].span])
            return ch.emit("aggregate", [x], {"reduce": name, "by": e.by, "edges": edges}, e.span, [e.args[0].span])
        if len(e.args) == 1 and not e.keywords:
            raise ch.error(f"'{name}' needs `by dst`, `by src`, `by graph` or a feature axis", e.span,
                           f"{name}(m) by dst reduces messages onto nodes; {name}(x, -1) reduces the last feature axis")
        if name == "std":
            raise ch.error("std reduces over a graph axis only", e.span, "std(m) by dst")
        ch.args_exactly(e, 2 if len(e.args) >= 2 else 1, ("axis",))
        axis = int(ch.static_option(e, 1, "axis", None, True, scope))
        x = ch.expr(e.args[0], scope, env)
        if name == "softmax":
            return ch.emit("axis_softmax", [x], {"axis": axis}, e.span, [e.args[0].span])
        return ch.emit("reduce", [x], {"reduce": name, "axis": axis}, e.span, [e.args[0].span])
    return handler


def _degree(direction: str):
    def handler(ch: Checker, e: ast.Call, scope, env) -> Value:
        ch.args_exactly(e, min(len(e.args), 1))
        edges = ch.edge_set_argument(e, 0) if e.args else ""
        return ch.emit("degree", [], {"dir": direction, "edges": edges}, e.span,
                       declared=TensorType(Domain.NODE, (), ch.float_dtype))
    return handler


def _carry(ch: Checker, e: ast.Call, scope, env) -> Value:
    """carry(x, looped, fill): edge values of x carried onto the derived set looped, the loops it adds
    filled with a number or with the mean / sum of the node's in-edge values ("mean", "sum")."""
    keyword = next((kw.value for kw in e.keywords if kw.name == "fill"), None)
    ch.args_exactly(e, 2 if keyword is not None else 3, ("fill",))
    fill_expr = keyword if keyword is not None else e.args[2]
    edges = ch.edge_set_argument(e, 1)
    target = ch.edge_sets[edge_set_relation(edges)] if edges else None
    if target is None or target.kind is None:
        raise ch.error(f"carry moves edge values onto a derived edge set, and {edge_set_label(edges)} is not one",
                       e.args[1].span, "declare one with `edges looped = self_loops(edge)` (or "
                       "remaining_self_loops) and carry onto it")
    if target.kind not in CARRIED_EDGE_SETS:
        raise ch.error(f"nothing carries onto {edges} = {target.kind}({target.base}, {target.count}): its edges are "
                       "pairs joined by paths, not edges of its base", e.args[1].span,
                       f"reduce the edge values to nodes (sum(x) by dst) and gather them onto {edges} "
                       f"(h[{edges}.src]), or carry onto a self-loop set")
    if isinstance(fill_expr, ast.String):
        if fill_expr.value not in CARRY_FILLS[1:]:
            raise ch.error(f"unknown fill {fill_expr.value!r}", fill_expr.span,
                           'fill the loops with a number, "mean" or "sum" (of the node\'s in-edge values)')
        fill, value = fill_expr.value, 0.0
    else:
        fill, value = "constant", float(ch.static_number(fill_expr, "fill", False, scope))
    x = ch.expr(e.args[0], scope, env)
    base = "" if target.base in (None, "edge") else target.base
    if x.type.domain is not Domain.EDGE or x.type.rowset != base:
        raise ch.error(f"carry onto {edges} takes values of the edge set it is derived from ({edge_set_label(base)}), "
                       f"got {x.type}", e.args[0].span,
                       f"{edges} = {target.kind}({target.base}): carry an edge<{target.base}> value"
                       if base else f"{edges} = {target.kind}(edge): carry an edge value such as edge_weight")
    return ch.emit("carry", [x], {"edges": edges, "fill": fill, "value": value}, e.span, [e.args[0].span])


def _concat(ch: Checker, e: ast.Call, scope, env) -> Value:
    for kw in e.keywords:
        if kw.name != "axis":
            raise ch.error(f"'concat' has no keyword argument '{kw.name}'", kw.span, "concat(a, b, ..., axis=-1)")
    if len(e.args) < 2:
        raise ch.error("'concat' takes at least 2 values", e.span, "concat(a, b, ..., axis=-1)")
    axis = int(ch.static_option(e, len(e.args), "axis", -1, True, scope))
    values = [ch.expr(a, scope, env) for a in e.args]
    return ch.emit("concat", values, {"axis": axis}, e.span, [a.span for a in e.args])


def _shape_literal(ch: Checker, expr: ast.Expr, env, what: str, like: str, usage: str) -> tuple[Dim, ...]:
    """The dims of a shape argument, which must be written as a literal (``[H, C]``)."""
    if not isinstance(expr, ast.ShapeLiteral):
        raise ch.error(f"the shape of {what} must be a literal like {like}", expr.span,
                       f"{usage} with dims and integers")
    return tuple(ch.eval_dim(d, env, what) for d in expr.dims)


def _reshape(ch: Checker, e: ast.Call, scope, env) -> Value:
    ch.args_exactly(e, 2)
    shape = _shape_literal(ch, e.args[1], env, "reshape", "[H * C]", "reshape(x, [H * C])")
    x = ch.expr(e.args[0], scope, env)
    return ch.emit("reshape", [x], {}, e.span, [e.args[0].span], declared=x.type.with_(shape=shape))


def _one_hot(ch: Checker, e: ast.Call, scope, env) -> Value:
    ch.args_exactly(e, 2)
    ids = ch.expr(e.args[0], scope, env)
    classes_expr = e.args[1]
    if isinstance(classes_expr, ast.Name) and classes_expr.id in env:
        dim = env[classes_expr.id]
        if not dim.is_static:
            if ch.generic_depth:  # checked again with the real value at each call
                declared = TensorType(ids.type.domain, (dim,), ch.float_dtype)
                return ch.add(make_value("one_hot", [ids], {"classes": 1}, declared, e.span))
            raise ch.error(f"the number of classes '{classes_expr.id}' is only known at run time", classes_expr.span,
                           f"declare it with `dim {classes_expr.id} = ...`")
        classes = dim.value
    else:
        classes = int(ch.static_number(classes_expr, "number of classes", True, scope))
    declared = TensorType(ids.type.domain, (Dim(classes),), ch.float_dtype)
    return ch.emit("one_hot", [ids], {"classes": classes}, e.span, [e.args[0].span], declared=declared)


def _einsum(ch: Checker, e: ast.Call, scope, env) -> Value:
    if e.keywords:
        raise ch.error("'einsum' takes no keyword arguments", e.keywords[0].span, SIGNATURES["einsum"])
    if len(e.args) < 2 or not isinstance(e.args[0], ast.String):
        raise ch.error("einsum takes the subscripts as a string, then the operands", e.span, SIGNATURES["einsum"])
    values = [ch.expr(a, scope, env) for a in e.args[1:]]
    return ch.emit("einsum", values, {"spec": e.args[0].value.replace(" ", "")}, e.span,
                   [a.span for a in e.args[1:]])


def _global_attention(ch: Checker, e: ast.Call, scope, env) -> Value:
    """``global_attention(q, k, v, scale=1/sqrt(K)) by graph``: the attention part (a slice) of the IR
    op, which packs the attention and its log-sum-exp."""
    if e.by != "graph":
        raise ch.error("global_attention attends over the nodes of each graph: it needs `by graph`",
                       e.by_span or e.span, SIGNATURES["global_attention"])
    ch.args_exactly(e, 3, ("scale",))
    written = ch.static_option(e, 3, "scale", None, False, scope)
    values = [ch.expr(a, scope, env) for a in e.args]
    spans = [a.span for a in e.args]
    # A layer checked alone has symbolic sizes: the kernels' static sizes are checked at each call.
    standing_in = bool(ch.generic_depth) and any(d.symbols for x in values for d in x.type.shape)
    with ch.located("global_attention", e.span, spans):
        _, keys, width = global_attention_sizes([x.type for x in values], "global_attention", static=not standing_in)
    if written is not None:
        scale = float(written)
    else:  # 1/sqrt(K); a stand-in 1 for a symbolic or zero K (no score then depends on it)
        scale = 1.0 / math.sqrt(keys.value) if keys.is_static and keys.value else 1.0
    if standing_in:  # the layer's IR is thrown away: a value of the attention's type stands in
        result = TensorType(Domain.NODE, values[2].type.shape, values[2].type.dtype)
        return ch.add(make_value("global_attention", values, {"scale": scale}, result, e.span))
    packed = ch.emit("global_attention", values, {"scale": scale}, e.span, spans)
    return ch.emit("slice", [packed], {"axis": 1, "start": 0, "stop": width.value}, e.span)


def _batch_norm(ch: Checker, e: ast.Call, scope, env) -> Value:
    count = len(e.args)
    ch.args_exactly(e, count if 5 <= count <= 7 else 5, ("eps", "momentum"))
    eps = ch.static_option(e, 5, "eps", 1e-5, False, scope)
    momentum = ch.static_option(e, 6, "momentum", 0.1, False, scope)
    values = [ch.expr(a, scope, env) for a in e.args[:5]]
    for i, what in ((1, "running_mean"), (2, "running_var")):
        if running_statistic(values[i]) is None:
            raise ch.error(f"the {what} of batch_norm must be a parameter (or a parameter indexed by a loop "
                           "counter): training updates it in place", e.args[i].span,
                           "pass a param argument of the model, e.g. batch_norm(x, mean1, var1, gamma1, beta1)")
    return ch.emit("batch_norm", values, {"eps": float(eps), "momentum": float(momentum), "mode": "auto"},
                   e.span, [a.span for a in e.args[:5]])


def _where(ch: Checker, e: ast.Call, scope, env) -> Value:
    ch.args_exactly(e, 3)
    values = [ch.expr(a, scope, env) for a in e.args]
    return ch.emit("where", values, {}, e.span, [a.span for a in e.args])


def _clamp(ch: Checker, e: ast.Call, scope, env) -> Value:
    """clamp(x, lo, hi), or one bound by keyword (torch's names): clamp(x, min=lo), clamp(x, max=hi)."""
    bounds: dict[str, ast.Expr] = dict(zip(("min", "max"), e.args[1:]))
    for kw in e.keywords:
        if kw.name not in ("min", "max"):
            raise ch.error(f"'clamp' has no keyword argument '{kw.name}'", kw.span, SIGNATURES["clamp"])
        if kw.name in bounds:
            raise ch.error(f"clamp's {kw.name} is given twice", kw.span, SIGNATURES["clamp"])
        bounds[kw.name] = kw.value
    if not 1 <= len(e.args) <= 3 or not bounds:
        raise ch.error(f"'clamp' takes x and one or two bounds, got {len(e.args) + len(e.keywords)} argument(s)",
                       e.span, SIGNATURES["clamp"])
    limits = {"min": -math.inf, "max": math.inf}
    for name, expr in bounds.items():
        try:
            limits[name] = float(ch.constant(expr, scope, env, f"the {name} of clamp"))
        except _SymbolicDim:  # a layer's dim: checked at each call
            limits = {"min": -math.inf, "max": math.inf}
            break
    x = ch.expr(e.args[0], scope, env)
    return ch.emit("clamp", [x], {"lo": limits["min"], "hi": limits["max"]}, e.span, [e.args[0].span])


def _param_sequence(ch: Checker, op: str, attrs: dict, count: Dim, e: ast.Call) -> Value:
    return ch.emit(op, [], attrs, e.span, declared=TensorType(Domain.PARAM, (count,), ch.float_dtype))


def _run_time_dim(e: ast.Expr, scope, env) -> tuple[str, Dim] | None:
    """(name, dim) when ``e`` names a dim only known at run time (else None)."""
    if isinstance(e, ast.Name) and scope.lookup(e.id) is None and isinstance(env.get(e.id), Dim) \
            and not env[e.id].is_static:
        return e.id, env[e.id]
    return None


def _number_text(x: int | float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _arange(ch: Checker, e: ast.Call, scope, env) -> Value:
    """arange(stop), arange(start, stop) or arange(start, stop, step), as torch.arange: start,
    start + step, ... up to stop excluded, as the program's float dtype."""
    ch.args_exactly(e, len(e.args) if 1 <= len(e.args) <= 3 else 3)
    stop_expr = e.args[0] if len(e.args) == 1 else e.args[1]
    names = ("the stop of arange",) if len(e.args) == 1 else ("the start of arange", "the stop of arange",
                                                             "the step of arange")
    stand_in = make_value("arange", [], {"start": 0.0, "step": 1.0}, TensorType(Domain.PARAM, (Dim(1),),
                                                                                ch.float_dtype), e.span)
    named = _run_time_dim(stop_expr, scope, env)
    if named is not None:  # arange(D) (or arange(0, D, 1)): D elements, whatever D is
        name, dim = named
        try:
            plain = [ch.constant(a, scope, env, what) for a, what in zip(e.args, names)
                     if a is not stop_expr] in ([], [0], [0, 1])
        except _SymbolicDim:
            plain = False
        if plain:
            return _param_sequence(ch, "arange", {"start": 0.0, "step": 1.0}, dim, e)
        if ch.generic_depth:  # a layer's dim, static at some calls: each call checks it
            return ch.add(stand_in)
        raise ch.error(f"the length of this arange depends on '{name}', which is only known at run time", e.span,
                       f"arange({name}) has {name} elements 0, 1, ...: scale and shift it "
                       f"(arange({name}) * step + start), or declare `dim {name} = ...`")
    try:
        values = [ch.constant(a, scope, env, what) for a, what in zip(e.args, names)]
    except _SymbolicDim:  # a layer checked with symbolic dims: a stand-in, checked again at each call
        return ch.add(stand_in)
    start, stop, step = ([0] + values + [1])[-3:] if len(values) == 1 else (values + [1])[:3]
    shown = f"arange({', '.join(_number_text(v) for v in values)})"
    if step == 0:
        raise ch.error(f"{shown}: the step is 0", e.args[2].span, "the step of arange is a nonzero number")
    if isinstance(start, int) and isinstance(stop, int) and isinstance(step, int):
        count = -((start - stop) // step)  # ceil((stop - start) / step), exactly
    else:
        ratio = (stop - start) / step
        count = round(ratio)
        if abs(ratio - count) > 1e-9 * max(1.0, abs(ratio)):
            raise ch.error(f"{shown} has a non-integer number of steps: (stop - start) / step = {ratio:.6g}", e.span,
                           "a fractional arange's length would depend on rounding: make (stop - start) / step a "
                           "whole number, or use linspace(start, stop, count)")
    if count < 1:
        raise ch.error(f"{shown} is empty: stop is not beyond start in the direction of the step", e.span,
                       "arange(start, stop, step) counts from start towards stop, which it excludes")
    return _param_sequence(ch, "arange", {"start": float(start), "step": float(step)}, Dim(count), e)


def _linspace(ch: Checker, e: ast.Call, scope, env) -> Value:
    """linspace(start, stop, count), as torch.linspace: count values from start to stop, both included."""
    ch.args_exactly(e, 3)
    count_expr = e.args[2]
    named = _run_time_dim(count_expr, scope, env)
    dim = named[1] if named is not None else None
    try:
        start, stop = (float(ch.constant(a, scope, env, what))
                       for a, what in zip(e.args, ("the start of linspace", "the stop of linspace")))
    except _SymbolicDim:  # a layer checked with symbolic dims: checked again at each call
        start, stop = 0.0, 1.0
    if dim is None:
        try:
            count = ch.constant(count_expr, scope, env, "the count of linspace")
        except _SymbolicDim:
            count = 1
        if not isinstance(count, int):
            raise ch.error(f"the count of linspace must be a whole number, got {_number_text(count)}",
                           count_expr.span, "linspace(start, stop, count) has count elements")
        if count < 1:
            raise ch.error(f"linspace(..., {count}) has no elements", count_expr.span,
                           "linspace(start, stop, count) needs count >= 1 (1 gives [start])")
        dim = Dim(count)
    return _param_sequence(ch, "linspace", {"start": start, "stop": stop}, dim, e)


def _full(ch: Checker, e: ast.Call, scope, env) -> Value:
    """full([dims], value): a constant param value of that shape (a scalar constant broadcast)."""
    ch.args_exactly(e, 2)
    shape = _shape_literal(ch, e.args[0], env, "full", "[H, C]", "full([H, C], 0.5)")
    try:
        value = float(ch.constant(e.args[1], scope, env, "the value of full"))
    except _SymbolicDim:  # a layer checked with symbolic dims: checked again at each call
        value = 1.0
    scalar = ch.const(value, e.args[1].span)
    return ch.emit("broadcast", [scalar], {}, e.span, declared=TensorType(Domain.PARAM, shape, ch.float_dtype))


BUILTINS: dict[str, Callable] = {name: _unary(name) for name in UNARY_OPS if name != "neg"}
BUILTINS.update({
    "leaky_relu": _unary_with("leaky_relu", "slope", 0.01),
    "elu": _unary_with("elu", "alpha", 1.0),
    "dropout": _unary_with("dropout", "p", 0.5),
    "maximum": _binary("maximum"),
    "minimum": _binary("minimum"),
    "atan2": _binary("atan2"),
    "where": _where,
    "clamp": _clamp,
    "arange": _arange,
    "linspace": _linspace,
    "full": _full,
    "in_degree": _degree("in"),
    "out_degree": _degree("out"),
    "concat": _concat,
    "reshape": _reshape,
    "one_hot": _one_hot,
    "einsum": _einsum,
    "carry": _carry,
    "softmax": _reduction("softmax"),
    "batch_norm": _batch_norm,
    "global_attention": _global_attention,
})
BUILTINS.update({name: _reduction(name) for name in AGGREGATIONS})
REDUCING = set(AGGREGATIONS) | {"softmax"}
assert set(AXIS_REDUCTIONS) <= REDUCING
TAKES_BY = REDUCING | {"global_attention"}

SIGNATURES = {
    "leaky_relu": "leaky_relu(x, slope=0.01)", "elu": "elu(x, alpha=1.0)", "dropout": "dropout(x, p=0.5)",
    "maximum": "maximum(a, b)", "minimum": "minimum(a, b)", "atan2": "atan2(y, x)",
    "where": "where(cond, a, b)", "clamp": "clamp(x, lo, hi) or clamp(x, min=lo) or clamp(x, max=hi)",
    "arange": "arange(stop), arange(start, stop) or arange(start, stop, step)",
    "linspace": "linspace(start, stop, count)", "full": "full([H, C], value)",
    "in_degree": "in_degree() or in_degree(looped)", "out_degree": "out_degree() or out_degree(looped)",
    "carry": 'carry(x, looped, fill): fill 1.0, "mean" or "sum"',
    "concat": "concat(a, b, ..., axis=-1)", "reshape": "reshape(x, [H * C])",
    "one_hot": "one_hot(etype, R)", "einsum": 'einsum("hd,hde->he", a, b)',
    "batch_norm": "batch_norm(x, running_mean, running_var, gamma, beta, eps=1e-5, momentum=0.1)",
    "global_attention": "global_attention(q, k, v, scale=1/sqrt(K)) by graph",
    **{n: f"{n}(m) by dst or {n}(x, axis)" for n in AXIS_REDUCTIONS},
    "std": "std(m) by dst", "softmax": "softmax(score) by dst or softmax(x, axis)",
    **{n: f"{n}(x)" for n in UNARY_OPS},
}


def check(module: ast.Module, model: str | None = None, float_dtype: str = "f32",
          dims: dict[str, int] | None = None, imported: list[ast.Module] | None = None,
          prelude: ast.Module | None = None, imports: Mapping[int, Sequence[ast.Module]] | None = None) -> Program:
    """Type-check ``module`` and lower its model (the only one, or ``model``) to verified IR.
    ``imported`` modules and the ``prelude`` contribute dims and layers; ``imports`` (by ``id`` of a
    module, the modules it imports: ``syntax.Imports.direct``) says which files' dims each file's
    layers see."""
    return Checker(module, float_dtype, dims, imported, prelude, imports).check(model)
