"""The embedding API: ``mpdsl.compile(path_or_source, backend=...)``."""

from __future__ import annotations

import time
from pathlib import Path

from mpdsl import syntax, typecheck
from mpdsl.backends import get_backend
from mpdsl.diagnostics import MpdslError
from mpdsl.ir import Program
from mpdsl.passes import PassManager
from mpdsl.plan import LAYOUT_MODES
from mpdsl.runtime import CompiledModel

DTYPES = {"float32": "f32", "float64": "f64", "f32": "f32", "f64": "f64"}


def read_source(path_or_source: str | Path) -> tuple[str, str]:
    """(text, name): a Path or a string naming an existing/.mp file is read; other strings are source."""
    if isinstance(path_or_source, Path) or (
            isinstance(path_or_source, str) and "\n" not in path_or_source and "{" not in path_or_source):
        path = Path(path_or_source)
        try:
            return path.read_text(), str(path)
        except FileNotFoundError:
            raise MpdslError(f"no such file: {path}", "pass the path of a .mp file, or the program text") from None
        except UnicodeDecodeError as err:
            raise MpdslError(f"cannot read {path}: it is not UTF-8 text (byte {err.start})",
                             "save the program as UTF-8") from None
        except OSError as err:
            raise MpdslError(f"cannot read {path}: {err.strerror or err}",
                             "pass the path of a readable .mp file") from None
    return str(path_or_source), "<string>"


def lower(text: str, name: str = "<string>", *, model: str | None = None, dtype: str = "float32",
          dims: dict[str, int] | None = None) -> tuple[object, Program]:
    """Parse and type-check source text: (AST, verified IR)."""
    if dtype not in DTYPES:
        raise MpdslError(f"unknown dtype {dtype!r}", "use float32 or float64")
    module = syntax.parse(text, name)
    base_dir = Path(name).parent if name != "<string>" else Path.cwd()
    imported = syntax.resolve_imports(module, base_dir)
    return module, typecheck.check(module, model, DTYPES[dtype], dims, imported, syntax.prelude())


def compile(path_or_source: str | Path, backend: str = "numpy", *, model: str | None = None,
            dtype: str = "float32", dims: dict[str, int] | None = None, seed: int = 0,
            optimize: bool = True, passes: list[str] | None = None, layout: str = "auto") -> CompiledModel:
    """Compile a .mp program (a path or the text itself) into a callable model.

    ``model`` picks a model when the file defines several; ``dims`` overrides `dim` constants;
    ``seed`` initialises the parameters (see ``CompiledModel.init``). ``optimize=False`` runs the
    reference IR as written; ``passes`` replaces the default pipeline; ``layout`` is "auto" (node
    reordering when it pays), "reorder" (always) or "none"."""
    start = time.perf_counter()
    text, name = read_source(path_or_source)
    module, program = lower(text, name, model=model, dtype=dtype, dims=dims)
    if layout not in LAYOUT_MODES:
        raise MpdslError(f"unknown layout mode {layout!r}", f"use one of {', '.join(LAYOUT_MODES)}")
    if passes is not None:
        PassManager(list(passes))  # unknown pass names are reported now
    runner = get_backend(backend)
    model_ = CompiledModel(program, runner, source_name=name, seed=seed, ast=module, optimize=optimize,
                           passes=passes, layout=layout)
    if optimize:
        model_.optimized_ir  # noqa: B018 - optimise the compile-time-known part now
    model_.compile_seconds = time.perf_counter() - start
    return model_
