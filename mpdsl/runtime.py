"""Stage 4: a compiled model. Binds run-time dims from inputs, validates inputs and weights,
owns the parameter store and runs the program on a backend."""

from __future__ import annotations

import functools
import time
import zlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from mpdsl.diagnostics import GraphError, InputError, WeightsError
from mpdsl.graph import Graph
from mpdsl.ir import Program, print_program
from mpdsl.passes import PassContext, optimize
from mpdsl.passes.rewrite import specialize
from mpdsl.plan import choose_layout
from mpdsl.types import Domain, INT_DTYPE, TensorType

NUMPY_DTYPES = {"f32": np.float32, "f64": np.float64, "f16": np.float16, "i64": np.int64}


def _to_numpy(array: Any) -> np.ndarray:
    if hasattr(array, "detach"):  # a torch tensor
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def initial_value(init: str, shape: tuple[int, ...], rng: np.random.Generator, dtype,
                  stacked: bool = False) -> np.ndarray:
    """Initial parameter values. glorot: U(+-sqrt(6 / (fan_in + fan_out))) with fan_in = shape[0],
    fan_out = prod(shape[1:]); normal: N(0, 1 / fan_in); uniform: U(+-1 / sqrt(fan_in));
    zeros, ones, or a number (every element). A ``stacked`` parameter (indexed per layer or per
    type, W[t] / W[etype]) takes its fans from one slice, shape[1:]."""
    fan_shape = shape[1:] if stacked and len(shape) > 1 else shape
    fan_in = fan_shape[0] if fan_shape else 1
    fan_out = int(np.prod(fan_shape[1:])) if len(fan_shape) > 1 else 1
    if init == "glorot":
        bound = np.sqrt(6.0 / max(fan_in + fan_out, 1))
        value = rng.uniform(-bound, bound, shape)
    elif init == "normal":
        value = rng.normal(0.0, 1.0 / np.sqrt(max(fan_in, 1)), shape)
    elif init == "uniform":
        bound = 1.0 / np.sqrt(max(fan_in, 1))
        value = rng.uniform(-bound, bound, shape)
    elif init == "zeros":
        value = np.zeros(shape)
    elif init == "ones":
        value = np.ones(shape)
    else:
        value = np.full(shape, float(init))
    return value.astype(dtype)


class CompiledModel:
    """A model compiled from .mp source: call it on a graph to run it.

    ``params`` maps each declared parameter name to its array; parameters whose shapes depend
    on dims bound from the data (e.g. ``W: param[F, H]`` with ``x: node[F]``) are created at the
    first call, or by ``init(seed, graph=...)``.
    """

    def __init__(self, program: Program, backend, *, source_name: str = "<string>", seed: int = 0,
                 ast=None, compile_seconds: float = 0.0, optimize: bool = True,
                 passes: list[str] | None = None, layout: str = "auto"):
        self.ir = program
        self.optimize = optimize
        self.passes = passes
        self.layout = layout
        self._specialized: dict[tuple, tuple[Program, PassContext]] = {}
        self.ast = ast
        self.backend = backend
        self.source_name = source_name
        self.seed = seed
        self.compile_seconds = compile_seconds
        self.float_dtype = np.dtype(NUMPY_DTYPES[program.float_dtype])
        self.static_dims: dict[str, int] = {k: v for k, v in program.dims if v is not None}
        self.dims: dict[str, int] = dict(self.static_dims)  # plus dims bound by the current parameters
        self.dim_origins: dict[str, str] = {}  # where each dim bound from data got its value (for messages)
        self.training = False
        self.params: dict[str, np.ndarray] = {}
        self.last_run_seconds = 0.0
        self.last_layout = None  # the graph layout of the last run (node order, edge order), if any
        if all(self._static(t) for t in self.param_types.values()):
            self.init(seed)

    # ---- interface -----------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.ir.name

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

    def init(self, seed: int = 0, graph: Graph | None = None, **dims: int) -> "CompiledModel":
        """(Re)initialise every parameter from its declared initializer; deterministic in ``seed``
        and the parameter's name."""
        for key in dims:
            self.dim_origins[key] = f"init(..., {key}={dims[key]})"
        if graph is not None:
            dims = {**self.bind(graph, {})[1], **dims}
        stacked = {o.attr["name"] for v in self.ir.values if v.op in ("select", "take")
                   for o in v.operands[:1] if o.op == "param"}
        for name, shape in self.param_shapes(dims).items():
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            init = next(v.attr["init"] for v in self.ir.params if v.attr["name"] == name)
            self.params[name] = initial_value(init, shape, rng, self.float_dtype, name in stacked)
        self.dims = {**self.static_dims, **dims}
        return self

    def load_weights(self, weights: str | Path | Mapping[str, Any]) -> "CompiledModel":
        """Load parameters from an .npz file or a mapping name -> array (all of them, exactly)."""
        source = f"the weights file {weights}" if isinstance(weights, (str, Path)) else "the weights given to load_weights"
        if isinstance(weights, (str, Path)):
            try:
                with np.load(weights, allow_pickle=False) as data:
                    weights = {k: data[k] for k in data.files}
            except (OSError, ValueError) as err:
                raise WeightsError(f"cannot read weights from {weights}: {err}",
                                   "weights are an .npz file with one array per parameter") from None
        declared = self.param_types
        missing = sorted(set(declared) - set(weights))
        extra = sorted(set(weights) - set(declared))
        if missing or extra:
            parts = ([f"missing {', '.join(missing)}"] if missing else []) + \
                    ([f"unknown {', '.join(extra)}"] if extra else [])
            raise WeightsError(f"weights do not match the parameters of '{self.name}': {'; '.join(parts)}",
                               f"expected exactly: {', '.join(declared)}")
        arrays = {k: _to_numpy(v) for k, v in weights.items()}
        dims = dict(self.static_dims)
        for name, t in declared.items():
            arr = arrays[name]
            if arr.dtype.kind not in "fiu":
                raise WeightsError(f"weight '{name}' has dtype {arr.dtype}", "weights are real numbers")
            if not np.all(np.isfinite(arr)):
                raise WeightsError(f"weight '{name}' holds non-finite values", "check the file")
        # Plain dims first, from any weight; then products such as 2*F are checked against them.
        origins = dict(self.dim_origins)
        for defer_products in (True, False):
            for name, t in declared.items():
                self._bind_shape(f"weight '{name}'", t, arrays[name].shape, dims, WeightsError, defer_products,
                                 self._declaration(name, source, origins, row_axis=False))
        self.dims = dims
        self.dim_origins = origins
        self.params = {k: arrays[k].astype(self.float_dtype) for k in declared}
        return self

    def save_weights(self, path: str | Path) -> None:
        if not self.params:
            raise WeightsError("the model has no parameters yet", "call init(seed, graph=...) or run it once")
        np.savez(path, **self.params)

    # ---- running -------------------------------------------------------------------------

    def _declaration(self, name: str, source: str, origins: dict[str, str], row_axis: bool) -> "_Declaration":
        """How the input or parameter ``name`` is declared (its dims as written, where), for messages."""
        value = next((v for v in self.ir.values if v.op in ("input", "param") and v.attr["name"] == name), None)
        arg = None
        if self.ast is not None:
            model = next((m for m in getattr(self.ast, "models", ()) if m.name == self.name), None)
            arg = next((a for a in model.args if a.name == name), None) if model is not None else None
        return _Declaration(name, source, origins, row_axis,
                            tuple(str(d) for d in arg.type.dims) if arg is not None else None,
                            f"{name}: {arg.type}" if arg is not None else None,
                            value.span.location if value is not None and value.span is not None else None,
                            self._static_origin)

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

    @staticmethod
    def _bind_shape(what: str, t: TensorType, shape: tuple[int, ...], dims: dict[str, int], error,
                    defer_products: bool = False, decl: "_Declaration | None" = None) -> None:
        declared = "[" + ", ".join(str(d) for d in t.shape) + "]"
        if len(shape) != t.rank:
            raise error(f"{what} has shape {list(shape)} but is declared {declared}",
                        f"it needs {t.rank} axes")
        for axis, (dim, size) in enumerate(zip(t.shape, shape)):
            resolved = dim.substitute(dims)
            if resolved.is_static:
                if resolved.value != size:
                    if decl is not None:
                        raise error(*decl.mismatch(axis, size, resolved.value, dims))
                    raise error(f"{what} has size {size} on axis {axis} but is declared {declared} "
                                f"({dim} = {resolved.value})", "make the data and the declaration agree")
            elif len(resolved.symbols) == 1 and resolved.coeff == 1:
                dims[resolved.symbols[0]] = size
                if decl is not None:
                    decl.bound(resolved.symbols[0], axis, size)
            elif defer_products:
                continue
            else:
                raise error(f"{what}: cannot bind {dim} from a size of {size}",
                            "bind product dims with `dim NAME = value`")

    def bind(self, graph: Graph, inputs: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        """Find, check and convert every model input; returns the arrays and the bound dims."""
        unknown = sorted(set(inputs) - set(self.input_types))
        if unknown:
            raise InputError(f"'{self.name}' has no input named {', '.join(unknown)}",
                             f"its inputs are: {', '.join(self.input_types) or 'none'}")
        dims = dict(self.dims)
        origins = dict(self.dim_origins)
        arrays: dict[str, np.ndarray] = {}
        for name, t in self.input_types.items():
            if name in inputs:
                arr = _to_numpy(inputs[name])
            elif name in graph:
                arr = graph[name]
            else:
                raise InputError(f"model input '{name}' ({t}) is not given",
                                 f"pass {name}=... or add an array '{name}' to the graph")
            if arr.ndim == 0 or arr.shape[0] != graph.num_rows(t.domain):
                got = "a scalar" if arr.ndim == 0 else f"{arr.shape[0]} rows"
                raise InputError(f"input '{name}' has {got} but the graph has {graph.num_rows(t.domain)} {t.domain}s",
                                 f"{name} is declared {t}: one row per {t.domain}")
            if t.dtype == INT_DTYPE:
                if arr.dtype.kind not in "iu":
                    raise InputError(f"input '{name}' has dtype {arr.dtype} but is declared int",
                                     f"pass integer ids ({name}.astype(np.int64))")
                if arr.size and arr.min() < 0:
                    pos = int(np.argmax(arr < 0))
                    raise InputError(f"{name}[{pos}] = {int(arr[pos])} is negative", "ids start at 0")
                arr = arr.astype(np.int64, copy=False)
            else:
                if arr.dtype.kind not in "fiub":
                    raise InputError(f"input '{name}' has dtype {arr.dtype}", "features are real numbers")
                arr = arr.astype(self.float_dtype, copy=False)
            source = f"the input {name} given to the model" if name in inputs else f"the graph's array '{name}'"
            self._bind_shape(f"input '{name}'", t, arr.shape[1:], dims, InputError,
                             decl=self._declaration(name, source, origins, row_axis=True))
            arrays[name] = arr
        self._bound_origins = origins
        return arrays, dims

    def __call__(self, graph: Graph | str | Path | Any, **inputs: Any) -> np.ndarray | dict[str, np.ndarray]:
        """Run on ``graph`` (a Graph, an .npz path or a PyG Data); inputs not given as keywords are
        read from the graph's arrays by name. One output: an array; several: a dict by name."""
        outputs = self.run(graph, **inputs)
        return outputs["out"] if list(outputs) == ["out"] else outputs

    def run(self, graph: Graph | str | Path | Any, **inputs: Any) -> dict[str, np.ndarray]:
        graph = as_graph(graph)
        arrays, dims = self.bind(graph, inputs)
        missing_params = set(self.param_types) - set(self.params)
        if missing_params:
            self.init(self.seed, **{k: v for k, v in dims.items() if k not in self.static_dims})
            self.dim_origins.update({k: f"{origin} when the parameters were initialised"
                                     for k, origin in self._bound_origins.items() if k not in self.static_dims})
        else:
            self._check_param_dims(dims)
        start = time.perf_counter()
        program = self.program_for(dims)
        layout = choose_layout(graph, program, self.layout) if self.optimize else None
        self.last_layout = layout
        if layout is not None:
            graph, arrays = layout.apply(graph, arrays, self.input_types, frozenset(set(arrays) - set(inputs)))
        outputs = self.backend.run(program, graph, arrays, self.params, dims, training=self.training)
        if self.training:  # batch_norm's running statistics, updated by the run
            for name, value in getattr(self.backend, "last_state_updates", {}).items():
                self.params[name] = np.asarray(value, dtype=self.float_dtype)
        if layout is not None:
            outputs = layout.restore(outputs, {name: v.type for name, v in program.outputs})
        self.last_run_seconds = time.perf_counter() - start
        return outputs

    def program_for(self, dims: Mapping[str, int]) -> Program:
        """The program run for these dims: the reference IR, or the optimized IR specialised to
        the dims (cached)."""
        if not self.optimize:
            return self.ir
        return self.optimized_for(dims)[0]

    def optimized_for(self, dims: Mapping[str, int]) -> tuple[Program, PassContext]:
        key = tuple(sorted(dims.items()))
        if key not in self._specialized:
            self._specialized[key] = optimize(specialize(self.ir, dict(dims)), self.passes, dict(dims),
                                              target=getattr(self.backend, "target", "cpu"))
        return self._specialized[key]

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

    def train(self, mode: bool = True) -> "CompiledModel":
        """Training mode (``mode=False``: eval mode, the default of a new model): dropout draws its
        masks, and ``batch_norm`` normalises with the statistics of the batch and updates its running
        statistics (parameters of the model) at every run."""
        self.training = mode
        return self

    def eval(self) -> "CompiledModel":
        """Inference mode: dropout is the identity, ``batch_norm`` uses its running statistics."""
        return self.train(False)

    def __repr__(self) -> str:
        return (f"CompiledModel({self.name!r}, backend={self.backend.name!r}, "
                f"params={ {k: list(v.shape) for k, v in self.params.items()} })")

    def ir_text(self, locations: bool = False) -> str:
        return print_program(self.ir, locations)


class _Declaration:
    """An input or a parameter as declared, for the message of a size that does not fit: the dim
    as written, where each dim's value came from (a `dim`, an override, the weights, the graph),
    the axis as the user numbers it (an input's row axis is axis 0) and where it is declared."""

    def __init__(self, name, source, origins, row_axis, dims, text, location, static_origin):
        self.name, self.source, self.origins, self.row_axis = name, source, origins, row_axis
        self.dims, self.text, self.location, self.static_origin = dims, text, location, static_origin

    def bound(self, dim: str, axis: int, size: int) -> None:
        self.origins.setdefault(dim, f"{self.source} ({self.name}.shape[{axis + self.row_axis}] = {size})")

    def mismatch(self, axis: int, size: int, expected: int, dims: dict[str, int]) -> tuple[str, str]:
        written = self.dims[axis] if self.dims is not None and axis < len(self.dims) else None
        factors = [f.strip() for f in written.split("*")] if written else []
        symbols = [f for f in factors if not f.isdigit()]
        kind = "input" if self.row_axis else "weight"
        at = f"{self.name}.shape[{axis + self.row_axis}]"
        need = f"{written} = {expected}" if symbols else f"{expected}"
        message = f"{kind} '{self.name}' has {at} = {size} but its declaration{f' {self.text}' if self.text else ''} needs {need}"
        notes = []
        for sym in dict.fromkeys(symbols):
            value = dims.get(sym)
            origin = self.origins.get(sym) or self.static_origin(sym)
            notes.append(f"{sym}{f' = {value}' if value is not None else ''} comes from {origin or 'the data bound first'}")
        if self.location:
            notes.append(f"{self.name} is declared at {self.location}")
        return message, "; ".join(notes) or "make the data and the declaration agree"


def as_graph(graph: Any) -> Graph:
    if isinstance(graph, Graph):
        return graph
    if isinstance(graph, (str, Path)):
        return Graph.load(graph)
    if hasattr(graph, "edge_index"):
        return Graph.from_pyg(graph)
    raise GraphError(f"cannot use a {type(graph).__name__} as a graph",
                     "pass an mpdsl.Graph, an .npz path or a torch_geometric Data")

