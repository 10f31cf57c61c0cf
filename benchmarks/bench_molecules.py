"""Molecule training epochs on the CPU: mpdsl's torch module (NumPy backend) against PyTorch Geometric.

    python benchmarks/bench_molecules.py [--models gine,mpnn] [--molecules 2000] [--batch-size 64]
                                         [--epochs 3] [--processes 3] [--threads 1] [--json out.json]
    python benchmarks/bench_molecules.py --profile gine [--epochs 2]     # where a step's time goes

Workloads (float32, fixed seeds), each on the first ``--molecules`` molecules of RDKit's
``Data/NCI/first_5k.tpsa.csv`` (``mpdsl.chem.tpsa_dataset``) in batches of ``--batch-size``:

* ``gine``: ``models/gine3.mp`` with K = 64 (three GINE layers, mean pool, linear head) against
  ``GINEConv(Sequential(Linear, ReLU, Linear), train_eps=True, edge_dim=6)`` x 3 with ReLU between,
  ``global_mean_pool`` and ``Linear(64, 1)``;
* ``mpnn``: ``examples/mpnn.mp`` with its own dims (D = 8, T = 3) against ``NNConv(D, D, edge network,
  aggr="mean")`` + ``torch.nn.GRU`` run T steps with shared weights, ``global_add_pool``, an MLP.

An epoch is one pass over the batches: ``out = model(batch); loss = mse(out, y); zero_grad;
loss.backward(); Adam.step()`` per batch. The batches of each epoch are a seeded shuffle of the
molecules, the same in both systems, and are built before the epoch is timed (mpdsl:
``Graph.select_graphs``, fresh ``Graph`` objects every epoch, so that whatever mpdsl derives per batch
graph (CSR, layout) is derived inside the timed epoch; PyG: the same batches as tensors). The weights
are PyG's initial ones, copied into mpdsl (written to a file by the parent: an mpdsl process never
imports PyG, nor a PyG process mpdsl). Each (model, system) runs in its own processes, fresh
interpreters, started interleaved (process 1 of every (model, system), then process 2, ...): one
untimed epoch, then ``--epochs`` timed ones. Per process: the median epoch and the peak RSS
(``VmHWM``: imports, data and training); the table gives the median of the per-process figures and
their range. Peak RSS is ``VmHWM`` (``ru_maxrss`` would include the parent's size, see
``peak_rss_mb``). The first (untimed) epoch's time is reported apart. An agreement process first runs both
systems on the first batch (eval forward and the first layer's weight gradient). A benchmark: it
asserts nothing.

``--profile MODEL`` runs mpdsl alone in this process: per-phase timers (exclusive time of each phase,
see ``PHASES``) over ``--epochs`` epochs after a warm-up epoch, then cProfile over one more epoch.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODELS = ("gine", "mpnn")
SYSTEMS = ("mpdsl", "pyg")
HIDDEN = 64
LR = 1e-3


# ---- data ---------------------------------------------------------------------------------------

def write_dataset(path: Path, molecules: int) -> None:
    """The first ``molecules`` TPSA molecules as one batched graph (``graph_y`` the targets)."""
    from mpdsl import chem
    data = chem.tpsa_dataset(limit=molecules)
    data.graph.with_data(graph_y=data.y.reshape(-1, 1)).save(path)


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as archive:
        return {k: archive[k] for k in archive.files}


def epoch_batches(num_graphs: int, batch_size: int, epoch: int) -> list[np.ndarray]:
    """The sorted molecule ids of each batch of ``epoch`` (a seeded shuffle)."""
    order = np.random.default_rng([7, epoch]).permutation(num_graphs)
    return [np.sort(order[i:i + batch_size]) for i in range(0, num_graphs, batch_size)]


def tensor_batch(arrays: dict[str, np.ndarray], ids: np.ndarray):
    """Molecules ``ids`` (sorted) of the dataset as PyG-style tensors: (x, edge_index, edge_attr,
    batch, num_graphs, y). The dataset stores each molecule's nodes and edges contiguously, in
    molecule order, so this is ``Graph.select_graphs(ids)`` (the agreement process checks it)."""
    import torch
    batch = arrays["batch"]
    node_ptr = np.searchsorted(batch, np.arange(batch.max() + 2))
    edge_graph = batch[arrays["edge_index"][1]]
    edge_ptr = np.searchsorted(edge_graph, np.arange(batch.max() + 2))
    nodes = np.concatenate([np.arange(node_ptr[g], node_ptr[g + 1]) for g in ids])
    edges = np.concatenate([np.arange(edge_ptr[g], edge_ptr[g + 1]) for g in ids])
    new_id = np.full(len(batch), -1, dtype=np.int64)
    new_id[nodes] = np.arange(len(nodes))
    sizes = node_ptr[ids + 1] - node_ptr[ids]
    return (torch.from_numpy(arrays["x"][nodes]), torch.from_numpy(new_id[arrays["edge_index"][:, edges]]),
            torch.from_numpy(arrays["edge_attr"][edges]),
            torch.from_numpy(np.repeat(np.arange(len(ids), dtype=np.int64), sizes)), len(ids),
            torch.from_numpy(arrays["graph_y"][ids]))


# ---- models -------------------------------------------------------------------------------------

def pyg_module(model: str, f: int, fe: int, dims: dict[str, int]):
    """The PyG module of ``model`` (torch's default initialisation, seeded), called as
    ``net(x, edge_index, edge_attr, batch, num_graphs)``, and its weights in mpdsl's names and layouts."""
    import torch
    from torch_geometric import nn as pyg_nn

    def w(linear) -> np.ndarray:  # torch Linear weight [out, in] -> mpdsl param [in, out]
        return linear.weight.detach().numpy().T.copy()

    def b(tensor) -> np.ndarray:
        return tensor.detach().numpy().copy()

    torch.manual_seed(0)
    if model == "gine":
        from bench_tpsa import pyg_net  # the same GINE x 3 as the initialisation benchmark

        net = pyg_net(fe, f)
        with torch.no_grad():
            for conv in net.convs:  # eps non-zero, so that it is compared too
                conv.eps.fill_(0.1)
        weights = {"W_out": w(net.head), "b_out": b(net.head.bias)}
        for layer, conv in zip((1, 2, 3), net.convs):
            weights.update({f"eps{layer}": b(conv.eps).reshape(()), f"W_e{layer}": w(conv.lin),
                            f"b_e{layer}": b(conv.lin.bias), f"W{layer}1": w(conv.nn[0]),
                            f"b{layer}1": b(conv.nn[0].bias), f"W{layer}2": w(conv.nn[2]),
                            f"b{layer}2": b(conv.nn[2].bias)})
        return net, weights

    d, eh, rh = dims["D"], dims["EH"], dims["RH"]

    class Mpnn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin0 = torch.nn.Linear(f, d)
            edge_nn = torch.nn.Sequential(torch.nn.Linear(fe, eh), torch.nn.ReLU(), torch.nn.Linear(eh, d * d))
            self.conv = pyg_nn.NNConv(d, d, edge_nn, aggr="mean", root_weight=True, bias=True)
            self.gru = torch.nn.GRU(d, d)
            self.readout = torch.nn.Sequential(torch.nn.Linear(d, rh), torch.nn.ReLU(), torch.nn.Linear(rh, 1))

        def forward(self, x, edge_index, edge_attr, batch, num_graphs):
            out = torch.relu(self.lin0(x))
            h = out.unsqueeze(0)
            for _ in range(dims["T"]):
                m = torch.relu(self.conv(out, edge_index, edge_attr))
                out, h = self.gru(m.unsqueeze(0), h)
                out = out.squeeze(0)
            return self.readout(pyg_nn.global_add_pool(out, batch, size=num_graphs))

    net = Mpnn()
    gru = net.gru
    weights = {"W0": w(net.lin0), "b0": b(net.lin0.bias), "We1": w(net.conv.nn[0]), "be1": b(net.conv.nn[0].bias),
               "We2": w(net.conv.nn[2]), "be2": b(net.conv.nn[2].bias), "W_root": w(net.conv.lin),
               "b_conv": b(net.conv.bias),
               # torch stacks the gates r, z, n along the rows of weight_ih [3D, in]
               "W_ih": b(gru.weight_ih_l0).T.reshape(d, 3, d).copy(),
               "W_hh": b(gru.weight_hh_l0).T.reshape(d, 3, d).copy(),
               "b_ih": b(gru.bias_ih_l0).reshape(3, d), "b_hh": b(gru.bias_hh_l0).reshape(3, d),
               "Wr1": w(net.readout[0]), "br1": b(net.readout[0].bias), "Wr2": w(net.readout[2]),
               "br2": b(net.readout[2].bias)}
    return net, weights


def mpdsl_source(model: str) -> str:
    if model == "gine":
        return f"dim K = {HIDDEN}\n" + (HERE / "models" / "gine3.mp").read_text()
    return (ROOT / "examples" / "mpnn.mp").read_text()


def write_setup(folder: Path, models: list[str]) -> None:
    """Each model's dims (``dim`` constants of its source) for the PyG processes, which do not import
    mpdsl, and its initial weights (PyG's, in mpdsl's names) for the mpdsl processes, which do not
    import PyG: each process holds only its own system's libraries."""
    import mpdsl
    arrays = read_arrays(folder / "tpsa.npz")
    f, fe = arrays["x"].shape[1], arrays["edge_attr"].shape[1]
    dims = {m: dict(mpdsl.compile(mpdsl_source(m)).static_dims) for m in models}
    (folder / "dims.json").write_text(json.dumps(dims))
    for m in models:
        _, weights = pyg_module(m, f, fe, dims[m])
        np.savez(folder / f"weights_{m}.npz", **weights)


def first_weight(model: str) -> str:
    return "W11" if model == "gine" else "W0"


# ---- one system in this process -----------------------------------------------------------------

class System:
    """One model of one system, ready to train: ``step(batch)`` trains on one batch; ``batches(epoch)``
    builds the batches of an epoch (untimed)."""

    def __init__(self, system: str, model: str, data: Path, batch_size: int):
        import torch
        self.system, self.model, self.batch_size = system, model, batch_size
        arrays = read_arrays(data)
        self.arrays = arrays
        self.num_graphs = int(arrays["batch"].max()) + 1
        f, fe = arrays["x"].shape[1], arrays["edge_attr"].shape[1]
        if system == "pyg":
            dims = json.loads((data.parent / "dims.json").read_text())[model]
            self.net, _ = pyg_module(model, f, fe, dims)
        else:
            import mpdsl
            self.graph = mpdsl.Graph.load(data)
            compiled = mpdsl.compile(mpdsl_source(model))
            compiled.load_weights(data.parent / f"weights_{model}.npz")
            self.net = compiled.to_torch()
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=LR)
        self.net.train()

    def batches(self, epoch: int) -> list:
        ids = epoch_batches(self.num_graphs, self.batch_size, epoch)
        if self.system == "pyg":
            return [tensor_batch(self.arrays, i) for i in ids]
        import torch
        return [(self.graph.select_graphs(i), torch.from_numpy(self.arrays["graph_y"][i])) for i in ids]

    def forward(self, batch):
        if self.system == "pyg":
            return self.net(*batch[:5])
        return self.net(batch[0])

    def step(self, batch) -> float:
        import torch
        out = self.forward(batch)
        loss = torch.nn.functional.mse_loss(out, batch[-1])
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


def peak_rss_mb() -> float:
    """This process's peak resident memory (``VmHWM``). Not ``ru_maxrss``: Linux carries it across
    ``exec`` from the forked copy of the parent, so a child would report at least the parent's size."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child(args: argparse.Namespace) -> None:
    import torch
    torch.set_num_threads(args.threads)
    system = System(args.system, args.model, Path(args.data), args.batch_size)
    start = time.perf_counter()
    batches = system.batches(0)
    build_first = time.perf_counter() - start
    start = time.perf_counter()
    for batch in batches:
        system.step(batch)
    first = time.perf_counter() - start
    epochs, builds, losses = [], [], []
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        batches = system.batches(epoch)
        builds.append(time.perf_counter() - start)
        start = time.perf_counter()
        losses.append(float(np.mean([system.step(batch) for batch in batches])))
        epochs.append(time.perf_counter() - start)
    print(json.dumps({"first_epoch": first, "epochs": epochs, "batch_build": [build_first] + builds,
                      "losses": losses, "peak_rss_mb": peak_rss_mb(), "batches": len(batches)}))


def agreement(args: argparse.Namespace) -> None:
    """Both systems on the first batch of epoch 1: eval forward, and one step's first-layer weight gradient."""
    import torch
    torch.set_num_threads(args.threads)
    out = {}
    for model in args.models.split(","):
        ours = System("mpdsl", model, Path(args.data), args.batch_size)
        theirs = System("pyg", model, Path(args.data), args.batch_size)
        ids = epoch_batches(ours.num_graphs, args.batch_size, 1)[0]
        graph, y = ours.batches(1)[0]
        tensors = tensor_batch(theirs.arrays, ids)
        same_batch = bool(np.array_equal(graph.edge_index, tensors[1].numpy())
                          and np.array_equal(graph["x"], tensors[0].numpy()))
        diffs = {}
        for mode in ("eval", "train"):
            for s in (ours, theirs):
                s.net.train(mode == "train")
                for p in s.net.parameters():
                    p.grad = None
            a = ours.forward((graph, y))
            b = theirs.forward(tensors)
            scale = max(1e-12, float(b.abs().max()))
            if mode == "eval":
                diffs["forward_rel_diff"] = float((a - b).abs().max()) / scale
            else:
                torch.nn.functional.mse_loss(a, y).backward()
                torch.nn.functional.mse_loss(b, tensors[-1]).backward()
                ga = getattr(ours.net, first_weight(model)).grad.numpy()
                layer = theirs.net.convs[0].nn[0] if model == "gine" else theirs.net.lin0
                gb = layer.weight.grad.numpy().T
                diffs["grad_rel_diff"] = float(np.abs(ga - gb).max() / max(1e-12, np.abs(gb).max()))
        out[model] = {"same_batch": same_batch, **diffs, "atoms": graph.num_nodes, "edges": graph.num_edges}
    print(json.dumps(out))


# ---- profile ------------------------------------------------------------------------------------

# (phase, object, attribute): the exclusive time of each call is charged to its phase.
PHASES = (
    ("batch build (select_graphs)", "mpdsl.graph:Graph", "select_graphs"),
    ("python preparation (module._prepare)", "mpdsl.torch_module:MpdslModule", "_prepare"),
    ("graph lookup (graph_of)", "mpdsl.torch_module", "graph_of"),
    ("layout decision + apply", "mpdsl.torch_module:RunSpec", "graph_layout"),
    ("layout decision + apply", "mpdsl.plan:GraphLayout", "apply"),
    ("layout decision + apply", "mpdsl.plan:GraphLayout", "restore"),
    ("CSR / segment derivation", "mpdsl.graph:Graph", "csr_by_dst"),
    ("CSR / segment derivation", "mpdsl.graph:Graph", "csr_by_src"),
    ("CSR / segment derivation", "mpdsl.graph:Graph", "segments_by_graph"),
    ("CSR / segment derivation", "mpdsl.backends.numpy_backend:PullCSR", "__init__"),
    ("CSR / segment derivation", "mpdsl.backends.numpy_backend:Segments", "incidence"),
    ("allocation (pool take)", "mpdsl.backends.numpy_backend:BufferPool", "take"),
    ("backend run: dispatch (run - ops)", "mpdsl.backends.numpy_backend:NumpyBackend", "run"),
    ("loss (mse)", "torch.nn.functional", "mse_loss"),
    ("Adam step", "torch.optim:Adam", "step"),
    ("zero_grad", "torch.optim:Adam", "zero_grad"),
)


class PhaseTimer:
    """Exclusive wall time per phase: a wrapped call's time less the time of wrapped calls inside it.
    The backend's own per-op timings (``last_op_seconds``) are charged to ``ops: <op>`` and taken out
    of the backend run's phase (what is left of it is the execution loop's own work: dispatch)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._stack: list[float] = []
        self._undo: list[tuple] = []

    def wrap(self, phase: str, owner, name: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            self._stack.append(0.0)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                inner = self._stack.pop()
                self.seconds[phase] = self.seconds.get(phase, 0.0) + elapsed - inner
                if self._stack:
                    self._stack[-1] += elapsed
                if name == "run" and args and hasattr(args[0], "last_op_seconds"):
                    for op, s in args[0].last_op_seconds.items():
                        self.seconds[f"ops: {op}"] = self.seconds.get(f"ops: {op}", 0.0) + s
                        self.seconds[phase] -= s

        setattr(owner, name, timed)
        self._undo.append((owner, name, original))

    def restore(self) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)


def _resolve(spec: str):
    import importlib
    module, _, attr = spec.partition(":")
    obj = importlib.import_module(module)
    return getattr(obj, attr) if attr else obj


def profile(args: argparse.Namespace) -> None:
    import torch
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "tpsa.npz"
        write_dataset(data, args.molecules)
        write_setup(Path(folder), [args.profile])
        system = System("mpdsl", args.profile, data, args.batch_size)
    for batch in system.batches(0):
        system.step(batch)
    timer = PhaseTimer()
    for phase, owner, name in PHASES:
        timer.wrap(phase, _resolve(owner), name)
    steps = 0
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        batches = system.batches(epoch)
        for batch in batches:
            system.step(batch)
        steps += len(batches)
    total = time.perf_counter() - start
    timer.restore()
    known = sum(timer.seconds.values())
    rows = sorted(timer.seconds.items(), key=lambda item: -item[1])
    print(f"{args.profile}: {steps} steps of {args.batch_size} molecules; {1e3 * total / steps:.2f} ms per step "
          f"(batch build included); peak RSS {peak_rss_mb():.0f} MB")
    print("| phase | ms per step | share |")
    print("|---|---:|---:|")
    for phase, seconds in rows + [("torch autograd glue, custom op, the rest", total - known)]:
        print(f"| {phase} | {1e3 * seconds / steps:.3f} | {100 * seconds / total:.0f}% |")
    batches = system.batches(args.epochs + 1)
    profiler = cProfile.Profile()
    profiler.enable()
    for batch in batches:
        system.step(batch)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.top)
    print(f"\ncProfile, one epoch ({len(batches)} steps), top {args.top} by own time:")
    import mpdsl
    package_root = str(Path(mpdsl.__file__).resolve().parents[1]) + "/"
    lines = "\n".join(line for line in text.getvalue().splitlines() if line.strip())
    for prefix in sorted({package_root, str(ROOT) + "/", sys.prefix + "/"}, key=len, reverse=True):
        lines = lines.replace(prefix, "")
    print(lines)


# ---- parent -------------------------------------------------------------------------------------

def cell(values: list[float], digits: int = 3) -> str:
    return f"{np.median(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--molecules", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per process (after one untimed)")
    parser.add_argument("--processes", type=int, default=3, help="processes per (model, system)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (torch.set_num_threads)")
    parser.add_argument("--json", help="write every process's figures to this file")
    parser.add_argument("--profile", choices=MODELS, help="profile mpdsl on this model in this process")
    parser.add_argument("--top", type=int, default=25, help="cProfile entries shown with --profile")
    parser.add_argument("--child", choices=SYSTEMS, dest="system", help=argparse.SUPPRESS)
    parser.add_argument("--agreement", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.profile:
        profile(args)
        return
    if args.system:
        child(args)
        return
    if args.agreement:
        agreement(args)
        return

    command = "python benchmarks/bench_molecules.py " + " ".join(sys.argv[1:])
    common = ["--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--threads", str(args.threads)]

    def launch(extra: list[str]) -> dict:
        proc = subprocess.run([sys.executable, __file__, *extra, *common], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"bench_molecules: {' '.join(extra)} failed:\n{proc.stderr.strip()}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    models = args.models.split(",")
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "tpsa.npz"
        write_dataset(data, args.molecules)
        write_setup(Path(folder), models)
        check = launch(["--agreement", "--models", args.models, "--data", str(data)])
        runs: dict[tuple[str, str], list[dict]] = {(m, s): [] for m in models for s in SYSTEMS}
        for p in range(args.processes):
            for model in models:
                for system in SYSTEMS:
                    runs[model, system].append(launch(["--child", system, "--model", model, "--data", str(data)]))
            print(f"round {p + 1}/{args.processes} done", file=sys.stderr, flush=True)
    import torch
    import torch_geometric
    print(f"command: {command}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__} "
          f"({args.threads} threads), torch-geometric {torch_geometric.__version__}, numpy {np.__version__}")
    print(f"{args.molecules} TPSA molecules, batches of {args.batch_size}; {args.processes} processes per system x "
          f"{args.epochs} timed epochs (one untimed first); median of the per-process medians [range]")
    print()
    print("| model | agreement on batch 1 (eval forward / first weight grad, max rel. diff) | mpdsl s/epoch | "
          "PyG s/epoch | PyG / mpdsl | mpdsl peak RSS MB | PyG peak RSS MB | mpdsl first epoch s | PyG first epoch s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    summary = {}
    for model in models:
        ours, theirs = runs[model, "mpdsl"], runs[model, "pyg"]
        ours_med = [float(np.median(r["epochs"])) for r in ours]
        theirs_med = [float(np.median(r["epochs"])) for r in theirs]
        ratio = [t / o for t, o in zip(theirs_med, ours_med)]
        c = check[model]
        summary[model] = {"mpdsl_epoch": ours_med, "pyg_epoch": theirs_med, "speedup": ratio,
                          "mpdsl_rss": [r["peak_rss_mb"] for r in ours], "pyg_rss": [r["peak_rss_mb"] for r in theirs]}
        print(f"| {model} ({c['atoms']} atoms, {c['edges']} edges in batch 1; same batch: {c['same_batch']}) | "
              f"{c['forward_rel_diff']:.1e} / {c['grad_rel_diff']:.1e} | {cell(ours_med)} | {cell(theirs_med)} | "
              f"{cell(ratio, 2)}x | {cell(summary[model]['mpdsl_rss'], 0)} | {cell(summary[model]['pyg_rss'], 0)} | "
              f"{cell([r['first_epoch'] for r in ours])} | {cell([r['first_epoch'] for r in theirs])} |")
    print()
    for model in models:
        builds = {s: [float(np.median(r["batch_build"])) for r in runs[model, s]] for s in SYSTEMS}
        print(f"{model}: building an epoch's batches (untimed above): mpdsl select_graphs {cell(builds['mpdsl'])} s, "
              f"PyG tensors {cell(builds['pyg'])} s; mean loss of the last epoch: mpdsl "
              f"{np.median([r['losses'][-1] for r in runs[model, 'mpdsl']]):.4g}, PyG "
              f"{np.median([r['losses'][-1] for r in runs[model, 'pyg']]):.4g}")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command, "check": check, "runs":
                                               {f"{m}/{s}": r for (m, s), r in runs.items()}, "summary": summary},
                                              indent=1))


if __name__ == "__main__":
    main()
