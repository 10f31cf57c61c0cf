"""A long-lived fuzz worker: runs cases sent by ``fuzz_pool`` one at a time and classifies each.

Protocol: the parent writes length-prefixed pickles of case dicts to the worker's stdin (None
ends it); the worker answers each with one result dict on its original stdout (the worker's own
fd 1 and 2 are redirected, so nothing a case prints can corrupt the stream). The first message
is ``{"ready": ...}``, sent after a warm-up that loads every compiled kernel the cases can reach
(the warm-up is not under the per-case limits).

Per case: the address space may grow by ``MPDSL_FUZZ_MEMORY`` bytes over what the worker holds
(``RLIMIT_AS``; a ``MemoryError`` is an OOM), and an alarm after ``MPDSL_FUZZ_TIMEOUT`` seconds
raises ``CaseTimeout`` in the case (a hang: the traceback says where it was; the worker then
exits, since the interrupted case may have left state half-built). The parent kills a worker
that does not answer at all.

Outcomes: ``ok``; ``user`` (an ``mpdsl.MpdslError``; for the CLI: exit code 1 with a rendered
message and no traceback, or exit code 2 for bad usage); ``internal`` (any other exception, a
CLI traceback or another exit code); ``hang``; ``oom``. Each user error is also checked for a
hint, a location where one is meaningful and a correctly quoted source line (``quality``).
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import pickle
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = (REPO / "mpdsl", REPO / "backends")

# CompileErrors about options rather than program text: no location is meaningful.
UNLOCATED_OK = ("no model named", "dimension override")


class CaseTimeout(BaseException):
    """Raised by the alarm in a case that runs past its time limit (a BaseException, so that no
    ``except Exception`` in the code under test swallows it)."""


# ---- framing ----------------------------------------------------------------------------------


def write_frame(stream, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def read_frame(stream):
    head = stream.read(8)
    if len(head) < 8:
        return EOFError
    (size,) = struct.unpack("<Q", head)
    data = stream.read(size)
    if len(data) < size:
        return EOFError
    return pickle.loads(data)


# ---- classification helpers -------------------------------------------------------------------


def where(tb) -> str:
    """``file:function`` of the innermost frame inside the package (mpdsl/, backends/), else of
    the innermost frame."""
    frames = [f for f in traceback.extract_tb(tb) if f.name != "_on_alarm"]  # where the alarm struck
    for frame in reversed(frames):
        path = Path(frame.filename).resolve()
        for base in PACKAGE_DIRS:
            if base in path.parents:
                return f"{path.relative_to(REPO)}:{frame.name}"
    if frames:
        return f"{Path(frames[-1].filename).name}:{frames[-1].name}"
    return "?"


def failure(outcome: str, exc: BaseException) -> dict:
    message = str(exc)
    if len(message) > 400:
        message = message[:400] + "..."
    return {"outcome": outcome, "exception": type(exc).__name__, "where": where(exc.__traceback__),
            "message": message, "traceback": "".join(traceback.format_exception(exc))[-3000:]}


def quality(err) -> list[str]:
    """What a user error lacks: a hint, a location (errors in program text), a correct excerpt."""
    from mpdsl.diagnostics import CompileError

    issues = []
    if not (err.message or "").strip():
        issues.append("no message")
    if not (err.hint or "").strip() and not one_line_by_design(type(err).__name__, err.message):
        issues.append("no hint")
    if isinstance(err, CompileError):
        span = err.span
        if span is None:
            if not err.message.startswith(UNLOCATED_OK):
                issues.append("no location")
        else:
            lines = span.source.text.split("\n")  # lark counts lines by "\n" only
            if not 1 <= span.line <= len(lines):
                issues.append("location past the end")
            else:
                line = lines[span.line - 1].removesuffix("\r")
                if span.source.line(span.line) != line:
                    issues.append("misquoted line")
                if not 1 <= span.col <= len(line) + 1:
                    issues.append("column past the line")
    try:
        rendered = err.render()
    except Exception as exc:  # noqa: BLE001 - rendering itself failed: a finding
        return issues + [f"render raised {type(exc).__name__}"]
    if any(not (c.isprintable() or c in "\n\t") for c in rendered):
        issues.append("unprintable characters")
    return issues


def one_line_by_design(error: str, message: str) -> bool:
    """The backends' availability errors are one line by design (README: "without either it says
    so in one line"); the message itself says what to do."""
    return error in ("BackendError", "?") and ("TRITON_INTERPRET=1" in message or "pip install" in message)


def user_error(err, stage: str) -> dict:
    return {"outcome": "user", "stage": stage, "error": type(err).__name__, "message": err.message[:300],
            "quality": quality(err), "located": getattr(err, "span", None) is not None}


# ---- case kinds -------------------------------------------------------------------------------


def build_graph(spec: dict, rng):
    """A (batched) graph from a spec: components of (nodes, edges, self_loops)."""
    import numpy as np

    import mpdsl

    graphs = []
    for n, e, loops in spec["components"]:
        if n == 0:
            edge_index = np.zeros((2, 0), dtype=np.int64)
        else:
            edge_index = rng.integers(0, n, size=(2, e)).astype(np.int64)
            if loops:
                edge_index = np.concatenate([edge_index, np.stack([np.arange(n)] * 2)], axis=1)
        graphs.append(mpdsl.Graph(edge_index, n))
    return graphs[0] if len(graphs) == 1 else mpdsl.Graph.batch(graphs)


def index_bound(model, name: str) -> int:
    """Largest id + 1 an int input may hold: what it indexes or one-hot encodes (else 1)."""
    bounds = []
    for v in model.ir.values:
        uses = [i for i, o in enumerate(v.operands) if o.op == "input" and o.attr["name"] == name]
        if v.op == "take" and 1 in uses:
            bounds.append(v.operands[0].type.shape[0].value if v.operands[0].type.shape else 1)
        if v.op == "one_hot" and uses:
            bounds.append(v.attr["classes"])
    return max(1, min(bounds)) if bounds else 1


def synth_inputs(model, graph, spec: dict, rng) -> dict:
    """Random inputs for every input of ``model``: ids within their bound, normal features with
    the spec's sizes for the dims bound from data, and a random index (``<name>_index``) for each input
    edge set of the model."""
    import numpy as np

    from mpdsl.types import edge_set_ends, edge_set_relation

    sizes = spec.get("sizes", {})
    dtype = np.float64 if spec.get("float64") else np.float32
    inputs = {}
    for s in model.ir.edge_sets:  # a typed set (and its node types, as many as the graph's nodes) in .npz names
        if s.kind == "input":
            src, dst = edge_set_ends(s.name)
            key = f"{src}__{edge_set_relation(s.name)}__{dst}_index" if src else f"{s.name}_index"
            inputs[key] = rng.integers(0, max(graph.num_nodes, 1), (2, graph.num_edges // 2 if graph.num_nodes else 0))
    inputs.update({f"{t}__num_nodes": np.asarray(graph.num_nodes) for t in model.ir.node_types})
    for name, t in model.input_types.items():
        n = graph.num_rows(t.domain)
        if t.dtype == "i64":
            inputs[name] = rng.integers(0, index_bound(model, name), n)
        else:
            shape = tuple(d.substitute({s: sizes.get(s, 3) for s in d.symbols}).value for d in t.shape)
            inputs[name] = rng.normal(size=(n,) + shape).astype(dtype)
    return inputs


def run_program(case: dict, workdir: Path) -> dict:
    import numpy as np

    import mpdsl
    from mpdsl.diagnostics import MpdslError

    opts = case.get("options", {})
    path = workdir / case["main"]
    stage = "compile"
    try:
        model = mpdsl.compile(path, model=opts.get("model"), dtype=opts.get("dtype", "float32"),
                              dims=opts.get("dims"), seed=opts.get("seed", 0),
                              optimize=opts.get("optimize", True))
        if opts.get("emit"):
            model.ir_text(locations=True)
            model.optimized_ir  # noqa: B018
        stage = "run"
        rng = np.random.default_rng(case["graph"].get("seed", 0))
        graph = build_graph(case["graph"], rng)
        inputs = synth_inputs(model, graph, case["graph"], rng)
        model(graph, **inputs)
        if opts.get("reference"):
            mpdsl.compile(path, model=opts.get("model"), dtype=opts.get("dtype", "float32"),
                          dims=opts.get("dims"), optimize=False)(graph, **inputs)
        if opts.get("train_mode"):
            model.train()(graph, **inputs)
    except MpdslError as err:
        return user_error(err, stage)
    return {"outcome": "ok", "stage": "ran"}


EXAMPLES = REPO / "examples"


def run_graph(case: dict, workdir: Path) -> dict:
    import mpdsl
    from mpdsl.diagnostics import MpdslError

    stage = "load"
    try:
        graph = mpdsl.Graph.load(workdir / case["main"])
        stage = "run"
        model = mpdsl.compile(EXAMPLES / f"{case['model']}.mp", dtype=case.get("dtype", "float32"))
        model(graph)
        if case.get("save"):
            graph.save(workdir / "copy.npz")
            mpdsl.Graph.load(workdir / "copy.npz")
    except MpdslError as err:
        return user_error(err, stage)
    return {"outcome": "ok", "stage": "ran"}


def run_weights(case: dict, workdir: Path) -> dict:
    import mpdsl
    from mpdsl.diagnostics import MpdslError

    stage = "load"
    try:
        model = mpdsl.compile(EXAMPLES / f"{case['model']}.mp")
        model.load_weights(workdir / case["main"])
        stage = "run"
        model(EXAMPLES / "data" / "karate.npz")
    except MpdslError as err:
        return user_error(err, stage)
    return {"outcome": "ok", "stage": "ran"}


class _Recorder:
    """Remembers the MpdslError a CLI command raises (main renders it and returns 1)."""

    def __init__(self):
        self.errors: list = []

    def wrap(self, run_command):
        from mpdsl.diagnostics import MpdslError

        def recorded(*args, **kwargs):
            try:
                return run_command(*args, **kwargs)
            except MpdslError as err:
                self.errors.append(err)
                raise
        return recorded


def cli_argv(case: dict, workdir: Path) -> list[str]:
    return [a.replace("{dir}", str(workdir)).replace("{examples}", str(EXAMPLES)) for a in case["argv"]]


def classify_cli(rc, out: str, err: str, recorder_errors: list) -> dict:
    if "Traceback" in err or "Traceback" in out:
        tail = err[err.find("Traceback"):][-3000:] if "Traceback" in err else out[-3000:]
        last = tail.strip().splitlines()[-1] if tail.strip() else ""
        return {"outcome": "internal", "exception": last.split(":")[0], "where": "cli traceback",
                "message": last[:400], "traceback": tail}
    if rc == 0:
        return {"outcome": "ok", "stage": "ran"}
    if rc == 2:
        return {"outcome": "user", "stage": "usage", "error": "usage", "message": err.strip()[-300:],
                "quality": [] if err.strip() else ["no message"], "located": False}
    if rc == 1:
        if recorder_errors:
            result = user_error(recorder_errors[-1], "cli")
        else:
            result = {"outcome": "user", "stage": "cli", "error": "?", "message": err.strip()[-300:],
                      "quality": [], "located": False}
        if not err.strip():
            result["quality"] = result["quality"] + ["nothing on stderr"]
        elif "hint:" not in err and "no hint" not in result["quality"] and \
                not one_line_by_design(result["error"], result["message"]):
            result["quality"] = result["quality"] + ["no hint"]
        return result
    return {"outcome": "internal", "exception": f"exit code {rc}", "where": "cli", "message": err[-400:]}


def run_cli(case: dict, workdir: Path) -> dict:
    argv = cli_argv(case, workdir)
    if case.get("subprocess"):
        limit = max(1.0, float(os.environ.get("MPDSL_FUZZ_TIMEOUT", "10")) - 1)
        try:
            proc = subprocess.run([sys.executable, "-m", "mpdsl.cli", *argv], cwd=workdir, capture_output=True,
                                  text=True, errors="replace", timeout=limit)
        except subprocess.TimeoutExpired:  # a hang like any other: the pool runs it once more before it counts
            return {"outcome": "hang", "exception": "TimeoutExpired", "where": "cli subprocess",
                    "message": f"the command gave no answer within {limit:.0f} s"}
        return classify_cli(proc.returncode, proc.stdout, proc.stderr, [])
    from mpdsl import cli

    recorder = _Recorder()
    original = cli._run_command
    cli._run_command = recorder.wrap(original)
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    try:
        os.chdir(workdir)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli.main(argv)
    finally:
        os.chdir(cwd)
        cli._run_command = original
    return classify_cli(rc, out.getvalue(), err.getvalue(), recorder.errors)


def run_python(case: dict, workdir: Path) -> dict:
    """Python source run as is: the harness's own tests (a hang, an allocation, a crash)."""
    from mpdsl.diagnostics import MpdslError

    try:
        exec(compile(case["code"], "<case>", "exec"), {"workdir": workdir})
    except MpdslError as err:
        return user_error(err, "run")
    return {"outcome": "ok", "stage": "ran"}


RUNNERS = {"program": run_program, "graph": run_graph, "weights": run_weights, "cli": run_cli, "python": run_python}


# ---- the loop ---------------------------------------------------------------------------------


def _address_space() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


# Whether the current case's alarm went off. The alarm's exception is raised by the first Python code
# that runs after the signal; during a long native call (an LLVM compilation) that may be a ctypes
# callback (llvmlite's object-cache hooks), where ctypes prints and drops it, and the case then fails
# later for the half-done work. The flag keeps such a case a hang.
_ALARM = {"fired": False}


def _on_alarm(signum, frame):
    _ALARM["fired"] = True
    raise CaseTimeout()


def execute(case: dict, root: Path, timeout: float, memory: int) -> dict:
    workdir = Path(tempfile.mkdtemp(dir=root))
    start = time.perf_counter()
    fatal = False
    try:
        for name, data in case.get("files", {}).items():
            target = workdir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass"))
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = _address_space() + memory
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        _ALARM["fired"] = False
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            result = RUNNERS[case["kind"]](case, workdir)
        except Exception as exc:  # noqa: BLE001 - re-raised, as a hang when the alarm had gone off
            if _ALARM["fired"]:
                raise CaseTimeout(f"past the time limit (its alarm dropped on the way); then {exc!r}") from exc
            raise
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        if _ALARM["fired"]:
            raise CaseTimeout(f"past the time limit (its alarm dropped on the way); then {result['outcome']}")
    except CaseTimeout as exc:
        result, fatal = failure("hang", exc), True
    except MemoryError as exc:
        result, fatal = failure("oom", exc), True
    except RecursionError as exc:
        result = failure("internal", exc)
    except Exception as exc:  # noqa: BLE001 - anything else is an internal error
        result = failure("internal", exc)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["seconds"] = round(time.perf_counter() - start, 3)
    result["fatal"] = fatal
    gc.collect()
    return result


def warm_up(root: Path) -> None:
    """Load (compiling once if the disk cache is cold) every kernel the cases can reach, outside
    the per-case limits: the examples in both dtypes, optimized and not, the CLI, and a training
    epoch of each example the CLI cases train (their gradient kernels)."""
    import random

    import numpy as np
    from fuzz_inputs import EDGE_DATA_MODELS, NODE_MODELS, base_graph, npz

    import mpdsl
    from mpdsl import cli

    karate = mpdsl.Graph.load(EXAMPLES / "data" / "karate.npz")
    rng = np.random.default_rng(0)
    spec = {"components": [[12, 30, True], [0, 0, False], [5, 8, False]], "sizes": {}}
    small = build_graph(spec, rng)
    for path in sorted(EXAMPLES.glob("*.mp")):
        for dtype in ("float32", "float64"):
            for optimize in (True, False):
                model = mpdsl.compile(path, dtype=dtype, optimize=optimize)
                for graph in (karate, small):
                    for float64 in (False, True):
                        model(graph, **synth_inputs(model, graph, {"float64": float64}, rng))
    trained = {name: EXAMPLES / "data" / "karate.npz" for name in NODE_MODELS}
    for name in EDGE_DATA_MODELS:  # those that do not fit node classification stop at once, as in the cases
        trained[name] = root / f"warm-{name}.npz"
        trained[name].write_bytes(npz(base_graph(random.Random(0), name)))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        cli.main(["run", str(EXAMPLES / "gcn.mp"), "--graph", str(EXAMPLES / "data" / "karate.npz")])
        for name, data in trained.items():
            cli.main(["train", str(EXAMPLES / f"{name}.mp"), "--data", str(data), "--epochs", "1", "--no-progress",
                      "--split", "karate-4"])


def main() -> int:
    protocol_out = os.fdopen(os.dup(1), "wb")
    protocol_in = sys.stdin.buffer
    log = os.environ.get("MPDSL_FUZZ_LOG")
    sink = os.open(log if log else os.devnull, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(sink, 1)
    os.dup2(sink, 2)
    sys.stdout = io.TextIOWrapper(os.fdopen(os.dup(1), "wb"), write_through=True)
    sys.stderr = sys.stdout
    warnings.simplefilter("ignore")
    timeout = float(os.environ.get("MPDSL_FUZZ_TIMEOUT", "10"))
    memory = int(float(os.environ.get("MPDSL_FUZZ_MEMORY", str(4 * 2**30))))
    root = Path(tempfile.mkdtemp(prefix="mpdsl-fuzz-", dir=os.environ.get("MPDSL_FUZZ_TMP")))
    try:
        if os.environ.get("MPDSL_FUZZ_WARM", "1") == "1":
            warm_up(root)
        else:  # the parser and the prelude at least
            import mpdsl
            mpdsl.compile("model m(x: node[F]) -> node[F] {\n    return x\n}\n")
        signal.signal(signal.SIGALRM, _on_alarm)
        write_frame(protocol_out, {"ready": True, "pid": os.getpid()})
        while True:
            case = read_frame(protocol_in)
            if case is None or case is EOFError:
                return 0
            result = execute(case, root, timeout, memory)
            result["id"] = case["id"]
            write_frame(protocol_out, result)
            if result["fatal"]:
                return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
