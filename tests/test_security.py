"""What the compiler reads and writes outside the program: no parser cache in the temp folder, the
import policy (README: Imports), and the Numba cache folder (README: Caches)."""

from __future__ import annotations

import itertools
import json
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GCN = ROOT / "examples" / "gcn.mp"

# ---- lark's parser cache ------------------------------------------------------------------------

# Run in a fresh process: `mpdsl check` on the argument, recording every file whose name starts with
# ".lark" that the process opens (lark's cache names all do), wherever it is.
CHECK_AND_AUDIT = """
import json, os, sys
opened = []
def audit(event, args):
    if event == "open" and isinstance(args[0], (str, bytes)) and os.path.basename(os.fsdecode(args[0])).startswith(".lark"):
        opened.append(os.fsdecode(args[0]))
sys.addaudithook(audit)
from mpdsl.cli import main
code = main(["check", sys.argv[1]])
print(json.dumps({"code": code, "opened": opened}))
"""

# Run in a fresh process: build lark parsers of the mpdsl grammar with lark's default cache for every
# combination of the options mpdsl has used, which writes each cache file lark would look for.
WRITE_LARK_CACHES = """
import itertools, lark
from importlib import resources
grammar = resources.files("mpdsl.grammar").joinpath("mpdsl.lark").read_text(encoding="utf-8")
extra = [{}, {"cache_grammar": True}] if "cache_grammar" in lark.lark.LarkOptions._defaults else [{}]
for positions, placeholders, more in itertools.product([True, False], [True, False], extra):
    lark.Lark(grammar, parser="lalr", propagate_positions=positions, maybe_placeholders=placeholders,
              cache=True, **more)
"""


class _Canary:
    """Unpickling it writes ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('unpickled')",)


def _canary_bytes(marker: Path) -> bytes:
    # lark's cache file: a digest line, then pickles (the first is loaded before the digest is compared)
    return b"0" * 64 + b"\n" + pickle.dumps(_Canary(marker)) + pickle.dumps(_Canary(marker))


def _lark_cache_names(tmp_path: Path) -> list[str]:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    subprocess.run([sys.executable, "-c", WRITE_LARK_CACHES], check=True, timeout=120,
                   env={**os.environ, "TMPDIR": str(scratch)})
    names = sorted(p.name for p in scratch.iterdir())
    assert names and all(name.startswith(".lark") for name in names)
    return names


def _check_in_fresh_process(env: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHECK_AND_AUDIT, str(GCN)], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_a_planted_parser_cache_is_never_unpickled(tmp_path):
    """A pickle planted under every name lark's cache could have, in a private temp folder (TMPDIR)
    and in the default one, is not loaded by `mpdsl check`, and nothing is written there."""
    names = _lark_cache_names(tmp_path)
    marker = tmp_path / "canary-ran"
    private = tmp_path / "tmpdir"
    private.mkdir()
    for name in names:
        (private / name).write_bytes(_canary_bytes(marker))
    result = _check_in_fresh_process({**os.environ, "TMPDIR": str(private)})
    assert not marker.exists(), "the planted pickle was unpickled"
    assert result == {"code": 0, "opened": []}
    assert sorted(p.name for p in private.iterdir()) == names

    # the shared temp folder itself: plant only where no file of that name exists, remove them after
    shared = Path(tempfile.gettempdir())
    planted = []
    try:
        for name in names:
            try:
                fd = os.open(shared / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except OSError:
                continue
            with os.fdopen(fd, "wb") as handle:
                handle.write(_canary_bytes(marker))
            planted.append(shared / name)
        result = _check_in_fresh_process(dict(os.environ))  # the same temp folder as here
    finally:
        for path in planted:
            path.unlink(missing_ok=True)
    assert not marker.exists(), "the planted pickle was unpickled"
    assert result == {"code": 0, "opened": []}
