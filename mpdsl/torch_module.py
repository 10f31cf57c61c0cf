"""Compiled models as trainable torch modules, inside torch: device tensors, torch.compile, torch.export.

``to_torch(model)`` wraps a ``CompiledModel`` in a ``torch.nn.Module`` whose parameters are
``nn.Parameter``s named (and ordered) as in the .mp file. A compiled program runs as one opaque torch
op, ``torch.ops.mpdsl.run`` (a ``torch.library.custom_op``): its fake kernel gives the output shapes
from the IR types, its autograd formula runs the compiler's backward program (``torch.ops.mpdsl.
run_backward``). So ``loss.backward()`` fills ``param.grad``, any torch optimizer trains the model,
and ``torch.compile(module)`` and ``torch.export.export(module, ...)`` see the model as that op. Importing
this module does not load torch's compiler (dynamo): a process that only trains eagerly never pays its
memory.

Calling it:

* ``module(graph, **inputs)``: a ``Graph``, an .npz path or a PyG ``Data`` (its tensors are used as
  they are, on their device); inputs not given as keywords are read from the graph;
* ``module(x=..., edge_index=..., edge_attr=..., batch=..., num_graphs=..., num_nodes=...)``: tensors
  only, in PyG's style (what tracing tools see). ``num_nodes`` defaults to the rows of a node input;
  ``num_graphs`` (for models with per-graph values) to ``batch.max() + 1``, which reads one scalar
  from the device: pass it when exporting such a model.

Devices and copies. The module computes on the device of its parameters (``module.to("cuda")``):

* the NumPy backend runs on the CPU, on the tensors' memory (no copies of parameters or inputs:
  ``Tensor.numpy()`` views), and returns tensors over its output arrays;
* the Triton backend runs its generated kernels and torch's dense ops on the device tensors; nothing
  is copied to the host inside a step except these scalars: the range checks of int inputs that
  index parameters or classes (their max), the finiteness check of float inputs given as tensors
  (one flag each), the typed-linear tile table of relational models, and ``batch.max()`` when
  ``num_graphs`` is not given.
* a graph's arrays (``module(graph)``) are moved to each device once and cached on the graph; a
  graph given as tensors (``edge_index``, ``batch``) is looked up by identity, then by content
  (``torch.equal``), among the last few graphs seen; a new structure is copied to the host once
  to build its CSR index.

Precision: the module computes in the dtype of its parameters (float32, float64; float16 and
bfloat16 on the Triton backend, which accumulates reductions, softmax and matmuls in float32).
Under ``torch.autocast(device_type, dtype=torch.float16 / bfloat16)`` it computes in the autocast
dtype (parameters are cast for the call, so their gradients stay in their own dtype). The NumPy
backend refuses half precision with a message.

Programs, per (dims, dtype, training mode, inputs differentiated): the gradient program of the
reference IR (``mpdsl.autodiff.grad_program``, keeping the forward outputs), optimized by the model's
passes, split where the output cotangents come in (``split_program``): the forward part computes the
outputs and the residuals the backward part reads, the backward part the gradients. A training step
computes each forward value once, except those the backward recomputes rather than saves
(``mpdsl.autodiff.rematerialized``: a ReLU's mask, GAT's edge scores from their per-node halves).
Without autograd (``torch.no_grad()``, or nothing requiring grad) the plain optimized forward program
runs.

Eager calls skip what only tracing needs: a call on a ``Graph`` hands the op the graph itself (no
structure tensors to look it up by), and the residuals stay on the autograd context (on the NumPy
backend as the arrays the run made), not outputs of the op; under torch.compile and torch.export the
registered op takes the structure tensors and returns the residuals, as its schema says.

* ``train()`` / ``eval()`` switch dropout and batch norm, as for torch modules (a new module starts
  in training mode). In training, each dropout's mask is drawn from torch's generator on the
  module's device (``torch.manual_seed`` makes runs repeatable) and is an input of both parts;
  ``batch_norm`` normalises with the batch statistics and each call updates its running statistics
  (buffers), as torch.nn.BatchNorm1d. In eval mode ``batch_norm`` uses the running statistics.
* ``state_dict()`` holds one tensor per .mp parameter (the running statistics included):
  ``CompiledModel.load_weights(state_dict)`` loads it back, and ``sync()`` writes the module's
  current weights into its compiled model.

Saved exports (``torch.export.save``) hold the programs as IR text inside the op's arguments: loading
one needs mpdsl installed and ``import mpdsl.torch_module`` (which registers the ops) before
``torch.export.load``; the backend is made afresh with its default options.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import sys
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

from mpdsl.autodiff import batch_norm_statistics
from mpdsl.backends import BackendError, check_input_ids, get_backend, relabelling_arrays
from mpdsl.context import Programs, layout_for
from mpdsl.diagnostics import InputError, MpdslError
from mpdsl.graph import Graph, resolve_edge_sets
from mpdsl.ir import Program, parse_program, print_program
from mpdsl.plan import GraphLayout, space_rows
from mpdsl.runtime import (
    CompiledModel,
    _Array,
    as_graph,
    check_edge_sets,
    check_input_rows,
    negative_ids,
    non_finite,
)
from mpdsl.types import INT_DTYPE, Domain, Space, TensorType, edge_set_ends, edge_set_relation

TORCH_DTYPES = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16"}
DTYPES_OF = {name: dtype for dtype, name in TORCH_DTYPES.items()}
GRAPH_CACHE_SIZE = 8  # graphs given as tensors, remembered per process


# ---- the opaque op's configuration ---------------------------------------------------------


_BACKENDS: dict[str, Any] = {}   # token -> the backend instance of a module in this process


def _backend_token(backend) -> str:
    token = f"{backend.name}:{id(backend):x}"
    _BACKENDS[token] = backend
    return token


@dataclass
class RunSpec:
    """What one call of ``torch.ops.mpdsl.run`` runs, read from its text (``spec_text``): the program
    (``forward``: outputs, residuals), the backward program (None without autograd), the names of the
    op's tensor arguments in order, which of them are differentiated, and the backend. The op returns
    the outputs, then the residuals, then the running statistics after the call (``state``)."""

    backend_name: str
    token: str
    forward: Program
    backward: Program | None
    tensors: tuple[str, ...]
    outputs: tuple[str, ...]
    residuals: tuple[str, ...]
    state: tuple[str, ...]
    differentiated: tuple[str, ...]
    checked: tuple[str, ...]          # inputs given by the caller: their values are checked at each call
    dims: dict[str, int]
    layout: str
    target: str
    last_layout: GraphLayout | None = None

    def __post_init__(self) -> None:
        self._arguments: dict[int, tuple[tuple[str, ...], tuple[str, ...]]] = {}
        self._views: dict[str, tuple[int, int, tuple, tuple, Any, np.ndarray]] = {}

    def arguments(self, program: Program) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(input names, param names) of ``program`` (one of the spec's two)."""
        known = self._arguments.get(id(program))
        if known is None:
            known = (tuple(v.attr["name"] for v in program.inputs), tuple(v.attr["name"] for v in program.params))
            self._arguments[id(program)] = known
        return known

    def view(self, name: str, t: torch.Tensor) -> np.ndarray:
        """``t``'s memory as a NumPy array (no copy). A parameter's view is kept and made again only
        when the parameter is another tensor or its storage moved: a view keeps its tensor's storage
        alive, so an unchanged (id, data pointer, shape, strides, dtype) is the same memory."""
        if name not in self._persistent:
            return t.detach().numpy()  # only parameters persist between calls: the others are not kept
        known = self._views.get(name)
        key = (id(t), t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)
        if known is not None and known[:5] == key:
            return known[5]
        array = t.detach().numpy()
        self._views[name] = (*key, array)
        return array

    @functools.cached_property
    def _persistent(self) -> frozenset[str]:
        """The op's tensors that are parameters of the forward program (their views are kept)."""
        return frozenset(self.tensors) & frozenset(self.arguments(self.forward)[1])

    def graph_layout(self, graph: Graph) -> GraphLayout | None:
        """The graph layout this spec runs ``graph`` in (chosen for its forward program, once per graph)."""
        return graph.cached(("torch.layout", id(self)),
                            lambda: layout_for(graph, self.forward, self.target, self.layout, self.backend.warm_up))

    @property
    def backend(self):
        backend = _BACKENDS.get(self.token)
        if backend is None:  # a loaded export in another process: the backend with its default options
            backend = _BACKENDS.setdefault(self.token, get_backend(self.backend_name))
        return backend

    def to_text(self) -> str:
        return json.dumps({
            "format": "mpdsl.run/1", "backend": self.backend_name, "token": self.token,
            "forward": print_program(self.forward),
            "backward": None if self.backward is None else print_program(self.backward),
            "tensors": self.tensors, "outputs": self.outputs, "residuals": self.residuals, "state": self.state,
            "differentiated": self.differentiated, "checked": self.checked, "dims": self.dims,
            "layout": self.layout, "target": self.target})

    @functools.cached_property
    def input_sets(self) -> tuple[str, ...]:
        """The input edge sets the programs read: their indices end the op's structure tensors."""
        return tuple(s.name for s in self.forward.edge_sets if s.kind == "input")

    @functools.cached_property
    def types(self) -> dict[str, TensorType]:
        """Type of every named input, param and output of both programs."""
        types = {}
        for program in (self.forward, self.backward):
            if program is not None:
                types.update({v.attr["name"]: v.type for v in program.values if v.op in ("input", "param")})
                types.update({name: v.type for name, v in program.outputs})
        return types


_SPECS: dict[str, RunSpec] = {}


def read_spec(text: str) -> RunSpec:
    """The spec of an op call (parsed once per process)."""
    spec = _SPECS.get(text)
    if spec is None:
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if not isinstance(data, dict) or data.get("format") != "mpdsl.run/1":
            raise MpdslError("torch.ops.mpdsl.run was called with a spec it cannot read",
                             "call the op through an mpdsl torch module (to_torch)")
        spec = RunSpec(data["backend"], data["token"], parse_program(data["forward"]),
                       None if data["backward"] is None else parse_program(data["backward"]),
                       tensors=tuple(data["tensors"]), outputs=tuple(data["outputs"]),
                       residuals=tuple(data["residuals"]), state=tuple(data["state"]),
                       differentiated=tuple(data["differentiated"]), checked=tuple(data["checked"]),
                       dims={k: int(v) for k, v in data["dims"].items()}, layout=data["layout"], target=data["target"])
        _SPECS[text] = spec
    return spec


# ---- graphs given as tensors ----------------------------------------------------------------


@dataclass
class _KnownGraph:
    """A graph known by its structure tensors: held weakly when the caller gave the Graph (the caller
    keeps it; a loop over sampled batches must not keep every batch alive), strongly when it was built
    here from the tensors."""

    edge_index: torch.Tensor
    batch: torch.Tensor | None
    versions: tuple[int, ...]
    held: Graph | weakref.ref
    sets: tuple[torch.Tensor, ...] = ()  # the indices of the graph's edge sets a program reads, in its order

    @property
    def graph(self) -> Graph | None:
        return self.held() if isinstance(self.held, weakref.ref) else self.held


_GRAPHS: collections.OrderedDict[tuple, list[_KnownGraph]] = collections.OrderedDict()


def _graph_key(edge_index: torch.Tensor, batch: torch.Tensor | None, num_nodes: int,
               sets: tuple[tuple[str, torch.Tensor], ...] = (), node_types: Mapping[str, int] | None = None) -> tuple:
    return (str(edge_index.device), int(num_nodes), int(edge_index.shape[1]), batch is not None,
            tuple((name, int(index.shape[1])) for name, index in sets),
            tuple(sorted((node_types or {}).items())))


def _versions(edge_index: torch.Tensor, batch: torch.Tensor | None,
              sets: tuple[tuple[str, torch.Tensor], ...] = ()) -> tuple[int, ...]:
    return (edge_index._version, -1 if batch is None else batch._version, *(index._version for _, index in sets))


def _split_structure(structure: list[torch.Tensor], set_names: tuple[str, ...]
                     ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[tuple[str, torch.Tensor], ...]]:
    """(edge_index, batch or None, the edge set indices by name) of a structure list [edge_index,
    (batch,) set indices...]: the last ``len(set_names)`` tensors are the sets'."""
    base = structure[:len(structure) - len(set_names)]
    sets = tuple(zip(set_names, structure[len(base):]))
    return base[0], base[1] if len(base) > 1 else None, sets


def _remember(key: tuple, entry: _KnownGraph) -> None:
    """Put ``entry`` first among the graphs of ``key``, keeping at most GRAPH_CACHE_SIZE graphs per key
    and GRAPH_CACHE_SIZE keys (the least recently added go): batches of changing sizes, each of its
    own key, never accumulate."""
    entries = _GRAPHS.setdefault(key, [])
    entries.insert(0, entry)
    del entries[GRAPH_CACHE_SIZE:]
    _GRAPHS.move_to_end(key)
    while len(_GRAPHS) > GRAPH_CACHE_SIZE:
        _GRAPHS.popitem(last=False)


def remember_graph(graph: Graph, edge_index: torch.Tensor, batch: torch.Tensor | None,
                   sets: tuple[tuple[str, torch.Tensor], ...] = ()) -> None:
    """Make ``graph`` the one found for these structure tensors (its own, cached per device)."""
    key = _graph_key(edge_index, batch, graph.num_nodes, sets, graph.node_types)
    if not any(e.edge_index is edge_index and e.batch is batch and _same(e.sets, sets) for e in _GRAPHS.get(key, [])):
        _remember(key, _KnownGraph(edge_index, batch, _versions(edge_index, batch, sets), weakref.ref(graph),
                                   tuple(index for _, index in sets)))


def _same(known: tuple[torch.Tensor, ...], sets: tuple[tuple[str, torch.Tensor], ...]) -> bool:
    return len(known) == len(sets) and all(a is b for a, (_, b) in zip(known, sets))


def _equal(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is None if b is None else (a is not None and a.dtype == b.dtype and torch.equal(a, b))


def graph_of(structure: list[torch.Tensor], num_nodes: int, set_names: tuple[str, ...] = (),
             node_types: Mapping[str, int] | None = None) -> Graph:
    """The Graph of ``edge_index`` (and ``batch``, and the indices of the edge sets ``set_names`` (IR
    names), the last tensors of ``structure``; a typed graph's node type counts ``node_types``): a
    remembered one (the same tensors unchanged, or equal contents), else built from a host copy and
    remembered."""
    edge_index, batch, sets = _split_structure(structure, set_names)
    key = _graph_key(edge_index, batch, num_nodes, sets, node_types)
    entries = _GRAPHS.get(key, [])
    versions = _versions(edge_index, batch, sets)
    entries[:] = [entry for entry in entries if entry.graph is not None]  # drop graphs the caller dropped
    for entry in entries:
        known = entry.graph
        if known is not None and entry.edge_index is edge_index and entry.batch is batch \
                and _same(entry.sets, sets) and entry.versions == versions:
            return known
    for entry in entries:
        known = entry.graph
        if (known is not None and _equal(entry.edge_index, edge_index)
                and (batch is None or _equal(entry.batch, batch))
                and len(entry.sets) == len(sets) and all(_equal(a, b) for a, (_, b) in zip(entry.sets, sets))):
            return known
    host = edge_index.detach().cpu().numpy()
    node_data = {} if batch is None else {"batch": batch.detach().cpu().numpy()}
    graph = Graph(host, num_nodes, node_data=node_data,
                  edge_sets={edge_set_relation(name): index.detach().cpu().numpy() for name, index in sets},
                  node_types=node_types,
                  edge_set_types={edge_set_relation(name): edge_set_ends(name) for name, _ in sets
                                  if edge_set_ends(name)[0]})
    _remember(key, _KnownGraph(edge_index.detach(), None if batch is None else batch.detach(), versions, graph,
                               tuple(index.detach() for _, index in sets)))
    return graph


def _device_array(graph: Graph, name: str, device: torch.device, dtype: torch.dtype | None,
                  node_type: str = "") -> torch.Tensor:
    """A graph array (of the node type ``node_type``, if given) as a tensor on ``device`` (in ``dtype`` for
    float arrays), made once per graph."""
    def build() -> torch.Tensor:
        typed = graph.type_array(node_type, name) if node_type else None
        array = graph[name] if typed is None else typed
        tensor = torch.from_numpy(array if array.flags.writeable else _writable_view(array))
        if dtype is not None and array.dtype.kind in "fb":
            tensor = tensor.to(dtype)
        elif array.dtype.kind in "iu":
            tensor = tensor.to(torch.int64)
        return tensor.to(device)

    return graph.cached(("torch.array", node_type, name, str(device), str(dtype)), build)


def _writable_view(array: np.ndarray) -> np.ndarray:
    """A writable view of a read-only array (torch.from_numpy warns on read-only memory); the tensors
    made from it are never written."""
    view = array.view()
    try:
        view.flags.writeable = True
    except ValueError:  # memory that cannot be written at all (a read-only mapping): a copy, made once
        return np.array(array)
    return view


def _structure_tensors(graph: Graph, device: torch.device, set_names: tuple[str, ...] = ()) -> list[torch.Tensor]:
    """The graph's edge_index (and batch, and the indices of its edge sets ``set_names``) on ``device``,
    remembered as that graph."""
    edge_index = graph.cached(("torch.edge_index", str(device)),
                              lambda: torch.from_numpy(_writable_view(graph.edge_index)).to(device))
    batch = _device_array(graph, "batch", device, None) if "batch" in graph else None
    def index(name: str) -> torch.Tensor:
        return graph.cached(("torch.edge_set", name, str(device)), lambda: torch.from_numpy(
            _writable_view(graph.edge_sets[edge_set_relation(name)])).to(device))

    sets = tuple((name, index(name)) for name in set_names)
    remember_graph(graph, edge_index, batch, sets)
    return ([edge_index] if batch is None else [edge_index, batch]) + [index for _, index in sets]


# ---- running a spec --------------------------------------------------------------------------


def _check_values(spec: RunSpec, named: dict[str, torch.Tensor]) -> None:
    """The value checks of inputs given as tensors (a Graph's arrays are checked when it is built)."""
    for name in spec.checked:
        t = named[name]
        if spec.types[name].dtype == INT_DTYPE:
            if t.numel() and not bool((t >= 0).all()):
                raise negative_ids(name, t.detach().cpu().numpy())
        elif t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            raise non_finite(name, t.detach().float().cpu().numpy())


def _split_by_kind(spec: RunSpec, program: Program, named: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    input_names, param_names = spec.arguments(program)
    return ({n: named[n] for n in input_names if n in named}, {n: named[n] for n in param_names if n in named})


def _is_numpy(backend) -> bool:
    """Whether the backend runs on host NumPy arrays (else it takes torch tensors: ``run_tensors``)."""
    return not hasattr(backend, "run_tensors")


def _from_graph(graph: Graph, arrays: dict[str, np.ndarray]) -> frozenset[str]:
    """Names whose array is the graph's own array (same memory): taken from a laid-out graph as is."""
    same = set()
    for name, array in arrays.items():
        if name in graph:
            own = graph[name]
            if (own.shape == array.shape and own.dtype == array.dtype
                    and own.__array_interface__["data"][0] == array.__array_interface__["data"][0]):
                same.add(name)
    return frozenset(same)


def _run(spec: RunSpec, program: Program, graph: Graph, named: dict[str, Any],
         laid_out: frozenset[str], restore: frozenset[str], arrays_out: frozenset[str] = frozenset()
         ) -> dict[str, Any]:
    """Run ``program`` on the backend: named tensors in, named tensors out. On the CPU target the
    layout (node order) chosen for ``spec.forward`` is applied to the row inputs not in ``laid_out``
    and undone on the outputs in ``restore``. On the NumPy backend, named inputs may be NumPy arrays
    and the outputs in ``arrays_out`` stay arrays (an eager call's residuals: torch never sees them)."""
    backend = spec.backend
    if _is_numpy(backend):
        tensors = [t for t in named.values() if isinstance(t, torch.Tensor)]
        devices = {"cpu"} if all(t.is_cpu for t in tensors) else {t.device.type for t in tensors}
        if devices - {"cpu"}:
            raise BackendError(f"the {backend.name} backend runs on the CPU, but the module's tensors are on "
                               f"{', '.join(sorted(devices - {'cpu'}))}",
                               "keep the module on the CPU (module.to('cpu')), or compile with backend='triton'")
        arrays = {n: spec.view(n, t) if isinstance(t, torch.Tensor) else t for n, t in named.items()}  # no copies
        layout = spec.graph_layout(graph)
        spec.last_layout = layout
        run_graph = graph
        with relabelling_arrays(backend, layout) as allocate:
            if layout is not None:
                check_input_ids(program, arrays, spec.dims)  # before the layout: messages name the caller's positions
                types = spec.types
                moved = {n: a for n, a in arrays.items() if n not in laid_out}
                run_graph, moved = layout.apply(graph, moved, types, _from_graph(graph, moved), allocate)
                arrays.update(moved)
            inputs, params = _split_by_kind(spec, program, arrays)
            outputs = backend.run(program, run_graph, inputs, params, spec.dims, training=False)
            updates = dict(getattr(backend, "last_state_updates", {}))
            if layout is not None:
                back = {n: outputs[n] for n in restore if n in outputs}
                outputs.update(layout.restore(back, spec.types, allocate))
        result = {n: a if n in arrays_out else torch.from_numpy(
            a if isinstance(a, np.ndarray) and a.flags.c_contiguous else np.require(a, requirements='C'))
            for n, a in outputs.items()}
        result.update({f"state:{n}": torch.from_numpy(np.array(a)) for n, a in updates.items()})
        return result
    spec.last_layout = None
    inputs, params = _split_by_kind(spec, program, named)
    outputs = backend.run_tensors(program, graph, inputs, params, spec.dims, training=False)
    outputs = dict(outputs)
    outputs.update({f"state:{n}": t for n, t in backend.last_state_updates.items()})
    return outputs


def _memory_start(t: torch.Tensor | np.ndarray) -> int:
    """Where a tensor's storage, or an array's data, starts."""
    return t.__array_interface__["data"][0] if isinstance(t, np.ndarray) else t.untyped_storage().data_ptr()


def _distinct(tensors: list[torch.Tensor], inputs: list[Any]) -> list[torch.Tensor]:
    """Outputs of a custom op may alias neither its inputs (tensors, or the arrays an eager call keeps
    for its backward) nor each other: clone those that do."""
    seen = {_memory_start(t) for t in inputs if (t.size if isinstance(t, np.ndarray) else t.numel())}
    result = []
    for t in tensors:
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                t = t.clone()
                ptr = t.untyped_storage().data_ptr()
            seen.add(ptr)
        result.append(t)
    return result


@dataclass(frozen=True)
class _Sizes:
    """Row counts of a graph (what shapes and the run memory check need): its nodes, edges and graphs,
    and the edges of each edge set of the program (``edge_set_rows``, by name)."""

    num_nodes: Any  # int, or a SymInt while tracing
    num_edges: Any
    num_graphs: Any
    edge_set_rows: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    node_type_rows: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def num_rows(self, domain: Domain) -> int:
        return {Domain.NODE: self.num_nodes, Domain.EDGE: self.num_edges, Domain.GRAPH: self.num_graphs}[domain]

    def num_type_nodes(self, node_type: str) -> Any:
        return self.node_type_rows[node_type] if node_type else self.num_nodes

    def rows(self, t: TensorType) -> Any:
        """The rows of a value of type ``t``."""
        if t.domain is Domain.NODE:
            return self.num_type_nodes(t.rowset)
        return self.edge_set_rows[t.rowset] if t.rowset else self.num_rows(t.domain)


def _sizes_of(program: Program, graph: Graph, memory_limit: Any = None) -> _Sizes:
    """The row counts of ``graph`` for ``program`` (its edge sets resolved, derived ones built once, a
    k-hop set refused over ``memory_limit`` before it is built)."""
    if program.edge_sets:
        resolve_edge_sets(graph, program.edge_sets, memory_limit)
    rows = space_rows(program, graph) if program.edge_sets else {}
    return _Sizes(graph.num_nodes, graph.num_edges, graph.num_graphs,
                  {s.name: rows[Space(Domain.EDGE, s.name)] for s in program.edge_sets},
                  {t: graph.num_type_nodes(t) for t in program.node_types})


def _type_counts(spec: RunSpec, set_rows: list[int]) -> dict[str, int]:
    """The node type counts that end ``set_rows`` (after the rows of each edge set), by node type."""
    return dict(zip(spec.forward.node_types, set_rows[len(spec.forward.edge_sets):]))


def _fake_sizes(spec: RunSpec, structure, num_nodes, num_graphs, set_rows) -> _Sizes:
    return _Sizes(num_nodes, structure[0].shape[1], num_graphs,
                  dict(zip((s.name for s in spec.forward.edge_sets), set_rows)), _type_counts(spec, set_rows))


def value_shape(t: TensorType, sizes: _Sizes, dims: Mapping[str, int]) -> tuple:
    """The shape of a value of type ``t`` on a graph of ``sizes`` with ``dims``."""
    rows = () if t.domain is Domain.PARAM else (sizes.rows(t),)
    return rows + tuple(d.substitute(dims).value for d in t.shape)


def _empty(t: TensorType, sizes: _Sizes, device) -> torch.Tensor:
    dtype = torch.int64 if t.dtype == INT_DTYPE else DTYPES_OF[t.dtype]
    return torch.empty(value_shape(t, sizes, {}), dtype=dtype, device=device)


def _forward_results(spec: RunSpec, named: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]):
    return ([outputs[n] for n in spec.outputs] + [outputs[n] for n in spec.residuals]
            + [outputs.get(f"state:{n}", named[n]) for n in spec.state])


def run_forward(spec: str, structure: list[torch.Tensor], tensors: list[torch.Tensor], num_nodes: int,
                num_graphs: int, set_rows: list[int]) -> list[torch.Tensor]:
    """Run the forward program of ``spec`` on the graph ``structure`` ([edge_index] or [edge_index,
    batch], then the indices of the input edge sets ``spec.input_sets``) with ``tensors`` (named by
    ``spec.tensors``): its outputs, residuals and running statistics. ``set_rows``: the edges of each
    edge set of the program (for the shapes of the fake kernel)."""
    s, named, outputs = _forward(spec, structure, tensors, num_nodes, num_graphs, set_rows)
    return _distinct(_forward_results(s, named, outputs), list(tensors) + list(structure))


def _forward(spec: str, structure: list[torch.Tensor], tensors: list[torch.Tensor], num_nodes: int,
             num_graphs: int, set_rows: list[int], arrays_out: bool = False, graph: Graph | None = None
             ) -> tuple[RunSpec, dict[str, torch.Tensor], dict[str, Any]]:
    """``run_forward``'s run: (the spec, the named tensors, the named results); with ``arrays_out``
    the residuals stay NumPy arrays on the NumPy backend; ``graph``: the call's graph when the
    caller has it (an eager call on a ``Graph``: no structure tensors to look it up by)."""
    s = read_spec(spec)
    named = dict(zip(s.tensors, tensors))
    if graph is None:
        graph = graph_of(structure, num_nodes, s.input_sets, _type_counts(s, set_rows))
    _check_values(s, named)
    if graph.num_graphs != num_graphs and any(v.type.domain is Domain.GRAPH for v in s.forward.values):
        raise InputError(f"num_graphs is {num_graphs} but batch holds {graph.num_graphs} graphs",
                         "pass num_graphs=batch.max() + 1, or leave it out")
    with torch.autocast(_device_type(structure, tensors), enabled=False):
        outputs = _run(s, s.forward, graph, named, frozenset(), frozenset(s.outputs),
                       frozenset(s.residuals) if arrays_out else frozenset())
    return s, named, outputs


def run_backward(spec: str, structure: list[torch.Tensor], tensors: list[torch.Tensor],
                 cotangents: list[torch.Tensor], residuals: list[torch.Tensor], num_nodes: int,
                 num_graphs: int, set_rows: list[int]) -> list[torch.Tensor]:
    """Run the backward program of ``spec``: the gradients of ``spec.differentiated``, from the
    op's tensors, the cotangents of its float outputs (in order) and the forward call's residuals."""
    s = read_spec(spec)
    graph = graph_of(structure, num_nodes, s.input_sets, _type_counts(s, set_rows))
    return _backward_on(s, graph, tensors, cotangents, residuals, list(structure))


def _backward_on(s: RunSpec, graph: Graph, tensors: list[torch.Tensor], cotangents: list[torch.Tensor],
                 residuals: list[Any], structure: list[torch.Tensor]) -> list[torch.Tensor]:
    """``run_backward`` on ``graph``."""
    assert s.backward is not None
    named = dict(zip(s.tensors, tensors))
    floats = [n for n in s.outputs if s.types[n].is_float]
    named.update({f"d_{n}": c for n, c in zip(floats, cotangents)})
    named.update(dict(zip(s.residuals, residuals)))
    with torch.autocast(_device_type(structure, tensors), enabled=False):
        result = _run(s, s.backward, graph, named, frozenset(s.residuals),
                      frozenset(f"d_{n}" for n in s.differentiated if s.types[n].domain is not Domain.PARAM))
    grads = [result[f"d_{n}"].to(named[n].dtype) for n in s.differentiated]
    return _distinct(grads, list(tensors) + list(cotangents) + list(residuals) + list(structure))


def _device_type(structure: list[torch.Tensor], tensors: list[torch.Tensor]) -> str:
    """The device kind of a call (of its graph tensors, else of its other tensors)."""
    first = structure[:1] or tensors[:1]
    return first[0].device.type if first else "cpu"


# The registered ops: what torch.compile and torch.export see (eager calls take ``_EagerRun``, the
# same implementation without the dispatcher's per-call work).
run_op = torch.library.custom_op("mpdsl::run", run_forward, mutates_args=())
run_backward_op = torch.library.custom_op("mpdsl::run_backward", run_backward, mutates_args=())


@run_op.register_fake
def _run_fake(spec, structure, tensors, num_nodes, num_graphs, set_rows):
    s = read_spec(spec)
    sizes = _fake_sizes(s, structure, num_nodes, num_graphs, set_rows)
    return [_empty(s.types[n], sizes, structure[0].device) for n in (*s.outputs, *s.residuals, *s.state)]


@run_backward_op.register_fake
def _run_backward_fake(spec, structure, tensors, cotangents, residuals, num_nodes, num_graphs, set_rows):
    s = read_spec(spec)
    named = dict(zip(s.tensors, tensors))
    return [torch.empty_like(named[n]) for n in s.differentiated]


def _setup_context(ctx, inputs, output):
    spec, structure, tensors, num_nodes, num_graphs, set_rows = inputs
    s = read_spec(spec)
    outputs = output[:len(s.outputs)]
    residuals = output[len(s.outputs):len(s.outputs) + len(s.residuals)]
    _keep_for_backward(ctx, spec, structure, tensors, (num_nodes, num_graphs, set_rows), outputs, residuals, True)


def _keep_for_backward(ctx, spec: str, structure: list[torch.Tensor], tensors: list[torch.Tensor], sizes: tuple,
                       outputs: list[torch.Tensor], residuals: list[Any], saved: bool) -> None:
    """What ``_gradients`` reads: the call's spec and sizes, its tensors, its outputs' shapes, and its
    residuals, ``saved`` with the tensors (op outputs) or kept on the context as they are."""
    num_nodes, num_graphs, set_rows = sizes
    ctx.spec, ctx.sizes = spec, (num_nodes, num_graphs, list(set_rows))
    ctx.counts = (len(structure), len(tensors))
    ctx.outputs = [(o.shape, o.dtype, o.device) for o in outputs]
    ctx.save_for_backward(*structure, *tensors, *(residuals if saved else ()))
    ctx.residuals = None if saved else list(residuals)


def _gradients(ctx, grads, backward) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
    """(structure gradients (None), gradient of each op tensor or None), by ``backward`` (the op or
    its implementation)."""
    s = read_spec(ctx.spec)
    if s.backward is None:
        raise RuntimeError("mpdsl: this call ran without autograd; run it with a parameter or input that "
                           "requires grad")
    saved = ctx.saved_tensors
    n_structure, n_tensors = ctx.counts
    structure, tensors = list(saved[:n_structure]), list(saved[n_structure:n_structure + n_tensors])
    residuals = list(saved[n_structure + n_tensors:]) if ctx.residuals is None else ctx.residuals
    cotangents = []
    for name, grad, (shape, dtype, device) in zip(s.outputs, grads, ctx.outputs):
        if s.types[name].is_float:
            cotangents.append(torch.zeros(shape, dtype=dtype, device=device) if grad is None
                              else grad.to(dtype).contiguous())
    computed = backward(ctx.spec, structure, tensors, cotangents, residuals, *ctx.sizes)
    by_name = dict(zip(s.differentiated, computed))
    return [None] * n_structure, [by_name.get(n) for n in s.tensors]


def _backward(ctx, grads):
    structure, tensors = _gradients(ctx, grads, run_backward_op)
    return None, structure, tensors, None, None, [None] * len(ctx.sizes[2])  # set_rows: a list, like the input


run_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerRun(torch.autograd.Function):
    """``torch.ops.mpdsl.run`` for eager calls: the same forward and backward, with the residuals
    kept on the autograd context, not returned (on the NumPy backend as the arrays the run made:
    no tensors, no autograd bookkeeping for them). Returns the outputs, then the running statistics."""

    @staticmethod
    def forward(ctx, spec: str, num_structure: int, num_nodes: int, num_graphs: int, set_rows: list[int],
                graph: Graph | None, *flat: torch.Tensor):
        structure, tensors = list(flat[:num_structure]), list(flat[num_structure:])
        s, named, results = _forward(spec, structure, tensors, num_nodes, num_graphs, set_rows, arrays_out=True,
                                     graph=graph)
        ctx.graph = graph
        returned = _distinct([results[n] for n in s.outputs] + [results.get(f"state:{n}", named[n]) for n in s.state],
                             list(tensors) + list(structure))
        outputs, state = returned[:len(s.outputs)], returned[len(s.outputs):]
        _keep_for_backward(ctx, spec, structure, tensors, (num_nodes, num_graphs, set_rows), outputs,
                           [results[n] for n in s.residuals], False)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*(t for t in outputs + state if not t.is_floating_point()), *state)
        return tuple(outputs + state)

    @staticmethod
    def backward(ctx, *grads):
        def backward(spec, structure, tensors, cotangents, residuals, *sizes):
            if ctx.graph is None:
                return run_backward(spec, structure, tensors, cotangents, residuals, *sizes)
            return _backward_on(read_spec(spec), ctx.graph, tensors, cotangents, residuals, structure)

        structure, tensors = _gradients(ctx, grads, backward)
        return (None, None, None, None, None, None, *structure, *tensors)


def call_run(spec: str, structure: list[torch.Tensor], tensors: list[torch.Tensor], num_nodes: int,
             num_graphs: int, set_rows: list[int], graph: Graph | None = None
             ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Run ``spec``: (its outputs, its running statistics after the call), by the registered op while
    torch.compile / torch.export trace, else by ``_EagerRun`` (on ``graph`` when given, else on the
    graph of the structure tensors)."""
    s = read_spec(spec)
    if torch.compiler.is_compiling():
        results = run_op(spec, structure, tensors, num_nodes, num_graphs, set_rows)
        return list(results[:len(s.outputs)]), list(results[len(s.outputs) + len(s.residuals):])
    results = _EagerRun.apply(spec, len(structure), num_nodes, num_graphs, set_rows, graph, *structure, *tensors)
    return list(results[:len(s.outputs)]), list(results[len(s.outputs):])


# ---- the module ------------------------------------------------------------------------------


def _holds_integers(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def _eager_under_compile(fn):
    """``fn`` run eagerly under torch.compile (``torch.compiler.disable(fn)``), without loading torch's
    compiler (dynamo, and with it Triton: about 140 MB of resident memory) in a process that never
    compiles: the disabled form is made once dynamo is loaded (``disable_pending``), until then
    ``fn`` is called as it is (nothing traces it without dynamo)."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        disabled = _DISABLED.get(fn)
        if disabled is None:
            if "torch._dynamo" not in sys.modules:
                return fn(*args, **kwargs)
            disable_pending()
            disabled = _DISABLED[fn]
        return disabled(*args, **kwargs)

    _DISABLED[fn] = None
    _PENDING.add(fn)
    return call


_DISABLED: dict[Any, Any] = {}  # functions of _eager_under_compile -> their disabled form (None until dynamo loads)
_PENDING: set[Any] = set()      # those without it yet


def disable_pending() -> None:
    """Make the disabled forms of ``_eager_under_compile``'s functions (once dynamo is loaded)."""
    while _PENDING:
        fn = _PENDING.pop()
        _DISABLED[fn] = torch.compiler.disable(fn)


@dataclass
class _Prepared:
    """One call of the op, ready to run."""

    spec: RunSpec
    text: str
    structure: list[torch.Tensor]  # none for an eager call on a Graph (``graph``)
    tensors: list[torch.Tensor]
    num_nodes: Any
    num_graphs: Any
    set_rows: list[int]
    graph: Graph | None = None


class MpdslModule(torch.nn.Module):
    """A compiled mpdsl model as a torch module (see the module docstring)."""

    def __init__(self, model: CompiledModel, graph: Any = None, **dims: int):
        super().__init__()
        missing = set(model.param_types) - set(model.params)
        if missing:
            if graph is None and not dims:
                raise InputError(f"the parameters {', '.join(sorted(missing))} of '{model.name}' have shapes bound "
                                 "from the inputs", "pass a graph (to_torch(model, graph)) or the dims, or run "
                                 "the model once first")
            model.init(model.seed, graph=None if graph is None else as_graph(graph), **dims)
        self.compiled = model
        self._statistics = frozenset(batch_norm_statistics(model.ir))  # buffers: updated, not trained
        for name in model.param_types:
            if hasattr(self, name) and name not in self._parameters and name not in self._buffers:
                raise MpdslError(f"parameter name '{name}' clashes with an attribute of torch.nn.Module",
                                 "rename the parameter in the .mp file")
            value = torch.from_numpy(np.array(model.params[name]))
            if name in self._statistics:
                self.register_buffer(name, value)
            else:
                self.register_parameter(name, torch.nn.Parameter(value))
        self._programs: dict[tuple, Programs] = {}
        self._specs: dict[tuple, tuple[RunSpec, str]] = {}
        self._dims: dict[tuple, dict[str, int]] = {}  # _bind's answers
        self._last_spec: RunSpec | None = None

    @property
    def last_layout(self) -> GraphLayout | None:
        """The graph layout of the last call (node order, edge order), as ``CompiledModel.last_layout``."""
        return None if self._last_spec is None else self._last_spec.last_layout

    # ---- running -----------------------------------------------------------------------------

    def forward(self, graph: Any = None, /, **inputs: Any) -> torch.Tensor | dict[str, torch.Tensor]:
        """Run on ``graph`` (a Graph, an .npz path or a PyG Data), or on tensors given as keywords
        (``edge_index=``, ``batch=``, ``num_nodes=``, ``num_graphs=`` and the model's inputs by name);
        inputs not given are read from the graph. One output: a tensor; several: a dict by name."""
        if _PENDING and "torch._dynamo" in sys.modules:  # before torch.compile could trace _prepare
            disable_pending()
        call = self._prepare(graph, inputs)
        outputs, state = call_run(call.text, call.structure, call.tensors, call.num_nodes, call.num_graphs,
                                  call.set_rows, call.graph)
        spec = call.spec
        if state:
            with torch.no_grad():
                for name, value in zip(spec.state, state):
                    getattr(self, name).copy_(value)
        if list(spec.outputs) == ["out"]:
            return outputs[0]
        return dict(zip(spec.outputs, outputs))

    @_eager_under_compile
    def _prepare(self, graph: Any, given: dict[str, Any]) -> _Prepared:
        """Everything but the op: inputs found and checked, dims bound, programs and spec chosen, masks
        drawn. Run eagerly under torch.compile (Python work with no tensor math to capture); traced
        by torch.export, which runs it on fake tensors."""
        model = self.compiled
        device = self._device()
        dtype = self._compute_dtype(device)
        dtype_name = TORCH_DTYPES[dtype]
        model.backend.check_dtype(dtype_name)
        given = dict(given)
        batch_arg = None
        num_nodes: Any = None
        num_graphs: Any = None
        source: Graph | None = None
        input_sets = tuple(s.name for s in model.ir.edge_sets if s.kind == "input")
        type_counts: dict[str, Any] = {}
        if graph is not None and not isinstance(graph, (Graph, str)) and hasattr(graph, "node_types") \
                and hasattr(graph, "edge_types"):  # a PyG HeteroData: its tensors, where they are
            graph, given = None, {**_hetero_tensors(model, graph, given, input_sets), **given}
            type_counts = given.pop("num_type_nodes")
        if graph is None or (not isinstance(graph, (Graph, str)) and hasattr(graph, "edge_index")
                             and not hasattr(graph, "csr_by_dst")):
            if graph is not None:  # a PyG Data: its tensors, where they are
                given = {**{n: graph[n] for n in model.input_types if n not in given and n in graph}, **given}
                for name in input_sets:
                    if f"{name}_index" in graph:
                        given.setdefault(f"{name}_index", graph[f"{name}_index"])
                given.setdefault("edge_index", graph.edge_index)
                if getattr(graph, "batch", None) is not None:
                    given.setdefault("batch", graph.batch)
                given.setdefault("num_nodes", graph.num_nodes)
            if "edge_index" not in given and model.ir.node_types:  # a typed graph of tensors: no own edges
                given["edge_index"] = torch.zeros((2, 0), dtype=torch.int64, device=device)
            if "edge_index" not in given:
                raise InputError(f"'{model.name}' needs a graph: pass one (module(graph)) or its tensors",
                                 "e.g. module(x=x, edge_index=edge_index)")
            edge_index = self._index_tensor("edge_index", given.pop("edge_index"), device)
            if edge_index.ndim != 2 or edge_index.shape[0] != 2:
                raise InputError(f"edge_index has shape {list(edge_index.shape)}", "it needs shape [2, E]")
            batch_arg = given.pop("batch", None) if "batch" not in model.input_types else given.get("batch")
            num_nodes, num_graphs = given.pop("num_nodes", None), given.pop("num_graphs", None)
            structure = [edge_index]
            if batch_arg is not None:
                structure.append(self._index_tensor("batch", batch_arg, device))
            structure += [self._edge_set_tensor(name, given, device) for name in input_sets]
        else:
            source = as_graph(graph, model.memory_limit)
            check_edge_sets(model.ir, source)
            # tracing needs the graph as tensors; an eager call hands the op the Graph itself
            structure = _structure_tensors(source, device, input_sets) if torch.compiler.is_compiling() else []
            num_nodes, num_graphs = source.num_nodes, source.num_graphs
            type_counts = {t: source.num_type_nodes(t) for t in model.ir.node_types if t in source.node_types}
        tensors = self._input_tensors(given, source, device, dtype)
        for node_type in model.ir.node_types:
            if node_type not in type_counts:
                rows = [t.shape[0] for n, t in tensors.items() if model.input_types[n].space == Space(Domain.NODE,
                                                                                                      node_type)]
                if not rows:
                    raise InputError(f"'{model.name}' reads nodes of type {node_type}, but nothing gives their count",
                                     f"pass an input of type node<{node_type}>, or the graph (a HeteroData or a typed "
                                     "Graph)")
                type_counts[node_type] = rows[0]
        if num_nodes is None:
            rows = [t.shape[0] for n, t in tensors.items() if model.input_types[n].domain is Domain.NODE
                    and not model.input_types[n].rowset]
            num_nodes = rows[0] if rows else (int(structure[0].max()) + 1 if structure[0].numel() else 0)
        num_nodes = num_nodes if isinstance(num_nodes, torch.SymInt) else int(num_nodes)
        if num_graphs is None:
            if len(structure) - len(input_sets) > 1:
                if torch.compiler.is_exporting():
                    raise InputError("exporting needs the number of graphs of the batch",
                                     "pass num_graphs=... with the batch")
                num_graphs = int(structure[1].max()) + 1 if structure[1].numel() else 0
            else:
                num_graphs = 1
        sizes = self._sizes(source, structure, num_nodes, num_graphs, input_sets, type_counts)
        params = self._model_tensors()
        dims = self._bind(tensors, sizes, params)
        grad_inputs = tuple(n for n in model.input_types if n in given and isinstance(given[n], torch.Tensor)
                            and given[n].requires_grad and model.input_types[n].is_float)
        differentiable = torch.is_grad_enabled() and (any(p.requires_grad for p in params) or bool(grad_inputs))
        key = (tuple(sorted(dims.items())), dtype_name, self.training, grad_inputs)
        if key not in self._programs:
            self._programs[key] = self._build(dims, dtype_name, self.training, list(grad_inputs))
        programs = self._programs[key]
        model.check_run_memory(programs.forward, sizes, dims)  # the forward pass, before it allocates
        checked = tuple(n for n in model.input_types if n in given)
        spec, text = self._spec(key, programs, differentiable, checked, dims)
        self.__dict__["_last_spec"] = spec  # a plain attribute (torch.nn.Module.__setattr__ is slow)
        values = []
        for name, tensor in zip(model.param_types, params):
            if name in self._statistics:
                tensor = tensor.detach().clone()  # updated in place after the call: not the tensor the call saved
            values.append(tensor.to(dtype) if tensor.dtype != dtype else tensor)
        values += [tensors[n] for n in model.input_types]
        for _, t, p in programs.masks:
            values.append(self._mask(t, p, sizes, dims, dtype, device))
        set_rows = [sizes.edge_set_rows[s.name] for s in model.ir.edge_sets]
        set_rows += [sizes.num_type_nodes(t) for t in model.ir.node_types]
        return _Prepared(spec, text, structure, values, num_nodes, num_graphs, set_rows,
                         None if structure else source)

    def _sizes(self, source: Graph | None, structure: list[torch.Tensor], num_nodes: Any, num_graphs: Any,
               input_sets: tuple[str, ...], type_counts: Mapping[str, Any]) -> _Sizes:
        """The row counts of the call's graph: ``source`` (a Graph), or the graph of the structure
        tensors; a derived edge set's edges are counted on the host graph (remembered for the run)."""
        program = self.compiled.ir
        if source is not None:
            return _sizes_of(program, source, self.compiled.memory_limit)
        if any(s.kind != "input" for s in program.edge_sets):
            if torch.compiler.is_exporting():
                raise InputError(f"'{self.compiled.name}' runs on a derived edge set, whose size depends on the "
                                 "graph's values: torch.export cannot trace it",
                                 "run the module eagerly or under torch.compile")
            return _sizes_of(program, graph_of(structure, num_nodes, input_sets, dict(type_counts)),
                             self.compiled.memory_limit)
        _, _, sets = _split_structure(structure, input_sets)
        return _Sizes(num_nodes, structure[0].shape[1], num_graphs, {name: index.shape[1] for name, index in sets},
                      dict(type_counts))

    def _edge_set_tensor(self, name: str, given: dict[str, Any], device: torch.device) -> torch.Tensor:
        """The index of the input edge set ``name`` given as the tensor ``<name>_index``."""
        key = f"{edge_set_relation(name)}_index"
        name = edge_set_relation(name)
        if key not in given:
            raise InputError(f"'{self.compiled.name}' reads the edge set '{name}': pass its index as {key}=...",
                             f"e.g. module(x=x, edge_index=edge_index, {key}={key}) with {key} of shape [2, K]")
        index = self._index_tensor(key, given.pop(key), device)
        if index.ndim != 2 or index.shape[0] != 2:
            raise InputError(f"{key} has shape {list(index.shape)}", "it needs shape [2, K]")
        return index

    def _spec(self, key: tuple, programs: Programs, differentiable: bool, checked: tuple[str, ...],
              dims: dict[str, int]) -> tuple[RunSpec, str]:
        full = key + (differentiable, checked)
        if full not in self._specs:
            model = self.compiled
            names = (tuple(model.param_types) + tuple(model.input_types)
                     + tuple(name for name, _, _ in programs.masks))
            grad_inputs = key[3]
            wrt = tuple(n for n in model.param_types if n not in self._statistics) + tuple(grad_inputs)
            spec = RunSpec(model.backend.name, _backend_token(model.backend),
                           programs.train_forward if differentiable else programs.forward,
                           programs.backward if differentiable else None, names, tuple(programs.output_names),
                           tuple(programs.residuals) if differentiable else (),
                           tuple(n for n in model.param_types if n in self._statistics) if key[2] else (),
                           wrt if differentiable else (), checked, dict(dims),
                           model.layout if model.optimize else "none", model.context.target)
            text = spec.to_text()
            self._specs[full] = (_SPECS.setdefault(text, spec), text)
        return self._specs[full]

    def _input_tensors(self, given: dict[str, Any], source: Graph | None, device: torch.device,
                       dtype: torch.dtype) -> dict[str, torch.Tensor]:
        model = self.compiled
        unknown = sorted(set(given) - set(model.input_types))
        if unknown:
            raise InputError(f"'{model.name}' has no input named {', '.join(unknown)}",
                             f"its inputs are: {', '.join(model.input_types) or 'none'}"
                             + ("; graph tensors: edge_index, batch, num_nodes, num_graphs" if source is None else ""))
        tensors = {}
        for name, t in model.input_types.items():
            if name in given:
                value = given[name]
                if not isinstance(value, torch.Tensor):
                    value = torch.as_tensor(np.asarray(value))
                if value.device != device:
                    raise InputError(f"input '{name}' is on {value.device} but the module is on {device}",
                                     f"move it with {name}.to({str(device)!r}), or the module with module.to(...)")
                if t.dtype == INT_DTYPE:
                    if not _holds_integers(value):
                        raise InputError(f"input '{name}' has dtype {value.dtype} but is declared int",
                                         f"pass integer ids ({name}.long())")
                    value = value.to(torch.int64)
                elif value.is_complex():
                    raise InputError(f"input '{name}' has dtype {value.dtype}", "features are real numbers")
                else:
                    value = value.to(dtype)
            elif source is not None and t.domain is Domain.NODE and t.rowset:
                if source.type_array(t.rowset, name) is None:
                    attr = name.removesuffix("_" + t.rowset)
                    raise InputError(f"model input '{name}' ({t}) is not given",
                                     f"pass {name}=... or give the node type {t.rowset} an array '{attr}'")
                value = _device_array(source, name, device, None if t.dtype == INT_DTYPE else dtype, t.rowset)
            elif source is not None and name in source:
                value = _device_array(source, name, device, None if t.dtype == INT_DTYPE else dtype)
            else:
                raise InputError(f"model input '{name}' ({t}) is not given",
                                 f"pass {name}=... or add an array '{name}' to the graph")
            tensors[name] = value
        return tensors

    def _bind(self, tensors: dict[str, torch.Tensor], sizes, params: list[torch.Tensor]) -> dict[str, int]:
        """The dims, bound from the shapes of the inputs and of the parameters (``params``, in the
        model's order), checked against their types; remembered per (shapes less the row axis, the
        model's dims): the row counts, checked at every call, bind no dim, so batches of different
        sizes share the answer."""
        model = self.compiled
        for name, value in tensors.items():
            t = model.input_types[name]
            check_input_rows(name, t, tuple(value.shape), sizes.rows(t))
        shapes = (tuple((n, tuple(t.shape[1:])) for n, t in tensors.items()),
                  tuple(tuple(p.shape) for p in params),
                  tuple(sorted(model.dims.items())))
        try:
            known = self._dims.get(shapes)
        except TypeError:  # symbolic sizes while tracing: not remembered
            return self._bind_checked(tensors)
        if known is None:
            if len(self._dims) >= 64:
                self._dims.clear()
            known = self._dims[shapes] = self._bind_checked(tensors)
        return dict(known)

    def _bind_checked(self, tensors: dict[str, torch.Tensor]) -> dict[str, int]:
        """``_bind``'s answer, computed (the row counts are checked by ``_bind``)."""
        model = self.compiled
        items = [_Array("input", name, f"the input {name}", model.input_types[name],
                        tuple(int(s) for s in value.shape[1:])) for name, value in tensors.items()]
        dims = dict(model.dims)
        sources = {k: "the parameters" for k in dims if k not in model.static_dims}
        origins = {k: "the current parameters" for k in dims if k not in model.static_dims}
        origins.update(model._dim_origins)
        model._bind_shapes(items, dims, InputError, sources, origins)
        model._check_bound_dims(dims, sources)
        for name, t in model.param_types.items():
            model._bind_shape(f"parameter '{name}'", t, tuple(getattr(self, name).shape), dims, InputError)
        return dims

    @staticmethod
    def _index_tensor(name: str, value: Any, device: torch.device) -> torch.Tensor:
        if not isinstance(value, torch.Tensor):
            value = torch.as_tensor(np.asarray(value))
        if not _holds_integers(value):
            raise InputError(f"{name} has dtype {value.dtype}", f"{name} holds integer node ids")
        if value.device != device:
            raise InputError(f"{name} is on {value.device} but the module is on {device}",
                             f"move it with {name}.to({str(device)!r})")
        return value if value.dtype == torch.int64 else value.to(torch.int64)

    def _build(self, dims: dict[str, int], dtype: str, training: bool, grad_inputs: list[str]) -> Programs:
        wrt = [name for name in self.compiled.param_types if name not in self._statistics]
        return self.compiled.context.training_programs(dims, dtype, training, grad_inputs, wrt)

    def programs(self, graph: Any = None, training: bool | None = None, **dims: int) -> Programs:
        """The programs run for ``graph`` (or ``dims``), for inspection."""
        model = self.compiled
        if graph is not None:
            dims = {**model.bind(as_graph(graph), {})[1], **dims}
        dims = {**model.dims, **dims}
        training = self.training if training is None else training
        return self._build(dims, TORCH_DTYPES[self._torch_dtype()], training, [])

    # ---- helpers -----------------------------------------------------------------------------

    def _model_tensors(self) -> list[torch.Tensor]:
        """The parameters and running statistics, in the model's parameter order (looked up in the
        module's tables: ``getattr`` on a torch module is a slow fallback)."""
        parameters, buffers = self._parameters, self._buffers
        found = [parameters[n] if n in parameters else buffers[n] for n in self.compiled.param_types]
        return cast(list[torch.Tensor], found)  # registered from arrays in __init__: never None

    def _device(self) -> torch.device:
        tensors = [*self._parameters.values(), *self._buffers.values()]
        devices = {t.device for t in tensors if t is not None}
        if len(devices) > 1:
            raise InputError(f"the parameters are on several devices ({', '.join(sorted(map(str, devices)))})",
                             "move the module to one device with module.to(...)")
        return next(iter(devices)) if devices else torch.device("cpu")

    def _torch_dtype(self) -> torch.dtype:
        dtypes = ({p.dtype for p in self._parameters.values() if p is not None}
                  or {b.dtype for b in self._buffers.values() if b is not None})
        if not dtypes:
            return DTYPES_OF["f64" if self.compiled.float_dtype == np.float64 else "f32"]
        if len(dtypes) > 1 or next(iter(dtypes)) not in TORCH_DTYPES:
            raise InputError(f"the parameters have dtypes {sorted(map(str, dtypes))}",
                             "use one float dtype for all of them (module.float(), .double(), .half())")
        return next(iter(dtypes))

    def _compute_dtype(self, device: torch.device) -> torch.dtype:
        """The parameters' dtype, or the autocast dtype where autocast is on for ``device``."""
        dtype = self._torch_dtype()
        if dtype in (torch.float32, torch.float16, torch.bfloat16) and torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return dtype

    @staticmethod
    def _mask(t: TensorType, p: float, sizes, dims, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        keep = torch.rand(value_shape(t, sizes, dims), dtype=torch.float64, device=device) >= p
        return keep.to(dtype) * (1.0 / (1.0 - p) if p < 1 else 0.0)

    # ---- weights -----------------------------------------------------------------------------

    def weights(self) -> dict[str, np.ndarray]:
        """The current parameters and running statistics as NumPy arrays (copies), named and ordered as
        in the .mp file."""
        return {n: getattr(self, n).detach().cpu().numpy().copy() for n in self.compiled.param_types}

    def sync(self) -> CompiledModel:
        """Write the current parameters into the compiled model (in its dtype) and return it."""
        return self.compiled.load_weights(self.weights())

    def extra_repr(self) -> str:
        return f"model={self.compiled.name!r}, backend={self.compiled.backend.name!r}"


def _hetero_tensors(model: CompiledModel, data: Any, given: Mapping[str, Any],
                    input_sets: tuple[str, ...]) -> dict[str, Any]:
    """The tensors a typed model reads from a PyG ``HeteroData``, where they are (gradients flow to them):
    each node<T> input ``x_T`` (or ``x``) from ``data[T]``, each typed edge set's index from its edge type
    (named as ``Graph.from_pyg`` names it), and the node counts (``num_type_nodes``)."""
    relations = [rel for _, rel, _ in data.edge_types]
    found: dict[str, Any] = {"num_type_nodes": {}}
    for node_type in model.ir.node_types:
        if node_type not in data.node_types:
            raise InputError(f"'{model.name}' reads nodes of type {node_type}, which the HeteroData lacks "
                             f"(its node types: {', '.join(data.node_types) or 'none'})",
                             f"give it data['{node_type}'] with its nodes' arrays")
        found["num_type_nodes"][node_type] = int(data[node_type].num_nodes or 0)
    for name, t in model.input_types.items():
        if name in given or t.domain is not Domain.NODE or not t.rowset:
            continue
        store = data[t.rowset]
        attr = name if name in store else name.removesuffix("_" + t.rowset)
        if attr in store:
            found[name] = store[attr]
    for set_name in input_sets:
        relation = edge_set_relation(set_name)
        src, dst = edge_set_ends(set_name)
        matches = [et for et in data.edge_types
                   if (et[1] if relations.count(et[1]) == 1 else "__".join(et)) == relation]
        if not matches:
            raise InputError(f"'{model.name}' reads the edge set '{relation}' from {src} to {dst}, which the "
                             "HeteroData lacks", f"give it data['{src}', '{relation}', '{dst}'].edge_index (a "
                             f"relation whose name is not unique is named {src}__{relation}__{dst})")
        if matches[0] != (src, matches[0][1], dst):
            raise InputError(f"'{model.name}' reads the edge set '{relation}' from {src} to {dst}, but the "
                             f"HeteroData's runs from {matches[0][0]} to {matches[0][2]}",
                             "declare it as the data has it")
        found[f"{relation}_index"] = data[matches[0]].edge_index
    return found


def to_torch(model: CompiledModel, graph: Any = None, **dims: int) -> MpdslModule:
    """A trainable torch module running ``model`` (see ``MpdslModule``). Parameters whose shapes are
    bound from the inputs need a ``graph`` (or the dims) unless the model has been run already."""
    return MpdslModule(model, graph, **dims)


__all__ = ["MpdslModule", "Programs", "RunSpec", "call_run", "read_spec", "run_backward", "run_backward_op",
           "run_forward", "run_op", "to_torch"]
