"""GPU benchmark: mpdsl's Triton backend against PyTorch Geometric on CUDA and ``torch.sparse.mm``.

    python benchmarks/bench_gpu.py [--nodes 100000] [--edges 1000000] [--features 64] [--repeats 20]
                                   [--models gcn,sage,gin,gat] [--results benchmarks/RESULTS_GPU.md]
    TRITON_INTERPRET=1 python benchmarks/bench_gpu.py --smoke     # the whole script on a tiny graph

Graphs and models are those of ``bench_cpu.py`` (uniform and shuffled-community graphs; one layer of
GCN, SAGE-mean, GIN, GAT 8 x 8 with the same weights in every system). Three tables:

* whole layers: mpdsl (CSR kernels, and the COO + atomics variant) vs PyG with ``edge_index`` and
  with a CSR adjacency; outputs are compared with PyG's;
* the torch module: ``model.to_torch(graph).to(device)`` of the model compiled for the Triton backend,
  a forward (``module(graph)`` under ``torch.no_grad()``) and a training step (``out = module(graph)``,
  ``loss = (out ** 2).sum()``, ``loss.backward()``; no optimizer) against the same calls of PyG's layer
  with the same weights on the device; the module's output and the gradient of its first weight are
  compared with PyG's. A system that fails (an exception) gets an error row and the script goes on;
* the aggregation alone, out_i = sum over edges j -> i of x_j: mpdsl's generated g-SpMM kernel vs
  ``torch.sparse.mm`` on the CSR adjacency, with a roofline: the minimum traffic (CSR index, x read
  once, out written once) over the median time, against the device's measured copy bandwidth.

Times are medians over ``repeats`` runs of CUDA-event intervals after warm-up runs; the whole-layer
mpdsl numbers time ``TritonBackend.run_tensors`` on device-resident inputs and parameters (no host
copies); the torch-module numbers time the module as a user calls it (whatever it copies).
Without a CUDA device (or without torch / triton) it says so and exits with status 0.

``--smoke`` runs every part on a 200-node graph (2 repeats) on the CUDA device if there is one, else
on the CPU with Triton's interpreter (it sets TRITON_INTERPRET=1 itself if unset, before any kernel is
defined) and ``time.perf_counter`` for the times: the figures are then meaningless, it only shows that
the script runs. Parts that need PyG are skipped without it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_cpu import (  # noqa: E402
    CHANNELS,
    HEADS,
    MODELS,
    _mpdsl_model,
    _pyg_layer,
    make_graph,
    min_bytes,
    rel_diff,
)

DEVICE = "cuda"  # "cpu" in a smoke run without CUDA
WARMUP = 3
# The first weight of each model, as (mpdsl parameter, PyG's tensor of it): the gradients compared.
FIRST_WEIGHT = {"gcn": ("W", lambda layer: layer.lin.weight), "sage": ("W_n", lambda layer: layer.lin_l.weight),
                "gin": ("W1", lambda layer: layer.nn[0].weight), "gat": ("W", lambda layer: layer.lin.weight)}


def _cuda(smoke: bool = False):
    try:
        import torch
    except ImportError as err:
        return None, f"needs torch and triton ({err.name} is not installed)"
    global DEVICE
    if not torch.cuda.is_available():
        if not smoke:
            return None, "no CUDA device"
        DEVICE = "cpu"
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's kernels are defined
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return None, f"needs torch and triton ({err.name} is not installed)"
    return torch, ""


def _pyg():
    try:
        import torch_geometric
    except ImportError:
        return None
    return torch_geometric


def cuda_median(torch, fn, repeats: int, warmup: int | None = None) -> float:
    """Median milliseconds of ``fn`` between CUDA events (``time.perf_counter`` on the CPU)."""
    for _ in range(WARMUP if warmup is None else warmup):
        fn()
    if DEVICE == "cpu":
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
        return float(np.median(times))
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def device_bandwidth(torch, megabytes: int = 1024) -> float:
    """GB/s of a device-to-device copy (bytes read + bytes written over the median time)."""
    a = torch.ones(megabytes << 18, dtype=torch.float32, device=DEVICE)
    b = torch.empty_like(a)
    ms = cuda_median(torch, lambda: b.copy_(a), 20)
    return 2 * a.numel() * 4 / (ms / 1e3) / 1e9


def mpdsl_runner(torch, model, graph, layout: str | None):
    """A closure running the optimized program on device tensors, and a function giving its output in
    the original node order."""
    from mpdsl.backends.triton_backend import TritonBackend
    from mpdsl.runtime import CompiledModel

    backend = TritonBackend(device=DEVICE, interpret=None, layout=layout)
    model = CompiledModel(model.ir, backend).load_weights(model.params)  # the GPU target's programs
    arrays, dims = model.bind(graph, {})
    program = model.optimized_for(dims)[0]
    plan = model.context.choose_layout(graph, program)
    laid_out, arrays = plan.apply(graph, arrays, model.input_types) if plan is not None else (graph, arrays)
    inputs = {k: torch.from_numpy(np.array(v)).to(DEVICE) for k, v in arrays.items()}
    params = {k: torch.from_numpy(np.array(v)).to(DEVICE) for k, v in model.params.items()}

    def run():
        return backend.run_tensors(program, laid_out, inputs, params, dims)

    def output() -> np.ndarray:
        outs = {k: v.cpu().numpy() for k, v in run().items()}
        if plan is not None:
            outs = plan.restore(outs, {name: v.type for name, v in program.outputs})
        return outs["out"]

    return run, output


def layer_rows(torch, args, kind: str, edge_index, x, emit) -> None:
    from torch_geometric.utils import to_torch_csr_tensor

    import mpdsl

    graph = mpdsl.Graph.from_arrays(edge_index, x.shape[0], x=x)
    xt = torch.from_numpy(x).to(DEVICE)
    ei = torch.from_numpy(edge_index).to(DEVICE)
    adj = to_torch_csr_tensor(ei.flip(0), size=(x.shape[0], x.shape[0]))
    for name in args.models.split(","):
        model = _mpdsl_model(name, x.shape[1])
        layer = _pyg_layer(name, model.params, x.shape[1]).to(DEVICE)
        with torch.no_grad():
            reference = layer(xt, ei).cpu().numpy()
        systems = {}
        for system, layout in (("mpdsl-triton", None), ("mpdsl-triton-coo", "coo")):
            run, output = mpdsl_runner(torch, model, graph, layout)
            out = output()
            systems[system] = (cuda_median(torch, run, args.repeats), out)

        def pyg(graph_arg, layer=layer):
            with torch.no_grad():
                return layer(xt, graph_arg)

        systems["pyg"] = (cuda_median(torch, lambda: pyg(ei), args.repeats), reference)
        if name != "gat":
            systems["pyg-csr"] = (cuda_median(torch, lambda: pyg(adj), args.repeats), pyg(adj).cpu().numpy())
        base = systems["pyg"][0]
        for system, (ms, out) in systems.items():
            diff = rel_diff(out, reference)
            gbs = min_bytes(name, x.shape[0], edge_index.shape[1], x.shape[1]) / (ms / 1e3) / 1e9
            emit(f"| {kind} | {name} | {system} | {ms:.3f} | {base / ms:.2f}x | {gbs:.0f} | {diff:.1e} |")


def _error(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:160].replace("|", "/")


def training_rows(torch, args, kind: str, edge_index, x, emit) -> None:
    """The torch module on the device (forward, training step) against PyG's layer with the same weights."""
    import mpdsl

    graph = mpdsl.Graph.from_arrays(edge_index, x.shape[0], x=x)
    xt = torch.from_numpy(x).to(DEVICE)
    ei = torch.from_numpy(edge_index).to(DEVICE)
    for name in args.models.split(","):
        reference_model = _mpdsl_model(name, x.shape[1])
        header = f"dim H = {HEADS}\ndim C = {CHANNELS}\n" if name == "gat" else f"dim K = {x.shape[1]}\n"
        layer = _pyg_layer(name, reference_model.params, x.shape[1]).to(DEVICE).train()
        param_name, pyg_weight = FIRST_WEIGHT[name]

        def pyg_forward(layer=layer):
            with torch.no_grad():
                return layer(xt, ei)

        def pyg_step(layer=layer):
            (layer(xt, ei) ** 2).sum().backward()

        reference = pyg_forward().cpu().numpy()
        layer.zero_grad()
        pyg_step()
        reference_grad = np.array(pyg_weight(layer).grad.detach().cpu())  # a copy: later steps add to .grad
        rows: dict[str, tuple] = {}
        try:
            model = mpdsl.compile(header + (HERE / "models" / f"{name}.mp").read_text(), backend="triton")
            model.load_weights(reference_model.params)
            module = model.to_torch(graph).to(DEVICE).train()

            def forward(module=module):
                with torch.no_grad():
                    return module(graph)

            def step(module=module):
                (module(graph) ** 2).sum().backward()

            out = np.array(forward().detach().cpu())
            module.zero_grad()
            step()
            grad = np.array(getattr(module, param_name).grad.detach().cpu())
            grad = grad.reshape(grad.shape[0], -1).T  # [in, out...] -> PyG's [out, in]
            rows["mpdsl torch module"] = (cuda_median(torch, forward, args.repeats),
                                          cuda_median(torch, step, args.repeats),
                                          rel_diff(out, reference), rel_diff(grad, reference_grad))
        except Exception as err:  # e.g. a module that does not run on this device yet: a row, not a crash
            rows["mpdsl torch module"] = (_error(err),)
        rows["pyg"] = (cuda_median(torch, pyg_forward, args.repeats), cuda_median(torch, pyg_step, args.repeats),
                       0.0, 0.0)
        base = rows["pyg"]
        for system, row in rows.items():
            if len(row) == 1:
                emit(f"| {kind} | {name} | {system} | error: {row[0]} | | | | | |")
                continue
            fwd, stp, diff, grad_diff = row
            emit(f"| {kind} | {name} | {system} | {fwd:.3f} | {base[0] / fwd:.2f}x | {stp:.3f} | {base[1] / stp:.2f}x "
                 f"| {diff:.1e} | {grad_diff:.1e} |")


def csr_adjacency(torch, edge_index, nodes: int):
    """adj[i, j] = 1 for an edge j -> i, as a torch sparse CSR tensor on the device (PyG's
    ``to_torch_csr_tensor`` where PyG is installed, else torch's own COO -> CSR conversion)."""
    ei = torch.from_numpy(edge_index).to(DEVICE).flip(0)
    if _pyg() is not None:
        from torch_geometric.utils import to_torch_csr_tensor
        return to_torch_csr_tensor(ei, size=(nodes, nodes))
    values = torch.ones(ei.shape[1], dtype=torch.float32, device=DEVICE)
    return torch.sparse_coo_tensor(ei, values, (nodes, nodes)).coalesce().to_sparse_csr()


def aggregation_rows(torch, args, kind: str, edge_index, x, bandwidth: float, emit) -> None:
    import mpdsl

    nodes, edges, features = x.shape[0], edge_index.shape[1], x.shape[1]
    traffic = 4 * edges + 4 * (nodes + 1) + 2 * 4 * nodes * features
    model = mpdsl.compile("model agg(x: node[F]) -> node[F] { return sum(x[src]) by dst }")
    graph = mpdsl.Graph.from_arrays(edge_index, nodes, x=x)
    run, output = mpdsl_runner(torch, model, graph, None)
    adj = csr_adjacency(torch, edge_index, nodes)
    xt = torch.from_numpy(x).to(DEVICE)
    reference = torch.sparse.mm(adj, xt).cpu().numpy()
    rows = {"mpdsl g-SpMM (Triton)": (cuda_median(torch, run, args.repeats), output()),
            "torch.sparse.mm (CSR)": (cuda_median(torch, lambda: torch.sparse.mm(adj, xt), args.repeats), reference)}
    for system, (ms, out) in rows.items():
        gbs = traffic / (ms / 1e3) / 1e9
        diff = rel_diff(out, reference)
        emit(f"| {kind} | {system} | {ms:.3f} | {gbs:.0f} | {100 * gbs / bandwidth:.0f}% | {diff:.1e} |")


def main() -> int:
    global WARMUP
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=100_000)
    parser.add_argument("--edges", type=int, default=1_000_000)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--results", help="write the markdown tables to this file")
    parser.add_argument("--smoke", action="store_true",
                        help="every part on a 200-node graph, 2 repeats, on CUDA or else the CPU with Triton's "
                             "interpreter: shows the script runs (the times mean nothing on the CPU)")
    args = parser.parse_args()
    torch, why = _cuda(args.smoke)
    if torch is None:
        print(f"bench_gpu: {why}; nothing to measure (this benchmark needs an NVIDIA GPU)")
        return 0
    if args.smoke:
        args.nodes, args.edges, args.features, args.repeats = 200, 1000, 16, 2
        WARMUP = 1
    pyg = _pyg()

    lines: list[str] = []

    def emit(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    bandwidth = device_bandwidth(torch, 16 if args.smoke else 1024)
    where = torch.cuda.get_device_name() if DEVICE == "cuda" else \
        f"cpu (no CUDA; Triton interpreter: TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}; times meaningless)"
    emit(f"device: {where}; measured copy bandwidth {bandwidth:.0f} GB/s; torch "
         f"{torch.__version__}, torch-geometric {pyg.__version__ if pyg else 'not installed'}"
         + ("; smoke run" if args.smoke else ""))
    clock = "CUDA events" if DEVICE == "cuda" else "time.perf_counter"
    emit(f"graphs: {args.nodes} nodes, {args.edges} edges, {args.features} features (float32), GAT {HEADS} x "
         f"{CHANNELS}; median of {args.repeats} runs ({clock}) after {WARMUP} warm-up runs")
    graphs = {kind: make_graph(kind, args.nodes, args.edges, args.features) for kind in ("uniform", "community")}
    emit()
    if pyg is None:
        emit("whole layers and the torch module against PyG: skipped (torch_geometric is not installed)")
    else:
        emit("| graph | model | system | median ms | vs PyG | GB/s (min traffic) | max rel. diff vs PyG |")
        emit("|---|---|---|---:|---:|---:|---:|")
        for kind, (edge_index, x) in graphs.items():
            layer_rows(torch, args, kind, edge_index, x, emit)
        emit()
        emit(f"torch module (`model.to_torch(graph).to({DEVICE!r})`, Triton backend) against PyG's layer, same "
             "weights: forward under no_grad; training step = forward + (out ** 2).sum() + backward (no optimizer)")
        emit()
        emit("| graph | model | system | forward ms | vs PyG | step ms | vs PyG | max rel. diff (out) "
             "| max rel. diff (first weight's grad) |")
        emit("|---|---|---|---:|---:|---:|---:|---:|---:|")
        for kind, (edge_index, x) in graphs.items():
            training_rows(torch, args, kind, edge_index, x, emit)
    emit()
    emit(f"aggregation alone (sum over in-edges, {args.features} features); roofline = min traffic / time "
         f"vs {bandwidth:.0f} GB/s")
    emit()
    emit("| graph | system | median ms | GB/s | of roofline | max rel. diff |")
    emit("|---|---|---:|---:|---:|---:|")
    for kind, (edge_index, x) in graphs.items():
        aggregation_rows(torch, args, kind, edge_index, x, bandwidth, emit)
    if args.results:
        Path(args.results).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
