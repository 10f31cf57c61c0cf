"""First-forward benchmark: a 2-layer GCN's first forward pass on a big graph, mpdsl against PyG.

    python benchmarks/bench_first_call.py [--nodes 200000] [--edges 2000000] [--features 64] [--rounds 3]
                                          [--before-python PYTHON] [--results benchmarks/RESULTS.md]

The model is ``examples/gcn.mp`` with H = C = 64 (GCN 64 -> 64, relu, dropout, GCN 64 -> 64; eval
mode), and in PyG two ``GCNConv(64, 64)`` with the same weights, run on the edge list (PyG's default
path) and on the CSR ``adj_t`` that ``bench_cpu.py`` builds. Graphs (``bench_cpu.make_graph``,
seeded): a uniform random one and a block-community one with shuffled ids. Every measurement is a
fresh process (systems interleaved round by round), which imports its library, builds the model
and the graph, then times the first forward and two more:

- ``mpdsl``: the first call as a user makes it (parameters initialised, CSR built, layout decided
  and applied, compiled kernels loaded from Numba's cache, buffers first touched).
- ``mpdsl-breakdown``: the same first call taken apart, each step done and timed before the
  forward: importing the compiled kernels (Numba), initialising the parameters, building the CSR,
  deciding the layout (its estimate and its ordering reported apart); then the first forward
  (what is left: JIT cache load, buffer first touch and the arithmetic), a second one (the
  arithmetic), and a third after the buffer pool is emptied (first touch again, JIT loaded).
- ``pyg`` / ``pyg-csr``: PyG's layers; ``graph`` is the tensors (and for ``pyg-csr`` the CSR
  ``adj_t``) built from the arrays.
- ``mpdsl-before`` (with ``--before-python``): the ``mpdsl`` child run by another checkout's
  interpreter, interleaved with the others.

Outputs are compared with each other (float32). This is a benchmark, not a test: it asserts
nothing but agreement of the outputs.
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
ROOT = HERE.parent
HIDDEN = 64
SYSTEMS = ("mpdsl", "pyg", "pyg-csr", "mpdsl-breakdown")


def _timed(call):
    start = time.perf_counter()
    result = call()
    return result, time.perf_counter() - start


def _mpdsl_model():
    import mpdsl
    model = mpdsl.compile(ROOT / "examples" / "gcn.mp", dims={"H": HIDDEN, "C": HIDDEN}, seed=0)
    model.eval()
    return model


def mpdsl_child(graph_file: Path, out_file: Path, breakdown: bool) -> dict:
    figures: dict[str, float | str] = {}
    start = time.perf_counter()
    import mpdsl
    figures["import"] = time.perf_counter() - start
    data = np.load(graph_file)
    model, figures["model"] = _timed(_mpdsl_model)
    graph, figures["graph"] = _timed(lambda: mpdsl.Graph.from_arrays(data["edge_index"], len(data["x"]), x=data["x"]))
    if breakdown:
        from mpdsl import plan
        _, figures["numba import"] = _timed(lambda: __import__("mpdsl.backends.cpu_kernels"))
        _, figures["parameter init"] = _timed(lambda: model.init(seed=0, graph=graph))
        _, figures["CSR by dst"] = _timed(graph.csr_by_dst)
        row_bytes = plan.gathered_row_bytes(model.program_for(model.bind(graph, {})[1]))
        decision, figures["layout"] = _timed(lambda: plan.node_order_for(graph, model.layout, row_bytes))
        figures["layout estimate"] = getattr(decision, "deciding_seconds", float("nan"))
        figures["layout ordering"] = getattr(decision, "ordering_seconds", float("nan"))
        figures["layout reason"] = decision.reason
    out, figures["first forward"] = _timed(lambda: model(graph))
    _, figures["second forward"] = _timed(lambda: model(graph))
    if breakdown:
        model.backend.pool.clear()
    _, figures["third forward"] = _timed(lambda: model(graph))
    np.save(out_file, np.asarray(out, dtype=np.float32))
    return figures


def pyg_child(graph_file: Path, out_file: Path, csr: bool) -> dict:
    figures: dict[str, float | str] = {}
    start = time.perf_counter()
    import torch
    from torch_geometric.nn import GCNConv
    from torch_geometric.utils import to_torch_csr_tensor
    figures["import"] = time.perf_counter() - start
    torch.set_num_threads(os.cpu_count() or 1)
    data = np.load(graph_file)
    weights = np.load(graph_file.with_name("weights.npz"))

    def build_model():
        layers = [GCNConv(HIDDEN, HIDDEN), GCNConv(HIDDEN, HIDDEN)]
        with torch.no_grad():
            for k, layer in enumerate(layers, 1):
                layer.lin.weight.copy_(torch.from_numpy(weights[f"W{k}"].T.copy()))
                layer.bias.copy_(torch.from_numpy(weights[f"b{k}"]))
        return [layer.eval() for layer in layers]

    layers, figures["model"] = _timed(build_model)

    def build_graph():
        x = torch.from_numpy(data["x"])
        edge_index = torch.from_numpy(data["edge_index"])
        if csr:  # adj_t[i, j] = 1 for an edge j -> i: PyG's transposed-adjacency convention
            return x, to_torch_csr_tensor(edge_index.flip(0), size=(len(x), len(x)))
        return x, edge_index

    (x, graph_arg), figures["graph"] = _timed(build_graph)

    def forward():
        with torch.no_grad():
            h = torch.relu(layers[0](x, graph_arg))
            return layers[1](h, graph_arg).numpy()

    out, figures["first forward"] = _timed(forward)
    _, figures["second forward"] = _timed(forward)
    _, figures["third forward"] = _timed(forward)
    np.save(out_file, out)
    return figures


def run_child(python: str, system: str, graph_file: Path, workdir: Path, index: int) -> dict:
    out_file = workdir / f"{system}-{graph_file.stem}-{index}.npy"
    child_system = "mpdsl" if system == "mpdsl-before" else system
    proc = subprocess.run([python, __file__, "--child", child_system, "--graph-file", str(graph_file),
                           "--out-file", str(out_file)], capture_output=True, text=True, cwd=os.getcwd())
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["out_file"] = str(out_file)
    return result


def rel_diff(out: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(out - reference).max() / max(1e-12, np.abs(reference).max()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=200_000)
    parser.add_argument("--edges", type=int, default=2_000_000)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="processes per system and graph, interleaved")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--before-python", help="also run the mpdsl child with this interpreter (mpdsl-before)")
    parser.add_argument("--results", help="append the markdown tables to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--graph-file", help=argparse.SUPPRESS)
    parser.add_argument("--out-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        graph_file, out_file = Path(args.graph_file), Path(args.out_file)
        if args.child.startswith("mpdsl"):
            figures = mpdsl_child(graph_file, out_file, breakdown=args.child == "mpdsl-breakdown")
        else:
            figures = pyg_child(graph_file, out_file, csr=args.child == "pyg-csr")
        print(json.dumps(figures))
        return

    sys.path.insert(0, str(HERE))
    from bench_cpu import make_graph

    systems = args.systems.split(",") + (["mpdsl-before"] if args.before_python else [])
    pythons = {s: args.before_python if s == "mpdsl-before" else sys.executable for s in systems}
    lines: list[str] = []

    def emit(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    results: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        files = {}
        model = _mpdsl_model()
        model.init(seed=0, F=args.features)
        np.savez(workdir / "weights.npz", **model.params)
        for kind in ("uniform", "community"):
            edge_index, x = make_graph(kind, args.nodes, args.edges, args.features)
            files[kind] = workdir / f"{kind}.npz"
            np.savez(files[kind], edge_index=edge_index, x=x)
        for index in range(args.rounds):
            for kind, graph_file in files.items():
                for system in systems:
                    result = run_child(pythons[system], system, graph_file, workdir, index)
                    results.setdefault((kind, system), []).append(result)
                    shown = {k: (round(v * 1e3) if isinstance(v, float) else v) for k, v in result.items()
                             if k not in ("out_file", "layout reason")}
                    print(f"round {index} {kind:9} {system:16} {shown}", file=sys.stderr, flush=True)

        command = "python benchmarks/bench_first_call.py " + " ".join(sys.argv[1:])
        emit(f"Command: `{command}`; {args.nodes} nodes, {args.edges} edges, {args.features} features, float32; "
             f"{args.rounds} processes per system and graph, interleaved; {platform.processor() or platform.machine()},"
             f" {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end.")
        emit()
        emit("ms, median over the processes [per-process values]:")
        emit()
        emit("| graph | system | import | model | graph | first forward | second forward | graph + first forward |")
        emit("|---|---|---:|---:|---:|---:|---:|---:|")

        def cell(runs: list[dict], key: str) -> str:
            values = [1e3 * r[key] for r in runs if key in r]
            if not values:
                return "-"
            return f"{np.median(values):.0f} [{', '.join(f'{v:.0f}' for v in values)}]"

        for kind in files:
            for system in systems:
                runs = [r for r in results[(kind, system)] if "error" not in r]
                errors = [r["error"] for r in results[(kind, system)] if "error" in r]
                if errors:
                    emit(f"| {kind} | {system} | error: {errors[0]} | | | | | |")
                    continue
                for r in runs:
                    r["graph + first forward"] = r["graph"] + r["first forward"]
                emit(f"| {kind} | {system} | {cell(runs, 'import')} | {cell(runs, 'model')} | {cell(runs, 'graph')} | "
                     f"{cell(runs, 'first forward')} | {cell(runs, 'second forward')} | "
                     f"{cell(runs, 'graph + first forward')} |")
        emit()
        emit("First forward of mpdsl against PyG (ratio of the medians; > 1: mpdsl is faster):")
        emit()
        for kind in files:
            first = {s: np.median([r["first forward"] for r in results[(kind, s)] if "error" not in r])
                     for s in systems if any("error" not in r for r in results[(kind, s)])}
            total = {s: np.median([r["graph"] + r["first forward"] for r in results[(kind, s)] if "error" not in r])
                     for s in first}
            for pyg in ("pyg", "pyg-csr"):
                if "mpdsl" in first and pyg in first:
                    emit(f"- {kind}: first forward {first[pyg] / first['mpdsl']:.2f}x {pyg}; graph + first forward "
                         f"{total[pyg] / total['mpdsl']:.2f}x")
            if "mpdsl-before" in first and "mpdsl" in first:
                emit(f"- {kind}: first forward {first['mpdsl-before'] / first['mpdsl']:.2f}x mpdsl-before")
        if "mpdsl-breakdown" in systems:
            emit()
            emit("The first forward taken apart (mpdsl-breakdown; ms, median [per process]):")
            emit()
            steps = ("numba import", "parameter init", "CSR by dst", "layout estimate", "layout ordering",
                     "first forward", "second forward", "third forward")
            emit("| graph | " + " | ".join(steps) + " |")
            emit("|---|" + "---:|" * len(steps))
            for kind in files:
                runs = [r for r in results[(kind, "mpdsl-breakdown")] if "error" not in r]
                emit(f"| {kind} | " + " | ".join(cell(runs, s) for s in steps) + " |")
                if runs:
                    emit(f"| {kind}: layout decision | {runs[0]['layout reason']} |" + " |" * (len(steps) - 1))
        emit()
        emit("Agreement (largest difference relative to the largest magnitude, against the first mpdsl process):")
        for kind in files:
            ok = [r for s in systems for r in results[(kind, s)] if "error" not in r]
            if ok:
                reference = np.load(ok[0]["out_file"])
                worst = max(rel_diff(np.load(r["out_file"]), reference) for r in ok)
                emit(f"- {kind}: {worst:.1e} over {len(ok)} processes")
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
