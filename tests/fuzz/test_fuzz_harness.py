"""The fuzz harness classifies what it is there to catch: a hang (the worker's alarm, or no answer
at all: killed), an OOM (a MemoryError under the per-case address-space limit, or a worker that
dies), an internal error, a user error and its quality, and a CLI traceback; the pool carries on
with fresh workers after each."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fuzz_pool import run_cases  # noqa: E402
from fuzz_report import summarize  # noqa: E402
from fuzz_worker import classify_cli  # noqa: E402
from known_faults import KnownFault  # noqa: E402

CASES = {
    "hang": "import time\nwhile True:\n    time.sleep(0.01)",
    "silent": "import signal, time\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\ntime.sleep(60)",
    # the alarm strikes in a ctypes callback (as in an LLVM compilation's object-cache hook), which drops
    # its exception; the case then fails for the half-done work, and is still a hang
    "dropped": ("import ctypes, time\ndef spin():\n    end = time.time() + 60\n    while time.time() < end:\n"
                "        pass\nctypes.CFUNCTYPE(None)(spin)()\nraise RuntimeError('half-done work')"),
    "oom": "import numpy as np\nnp.ones(16 * 2**30, dtype=np.uint8)",
    "died": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
    "internal": "raise KeyError('boom')",
    "user": "import mpdsl\nmpdsl.compile('model m(x: node[F]) -> node[F] {\\n    return y\\n}\\n')",
    "unhinted": "from mpdsl.diagnostics import MpdslError\nraise MpdslError('no advice here')",
    "ok": "x = sum(range(10))",
}


def test_each_outcome_is_classified_and_the_pool_recovers():
    cases = [{"id": name, "kind": "python", "code": code} for name, code in CASES.items()]
    results = run_cases(cases, workers=2, timeout=2.0, memory=2 * 2**30, grace=1.0, warm=False)
    got = {name: results[name]["outcome"] for name in CASES}
    assert got == {"hang": "hang", "silent": "hang", "dropped": "hang", "oom": "oom", "died": "oom",
                   "internal": "internal", "user": "user", "unhinted": "user", "ok": "ok"}, results
    assert results["hang"]["where"] == "<case>:<module>" and results["hang"]["retried"]
    assert "RuntimeError('half-done work')" in results["dropped"]["message"]
    assert results["silent"]["exception"] == "no answer" and results["died"]["where"] == "SIGKILL"
    assert results["oom"]["exception"] == "MemoryError" and not results["oom"]["retried"]
    assert results["user"]["quality"] == [] and results["unhinted"]["quality"] == ["no hint"]
    summary = summarize(cases, results)
    assert len(summary["_unknown_results"]) == 6 and summary["user_error_quality"] == {"no hint": 1}


def test_cli_classification():
    assert classify_cli(0, "", "", [])["outcome"] == "ok"
    assert classify_cli(2, "", "usage: mpdsl ...", [])["outcome"] == "user"
    crashed = classify_cli(1, "", "Traceback (most recent call last):\n  ...\nKeyError: 'x'\n", [])
    assert crashed["outcome"] == "internal" and crashed["exception"] == "KeyError"
    assert classify_cli(3, "", "", [])["outcome"] == "internal"
    assert classify_cli(1, "", "error: bad\n  hint: do this", [])["quality"] == []
    assert classify_cli(1, "", "error: bad", [])["quality"] == ["no hint"]


def test_known_faults_match_by_signature():
    fault = KnownFault("f", "internal", "ValueError", "mpdsl/runtime.py:init", "non-negative")
    hit = {"outcome": "internal", "exception": "ValueError", "where": "mpdsl/runtime.py:init",
           "message": "expected non-negative integer"}
    assert fault.matches(hit)
    assert not fault.matches({**hit, "where": "mpdsl/runtime.py:bind"})
    assert not fault.matches({**hit, "outcome": "hang"})
    assert not fault.matches({**hit, "message": "something else"})
    quality = KnownFault("q", "quality", None, "no hint", "does not exist")
    assert quality.matches({"outcome": "user", "message": "graph file 'g' does not exist"}, "no hint")
    assert not quality.matches({"outcome": "user", "message": "graph file 'g' does not exist"}, "no location")
