"""CPU benchmark: mpdsl (NumPy/SciPy backend) against PyTorch Geometric in the same run.

    python benchmarks/bench_cpu.py [--nodes 100000] [--edges 1000000] [--features 64] [--repeats 5]
                                   [--rounds 3] [--warmup 3] [--modes forward,step]
                                   [--models gcn,sage,gin,gat] [--graphs uniform,community]
                                   [--no-pieces] [--results benchmarks/RESULTS.md]

Graphs (seeded): a uniform random graph, and a block-community graph (communities of 100 nodes,
90% of edges inside a community) whose node ids are shuffled. Models: one layer each of GCN,
SAGE-mean, GIN (2-layer MLP) and GAT (8 heads x 8), the same weights in every system.

Modes: ``forward`` (inference, no autograd) and ``step`` (a training step: forward, loss = sum of
squares of the output, backward; mpdsl through ``model.to_torch(graph)``, PyG the same layer with
the same weights). Outputs, and in ``step`` mode every parameter's gradient, are checked against
PyG's default path.

Each measurement runs in its own process: a first call (timed apart: for mpdsl, the first call on
a 64-node graph loads the compiled kernels from their cache, then the first call on the graph
builds its CSR index and layout and the first buffers), ``warmup`` untimed calls, then ``repeats``
timed calls, for which it records wall time, CPU time (all threads), the time its threads waited
for a core (``/proc/self/task/*/schedstat``: the share of the machine other processes took), minor
page faults, and the peak resident memory the calls add. ``rounds`` processes per system,
interleaved with the other systems', give the pooled median and the per-process medians; the
spread is the slowest process median over the fastest (by wall time, and by CPU time, which the
machine's load changes less). GB/s is the minimum traffic of the aggregation (CSR index + features
read once + output written once) over the median forward time, beside the machine's copy bandwidth.
Every child imports mpdsl (the weights come from the mpdsl model), so PyG's processes run with the
same glibc malloc thresholds as mpdsl's (``mpdsl.malloc_settings``: freed tensors reused, not faulted in
afresh at each step); only OpenMP's wait policy differs (torch is imported first in PyG's processes).
This is a benchmark, not a test: it asserts nothing but agreement of the results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MODELS = ("gcn", "sage", "gin", "gat")
GRAPHS = ("uniform", "community")
MODES = ("forward", "step")
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


def _pyg_grads(name: str, layer) -> dict[str, np.ndarray]:
    """The gradients of a PyG layer's parameters, by the names and layouts of the mpdsl model's."""
    def g(p) -> np.ndarray:
        return p.grad.detach().numpy()

    if name == "gcn":
        return {"W": g(layer.lin.weight).T, "b": g(layer.bias)}
    if name == "sage":
        return {"W_n": g(layer.lin_l.weight).T, "b": g(layer.lin_l.bias), "W_s": g(layer.lin_r.weight).T}
    if name == "gin":
        mlp = layer.nn
        return {"W1": g(mlp[0].weight).T, "b1": g(mlp[0].bias), "W2": g(mlp[2].weight).T, "b2": g(mlp[2].bias),
                "eps": g(layer.eps).reshape(())}
    weight = g(layer.lin.weight).T
    return {"W": weight.reshape(weight.shape[0], HEADS, CHANNELS), "a_src": g(layer.att_src)[0],
            "a_dst": g(layer.att_dst)[0], "b": g(layer.bias)}


class _Counters:
    """Process-wide counters read before and after each call: wall and CPU seconds, the seconds this
    process's threads waited for a core, minor page faults."""

    @staticmethod
    def read() -> np.ndarray:
        waited = 0
        for task in os.listdir("/proc/self/task"):
            try:
                waited += int(Path(f"/proc/self/task/{task}/schedstat").read_text().split()[1])
            except (OSError, IndexError, ValueError):  # a thread that just ended, or no schedstat
                pass
        return np.array([time.perf_counter(), time.process_time(), waited / 1e9,
                         resource.getrusage(resource.RUSAGE_SELF).ru_minflt])


def _timed(call) -> tuple[object, np.ndarray]:
    before = _Counters.read()
    result = call()
    return result, _Counters.read() - before


def child(args: argparse.Namespace) -> None:
    data = np.load(args.graph_file)
    edge_index, x = data["edge_index"], data["x"]
    features = x.shape[1]
    step = args.mode == "step"
    if not args.system.startswith("mpdsl"):
        import torch  # before mpdsl, which would otherwise set torch's OpenMP threads' wait policy
    model = _mpdsl_model(args.model, features)
    first: dict[str, float] = {}
    if step or not args.system.startswith("mpdsl"):  # a forward pass of mpdsl runs without torch
        import torch
        torch.set_num_threads(os.cpu_count() or 1)
    if args.system.startswith("mpdsl"):
        import mpdsl
        model.layout = "none" if args.system == "mpdsl-no-reorder" else "auto"
        graph = mpdsl.Graph.from_arrays(edge_index, x.shape[0], x=x)
        ring = np.arange(64)
        tiny = mpdsl.Graph.from_arrays(np.stack([ring, np.roll(ring, 1)]), 64, x=x[:64])
        if step:
            module = model.to_torch(graph)

            def call():
                module.zero_grad(set_to_none=True)
                out = module(graph)
                (out * out).sum().backward()
                return out

            def tiny_call():
                out = module(tiny)
                (out * out).sum().backward()

            def gradients() -> dict[str, np.ndarray]:
                return {n: p.grad.detach().numpy() for n, p in module.named_parameters()}
        else:
            def call():
                return model(graph)

            def tiny_call():
                model(tiny)
        _, cost = _timed(tiny_call)  # loads the compiled kernels (and builds the training programs)
        first["kernels ms"] = 1e3 * cost[0]
    else:
        layer = _pyg_layer(args.model, model.params, features)
        layer.train(step)
        xt = torch.from_numpy(x)
        ei = torch.from_numpy(edge_index)
        if args.system == "pyg-csr":
            from torch_geometric.utils import to_torch_csr_tensor
            # adj_t[i, j] = 1 for an edge j -> i: PyG's transposed-adjacency convention.
            graph_arg = to_torch_csr_tensor(ei.flip(0), size=(x.shape[0], x.shape[0]))
        else:
            graph_arg = ei
        if step:
            def call():
                layer.zero_grad(set_to_none=True)
                out = layer(xt, graph_arg)
                (out * out).sum().backward()
                return out

            def gradients() -> dict[str, np.ndarray]:
                return _pyg_grads(args.model, layer)
        else:
            def call():
                with torch.no_grad():
                    return layer(xt, graph_arg)
    _, cost = _timed(call)  # the first call on the graph: CSR index, layout, caches, first buffers
    first["first call ms"] = 1e3 * cost[0]
    for _ in range(args.warmup):
        call()
    _reset_peak()
    baseline = _rss_mb("VmRSS")
    if args.system.startswith("mpdsl"):  # the buffers kept between calls are the calls' memory
        baseline -= model.backend.pool.held_bytes / 2 ** 20
    rows = []
    out = None
    for _ in range(args.repeats):
        out, cost = _timed(call)
        rows.append(cost)
    peak = _rss_mb("VmHWM") - baseline
    out_array = out.detach().numpy() if hasattr(out, "detach") else np.asarray(out)
    results = {"out": np.asarray(out_array, dtype=np.float32)}
    if step:
        results.update({f"grad:{n}": np.asarray(a, dtype=np.float32) for n, a in gradients().items()})
    np.savez(args.out_file, **results)
    table = np.array(rows)
    print(json.dumps({"times": table[:, 0].tolist(), "cpu": table[:, 1].tolist(), "waited": table[:, 2].tolist(),
                      "faults": table[:, 3].tolist(), "peak_mb": peak, "first": first,
                      "threads": len(os.listdir("/proc/self/task")),
                      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default") if "torch" in sys.modules else "-"}))


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
    with BLAS.single_threaded():
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


def run_child(mode: str, system: str, model: str, graph_file: Path, args: argparse.Namespace, workdir: Path) -> dict:
    out_file = workdir / f"{mode}-{system}-{model}-{graph_file.stem}.npz"
    proc = subprocess.run([sys.executable, __file__, "--child", "--mode", mode, "--system", system, "--model", model,
                           "--graph-file", str(graph_file), "--repeats", str(args.repeats),
                           "--warmup", str(args.warmup), "--out-file", str(out_file)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["out_file"] = str(out_file)
    return result


def summarize(runs: list[dict]) -> dict:
    """Pooled and per-process figures of one system's processes (each a child's result)."""
    def per_process(key: str) -> list[float]:
        return [1e3 * float(np.median(r[key])) for r in runs]

    walls, cpus = per_process("times"), per_process("cpu")
    return {"median_ms": 1e3 * float(np.median(np.concatenate([r["times"] for r in runs]))),
            "process_ms": walls, "spread": max(walls) / min(walls),
            "cpu_ms": 1e3 * float(np.median(np.concatenate([r["cpu"] for r in runs]))),
            "cpu_spread": max(cpus) / min(cpus),
            "waited_ms": 1e3 * float(np.median(np.concatenate([r["waited"] for r in runs]))),
            "faults": float(np.median(np.concatenate([r["faults"] for r in runs]))),
            "peak_mb": max(r["peak_mb"] for r in runs),
            "first": {k: float(np.median([r["first"][k] for r in runs])) for k in runs[0]["first"]},
            "threads": max(r["threads"] for r in runs), "omp": runs[-1]["omp_wait_policy"],
            "out_file": runs[-1]["out_file"]}


def agreement(result: dict, reference: dict | None) -> tuple[str, str]:
    """The largest relative difference of the output, and of any gradient, from the reference's."""
    if reference is None:
        return "-", "-"
    mine, theirs = np.load(result["out_file"]), np.load(reference["out_file"])
    out = f"{rel_diff(mine['out'], theirs['out']):.1e}"
    grads = [k for k in theirs.files if k.startswith("grad:")]
    if not grads:
        return out, "-"
    missing = [k for k in grads if k not in mine.files]
    if missing:
        return out, f"missing {', '.join(missing)}"
    return out, f"{max(rel_diff(mine[k], theirs[k]) for k in grads):.1e}"


def systems_for(mode: str, kind: str, model: str) -> list[str]:
    reorder = ["mpdsl-no-reorder"] if kind == "community" else []
    return ["mpdsl"] + reorder + ["pyg-default"] + (["pyg-csr"] if model != "gat" else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=100_000)
    parser.add_argument("--edges", type=int, default=1_000_000)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per process")
    parser.add_argument("--rounds", type=int, default=3, help="processes per system, interleaved")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per process after the first")
    parser.add_argument("--modes", default=",".join(MODES), help="forward and/or step (training steps)")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--graphs", default=",".join(GRAPHS))
    parser.add_argument("--no-pieces", action="store_true", help="skip the graph-op and compile timings")
    parser.add_argument("--results", help="write the markdown report to this file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--system", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--graph-file", help=argparse.SUPPRESS)
    parser.add_argument("--out-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    selected = {"--modes": (args.modes, MODES), "--models": (args.models, MODELS), "--graphs": (args.graphs, GRAPHS)}
    for option, (value, known) in selected.items():
        unknown = sorted(set(value.split(",")) - set(known))
        if unknown:
            parser.error(f"{option}: unknown {', '.join(unknown)} (choose from {', '.join(known)})")
    modes, models, graphs = args.modes.split(","), args.models.split(","), args.graphs.split(",")

    import torch_geometric
    bandwidth = copy_bandwidth()
    lines = []

    def emit(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    command = "python benchmarks/bench_cpu.py " + " ".join(a for a in sys.argv[1:])
    emit(f"command: {command}")
    emit(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
         f"numpy {np.__version__}, torch-geometric {torch_geometric.__version__}; copy bandwidth {bandwidth:.1f} GB/s; "
         f"load average at the start {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    emit(f"graphs: {args.nodes} nodes, {args.edges} edges, {args.features} features (float32); {args.rounds} processes "
         f"per system interleaved, each: a first call, {args.warmup} untimed, {args.repeats} timed")
    firsts = []
    reorder_ratios: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        files = {}
        for kind in graphs:
            edge_index, x = make_graph(kind, args.nodes, args.edges, args.features)
            files[kind] = workdir / f"{kind}.npz"
            np.savez(files[kind], edge_index=edge_index, x=x)
        for mode in modes:
            what = "forward pass (no autograd)" if mode == "forward" else \
                "training step (forward, sum-of-squares loss, backward)"
            emit()
            emit(f"{mode}: one {what}; median ms over all timed calls; process medians (min-max) and their spread "
                 "(slowest / fastest); CPU ms of all threads per call and its spread; ms the threads waited for a core "
                 "per call; minor page faults per call")
            emit()
            extra = "GB/s (min traffic) | peak MB | max rel. diff |" if mode == "forward" else \
                "peak MB | peak vs PyG default | out rel. diff | grad rel. diff |"
            emit("| graph | model | system | median ms | vs PyG default | vs PyG CSR | process medians ms | spread | "
                 f"CPU ms | CPU spread | waited ms | faults | {extra}")
            emit("|---|---|---|" + "---:|" * (12 if mode == "forward" else 13))
            for kind in graphs:
                for model in models:
                    systems = systems_for(mode, kind, model)
                    runs: dict[str, list] = {s: [] for s in systems}
                    errors: dict[str, str] = {}
                    # Rounds interleave the systems, so that a slow spell of the machine hits all of them alike.
                    for _ in range(args.rounds):
                        for system in systems:
                            r = run_child(mode, system, model, files[kind], args, workdir)
                            if "error" in r:
                                errors[system] = r["error"]
                            else:
                                runs[system].append(r)
                    results = {s: summarize(rs) for s, rs in runs.items() if rs and s not in errors}
                    reference = results.get("pyg-default")
                    for system in systems:
                        if system in errors:
                            emit(f"| {kind} | {model} | {system} | error: {errors[system]} |" + " |" * 14)
                            continue
                        r = results[system]
                        ms = r["median_ms"]
                        vs_default = f"{reference['median_ms'] / ms:.2f}x" if reference else "-"
                        csr = results.get("pyg-csr")
                        vs_csr = f"{csr['median_ms'] / ms:.2f}x" if csr else "-"
                        spread = (f"{min(r['process_ms']):.1f}-{max(r['process_ms']):.1f} | {r['spread']:.2f}x | "
                                  f"{r['cpu_ms']:.1f} | {r['cpu_spread']:.2f}x | {r['waited_ms']:.1f} | "
                                  f"{r['faults']:.0f}")
                        out_diff, grad_diff = agreement(r, reference)
                        if mode == "forward":
                            gbs = min_bytes(model, args.nodes, args.edges, args.features) / (ms / 1e3) / 1e9
                            tail = f"{gbs:.1f} | {r['peak_mb']:.0f} | {out_diff} |"
                        else:
                            peak_ratio = f"{r['peak_mb'] / reference['peak_mb']:.2f}x" \
                                if reference and reference["peak_mb"] > 0 else "-"
                            tail = f"{r['peak_mb']:.0f} | {peak_ratio} | {out_diff} | {grad_diff} |"
                        emit(f"| {kind} | {model} | {system} | {ms:.1f} | {vs_default} | {vs_csr} | {spread} | {tail}")
                        firsts.append((mode, kind, model, system, r["first"], r["threads"], r["omp"]))
                    if "mpdsl-no-reorder" in results and "mpdsl" in results:
                        reorder_ratios[mode, model] = \
                            results["mpdsl-no-reorder"]["median_ms"] / results["mpdsl"]["median_ms"]
    emit()
    if reorder_ratios:
        emit("reordering on the community graph, relabelling of every call included (mpdsl-no-reorder median / "
             "mpdsl median; > 1: reordering pays): " +
             ", ".join(f"{mode} {model} {v:.2f}x" for (mode, model), v in reorder_ratios.items()))
        emit()
    emit("first calls, median over the processes (mpdsl: kernels = the first call on a 64-node graph, which loads "
         "the compiled kernels from their cache and, for steps, builds the training programs; then the first call on "
         "the graph builds its CSR index, layout and first buffers); threads at the end of a process; the wait "
         "policy of torch's OpenMP threads where torch is loaded (mpdsl, imported first, sets PASSIVE; PyG runs "
         "with torch's default)")
    emit()
    emit("| mode | graph | model | system | kernels ms | first call on the graph ms | threads | OMP_WAIT_POLICY |")
    emit("|---|---|---|---|---:|---:|---:|---|")
    for mode, kind, model, system, first, threads, omp in firsts:
        kernels = f"{first['kernels ms']:.0f}" if "kernels ms" in first else "-"
        emit(f"| {mode} | {kind} | {model} | {system} | {kernels} | {first['first call ms']:.0f} | {threads} | {omp} |")
    if not args.no_pieces:
        emit()
        emit("graph ops alone (mpdsl, in one process, median of 15 calls, ms):")
        pieces = aggregation_times(args.nodes, args.edges, args.features)
        for name, ms in pieces.items():
            emit(f"- {name}: {ms:.1f}")
        for op in ("sum g-SpMM", "GAT attention"):
            given = pieces.get(f"{op}, community graph, given ids")
            relabelled = pieces.get(f"{op}, community graph, relabelled")
            if given and relabelled:
                emit(f"- {op} on the community graph, given ids / relabelled: {given / relabelled:.2f}x")
        emit()
        times = compile_times()
        emit("compile (parse, check, lower, optimize) per example, median of 5, ms: " +
             ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
    if args.results:
        Path(args.results).write_text("\n".join(lines) + "\n")
        print(f"(also written to {args.results})")


if __name__ == "__main__":
    main()
