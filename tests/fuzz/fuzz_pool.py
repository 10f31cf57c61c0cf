"""A small pool of long-lived worker subprocesses (``fuzz_worker.py``) that run fuzz cases
under per-case time and memory limits.

One process per case would spend most of its time starting Python and NumPy; instead each
worker runs many cases and the parent only restarts one that hangs (no answer within the time
limit plus a grace period: killed, a hang), dies (an OOM: the kernel killed it, or the address
space limit broke it) or answered a hang or an OOM itself (its state may be half-built). A case
that hangs or kills its worker is run once more in a fresh worker before it counts: a
first-time kernel compilation or a loaded machine must not make the run flaky. A MemoryError
the worker reports is deterministic and counts at once.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

from fuzz_worker import read_frame, write_frame

WORKER = Path(__file__).resolve().parent / "fuzz_worker.py"
REPO = Path(__file__).resolve().parents[2]

TIMEOUT = 10.0  # seconds per case (the original campaign's limit)
MEMORY = 4 * 2**30  # bytes of address space per case
GRACE = 10.0  # seconds after TIMEOUT before a silent worker is killed
READY_TIMEOUT = 900.0  # a cold kernel cache compiles everything once in the warm-up
RECYCLE = 250  # cases per worker before it is replaced (bounds memory creep)


CASE_MEMORY_BUDGET = "1G"


class WorkerFailed(RuntimeError):
    pass


class Worker:
    def __init__(self, timeout: float, memory: int, log: Path, warm: bool = True):
        env = dict(os.environ)
        env.update(MPDSL_FUZZ_TIMEOUT=str(timeout), MPDSL_FUZZ_MEMORY=str(memory), MPDSL_FUZZ_WARM=str(int(warm)),
                   PYTHONHASHSEED="0", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
        env.update(MPDSL_FUZZ_LOG=str(log), MPDSL_FUZZ_TMP=str(log.parent))
        # The cases' memory budget: what is done within it finishes well inside the time limit on two
        # cores; bigger (valid) work is refused by the budget checks, as on a small machine.
        env.setdefault("MPDSL_MEMORY_LIMIT", CASE_MEMORY_BUDGET)
        self.proc = subprocess.Popen([sys.executable, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=env, cwd=REPO, start_new_session=True)
        self.case: dict | None = None
        self.deadline = 0.0
        self.done = 0
        self.ready = False
        self.started = time.monotonic()

    def fileno(self) -> int:
        return self.proc.stdout.fileno()

    def send(self, case: dict, deadline: float) -> None:
        self.case, self.deadline = case, deadline
        write_frame(self.proc.stdin, case)

    def receive(self):
        return read_frame(self.proc.stdout)

    def kill(self) -> int | None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # pragma: no cover - a process that survives SIGKILL
            return None

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                write_frame(self.proc.stdin, None)
                self.proc.wait(timeout=10)
            except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                pass
        self.kill()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


def _died(code: int | None) -> dict:
    if code is not None and code < 0:
        name = signal.Signals(-code).name
    else:
        name = f"exit code {code}"
    return {"outcome": "oom", "exception": "worker died", "where": name,
            "message": f"the worker process ended ({name}) during the case"}


def run_cases(cases: list[dict], workers: int = 2, timeout: float = TIMEOUT, memory: int = MEMORY,
              progress=None, grace: float = GRACE, warm: bool = True) -> dict[str, dict]:
    """Run every case; returns results by case id. ``progress(done, total)`` is called now and then;
    ``warm=False`` skips the workers' kernel warm-up (for cases that run no model). The workers' logs
    and scratch files live in one temporary folder, removed at the end unless a worker failed."""
    log_dir = Path(tempfile.mkdtemp(prefix="mpdsl-fuzz-"))
    pending = deque(cases)
    retried: set[str] = set()
    results: dict[str, dict] = {}
    pool: list[Worker] = []
    spawned = 0

    def spawn() -> Worker:
        nonlocal spawned
        spawned += 1
        return Worker(timeout, memory, log_dir / f"worker-{spawned}.log", warm)

    def finish(worker: Worker, result: dict) -> None:
        case = worker.case
        worker.case = None
        worker.done += 1
        transient = result["outcome"] == "hang" or result.get("exception") == "worker died"
        if transient and case["id"] not in retried:
            retried.add(case["id"])
            pending.appendleft(case)  # once more, in a fresh worker
            return
        result.setdefault("id", case["id"])
        result["retried"] = case["id"] in retried
        results[case["id"]] = result

    try:
        pool = [spawn() for _ in range(max(1, min(workers, len(cases))))]
        while pending or any(w.case is not None for w in pool):
            now = time.monotonic()
            for i, w in enumerate(pool):
                if not w.ready or w.case is not None or not pending:
                    continue
                if w.done >= RECYCLE:
                    w.close()
                    pool[i] = w = spawn()
                    continue
                try:
                    w.send(pending.popleft(), now + timeout + grace)
                except (BrokenPipeError, OSError):
                    pending.appendleft(w.case)
                    w.case = None
                    w.close()
                    pool[i] = spawn()
            waiting = [w for w in pool if w.case is not None or not w.ready]
            if not waiting:
                continue
            deadlines = [w.deadline if w.ready else w.started + READY_TIMEOUT for w in waiting]
            wait = max(0.0, min(deadlines) - time.monotonic())
            readable, _, _ = select.select(waiting, [], [], min(wait, 5.0))
            for w in readable:
                i = pool.index(w)
                message = w.receive()
                if message is EOFError:
                    code = w.kill()
                    if not w.ready:
                        raise WorkerFailed(f"a fuzz worker ended before it was ready (exit {code}); see {log_dir}")
                    finish(w, _died(code))
                    w.close()
                    pool[i] = spawn()
                elif not w.ready:
                    w.ready = True
                elif message.get("fatal"):
                    finish(w, message)
                    w.close()
                    pool[i] = spawn()
                else:
                    finish(w, message)
                if progress is not None and len(results) % 100 == 0:
                    progress(len(results), len(cases))
            now = time.monotonic()
            for i, w in enumerate(pool):
                if w.ready and w.case is not None and now > w.deadline:
                    w.kill()
                    finish(w, {"outcome": "hang", "exception": "no answer", "where": "killed",
                               "message": f"no result within {timeout + grace:.0f} s; the worker was killed"})
                    w.close()
                    pool[i] = spawn()
                elif not w.ready and now > w.started + READY_TIMEOUT:
                    raise WorkerFailed(f"a fuzz worker was not ready after {READY_TIMEOUT:.0f} s; see {log_dir}")
    except WorkerFailed:
        for w in pool:
            w.close()
        raise  # the logs stay for a look
    finally:
        for w in pool:
            w.close()
    shutil.rmtree(log_dir, ignore_errors=True)
    return results
