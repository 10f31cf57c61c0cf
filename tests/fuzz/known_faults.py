"""Faults the fuzz campaign still finds whose fixes belong to other parts of the code base
(graph, weights and input loading, the runtime and the CLI's flags). TEMPORARY: each entry is
removed once its fix is merged (the summary lists entries no case reached); the campaign fails on
every fault that matches no entry here.

A fault is keyed by its signature: the outcome (internal, hang, oom, or a user-error ``quality``
issue), the exception type, ``where`` (``file:function`` of the innermost frame in mpdsl/ or
backends/) and a regular expression on the message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class KnownFault:
    name: str
    outcome: str  # internal | hang | oom | quality
    exception: str | None = None  # exception type (quality: the error class)
    where: str | None = None  # file:function (quality: the issue, e.g. "no hint")
    message: str | None = None  # regular expression searched in the message
    reproducer: str = ""

    def matches(self, result: dict, issue: str | None = None) -> bool:
        if self.outcome == "quality":
            return (issue == self.where and (self.exception is None or result.get("error") == self.exception)
                    and (self.message is None or re.search(self.message, result.get("message", "")) is not None))
        return (result["outcome"] == self.outcome
                and (self.exception is None or result.get("exception") == self.exception)
                and (self.where is None or result.get("where") == self.where)
                and (self.message is None or re.search(self.message, result.get("message", "")) is not None))


# Reproducers run from the repository root; make the files with the Python lines given.
_KARATE = "--graph examples/data/karate.npz"
KNOWN_FAULTS: tuple[KnownFault, ...] = (
    # ---- weights files (runtime.load_weights) ----
    KnownFault("weights file that is not a zip", "internal", "BadZipFile", "mpdsl/runtime.py:load_weights",
               reproducer="printf 'PK\\3\\4junk' > w.npz; mpdsl run examples/gcn.mp " + _KARATE + " --weights w.npz"),
    KnownFault("empty weights file", "internal", "EOFError", "mpdsl/runtime.py:load_weights",
               reproducer=": > w.npz; mpdsl run examples/gcn.mp " + _KARATE + " --weights w.npz"),
    KnownFault("weights file holding one .npy array", "internal", "TypeError", "mpdsl/runtime.py:load_weights",
               "context manager protocol",
               reproducer="python -c \"import numpy as np; np.save(open('w.npz', 'wb'), np.zeros(3))\"; "
                          "mpdsl run examples/gcn.mp " + _KARATE + " --weights w.npz"),
    KnownFault("weights file whose header declares a huge array", "oom", "MemoryError", "mpdsl/runtime.py:<dictcomp>",
               reproducer="a weights .npz with a member b2.npy whose header says shape (10**12,) and holds 64 bytes "
                          "(tests/fuzz/fuzz_inputs.npy_with_header); mpdsl run examples/gcn.mp " + _KARATE +
                          " --weights w.npz"),
    # ---- graph files and sizes (graph.Graph.load, graph._segments) ----
    KnownFault("graph file whose header declares a huge array", "oom", "MemoryError", "mpdsl/graph.py:<dictcomp>",
               reproducer="karate.npz plus a member node_big.npy whose header says shape (10**12,) "
                          "(tests/fuzz/fuzz_inputs.npy_with_header); mpdsl run examples/gcn.mp --graph g.npz"),
    KnownFault("huge batch ids", "oom", "MemoryError", "mpdsl/graph.py:_segments",
               reproducer="python -c \"import numpy as np; k = dict(np.load('examples/data/karate.npz')); "
                          "np.savez('g.npz', **k, batch=np.full(34, 2**40), edge_attr=np.ones((156, 3)))\"; "
                          "mpdsl run examples/mpnn.mp --graph g.npz"),
    # ---- parameter sizes (no memory budget) ----
    KnownFault("huge parameters", "oom", "MemoryError", "mpdsl/runtime.py:initial_value",
               reproducer="mpdsl run examples/gcn.mp " + _KARATE + " --dim H=100000000000"),
    KnownFault("parameters past numpy's size limit", "internal", "ValueError", "mpdsl/runtime.py:initial_value",
               "array is too big",
               reproducer="mpdsl run examples/gcn.mp " + _KARATE + " --dim H=144115188075855872"),  # 2**57
    # ---- run-time checks of static indices (x[3] with x: node[F], F bound from data) ----
    KnownFault("static index past a dim bound at run time", "internal", "IndexError", "backends/__init__.py:_select",
               "out of bounds",
               reproducer="printf 'model m(x: node[F]) -> node[] {\\n return x[20]\\n}\\n' > t.mp; "
                          "mpdsl run t.mp --graph examples/data/lesmis.npz"),
    # ---- command-line flags ----
    KnownFault("negative --seed", "internal", "ValueError", "mpdsl/runtime.py:init", "non-negative integer",
               reproducer="mpdsl run examples/gcn.mp " + _KARATE + " --seed -1"),
    KnownFault("--save-weights to a path that cannot be written", "internal", None, "mpdsl/runtime.py:save_weights",
               r"^\[Errno \d+\]",
               reproducer="mpdsl run examples/gcn.mp " + _KARATE + " --save-weights no/such/dir/w.npz"),
    KnownFault("--out to a path that cannot be written", "internal", None, "mpdsl/cli.py:_run_command",
               r"^\[Errno \d+\]",
               reproducer="mpdsl run examples/gcn.mp " + _KARATE + " --out no/such/dir/out.npz"),
    # ---- user errors without a hint (graph.Graph.load) ----
    KnownFault("missing graph file: no hint", "quality", None, "no hint", r"graph file '.*' does not exist",
               reproducer="mpdsl run examples/gcn.mp --graph none.npz"),
    KnownFault("graph path is a directory: no hint", "quality", None, "no hint", r"graph file '.*' is a directory",
               reproducer="mpdsl run examples/gcn.mp --graph ."),
)


def known(result: dict, issue: str | None = None) -> KnownFault | None:
    return next((f for f in KNOWN_FAULTS if f.matches(result, issue)), None)
