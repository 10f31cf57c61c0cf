"""GPU benchmark: mpdsl's Triton backend against PyTorch Geometric on CUDA and ``torch.sparse.mm``.

    python benchmarks/bench_gpu.py [--nodes 100000] [--edges 1000000] [--features 64] [--repeats 20]
                                   [--models gcn,sage,gin,gat] [--results benchmarks/RESULTS_GPU.md]

Graphs and models are those of ``bench_cpu.py`` (uniform and shuffled-community graphs; one layer of
GCN, SAGE-mean, GIN, GAT 8 x 8 with the same weights in every system). Two tables:

* whole layers: mpdsl (CSR kernels, and the COO + atomics variant) vs PyG with ``edge_index`` and
  with a CSR adjacency; outputs are compared with PyG's;
* the aggregation alone, out_i = sum over edges j -> i of x_j: mpdsl's generated g-SpMM kernel vs
  ``torch.sparse.mm`` on the CSR adjacency, with a roofline: the minimum traffic (CSR index, x read
  once, out written once) over the median time, against the device's measured copy bandwidth.

Times are medians over ``repeats`` runs of CUDA-event intervals after warm-up runs; the mpdsl numbers
time ``TritonBackend.run_tensors`` on device-resident inputs and parameters (no host copies).
Without a CUDA device (or without torch / triton) it says so and exits with status 0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_cpu import (CHANNELS, HEADS, MODELS, _mpdsl_model, _pyg_layer, make_graph, min_bytes,  # noqa: E402
                       rel_diff)


def _cuda():
    try:
        import torch
        import triton  # noqa: F401
    except ImportError as err:
        return None, f"needs torch and triton ({err.name} is not installed)"
    if not torch.cuda.is_available():
        return None, "no CUDA device"
    return torch, ""


def cuda_median(torch, fn, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn`` between CUDA events."""
    for _ in range(warmup):
        fn()
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
    a = torch.ones(megabytes << 18, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    ms = cuda_median(torch, lambda: b.copy_(a), 20)
    return 2 * a.numel() * 4 / (ms / 1e3) / 1e9


def mpdsl_runner(torch, model, graph, layout: str | None):
    """A closure running the optimized program on device tensors, and a function giving its output in
    the original node order."""
    from mpdsl.backends.triton_backend import TritonBackend
    from mpdsl.plan import choose_layout

    arrays, dims = model.bind(graph, {})
    program = model.optimized_for(dims)[0]
    plan = choose_layout(graph, program, "auto")
    laid_out, arrays = plan.apply(graph, arrays, model.input_types) if plan is not None else (graph, arrays)
    backend = TritonBackend(device="cuda", interpret=False, layout=layout)
    inputs = {k: torch.from_numpy(np.array(v)).cuda() for k, v in arrays.items()}
    params = {k: torch.from_numpy(np.array(v)).cuda() for k, v in model.params.items()}

    def run():
        return backend.run_tensors(program, laid_out, inputs, params, dims)

    def output() -> np.ndarray:
        outs = {k: v.cpu().numpy() for k, v in run().items()}
        if plan is not None:
            outs = plan.restore(outs, {name: v.type for name, v in program.outputs})
        return outs["out"]

    return run, output


def layer_rows(torch, args, kind: str, edge_index, x, emit) -> None:
    import mpdsl

    graph = mpdsl.Graph.from_arrays(edge_index, x.shape[0], x=x)
    xt = torch.from_numpy(x).cuda()
    ei = torch.from_numpy(edge_index).cuda()
    from torch_geometric.utils import to_torch_csr_tensor
    adj = to_torch_csr_tensor(ei.flip(0), size=(x.shape[0], x.shape[0]))
    for name in args.models.split(","):
        model = _mpdsl_model(name, x.shape[1])
        layer = _pyg_layer(name, model.params, x.shape[1]).cuda()
        with torch.no_grad():
            reference = layer(xt, ei).cpu().numpy()
        systems = {}
        for system, layout in (("mpdsl-triton", None), ("mpdsl-triton-coo", "coo")):
            run, output = mpdsl_runner(torch, model, graph, layout)
            out = output()
            systems[system] = (cuda_median(torch, run, args.repeats), out)

        def pyg(graph_arg):
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


def aggregation_rows(torch, args, kind: str, edge_index, x, bandwidth: float, emit) -> None:
    import mpdsl
    from torch_geometric.utils import to_torch_csr_tensor

    nodes, edges, features = x.shape[0], edge_index.shape[1], x.shape[1]
    traffic = 4 * edges + 4 * (nodes + 1) + 2 * 4 * nodes * features
    model = mpdsl.compile("model agg(x: node[F]) -> node[F] { return sum(x[src]) by dst }")
    graph = mpdsl.Graph.from_arrays(edge_index, nodes, x=x)
    run, output = mpdsl_runner(torch, model, graph, None)
    adj = to_torch_csr_tensor(torch.from_numpy(edge_index).cuda().flip(0), size=(nodes, nodes))
    xt = torch.from_numpy(x).cuda()
    reference = torch.sparse.mm(adj, xt).cpu().numpy()
    rows = {"mpdsl g-SpMM (Triton)": (cuda_median(torch, run, args.repeats), output()),
            "torch.sparse.mm (CSR)": (cuda_median(torch, lambda: torch.sparse.mm(adj, xt), args.repeats), reference)}
    for system, (ms, out) in rows.items():
        gbs = traffic / (ms / 1e3) / 1e9
        diff = rel_diff(out, reference)
        emit(f"| {kind} | {system} | {ms:.3f} | {gbs:.0f} | {100 * gbs / bandwidth:.0f}% | {diff:.1e} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=100_000)
    parser.add_argument("--edges", type=int, default=1_000_000)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--results", help="write the markdown tables to this file")
    args = parser.parse_args()
    torch, why = _cuda()
    if torch is None:
        print(f"bench_gpu: {why}; nothing to measure (this benchmark needs an NVIDIA GPU)")
        return 0
    import torch_geometric

    lines: list[str] = []

    def emit(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    bandwidth = device_bandwidth(torch)
    emit(f"device: {torch.cuda.get_device_name()}; measured copy bandwidth {bandwidth:.0f} GB/s; torch "
         f"{torch.__version__}, torch-geometric {torch_geometric.__version__}")
    emit(f"graphs: {args.nodes} nodes, {args.edges} edges, {args.features} features (float32), GAT {HEADS} x "
         f"{CHANNELS}; median of {args.repeats} runs (CUDA events) after warm-up")
    graphs = {kind: make_graph(kind, args.nodes, args.edges, args.features) for kind in ("uniform", "community")}
    emit()
    emit("| graph | model | system | median ms | vs PyG | GB/s (min traffic) | max rel. diff vs PyG |")
    emit("|---|---|---|---:|---:|---:|---:|")
    for kind, (edge_index, x) in graphs.items():
        layer_rows(torch, args, kind, edge_index, x, emit)
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
