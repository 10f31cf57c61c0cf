"""Multi-process training on ``torch.distributed``: ranks, the process group, DDP, and the launcher.

A run has ``world_size`` ranks, one process each. ``launch(nproc, function, args)`` starts them on this
machine (``torch.multiprocessing``, the spawn method) and calls ``function(rank_context, *args)`` in
each; a process started by ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT`` set) joins its run with ``from_environment()`` + ``initialize``. The backend is NCCL
when the ranks compute on CUDA devices (one per local rank), else gloo. Every collective, and joining
the group, waits at most ``timeout`` seconds (default 300).

Failures end the run: when a rank raises (or is killed), ``launch`` stops the other ranks and raises
a ``DistributedError`` naming that rank and its error in one line. The rank with the root cause is
reported, not a rank that only lost its connection to it. ``launch`` holds the rendezvous port
(a ``TCPStore`` it binds to a free port chosen by the system) for the whole run, so no other process
can take it between choosing and joining.
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mpdsl.diagnostics import MpdslError

if TYPE_CHECKING:  # torch is imported where it is used: the command line reads DEFAULT_TIMEOUT without it
    import torch
    from torch.multiprocessing.spawn import ProcessException

__all__ = ["DEFAULT_TIMEOUT", "DistributedError", "RankContext", "from_environment", "initialize", "launch",
           "rank_failure", "shutdown"]

DEFAULT_TIMEOUT = 300.0
HOST = "127.0.0.1"
# what gloo's and NCCL's errors say when a peer is gone (they are plain RuntimeErrors)
LOST_CONNECTION = ("Connection closed by peer", "Connection reset by peer", "gloo/transport", "NCCL communicator")
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(MpdslError):
    """A distributed run that failed: a rank's error, a killed rank, or a process group that could not
    be joined."""


@dataclass(frozen=True)
class RankContext:
    """This process's place in the run: ``rank`` of ``world_size``, ``local_rank`` on its machine, the
    process group's ``backend`` and the ``device`` this rank computes on."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the rank that logs, draws the progress bar, plots and saves."""
        return self.rank == 0

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """The element-wise sum of ``values`` over the ranks (float64; every rank passes as many)."""
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.cpu().tolist()

    def wrap(self, module: torch.nn.Module) -> torch.nn.parallel.DistributedDataParallel:
        """``module`` (already on ``device``) in ``DistributedDataParallel``: gradients averaged over the
        ranks at each backward, parameters and buffers broadcast from rank 0."""
        import torch

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


def from_environment() -> dict[str, int] | None:
    """``{"rank", "world_size", "local_rank"}`` from torchrun's variables, or None when they are not set
    (every variable must be; a partial set is a DistributedError naming the missing ones)."""
    present = [name for name in TORCHRUN_VARIABLES if os.environ.get(name)]
    if not present:
        return None
    missing = [name for name in TORCHRUN_VARIABLES if name not in present]
    if missing:
        raise DistributedError(f"{', '.join(present)} set but {', '.join(missing)} not",
                               "start the ranks with torchrun, which sets all of RANK, WORLD_SIZE, LOCAL_RANK, "
                               "MASTER_ADDR and MASTER_PORT, or unset them")
    values = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        text = os.environ[name]
        if not (text.isascii() and text.isdigit()):
            raise DistributedError(f"{name}={text!r} is not a non-negative integer", "check the launcher's variables")
        values[name.lower()] = int(text)
    if values["world_size"] < 1 or values["rank"] >= values["world_size"]:
        raise DistributedError(f"RANK={values['rank']} is not below WORLD_SIZE={values['world_size']}",
                               "check the launcher's variables")
    return values


def initialize(rank: int, world_size: int, *, local_rank: int | None = None, cuda: bool = False,
               timeout: float = DEFAULT_TIMEOUT, store: Any = None) -> RankContext:
    """Join the process group as ``rank`` of ``world_size`` (NCCL on CUDA device ``local_rank`` with
    ``cuda``, else gloo on the CPU) through ``store``, or torchrun's ``env://`` variables without one."""
    import torch
    import torch.distributed as dist

    local_rank = rank if local_rank is None else local_rank
    if cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = "nccl" if cuda else "gloo"
    wait = datetime.timedelta(seconds=timeout)
    try:
        if store is None:
            dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=wait)
        else:
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=wait)
    except (RuntimeError, ValueError) as err:
        raise DistributedError(f"rank {rank} could not join the process group: {_first_line(err)}",
                               "check MASTER_ADDR / MASTER_PORT and that every rank started "
                               "(raise --dist-timeout if they start slowly)") from None
    return RankContext(rank, world_size, local_rank, backend, device)


def shutdown() -> None:
    """Leave the process group (when joined), after collecting what still refers to it: a
    DistributedDataParallel module left in a reference cycle would otherwise keep the gloo group alive
    until the interpreter's teardown, where destroying it aborts the process (SIGABRT: its threads
    release tensors without an interpreter to release them to)."""
    import torch.distributed as dist

    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


def launch(nproc: int, function: Callable[..., Any], args: tuple = (), *, timeout: float = DEFAULT_TIMEOUT,
           cuda: bool = False) -> None:
    """Run ``function(rank_context, *args)`` in ``nproc`` new processes (ranks 0 .. nproc - 1) and wait
    for all of them. ``function`` and ``args`` must be picklable (a module-level function). A failed
    rank ends the run with a DistributedError (module docstring)."""
    import torch.distributed as dist
    import torch.multiprocessing
    from torch.multiprocessing.spawn import ProcessException

    if nproc < 1:
        raise DistributedError(f"nproc must be at least 1, got {nproc}", "pass --nproc 1 or more")
    wait = datetime.timedelta(seconds=timeout)
    store = dist.TCPStore(HOST, 0, nproc, True, timeout=wait, wait_for_workers=False)
    spawn = torch.multiprocessing.get_context("spawn")
    failures = spawn.SimpleQueue()
    context = torch.multiprocessing.start_processes(
        _rank_main, args=(nproc, store.port, function, args, timeout, cuda, failures), nprocs=nproc, join=False,
        start_method="spawn")
    spawn_log = logging.getLogger("torch.multiprocessing.spawn")
    level = spawn_log.level
    spawn_log.setLevel(logging.ERROR)  # its "Terminating process ..." warnings: the error says it in one line
    try:
        while not context.join():
            pass
    except KeyboardInterrupt:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
            process.join()
        raise
    except ProcessException as exc:
        reports = []
        while not failures.empty():
            reports.append(failures.get())
        codes = [process.exitcode for process in context.processes]
        raise _failure(exc, codes, reports) from None
    finally:
        spawn_log.setLevel(level)
        del store


def _rank_main(rank: int, world_size: int, port: int, function: Callable[..., Any], args: tuple, timeout: float,
               cuda: bool, failures: Any) -> None:
    """A launched rank: joins the group, runs ``function``; on an error reports it and exits with 1."""
    import torch
    import torch.distributed as dist

    try:
        threads = max(1, (os.cpu_count() or 1) // world_size)  # the ranks share this machine's cores
        torch.set_num_threads(threads)
        os.environ.setdefault("NUMBA_NUM_THREADS", str(threads))  # read when numba is first imported
        store = dist.TCPStore(HOST, port, world_size, False, timeout=datetime.timedelta(seconds=timeout))
        context = initialize(rank, world_size, cuda=cuda, timeout=timeout, store=store)
        try:
            function(context, *args)
        finally:
            shutdown()
    except BaseException as err:  # every error, KeyboardInterrupt too, is reported to the launcher
        failures.put(_report(rank, err))
        raise SystemExit(1) from None


def rank_failure(rank: int, err: BaseException) -> DistributedError:
    """The one-line DistributedError of ``err`` raised in ``rank``."""
    _, _, message, hint = _report(rank, err)
    return DistributedError(f"rank {rank} failed: {message}", hint)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _report(rank: int, err: BaseException) -> tuple[int, bool, str, str | None]:
    """(rank, lost connection, one-line message, hint) of a rank's error."""
    import torch.distributed as dist

    if isinstance(err, MpdslError):
        return rank, False, err.message, err.hint
    lost = isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and any(
        mark in str(err) for mark in LOST_CONNECTION))
    return rank, lost, f"{type(err).__name__}: {_first_line(err)}", None


def _failure(exc: ProcessException, exit_codes: list[int | None],
             reports: list[tuple[int, bool, str, str | None]]) -> DistributedError:
    """The error of a failed run: the first rank's own error, else a rank killed by a signal (the
    ranks the launcher stopped got SIGTERM), else a lost connection, else an exit code."""
    for rank, lost, message, hint in reports:
        if not lost:
            return DistributedError(f"rank {rank} failed: {message}", hint)
    killed = [(rank, -code) for rank, code in enumerate(exit_codes)
              if code is not None and code < 0 and -code != signal.SIGTERM]
    if not killed and getattr(exc, "signal_name", None):  # the first failure was a signal, SIGTERM too
        killed = [(exc.error_index, -int(getattr(exc, "exit_code", -signal.SIGTERM)))]
    if killed:
        rank, number = killed[0]
        return DistributedError(f"rank {rank} was killed by {_signal_name(number)}",
                                "the other ranks were stopped; check the machine's memory (the OOM killer) "
                                "and the process limits")
    if reports:
        rank, _, message, hint = reports[0]
        return DistributedError(f"rank {rank} failed: {message}", hint)
    return DistributedError(f"rank {exc.error_index} exited with code {exit_codes[exc.error_index]}",
                            "the other ranks were stopped")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
