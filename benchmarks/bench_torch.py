"""Per-call overhead of the torch module (``model.to_torch(graph)``, ``MpdslModule``) on the CPU, NumPy backend.

    python benchmarks/bench_torch.py [--repeats 30] [--processes 3] [--warmup 5] [--workloads gine,gcn]
                                     [--threads 1] [--kernel-threads N] [--json out.json]

Workloads (float32, fixed seeds):

* ``gine``: three GINE layers, hidden 64, mean-pooled to one value per molecule (``models/gine3.mp``)
  on one batch of 64 molecules, the first 64 of RDKit's ``Data/NCI/first_5k.tpsa.csv``
  (``mpdsl.chem.tpsa_dataset(limit=64)``: 1026 atoms, 2176 directed bonds);
* ``gcn``: ``examples/gcn.mp`` (two GCN layers, hidden 16, dropout 0.5 between them, 4 classes) on
  Zachary's karate club (``networkx.karate_club_graph``: 34 nodes, 156 directed edges) with one-hot
  node features (34).

Calls timed, all in one process and interleaved (every repeat runs each of them once, in turn):

* *training step*: ``out = module(graph); loss = (out ** 2).sum(); loss.backward()`` in training mode
  (dropout on). The optimizer is timed apart: *Adam* is ``optimizer.step(); optimizer.zero_grad()``
  (``torch.optim.Adam``, lr 1e-3), run after every step, so the weights change between steps.
* *forward*: ``module(graph)`` under ``torch.no_grad()`` in eval mode (dropout off): inference.
* *programs alone*: the compiled programs of that call run directly on the backend
  (``module.compiled.backend.run``) with the very arguments the module passed them: the backend's
  ``run`` is wrapped (a timer, and once a record of its arguments) and the recorded calls of one warm
  call are replayed. For the step these are the training forward program (outputs and residuals) and
  the backward program (the gradients) that ``module.programs(graph, training=True)`` describes; for
  the forward, the optimized forward program. *overhead* = call - programs alone: what the module
  adds (binding the graph's arrays, graph layout, host copies of parameters, outputs and gradients,
  autograd) plus, for the step, the loss and its backward (a few torch ops). *in the call* is the time
  spent inside the backend's ``run`` during the timed calls themselves (the same work as *programs
  alone*, with the caches as the call leaves them); *outside the backend* = call - in the call, per
  call (paired, so that the machine's spells cancel): the overhead measured within the same call.
* *PyG*: the same model with the same weights in PyTorch Geometric (``GINEConv`` / ``GCNConv``,
  ``global_mean_pool``), the same step and forward, if ``torch_geometric`` is importable.

Each of ``processes`` processes (run one after the other, each a fresh interpreter) builds everything,
runs ``warmup`` untimed repeats, then ``repeats`` timed ones and reports the median of each call; the
table gives the median of the per-process medians and their range (the machine's spells move whole
processes). torch runs ``--threads`` intra-op threads (default 1: the graphs are small, and on a
shared machine a 2-thread torch op stalls whenever another process holds a core); the NumPy
backend's Numba kernels run on ``--kernel-threads`` (NUMBA_NUM_THREADS; default: Numba's own, all
cores). Their launches wake worker threads of Numba's workqueue layer, which on a busy machine wait
for a core: on 2 busy cores the backward program's g-SpMM on the 64 molecules took 0.7 ms at best
and 10 ms as the median, and one kernel thread was no better (the worker still has to wake).
Outputs (eval forward) and the first layer's weight gradient (one eval-mode step) are compared with
PyG's. This is a benchmark: it asserts nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKLOADS = ("gine", "gcn")
HIDDEN = 64
MOLECULES = 64
LR = 1e-3


# ---- workloads --------------------------------------------------------------------------------

def _karate():
    import networkx as nx

    import mpdsl
    g = nx.karate_club_graph()
    edges = np.array(sorted(g.edges()), dtype=np.int64).T
    edge_index = np.concatenate([edges, edges[::-1]], axis=1)  # both directions of every edge
    n = g.number_of_nodes()
    x = np.eye(n, dtype=np.float32)
    return mpdsl.Graph.from_arrays(edge_index, n, x=x)


def build(workload: str):
    """(graph, mpdsl compiled model with initialised weights, a description)."""
    import mpdsl
    if workload == "gine":
        from mpdsl import chem
        graph = chem.tpsa_dataset(limit=MOLECULES).graph
        model = mpdsl.compile(f"dim K = {HIDDEN}\n" + (HERE / "models" / "gine3.mp").read_text())
        model.init(seed=0, graph=graph)
        what = (f"GINE x 3 (hidden {HIDDEN}), mean pool, linear head; {MOLECULES} TPSA molecules "
                f"({graph.num_nodes} atoms, {graph.num_edges} edges)")
    else:
        graph = _karate()
        model = mpdsl.compile(ROOT / "examples" / "gcn.mp")
        model.init(seed=0, graph=graph)
        what = f"GCN x 2 (hidden 16, dropout 0.5), karate ({graph.num_nodes} nodes, {graph.num_edges} edges, one-hot x)"
    rng = np.random.default_rng(1)
    for key, value in model.params.items():  # non-zero biases and eps, so that they are compared too
        if value.ndim <= 1:
            model.params[key] = (0.1 * rng.normal(size=value.shape)).astype(np.float32)
    return graph, model, what


def pyg_model(workload: str, params: dict, graph):
    """A torch module computing the same function with PyG layers and the same weights, and its call."""
    import torch
    from torch_geometric.nn import GCNConv, GINEConv, global_mean_pool

    def t(a):
        return torch.from_numpy(np.array(a, dtype=np.float32))

    x = torch.from_numpy(np.asarray(graph["x"], dtype=np.float32))
    edge_index = torch.from_numpy(np.stack([graph.src, graph.dst]).astype(np.int64))
    if workload == "gine":
        edge_attr = torch.from_numpy(np.asarray(graph["edge_attr"], dtype=np.float32))
        batch = torch.from_numpy(np.asarray(graph["batch"], dtype=np.int64))

        class Gine(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.convs = torch.nn.ModuleList()
                for layer in (1, 2, 3):
                    width = params[f"W{layer}1"].shape[0]
                    mlp = torch.nn.Sequential(torch.nn.Linear(width, HIDDEN), torch.nn.ReLU(),
                                              torch.nn.Linear(HIDDEN, HIDDEN))
                    self.convs.append(GINEConv(mlp, train_eps=True, edge_dim=edge_attr.shape[1]))
                self.head = torch.nn.Linear(HIDDEN, 1)

            def forward(self):
                h = x
                for i, conv in enumerate(self.convs):
                    h = conv(h, edge_index, edge_attr)
                    if i < 2:
                        h = h.relu()
                return self.head(global_mean_pool(h, batch))

        net = Gine()
        with torch.no_grad():
            for layer, conv in zip((1, 2, 3), net.convs):
                conv.eps.copy_(t(params[f"eps{layer}"]).reshape(1))
                conv.lin.weight.copy_(t(params[f"W_e{layer}"].T))
                conv.lin.bias.copy_(t(params[f"b_e{layer}"]))
                conv.nn[0].weight.copy_(t(params[f"W{layer}1"].T))
                conv.nn[0].bias.copy_(t(params[f"b{layer}1"]))
                conv.nn[2].weight.copy_(t(params[f"W{layer}2"].T))
                conv.nn[2].bias.copy_(t(params[f"b{layer}2"]))
            net.head.weight.copy_(t(params["W_out"].T))
            net.head.bias.copy_(t(params["b_out"]))
        first = net.convs[0].nn[0].weight
    else:
        class Gcn(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.conv1 = GCNConv(params["W1"].shape[0], params["W1"].shape[1])
                self.conv2 = GCNConv(params["W2"].shape[0], params["W2"].shape[1])

            def forward(self):
                h = self.conv1(x, edge_index).relu()
                h = torch.nn.functional.dropout(h, 0.5, training=self.training)
                return self.conv2(h, edge_index)

        net = Gcn()
        with torch.no_grad():
            for i, conv in ((1, net.conv1), (2, net.conv2)):
                conv.lin.weight.copy_(t(params[f"W{i}"].T))
                conv.bias.copy_(t(params[f"b{i}"]))
        first = net.conv1.lin.weight
    return net, first


def first_weight_grad(workload: str, module) -> np.ndarray:
    """The gradient of the first layer's weight in PyG's layout ([out, in])."""
    name = "W11" if workload == "gine" else "W1"
    return getattr(module, name).grad.detach().numpy().T


# ---- timing -----------------------------------------------------------------------------------

class BackendTimer:
    """Wraps the backend's ``run`` (and ``run_tensors``, where it has one) on the instance: sums the time
    spent inside (outermost calls only) and, while ``recording``, keeps each call's arguments."""

    def __init__(self, backend):
        self.seconds = 0.0
        self.calls: list[tuple] = []
        self.recording = False
        self._depth = 0
        self.wrapped = [name for name in ("run", "run_tensors") if callable(getattr(backend, name, None))]
        for name in self.wrapped:
            setattr(backend, name, self._wrap(getattr(backend, name)))

    def _wrap(self, fn):
        def wrapped(*args, **kwargs):
            if self.recording and self._depth == 0:
                self.calls.append((fn, args, kwargs))
            self._depth += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.seconds += time.perf_counter() - start
        return wrapped

    def record(self, call) -> list[tuple]:
        self.calls, self.recording = [], True
        try:
            call()
        finally:
            self.recording = False
        return self.calls


def measure(workload: str, args: argparse.Namespace, have_pyg: bool) -> dict:
    """One workload in this process: the agreement check, then the interleaved timed calls."""
    import torch

    graph, model, what = build(workload)
    module = model.to_torch(graph)
    timer = BackendTimer(module.compiled.backend)
    optimizer = torch.optim.Adam(module.parameters(), lr=LR)

    # Agreement, before any optimizer step: the eval forward and one eval-mode step's first-layer gradient.
    module.eval()
    with torch.no_grad():
        ours = module(graph).numpy()
    check: dict = {}
    net = pyg_optimizer = None
    if have_pyg:
        net, first = pyg_model(workload, model.params, graph)
        pyg_optimizer = torch.optim.Adam(net.parameters(), lr=LR)
        net.eval()
        with torch.no_grad():
            theirs = net().numpy()
        check["forward_rel_diff"] = float(np.abs(ours - theirs).max() / max(1e-12, np.abs(theirs).max()))
        (module(graph) ** 2).sum().backward()
        (net() ** 2).sum().backward()
        ga, gb = first_weight_grad(workload, module), first.grad.numpy()
        check["grad_rel_diff"] = float(np.abs(ga - gb).max() / max(1e-12, np.abs(gb).max()))
        optimizer.zero_grad()
        pyg_optimizer.zero_grad()

    def step_mpdsl():
        module.train()
        out = module(graph)
        (out ** 2).sum().backward()

    def forward_mpdsl():
        module.eval()
        with torch.no_grad():
            return module(graph)

    def adam(opt):
        opt.step()
        opt.zero_grad()

    calls = {"mpdsl step": step_mpdsl, "mpdsl adam": lambda: adam(optimizer), "mpdsl forward": forward_mpdsl}
    if net is not None:
        def step_pyg():
            net.train()
            (net() ** 2).sum().backward()

        def forward_pyg():
            net.eval()
            with torch.no_grad():
                return net()

        calls.update({"pyg step": step_pyg, "pyg adam": lambda: adam(pyg_optimizer), "pyg forward": forward_pyg})
    for _ in range(2):  # builds the programs, JIT-compiles the kernels
        step_mpdsl()
        adam(optimizer)
        forward_mpdsl()
    recorded_step = timer.record(step_mpdsl)
    adam(optimizer)
    recorded_forward = timer.record(forward_mpdsl)

    def replay(recorded):
        def run():
            for fn, a, kw in recorded:
                fn(*a, **kw)
        return run

    calls["mpdsl step programs"] = replay(recorded_step)
    calls["mpdsl forward programs"] = replay(recorded_forward)
    programs = module.programs(graph, training=True)
    info = {"what": what, "check": check, "backend": module.compiled.backend.name, "wrapped": timer.wrapped,
            "recorded_calls": {"step": len(recorded_step), "forward": len(recorded_forward)},
            "program_values": {"train_forward": len(programs.train_forward.values),
                               "backward": len(programs.backward.values),
                               "forward": len(module.programs(graph, training=False).forward.values)}}
    times: dict[str, list[float]] = {name: [] for name in calls}
    inside: dict[str, list[float]] = {"mpdsl step": [], "mpdsl forward": []}
    for i in range(args.warmup + args.repeats):
        if i == args.warmup:
            gc.collect()
        for name, call in calls.items():
            before = timer.seconds
            start = time.perf_counter()
            call()
            elapsed = time.perf_counter() - start
            if i >= args.warmup:
                times[name].append(elapsed)
                if name in inside:
                    inside[name].append(timer.seconds - before)
    info["times"] = times
    info["inside"] = inside
    return info


def child(args: argparse.Namespace) -> None:
    import torch
    try:
        import torch_geometric  # noqa: F401
        have_pyg = True
    except ImportError:
        have_pyg = False
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = {workload: measure(workload, args, have_pyg) for workload in args.workloads.split(",")}
    import numba
    print(json.dumps({"results": results, "torch_threads": torch.get_num_threads(), "pyg": have_pyg,
                      "kernel_threads": numba.config.NUMBA_NUM_THREADS}))


# ---- parent -----------------------------------------------------------------------------------

def summarise(processes: list[dict], workload: str) -> dict:
    """Per call: the per-process medians (ms) and derived per-process figures."""
    per: dict[str, list[float]] = {}
    for p in processes:
        info = p["results"][workload]
        medians = {k: 1e3 * float(np.median(v)) for k, v in info["times"].items()}
        medians.update({f"{k} inside": 1e3 * float(np.median(v)) for k, v in info["inside"].items()})
        medians.update({f"{k} outside": 1e3 * float(np.median(np.subtract(info["times"][k], v)))
                        for k, v in info["inside"].items()})  # paired per call: the noise of the machine cancels
        for kind in ("step", "forward"):
            medians[f"mpdsl {kind} overhead"] = medians[f"mpdsl {kind}"] - medians[f"mpdsl {kind} programs"]
            if f"pyg {kind}" in medians:
                medians[f"{kind} ratio"] = medians[f"mpdsl {kind}"] / medians[f"pyg {kind}"]
        if "pyg adam" in medians:
            medians["adam ratio"] = medians["mpdsl adam"] / medians["pyg adam"]
        for k, v in medians.items():
            per.setdefault(k, []).append(v)
    return per


def fastest(lows: dict[str, float], kind: str) -> str:
    text = (f"{kind} {lows[f'mpdsl {kind}']:.2f}, programs alone {lows[f'mpdsl {kind} programs']:.2f}, "
            f"overhead {lows[f'mpdsl {kind}'] - lows[f'mpdsl {kind} programs']:.2f}, in the call "
            f"{lows[f'mpdsl {kind} inside']:.2f}")
    return text + (f", PyG {lows[f'pyg {kind}']:.2f}" if f"pyg {kind}" in lows else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed repeats per process")
    parser.add_argument("--processes", type=int, default=3, help="processes, one after the other")
    parser.add_argument("--warmup", type=int, default=5, help="untimed repeats per process first")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (torch.set_num_threads)")
    parser.add_argument("--kernel-threads", type=int, default=0,
                        help="threads of the NumPy backend's Numba kernels (NUMBA_NUM_THREADS; 0: Numba's default)")
    parser.add_argument("--json", help="write every process's raw times and the summary to this file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    import torch
    command = "python benchmarks/bench_torch.py " + " ".join(sys.argv[1:])
    processes = []
    env = dict(os.environ)
    if args.kernel_threads > 0:
        env["NUMBA_NUM_THREADS"] = str(args.kernel_threads)
    for i in range(args.processes):
        proc = subprocess.run([sys.executable, __file__, "--child", "--repeats", str(args.repeats),
                               "--warmup", str(args.warmup), "--workloads", args.workloads,
                               "--threads", str(args.threads)],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.exit(f"bench_torch: process {i + 1} failed:\n{proc.stderr.strip()}")
        processes.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"process {i + 1}/{args.processes} done", file=sys.stderr, flush=True)
    first = processes[0]
    try:
        import torch_geometric
        pyg_version = torch_geometric.__version__
    except ImportError:
        pyg_version = "not installed"
    print(f"command: {command}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__} "
          f"({first['torch_threads']} threads), Numba kernels on {first['kernel_threads']} threads, "
          f"numpy {np.__version__}, torch-geometric {pyg_version}")
    print(f"{args.processes} processes x {args.repeats} timed repeats ({args.warmup} untimed first); "
          "ms: median of the per-process medians [range of the per-process medians]")
    summary = {}

    def cell(values: list[float] | None, digits: int = 2, unit: str = "") -> str:
        if not values:
            return "-"
        med = float(np.median(values))
        return f"{med:.{digits}f}{unit} [{min(values):.{digits}f}-{max(values):.{digits}f}]"

    for workload in args.workloads.split(","):
        per = summarise(processes, workload)
        summary[workload] = per
        info = first["results"][workload]
        print()
        print(f"{workload}: {info['what']}; backend {info['backend']}; programs: train forward "
              f"{info['program_values']['train_forward']} values, backward {info['program_values']['backward']}, "
              f"forward {info['program_values']['forward']}")
        if info["check"]:
            print(f"agreement with PyG: eval forward max rel. diff {info['check']['forward_rel_diff']:.1e}, "
                  f"first-layer weight gradient {info['check']['grad_rel_diff']:.1e}")
        print()
        print("| call | mpdsl ms | programs alone ms | overhead ms | overhead share | in the call ms "
              "| outside the backend ms | PyG ms | mpdsl / PyG |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for kind, label in (("step", "training step (fwd + loss + backward)"), ("forward", "forward (no_grad, eval)")):
            share = [o / c for o, c in zip(per[f"mpdsl {kind} overhead"], per[f"mpdsl {kind}"])]
            print(f"| {label} | {cell(per[f'mpdsl {kind}'])} | {cell(per[f'mpdsl {kind} programs'])} | "
                  f"{cell(per[f'mpdsl {kind} overhead'])} | {cell([100 * s for s in share], 0, '%')} | "
                  f"{cell(per[f'mpdsl {kind} inside'])} | {cell(per[f'mpdsl {kind} outside'])} | "
                  f"{cell(per.get(f'pyg {kind}'))} | "
                  f"{cell(per.get(f'{kind} ratio'), 2, 'x')} |")
        print(f"| Adam step + zero_grad | {cell(per['mpdsl adam'], 3)} | - | - | - | - | - | "
              f"{cell(per.get('pyg adam'), 3)} | {cell(per.get('adam ratio'), 2, 'x')} |")
        lows = {k: 1e3 * min(min(p["results"][workload]["times"][k]) for p in processes)
                for k in info["times"]}
        lows.update({f"{k} inside": 1e3 * min(min(p["results"][workload]["inside"][k]) for p in processes)
                     for k in info["inside"]})
        summary[workload + " minima"] = lows
        print()
        print("fastest single call over all processes (ms; contention only adds time): "
              + "; ".join(fastest(lows, kind) for kind in ("step", "forward")))
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command, "processes": processes, "summary": summary},
                                              indent=1))
        print(f"\n(raw times written to {args.json})")


if __name__ == "__main__":
    main()
