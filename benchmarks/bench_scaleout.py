"""Scale-out benchmark: one epoch of 2-layer GraphSAGE over neighbour-sampled mini-batches of a
memory-mapped graph larger than this machine's memory budget for it, in one process and with
``mpdsl train --nproc 2`` (DistributedDataParallel, gloo), and the cost of a sampled batch against the
same batch built by plain NumPy code.

    python benchmarks/bench_scaleout.py DIR [--nodes 10000000] [--edges 100000000] [--features 128]
        [--classes 16] [--train 0.1] [--fanouts 15,10] [--batch-size 1024] [--hidden 128]
        [--nproc 1,2] [--workers 0] [--baseline-batches 20] [--max-batches N] [--results benchmarks/RESULTS.md]

``DIR`` is generated when it holds no graph (``benchmarks/make_big_graph.py``: a seeded power-law graph
with a planted class structure, float32 features, masks; validation shares of 0.5% for val and test, so
the runs' evaluations stay small beside the epoch). Every phase runs in its own process, so each peak
resident set (``VmHWM``, and the anonymous / file-backed split at the end) is that phase's alone:

* ``epoch``: the training seeds (``train_mask``) in shuffled batches through ``NeighborLoader``, each
  batch a training step of ``examples/sage_mean.mp`` (forward, cross entropy on the seed rows, backward
  through the torch module, Adam); it times the loader (sampling plus reading the batch's feature rows
  from the file) apart from the step, and counts the sampled edges;
* ``train K``: ``mpdsl train --sampler neighbor:... --epochs 1 --nproc K --eval sampled`` (rank 0's
  history: the epoch's seconds, evaluation included), for each K of ``--nproc``;
* ``baseline``: ``--baseline-batches`` batches of the same seeds sampled by ``NeighborSampler`` and by
  ``bench_sampling.NumpyNeighborSampler`` plus ``make_batch`` (vectorised NumPy, no Numba): whole
  batches (the feature rows read too), and the sampling alone (on the graph's structure without arrays).
This is a benchmark, not a test.
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
ROOT = HERE.parent
MODEL = ROOT / "examples" / "sage_mean.mp"


def status_mb(field: str) -> float:
    """A field of /proc/self/status in MiB (VmHWM, VmRSS, RssAnon, RssFile)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _fanouts(text: str) -> list[int]:
    return [int(part) for part in text.split(",")]


def run_epoch(args: argparse.Namespace) -> dict:
    """One training epoch in this process (see the module doc); what it measured."""
    import torch

    import mpdsl
    from mpdsl.sampling.neighbor import NeighborLoader

    start = time.perf_counter()
    graph = mpdsl.Graph.load(args.data, mmap=True)
    opened = time.perf_counter() - start
    model = mpdsl.compile(MODEL, dims={"H": args.hidden, "C": args.classes})
    workers = {"num_workers": args.workers} if args.workers else {}
    loader = NeighborLoader(graph, _fanouts(args.fanouts), input_nodes=np.asarray(graph["train_mask"]),
                            batch_size=args.batch_size, shuffle=True, seed=0, **workers)
    batches = iter(loader)
    first = next(batches)
    model.init(0, graph=first.graph)
    module = model.to_torch(first.graph)
    optimizer = torch.optim.Adam(module.parameters(), lr=0.01)
    totals = {"batches": 0, "sampled_edges": 0, "batch_nodes": 0, "loader_s": 0.0, "step_s": 0.0, "loss": 0.0}
    peaks = {"RssAnon": 0.0, "RssFile": 0.0}
    limit = args.max_batches or len(loader)
    epoch_start = time.perf_counter()
    batch = first
    first_step = None
    while True:
        step_start = time.perf_counter()
        optimizer.zero_grad()
        out = module(batch.graph)
        labels = torch.from_numpy(np.asarray(batch["y"][:batch.batch_size], dtype=np.int64))
        loss = torch.nn.functional.cross_entropy(out[:batch.batch_size], labels)
        loss.backward()
        optimizer.step()
        if first_step is None:  # the first call compiles the programs for the batch's dims: reported apart
            first_step = time.perf_counter() - step_start
        else:
            totals["step_s"] += time.perf_counter() - step_start
        totals["loss"] += loss.item()
        totals["batches"] += 1
        totals["sampled_edges"] += batch.num_edges
        totals["batch_nodes"] += batch.num_nodes
        for field in peaks:
            peaks[field] = max(peaks[field], status_mb(field))
        if totals["batches"] >= limit:
            break
        load_start = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            break
        totals["loader_s"] += time.perf_counter() - load_start
    epoch = time.perf_counter() - epoch_start
    return {"open_s": opened, "epoch_s": epoch, "first_step_s": first_step, "batches_in_epoch": len(loader), **totals,
            "peak_rss_mb": status_mb("VmHWM"), "peak_anon_mb": peaks["RssAnon"], "peak_file_mb": peaks["RssFile"],
            "mean_loss": totals["loss"] / totals["batches"]}


def run_baseline(args: argparse.Namespace) -> dict:
    """Batches of the same seeds from NeighborSampler and from the NumPy baseline (ms per batch)."""
    sys.path.insert(0, str(HERE))
    from bench_sampling import NumpyNeighborSampler

    import mpdsl
    from mpdsl.sampling.batch import make_batch
    from mpdsl.sampling.loader import batch_key
    from mpdsl.sampling.neighbor import NeighborSampler

    graph = mpdsl.Graph.load(args.data, mmap=True)
    indptr_perm, sources = graph.csr_by_dst(), graph.cached("csr_dst_sources", lambda: None)
    bare = mpdsl.Graph(graph.edge_index, graph.num_nodes)  # no arrays: the sampling alone
    bare.cached("csr_dst", lambda: indptr_perm)
    bare.cached("csr_dst_sources", lambda: sources)
    fanouts = tuple(_fanouts(args.fanouts))
    seeds = np.flatnonzero(np.asarray(graph["train_mask"]))
    seeds = seeds[np.random.default_rng(0).permutation(seeds.shape[0])]
    figures = {}
    for kind, source in (("whole batch", graph), ("sampling alone", bare)):
        ours, numpy_sampler = NeighborSampler(source, fanouts), NumpyNeighborSampler(source, fanouts, replace=False)
        times: dict[str, list[float]] = {"mpdsl": [], "numpy": []}
        edges: dict[str, int] = {"mpdsl": 0, "numpy": 0}
        for k in range(args.baseline_batches + 1):
            units = seeds[k * args.batch_size:(k + 1) * args.batch_size]
            start = time.perf_counter()
            batch = ours(units, batch_key(0, 0, k))
            middle = time.perf_counter()
            n_id, edge_index, e_id = numpy_sampler.sample(units)
            reference = make_batch(source, n_id, edge_index, e_id, units.shape[0])
            end = time.perf_counter()
            if k:  # the first batch of each compiles or warms up
                times["mpdsl"].append(middle - start)
                times["numpy"].append(end - middle)
                edges["mpdsl"] += batch.num_edges
                edges["numpy"] += reference.num_edges
        figures[kind] = {name: {"ms_per_batch": 1e3 * float(np.median(values)),
                                "edges_per_batch": edges[name] / len(values),
                                "edges_per_s": edges[name] / float(np.sum(values))}
                         for name, values in times.items()}
    return figures


def _child(phase: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, str(args.data), "--child", phase, "--fanouts", args.fanouts,
               "--batch-size", str(args.batch_size), "--hidden", str(args.hidden), "--classes", str(args.classes),
               "--baseline-batches", str(args.baseline_batches), "--workers", str(args.workers)]
    if args.max_batches:
        command += ["--max-batches", str(args.max_batches)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"phase {phase} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _train(args: argparse.Namespace, nproc: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        history = Path(folder) / "history.json"
        command = [sys.executable, "-m", "mpdsl.cli", "train", str(MODEL), "--data", str(args.data),
                   "--task", "node-classification", "--sampler", f"neighbor:{args.fanouts}",
                   "--batch-size", str(args.batch_size), "--epochs", "1", "--eval", "sampled",
                   "--dim", f"H={args.hidden}", "--dim", f"C={args.classes}", "--history", str(history),
                   "--no-progress"]
        if nproc > 1:
            command += ["--nproc", str(nproc)]
        if args.workers:
            command += ["--workers", str(args.workers)]
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", _PEAK_OF_CHILD, *command], capture_output=True, text=True,
                              check=False)
        wall = time.perf_counter() - start
        if done.returncode:
            raise SystemExit(f"mpdsl train --nproc {nproc} failed:\n{done.stderr[-4000:]}")
        peak = int(done.stdout.strip().splitlines()[-1])
        record = json.loads(history.read_text())
    epoch = record["history"][0]
    return {"nproc": nproc, "wall_s": wall, "epoch_s": epoch["seconds"], "loss": epoch["loss"],
            "val_metric": epoch["val_metric"], "test_metric": record["final"].get("test_acc"),
            "peak_rss_mb": peak / 1024}


# Runs a command and prints the largest peak resident set of its process tree (KiB): a fresh process, so
# that no earlier phase's children count.
_PEAK_OF_CHILD = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
                  "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")


def _generate(args: argparse.Namespace) -> dict:
    command = [sys.executable, str(HERE / "make_big_graph.py"), str(args.data), "--nodes", str(args.nodes),
               "--edges", str(args.edges), "--features", str(args.features), "--classes", str(args.classes),
               "--train", str(args.train), "--val", "0.005", "--test", "0.005"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"generating the graph failed:\n{done.stderr[-4000:]}")
    return {"seconds": time.perf_counter() - start,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def _disk_bytes(folder: Path) -> dict[str, int]:
    sizes = {path.name: path.stat().st_size for path in folder.glob("*.npy")}
    sizes["saved CSR"] = sum(path.stat().st_size for path in (folder / ".mpdsl").glob("csr_*.npy"))
    return sizes


def report(args: argparse.Namespace, generated: dict | None, epoch: dict, runs: list[dict], baseline: dict) -> str:
    disk = _disk_bytes(args.data)
    gib = 2 ** 30
    sampled_per_s = epoch["sampled_edges"] / epoch["loader_s"] if epoch["loader_s"] else float("nan")
    timed = epoch["loader_s"] + epoch["step_s"]
    lines = [f"Command: `python benchmarks/bench_scaleout.py DIR --nodes {args.nodes} --edges {args.edges} "
             f"--features {args.features} --train {args.train} --fanouts {args.fanouts} --batch-size "
             f"{args.batch_size} --hidden {args.hidden} --nproc {args.nproc} --workers {args.workers}`; "
             f"{platform.machine()}, "
             f"{os.cpu_count()} cores.", "",
             f"Graph: {args.nodes:,} nodes, {args.edges:,} edges, {args.features} float32 features on disk: features "
             f"{disk.get('x.npy', 0) / gib:.2f} GiB, edges {disk.get('edge_index.npy', 0) / gib:.2f} GiB, saved CSR "
             f"{disk['saved CSR'] / gib:.2f} GiB."]
    if generated:
        lines.append(f"Generated in {generated['seconds']:.0f} s with {generated['peak_rss_mb']:.0f} MiB peak RSS.")
    lines += ["", "| run | batches | epoch s | loader s (share) | step s (share) | sampled edges / s | peak RSS MiB "
              "(anon / file-backed) |", "|---|---:|---:|---:|---:|---:|---|",
              f"| one process, NeighborLoader + torch loop | {epoch['batches']} of {epoch['batches_in_epoch']} | "
              f"{epoch['epoch_s']:.1f} | {epoch['loader_s']:.1f} ({epoch['loader_s'] / timed:.0%}) | "
              f"{epoch['step_s']:.1f} ({epoch['step_s'] / timed:.0%}) | {sampled_per_s / 1e6:.2f}M | "
              f"{epoch['peak_rss_mb']:.0f} ({epoch['peak_anon_mb']:.0f} / {epoch['peak_file_mb']:.0f}) |"]
    for run in runs:
        lines.append(f"| `mpdsl train --nproc {run['nproc']}` (epoch + sampled evaluation) | - | "
                     f"{run['epoch_s']:.1f} | - | - | - | {run['peak_rss_mb']:.0f} (largest process) |")
    lines += ["", f"The epoch's first step (compiling the programs) took {epoch['first_step_s']:.2f} s and is "
              "not in the step column; the loader column leaves out the first batch.", "",
              f"Mean training loss of the epoch: {epoch['mean_loss']:.4f}; "
              + "; ".join(f"--nproc {r['nproc']}: loss {r['loss']:.4f}, val acc {r['val_metric']:.4f}, test acc "
                          f"{r['test_metric']:.4f}" for r in runs) + ".", "",
              f"A sampled batch against the NumPy baseline ({args.baseline_batches} batches of {args.batch_size} "
              "training seeds, the same seeds for both, ms median; sampled edges per second of that time):", "",
              "| | mpdsl ms | mpdsl edges / s | NumPy ms | NumPy edges / s | NumPy / mpdsl |",
              "|---|---:|---:|---:|---:|---:|"]
    for kind, figures in baseline.items():
        ours, theirs = figures["mpdsl"], figures["numpy"]
        lines.append(f"| {kind} | {ours['ms_per_batch']:.1f} | {ours['edges_per_s'] / 1e6:.2f}M | "
                     f"{theirs['ms_per_batch']:.1f} | {theirs['edges_per_s'] / 1e6:.2f}M | "
                     f"{theirs['ms_per_batch'] / ours['ms_per_batch']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--nodes", type=int, default=10_000_000)
    parser.add_argument("--edges", type=int, default=100_000_000)
    parser.add_argument("--features", type=int, default=128)
    parser.add_argument("--classes", type=int, default=16)
    parser.add_argument("--train", type=float, default=0.1)
    parser.add_argument("--fanouts", default="15,10")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--nproc", default="1,2", help="process counts of the mpdsl train runs ('' for none)")
    parser.add_argument("--baseline-batches", type=int, default=20)
    parser.add_argument("--workers", type=int, default=0,
                        help="DataLoader worker processes sampling ahead of the steps (0: in the training process)")
    parser.add_argument("--max-batches", type=int, default=0, help="stop the epoch phase after N batches (0: all)")
    parser.add_argument("--results", type=Path, help="append the report to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = run_epoch(args) if args.child == "epoch" else run_baseline(args)
        print(json.dumps(result))
        return
    generated = None if (args.data / "graph.json").exists() else _generate(args)
    epoch = _child("epoch", args)
    print(json.dumps(epoch), flush=True)
    runs = [_train(args, int(k)) for k in args.nproc.split(",") if k]
    for run in runs:
        print(json.dumps(run), flush=True)
    baseline = _child("baseline", args)
    text = report(args, generated, epoch, runs, baseline)
    print(text)
    if args.results:
        with args.results.open("a") as results:
            results.write("\n" + text)


if __name__ == "__main__":
    main()
