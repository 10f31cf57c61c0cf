"""Distributed training on torch.distributed (gloo, 2 processes on the CPU): DDP's gradients against
the single-process gradient of both ranks' batches, a short run's loss curve against the same
schedule trained in one process, rank 0 alone writing the output, a failed or killed rank ending the
run at once with one message, and torchrun's variables.

The functions the ranks run are module-level (the spawn start method pickles them by name)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mpdsl import cli, distributed  # noqa: E402
from mpdsl.distributed import DistributedError, launch  # noqa: E402
from mpdsl.sampling import spec  # noqa: E402
from mpdsl.train import _launched_rank, batch_loss, fit_sampled, load_data  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sampling_helpers import (  # noqa: E402
    SAGE,
    NumpyNeighborLoader,
    community_graph,
    compiled,
    neighbor_sampler,
    reference_curve,
)

SAMPLER = neighbor_sampler((3, 2))
BATCH = 6  # 30 training nodes: 5 global batches, 2 steps of 2 ranks per epoch


def one_step_gradients(context, out: Path) -> None:
    data = load_data(community_graph())
    torch.manual_seed(0)
    module = compiled().to_torch(data.graph)
    trained = context.wrap(module)
    loader = SAMPLER.loader(data.graph, data.train, batch_size=BATCH, shuffle=True, seed=1, rank=context.rank,
                            world_size=context.world_size)
    batch = next(iter(loader))
    value, _, _ = batch_loss(trained(batch.graph), batch, torch.from_numpy(data.y), None)
    value.backward()
    np.savez(out / f"rank{context.rank}.npz", seeds=batch.n_id[:batch.batch_size],
             **{name: p.grad.numpy() for name, p in module.named_parameters()})


def sampled_run(context, out: Path) -> None:
    lines: list[str] = []
    result = fit_sampled(compiled(), load_data(community_graph()), SAMPLER, batch_size=BATCH, epochs=3, lr=0.03,
                         log=lines.append, distributed=context, evaluation="sampled")
    (out / f"rank{context.rank}.json").write_text(json.dumps(
        {"history": result.history, "final": result.final, "lines": lines, "best_epoch": result.best_epoch}))
    np.savez(out / f"weights{context.rank}.npz", **result.weights)


def gradients_then_run(context, out: Path) -> None:
    one_step_gradients(context, out)
    sampled_run(context, out)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """The files of one 2-rank launch: one DDP step's gradients, then a short fit_sampled run."""
    out = tmp_path_factory.mktemp("two_ranks")
    start = time.perf_counter()
    launch(2, gradients_then_run, (out,))
    assert time.perf_counter() - start < 60
    return out


def test_ddp_gradients_are_the_gradient_of_both_ranks_batches(two_ranks):
    ranks = [dict(np.load(two_ranks / f"rank{r}.npz")) for r in range(2)]
    assert not set(ranks[0]["seeds"]) & set(ranks[1]["seeds"])  # each rank its own share of the seeds

    data = load_data(community_graph())
    torch.manual_seed(0)
    module = compiled().to_torch(data.graph)
    labels = torch.from_numpy(data.y)
    batches = [next(iter(SAMPLER.loader(data.graph, data.train, batch_size=BATCH, shuffle=True, seed=1, rank=r,
                                        world_size=2))) for r in range(2)]
    union = sum(batch_loss(module(b.graph), b, labels, None)[0] for b in batches) / 2
    union.backward()
    for r, batch in enumerate(batches):
        np.testing.assert_array_equal(ranks[r]["seeds"], batch.n_id[:batch.batch_size])
    for name, p in module.named_parameters():
        assert np.abs(p.grad.numpy()).max() > 0
        for r in range(2):
            np.testing.assert_allclose(ranks[r][name], p.grad.numpy(), rtol=1e-10, atol=1e-15)


def test_the_loss_curve_of_two_ranks_is_the_single_process_curve_of_their_schedule(two_ranks):
    runs = [json.loads((two_ranks / f"rank{r}.json").read_text()) for r in range(2)]
    curve, weights = reference_curve(load_data(community_graph()), SAMPLER, epochs=3, batch_size=BATCH, lr=0.03,
                                     world_size=2)
    for run in runs:  # every rank reports the all-reduced figures
        np.testing.assert_allclose([r["loss"] for r in run["history"]], curve, rtol=1e-10)
    assert runs[0]["history"] == [{**r, "seconds": r0["seconds"]} for r, r0 in zip(runs[1]["history"],
                                                                                     runs[0]["history"])]
    assert runs[0]["final"] == runs[1]["final"] and runs[0]["final"]["sizes"]["val"] == 15
    assert len(runs[0]["lines"]) == 3 and runs[1]["lines"] == []  # rank 0 alone logs
    if runs[0]["best_epoch"] == 3:
        for name, value in np.load(two_ranks / "weights0.npz").items():
            np.testing.assert_allclose(value, weights[name], rtol=1e-10, atol=1e-14)


def raises_in_rank_1(context) -> None:
    if context.rank == 1:
        raise RuntimeError("a fault injected in rank 1")
    while True:  # rank 0 waits in collectives for a rank that is gone
        context.all_reduce_sum([1.0])


def killed_in_rank_1(context) -> None:
    if context.rank == 1:
        context.all_reduce_sum([1.0])
        os.kill(os.getpid(), signal.SIGKILL)
    while True:
        context.all_reduce_sum([1.0])


@pytest.mark.parametrize("function, message", [
    (raises_in_rank_1, "rank 1 failed: RuntimeError: a fault injected in rank 1"),
    (killed_in_rank_1, "rank 1 was killed by SIGKILL"),
])
def test_a_failed_rank_ends_the_run_at_once_with_one_message(function, message):
    start = time.perf_counter()
    with pytest.raises(DistributedError) as caught:
        launch(2, function, timeout=120)
    assert time.perf_counter() - start < 30  # far below the timeout: the survivor was stopped, not waited for
    assert caught.value.message == message


def cli_rank(context, argv: list[str]) -> None:
    """A rank of ``mpdsl train --nproc``, with the NumPy stand-in for NeighborLoader."""
    spec._constructor = lambda module, name: NumpyNeighborLoader
    args = cli._parser().parse_args(argv)
    _launched_rank(context, args, cli._dims(args.dim))


def test_cli_ranks_leave_the_output_to_rank_0(tmp_path, capfd):
    graph_file = tmp_path / "g.npz"
    community_graph().save(graph_file)
    history, weights = tmp_path / "h.json", tmp_path / "w.npz"
    argv = ["train", SAGE, "--data", str(graph_file), "--dim", "C=3", "--dim", "H=8", "--dtype", "float64",
            "--sampler", "neighbor:3,2", "--batch-size", str(BATCH), "--epochs", "3", "--lr", "0.03",
            "--history", str(history), "--save", str(weights), "--progress"]
    launch(2, cli_rank, (argv,))
    out, err = capfd.readouterr()
    assert len([line for line in out.splitlines() if line.startswith("epoch")]) == 3
    assert out.count("sampler neighbor:3,2, 2 ranks") == 1 and out.count("best epoch") == 1
    assert err.count("trained sage: 3 epochs") == 1 and "Traceback" not in err
    record = json.loads(history.read_text())
    curve, _ = reference_curve(load_data(community_graph()), SAMPLER, epochs=3, batch_size=BATCH, lr=0.03,
                               world_size=2)
    np.testing.assert_allclose([r["loss"] for r in record["history"]], curve, rtol=1e-10)
    assert set(np.load(weights)) == {"W_s1", "W_n1", "b1", "W_s2", "W_n2", "b2"}


def test_cli_nproc_reports_the_ranks_error(tmp_path, capfd):
    start = time.perf_counter()
    assert cli.main(["train", SAGE, "--data", str(tmp_path / "missing.npz"), "--sampler", "neighbor:2",
                     "--nproc", "2"]) == 1
    err = capfd.readouterr().err
    assert "failed:" in err and "missing.npz" in err and "Traceback" not in err
    assert err.count("error:") == 1 and err.splitlines()[0].startswith("error: rank ")
    assert time.perf_counter() - start < 30


def test_torchrun_variables(monkeypatch):
    for name in distributed.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert distributed.from_environment() is None
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)
    assert distributed.from_environment() == {"rank": 1, "world_size": 2, "local_rank": 1}
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(DistributedError, match="RANK=2 is not below WORLD_SIZE=2"):
        distributed.from_environment()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(DistributedError, match="RANK='x' is not a non-negative integer"):
        distributed.from_environment()


# ------------------------------------------------------------------------------------------------
# With mpdsl's NeighborLoader, once installed


def cli_files(tmp_path: Path) -> tuple[Path, list[str]]:
    graph_file = tmp_path / "g.npz"
    community_graph().save(graph_file)
    return graph_file, ["train", SAGE, "--data", str(graph_file), "--dim", "C=3", "--dim", "H=8", "--sampler",
                        "neighbor:3,2", "--batch-size", str(BATCH), "--epochs", "3", "--history",
                        str(tmp_path / "h.json"), "--save", str(tmp_path / "w.npz")]


def test_cli_nproc_2_with_neighbor_loader(tmp_path, capfd):
    pytest.importorskip("mpdsl.sampling.neighbor")
    _, argv = cli_files(tmp_path)
    assert cli.main([*argv, "--nproc", "2"]) == 0
    out, err = capfd.readouterr()
    assert len([line for line in out.splitlines() if line.startswith("epoch")]) == 3, err
    assert len(json.loads((tmp_path / "h.json").read_text())["history"]) == 3
    assert (tmp_path / "w.npz").exists()


TORCHRUN_RANK = """
import sys
sys.path.insert(0, {tests!r})
from mpdsl import cli
from mpdsl.sampling import spec
from sampling_helpers import NumpyNeighborLoader
spec._constructor = lambda module, name: NumpyNeighborLoader
sys.exit(cli.main(sys.argv[1:]))
"""


def test_torchrun_ranks_join_from_its_variables(tmp_path):
    """``torchrun ... mpdsl train``, its ranks with the NumPy stand-in for NeighborLoader."""
    _, argv = cli_files(tmp_path)
    code = TORCHRUN_RANK.format(tests=str(Path(__file__).resolve().parent))
    env = {k: v for k, v in os.environ.items() if k not in distributed.TORCHRUN_VARIABLES}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "--no-python", sys.executable, "-c", code, *argv, "--dtype", "float64", "--lr", "0.03"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    assert len([line for line in run.stdout.splitlines() if line.startswith("epoch")]) == 3
    assert run.stdout.count("sampler neighbor:3,2, 2 ranks") == 1
    record = json.loads((tmp_path / "h.json").read_text())
    curve, _ = reference_curve(load_data(community_graph()), SAMPLER, epochs=3, batch_size=BATCH, lr=0.03,
                               world_size=2)
    np.testing.assert_allclose([r["loss"] for r in record["history"]], curve, rtol=1e-10)
