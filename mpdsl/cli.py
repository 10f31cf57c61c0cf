"""The command line: ``mpdsl check | compile | run | train``.

Exit codes: 0 success, 1 user error (bad program, graph, weights or inputs), 2 bad usage.
Results go to stdout; the timing/shape summary and diagnostics go to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from mpdsl import ast as mp_ast
from mpdsl import memory
from mpdsl.api import compile as compile_model
from mpdsl.api import lower, read_source
from mpdsl.backends import available_backends
from mpdsl.context import TARGETS
from mpdsl.diagnostics import MpdslError
from mpdsl.ir import print_program
from mpdsl.npz import check_writable, write_npz
from mpdsl.ops import DEFAULT_INITS
from mpdsl.plan import LAYOUT_MODES

EXIT_OK, EXIT_USER_ERROR, EXIT_USAGE = 0, 1, 2


def _dims(values: list[str]) -> dict[str, int]:
    dims: dict[str, int] = {}
    for item in values or []:
        name, _, value = item.partition("=")
        # ASCII digits only: str.isdigit also accepts superscripts such as '²', which int() refuses
        if not name.isidentifier() or not (value.isascii() and value.isdigit()):
            raise argparse.ArgumentTypeError(f"--dim expects NAME=INT (INT: digits 0-9), got {item!r}")
        if name in dims and dims[name] != int(value):
            raise argparse.ArgumentTypeError(f"--dim {name} is given twice ({dims[name]} and {int(value)})")
        dims[name] = int(value)
    return dims


def _seed(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return int(text)


def _memory_limit(text: str) -> str:
    try:
        memory.parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mpdsl",
                                     description="Compile and run message-passing GNN models (.mp files).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("model_file", help="the .mp program")
        p.add_argument("--model", help="the model to use when the file defines several")
        p.add_argument("--dim", action="append", metavar="NAME=INT", help="override a `dim` constant (repeatable)")
        p.add_argument("--dtype", choices=["float32", "float64", "float16", "bfloat16"], default="float32",
                       help="float16 and bfloat16 run on the triton backend")
        p.add_argument("--import-path", action="append", default=[], metavar="DIR", dest="import_paths",
                       help="a folder the program may import from besides its own (repeatable; "
                            "searched in order after the importing file's folder)")
        p.add_argument("--memory-limit", type=_memory_limit, metavar="SIZE",
                       help="memory budget for reading files, parameters and runs, e.g. 4G, 512M, or none "
                            f"(default: ${memory.ENV_VAR}, else the machine's available memory)")

    check = sub.add_parser("check", help="parse and type/shape-check a program")
    common(check)
    comp = sub.add_parser("compile", help="print a stage of the compilation")
    common(comp)
    comp.add_argument("--emit", choices=["ast", "ir", "ir-opt", "plan", "triton"], default="ir",
                      help="what to print: the AST, the IR, the optimized IR, the execution plan, or the "
                           "generated Triton kernels, those the GPU target runs (default: ir)")
    comp.add_argument("--locations", action="store_true", help="with --emit ir/ir-opt: print source locations")
    comp.add_argument("--training", action="store_true",
                      help="with --emit plan: also plan the training step (the train-forward with its residuals, "
                           "and the backward, with respect to every trained parameter)")
    comp.add_argument("--passes", help="comma-separated passes instead of the default pipeline")
    comp.add_argument("--graph", help="with --emit plan: size the plan for this graph (.npz)")
    comp.add_argument("--layout", choices=LAYOUT_MODES, default="auto",
                      help="node reordering for locality (default: auto, when it pays)")
    comp.add_argument("--backend", default="numpy", choices=available_backends(),
                      help="the backend to plan for (default: numpy)")
    comp.add_argument("--target", choices=TARGETS,
                      help="with --emit ir-opt/plan: the device kind to optimize for, which picks the layouts "
                           "(default: the backend's, numpy: cpu, triton: gpu); --emit triton is always gpu")
    run = sub.add_parser("run", help="run a model on a graph")
    common(run)
    run.add_argument("--graph", required=True, help="graph file (.npz, PyG names: edge_index, x, ...)")
    run.add_argument("--weights", help="parameters (.npz, one array per parameter); default: initialise")
    run.add_argument("--seed", type=_seed, default=0, help="seed of the parameter initialisation (default 0)")
    run.add_argument("--init", choices=DEFAULT_INITS, default="torch",
                     help="the initialisers of parameters with none written in the file: torch (default; "
                          "torch.nn.Linear's weights and biases) or glorot (glorot weights, zero biases)")
    run.add_argument("--out", help="write the outputs to this .npz file (exactly this path)")
    run.add_argument("--save-weights", help="write the parameters used to this .npz file (exactly this path)")
    run.add_argument("--backend", default="numpy", choices=available_backends())
    run.add_argument("--passes", help="comma-separated passes instead of the default pipeline")
    run.add_argument("--no-opt", action="store_true", help="run the reference IR as written (no passes)")
    run.add_argument("--layout", choices=LAYOUT_MODES, default="auto",
                     help="node reordering for locality (default: auto, when it pays; cpu target only)")
    run.add_argument("--target", choices=TARGETS,
                     help="the device kind to optimize for (default: the backend's, numpy: cpu, triton: gpu)")
    from mpdsl.train import add_arguments as add_train_arguments

    train = sub.add_parser("train", help="train a model (node classification, graph regression); see mpdsl.train")
    common(train)
    add_train_arguments(train)
    return parser


def _summary_line(name: str, array: np.ndarray) -> str:
    return f"{name}: {list(array.shape)} {array.dtype}"


def _show(name: str, array: np.ndarray, rows: int = 5) -> str:
    lines = [f"{name}: shape {list(array.shape)}, dtype {array.dtype}"]
    if array.size:
        lines.append(f"  mean {array.mean():.6g}  std {array.std():.6g}  min {array.min():.6g}  max {array.max():.6g}")
    with np.printoptions(precision=4, suppress=True, linewidth=100):
        lines.append(str(array[:rows]))
    if array.ndim == 2 and array.shape[1] > 1 and array.shape[0]:
        pred = array.argmax(axis=1)
        counts = np.bincount(pred, minlength=array.shape[1])
        lines.append(f"  argmax per row (first {min(20, len(pred))}): {pred[:20].tolist()}  "
                     f"class counts: {counts.tolist()}")
    if array.shape[0] > rows:
        lines.append(f"  ... {array.shape[0] - rows} more rows")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        dims = _dims(args.dim)
    except SystemExit as exit_:
        return int(exit_.code or 0) and EXIT_USAGE
    except argparse.ArgumentTypeError as err:
        print(f"mpdsl: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with memory.limited(args.memory_limit):
            return _run_command(args, dims)
    except MpdslError as err:
        print(err.render(), file=sys.stderr)
        return EXIT_USER_ERROR


def _run_command(args: argparse.Namespace, dims: dict[str, int]) -> int:
    if args.command == "train":
        from mpdsl.train import run_cli

        return run_cli(args, dims)
    start = time.perf_counter()
    passes = [p.strip() for p in args.passes.split(",") if p.strip()] if getattr(args, "passes", None) else None
    if args.command == "compile" and args.training and args.emit != "plan":
        print(f"mpdsl: error: --training plans the training step: it goes with --emit plan, not --emit {args.emit}",
              file=sys.stderr)
        return EXIT_USAGE
    if args.command == "compile" and args.emit in ("ir-opt", "plan", "triton"):
        return _emit_optimized(args, dims, passes, start)
    if args.command in ("check", "compile"):
        text, name = read_source(Path(args.model_file))
        module, program = lower(text, name, model=args.model, dtype=args.dtype, dims=dims,
                                import_paths=args.import_paths)
        elapsed = (time.perf_counter() - start) * 1e3
        if args.command == "check":
            print(f"{name}: ok: model {program.name}, {len(program.inputs)} input(s), "
                  f"{len(program.params)} parameter(s), {len(program.values)} IR values")
        elif args.emit == "ast":
            print(mp_ast.dump(module))
        else:
            print(print_program(program, locations=args.locations), end="")
        print(f"[mpdsl] {args.command} {name} in {elapsed:.1f} ms", file=sys.stderr)
        return EXIT_OK

    # Output paths are checked before the work, so that a typo does not cost a run.
    if args.out:
        check_writable(args.out, MpdslError, "outputs")
    if args.save_weights:
        check_writable(args.save_weights, MpdslError, "weights")
    model = compile_model(Path(args.model_file), backend=args.backend, model=args.model, dtype=args.dtype,
                          dims=dims, seed=args.seed, optimize=not args.no_opt, passes=passes, layout=args.layout,
                          import_paths=args.import_paths, target=args.target, init=args.init)
    from mpdsl.plan import decided_node_order
    from mpdsl.runtime import as_graph

    graph = as_graph(args.graph)
    if args.weights:
        model.load_weights(args.weights)
    outputs = model.run(graph)
    for name, array in outputs.items():
        print(_show(name, array))
    if args.out:
        write_npz(args.out, outputs, MpdslError, "outputs")
    if args.save_weights:
        model.save_weights(args.save_weights)
    shapes = "; ".join(_summary_line(n, a) for n, a in outputs.items())
    params = sum(int(p.size) for p in model.params.values())
    decision = decided_node_order(graph, model.layout)
    layout = f" (layout: {decision.summary()})" if decision is not None else ""
    print(f"[mpdsl] {model.name} on {graph.num_nodes} nodes / {graph.num_edges} edges: compile "
          f"{model.compile_seconds * 1e3:.1f} ms, run {model.last_run_seconds * 1e3:.1f} ms on {args.backend}"
          f"{layout}; {params} parameters; {shapes}", file=sys.stderr)
    return EXIT_OK


def _emit_optimized(args: argparse.Namespace, dims: dict[str, int], passes: list[str] | None, start: float) -> int:
    from mpdsl.plan import degree_balance, fixed_order_reason, gathered_row_bytes, node_order_for, report
    from mpdsl.runtime import as_graph, check_graph_index_memory

    target = args.target
    if args.emit == "triton":  # the kernels the GPU target runs
        if target not in (None, "gpu"):
            print(f"mpdsl: error: --emit triton shows the kernels of the gpu target, not --target {target} "
                  "(--emit ir-opt / plan take --target cpu)", file=sys.stderr)
            return EXIT_USAGE
        target = "gpu"
    model = compile_model(Path(args.model_file), backend=args.backend, model=args.model, dtype=args.dtype,
                          dims=dims, passes=passes, layout=args.layout, import_paths=args.import_paths,
                          target=target)
    graph = as_graph(args.graph) if args.graph else None
    bound = dict(model.static_dims)
    if graph is not None:
        check_graph_index_memory(graph)  # the layout decisions build the graph's CSR indices
        bound = model.bind(graph, {})[1]
    program, ctx = model.optimized_for(bound)
    elapsed = (time.perf_counter() - start) * 1e3
    if args.emit == "triton":
        from mpdsl.backends.triton_backend import emit_triton
        print(emit_triton(program, bound), end="")
    elif args.emit == "ir-opt":
        print(print_program(program, locations=args.locations), end="")
    else:
        layout = model.context.choose_layout(graph, program) if graph is not None else None
        reasons = list(layout.reasons) if layout is not None else []
        if graph is not None and layout is None:
            reasons.append(fixed_order_reason(program) or (
                node_order_for(graph, args.layout, gathered_row_bytes(program)).reason if model.target == "cpu" else
                "gpu target: the graph runs in its given order (no node reordering, no edge sorting)"))
        if graph is not None:
            reasons.append(degree_balance(graph))
        unbound = sorted({s for v in model.ir.values for d in v.type.shape for s in d.symbols} - set(bound))
        if unbound:
            raise MpdslError(f"the plan needs the sizes of {', '.join(unbound)}, bound from the model's inputs",
                             "pass --graph g.npz (or --dim NAME=INT)")
        notes = list(ctx.notes)
        if hasattr(model.backend, "schedule"):  # the NumPy backend's row-block fusion
            from mpdsl.backends.row_fusion import describe
            how = getattr(model.backend, "compiled_group_reason", None)
            notes += [("row_fusion", line) for line in describe(
                program, model.backend.schedule(program), model.backend.fuse_min_rows,
                None if how is None else lambda group: how(program, group, bound))]
        if hasattr(model.backend, "compiled_program_reason"):  # the NumPy backend's small-graph tier
            notes.append(("compiled program", model.backend.compiled_program_reason(program, bound)))
        print(report(model.ir, program, notes, bound, graph, reasons), end="")
        if args.training:
            print("\n" + _training_plan(model, program, bound, graph), end="")
    print(f"[mpdsl] compile {model.source_name} in {elapsed:.1f} ms", file=sys.stderr)
    return EXIT_OK


def _training_plan(model, program, bound: dict[str, int], graph) -> str:
    """The training step's plan (``--emit plan --training``): the programs the torch module trains
    with (dropout in its training form), with respect to every parameter that is not a batch-norm
    running statistic."""
    from mpdsl.autodiff import batch_norm_statistics, grad_program
    from mpdsl.plan import training_report

    statistics = set(batch_norm_statistics(model.ir))
    wrt = [name for name in model.param_types if name not in statistics]
    if not wrt:
        raise MpdslError(f"model {model.name} has no parameters to train", "--training plans a training step")
    context = model.context
    programs = context.training_programs(bound, program.float_dtype, True, [], wrt)
    reference = context.reference(bound, program.float_dtype, "train")
    if programs.masks:
        from mpdsl.autodiff import mask_dropout

        reference = mask_dropout(reference)[0]
    gradient = grad_program(reference, wrt=wrt, keep_outputs=True)
    text = training_report(gradient, programs.train_forward, programs.backward, programs.residuals, wrt, bound, graph)
    if hasattr(model.backend, "compiled_program_reason"):  # the NumPy backend's small-graph tier
        text += "\ndecisions:\n" + "".join(
            f"  [compiled program] {part}: {model.backend.compiled_program_reason(p, bound, training=True)}\n"
            for part, p in (("train-forward", programs.train_forward), ("backward", programs.backward)))
    return text


if __name__ == "__main__":
    sys.exit(main())
