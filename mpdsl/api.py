"""The embedding API: ``mpdsl.compile(path_or_source, backend=...)``."""

from __future__ import annotations

import difflib
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from mpdsl import ast as mp_ast
from mpdsl import memory, syntax, typecheck
from mpdsl.backends import get_backend
from mpdsl.context import check_target
from mpdsl.diagnostics import CompileError, MpdslError, shown
from mpdsl.initialisation import check_default
from mpdsl.ir import Program
from mpdsl.passes import PassManager
from mpdsl.plan import LAYOUT_MODES
from mpdsl.runtime import CompiledModel, check_seed

DTYPES = {"float32": "f32", "float64": "f64", "float16": "f16", "bfloat16": "bf16",
          "f32": "f32", "f64": "f64", "f16": "f16", "bf16": "bf16"}


def read_source(path_or_source: str | Path) -> tuple[str, str]:
    """(text, name): a Path or a string naming an existing/.mp file is read; other strings are source.
    A file is read as UTF-8, at most ``syntax.MAX_SOURCE_BYTES`` of it."""
    if isinstance(path_or_source, Path) or (
            isinstance(path_or_source, str) and "\n" not in path_or_source and "{" not in path_or_source):
        path = Path(path_or_source)
        try:
            with open(path, "rb") as handle:
                data = handle.read(syntax.MAX_SOURCE_BYTES + 1)
        except FileNotFoundError:
            raise MpdslError(f"no such file: {shown(str(path))}",
                             "pass the path of a .mp file, or the program text") from None
        except IsADirectoryError:
            raise MpdslError(f"cannot read {shown(str(path))}: it is a folder", "pass the path of a .mp file") from None
        except ValueError:  # a NUL character in the path
            raise MpdslError(f"cannot read {shown(str(path))}: a file path cannot hold a NUL character",
                             "pass the path of a .mp file") from None
        except OSError as err:
            raise MpdslError(f"cannot read {shown(str(path))}: {err.strerror or err}",
                             "pass the path of a readable .mp file") from None
        if len(data) > syntax.MAX_SOURCE_BYTES:
            raise MpdslError(f"cannot read {shown(str(path))}: it is larger than {syntax.MAX_SOURCE_SIZE}",
                             f"a program file holds at most {syntax.MAX_SOURCE_SIZE} of text")
        return syntax.decode_source(data, str(path)), str(path)
    return str(path_or_source), "<string>"


def lower(text: str, name: str = "<string>", *, model: str | None = None, dtype: str = "float32",
          dims: dict[str, int] | None = None, import_paths: Iterable[str | Path] = ()) -> tuple[object, Program]:
    """Parse and type-check source text: (AST, verified IR). Imports resolve from the file's folder
    (the current folder for text), and may also come from the ``import_paths`` folders (see
    ``syntax.resolve_imports``)."""
    if dtype not in DTYPES:
        raise MpdslError(f"unknown dtype {dtype!r}", "use float32 or float64 (float16, bfloat16: triton backend)")
    if dims is not None and not isinstance(dims, Mapping):
        raise MpdslError(f"dims must be a mapping of dim names to integers, got {type(dims).__name__}",
                         'pass e.g. dims={"H": 32}')
    for key, value in (dims or {}).items():
        if isinstance(value, bool):
            raise CompileError(f"dimension override {key}={value!r} is not a non-negative integer", None)
    module = syntax.parse(text, name)
    base_dir = Path(name).parent if name != "<string>" else Path.cwd()
    imports = syntax.resolve_import_graph(module, base_dir, import_paths)
    prelude = syntax.prelude()
    _check_dim_names(dims or {}, module, [*imports.modules, prelude], model)
    return module, typecheck.check(module, model, DTYPES[dtype], dims, imports.modules, prelude, imports.direct)


def _check_dim_names(dims: Mapping[str, int], module: mp_ast.Module, others: list[mp_ast.Module],
                     model: str | None) -> None:
    """Every overridden dim must be one the program has: a `dim` constant (of the file, its
    imports or the prelude) or a dim of the model's input types (then fixed instead of bound
    from the data). Checked before type checking, which would take an unknown name as a new dim."""
    known = {item.name for m in [module, *others] for item in m.items if isinstance(item, mp_ast.DimDef)}
    models = [i for i in module.items if isinstance(i, mp_ast.FuncDef) and i.kind == "model"]
    chosen = [m for m in models if m.name == model] if model is not None else models
    for item in chosen or models:
        known |= {name for arg in item.args for d in arg.type.dims for name in d.names()}
    unknown = [key for key in dims if key not in known]
    if unknown:
        key = unknown[0]
        close = [k for k in sorted(known) if k.lower() == key.lower()] or \
            difflib.get_close_matches(key, sorted(known), n=1)
        listed = ", ".join(sorted(known)) or "none"
        hint = (f"did you mean '{close[0]}'? " if close else "") + f"its dims are: {listed}"
        where = f"model '{chosen[0].name}'" if len(chosen) == 1 else "the program"
        span = chosen[0].name_span if len(chosen) == 1 else module.span
        raise CompileError(f"{where} has no dim named '{key}' (given as --dim {key}=... / dims=)", span, hint)


def all_dims_static(program: Program) -> bool:
    """Whether every dim of ``program`` is known at compile time (none is bound from the data)."""
    static = {k for k, v in program.dims if v is not None}
    return all(v is not None for _, v in program.dims) and all(
        s in static for v in program.values for d in v.type.shape for s in d.symbols)


def compile(path_or_source: str | Path, backend: str = "numpy", *, model: str | None = None,
            dtype: str = "float32", dims: dict[str, int] | None = None, seed: int = 0,
            optimize: bool = True, passes: list[str] | None = None, layout: str = "auto",
            import_paths: Iterable[str | Path] = (),
            memory_limit: int | str | None = None, target: str | None = None, init: str = "torch") -> CompiledModel:
    """Compile a .mp program (a path or the text itself) into a callable model.

    ``model`` picks a model when the file defines several; ``dims`` overrides `dim` constants;
    ``seed`` initialises the parameters (see ``CompiledModel.init``). ``optimize=False`` runs the
    reference IR as written; ``passes`` replaces the default pipeline; ``layout`` is "auto" (node
    reordering when it pays), "reorder" (always) or "none". ``import_paths``: folders from which the
    program may import besides its own folder (README, Imports). ``memory_limit`` (bytes, or a
    size such as "4G"; "none": no limit) is the memory budget that reading files, initialising the
    parameters and each run are checked against before they allocate (default: the
    ``MPDSL_MEMORY_LIMIT`` environment variable, else the machine's available memory; see
    ``mpdsl.memory``). ``target`` ("cpu" or "gpu"; default: the backend's, numpy -> cpu, triton ->
    gpu) is the device kind the optimizer plans layouts for (see ``mpdsl.context.CompileContext``).
    ``init`` is the model-wide initialiser of the parameters with none written in the file: "torch"
    (torch.nn.Linear's rule for weights and biases) or "glorot" (glorot weights, zero biases); see
    ``mpdsl.initialisation``.

    When every dim is known at compile time the pass pipeline runs now (its errors are reported
    here, and the first call finds the program compiled); otherwise it runs once at the first call,
    for the dims bound from the data, and reports its errors then."""
    start = time.perf_counter()
    check_seed(seed)
    check_default(init)
    memory.check_limit(memory_limit)
    text, name = read_source(path_or_source)
    module, program = lower(text, name, model=model, dtype=dtype, dims=dims, import_paths=import_paths)
    if layout not in LAYOUT_MODES:
        raise MpdslError(f"unknown layout mode {layout!r}", f"use one of {', '.join(LAYOUT_MODES)}")
    if passes is not None:
        PassManager(list(passes))  # unknown pass names are reported now
    if target is not None:
        check_target(target)
    runner = get_backend(backend)
    runner.check_dtype(program.float_dtype)
    model_ = CompiledModel(program, runner, source_name=name, seed=seed, ast=module, optimize=optimize,
                           passes=passes, layout=layout, memory_limit=memory_limit, target=target, init=init)
    if optimize and all_dims_static(program):
        model_.program_for(model_.static_dims)  # the program of the first call: compiled once, now
    model_.compile_seconds = time.perf_counter() - start
    return model_
