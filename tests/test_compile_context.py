"""CompileContext: one compile object for CompiledModel, the torch module and the command line.

The pass pipeline runs once per configuration (dims, dtype, batch-norm mode; for the torch module's
training programs also the training flag, inputs and parameters differentiated), also on the first
call of a model whose dims are bound from the data; the target is explicit and picks the layouts.
"""

from pathlib import Path

import numpy as np
import pytest

import mpdsl
from mpdsl.backends import get_backend
from mpdsl.context import CompileContext, Programs
from mpdsl.diagnostics import MpdslError
from mpdsl.runtime import CompiledModel

ROOT = Path(__file__).resolve().parents[1]
GCN = ROOT / "examples" / "gcn.mp"
KARATE = ROOT / "examples" / "data" / "karate.npz"

# A sum onto source nodes: CSR by source on the cpu target, COO + atomics on the gpu target.
BY_SRC = """
dim F = 8

model out_sum(x: node[F], W: param[F, F]) -> node[F] {
    return sum(x[dst] @ W) by src
}
"""

BATCH_NORM = """
model bn(x: node[F], rm: param[F] = zeros, rv: param[F] = ones, g: param[F] = ones, b: param[F] = zeros,
         W: param[F, F]) -> node[F] {
    h = batch_norm(x, rm, rv, g, b) @ W
    return dropout(sum(h[src]) by dst, 0.5)
}
"""


def karate() -> mpdsl.Graph:
    return mpdsl.Graph.load(KARATE)


def layouts(program) -> list[str]:
    return [v.attr["layout"] for v in program.values if v.op in ("gspmm", "attention")]


# ---- the pipeline runs once per key ------------------------------------------------------------


def test_first_call_with_data_bound_dims_runs_the_pipeline_once():
    model = mpdsl.compile(GCN)  # x: node[F], F bound from the graph
    assert model.context.total_pipeline_runs == 0, "the symbolic program is not optimized at compile time"
    graph = karate()
    model(graph)
    dims = {**model.static_dims, "F": 34}
    assert model.context.total_pipeline_runs == 1
    assert model.context.pipeline_runs[("program", tuple(sorted(dims.items())), "f32", None)] == 1
    model(graph)
    model.train()(graph)
    model.eval()(graph)
    assert model.context.total_pipeline_runs == 1, "later calls, in either mode, reuse the program"


def test_static_dims_are_optimized_at_compile_time_and_the_first_call_hits_the_cache():
    model = mpdsl.compile(GCN, dims={"F": 34})
    assert model.context.total_pipeline_runs == 1
    model(karate())
    assert model.context.total_pipeline_runs == 1
    assert model.optimized_ir is model.program_for(model.static_dims)


def test_symbolic_optimized_ir_is_still_available():
    model = mpdsl.compile(GCN)
    program = model.optimized_ir
    assert any("F" in d.symbols for v in program.values for d in v.type.shape)
    assert model.context.total_pipeline_runs == 1


def test_pipeline_runs_once_per_dims_dtype_and_mode():
    model = mpdsl.compile(BATCH_NORM, dims={"F": 4})
    context = model.context
    before = context.total_pipeline_runs
    configurations = [({"F": 4}, None, "eval"), ({"F": 4}, "f64", "eval"), ({"F": 4}, None, "train"),
                      ({"F": 4}, "f64", "train"), ({"F": 6}, None, "eval"), ({"F": 4}, None, None)]
    first = [context.program(*c) for c in configurations]
    for _ in range(3):
        again = [context.program(*c) for c in configurations]
        assert all(a is b for a, b in zip(first, again))
    # {"F": 4} with mode None is the program of the compile-time run: already there
    assert context.total_pipeline_runs == before + len(configurations) - 1
    assert all(count == 1 for count in context.pipeline_runs.values())
    assert context.program({"F": 4}, "f32", "eval") is first[0], "dtype None is the IR's own (f32)"
    f64 = first[1]
    assert {v.type.dtype for v in f64.values if v.type.is_float} == {"f64"}
    modes = [{v.attr["mode"] for v in p.values if v.op == "batch_norm"} for p in first[:3]]
    assert modes[0] == {"eval"} and modes[2] == {"train"}
    assert {v.attr["mode"] for v in first[5].values if v.op == "batch_norm"} == {"auto"}


def test_unoptimized_programs_are_the_reference_specialised():
    model = mpdsl.compile(GCN, optimize=False)
    program = model.program_for({**model.static_dims, "F": 34})
    assert model.context.total_pipeline_runs == 0
    assert len(program.values) == len(model.ir.values)
    assert all(d.is_static for v in program.values for d in v.type.shape)
    assert model.context.choose_layout(karate(), program) is None


def test_unknown_mode_is_an_error():
    model = mpdsl.compile(GCN, dims={"F": 34})
    with pytest.raises(MpdslError) as err:
        model.context.program(model.static_dims, mode="training")
    assert "mode" in err.value.message and "eval" in err.value.hint


# ---- the torch module's training programs --------------------------------------------------------


def test_torch_training_programs_are_built_once_per_key():
    torch = pytest.importorskip("torch")
    from mpdsl.torch_module import Programs as ReExported
    assert ReExported is Programs
    graph = karate()
    model = mpdsl.compile(GCN, dtype="float64")
    module = model.to_torch(graph)
    assert module.compiled.context is model.context
    context = model.context
    x = torch.from_numpy(np.asarray(graph["x"], dtype=np.float64)).requires_grad_()
    for _ in range(3):
        module.train()
        module(graph).sum().backward()
        module(graph, x=x).sum().backward()
        module.eval()
        module(graph).sum().backward()
    training = {k: n for k, n in context.pipeline_runs.items() if k[0] == "training"}
    dims = tuple(sorted({**model.static_dims, "F": 34}.items()))
    wrt = ("W1", "b1", "W2", "b2")
    assert training == {("training", dims, "f64", True, (), wrt): 1, ("training", dims, "f64", True, ("x",), wrt): 1,
                        ("training", dims, "f64", False, (), wrt): 1}
    assert isinstance(module.programs(graph, training=True), Programs)
    assert module.programs(graph, training=False) is context.training_programs(dict(dims), "f64", False, [], wrt)
    # the eval forward program is the plain program of those dims and dtype, built once
    assert context.pipeline_runs[("program", dims, "f64", "eval")] == 1
    assert sum(context.pipeline_runs.values()) == 4


# ---- targets and layouts ---------------------------------------------------------------------------


def test_target_defaults_to_the_backend_and_picks_the_layout():
    cpu = mpdsl.compile(BY_SRC)
    gpu = mpdsl.compile(BY_SRC, target="gpu")
    assert cpu.target == "cpu" and gpu.target == "gpu"
    assert layouts(cpu.optimized_ir) == ["csr_src"] and layouts(gpu.optimized_ir) == ["coo"]
    assert CompileContext(cpu.ir, get_backend("numpy")).target == "cpu"
    assert CompileContext(cpu.ir, get_backend("numpy"), target="gpu").target == "gpu"

    class GpuBackend:
        target = "gpu"

    assert CompiledModel(cpu.ir, GpuBackend()).target == "gpu"


def test_gpu_target_runs_the_graph_in_its_given_order():
    graph = karate()
    cpu = mpdsl.compile(GCN, layout="reorder")
    gpu = mpdsl.compile(GCN, layout="reorder", target="gpu")
    expected = cpu(graph)
    assert cpu.last_layout is not None and cpu.last_layout.nodes is not None
    np.testing.assert_allclose(gpu(graph), expected, rtol=1e-5, atol=1e-6)
    assert gpu.last_layout is None
    program = gpu.program_for({**gpu.static_dims, "F": 34})
    assert gpu.context.choose_layout(graph, program) is None


@pytest.mark.parametrize("target", ["tpu", "GPU", "", 1])
def test_unknown_target_is_an_error_with_a_hint(target):
    with pytest.raises(MpdslError) as err:
        mpdsl.compile(GCN, target=target)
    assert f"unknown target {target!r}" in err.value.message
    assert "'cpu' or 'gpu'" in err.value.hint
    model = mpdsl.compile(GCN)
    with pytest.raises(MpdslError):
        CompiledModel(model.ir, model.backend, target=target)
