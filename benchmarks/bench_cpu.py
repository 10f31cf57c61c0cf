"""CPU benchmark: mpdsl (NumPy/SciPy backend) against PyTorch Geometric in the same run.

    python benchmarks/bench_cpu.py [--nodes 100000] [--edges 1000000] [--features 64] [--repeats 7]
                                   [--results benchmarks/RESULTS.md]

Graphs (seeded): a uniform random graph, and a block-community graph (communities of 100 nodes,
90% of edges inside a community) whose node ids are shuffled. Models: one layer each of GCN,
SAGE-mean, GIN (2-layer MLP) and GAT (8 heads x 8), the same weights in every system; outputs are
checked against each other. Each measurement runs in its own process: the median of ``repeats``
forward passes after ``warmup`` more (the first builds caches: CSR, node order, PyG's normalised adjacency;
the next few still grow the process heap), and the peak resident memory the forward passes add; ``rounds``
processes per system, interleaved with the other systems', give the median over all their passes.
GB/s is the minimum traffic of the aggregation (CSR index + features read once + output written
once) over the median time, beside the machine's measured copy bandwidth.
This is a benchmark, not a test: it asserts nothing but agreement of the outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MODELS = ("gcn", "sage", "gin", "gat")
HEADS, CHANNELS = 8, 8


# ---- graphs -----------------------------------------------------------------------------------

def make_graph(kind: str, nodes: int, edges: int, features: int, seed: int = 0):
    """A simple directed graph (no self loops, no repeated edges: PyG's GCN self-loop handling and its
    CSR path's duplicate coalescing then agree with the edge list) with ``edges`` edges in random order."""
    rng = np.random.default_rng(seed)
    drawn = int(edges * 1.05) + 16
    src = rng.integers(0, nodes, drawn)
    if kind == "uniform":
        dst = rng.integers(0, nodes, drawn)
    else:
        size = 100
        inside = rng.random(drawn) < 0.9
        dst = np.where(inside, src // size * size + rng.integers(0, size, drawn), rng.integers(0, nodes, drawn))
        dst = np.minimum(dst, nodes - 1)
        shuffle = rng.permutation(nodes)
        src, dst = shuffle[src], shuffle[dst]
    keep = src != dst
    src, dst = src[keep], dst[keep]
    _, first = np.unique(src * nodes + dst, return_index=True)
    first = np.sort(first)[:edges]
    x = rng.normal(size=(nodes, features)).astype(np.float32)
    return np.stack([src[first], dst[first]]).astype(np.int64), x


# ---- child: one measurement -------------------------------------------------------------------

def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _mpdsl_model(name: str, features: int):
    import mpdsl
    source = (HERE / "models" / f"{name}.mp").read_text()
    header = f"dim H = {HEADS}\ndim C = {CHANNELS}\n" if name == "gat" else f"dim K = {features}\n"
    model = mpdsl.compile(header + source)
    model.init(seed=0, F=features)
    rng = np.random.default_rng(1)
    for key, value in model.params.items():  # non-zero biases and eps, so that they are compared too
        if value.ndim <= 1:
            model.params[key] = (0.1 * rng.normal(size=value.shape)).astype(np.float32)
    return model


def _pyg_layer(name: str, params: dict, features: int):
    import torch
    from torch_geometric.nn import GATConv, GCNConv, GINConv, SAGEConv

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a))

    with torch.no_grad():
        if name == "gcn":
            layer = GCNConv(features, features, cached=True)
            layer.lin.weight.copy_(t(params["W"].T))
            layer.bias.copy_(t(params["b"]))
        elif name == "sage":
            layer = SAGEConv(features, features, aggr="mean")
            layer.lin_l.weight.copy_(t(params["W_n"].T))
            layer.lin_l.bias.copy_(t(params["b"]))
            layer.lin_r.weight.copy_(t(params["W_s"].T))
        elif name == "gin":
            mlp = torch.nn.Sequential(torch.nn.Linear(features, features), torch.nn.ReLU(),
                                      torch.nn.Linear(features, features))
            layer = GINConv(mlp, train_eps=True)
            mlp[0].weight.copy_(t(params["W1"].T))
            mlp[0].bias.copy_(t(params["b1"]))
            mlp[2].weight.copy_(t(params["W2"].T))
            mlp[2].bias.copy_(t(params["b2"]))
            layer.eps.copy_(t(params["eps"].reshape(1)))
        else:
            layer = GATConv(features, CHANNELS, heads=HEADS, add_self_loops=False)
            layer.lin.weight.copy_(t(params["W"].reshape(features, -1).T))
            layer.att_src.copy_(t(params["a_src"][None]))
            layer.att_dst.copy_(t(params["a_dst"][None]))
            layer.bias.copy_(t(params["b"]))
    return layer.eval()


def child(args: argparse.Namespace) -> None:
    data = np.load(args.graph_file)
    edge_index, x = data["edge_index"], data["x"]
    model = _mpdsl_model(args.model, x.shape[1])
    if args.system.startswith("mpdsl"):
        import mpdsl
        model.layout = "none" if args.system == "mpdsl-no-reorder" else "auto"
        graph = mpdsl.Graph.from_arrays(edge_index, x.shape[0], x=x)
        for _ in range(args.warmup):  # the first builds the CSR and the node order (cached per graph)
            model(graph)

        def forward():
            return model(graph)
    else:
        import torch
        torch.set_num_threads(os.cpu_count() or 1)
        layer = _pyg_layer(args.model, model.params, x.shape[1])
        xt = torch.from_numpy(x)
        ei = torch.from_numpy(edge_index)
        if args.system == "pyg-csr":
            from torch_geometric.utils import to_torch_csr_tensor
            # adj_t[i, j] = 1 for an edge j -> i: PyG's transposed-adjacency convention.
            adj = to_torch_csr_tensor(ei.flip(0), size=(x.shape[0], x.shape[0]))
            graph_arg = adj
        else:
            graph_arg = ei
        with torch.no_grad():
            for _ in range(args.warmup):  # the first caches GCN's normalised adjacency
                layer(xt, graph_arg)

        def forward():
            with torch.no_grad():
                return layer(xt, graph_arg).numpy()
    _reset_peak()
    baseline = _rss_mb("VmRSS")
    if args.system.startswith("mpdsl"):  # the buffers kept between passes are the passes' memory
        baseline -= model.backend.pool.held_bytes / 2 ** 20
    times = []
    out = None
    for _ in range(args.repeats):
        start = time.perf_counter()
        out = forward()
        times.append(time.perf_counter() - start)
    peak = _rss_mb("VmHWM") - baseline
    np.save(args.out_file, np.asarray(out, dtype=np.float32))
    print(json.dumps({"times": times, "median_ms": 1e3 * float(np.median(times)), "peak_mb": peak}))


# ---- parent -----------------------------------------------------------------------------------

def copy_bandwidth() -> float:
    a = np.ones(64 << 20, dtype=np.float32)
    b = np.empty_like(a)
    times = []
    for _ in range(7):
        start = time.perf_counter()
        np.copyto(b, a)
        times.append(time.perf_counter() - start)
    return 2 * a.nbytes / float(np.median(times)) / 1e9


def rel_diff(out: np.ndarray, reference: np.ndarray) -> float:
    """The largest difference from ``reference`` relative to its largest magnitude."""
    return float(np.abs(out - reference).max() / max(1e-12, np.abs(reference).max()))


def min_bytes(model: str, nodes: int, edges: int, features: int) -> int:
    index = 4 * edges + 4 * (nodes + 1)
    width = HEADS * CHANNELS if model == "gat" else features
    extra = 2 * 4 * edges * HEADS if model == "gat" else 0  # attention scores read and weights used
    return index + 4 * nodes * width * 2 + extra


def aggregation_times(nodes: int, edges: int, features: int, repeats: int = 15) -> dict[str, float]:
    """Median ms of the graph ops alone (in this process, after one untimed call): the sum g-SpMM on
    the uniform graph, and on the community graph with the given ids and relabelled by the layout's
    community order; GAT's attention (8 x 8 heads) on the community graph both ways."""
    import mpdsl
    from mpdsl.backends.numpy_backend import BLAS, PullCSR
    from mpdsl.plan import community_order, inverse_permutation

    def median_ms(call) -> float:
        call()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return 1e3 * float(np.median(times))

    def pull(edge_index: np.ndarray, count: int) -> PullCSR:
        graph = mpdsl.Graph.from_arrays(edge_index, count)
        return PullCSR(*graph.csr_by_dst(), graph.src, count)

    buffers: dict = {}

    def reused(shape, dtype) -> np.ndarray:  # as the backend's pool does from the second run on
        return buffers.setdefault((shape, np.dtype(dtype).str), np.empty(shape, dtype))

    result = {}
    rng = np.random.default_rng(2)
    with BLAS.limited(1):
        for kind in ("uniform", "community"):
            edge_index, x = make_graph(kind, nodes, edges, features)
            scores = rng.normal(size=(edge_index.shape[1], HEADS)).astype(np.float32)
            z = rng.normal(size=(nodes, HEADS * CHANNELS)).astype(np.float32)
            layouts = {"given ids": (edge_index, x, z)}
            if kind == "community":
                perm = community_order(edge_index[0], edge_index[1], nodes)
                layouts["relabelled"] = (inverse_permutation(perm)[edge_index], x[perm], z[perm])
            for label, (ei, xs, zs) in layouts.items():
                csr = pull(ei, nodes)
                result[f"sum g-SpMM, {kind} graph, {label}"] = median_ms(lambda: csr.spmm(xs, empty=reused))
                if kind == "community":
                    ordered = csr.ordered(scores)
                    result[f"GAT attention, {kind} graph, {label}"] = median_ms(lambda: csr.attention(ordered, zs, empty=reused))
    return result


def compile_times() -> dict[str, float]:
    import mpdsl
    result = {}
    for path in sorted((HERE.parent / "examples").glob("*.mp")):
        mpdsl.compile(path)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            mpdsl.compile(path)
            times.append(time.perf_counter() - start)
        result[path.stem] = 1e3 * float(np.median(times))
    return result


def run_child(system: str, model: str, graph_file: Path, repeats: int, warmup: int, workdir: Path) -> dict:
    out_file = workdir / f"{system}-{model}-{graph_file.stem}.npy"
    proc = subprocess.run([sys.executable, __file__, "--child", "--system", system, "--model", model,
                           "--graph-file", str(graph_file), "--repeats", str(repeats), "--warmup", str(warmup),
                           "--out-file", str(out_file)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["out_file"] = str(out_file)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=100_000)
    parser.add_argument("--edges", type=int, default=1_000_000)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="forward passes per process")
    parser.add_argument("--rounds", type=int, default=3, help="processes per system, interleaved")
    parser.add_argument("--warmup", type=int, default=3, help="untimed forward passes per process first")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--results", help="write the markdown table to this file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--system", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--graph-file", help=argparse.SUPPRESS)
    parser.add_argument("--out-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    import torch_geometric
    bandwidth = copy_bandwidth()
    lines = []

    def emit(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    command = "python benchmarks/bench_cpu.py " + " ".join(a for a in sys.argv[1:])
    emit(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
         f"numpy {np.__version__}, torch-geometric {torch_geometric.__version__}; copy bandwidth {bandwidth:.1f} GB/s")
    emit(f"graphs: {args.nodes} nodes, {args.edges} edges, {args.features} features (float32); median of "
         f"{args.rounds} x {args.repeats} forward passes (each process runs {args.warmup} untimed first; rounds "
         "interleave systems)")
    emit()
    emit("| graph | model | system | median ms | vs PyG default | vs PyG CSR | GB/s (min traffic) | peak MB | max rel. diff |")
    emit("|---|---|---|---:|---:|---:|---:|---:|---:|")
    reorder_ratios: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for kind in ("uniform", "community"):
            edge_index, x = make_graph(kind, args.nodes, args.edges, args.features)
            graph_file = workdir / f"{kind}.npz"
            np.savez(graph_file, edge_index=edge_index, x=x)
            for model in args.models.split(","):
                systems = ["mpdsl"] + (["mpdsl-no-reorder"] if kind == "community" else []) + ["pyg-default"] + \
                          (["pyg-csr"] if model != "gat" else [])
                # Rounds interleave the systems, so that a slow spell of the machine hits all of them alike;
                # the median is over every forward pass of every round.
                results: dict[str, dict] = {}
                for _ in range(args.rounds):
                    for system in systems:
                        r = run_child(system, model, graph_file, args.repeats, args.warmup, workdir)
                        merged = results.setdefault(system, {"times": [], "peak_mb": 0.0})
                        if "error" in r:
                            results[system] = r
                            continue
                        if "error" not in merged:
                            merged["times"] += r["times"]
                            merged["peak_mb"] = max(merged["peak_mb"], r["peak_mb"])
                            merged["out_file"] = r["out_file"]
                for r in results.values():
                    if "error" not in r:
                        r["median_ms"] = 1e3 * float(np.median(r["times"]))
                reference = results.get("pyg-default", {})
                ref_out = np.load(reference["out_file"]) if "out_file" in reference else None
                for system in systems:
                    r = results[system]
                    if "error" in r:
                        emit(f"| {kind} | {model} | {system} | error: {r['error']} | | | | | |")
                        continue
                    out = np.load(r["out_file"])
                    diff = rel_diff(out, ref_out) if ref_out is not None else float("nan")
                    ms = r["median_ms"]
                    vs_default = reference["median_ms"] / ms if "median_ms" in reference else float("nan")
                    csr = results.get("pyg-csr", {})
                    vs_csr = f"{csr['median_ms'] / ms:.2f}x" if "median_ms" in csr else "-"
                    gbs = min_bytes(model, args.nodes, args.edges, args.features) / (ms / 1e3) / 1e9
                    emit(f"| {kind} | {model} | {system} | {ms:.1f} | {vs_default:.2f}x | {vs_csr} | {gbs:.1f} | "
                         f"{r['peak_mb']:.0f} | {diff:.1e} |")
                if kind == "community" and "mpdsl-no-reorder" in results and "median_ms" in results["mpdsl"]:
                    reorder_ratios[model] = results["mpdsl-no-reorder"]["median_ms"] / results["mpdsl"]["median_ms"]
    emit()
    if reorder_ratios:
        emit("reordering on the community graph, whole layer (mpdsl-no-reorder median / mpdsl median): " +
             ", ".join(f"{k} {v:.2f}x" for k, v in reorder_ratios.items()))
        emit()
    emit("graph ops alone (mpdsl, in one process, median of 15 calls, ms):")
    pieces = aggregation_times(args.nodes, args.edges, args.features)
    for name, ms in pieces.items():
        emit(f"- {name}: {ms:.1f}")
    for op in ("sum g-SpMM", "GAT attention"):
        given, relabelled = pieces.get(f"{op}, community graph, given ids"), pieces.get(f"{op}, community graph, relabelled")
        if given and relabelled:
            emit(f"- {op} on the community graph, given ids / relabelled: {given / relabelled:.2f}x")
    emit()
    times = compile_times()
    emit("compile (parse, check, lower, optimize) per example, median of 5, ms: " +
         ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
    if args.results:
        Path(args.results).write_text("\n".join(lines) + "\n")
        print(f"(also written to {args.results}; command: {command})")


if __name__ == "__main__":
    main()
