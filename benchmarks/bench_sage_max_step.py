"""A one-layer SAGE-max training step through ``mpdsl.to_torch``, compared between checkouts.

    python benchmarks/bench_sage_max_step.py [--nodes 100000] [--edges 1000000] [--features 64]
                                             [--steps 5] [--warmup 2] [--rounds 2]
                                             [--checkout DIR ...] [--without-pass NAME]

The layer (GraphSAGE with max pooling, PyG ``SAGEConv(aggr="max", project=True)``):
``p = relu(x @ Wp + bp); out = x @ W_s + (max(p[src]) by dst) @ W_n + b``, float32, on a seeded
uniform random graph (``--nodes`` / ``--edges``, numpy ``default_rng(0)``) with ``--features``
node features and as many outputs. A step is ``out = module(graph); (out ** 2).sum().backward()``
(the module in training mode; the layer has no dropout), timed after ``--warmup`` untimed steps.

Each ``--checkout`` (default: this one) names a source tree with its own ``.venv``; every round
runs one fresh process per checkout, in turn (interleaved), so that the machine's slow and fast
spells fall on all of them. A process reports the median and the fastest of its steps, its peak
resident memory above what it held before the first step (``ru_maxrss`` minus the RSS after the
graph, the model and the inputs were built), the bytes per edge of the residuals the backward
reads (from ``module.programs``) and a checksum of the gradients. The summary gives per checkout
the median of the per-process medians, the range, the peak memory, the ratios against the first
checkout and whether the gradients agree (float32 rtol 1e-4).

``--without-pass NAME`` compares within each process instead: the layer compiled with the default
pass pipeline and with the pipeline less pass NAME (e.g. ``fuse_match_aggregate``), their steps
interleaved one by one, so that a loaded machine slows both alike (no per-variant peak memory: the
two share the process). It asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SOURCE = """model sage(x: node[F], Wp: param[F, F], bp: param[F], W_s: param[F, F], W_n: param[F, F],
           b: param[F]) -> node[F] {
    p = relu(x @ Wp + bp)
    return x @ W_s + (max(p[src]) by dst) @ W_n + b
}"""


def current_rss() -> int:
    """Resident bytes of this process now (``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def random_graph(args: argparse.Namespace):
    """The benchmark's seeded uniform random graph with float32 features ``x``."""
    import mpdsl

    rng = np.random.default_rng(0)
    edge_index = rng.integers(0, args.nodes, size=(2, args.edges))
    x = rng.standard_normal((args.nodes, args.features)).astype(np.float32)
    return mpdsl.Graph.from_arrays(edge_index, args.nodes, x=x)


def child(args: argparse.Namespace) -> dict:
    import torch

    import mpdsl
    from mpdsl.types import Domain

    torch.set_num_threads(1)
    graph = random_graph(args)
    model = mpdsl.compile(SOURCE, dtype="float32", dims={"F": args.features}, seed=0)
    module = model.to_torch(graph)
    module.train()
    before = current_rss()

    def step() -> None:
        module.zero_grad(set_to_none=True)
        out = module(graph)
        (out ** 2).sum().backward()

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    programs = module.programs(graph, training=True)
    residual_types = [v.type for v in programs.backward.values if v.name in programs.residuals]
    per_edge = sum(int(np.prod([d.value for d in t.shape], dtype=np.int64)) * 4
                   for t in residual_types if t.domain is Domain.EDGE)
    grads = {n: p.grad.detach().numpy().astype(np.float64) for n, p in module.named_parameters()}
    return {"mpdsl": str(Path(mpdsl.__file__).parent), "median_ms": statistics.median(times) * 1e3,
            "min_ms": min(times) * 1e3, "peak_above_start_mb": (peak - before) / 1e6,
            "residual_bytes_per_edge": per_edge,
            "backward_ops": sorted({v.op for v in programs.backward.values}),
            "grads": {n: [float(np.abs(g).sum()), float(g.sum())] for n, g in grads.items()}}


def child_without_pass(args: argparse.Namespace) -> dict:
    import torch

    import mpdsl
    from mpdsl.passes import DEFAULT_PIPELINE

    torch.set_num_threads(1)
    graph = random_graph(args)
    less = [p for p in DEFAULT_PIPELINE if p != args.without_pass]
    pipelines = {"default": None, f"without {args.without_pass}": less}
    modules = {}
    for name, passes in pipelines.items():
        model = mpdsl.compile(SOURCE, dtype="float32", dims={"F": args.features}, seed=0, passes=passes)
        modules[name] = model.to_torch(graph)
        modules[name].train()

    def step(module) -> None:
        module.zero_grad(set_to_none=True)
        (module(graph) ** 2).sum().backward()

    for _ in range(args.warmup):
        for module in modules.values():
            step(module)
    times: dict[str, list[float]] = {name: [] for name in modules}
    for _ in range(args.steps):
        for name, module in modules.items():
            start = time.perf_counter()
            step(module)
            times[name].append(time.perf_counter() - start)
    grads = {name: {n: p.grad.detach().numpy().astype(np.float64) for n, p in m.named_parameters()}
             for name, m in modules.items()}
    first = next(iter(grads.values()))
    return {name: {"median_ms": statistics.median(t) * 1e3, "min_ms": min(t) * 1e3,
                   "agree": all(np.allclose(grads[name][n], first[n], rtol=1e-4) for n in first)}
            for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=100_000)
    parser.add_argument("--edges", type=int, default=1_000_000)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--checkout", action="append", default=[],
                        help="a source tree with its own .venv (repeatable; default: this checkout)")
    parser.add_argument("--without-pass", metavar="NAME",
                        help="compare the default pipeline with the one less this pass, in each process")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child_without_pass(args) if args.without_pass else child(args)))
        return
    checkouts = [Path(c).resolve() for c in args.checkout] or [Path(__file__).resolve().parents[1]]
    sizes = ["--nodes", str(args.nodes), "--edges", str(args.edges), "--features", str(args.features),
             "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.without_pass:
        compare_passes(args, sizes)
        return
    results: dict[Path, list[dict]] = {c: [] for c in checkouts}
    for _ in range(args.rounds):
        for checkout in checkouts:
            python = checkout / ".venv" / "bin" / "python"
            done = subprocess.run([str(python), str(Path(__file__).resolve()), "--child", *sizes], cwd=checkout,
                                  capture_output=True, text=True, check=True)
            results[checkout].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"SAGE-max training step, {args.nodes} nodes / {args.edges} edges / {args.features} features, float32; "
          f"{args.rounds} interleaved process(es) per checkout x {args.steps} steps after {args.warmup} warm-ups")
    first = checkouts[0]
    base = statistics.median(r["median_ms"] for r in results[first])
    base_peak = statistics.median(r["peak_above_start_mb"] for r in results[first])
    reference = results[first][0]["grads"]
    for checkout in checkouts:
        runs = results[checkout]
        medians = [r["median_ms"] for r in runs]
        peak = statistics.median(r["peak_above_start_mb"] for r in runs)
        agree = all(np.allclose(r["grads"][n], reference[n], rtol=1e-4) for r in runs for n in reference)
        print(f"{checkout}: step median {statistics.median(medians):.0f} ms (per process "
              f"{', '.join(f'{m:.0f}' for m in medians)}; fastest step {min(r['min_ms'] for r in runs):.0f} ms), "
              f"{base / statistics.median(medians):.2f}x the first; peak above start {peak:.0f} MB "
              f"({peak / base_peak:.2f}x); residual bytes per edge {runs[0]['residual_bytes_per_edge']:.0f}; "
              f"gradients agree with the first: {agree}; backward ops: {', '.join(runs[0]['backward_ops'])}")


def compare_passes(args: argparse.Namespace, sizes: list[str]) -> None:
    runs = []
    for _ in range(args.rounds):
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", *sizes,
                               "--without-pass", args.without_pass], capture_output=True, text=True, check=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"SAGE-max training step, {args.nodes} nodes / {args.edges} edges / {args.features} features, float32; "
          f"{args.rounds} process(es) x {args.steps} interleaved steps per variant after {args.warmup} warm-ups")
    names = list(runs[0])
    for name in names:
        medians = [r[name]["median_ms"] for r in runs]
        ratios = [r[names[1]]["median_ms"] / r[name]["median_ms"] for r in runs]
        print(f"{name}: step median {statistics.median(medians):.0f} ms (per process "
              f"{', '.join(f'{m:.0f}' for m in medians)}; fastest {min(r[name]['min_ms'] for r in runs):.0f} ms); "
              f"{names[1]} / this per process: {', '.join(f'{q:.2f}' for q in ratios)}; "
              f"gradients agree: {all(r[name]['agree'] for r in runs)}")


if __name__ == "__main__":
    sys.exit(main())
