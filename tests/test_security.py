"""What the compiler reads and writes outside the program: no parser cache in the temp folder, the
import policy (README: Imports), and the Numba cache folder (README: Caches)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

import mpdsl
from mpdsl import syntax

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


# ---- imports --------------------------------------------------------------------------------------

SECRET = "SECRET-LINE root:x:0:0"
MODEL = "model m(x: node[F]) -> node[F] {\n    return x\n}\n"


def program(folder: Path, imported: str, body: str = MODEL) -> Path:
    main = folder / "main.mp"
    main.write_text(f'import "{imported}"\n{body}')
    return main


@pytest.fixture
def project(tmp_path):
    """tmp/project/main.mp's folder, with a secret text file and a .mp file beside the project."""
    root = tmp_path / "project"
    (root / "lib").mkdir(parents=True)
    (tmp_path / "secret.txt").write_text(SECRET + "\n")
    (tmp_path / "outside.mp").write_text("dim Q = 2\n")
    (root / "notes.txt").write_text(SECRET + "\n")
    return root


def refused(main: Path, **kwargs) -> mpdsl.CompileError:
    with pytest.raises(mpdsl.CompileError) as info:
        mpdsl.compile(main, **kwargs)
    error = info.value
    assert SECRET not in error.render() and "SECRET" not in error.render()
    return error


def test_imports_resolve_from_the_importing_file_then_the_import_paths(project, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "widths.mp").write_text("dim K = 7\n")
    (shared / "wide.mp").write_text("dim W = 9\n")
    (project / "wide.mp").write_text("dim W = 5\n")  # the importing file's folder comes first
    (project / "common.mp").write_text('import "wide.mp"\n')
    (project / "lib" / "layers.mp").write_text('import "../common.mp"\nimport "widths.mp"\n'
                                               "layer lin(h: node[F], A: param[F, K]) -> node[K] {\n    return h @ A\n}\n")
    main = program(project, "lib/layers.mp",
                   "model m(x: node[F], A: param[F, K], B: param[F, W]) -> node[K] {\n    return lin(x, A)\n}\n")
    model = mpdsl.compile(main, import_paths=[shared])
    assert (model.static_dims["K"], model.static_dims["W"]) == (7, 5)
    error = refused(main)  # widths.mp only comes from the import path
    assert error.message == "cannot import 'widths.mp': no such file"
    assert error.span.source.name == "lib/layers.mp" and (error.line, error.col) == (2, 1)
    absolute = program(project, (shared / "widths.mp").as_posix())
    assert mpdsl.compile(absolute, import_paths=[str(shared)]).static_dims["K"] == 7
    with pytest.raises(mpdsl.MpdslError, match="import path 'nowhere' is not a folder"):
        mpdsl.compile(main, import_paths=["nowhere"])


@pytest.mark.parametrize("imported,message", [
    ("/etc/passwd", "only .mp files can be imported"),
    ("../secret.txt", "only .mp files can be imported"),
    ("notes.txt", "only .mp files can be imported"),
    ("lib", "only .mp files can be imported"),
    ("../outside.mp", "the path leads outside the program's folder"),
    ("../absent.mp", "the path leads outside the program's folder"),  # no hint whether it exists
    ("lib/../../outside.mp", "the path leads outside the program's folder"),
    ("{tmp}/outside.mp", "an absolute import path must lie inside an --import-path folder"),
    ("{tmp}/project/lib/x.mp", "an absolute import path must lie inside an --import-path folder"),
    ("out.mp", "it is a link to a file outside the program's folder"),
    ("notes.mp", "it is a link to a file that is not a .mp program"),
    ("zero.mp", "it is a link to a file outside the program's folder"),
    ("folder.mp", "it is a folder, not a regular file"),
    ("big.mp", "it is larger than 256 KiB"),
])
def test_imports_outside_the_policy_are_refused_at_the_import(project, tmp_path, imported, message):
    (project / "out.mp").symlink_to(tmp_path / "outside.mp")
    (project / "notes.mp").symlink_to(project / "notes.txt")
    (project / "zero.mp").symlink_to("/dev/zero")
    (project / "folder.mp").mkdir()
    (project / "big.mp").write_text("# " + "x" * syntax.MAX_SOURCE_BYTES + "\n")
    main = program(project, imported.format(tmp=tmp_path.as_posix()))
    error = refused(main)
    assert error.message == f"cannot import '{imported.format(tmp=tmp_path.as_posix())}': {message}"
    assert error.render().startswith(f"{main}:1:1: error: ")
    assert "\n   1 | import " in error.render() and "hint: " in error.render()


def test_a_link_to_a_device_is_refused_even_from_an_allowed_folder(project):
    (project / "zero.mp").symlink_to("/dev/zero")
    error = refused(program(project, "zero.mp"), import_paths=["/dev"])
    assert error.message == "cannot import 'zero.mp': it is a link to a file that is not a .mp program"
    with pytest.raises(syntax._Refused, match="it is a character device, not a regular file"):
        syntax._read_regular_file("/dev/zero")  # refused from its stat, without reading


def test_a_fifo_is_refused_without_being_opened(project):
    fifo = project / "pipe.mp"
    os.mkfifo(fifo)
    main = program(project, "pipe.mp")
    done = threading.Event()

    def unblock():  # had the compiler opened the FIFO for reading, this releases it (and the test fails)
        while not done.wait(0.2):
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass

    writer = threading.Thread(target=unblock, daemon=True)
    writer.start()
    try:
        error = refused(main)
    finally:
        done.set()
        writer.join()
    assert error.message == "cannot import 'pipe.mp': it is a FIFO, not a regular file"


def test_control_characters_in_an_import_path_are_a_located_error(project):
    main = project / "main.mp"
    main.write_text('dim K = 2\nimport "lib/a\x00b.mp"\n' + MODEL)
    error = refused(main)
    assert error.message == "import path contains the control character '\\x00'"
    assert (error.line, error.col) == (2, 1)
    assert "\x00" not in error.render()


def test_bytes_that_are_not_utf8_are_located_in_main_and_imported_files(project):
    (project / "lib" / "bad.mp").write_bytes(b"dim K = 2\n# caf\xe9 \xff\n")
    error = refused(program(project, "lib/bad.mp"))
    assert error.render().splitlines()[0] == "lib/bad.mp:2:6: error: the file is not UTF-8 text: byte 0xe9 cannot be decoded"
    assert "hint: " in error.render()
    main = project / "main.mp"
    main.write_bytes(b"dim K = 2\n\xff" + MODEL.encode())
    error = refused(main)
    assert (error.span.source.name, error.line, error.col) == (str(main), 2, 1)


def test_cli_refusals_exit_1_without_a_traceback_or_the_files_text(project, tmp_path):
    from mpdsl.cli import main as cli
    for imported in ("/etc/passwd", "../secret.txt", (tmp_path / "secret.txt").as_posix()):
        main = program(project, imported)
        proc = subprocess.run([sys.executable, "-m", "mpdsl.cli", "check", str(main), "--import-path", str(tmp_path)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1
        assert "Traceback" not in proc.stderr and "SECRET" not in proc.stderr and "root:" not in proc.stderr
        assert proc.stderr.startswith(f"{main}:1:1: error: cannot import ")
    main = program(project, "../outside.mp")
    assert cli(["check", str(main)]) == 1
    assert cli(["check", str(main), "--import-path", str(tmp_path)]) == 0


def test_cli_reports_bad_bytes_and_control_characters_located(project, capsys):
    from mpdsl.cli import main as cli
    (project / "bad.mp").write_bytes(b"dim K = \xff2\n")
    assert cli(["check", str(program(project, "bad.mp"))]) == 1
    assert capsys.readouterr().err.startswith("bad.mp:1:9: error: the file is not UTF-8 text")
    assert cli(["check", str(program(project, "a\x00.mp"))]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{project / 'main.mp'}:1:1: error: import path contains the control character")
    assert "\x00" not in err and "Traceback" not in err


def test_imports_nest_at_most_max_import_depth(project):
    depth = syntax.MAX_IMPORT_DEPTH
    for i in range(depth + 1):
        (project / f"m{i}.mp").write_text(f'import "m{i + 1}.mp"\n' if i < depth else "dim K = 1\n")
    error = refused(program(project, "m0.mp"))
    assert error.message == f"cannot import 'm{depth}.mp': imports nest more than {depth} files deep"
    assert error.span.source.name == f"m{depth - 1}.mp"
    (project / f"m{depth - 1}.mp").write_text("dim K = 1\n")  # one level less: accepted
    assert mpdsl.compile(program(project, "m0.mp")).static_dims["K"] == 1


# ---- the Numba cache --------------------------------------------------------------------------------

# Run in a fresh process: compile one kernel of the NumPy backend (with argument "compile"), report
# where mpdsl is and where Numba caches.
COMPILE_A_KERNEL = """
import json, sys, numpy as np, mpdsl
from mpdsl.backends import cpu_kernels as k
if sys.argv[1:] == ["compile"]:
    x = np.arange(8.0).reshape(4, 2); out = np.empty_like(x)
    k.launch(k._put_rows, x, np.array([3, 2, 1, 0]), out)
    assert (out[::-1] == x).all()
import numba
print(json.dumps({"package": mpdsl.__file__, "cache": numba.config.CACHE_DIR,
                  "layer": numba.config.THREADING_LAYER}))
"""


def _installed_copy(site: Path) -> Path:
    """A copy of the package laid out as installed (mpdsl, mpdsl.backends, mpdsl.grammar), read-only."""
    package = site / "mpdsl"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "mpdsl", package, ignore=ignore)
    shutil.copytree(ROOT / "backends", package / "backends", ignore=ignore)
    shutil.copytree(ROOT / "grammar", package / "grammar", ignore=ignore)
    for path in [package, *package.rglob("*")]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    return package


def _run_kernel(tmp_path: Path, site: Path, compile: bool = True, numba_first: bool = False,
                **env_changes) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME", "NUMBA_THREADING_LAYER")}
    env.update(HOME=str(tmp_path / "home"), PYTHONPATH=str(site), PYTHONDONTWRITEBYTECODE="1", **env_changes)
    script = ("import numba\n" if numba_first else "") + COMPILE_A_KERNEL
    proc = subprocess.run([sys.executable, "-c", script] + (["compile"] if compile else []),
                          capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_kernels_are_cached_per_user_and_a_read_only_install_runs(tmp_path):
    site = tmp_path / "site"
    package = _installed_copy(site)
    try:
        report = _run_kernel(tmp_path, site, XDG_CACHE_HOME=str(tmp_path / "xdg"))
        assert Path(report["package"]).parent == package
        assert report["cache"] == str(tmp_path / "xdg" / "mpdsl" / "numba")
        assert list((tmp_path / "xdg" / "mpdsl" / "numba").rglob("*.nbi"))
        assert (tmp_path / "xdg" / "mpdsl" / "numba").stat().st_mode & 0o077 == 0  # private to the user
        assert not [p for p in site.rglob("*") if p.suffix in (".nbi", ".nbc")]
        assert not (tmp_path / "home" / ".cache" / "numba").exists()  # nor Numba's own fallback

        # without XDG_CACHE_HOME: under the home folder; a folder the user set is honoured
        report = _run_kernel(tmp_path, site, compile=False)
        assert report["cache"] == str(tmp_path / "home" / ".cache" / "mpdsl" / "numba")
        report = _run_kernel(tmp_path, site, compile=False, numba_first=True)  # the user imported Numba first
        assert report["cache"] == str(tmp_path / "home" / ".cache" / "mpdsl" / "numba")
        assert report["layer"] == "workqueue"
        mine = tmp_path / "mine"
        report = _run_kernel(tmp_path, site, NUMBA_CACHE_DIR=str(mine))
        assert report["cache"] == str(mine) and list(mine.rglob("*.nbi"))
        assert not [p for p in site.rglob("*") if p.suffix in (".nbi", ".nbc")]
    finally:
        for path in [package, *package.rglob("*")]:
            path.chmod(path.stat().st_mode | stat.S_IWUSR)
