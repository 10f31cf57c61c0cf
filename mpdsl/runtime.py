"""Stage 4: a compiled model. Binds run-time dims from inputs, validates inputs and weights,
owns the parameter store and runs the program on a backend."""

from __future__ import annotations

import functools
import time
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple, Protocol, cast

import numpy as np

from mpdsl import memory
from mpdsl.backends import check_input_ids, edge_graph, relabelling_arrays
from mpdsl.context import CompileContext
from mpdsl.diagnostics import CompileError, GraphError, InputError, WeightsError
from mpdsl.graph import Graph, first_true, position_text, resolve_edge_sets
from mpdsl.initialisation import ParamInit, check_default
from mpdsl.initialisation import plan as initialisation_plan
from mpdsl.ir import Program, Value, print_program, value_names
from mpdsl.npz import read_npz, write_npz
from mpdsl.ops import OPS, choose
from mpdsl.passes import PassContext
from mpdsl.plan import GraphLayout, runs_a_kernel, space_rows
from mpdsl.types import (
    INT_DTYPE,
    ITEMSIZE,
    Dim,
    DimSolveError,
    Domain,
    Space,
    TensorType,
    TypeRuleError,
    edge_set_ends,
    edge_set_relation,
    solve_dim,
)

# Host arrays of each IR dtype (bfloat16, which NumPy lacks, is held in float32 on the host).
NUMPY_DTYPES = {"f32": np.float32, "f64": np.float64, "f16": np.float16, "bf16": np.float32, "i64": np.int64}


def _to_numpy(array: Any) -> np.ndarray:
    if hasattr(array, "detach"):  # a torch tensor
        array = array.detach().cpu().numpy()
    return np.asarray(array)


INIT_CHUNK = 1 << 16  # elements drawn at a time when the target dtype is narrower than float64


def check_seed(seed: Any) -> int:
    """``seed`` as an int after checking it is a non-negative integer (what NumPy's seeding takes)."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}", "pass e.g. seed=0")
    return int(seed)


def initializer_number(init: str) -> float | None:
    """The value of a numeric initializer (``= 0.5`` is stored as "0.5"); None for a named one."""
    try:
        return float(init)
    except ValueError:
        return None


def _glorot(rng: np.random.Generator, fan_in: int, fan_out: int):
    bound = np.sqrt(6.0 / max(fan_in + fan_out, 1))
    return functools.partial(rng.uniform, -bound, bound)


def _normal(rng: np.random.Generator, fan_in: int, fan_out: int):
    return functools.partial(rng.normal, 0.0, 1.0 / np.sqrt(max(fan_in, 1)))


def _uniform(rng: np.random.Generator, fan_in: int, fan_out: int):
    bound = 1.0 / np.sqrt(max(fan_in, 1))
    return functools.partial(rng.uniform, -bound, bound)


def _torch(rng: np.random.Generator, fan_in: int, fan_out: int):
    """torch.nn.Linear's weight and bias: kaiming_uniform_(a=sqrt(5)), i.e. U(+-1 / sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(max(fan_in, 1))
    return functools.partial(rng.uniform, -bound, bound)


# The named initializers (``mpdsl.ops.INITIALIZERS`` is what the language accepts): random draws,
# (rng, fan_in, fan_out) -> draw(size), and constant fills.
_DRAWS = {"torch": _torch, "glorot": _glorot, "normal": _normal, "uniform": _uniform}
_FILLS = {"zeros": 0.0, "ones": 1.0}


def initial_value(init: str, shape: tuple[int, ...], rng: np.random.Generator, dtype,
                  fans: tuple[int, int] | None = None) -> np.ndarray:
    """Initial parameter values. torch: U(+-1 / sqrt(fan_in)) (torch.nn.Linear's weight and bias);
    glorot: U(+-sqrt(6 / (fan_in + fan_out))); normal: N(0, 1 / fan_in); uniform: U(+-1 / sqrt(fan_in));
    zeros, ones, or a number (every element). ``fans`` is (fan_in, fan_out), as
    ``mpdsl.initialisation.plan`` decides them from the program; without it, fan_in = shape[0] and
    fan_out = prod(shape[1:]).

    The array is allocated in ``dtype`` and filled from float64 draws of at most ``INIT_CHUNK``
    elements at a time, so a float32 model's parameters never exist in float64 as a whole; the
    values are those of one float64 draw cast to ``dtype`` (the same stream, drawn in pieces)."""
    dtype = np.dtype(dtype)
    if fans is None:
        fans = (shape[0] if shape else 1, int(np.prod(shape[1:])) if len(shape) > 1 else 1)
    fan_in, fan_out = fans
    number = initializer_number(init)
    if number is not None:
        return np.full(shape, np.float64(number).astype(dtype), dtype)
    if init in _FILLS:
        return np.full(shape, _FILLS[init], dtype)
    draw = choose(_DRAWS, "param", "init", init, "the parameter initialisers (mpdsl.runtime)")(rng, fan_in, fan_out)
    if dtype == np.float64:
        return cast(np.ndarray, draw(shape))  # a shaped draw is an array
    value = np.empty(shape, dtype)
    flat = value.reshape(-1)
    for start in range(0, flat.size, INIT_CHUNK):
        stop = min(start + INIT_CHUNK, flat.size)
        flat[start:stop] = draw(stop - start)
    return value


class CompiledModel:
    """A model compiled from .mp source: call it on a graph to run it.

    ``params`` maps each declared parameter name to its array; parameters whose shapes depend
    on dims bound from the data (e.g. ``W: param[F, H]`` with ``x: node[F]``) are created at the
    first call, or by ``init(seed, graph=...)``. ``context`` (a ``mpdsl.context.CompileContext``)
    compiles and caches the program run for each configuration and picks the graph layout; the torch
    module (``to_torch``) and the command line use the same one.
    """

    def __init__(self, program: Program, backend, *, source_name: str = "<string>", seed: int = 0,
                 ast=None, compile_seconds: float = 0.0, optimize: bool = True,
                 passes: list[str] | None = None, layout: str = "auto", memory_limit: memory.Limit = None,
                 target: str | None = None, init: str = "torch"):
        self.ir = program
        self.param_inits: dict[str, ParamInit] = {}  # each parameter's initialiser, role and fans
        self.default_init = init
        self.memory_limit = memory.check_limit(memory_limit)
        # How the model is compiled (target: "cpu" / "gpu", default the backend's) and its programs.
        self.context = CompileContext(program, backend, target=target, optimize=optimize, passes=passes,
                                      layout=layout)
        self._row_bytes: dict[int, tuple[Program, dict]] = {}  # program id -> (program, _bytes_per_row's answers)
        self.ast = ast
        self.source_name = source_name
        self.seed = check_seed(seed)
        self.compile_seconds = compile_seconds
        self.float_dtype = np.dtype(NUMPY_DTYPES[program.float_dtype])
        self.static_dims: dict[str, int] = {k: v for k, v in program.dims if v is not None}
        self.dims: dict[str, int] = dict(self.static_dims)  # plus dims bound by the current parameters
        self.training = False
        self.params: dict[str, np.ndarray] = {}
        self.last_run_seconds = 0.0
        self.last_layout: GraphLayout | None = None  # the graph layout of the last run (node order, edge order), if any
        self._checked_dims: set[tuple] = set()  # run-time dims the program's type rules were checked with
        self._dim_sources: dict[str, str] = {}  # dims bound by the current parameters -> what bound them
        self._dim_origins: dict[str, str] = {}  # the same, told in full for messages (file, axis, size)
        if all(self._static(t) for t in self.param_types.values()):
            self.init(seed)

    # ---- interface -----------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.ir.name

    @property
    def backend(self):
        """The backend instance that runs the programs (``context.backend``; it may be replaced by
        one of the same target)."""
        return self.context.backend

    @backend.setter
    def backend(self, backend) -> None:
        self.context.backend = backend

    @property
    def target(self) -> str:
        """The device kind the programs are optimized for: "cpu" or "gpu"."""
        return self.context.target

    @property
    def optimize(self) -> bool:
        return self.context.optimize

    @property
    def passes(self) -> list[str] | None:
        return self.context.passes

    @property
    def layout(self) -> str:
        """The graph layout mode ("auto", "reorder", "none"; see ``mpdsl.plan``)."""
        return self.context.layout

    @layout.setter
    def layout(self, mode: str) -> None:
        self.context.layout = mode

    @functools.cached_property
    def param_types(self) -> dict[str, TensorType]:
        return {v.attr["name"]: v.type for v in self.ir.params}

    @functools.cached_property
    def input_types(self) -> dict[str, TensorType]:
        return {v.attr["name"]: v.type for v in self.ir.inputs}

    @property
    def output_names(self) -> list[str]:
        return [name for name, _ in self.ir.outputs]

    def _static(self, t: TensorType) -> bool:
        return all(d.substitute(self.dims).is_static for d in t.shape)

    def param_shapes(self, dims: Mapping[str, int] | None = None) -> dict[str, tuple[int, ...]]:
        env = {**self.static_dims, **(dims or {})}
        shapes = {}
        for name, t in self.param_types.items():
            resolved = [d.substitute(env) for d in t.shape]
            unbound = sorted({s for d in resolved for s in d.symbols})
            if unbound:
                raise InputError(f"the shape of parameter '{name}' depends on {', '.join(unbound)}, which "
                                 "is bound from the model's inputs",
                                 "pass a graph (init(seed, graph=g)) or the dims (init(seed, F=16))")
            shapes[name] = tuple(d.value for d in resolved)
        return shapes

    @property
    def default_init(self) -> str:
        """The model-wide initialiser of the parameters with none written in the file ("torch", the
        default, or "glorot"; see ``mpdsl.initialisation``). Setting it affects the next ``init``."""
        return self._default_init

    @default_init.setter
    def default_init(self, init: str) -> None:
        self._default_init = check_default(init)
        self.param_inits = initialisation_plan(self.ir, self._default_init)

    def init(self, seed: int = 0, graph: Graph | None = None, **dims: int) -> CompiledModel:
        """(Re)initialise every parameter from its initialiser (written in the file, else the one
        ``default_init`` gives its role; ``param_inits``); deterministic in ``seed`` and the
        parameter's name. Dims bound from the data are bound from ``graph``'s arrays (not
        from the current parameters) or given as keywords. The parameters' total size is checked
        against the memory budget (``memory_limit``) before anything is allocated."""
        sources = {k: f"init({k}={v})" for k, v in dims.items()}
        origins = {k: f"init(..., {k}={v})" for k, v in dims.items()}
        if graph is not None:
            _, bound, graph_sources, graph_origins = self._bind(graph, {}, dict(self.static_dims), {}, {},
                                                                check_sets=False)
            dims, sources = {**bound, **dims}, {**graph_sources, **sources}
            origins = {**{k: f"{v}, given to init" for k, v in graph_origins.items()}, **origins}
        return self._initialise(seed, dims, sources, origins)

    def _initialise(self, seed: int, dims: Mapping[str, int], sources: Mapping[str, str],
                    origins: Mapping[str, str] | None = None) -> CompiledModel:
        seed = check_seed(seed)
        shapes = self.param_shapes(dims)
        self._check_param_memory(shapes)
        plans = self.param_inits
        params = {}
        for name, shape in shapes.items():
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            params[name] = initial_value(plans[name].init, shape, rng, self.float_dtype, plans[name].fans(shapes))
        self.params = params
        self.dims = {**self.static_dims, **dims}
        self._dim_sources = {k: v for k, v in sources.items() if k not in self.static_dims}
        self._dim_origins = {k: v for k, v in (origins or {}).items() if k not in self.static_dims}
        return self

    def _check_param_memory(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        sizes = {name: memory.array_bytes(shape, self.float_dtype.itemsize) for name, shape in shapes.items()}
        total = sum(sizes.values())
        allowed = memory.budget(self.memory_limit)
        if allowed.allows(total):
            return
        name = max(sizes, key=sizes.__getitem__)
        declared = next(v for v in self.ir.params if v.attr["name"] == name)
        others = f" ({memory.format_bytes(total)} for all {len(sizes)})" if len(sizes) > 1 else ""
        shape = memory.shape_text(shapes[name])
        declared_text = "" if _shape_text(declared.type) == shape else f"{_type_text(declared.type)} = "
        raise CompileError(f"parameter '{name}' {declared_text}{shape} {self.float_dtype} needs "
                           f"{memory.format_bytes(sizes[name])}{others}, over {allowed.describe()}; nothing was "
                           "allocated", declared.span,
                           f"make its dims smaller (`dim NAME = ...`, --dim NAME=INT), or {memory.RAISE}")

    def load_weights(self, weights: str | Path | Mapping[str, Any]) -> CompiledModel:
        """Load parameters from an .npz file or a mapping name -> array (all of them, exactly).
        Dims bound from the data are bound from the weights' shapes (``param[2 * F, H]`` too); a dim
        the weights leave open (``param[2 * D + FE, H]`` alone) keeps its value with the current
        parameters (bound from a graph by ``init(seed, graph=g)`` or the first run)."""
        given_file = isinstance(weights, (str, Path))
        place = f"the weights file {weights}" if given_file else "the weights given to load_weights"
        if isinstance(weights, (str, Path)):
            weights = read_npz(weights, WeightsError, "weights file", self.memory_limit)
        declared = self.param_types
        missing = sorted(set(declared) - set(weights))
        extra = sorted(set(weights) - set(declared))
        if missing or extra:
            parts = ([f"missing {', '.join(missing)}"] if missing else []) + \
                    ([f"unknown {', '.join(extra)}"] if extra else [])
            raise WeightsError(f"weights do not match the parameters of '{self.name}': {'; '.join(parts)}",
                               f"expected exactly: {', '.join(declared)}")
        arrays = {k: _to_numpy(v) for k, v in weights.items()}
        for name in declared:
            arr = arrays[name]
            if arr.dtype.kind not in "fiu":
                raise WeightsError(f"weight '{name}' has dtype {arr.dtype}", "weights are real numbers")
            if not np.all(np.isfinite(arr)):
                pos = first_true(~np.isfinite(arr))
                raise WeightsError(f"weight '{name}' holds non-finite values: {name}{position_text(pos)} is "
                                   f"{float(arr[pos])}", "check the file")
        dims = dict(self.static_dims)
        sources: dict[str, str] = {}
        origins: dict[str, str] = {}
        earlier = {k: v for k, v in self.dims.items() if k not in self.static_dims}
        self._bind_shapes([_Array("weight", n, place, t, arrays[n].shape) for n, t in declared.items()], dims,
                          WeightsError, sources, origins, earlier)
        params = {k: _cast_checked(f"weight {k}", arrays[k], self.float_dtype, WeightsError) for k in declared}
        self.dims = dims
        self.params = params
        self._dim_sources = sources
        self._dim_origins = origins
        return self

    def save_weights(self, path: str | Path) -> None:
        """Write the parameters to an .npz at exactly ``path`` (no suffix is added)."""
        if not self.params:
            raise WeightsError("the model has no parameters yet", "call init(seed, graph=...) or run it once")
        write_npz(path, self.params, WeightsError, "weights")

    # ---- running -------------------------------------------------------------------------

    def _bind_shape(self, what: str, t: TensorType, shape: tuple[int, ...], dims: dict[str, int], error) -> None:
        """Check ``shape`` against ``t``, binding the dims it determines into ``dims``. ``what`` is
        e.g. "parameter 'W'" (the kind of array, then its name quoted)."""
        kind, _, quoted = what.partition(" ")
        self._bind_shapes([_Array(kind, quoted.strip("'"), "the current parameters", t, shape)], dims, error,
                          origins=dict(self._dim_origins))

    def _bind_shapes(self, items: list[_Array], dims: dict[str, int], error, sources: dict[str, str] | None = None,
                     origins: dict[str, str] | None = None, earlier: Mapping[str, int] | None = None) -> None:
        """Check each array's shape against its declared type and bind the dims the shapes
        determine, into ``dims`` (and ``sources``: dim -> what bound it; ``origins``: the same told
        in full, for messages). Plain dims (``F``) are bound first; then, in any order, a dim with one
        unknown symbol (``2*D + FE`` with FE known, ``H*C`` with H known) is solved for it
        (``types.solve_dim``: a positive integer, else an error); a dim that no shape determines
        takes its value from ``earlier`` (the dims of the current parameters) if it is there, else
        is an error."""
        origins = {} if origins is None else origins
        pending = []
        for item in items:
            if len(item.shape) != item.type.rank:
                raise error(f"{item.what} has shape {list(item.shape)} but is declared {_shape_text(item.type)}",
                            f"it needs {item.type.rank} axes")
            pending += [(item, axis, int(size)) for axis, size in enumerate(item.shape)]

        def settle(entry, plain_only: bool) -> str:
            """"checked", "bound" or "open" (not determined yet)."""
            item, axis, size = entry
            t, what = item.type, item.what
            dim = t.shape[axis]
            resolved = dim.substitute(dims)
            if resolved.is_static:
                if resolved.value != size:
                    raise error(*self._mismatch(item, axis, size, resolved.value, dims, origins))
                return "checked"
            unknown = resolved.symbols
            if len(unknown) != 1 or (plain_only and resolved.name is None):
                return "open"
            if resolved.name is not None:
                value = size
            else:
                try:
                    value = solve_dim(resolved, unknown[0], Dim(size)).value
                except DimSolveError as err:
                    raise error(*self._unsolvable(item, axis, size, unknown[0], err.reason, dims, origins)) from None
            dims[unknown[0]] = value
            if sources is not None:
                sources[unknown[0]] = what
            origins[unknown[0]] = f"{item.place} ({item.name}.shape[{axis + item.row_axis}] = {size})"
            return "bound"

        while pending:
            for plain_only in (True, False):
                states = [settle(entry, plain_only) for entry in pending]
                progress = "bound" in states
                pending = [e for e, state in zip(pending, states) if state == "open"]
                if progress or not pending:
                    break
            else:
                # Every symbol left open keeps its earlier value at once (then the shapes check it),
                # whatever the order of the arrays.
                stuck = {s for item, axis, _ in pending for s in item.type.shape[axis].substitute(dims).symbols}
                kept = sorted(stuck & set(earlier or {}))
                for sym in kept:
                    dims[sym] = (earlier or {})[sym]
                    if sources is not None:
                        sources[sym] = self._dim_sources.get(sym, "the data bound before")
                    origins[sym] = self._dim_origins.get(sym, "the data bound before")
                if kept:
                    continue
                item, axis, size = pending[0]
                dim = item.type.shape[axis]
                unknown = dim.substitute(dims).symbols
                text, declaration = self._written(item, axis)
                raise error(f"{item.what}: cannot bind {' and '.join(unknown)} from {item.name}.shape"
                            f"[{axis + item.row_axis}] = {size} (declared{declaration}): {text} has "
                            f"{len(unknown)} unknowns and no other array binds them",
                            "; ".join([f"bind {unknown[0]} from an array that has it alone as a dim: run the model "
                                       f"on a graph first, or init(seed, graph=g); or fix it: `dim {unknown[0]} = "
                                       f"value`, --dim {unknown[0]}=INT"]
                                      + self._declaration_notes(item, [], dims, origins)))

    # ---- messages about sizes that do not fit their declaration --------------------------------

    def _declared_arg(self, name: str):
        """The model's argument ``name`` as written (an ``ast.Arg``), if the source is known."""
        model = next((m for m in getattr(self.ast, "models", ()) if m.name == self.name), None)
        return next((a for a in model.args if a.name == name), None) if model is not None else None

    def _declaration_location(self, name: str) -> str | None:
        arg = self._declared_arg(name)
        if arg is not None and arg.span is not None:
            return arg.span.location
        value = next((v for v in self.ir.values if v.op in ("input", "param") and v.attr["name"] == name), None)
        return value.span.location if value is not None and value.span is not None else None

    def _static_origin(self, dim: str) -> str | None:
        """Where a dim known at compile time comes from: a `dim` of the program or an override."""
        if dim not in self.static_dims:
            return None
        value = self.static_dims[dim]
        defined = next((d for d in getattr(self.ast, "dims", ()) if d.name == dim), None)
        if defined is not None and defined.value == value:
            return f"`dim {dim} = {value}` at {defined.span.location}"
        if defined is not None:
            return f"the override {dim}={value} (--dim or dims=; {defined.span.location} says {defined.value})"
        return f"--dim {dim}={value} / dims={{'{dim}': {value}}}, or a `dim` of an imported file"

    def _declaration_notes(self, item: _Array, symbols: list[str], dims: Mapping[str, int],
                           origins: Mapping[str, str]) -> list[str]:
        """Where each of ``symbols`` got its value, and where ``item`` is declared."""
        notes = []
        for sym in symbols:
            value = dims.get(sym)
            origin = self._static_origin(sym) or origins.get(sym) or "the data bound first"
            notes.append(f"{sym}{f' = {value}' if value is not None else ''} comes from {origin}")
        location = self._declaration_location(item.name)
        if location is not None:
            notes.append(f"{item.name} is declared at {location}")
        return notes

    def _mismatch(self, item: _Array, axis: int, size: int, expected: int, dims: Mapping[str, int],
                  origins: Mapping[str, str]) -> tuple[str, str]:
        """Message and hint for axis ``axis`` of ``item`` (``size``) where its declaration needs
        ``expected``: the axis as the user numbers it (an input's row axis is axis 0), the dim as
        written, where each of its names got its value and where the array is declared."""
        symbols = self._written_symbols(item, axis)
        text, declaration = self._written(item, axis)
        shown = self._written(item, axis, dims)[0]
        need = f"{expected}" if not symbols else f"{text} = {expected}" if shown in (text, str(expected)) \
            else f"{text} = {shown} = {expected}"
        message = (f"{item.what} has {item.name}.shape[{axis + item.row_axis}] = {size} but its "
                   f"declaration{declaration} needs {need}")
        notes = self._declaration_notes(item, symbols, dims, origins)
        return message, "; ".join(notes) or "make the data and the declaration agree"

    def _unsolvable(self, item: _Array, axis: int, size: int, symbol: str, reason: str, dims: Mapping[str, int],
                    origins: Mapping[str, str]) -> tuple[str, str]:
        """Message and hint for axis ``axis`` of ``item`` whose size gives its one unknown
        ``symbol`` no positive integer value (``reason``, from ``types.solve_dim``)."""
        text, declaration = self._written(item, axis)
        known = [s for s in self._written_symbols(item, axis) if s != symbol and s in dims]
        given = f" with {', '.join(f'{s} = {dims[s]}' for s in known)}" if known else ""
        message = (f"{item.what} has {item.name}.shape[{axis + item.row_axis}] = {size}, which its "
                   f"declaration{declaration} cannot fit: {text} = {size}{given} gives {symbol} {reason}")
        notes = self._declaration_notes(item, known, dims, origins)
        return message, "; ".join(["make the data and the declaration agree"] + notes)

    def _written(self, item: _Array, axis: int, values: Mapping[str, int] | None = None) -> tuple[str, str]:
        """(the dim of ``item``'s axis as written, `` NAME: TYPE`` as declared); with ``values``, the
        names that have one shown as numbers (``2*16 + 4``)."""
        arg = self._declared_arg(item.name)
        written = arg.type.dims[axis] if arg is not None and axis < len(arg.type.dims) else None
        values = values or {}
        if written is not None:
            text = written.render(lambda name: str(values[name]) if name in values else name)
        else:
            text = item.type.shape[axis].render(values)
        declaration = f" {item.name}: {arg.type}" if arg is not None else f" {_shape_text(item.type)}"
        return text, declaration

    def _written_symbols(self, item: _Array, axis: int) -> list[str]:
        """The names the dim of ``item``'s axis is written with, each once."""
        arg = self._declared_arg(item.name)
        if arg is not None and axis < len(arg.type.dims):
            return list(arg.type.dims[axis].names())
        return list(item.type.shape[axis].symbols)

    def bind(self, graph: Graph, inputs: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        """Find, check and convert every model input; returns the arrays and the bound dims (with
        those of the current parameters). The program's static shape rules (``x[7]`` on a feature
        axis F) are checked with the dims bound here. ``inputs`` may give the index of an input edge
        set as ``<name>_index`` (as ``run``)."""
        graph, inputs = self.with_edge_set_inputs(graph, inputs)
        return self._bind(graph, inputs, dict(self.dims), self._dim_sources, self._dim_origins)[:2]

    def with_edge_set_inputs(self, graph: Graph, inputs: Mapping[str, Any]) -> tuple[Graph, dict[str, Any]]:
        """(the graph with the edge set indices given among ``inputs`` as ``<name>_index`` for the
        model's input edge sets, the other inputs): a given index replaces the graph's. A model with node
        types also takes the parts of a typed graph by their .npz names (``paper__num_nodes``,
        ``author__writes__paper_index``, ``paper__x``)."""
        names = {f"{edge_set_relation(s.name)}_index": s.name for s in self.ir.edge_sets if s.kind == "input"}
        typed = bool(self.ir.node_types)
        given = {k: v for k, v in inputs.items()
                 if k in names or (typed and k not in self.input_types and typed_graph_part(k))}
        if not given:
            return graph, dict(inputs)
        try:
            graph = graph.with_data(**{k: _to_numpy(v) for k, v in given.items()})
        except GraphError as err:
            raise InputError(err.message, err.hint) from None
        return graph, {k: v for k, v in inputs.items() if k not in given}

    def _bind(self, graph: Graph, inputs: Mapping[str, Any], dims: dict[str, int], known_sources: Mapping[str, str],
              known_origins: Mapping[str, str], check_sets: bool = True
              ) -> tuple[dict[str, np.ndarray], dict[str, int], dict[str, str], dict[str, str]]:
        """``bind`` from the given ``dims`` (bound by what ``known_sources`` says, told in full by
        ``known_origins``); also returns what bound each run-time dim, briefly and in full. With
        ``check_sets``, the graph must carry every input edge set of the program (not to bind dims:
        ``init``)."""
        unknown = sorted(set(inputs) - set(self.input_types))
        if unknown:
            raise InputError(f"'{self.name}' has no input named {', '.join(unknown)}",
                             f"its inputs are: {', '.join(self.input_types) or 'none'}")
        arrays: dict[str, np.ndarray] = {}
        shapes: list[_Array] = []
        if check_sets:
            check_edge_sets(self.ir, graph)
        for name, t in self.input_types.items():
            given = name in inputs
            typed_array = (graph.type_array(t.rowset, name) if t.domain is Domain.NODE and t.rowset
                           and t.rowset in graph.node_types else None)
            if given:
                arr = _to_numpy(inputs[name])
            elif typed_array is not None:
                arr = typed_array
            elif t.domain is Domain.NODE and t.rowset:
                have = ", ".join(graph.node_type_data.get(t.rowset, {})) or "none"
                attr = name.removesuffix("_" + t.rowset)
                raise InputError(f"model input '{name}' ({t}) is not given",
                                 f"pass {name}=... or give the node type {t.rowset} an array '{attr}' "
                                 f"(HeteroData['{t.rowset}'].{attr}; its arrays: {have})")
            elif name in graph:
                arr = graph[name]
            else:
                raise InputError(f"model input '{name}' ({t}) is not given",
                                 f"pass {name}=... or add an array '{name}' to the graph")
            check_input_rows(name, t, arr.shape, space_rows_of(graph, self.ir, t))
            if t.dtype == INT_DTYPE:
                if arr.dtype.kind not in "iu":
                    raise InputError(f"input '{name}' has dtype {arr.dtype} but is declared int",
                                     f"pass integer ids ({name}.astype(np.int64))")
                if arr.size and arr.min() < 0:
                    raise negative_ids(name, arr)
                arr = arr.astype(np.int64, copy=False)
            else:
                if arr.dtype.kind not in "fiub":
                    raise InputError(f"input '{name}' has dtype {arr.dtype}", "features are real numbers")
                if given and arr.dtype.kind == "f" and not np.isfinite(arr).all():  # a graph's are checked when built
                    raise non_finite(name, arr)
                arr = _cast_checked(f"input {name}", arr, self.float_dtype, InputError)
            place = f"the input {name} given to the model" if given else f"the graph's array '{name}'"
            shapes.append(_Array("input", name, place, t, arr.shape[1:]))
            arrays[name] = arr
        sources = {k: known_sources.get(k, "the parameters") for k in dims if k not in self.static_dims}
        origins = {k: known_origins.get(k, "the current parameters") for k in dims if k not in self.static_dims}
        self._bind_shapes(shapes, dims, InputError, sources, origins)
        self._check_bound_dims(dims, sources)
        return arrays, dims, sources, origins

    def _check_bound_dims(self, dims: Mapping[str, int], sources: Mapping[str, str]) -> None:
        """Run the type rules again on the values whose types hold dims bound at run time, with
        those dims: what the checker verified for static dims (a static index within its axis, ...)
        is verified for these. Errors point at the program text."""
        run_time = {k for k, v in self.ir.dims if v is None} | (set(dims) - set(self.static_dims))
        key = tuple(sorted((k, dims[k]) for k in run_time if k in dims))
        if key in self._checked_dims:
            return
        env = {k: dims[k] for k in run_time if k in dims}
        for v in self.ir.values:
            rule = OPS[v.op]
            operand_types = [o.type.substitute(env) for o in v.operands]
            read = [o.type for o in v.operands] + ([v.type] if rule.declared else [])  # linspace(0, 1, D): D >= 1
            involved = sorted({s for t in read for d in t.shape for s in d.symbols} & set(env))
            if not involved:
                continue
            try:
                rule.infer(operand_types, v.attr, v.type.substitute(env) if rule.declared else None)
            except TypeRuleError as err:
                bound = ", ".join(f"{k} = {env[k]} from {sources.get(k, 'the data')}" for k in involved)
                raise CompileError(f"{err.message} (with {bound})", v.span,
                                   err.hint or "make the data and the program agree") from None
        self._checked_dims.add(key)

    def __call__(self, graph: Graph | str | Path | Any, **inputs: Any) -> np.ndarray | dict[str, np.ndarray]:
        """Run on ``graph`` (a Graph, an .npz path or a PyG Data); inputs not given as keywords are
        read from the graph's arrays by name. One output: an array; several: a dict by name."""
        outputs = self.run(graph, **inputs)
        return outputs["out"] if list(outputs) == ["out"] else outputs

    def run(self, graph: Graph | str | Path | Any, **inputs: Any) -> dict[str, np.ndarray]:
        """Run on ``graph``; ``inputs`` by name override the graph's arrays, and ``<name>_index`` the
        index of the model's input edge set ``name``."""
        graph, inputs = self.with_edge_set_inputs(as_graph(graph, self.memory_limit), inputs)
        arrays, dims, sources, origins = self._bind(graph, inputs, dict(self.dims), self._dim_sources,
                                                    self._dim_origins)
        missing_params = set(self.param_types) - set(self.params)
        if missing_params:
            self._initialise(self.seed, {k: v for k, v in dims.items() if k not in self.static_dims}, sources,
                             {k: v if v.startswith("init(") else f"{v}, when the parameters were initialised"
                              for k, v in origins.items()})
        else:
            self._check_param_dims(dims)
        start = time.perf_counter()
        program = self.program_for(dims)
        self.check_run_memory(program, graph, dims)
        layout = self.context.choose_layout(graph, program, meanwhile=self.backend.warm_up)
        self.last_layout = layout
        with relabelling_arrays(self.backend, layout) as allocate:
            if layout is not None:
                check_input_ids(program, arrays, dims)  # before the layout: messages name the caller's positions
                graph, arrays = layout.apply(graph, arrays, self.input_types, frozenset(set(arrays) - set(inputs)),
                                             allocate)
            outputs = self.backend.run(program, graph, arrays, self.params, dims, training=self.training)
            if self.training:  # batch_norm's running statistics, updated by the run
                for name, value in getattr(self.backend, "last_state_updates", {}).items():
                    self.params[name] = np.asarray(value, dtype=self.float_dtype)
            if layout is not None:
                outputs = layout.restore(outputs, {name: v.type for name, v in program.outputs}, allocate)
        self.last_run_seconds = time.perf_counter() - start
        return outputs

    def planned_bytes(self, program: Program, graph: Graph | GraphSizes,
                      dims: Mapping[str, int]) -> list[tuple[Value, int]]:
        """(value, bytes) for each value a run of ``program`` on ``graph`` materialises in full: the
        plan's bytes materialised (``--emit plan``), less the values the backend computes one
        block of rows at a time (row groups). The NumPy backend keeps them all until the run ends."""
        rows = space_rows(program, graph)
        per_row, _ = self._bytes_per_row(program, dims, self._blocked(rows))
        return [(v, rows[space] * nbytes) for v, space, nbytes in per_row]

    def planned_total(self, program: Program, graph: Graph | GraphSizes, dims: Mapping[str, int]) -> int:
        """The sum of ``planned_bytes`` (from per-space sums: a run's check does not list the values)."""
        rows = space_rows(program, graph)
        _, per_space = self._bytes_per_row(program, dims, self._blocked(rows))
        return sum(rows[space] * nbytes for space, nbytes in per_space.items())

    def _blocked(self, rows: Mapping[Space, int]) -> frozenset[Space]:
        """The spaces whose row groups the backend runs block by block (rows reaching ``fuse_min_rows``)."""
        min_rows = getattr(self.backend, "fuse_min_rows", None)
        return frozenset(s for s, n in rows.items() if min_rows is not None and n >= min_rows)

    def _bytes_per_row(self, program: Program, dims: Mapping[str, int], blocked: frozenset[Space]
                       ) -> tuple[list[tuple[Value, Space, int]], dict[Space, int]]:
        """(value, space, bytes per row) of each value ``planned_bytes`` counts, and their sum per
        space, for the row groups that run block by block (``blocked``): the same for every graph of
        the same blocking, so kept per (program, dims, blocking) while the program lives (batches of
        changing sizes share it)."""
        key = (tuple(sorted(dims.items())), blocked)
        cached = self._row_bytes.get(id(program))
        if cached is None or cached[0] is not program:
            cached = self._row_bytes[id(program)] = (program, {})
        known = cached[1].get(key)
        if known is not None:
            return known
        blockwise: set[int] = set()
        schedule = getattr(self.backend, "schedule", None)
        if schedule is not None and getattr(self.backend, "fuse_min_rows", None) is not None:
            for step in schedule(program):
                members, exports = getattr(step, "members", None), getattr(step, "exports", ())
                if members is not None and step.space in blocked:
                    blockwise |= {id(v) for v in members} - {id(v) for v in exports}
        per_row = []
        per_space: dict[Space, int] = {}
        for v in program.values:
            if not runs_a_kernel(v) or id(v) in blockwise:
                continue
            shape = tuple(d.substitute(dims).value for d in v.type.shape)
            nbytes = memory.array_bytes(shape, ITEMSIZE[v.type.dtype])
            per_row.append((v, v.type.space, nbytes))
            per_space[v.type.space] = per_space.get(v.type.space, 0) + nbytes
        known = cached[1][key] = (per_row, per_space)
        return known

    def check_run_memory(self, program: Program, graph: Graph | GraphSizes, dims: Mapping[str, int]) -> None:
        """Refuse a run whose planned peak (``planned_bytes`` plus the graph's CSR index arrays)
        exceeds the memory budget, naming its largest value, before anything is allocated."""
        if isinstance(graph, Graph) and any(s.kind != "input" for s in program.edge_sets):
            resolve_edge_sets(graph, program.edge_sets, self.memory_limit)  # derived sets: refused before built
        total = self.planned_total(program, graph, dims) + graph_index_bytes(graph) + edge_set_bytes(program, graph)
        allowed = memory.budget(self.memory_limit, needed=total)
        if allowed.limit is None:
            return
        # Arrays the backend keeps from earlier runs are reused, but count as used in the available memory.
        reusable = getattr(getattr(self.backend, "pool", None), "held_bytes", 0) \
            if allowed.source in memory.DEFAULT_SOURCES else 0
        if allowed.allows(total - reusable):
            return
        planned = self.planned_bytes(program, graph, dims)
        sizes = f"{graph.num_nodes} nodes, {graph.num_edges} edges"
        message = (f"running '{self.name}' on this graph ({sizes}) needs about {memory.format_bytes(total)}, "
                   f"over {allowed.describe()}")
        if planned:
            value, nbytes = max(planned, key=lambda item: item[1])
            message += (f"; the largest value is {_describe_value(value, program, dims, graph)}: "
                        f"{memory.format_bytes(nbytes)}")
        raise InputError(message + "; nothing was run",
                         f"use a smaller graph or smaller dims, or {memory.RAISE}; `mpdsl compile --emit plan "
                         "--graph g.npz` lists what each value materialises")

    def program_for(self, dims: Mapping[str, int]) -> Program:
        """The program run for these dims: the optimized IR specialised to the dims, or the
        reference IR specialised (``optimize=False``); cached by ``context``. Its batch norms are
        as written: each run's training flag picks their form."""
        return self.context.program(dims, mode=None)

    def optimized_for(self, dims: Mapping[str, int]) -> tuple[Program, PassContext]:
        """The optimized IR specialised to these dims, with its pass context (cached by ``context``)."""
        return self.context.optimized(dims, mode=None)

    @property
    def optimized_ir(self) -> Program:
        """The optimized IR with the dims known at compile time (others stay symbolic)."""
        return self.optimized_for(self.static_dims)[0]

    def _check_param_dims(self, dims: dict[str, int]) -> None:
        for name, t in self.param_types.items():
            self._bind_shape(f"parameter '{name}'", t, self.params[name].shape, dict(dims), InputError)

    def to_torch(self, graph: Graph | None = None, **dims: int):
        """A trainable ``torch.nn.Module`` running this model: parameters are ``nn.Parameter``s named
        as in the .mp file, gradients come from the compiler's gradient program (needs torch)."""
        from mpdsl.torch_module import to_torch
        return to_torch(self, graph, **dims)

    def train(self, mode: bool = True) -> CompiledModel:
        """Training mode (``mode=False``: eval mode, the default of a new model): dropout draws its
        masks, and ``batch_norm`` normalises with the statistics of the batch and updates its running
        statistics (parameters of the model) at every run."""
        self.training = mode
        return self

    def eval(self) -> CompiledModel:
        """Inference mode: dropout is the identity, ``batch_norm`` uses its running statistics."""
        return self.train(False)

    def __repr__(self) -> str:
        return (f"CompiledModel({self.name!r}, backend={self.backend.name!r}, "
                f"params={ {k: list(v.shape) for k, v in self.params.items()} })")

    def ir_text(self, locations: bool = False) -> str:
        return print_program(self.ir, locations)


class GraphSizes(Protocol):
    """What the run memory check reads of a graph: its row counts (a Graph, or the sizes of a graph
    given as tensors)."""

    @property
    def num_nodes(self) -> Any: ...
    @property
    def num_edges(self) -> Any: ...
    @property
    def num_graphs(self) -> Any: ...
    def num_rows(self, domain: Domain) -> int: ...


def typed_graph_part(name: str) -> bool:
    """Whether ``name`` names a part of a typed graph in the .npz layout (``T__num_nodes``, ``T__<attr>``,
    ``SRC__S__DST_index``), which ``run`` takes as a keyword as it takes ``S_index``."""
    return "__" in name.strip("_")


def space_rows_of(graph: Graph, program: Program, t: TensorType) -> int:
    """The rows the graph gives values of type ``t`` (a node type's nodes, an edge set's edges)."""
    if t.domain is Domain.NODE and t.rowset:
        check_node_type(graph, t.rowset)
        return graph.num_type_nodes(t.rowset)
    return graph.num_rows(t.domain) if not t.rowset else edge_graph(graph, program, t.rowset).num_edges


def check_node_type(graph: Graph, node_type: str) -> None:
    if node_type not in graph.node_types:
        have = ", ".join(graph.node_types) or "none"
        raise InputError(f"the model reads nodes of type {node_type}, which the graph lacks (its node types: {have})",
                         f"give the graph the node type {node_type} (Graph(..., node_types={{'{node_type}': count}}), "
                         f"or HeteroData['{node_type}'])")


def check_edge_sets(program: Program, graph: Graph) -> None:
    """Refuse a graph that lacks an input edge set of ``program``, naming the set and where it is
    declared."""
    for s in program.edge_sets:
        name = edge_set_relation(s.name)
        src, dst = edge_set_ends(s.name)
        where = f" (declared at {s.span.location})" if s.span is not None else ""
        if s.kind == "input" and name not in graph.edge_sets:
            have = ", ".join(graph.edge_sets) or "none besides edge_index"
            if src:
                raise InputError(f"the model reads the edge set '{name}' from {src} to {dst}{where}, which the graph "
                                 f"does not carry (its edge sets: {have})",
                                 f"give the graph the relation ({src}, {name}, {dst}) (HeteroData['{src}', '{name}', "
                                 f"'{dst}'].edge_index; a relation whose name is not unique is named "
                                 f"{src}__{name}__{dst})")
            raise InputError(f"the model reads the edge set '{name}'{where}, which the graph does not carry "
                             f"(its edge sets: {have})",
                             f"give the graph {name}_index [2, K] (an array of that name in the .npz or PyG Data, "
                             f"or Graph(..., edge_sets={{'{name}': index}}))")
        if s.kind != "input":
            continue
        given = graph.edge_set_types.get(name, ("", ""))
        if given != (src, dst):
            def ends(pair: tuple[str, str]) -> str:
                return f"from {pair[0]} to {pair[1]}" if pair[0] else "over the graph's own nodes"
            raise InputError(f"the model reads the edge set '{name}' {ends((src, dst))}{where}, but the graph's "
                             f"runs {ends(given)}", "declare the edge set as the graph has it, or give the graph the "
                             "set the model declares")


def graph_index_bytes(graph: Graph | GraphSizes) -> int:
    """Bytes of a graph's CSR index arrays by destination and by source (indptr and perm each)."""
    return 2 * 8 * (graph.num_nodes + 1 + graph.num_edges)


def edge_set_bytes(program: Program, graph: Graph | GraphSizes) -> int:
    """Bytes of the structures of ``program``'s edge sets besides the graph's edges: each set's CSR
    indices (as ``graph_index_bytes``), and a derived set's own edge index and carry table (int64 per
    edge: the index's two rows and five per-edge tables; a k-hop set has no carry table)."""
    if not program.edge_sets:
        return 0
    rows = space_rows(program, graph)
    total = 0
    for s in program.edge_sets:
        edges = rows[Space(Domain.EDGE, s.name)]
        own = 0 if s.kind == "input" else 2 * 8 * edges if s.kind == "k_hop" else 7 * 8 * edges
        total += 2 * 8 * (graph.num_nodes + 1 + edges) + own
    return total


def check_graph_index_memory(graph: Graph, memory_limit: memory.Limit = None) -> None:
    """Refuse to lay out a graph whose CSR index arrays alone exceed the memory budget."""
    allowed = memory.budget(memory_limit)
    needed = graph_index_bytes(graph)
    if not allowed.allows(needed):
        raise InputError(f"the graph's CSR indices ({graph.num_nodes} nodes, {graph.num_edges} edges) need "
                         f"{memory.format_bytes(needed)}, over {allowed.describe()}",
                         f"check num_nodes in the graph file, or {memory.RAISE}")


def as_graph(graph: Any, memory_limit: memory.Limit = None) -> Graph:
    """``graph`` as a Graph: a Graph, an .npz path (read within the memory budget) or a PyG Data."""
    if isinstance(graph, Graph):
        return graph
    if isinstance(graph, (str, Path)):
        return Graph.load(graph, memory_limit=memory_limit)
    if hasattr(graph, "edge_index") or (hasattr(graph, "node_types") and hasattr(graph, "edge_types")):
        return Graph.from_pyg(graph)
    raise GraphError(f"cannot use a {type(graph).__name__} as a graph",
                     "pass an mpdsl.Graph, an .npz path or a torch_geometric Data")



# ---- helpers -------------------------------------------------------------------------------


def check_input_rows(name: str, t: TensorType, shape: tuple, rows: int) -> None:
    """Refuse an input whose leading axis is not one row per node / edge / graph of its domain (per
    edge of its edge set)."""
    if len(shape) == 0 or shape[0] != rows:
        got = "a scalar" if len(shape) == 0 else f"{shape[0]} rows"
        where = f" of the edge set {t.rowset}" if t.rowset else ""
        raise InputError(f"input '{name}' has {got} but the graph has {rows} {t.domain}s{where}",
                         f"{name} is declared {t}: one row per {t.domain}{where}")


def negative_ids(name: str, ids: np.ndarray) -> InputError:
    """The error for int ids holding a negative value (the first one named)."""
    pos = first_true(ids < 0)
    return InputError(f"{name}{position_text(pos)} = {int(ids[pos])} is negative", "ids start at 0")


def non_finite(name: str, values: np.ndarray) -> InputError:
    """The error for features holding NaN or infinity (the first one named)."""
    pos = first_true(~np.isfinite(values))
    return InputError(f"input {name}{position_text(pos)} is {float(values[pos])}",
                      "features must be finite (no NaN or infinity)")


class _Array(NamedTuple):
    """An array checked against its declaration: ``kind`` ("input", "weight", "parameter"), its
    name, where it comes from (``place``: the weights file, the graph, ...), declared type, shape
    (an input's without its row axis)."""

    kind: str
    name: str
    place: str
    type: TensorType
    shape: tuple[int, ...]

    @property
    def what(self) -> str:
        return f"{self.kind} '{self.name}'"

    @property
    def row_axis(self) -> int:
        """1 where the shape leaves out the row axis (an input's axis 0 as users number it)."""
        return 1 if self.kind == "input" else 0


def _shape_text(t: TensorType) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


def _type_text(t: TensorType) -> str:
    return f"{t.domain}{_shape_text(t)}"


def _cast_checked(what: str, arr: np.ndarray, dtype: np.dtype, error) -> np.ndarray:
    """``arr`` (whose values are known to be finite) in ``dtype``; a value that the narrower dtype
    cannot hold (it would become infinite) is an error naming its first position."""
    with np.errstate(over="ignore"):
        cast = arr.astype(dtype, copy=False)
    if arr.dtype.kind == "f" and cast is not arr and arr.dtype.itemsize > dtype.itemsize:
        overflow = np.isinf(cast)
        if overflow.any():
            pos = first_true(overflow)
            raise error(f"{what}{position_text(pos)} = {float(arr[pos])!r} is beyond the range of {dtype} "
                        f"(largest {np.finfo(dtype).max:.4g}): it would become infinite",
                        "scale the values, or run in float64 (--dtype float64, dtype='float64')")
    return cast


def _describe_value(v: Value, program: Program, dims: Mapping[str, int], graph: Graph | GraphSizes) -> str:
    """A value for messages: its source text and location (else its IR name), type and shape."""
    rows = space_rows(program, graph)[v.type.space] if v.type.domain is not Domain.PARAM else None
    shape = [d.substitute(dims).value for d in v.type.shape]
    sized = f"{v.type.space}{shape} {v.type.dtype}" + (f" on {rows} {v.type.domain}s" if rows is not None else "")
    span = v.span
    if span is not None:
        line = span.source.line(span.line)
        end = span.end_col - 1 if span.end_line == span.line else len(line)
        text = line[span.col - 1:end].strip()
        if text:
            return f"`{text}` ({span.location}), {sized}"
    return f"{value_names(program)[v]} = {v.op}(...), {sized}"
