"""Training compiled models: ``mpdsl train`` and ``mpdsl.train.fit``.

Two tasks, on the torch module of a compiled model (``CompiledModel.to_torch``: parameters named as
in the .mp file, gradients from the compiler's gradient program) with ``torch.optim.Adam``:

* ``node-classification``: one graph, full batch. The model returns one ``node[C]`` output (class
  scores, C at least the number of classes); the loss is the cross entropy on the training nodes
  and the metric the accuracy. Labels are the node array ``y`` (integers from 0); the split is the
  node masks ``train_mask`` / ``val_mask`` / ``test_mask`` (boolean or 0/1), or ``--split
  karate-4``: one labelled node per class, the first node of each class (on the karate club the
  nodes 0, 4, 8 and 24, exactly PyTorch Geometric's ``KarateClub().train_mask``), no validation
  nodes, and every other node is a test node.
* ``graph-regression``: a batch of graphs (``batch`` vector) trained in shuffled mini-batches of
  ``--batch-size`` graphs (``Graph.select_graphs``). The model returns one ``graph[K]`` output;
  the targets are the graph array ``graph_y`` (or a per-graph ``y``), [G] or [G, K]. The split is
  the graph masks ``graph_train_mask`` / ``graph_val_mask`` / ``graph_test_mask`` when present,
  else the fixed 80/10/10 split of ``mpdsl.chem.split(G, seed=0)``. ``--data tpsa`` is RDKit's
  TPSA set (``mpdsl.chem.tpsa_dataset``, 4991 molecules; ``--limit N`` keeps the first N). The
  loss is the mean squared error (``--loss mse``, default) or the mean absolute error (``--loss
  l1``) on the standardised target, (y - mean) / std with the training targets' mean and std,
  when the model's output is an affine map of parameters (``... @ W + b``, W and b used nowhere
  else): the saved weights have the scale folded into W and b, so they predict the target in its
  own units. For other outputs (or with ``--no-standardize``) the loss is on the raw target. The
  metric is the mean absolute error in the target's units; the running training MAE of an epoch
  is measured in training mode, on the mini-batches as they are trained.

Each epoch prints one line (loss, training and validation metric, seconds); a plain-text progress
bar goes to stderr (``--progress`` / ``--no-progress``; default: when stderr is a terminal). The
weights of the epoch with the best validation metric (ties: the lower validation loss; without
validation nodes or graphs, the last epoch) are restored at the end, reported on the test split
and written with ``--save`` (an .npz that ``CompiledModel.load_weights`` and ``mpdsl run
--weights`` read). ``--plot curve.png`` draws the loss and metric curves (needs matplotlib: ``pip
install "mpdsl[train]"``), ``--history h.json`` writes them as JSON.

Sampled training (``--sampler SPEC``, ``fit_sampled``): node classification on mini-batches of a
large graph (``--data`` may be a graph directory, memory-mapped). The spec names the loader and its
sizes (``mpdsl.sampling.spec``): ``neighbor:15,10`` (the training nodes as seeds, ``--batch-size``
per batch, default 1024), ``cluster:K`` (``--batch-size`` METIS parts per batch, default 1),
``saint-node:BUDGET``, ``saint-edge:BUDGET``, ``saint-rw:ROOTS,LENGTH`` (one subgraph per step;
``steps=S``, ``coverage=C``). The loss of a seeded batch is the cross entropy on its first
``batch_size`` rows; of a subgraph batch, on its rows of training nodes (with GraphSAINT's
``node_norm``: weighted by it and summed). The training accuracy of an epoch is the running figure
of its batches. ``--eval full`` evaluates with one full-graph forward (exact), ``--eval sampled``
passes the split's nodes through the sampler (seeded samplers: the split as seeds, the same draw
every epoch; cluster: every part once); ``auto`` (default) is sampled for a memory-mapped graph when
the sampler covers every node once, else full.

Distributed training (``--nproc K``, or started by torchrun): ``mpdsl.distributed`` starts or joins
the ranks (gloo on the CPU, NCCL on CUDA with the triton backend; ``--dist-timeout`` bounds every
wait); the torch module trains in ``DistributedDataParallel``; rank r takes the global batches r,
r + K, ... of every epoch; the epoch's loss, accuracy, evaluation sums and ``--max-time`` decision are
summed over the ranks in one collective, so every rank reports the same figures and stops together;
rank 0 alone logs, draws the bar, plots and writes files. A failed rank ends the run with one message.

Dropout and ``batch_norm`` follow ``train()`` / ``eval()`` (training steps in training mode: batch
statistics, running statistics updated; every evaluation in eval mode: running statistics). ``--seed`` seeds
the parameter initialisation, torch's generator (dropout masks) and the mini-batch shuffling: a run is
repeatable.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from mpdsl.backends import available_backends
from mpdsl.diagnostics import MpdslError
from mpdsl.distributed import DEFAULT_TIMEOUT
from mpdsl.graph import Graph
from mpdsl.ops import DEFAULT_INITS
from mpdsl.types import Domain

if TYPE_CHECKING:
    from mpdsl.distributed import RankContext
    from mpdsl.sampling.spec import Sampler

TASKS = ("node-classification", "graph-regression")
SPLITS = ("masks", "karate-4", "80-10-10")
LOSSES = ("mse", "l1")
GRAPH_BATCH_SIZE = 64  # graph regression's default graphs per mini-batch
TRAIN_HINT = 'pip install "mpdsl[train]"'

__all__ = [
    "EVALUATIONS",
    "SPLITS",
    "TASKS",
    "TaskData",
    "TrainError",
    "TrainResult",
    "add_arguments",
    "batch_loss",
    "evaluation_mode",
    "fit",
    "fit_sampled",
    "load_data",
    "plot_history",
    "run_cli",
]


class TrainError(MpdslError):
    """Data, model or options that do not fit the training task."""


# =====================================================================================================
# Data


@dataclass
class TaskData:
    """A training task: the graph the model runs on, the targets (node labels int64 [N], or graph
    targets float64 [G, K]) and the train / val / test index arrays (nodes or graphs)."""

    task: str
    graph: Graph
    y: np.ndarray
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    name: str
    split: str
    memory_mapped: bool = False

    @property
    def unit(self) -> str:
        return "nodes" if self.task == "node-classification" else "graphs"


def _mask_indices(graph: Graph, name: str, rows: int, kind: str) -> np.ndarray:
    mask = np.asarray(graph[name])
    if mask.ndim != 1 or mask.shape[0] != rows:
        raise TrainError(f"{name} has shape {list(mask.shape)} but needs one entry per {kind} ({rows})",
                         f"{name} is a boolean {kind} mask")
    if mask.dtype.kind != "b":
        if mask.dtype.kind not in "iuf" or not np.isin(mask, (0, 1)).all():
            raise TrainError(f"{name} must be a boolean mask (or 0/1), got dtype {mask.dtype}",
                             f"store {name} as a boolean array")
        mask = mask != 0
    return np.flatnonzero(mask).astype(np.int64)


def load_data(data: str | os.PathLike | Graph, task: str | None = None, split: str | None = None,
              limit: int | None = None) -> TaskData:
    """The task for ``data``: ``"tpsa"`` (RDKit's TPSA molecules, graph regression), an .npz path, a
    graph directory (memory-mapped: ``Graph.load(path, mmap=True)``) or a Graph. ``task`` defaults to
    graph regression for ``tpsa`` and data with ``graph_y`` or a per-graph ``y``, else node
    classification; ``split`` to the masks in the data, else (graph regression) the fixed 80/10/10
    split. ``limit`` keeps the first ``limit`` graphs (graph regression only)."""
    if task is not None and task not in TASKS:
        raise TrainError(f"unknown task {task!r}", f"use one of {', '.join(TASKS)}")
    if split is not None and split not in SPLITS:
        raise TrainError(f"unknown split {split!r}", f"use one of {', '.join(SPLITS)}")
    memory_mapped = False
    if isinstance(data, Graph):
        graph, name = data, "<graph>"
    elif str(data) == "tpsa":
        from mpdsl import chem
        dataset = chem.tpsa_dataset(limit=limit)
        graph, name = dataset.graph.with_data(graph_y=dataset.y), "tpsa"
        limit = None
        if task is None:
            task = "graph-regression"
    elif os.path.isdir(data):
        graph, name, memory_mapped = Graph.load(data, mmap=True), str(data), True
    else:
        graph, name = Graph.load(data), str(data)
    targets: list[str] = [n for n in ("graph_y", "y") if n in graph and n in graph.graph_data]
    if task is None:
        task = "graph-regression" if targets else "node-classification"
    if task == "node-classification":
        if limit is not None:
            raise TrainError("--limit selects graphs, which node classification does not use",
                             "drop --limit")
        return dataclasses.replace(_node_task(graph, name, split), memory_mapped=memory_mapped)
    return dataclasses.replace(_graph_task(graph, name, split, targets, limit), memory_mapped=memory_mapped)


def _node_task(graph: Graph, name: str, split: str | None) -> TaskData:
    if "y" not in graph.node_data:
        where = " (its 'y' has one row per graph)" if "y" in graph else ""
        raise TrainError(f"{name} has no node labels 'y'{where}",
                         "node classification needs an int node array 'y' (one class id per node)")
    y = np.asarray(graph["y"])
    if y.ndim != 1 or (y.dtype.kind == "f" and not np.all(y == np.round(y))) or y.dtype.kind not in "iuf":
        raise TrainError(f"node labels 'y' have shape {list(y.shape)} and dtype {y.dtype}",
                         "'y' holds one integer class id per node")
    y = y.astype(np.int64)
    if split in (None, "masks"):
        names = ("train_mask", "val_mask", "test_mask")
        absent = [n for n in names if n not in graph.node_data]
        if "train_mask" in absent or (split == "masks" and absent):
            raise TrainError(f"{name} has no {' / '.join(absent)} node array{'s' if len(absent) > 1 else ''}",
                             "add boolean node masks train_mask, val_mask, test_mask, or pass "
                             "--split karate-4 (one labelled node per class)")
        train, val, test = (_mask_indices(graph, n, graph.num_nodes, "node") if n in graph.node_data
                            else np.zeros(0, dtype=np.int64) for n in names)
        split = "masks"
    elif split == "karate-4":
        classes = np.unique(y[y >= 0])
        train = np.sort(np.array([int(np.flatnonzero(y == c)[0]) for c in classes], dtype=np.int64))
        val = np.zeros(0, dtype=np.int64)
        test = np.setdiff1d(np.arange(graph.num_nodes), train)
    else:
        raise TrainError(f"split {split!r} is for graph regression",
                         "node classification takes --split masks or karate-4")
    if train.size == 0:
        raise TrainError("the training split is empty", "mark at least one node in train_mask")
    labelled = np.concatenate([train, val, test])
    if (y[labelled] < 0).any():
        node = int(labelled[np.flatnonzero(y[labelled] < 0)[0]])
        raise TrainError(f"node {node} is in a split but its label y[{node}] = {y[node]} is negative",
                         "class ids count from 0")
    return TaskData("node-classification", graph, y, train, val, test, name, split)


def _graph_task(graph: Graph, name: str, split: str | None, targets: list[str], limit: int | None) -> TaskData:
    if not targets:
        raise TrainError(f"{name} has no graph targets 'graph_y'",
                         "graph regression needs a graph array 'graph_y' (one row per graph), e.g. "
                         "`python -m mpdsl.chem tpsa --out tpsa.npz`")
    if limit is not None:
        if limit < 1:
            raise TrainError(f"--limit must be at least 1, got {limit}", "keep at least one graph")
        graph = graph.select_graphs(np.arange(min(limit, graph.num_graphs)))
    y = np.asarray(graph[targets[0]], dtype=np.float64)
    y = y.reshape(y.shape[0], -1)
    names = ("graph_train_mask", "graph_val_mask", "graph_test_mask")
    if split in (None, "masks") and all(n in graph.graph_data for n in names):
        train, val, test = (_mask_indices(graph, n, graph.num_graphs, "graph") for n in names)
        split = "masks"
    elif split == "masks":
        absent = [n for n in names if n not in graph.graph_data]
        raise TrainError(f"{name} has no {' / '.join(absent)} graph array{'s' if len(absent) > 1 else ''}",
                         "add boolean graph masks, or pass --split 80-10-10")
    elif split in (None, "80-10-10"):
        from mpdsl.chem import split as fixed_split
        train, val, test = fixed_split(graph.num_graphs, seed=0)
        split = "80-10-10"
    else:
        raise TrainError(f"split {split!r} is for node classification",
                         "graph regression takes --split masks or 80-10-10")
    if train.size == 0:
        raise TrainError(f"the training split is empty ({graph.num_graphs} graphs)", "use more graphs")
    return TaskData("graph-regression", graph, y, train, val, test, name, split)


# =====================================================================================================
# The model's output


def _output_type(model, data: TaskData, graph: Graph | None = None):
    """The model's one output type, with the dims bound from ``graph`` (default ``data.graph``); checked
    against the task."""
    outputs = model.ir.outputs
    if len(outputs) != 1:
        raise TrainError(f"'{model.name}' has {len(outputs)} outputs ({', '.join(n for n, _ in outputs)})",
                         f"{data.task} trains a model with one output")
    _, value = outputs[0]
    want = Domain.NODE if data.task == "node-classification" else Domain.GRAPH
    if value.type.domain is not want or not value.type.is_float or value.type.rank > 1:
        shape = "node[C] (class scores)" if want is Domain.NODE else "graph[K] (one prediction per graph)"
        raise TrainError(f"'{model.name}' returns {value.type}, which does not fit {data.task}",
                         f"{data.task} needs a model returning {shape}")
    _, dims = model.bind(data.graph if graph is None else graph, {})
    t = value.type.substitute(dims)
    size = t.shape[0].value if t.rank == 1 else 1
    if data.task == "node-classification":
        labelled = np.concatenate([data.train, data.val, data.test])
        classes = int(data.y[labelled].max()) + 1
        if t.rank == 0 or size < classes:
            raise TrainError(f"'{model.name}' returns {t} but the labels have {classes} classes",
                             f"give the output one score per class (e.g. --dim C={classes})")
    elif size != data.y.shape[1]:
        raise TrainError(f"'{model.name}' returns {t} but the targets have {data.y.shape[1]} "
                         f"value{'s' if data.y.shape[1] > 1 else ''} per graph",
                         "make the output graph[K] with K the target width")
    return value


def _affine_output(model, value) -> tuple[str, str] | None:
    """(W, b) when the output is ``z @ W + b`` with parameters W, b used nowhere else (the target's
    scale can then be folded into them), else None."""
    if value.op != "add" or len(value.operands) != 2:
        return None
    product, bias = value.operands
    if product.op == "param":
        product, bias = bias, product
    if bias.op != "param" or product.op != "matmul" or len(product.operands) != 2:
        return None
    weight = product.operands[1]
    if weight.op != "param" or weight is bias:
        return None
    uses = sum(1 for v in model.ir.values for o in v.operands if o is weight or o is bias)
    if uses != 2 or any(o is weight or o is bias for _, o in model.ir.outputs):
        return None
    return weight.name, bias.name


# =====================================================================================================
# Progress


class ProgressBar:
    """A one-line text bar on ``stream``, redrawn at most every ``interval`` seconds."""

    def __init__(self, total: int, stream: TextIO | None = None, enabled: bool = True, width: int = 24,
                 interval: float = 0.1):
        self.total, self.stream, self.enabled = max(total, 1), stream or sys.stderr, enabled
        self.width, self.interval = width, interval
        self.done, self.start, self.drawn_at, self.shown = 0, time.perf_counter(), -math.inf, 0

    def update(self, steps: int = 1, label: str = "", force: bool = False) -> None:
        self.done = min(self.done + steps, self.total)
        now = time.perf_counter()
        if not self.enabled or (not force and now - self.drawn_at < self.interval and self.done < self.total):
            return
        self.drawn_at = now
        filled = int(self.width * self.done / self.total)
        elapsed = now - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        text = (f"[{'#' * filled}{'.' * (self.width - filled)}] {100 * self.done / self.total:3.0f}% "
                f"{_clock(elapsed)}<{_clock(eta)} {label}")
        self.stream.write("\r" + text.ljust(self.shown))
        self.stream.flush()
        self.shown = len(text)

    def clear(self) -> None:
        if self.enabled and self.shown:
            self.stream.write("\r" + " " * self.shown + "\r")
            self.stream.flush()
            self.shown = 0
            self.drawn_at = -math.inf


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60:02d}:{seconds % 60:02d}"


# =====================================================================================================
# Training


@dataclass
class TrainResult:
    """What ``fit`` returns: the per-epoch ``history`` (dicts: epoch, loss, train_metric,
    val_metric, val_loss, seconds), the best epoch and its weights (NumPy, as saved), and the
    final metrics of those weights (train / val / test, plus the baseline for regression)."""

    task: str
    metric: str
    history: list[dict[str, Any]]
    best_epoch: int
    weights: dict[str, np.ndarray]
    final: dict[str, Any]
    seconds: float
    target_scale: tuple[list[float], list[float]] | None = None
    notes: list[str] = field(default_factory=list)


def fit(model, data: TaskData, *, epochs: int = 100, lr: float = 0.01, weight_decay: float = 0.0,
        batch_size: int = 64, loss: str = "mse", standardize: bool = True, seed: int = 0,
        max_seconds: float | None = None, log: Callable[[str], None] | None = None, log_every: int = 1,
        progress: ProgressBar | bool = False) -> TrainResult:
    """Train ``model`` (a CompiledModel) on ``data`` with Adam and return a ``TrainResult``. The
    compiled model ends holding the best weights. ``max_seconds`` stops after the epoch that passes
    that much training time. ``log`` receives the line of every ``log_every``-th epoch (and of the
    first and the last); ``progress`` draws a bar on stderr. See the module docstring for the tasks,
    losses and the best epoch."""
    import torch

    if loss not in LOSSES:
        raise TrainError(f"unknown loss {loss!r}", f"use one of {', '.join(LOSSES)}")
    log = log or (lambda line: None)
    output = _output_type(model, data)
    torch.manual_seed(seed)
    if not model.param_types:
        raise TrainError(f"'{model.name}' has no parameters to train", "declare param arguments in the model")
    module = model.to_torch(data.graph)
    dtype = next(module.parameters()).dtype
    optimizer = torch.optim.Adam(module.parameters(), lr=lr, weight_decay=weight_decay)
    regression = data.task == "graph-regression"
    split_of = {"train": data.train, "val": data.val, "test": data.test}
    notes: list[str] = []
    rng = np.random.default_rng(seed)

    if regression:
        affine = _affine_output(model, output) if standardize else None
        if standardize and affine is None:
            notes.append(f"target not standardised: the output of '{model.name}' is not `z @ W + b` with "
                         "parameters used nowhere else, so the scale could not be folded into the weights")
        mean = data.y[data.train].mean(axis=0) if affine else np.zeros(data.y.shape[1])
        std = data.y[data.train].std(axis=0) if affine else np.ones(data.y.shape[1])
        std = np.where(std > 0, std, 1.0)
        scaled = torch.from_numpy((data.y - mean) / std).to(dtype)
        criterion = torch.nn.functional.mse_loss if loss == "mse" else torch.nn.functional.l1_loss
        batches = max(1, math.ceil(data.train.size / batch_size))
        eval_graphs = {part: data.graph.select_graphs(idx) for part, idx in split_of.items() if idx.size}
    else:
        affine, mean, std = None, None, None
        labels = torch.from_numpy(data.y)
        batches = 1
    bar = progress if isinstance(progress, ProgressBar) else ProgressBar(epochs * batches, enabled=bool(progress))

    def evaluate(*parts: str) -> dict[str, tuple[float, float]]:
        """{part: (loss, metric)} of the current weights, in eval mode ((nan, nan) for an empty part)."""
        module.eval()
        result = {}
        with torch.no_grad():
            out = None if regression or not any(split_of[p].size for p in parts) else module(data.graph)
            for part in parts:
                idx = split_of[part]
                if idx.size == 0:
                    result[part] = (math.nan, math.nan)
                elif regression:
                    graph = eval_graphs[part]
                    predicted = module(graph).reshape(graph.num_graphs, -1)
                    value = criterion(predicted, scaled[idx]).item()
                    error = np.abs(predicted.double().numpy() * std + mean - data.y[idx]).mean()
                    result[part] = (value, float(error))
                else:
                    assert out is not None  # run above: classification with this part non-empty
                    value = torch.nn.functional.cross_entropy(out[idx], labels[idx]).item()
                    result[part] = (value, float((out[idx].argmax(-1) == labels[idx]).double().mean().item()))
        return result

    metric = "mae" if regression else "acc"
    epochs_kept = _Epochs(module, epochs, metric, bar, log, log_every, max_seconds, bool(data.val.size), notes)
    history = epochs_kept.history
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        epoch_start = time.perf_counter()
        module.train()
        if regression:
            order = rng.permutation(data.train)
            total_loss, total_error, seen = 0.0, 0.0, 0
            for b in range(batches):
                idx = order[b * batch_size:(b + 1) * batch_size]
                graph = data.graph.select_graphs(idx)
                optimizer.zero_grad()
                out = module(graph).reshape(len(idx), -1)
                value = criterion(out, scaled[idx])
                value.backward()
                optimizer.step()
                total_loss += value.item() * len(idx)
                predicted = out.detach().double().numpy() * std + mean
                total_error += float(np.abs(predicted - data.y[idx]).mean(axis=1).sum())
                seen += len(idx)
                bar.update(1, f"epoch {epoch}/{epochs} loss {total_loss / seen:.4f}")
            train_loss, train_metric = total_loss / seen, total_error / seen
        else:
            optimizer.zero_grad()
            out = module(data.graph)
            value = torch.nn.functional.cross_entropy(out[data.train], labels[data.train])
            value.backward()
            optimizer.step()
            train_loss = value.item()
            bar.update(1, f"epoch {epoch}/{epochs} loss {train_loss:.4f}")
        figures = evaluate("train", "val") if not regression else evaluate("val")
        if not regression:
            train_metric = figures["train"][1]
        val_loss, val_metric = figures["val"]
        seconds = time.perf_counter() - epoch_start
        record = {"epoch": epoch, "loss": train_loss, "train_metric": train_metric, "val_metric": val_metric,
                  "val_loss": val_loss, "seconds": seconds}
        stop = max_seconds is not None and time.perf_counter() - start >= max_seconds and epoch < epochs
        if epochs_kept.end(record, (-val_metric if not regression else val_metric, val_loss), stop):
            break
    seconds = time.perf_counter() - start
    bar.clear()
    best_epoch, best_weights = epochs_kept.best_epoch, epochs_kept.best_weights

    module.load_state_dict({k: torch.from_numpy(v) for k, v in best_weights.items()})
    final: dict[str, Any] = {}
    for part, (part_loss, part_metric) in evaluate("train", "val", "test").items():
        final[f"{part}_loss"], final[f"{part}_{metric}"] = part_loss, part_metric
    final["sizes"] = {"train": int(data.train.size), "val": int(data.val.size), "test": int(data.test.size)}
    weights = dict(best_weights)
    if regression:
        train_mean = data.y[data.train].mean(axis=0)
        if data.test.size:
            final["baseline_test_mae"] = float(np.abs(data.y[data.test] - train_mean).mean())
        final["train_mean"] = train_mean.tolist()
        if affine is not None:
            w_name, b_name = affine
            weights[w_name] = (weights[w_name] * std).astype(weights[w_name].dtype)
            weights[b_name] = (weights[b_name] * std + mean).astype(weights[b_name].dtype)
    model.load_weights(weights)
    module.train(False)
    target_scale: tuple[list[float], list[float]] | None = None
    if affine is not None:
        assert mean is not None and std is not None  # set with affine (graph regression only)
        target_scale = (mean.tolist(), std.tolist())
    return TrainResult(data.task, metric, history, best_epoch, weights, final, seconds, target_scale, notes)


EVALUATIONS = ("auto", "full", "sampled")


def evaluation_mode(evaluation: str, sampler: Sampler, data: TaskData) -> str:
    """``full`` or ``sampled`` for ``--eval`` (``auto``: sampled for a memory-mapped graph when the
    sampler covers a split in one pass, else full); a TrainError for a mode the sampler cannot do."""
    if evaluation not in EVALUATIONS:
        raise TrainError(f"unknown evaluation {evaluation!r}", f"use one of {', '.join(EVALUATIONS)}")
    if evaluation == "auto":
        return "sampled" if data.memory_mapped and sampler.covers else "full"
    if evaluation == "sampled" and not sampler.covers:
        raise TrainError(f"--eval sampled needs a sampler whose one pass covers every node once, and the "
                         f"{sampler.name} sampler's subgraphs do not", "use --eval full (one full-graph forward)")
    return evaluation


def _identity(batch):
    return batch


def _rank_share(loader, rank: int, world_size: int, **options: Any):
    """The batches ``rank``, ``rank + world_size``, ... of one unshuffled pass over all the global
    batches of ``loader`` (a SampleLoader): the ranks' shares together hold every batch once (the
    training schedule instead drops an incomplete last round)."""
    import torch.utils.data

    from mpdsl.sampling.loader import batch_key

    schedule = loader.schedule
    order, size = schedule.epoch_order(0), schedule.batch_size
    items = [(batch_key(schedule.seed, 0, k), order[k * size:(k + 1) * size])
             for k in range(rank, schedule.global_batches(), world_size)]
    return torch.utils.data.DataLoader(loader.dataset, batch_size=None, sampler=items, collate_fn=_identity,
                                       **options)


def _batch_rows(batch, members: np.ndarray | None) -> np.ndarray:
    """The local rows of ``batch`` a loss or metric uses: the seeds (``members`` None), else the rows
    whose global node is in ``members`` (a boolean node mask)."""
    if members is None:
        return np.arange(batch.batch_size)
    return np.flatnonzero(members[batch.n_id])


def batch_loss(out, batch, labels, members: np.ndarray | None) -> tuple[Any, int, int]:
    """(loss, correct, rows) of a training batch with class scores ``out``: the cross entropy on the
    batch's seeds (``members`` None: the first ``batch_size`` rows, mean), or on the rows whose node is
    in the training mask ``members`` (mean; GraphSAINT batches, with a ``node_norm`` array: the sum
    of the row losses weighted by ``node_norm``, GraphSAINT's unbiased loss); ``correct``: the rows
    whose top score is their label. ``labels``: int64 tensor [N] of every node's class."""
    import torch

    rows = _batch_rows(batch, members)
    scores = out[torch.from_numpy(rows).to(out.device)]
    target = labels[torch.from_numpy(batch.n_id[rows])].to(out.device)
    row_losses = torch.nn.functional.cross_entropy(scores, target, reduction="none")
    if members is not None and "node_norm" in batch:
        weights = torch.from_numpy(np.asarray(batch["node_norm"])[rows]).to(out.device, out.dtype)
        value = (row_losses * weights).sum()
    else:
        value = row_losses.sum() / max(len(rows), 1)  # a batch without training rows: 0, zero gradients
    return value, int((scores.argmax(-1) == target).sum().item()), len(rows)


class _Evaluator:
    """The loss and accuracy sums of the splits under the current weights, in eval mode: ``full``, one
    forward on the whole graph (on rank 0; the other ranks add zeros); ``sampled``, each rank its
    share of every batch of the split's loader (seeded samplers: a loader of the split's nodes,
    unshuffled; subgraph samplers: every batch of the training loader, the split's rows)."""

    def __init__(self, mode: str, module, data: TaskData, sampler: Sampler, train_loader, labels, *,
                 batch_size: int | None, seed: int, rank: int, world_size: int, options: dict[str, Any]):
        self.mode, self.module, self.data, self.sampler = mode, module, data, sampler
        self.train_loader, self.labels = train_loader, labels
        self.batch_size, self.seed, self.rank, self.world_size, self.options = (batch_size, seed, rank, world_size,
                                                                               options)
        self.split_of = {"train": data.train, "val": data.val, "test": data.test}
        self.loaders: dict[str, Any] = {}
        self.members: dict[str, np.ndarray] = {}

    def sums(self, *parts: str) -> list[float]:
        """[loss sum, correct, count] per part, this rank's contribution, flat."""
        import torch

        totals = {part: [0.0, 0.0, 0.0] for part in parts}
        wanted = [p for p in parts if self.split_of[p].size]
        self.module.eval()
        with torch.no_grad():
            if self.mode == "full":
                if self.rank == 0 and wanted:
                    out = self.module(_full_graph(self.module.compiled, self.data.graph))
                    for part in wanted:
                        idx = self.split_of[part]
                        self._add(totals[part], out[torch.from_numpy(idx).to(out.device)], idx)
            elif self.sampler.seeded:
                for part in wanted:
                    for batch in _rank_share(self._seed_loader(part), self.rank, self.world_size, **self.options):
                        out = self.module(batch.graph)
                        self._add(totals[part], out[:batch.batch_size], batch.n_id[:batch.batch_size])
            elif wanted:
                for batch in _rank_share(self.train_loader, self.rank, self.world_size, **self.options):
                    out = self.module(batch.graph)
                    for part in wanted:
                        rows = _batch_rows(batch, self._members(part))
                        self._add(totals[part], out[torch.from_numpy(rows).to(out.device)], batch.n_id[rows])
        return [value for part in parts for value in totals[part]]

    def _add(self, total: list[float], scores, nodes: np.ndarray) -> None:
        import torch

        target = self.labels[torch.from_numpy(np.ascontiguousarray(nodes))].to(scores.device)
        total[0] += torch.nn.functional.cross_entropy(scores, target, reduction="sum").item()
        total[1] += int((scores.argmax(-1) == target).sum().item())
        total[2] += len(nodes)

    def _seed_loader(self, part: str):
        if part not in self.loaders:
            self.loaders[part] = self.sampler.loader(self.data.graph, self.split_of[part], batch_size=self.batch_size,
                                                     shuffle=False, seed=self.seed)
        return self.loaders[part]

    def _members(self, part: str) -> np.ndarray:
        if part not in self.members:
            self.members[part] = _node_mask(self.data.graph.num_nodes, self.split_of[part])
        return self.members[part]


def _node_mask(num_nodes: int, nodes: np.ndarray) -> np.ndarray:
    mask = np.zeros(num_nodes, dtype=bool)
    mask[nodes] = True
    return mask


def _full_graph(model, graph: Graph) -> Graph:
    """``graph`` for a full-graph forward: a model reading GraphSAINT's ``edge_norm`` / ``node_norm``
    (scalars per row, which sampled batches carry) gets ones, the coefficients of the whole graph (the
    aggregation that sampled training estimates without bias)."""
    ones = {name: np.ones(graph.num_rows(t.domain)) for name, t in model.input_types.items()
            if name in ("edge_norm", "node_norm") and name not in graph and t.rank == 0}
    return graph.with_data(**ones) if ones else graph


def _figures(sums: list[float], parts: tuple[str, ...]) -> dict[str, tuple[float, float]]:
    """{part: (mean loss, accuracy)} from ``_Evaluator.sums`` added over the ranks ((nan, nan): empty)."""
    result = {}
    for i, part in enumerate(parts):
        loss_sum, correct, count = sums[3 * i:3 * i + 3]
        result[part] = (loss_sum / count, correct / count) if count else (math.nan, math.nan)
    return result


def fit_sampled(model, data: TaskData, sampler: Sampler | str, *, epochs: int = 100, lr: float = 0.01,
                weight_decay: float = 0.0, batch_size: int | None = None, seed: int = 0, evaluation: str = "auto",
                max_seconds: float | None = None, log: Callable[[str], None] | None = None, log_every: int = 1,
                progress: ProgressBar | bool = False, num_workers: int = 0,
                distributed: RankContext | None = None) -> TrainResult:
    """Train ``model`` for node classification on ``data`` in sampled mini-batches (``sampler``: a
    ``Sampler`` or a spec such as ``"neighbor:15,10"``, ``mpdsl.sampling.spec``) with Adam, and
    return a ``TrainResult`` (the compiled model ends holding the best weights). The training nodes are
    the seeds, shuffled every epoch (seeded by ``seed``); ``batch_size`` is the sampler's unit count
    per batch (its default when None); ``num_workers`` samples in DataLoader worker processes.
    ``evaluation``: ``full``, ``sampled`` or ``auto`` (module docstring). ``distributed`` (this rank's
    context, ``mpdsl.distributed``): the module trains under DistributedDataParallel, this rank takes
    its share of each step's batches, the figures are summed over the ranks and only rank 0 logs and
    draws the bar. ``log``, ``log_every``, ``progress``, ``max_seconds``: as ``fit``."""
    import torch

    from mpdsl.sampling.batch import make_batch
    from mpdsl.sampling.spec import parse_sampler

    if data.task != "node-classification":
        raise TrainError(f"sampled training is for node classification, not {data.task}",
                         "graph regression trains in mini-batches of whole graphs: drop --sampler")
    sampler = parse_sampler(sampler) if isinstance(sampler, str) else sampler
    mode = evaluation_mode(evaluation, sampler, data)
    rank, world_size = (distributed.rank, distributed.world_size) if distributed is not None else (0, 1)
    main = rank == 0
    log = log if log is not None and main else (lambda line: None)
    device = distributed.device if distributed is not None else torch.device("cpu")
    probe = make_batch(data.graph, np.zeros(1, dtype=np.int64), np.zeros((2, 0), dtype=np.int64),
                       np.zeros(0, dtype=np.int64), 1).graph  # one node: binds the dims, reads one row
    _output_type(model, data, probe)
    if not model.param_types:
        raise TrainError(f"'{model.name}' has no parameters to train", "declare param arguments in the model")
    torch.manual_seed(seed)
    module = model.to_torch(probe).to(device)
    trained = distributed.wrap(module) if distributed is not None else module
    optimizer = torch.optim.Adam(trained.parameters(), lr=lr, weight_decay=weight_decay)
    options: dict[str, Any] = {"num_workers": num_workers} if num_workers else {}
    loader = sampler.loader(data.graph, data.train, batch_size=batch_size, shuffle=True, seed=seed, rank=rank,
                            world_size=world_size, **options)
    steps = len(loader)
    if steps == 0:
        raise TrainError(f"the {sampler.name} sampler gives no training batch", "use a smaller --batch-size")
    labels = torch.from_numpy(data.y)
    members = None if sampler.seeded else _node_mask(data.graph.num_nodes, data.train)
    evaluator = _Evaluator(mode, module, data, sampler, loader, labels, batch_size=batch_size, seed=seed, rank=rank,
                           world_size=world_size, options=options)

    def total(values: list[float]) -> list[float]:
        return distributed.all_reduce_sum(values) if distributed is not None else values

    bar = progress if isinstance(progress, ProgressBar) else ProgressBar(epochs * steps,
                                                                        enabled=bool(progress) and main)
    notes: list[str] = []
    epochs_kept = _Epochs(module, epochs, "acc", bar, log, log_every, max_seconds, bool(data.val.size), notes)
    history = epochs_kept.history
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        epoch_start = time.perf_counter()
        trained.train()
        loader.set_epoch(epoch - 1)
        loss_sum, correct, count = 0.0, 0, 0
        for step, batch in enumerate(loader, 1):
            optimizer.zero_grad()
            value, hits, rows = batch_loss(trained(batch.graph), batch, labels, members)
            value.backward()
            optimizer.step()
            loss_sum, correct, count = loss_sum + value.item(), correct + hits, count + rows
            bar.update(1, f"epoch {epoch}/{epochs} loss {loss_sum / step:.4f}")
        local = [loss_sum, float(steps), float(correct), float(count)] + evaluator.sums("val")
        over_time = max_seconds is not None and time.perf_counter() - start >= max_seconds
        sums = total(local + [float(over_time)])  # one collective per epoch: every rank decides alike
        train_loss = sums[0] / sums[1]
        val_loss, val_metric = _figures(sums[4:7], ("val",))["val"]
        record = {"epoch": epoch, "loss": train_loss, "train_metric": sums[2] / sums[3] if sums[3] else math.nan,
                  "val_metric": val_metric, "val_loss": val_loss, "seconds": time.perf_counter() - epoch_start}
        if epochs_kept.end(record, (-val_metric, val_loss), stop=sums[7] > 0 and epoch < epochs):
            break
    seconds = time.perf_counter() - start
    bar.clear()
    best_epoch, best_weights = epochs_kept.best_epoch, epochs_kept.best_weights

    module.load_state_dict({k: torch.from_numpy(v) for k, v in best_weights.items()})
    parts = ("train", "val", "test")
    final: dict[str, Any] = {}
    for part, (part_loss, part_metric) in _figures(total(evaluator.sums(*parts)), parts).items():
        final[f"{part}_loss"], final[f"{part}_acc"] = part_loss, part_metric
    final["sizes"] = {"train": int(data.train.size), "val": int(data.val.size), "test": int(data.test.size)}
    final["evaluation"] = mode
    model.load_weights(best_weights)
    module.train(False)
    return TrainResult(data.task, "acc", history, best_epoch, dict(best_weights), final, seconds, None, notes)


class _Epochs:
    """The end of each training epoch, as ``fit`` and ``fit_sampled`` share it: the record joins the
    history; a non-finite loss ends the run; the weights of the best epoch are kept (the lowest ``key``,
    ties by order; every epoch is the best without validation nodes or graphs); the epoch's line is
    logged every ``log_every``-th epoch, the first, the last and a stopping one."""

    def __init__(self, module, epochs: int, metric: str, bar: ProgressBar, log: Callable[[str], None],
                 log_every: int, max_seconds: float | None, validated: bool, notes: list[str]):
        self.module, self.epochs, self.metric, self.bar, self.log = module, epochs, metric, bar, log
        self.log_every, self.max_seconds, self.validated = log_every, max_seconds, validated
        self.history: list[dict[str, Any]] = []
        self.notes = notes  # the run's notes: a --max-time stop is added to them
        self.best: tuple[float, float] | None = None
        self.best_epoch, self.best_weights = 0, module.weights()

    def end(self, record: dict[str, Any], key: tuple[float, float], stop: bool) -> bool:
        """Close the epoch of ``record``; True when training stops after it (``stop``: --max-time)."""
        epoch = record["epoch"]
        self.history.append(record)
        if not math.isfinite(record["loss"]):
            self.bar.clear()
            raise TrainError(f"the training loss is {record['loss']} at epoch {epoch}", "lower --lr")
        if not self.validated or self.best is None or key < self.best:
            self.best, self.best_epoch, self.best_weights = key, epoch, self.module.weights()
        if epoch % self.log_every == 0 or epoch in (1, self.epochs) or stop:
            self.bar.clear()
            self.log(_epoch_line(record, self.epochs, self.metric))
        if stop:
            self.notes.append(f"stopped after epoch {epoch}: --max-time {self.max_seconds:g} s reached")
        return stop


def _loss_name(task: str, loss: str, standardized: bool) -> str:
    if task == "node-classification":
        return "cross entropy"
    return f"{'MSE' if loss == 'mse' else 'L1'} on the {'standardised' if standardized else 'raw'} target"


def _fmt(value: float, digits: int = 4) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _epoch_line(record: dict[str, Any], epochs: int, metric: str) -> str:
    width = len(str(epochs))
    return (f"epoch {record['epoch']:>{width}}/{epochs}  loss {_fmt(record['loss'])}  "
            f"train_{metric} {_fmt(record['train_metric'])}  val_{metric} {_fmt(record['val_metric'])}  "
            f"val_loss {_fmt(record['val_loss'])}  {record['seconds']:.2f} s")


# =====================================================================================================
# Plot


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise TrainError("--plot needs matplotlib, which is not installed", TRAIN_HINT) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_history(history: list[dict[str, Any]], path: str | os.PathLike, metric: str = "acc",
                 title: str = "", loss_name: str = "loss") -> None:
    """Loss (training, validation) and metric (training, validation) per epoch, as a PNG."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in history]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [r["loss"] for r in history], label="train")
    if any(math.isfinite(r["val_loss"]) for r in history):
        left.plot(epochs, [r["val_loss"] for r in history], label="validation")
    left.set_xlabel("epoch")
    left.set_ylabel(loss_name)
    left.set_title("loss")
    left.legend()
    names = {"acc": "accuracy", "mae": "mean absolute error"}
    right.plot(epochs, [r["train_metric"] for r in history], label="train")
    if any(math.isfinite(r["val_metric"]) for r in history):
        right.plot(epochs, [r["val_metric"] for r in history], label="validation")
    right.set_xlabel("epoch")
    right.set_ylabel(names.get(metric, metric))
    right.set_title(names.get(metric, metric))
    right.legend()
    if metric == "mae":
        left.set_yscale("log")
        right.set_yscale("log")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    try:
        figure.savefig(path, format="png", dpi=100)
    except OSError as err:
        raise TrainError(f"cannot write the plot {path}: {err.strerror or err}",
                         "pass a writable file path to --plot") from None
    finally:
        plt.close(figure)


# =====================================================================================================
# Command line


def _bounded(convert, lowest: float, inclusive: bool, what: str):
    """An argparse type: ``convert(text)``, finite and >= (or >) ``lowest``."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value) or not (value >= lowest if inclusive else value > lowest):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive_int = _bounded(int, 1, True, "a positive integer")
_positive_float = _bounded(float, 0.0, False, "a positive number")
_non_negative_float = _bounded(float, 0.0, True, "a number >= 0")
_non_negative_int = _bounded(int, 0, True, "an integer >= 0")


def _sampler_spec(text: str) -> str:
    """The argparse type of --sampler: the spec, checked (``mpdsl.sampling.spec``)."""
    from mpdsl.sampling.spec import parse_sampler

    try:
        parse_sampler(text)
    except MpdslError as err:
        raise argparse.ArgumentTypeError(err.message + (f"; {err.hint}" if err.hint else "")) from None
    return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``mpdsl train`` (beside model_file, --model, --dim, --dtype)."""
    p.add_argument("--data", required=True,
                   help="an .npz graph (node labels y and masks; or graph targets graph_y), or 'tpsa' "
                        "(RDKit's TPSA molecules)")
    p.add_argument("--task", choices=TASKS,
                   help="default: graph-regression for tpsa or data with graph_y, else node-classification")
    p.add_argument("--split", choices=SPLITS,
                   help="masks: the data's train/val/test masks; karate-4: the first node of each class "
                        "(PyG's KarateClub train_mask), test on the others; 80-10-10: mpdsl.chem.split "
                        "(default for graph regression without graph masks)")
    p.add_argument("--limit", type=_positive_int, help="graph regression: keep the first N graphs")
    p.add_argument("--epochs", type=_positive_int, default=100, help="default 100")
    p.add_argument("--lr", type=_positive_float, default=0.01, help="Adam's learning rate (default 0.01)")
    p.add_argument("--weight-decay", type=_non_negative_float, default=0.0, help="Adam's L2 weight decay (default 0)")
    p.add_argument("--batch-size", type=_positive_int,
                   help=f"graph regression: graphs per mini-batch (default {GRAPH_BATCH_SIZE}); with --sampler: "
                        "seed nodes (neighbor, default 1024) or clusters (cluster, default 1) per batch")
    p.add_argument("--loss", choices=LOSSES, default="mse",
                   help="graph regression: mse (default) or l1, on the standardised target")
    p.add_argument("--no-standardize", dest="standardize", action="store_false",
                   help="graph regression: train on the raw target")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the initialisation, dropout and shuffling (default 0)")
    p.add_argument("--init", choices=DEFAULT_INITS, default="torch",
                   help="the initialisers of parameters with none written in the file: torch (default; "
                        "torch.nn.Linear's weights and biases) or glorot (glorot weights, zero biases)")
    p.add_argument("--max-time", type=_positive_float, metavar="SECONDS",
                   help="stop after the epoch that passes this much training time")
    p.add_argument("--save", metavar="WEIGHTS.npz", help="write the best weights (by validation metric)")
    p.add_argument("--plot", metavar="CURVE.png", help="write the loss and metric curves (needs matplotlib)")
    p.add_argument("--history", metavar="FILE.json", help="write the per-epoch figures and the final metrics")
    p.add_argument("--log-every", type=_positive_int, default=1, help="print every N-th epoch (default 1)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="the progress bar on stderr (default: when stderr is a terminal)")
    p.add_argument("--backend", default="numpy", choices=available_backends(), help="the backend (default numpy)")
    sampled = p.add_argument_group("sampled and distributed training (node classification)")
    sampled.add_argument("--sampler", type=_sampler_spec, metavar="SPEC",
                         help="train on sampled mini-batches: neighbor:F1,F2,... (fanout per layer, -1: all; "
                              "option replace=yes), cluster:K, saint-node:BUDGET, saint-edge:BUDGET, "
                              "saint-rw:ROOTS,LENGTH (saint options steps=S, coverage=C)")
    sampled.add_argument("--eval", dest="evaluation", choices=EVALUATIONS, default="auto",
                         help="with --sampler: full (one full-graph forward, exact), sampled (the splits' nodes "
                              "through the sampler) or auto (default: sampled for a memory-mapped graph "
                              "directory when the sampler covers the nodes, else full)")
    sampled.add_argument("--workers", type=_non_negative_int, default=0,
                         help="with --sampler: DataLoader worker processes sampling per rank (default 0)")
    sampled.add_argument("--nproc", type=_positive_int, metavar="K",
                         help="with --sampler: train in K processes (torch.distributed, DDP; gloo on the CPU, "
                              "NCCL with --backend triton on CUDA); under torchrun leave it out")
    sampled.add_argument("--dist-timeout", type=_positive_float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                         help=f"the longest wait for another rank, joining and at each collective "
                              f"(default {DEFAULT_TIMEOUT:g})")


def run_cli(args: argparse.Namespace, dims: dict[str, int]) -> int:
    """``mpdsl train``: returns the exit code; user errors raise MpdslError (exit 1 in the CLI). With
    ``--nproc K`` it starts K ranks; started by torchrun (its variables set) it is one rank of them."""
    try:
        import torch
    except ImportError:
        raise TrainError("training needs torch, which is not installed", TRAIN_HINT) from None
    from mpdsl import distributed

    environment = distributed.from_environment()
    world_size = environment["world_size"] if environment is not None else 1
    if args.nproc is not None and environment is not None:
        raise TrainError(f"--nproc starts its own ranks, but this process is rank {environment['rank']} of "
                         f"{world_size} already (RANK / WORLD_SIZE are set, e.g. by torchrun)",
                         "drop --nproc: torchrun --nproc-per-node K starts the ranks")
    ranks = args.nproc or world_size
    if args.sampler is None:
        if ranks > 1:
            raise TrainError(f"{ranks} processes share the batches of an epoch, and full-batch training has one",
                             "add --sampler (e.g. --sampler neighbor:15,10) to train sampled mini-batches")
        if args.evaluation == "sampled":
            raise TrainError("--eval sampled evaluates through the --sampler", "add --sampler, or drop --eval")
        if args.workers:
            raise TrainError("--workers sets the processes sampling batches", "add --sampler, or drop --workers")
    elif args.task == "graph-regression" or args.data == "tpsa":
        raise TrainError("--sampler samples one large graph for node classification",
                         "graph regression trains in mini-batches of whole graphs (--batch-size): drop --sampler")
    if args.plot:
        _pyplot()  # fail before training, not after
    cuda = args.backend == "triton" and torch.cuda.is_available()
    if ranks > 1 and environment is None:
        _compile_cli_model(args, dims)  # a bad model file is one error here, not one per rank
        distributed.launch(ranks, _launched_rank, (args, dims), timeout=args.dist_timeout, cuda=cuda)
        return 0
    if ranks > 1:
        assert environment is not None  # ranks > 1 without --nproc: torchrun's world
        context = distributed.initialize(environment["rank"], world_size, local_rank=environment["local_rank"],
                                         cuda=cuda, timeout=args.dist_timeout)
        try:
            return _train_cli(args, dims, context)
        except Exception as err:  # one line naming this rank, as the launcher reports its ranks
            raise distributed.rank_failure(context.rank, err) from None
        finally:
            distributed.shutdown()
    return _train_cli(args, dims, None)


def _launched_rank(context: RankContext, args: argparse.Namespace, dims: dict[str, int]) -> None:
    """One rank started by ``--nproc`` (``mpdsl.distributed.launch``)."""
    _train_cli(args, dims, context)


def _compile_cli_model(args: argparse.Namespace, dims: dict[str, int]):
    from mpdsl.api import compile as compile_model

    return compile_model(Path(args.model_file), backend=args.backend, model=args.model, dtype=args.dtype,
                         dims=dims, seed=args.seed, import_paths=args.import_paths, init=args.init)


def _train_cli(args: argparse.Namespace, dims: dict[str, int], context: RankContext | None) -> int:
    """Train as the options say, in this process (one rank of ``context`` when given: rank 0 alone
    prints, plots and writes files)."""
    main = context is None or context.is_main
    start = time.perf_counter()
    data = load_data(args.data, args.task, args.split, args.limit)
    model = _compile_cli_model(args, dims)

    def say(line: str, **where: Any) -> None:
        if main:
            print(line, flush=True, **where)

    sizes = f"{data.train.size}/{data.val.size}/{data.test.size} {data.unit}"
    batches = "" if args.sampler is None else f"; sampler {args.sampler}" + (
        f", {context.world_size} ranks" if context is not None else "")
    say(f"{model.name} on {data.name}: {data.task}, {data.graph.num_nodes} nodes, {data.graph.num_edges} "
        f"edges, {data.graph.num_graphs} graph(s); split {data.split} (train/val/test {sizes}){batches}")
    enabled = main and (sys.stderr.isatty() if args.progress is None else args.progress)
    common = {"epochs": args.epochs, "lr": args.lr, "weight_decay": args.weight_decay, "seed": args.seed,
              "max_seconds": args.max_time, "log": say, "log_every": args.log_every, "progress": enabled}
    if args.sampler is not None:
        result = fit_sampled(model, data, args.sampler, batch_size=args.batch_size, evaluation=args.evaluation,
                             num_workers=args.workers, distributed=context, **common)
    else:
        result = fit(model, data, batch_size=args.batch_size or GRAPH_BATCH_SIZE, loss=args.loss,
                     standardize=args.standardize, **common)
    if not main:
        return 0
    for note in result.notes:
        say(f"note: {note}")
    m, final = result.metric, result.final
    best_note = "" if data.val.size else " (no validation split: the last epoch)"
    evaluated = f", evaluated {final['evaluation']}" if "evaluation" in final else ""
    say(f"best epoch {result.best_epoch}{best_note}: train_{m} {_fmt(final[f'train_{m}'])}  "
        f"val_{m} {_fmt(final[f'val_{m}'])}  test_{m} {_fmt(final[f'test_{m}'])} "
        f"({data.test.size} test {data.unit}{evaluated})")
    if "baseline_test_mae" in final:
        say(f"baseline (training mean {', '.join(f'{v:.4g}' for v in final['train_mean'])}): "
            f"test_mae {_fmt(final['baseline_test_mae'])}; model / baseline = "
            f"{final['test_mae'] / final['baseline_test_mae']:.4f}")
    written = []
    if args.save:
        try:
            model.save_weights(args.save)
        except OSError as err:
            raise TrainError(f"cannot write the weights {args.save}: {err.strerror or err}",
                             "pass a writable file path to --save") from None
        written.append(f"weights -> {args.save}")
    if args.plot:
        plot_history(result.history, args.plot, result.metric, f"{model.name} on {Path(data.name).name}",
                     _loss_name(data.task, args.loss, result.target_scale is not None))
        written.append(f"plot -> {args.plot}")
    if args.history:
        record = {"model": model.name, "data": data.name, "task": data.task, "split": data.split,
                  "metric": result.metric, "best_epoch": result.best_epoch, "final": final,
                  "seconds": result.seconds, "target_scale": result.target_scale, "history": result.history,
                  "options": {k: v for k, v in vars(args).items() if k != "func"}}
        try:
            Path(args.history).write_text(json.dumps(_plain(record), indent=1))
        except OSError as err:
            raise TrainError(f"cannot write the history {args.history}: {err.strerror or err}",
                             "pass a writable file path to --history") from None
        written.append(f"history -> {args.history}")
    params = sum(int(p.size) for p in model.params.values())
    say(f"[mpdsl] trained {model.name}: {len(result.history)} epochs in {result.seconds:.1f} s "
        f"({time.perf_counter() - start:.1f} s in all), {params} parameters" + "".join(f"; {w}" for w in written),
        file=sys.stderr)
    return 0


def _plain(value: Any) -> Any:
    """``value`` as strict JSON data (NaN and infinities as null)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, (np.integer, np.floating)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
