"""Half precision (float16, bfloat16): the Triton backend stores values in the half dtype and accumulates
every reduction, softmax and matmul in float32; the NumPy backend refuses half-precision programs.

* accumulation: 3000 ones summed into one node must give exactly 3000 (a float16 accumulator stops at
  2048, where 2048 + 1 rounds back to 2048), the same for a weighted g-SpMM, a segment softmax's
  normaliser and a fused attention's; dense axis sums and matmuls over 3000 terms; and the check can
  fail: with the kernels' float16 accumulator put back, the sum stops at 2048;
* example models: the f16 forward and gradient programs (``grad_program`` retyped to f16) against the
  f32 ones on the same f16-rounded inputs and weights, on a small graph: for every output,
  ``max |f16 - f32| <= 2e-2 * max |f32|`` (``HALF_TOLERANCE``);
* the IR: bf16 round-trips through the printer and parser, retypes, folds constants and emits kernels;
* bf16 kernels run on a GPU only (Triton's interpreter has no bfloat16 arithmetic): those tests are
  marked ``gpu`` and skip without CUDA.

On the CPU the kernels run in Triton's interpreter (``TritonBackend(interpret=True, device="cpu")``, as in
tests/test_triton.py), about a millisecond per loop iteration: the 3000-member segments cost seconds each.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import mpdsl  # noqa: E402
from mpdsl.autodiff import grad_program, retype  # noqa: E402
from mpdsl.backends import BackendError  # noqa: E402
from mpdsl.backends import triton_kernels  # noqa: E402
from mpdsl.backends.numpy_backend import NumpyBackend  # noqa: E402
from mpdsl.backends.triton_backend import TritonBackend, emit_triton  # noqa: E402
from mpdsl.backends.triton_kernels import KERNELS, Attention, CooGspmm, SegmentReduce, SegmentSoftmax  # noqa: E402
from mpdsl.backends.triton_kernels import TypedLinear, generate  # noqa: E402
from mpdsl.ir import IRParseError, parse_program, print_program, verify  # noqa: E402
from mpdsl.passes import optimize  # noqa: E402
from mpdsl.passes.rewrite import specialize  # noqa: E402
from mpdsl.plan import program_costs  # noqa: E402
from mpdsl.runtime import CompiledModel  # noqa: E402
from mpdsl.types import FLOAT_DTYPES, Domain  # noqa: E402
from model_inputs import synth_inputs  # noqa: E402
from test_passes import random_graph  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CPU = dict(device="cpu", interpret=True)
GPU = dict(device="cuda", interpret=False)
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (bfloat16 kernels)")

# max |half - f32| <= HALF_TOLERANCE[dtype] * max |f32| for each output of a model (forward or gradient),
# on the same half-rounded inputs and weights. Measured in f16: <= 1.7e-3 for all but mpnn's forward,
# 1.6e-2, whose f32 output itself moves by up to 4e-2 when its inputs and weights move by one float16
# ulp (three GRU steps, a small output). bfloat16 keeps 8 significant bits to float16's 11: 8x the bound.
HALF_TOLERANCE = {"f16": 2e-2, "bf16": 1.6e-1}
TORCH_HALF = {"f16": torch.float16, "bf16": torch.bfloat16}
MODELS = ["gcn", "gat", "gine", "sage_mean", "mpnn", "rgcn"]
GRAPH = random_graph(nodes=30, edges=90, self_loops=True)
TERMS = 3000  # members of the one long segment: beyond 2048, where a float16 sum of ones stops


def rounded(array, dtype: str) -> np.ndarray:
    """``array`` rounded to the half dtype, as float32 (float arrays; others unchanged)."""
    array = np.asarray(array)
    if array.dtype.kind != "f":
        return array
    return torch.from_numpy(array.astype(np.float32)).to(TORCH_HALF[dtype]).float().numpy()


def backend(dtype: str, layout: str | None = None) -> TritonBackend:
    """The Triton backend for a ``dtype`` test: on the GPU for bf16, in the interpreter for the rest;
    every kernel output poisoned with NaN first."""
    return TritonBackend(poison=True, layout=layout, **(GPU if dtype == "bf16" else CPU))


def gpu_program(model: CompiledModel, dims: dict) -> mpdsl.ir.Program:
    """``model``'s program for these dims, optimized for the GPU (fused g-SpMM and attention kernels)."""
    return optimize(specialize(model.ir, dims), None, dims, target="gpu")[0]


# ---- accumulation beyond 2048 -------------------------------------------------------------------


def star(sources: list[int]) -> mpdsl.Graph:
    """Node 0 with one in-edge from each entry of ``sources`` (multi-edges), in that order."""
    return mpdsl.Graph.from_arrays(np.stack([np.array(sources), np.zeros(len(sources), np.int64)]),
                                   max(sources) + 1)


def run_snippet(source: str, graph: mpdsl.Graph, inputs: dict, dtype: str, params: dict | None = None,
                layout: str | None = None) -> dict:
    """Run ``source`` (optimized for the GPU, retyped to ``dtype``) on the Triton backend: its outputs
    as float64 arrays, and the kernels it launched."""
    model = mpdsl.compile(source)
    arrays, dims = model.bind(graph, inputs)
    program = retype(gpu_program(model, dims), dtype)
    b = backend(dtype, layout)
    out = b.run(program, graph, arrays, params or {}, dims)
    return {k: v.astype(np.float64) for k, v in out.items()} | {"launches": b.last_launches}


def exactly(value: float, dtype: str) -> float:
    """``value`` computed in float32 and rounded once to the half dtype."""
    return float(torch.tensor(value, dtype=torch.float32).to(TORCH_HALF[dtype]).float())


SUM = "model m(s: edge[]) -> node[] {\n    return sum(s) by dst\n}\n"
GSPMM = "model m(x: node[], w: edge[]) -> node[] {\n    return sum(x[src] * w) by dst\n}\n"
SOFTMAX = "model m(s: edge[]) -> edge[] {\n    return softmax(s) by dst\n}\n"
ATTENTION = "model m(x: node[], s: edge[]) -> node[] {\n    return sum(softmax(s) by dst * x[src]) by dst\n}\n"


def check_segment_sum(dtype: str) -> None:
    graph = star([1] * TERMS)
    got = run_snippet(SUM, graph, {"s": np.ones(TERMS)}, dtype)
    assert got["out"][0] == exactly(TERMS, dtype), f"{dtype} sum of {TERMS} ones: {got['out'][0]}"
    assert got["launches"] and "aggregate_sum" in got["launches"][0]


def check_gspmm(dtype: str, layout: str | None = None) -> None:
    graph = star([1] * TERMS)
    got = run_snippet(GSPMM, graph, {"x": np.ones(2), "w": np.ones(TERMS)}, dtype, layout=layout)
    assert got["out"][0] == exactly(TERMS, dtype), f"{dtype} g-SpMM of {TERMS} ones: {got['out'][0]}"
    assert got["launches"] and "gspmm" in got["launches"][0]


def check_softmax(dtype: str) -> None:
    """Equal scores: each of the 3000 members gets 1/3000 (a float16 normaliser stopped at 2048: 1/2048)."""
    graph = star([1] * TERMS)
    got = run_snippet(SOFTMAX, graph, {"s": np.zeros(TERMS)}, dtype)
    np.testing.assert_array_equal(got["out"], exactly(1 / TERMS, dtype), err_msg=f"{dtype} softmax")
    assert "softmax" in got["launches"][0]


def check_attention(dtype: str, layout: str | None = None) -> None:
    """Equal scores, half the edges from a node holding 1, half from one holding 0: the mean, 0.5 (a
    normaliser stopped at 2048 gives 1500 / 2048)."""
    half = TERMS // 2
    graph = star([1] * half + [2] * half)
    got = run_snippet(ATTENTION, graph, {"x": np.array([0.0, 1.0, 0.0]), "s": np.zeros(TERMS)}, dtype, layout=layout)
    assert got["out"][0] == 0.5, f"{dtype} attention over {TERMS} edges: {got['out'][0]}"
    assert "attention" in got["launches"][0]


def test_segment_sum_of_3000_ones_is_3000_in_f16():
    check_segment_sum("f16")


def test_gspmm_of_3000_ones_is_3000_in_f16():
    check_gspmm("f16")


def test_softmax_normaliser_over_3000_members_in_f16():
    check_softmax("f16")


def test_attention_normaliser_over_3000_edges_in_f16():
    check_attention("f16")


@pytest.mark.parametrize("check", [check_gspmm, check_attention], ids=["gspmm", "attention"])
def test_coo_kernels_accumulate_3000_terms_in_f16(check):
    """The COO kernels' atomics add into float32 scratch buffers (one program per block of edges)."""
    check("f16", layout="coo")


def test_dense_axis_sum_and_matmul_of_3000_ones_in_f16():
    """Dense ops on half values run in torch on float32 copies, rounded to float16 once."""
    source = (f"dim K = {TERMS}\n"
              "model m(x: node[K], W: param[K, 1]) -> (total: node[], product: node[1]) {\n"
              "    return sum(x, -1), x @ W\n}\n")
    graph = star([1])
    got = run_snippet(source, graph, {"x": np.ones((2, TERMS))}, "f16", params={"W": np.ones((TERMS, 1))})
    np.testing.assert_array_equal(got["total"], TERMS)
    np.testing.assert_array_equal(got["product"], TERMS)


def test_the_accumulation_check_fails_with_a_float16_accumulator(monkeypatch):
    """Put the float16 accumulator back into the generated kernels: a sum that passes 2048 stops there
    (2048 + 1 rounds to 2048). 2048 and ten ones keeps the loop short: 2058 in float32, 2048 in float16."""
    graph = star([1] + [2] * 10)
    inputs = {"x": np.array([0.0, 2048.0, 1.0]), "w": np.ones(11)}
    assert run_snippet(GSPMM, graph, inputs, "f16")["out"][0] == 2058
    monkeypatch.setitem(triton_kernels.ACCUMULATE, "f16", "tl.float16")
    KERNELS.clear()
    try:
        assert run_snippet(GSPMM, graph, inputs, "f16")["out"][0] == 2048
    finally:
        monkeypatch.undo()
        KERNELS.clear()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("check", [check_segment_sum, check_gspmm, check_softmax, check_attention],
                         ids=["sum", "gspmm", "softmax", "attention"])
def test_bf16_accumulates_3000_terms_in_f32(check):
    """bfloat16 sums of ones stop at 256; the result is 3000 rounded once to bfloat16 (3008)."""
    check("bf16")


# ---- example models: half against f32 ------------------------------------------------------------


def model_case(name: str, dtype: str, seed: int = 0):
    """(f32 program optimized for the GPU, f32 gradient program, half-rounded inputs with cotangents,
    half-rounded params, dims) of an example on GRAPH."""
    model = mpdsl.compile(ROOT / "examples" / f"{name}.mp", seed=seed)
    rng = np.random.default_rng(seed)
    inputs = synth_inputs(model, GRAPH, rng)
    model.run(GRAPH, **inputs)  # the NumPy backend binds the dims and creates the parameters
    arrays, dims = model.bind(GRAPH, inputs)
    forward = gpu_program(model, dims)
    reference = NumpyBackend().run(forward, GRAPH, arrays, model.params, dims)
    cotangents = {f"d_{k}": rng.normal(size=v.shape) for k, v in reference.items()}
    backward = optimize(grad_program(specialize(model.ir, dims)), None, dims, target="gpu")[0]
    arrays = {k: rounded(v, dtype) for k, v in {**arrays, **cotangents}.items()}
    params = {k: rounded(v, dtype) for k, v in model.params.items()}
    return forward, backward, arrays, params, dims


def relative_errors(program, arrays, params, dims, dtype: str) -> dict[str, float]:
    """max |half - f32| / max |f32| of each output of ``program`` run in ``dtype`` and in float32."""
    run = backend(dtype).run
    full = run(program, GRAPH, arrays, params, dims)
    half = run(retype(program, dtype), GRAPH, arrays, params, dims)
    errors = {}
    for name, want in full.items():
        got = half[name]
        assert got.dtype == (np.float16 if dtype == "f16" else np.float32), name
        assert got.shape == want.shape and np.isfinite(got).all(), name
        scale = float(np.abs(want).max(initial=0))
        errors[name] = float(np.abs(got.astype(np.float64) - want).max(initial=0)) / max(scale, 1e-30)
    return errors


def check_model(name: str, dtype: str) -> None:
    forward, backward, arrays, params, dims = model_case(name, dtype)
    for what, program in (("forward", forward), ("gradient", backward)):
        errors = relative_errors(program, arrays, params, dims, dtype)
        worst = max(errors, key=errors.__getitem__)
        print(f"{name} {what} {dtype}: worst output {worst}, relative error {errors[worst]:.2e}")
        assert errors[worst] <= HALF_TOLERANCE[dtype], f"{name} {what} {dtype}: {errors}"


@pytest.mark.parametrize("name", MODELS)
def test_example_f16_forward_and_gradients_match_f32(name):
    check_model(name, "f16")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", MODELS)
def test_example_bf16_forward_and_gradients_match_f32_on_gpu(name):
    check_model(name, "bf16")


# ---- the NumPy backend refuses half precision ------------------------------------------------------


@pytest.mark.parametrize("dtype, name", [("f16", "float16"), ("bf16", "bfloat16")])
def test_numpy_backend_refuses_half_precision_before_running(dtype, name):
    model = mpdsl.compile(ROOT / "examples" / "gcn.mp")
    inputs = synth_inputs(model, GRAPH, np.random.default_rng(0))
    model.run(GRAPH, **inputs)
    arrays, dims = model.bind(GRAPH, inputs)
    numpy_backend = NumpyBackend()
    with pytest.raises(BackendError) as err:
        numpy_backend.run(retype(model.ir, dtype), GRAPH, arrays, model.params, dims)
    assert err.value.render() == (f"error: the numpy backend computes in float32 or float64, not {name}\n"
                                  "  hint: run half precision on the triton backend, or use float32")
    assert not getattr(numpy_backend, "last_op_seconds", {}), "nothing ran"


def test_numpy_backend_refuses_an_f16_compiled_model():
    model = CompiledModel(retype(mpdsl.compile(ROOT / "examples" / "gcn.mp").ir, "f16"), NumpyBackend())
    with pytest.raises(BackendError, match="not float16"):
        model.run(GRAPH, **synth_inputs(model, GRAPH, np.random.default_rng(0)))


# ---- bf16 in the IR and the kernel generator --------------------------------------------------------


def test_bf16_is_an_ir_float_dtype_that_round_trips():
    assert "bf16" in FLOAT_DTYPES
    program = retype(mpdsl.compile(ROOT / "examples" / "gat.mp").ir, "bf16")
    assert program.float_dtype == "bf16"
    text = print_program(program)
    assert " bf16" in text and " f32" not in text
    again = verify(parse_program(text))
    assert print_program(again) == text
    assert retype(again, "f32").float_dtype == "f32"
    with pytest.raises(IRParseError, match="unknown dtype 'f8'"):
        parse_program(text.replace(" bf16", " f8", 1))
    with pytest.raises(ValueError, match="unknown float dtype"):
        retype(program, "f8")


def test_bf16_programs_optimize_fold_constants_and_cost():
    source = "model m(x: node[]) -> node[] {\n    return sum(x[src] * (2.0 * 3.0)) by dst + 0.0\n}\n"
    model = mpdsl.compile(source)
    _, dims = model.bind(GRAPH, {"x": np.ones(GRAPH.num_nodes)})
    program = optimize(retype(specialize(model.ir, dims), "bf16"), None, dims, target="gpu")[0]
    assert program.float_dtype == "bf16"
    assert {v.type.dtype for v in program.values} <= {"bf16", "i64"}
    assert any(v.op == "const" and v.attr["value"] == 6.0 for v in program.values), print_program(program)
    rows = {Domain.NODE: GRAPH.num_nodes, Domain.EDGE: GRAPH.num_edges, Domain.GRAPH: GRAPH.num_graphs,
            Domain.PARAM: 1}
    half_bytes = sum(c.bytes_out for c in program_costs(program, rows, dims))
    full_bytes = sum(c.bytes_out for c in program_costs(retype(program, "f32"), rows, dims))
    assert 2 * half_bytes == full_bytes
    text = emit_triton(program, dims)
    assert "tl.bfloat16" in text and "dtype=tl.float32" in text


@pytest.mark.parametrize("dtype, store", [("f16", "tl.float16"), ("bf16", "tl.bfloat16")])
def test_half_kernels_store_half_and_accumulate_f32(dtype, store):
    """Every generated kernel loads values into float32 (``.to(tl.float32)``), keeps its accumulators in
    float32 and converts to the half dtype only when it stores a result (the typed matmul loads its half
    tiles as they are: ``tl.dot`` accumulates them in float32)."""
    specs = [SegmentReduce("gspmm", "sum", True, 4, 2, dtype), SegmentReduce("aggregate", "std", False, 3, 0, dtype),
             SegmentSoftmax(3, dtype), Attention(8, 2, dtype), TypedLinear(5, 6, dtype),
             CooGspmm("mean", 6, 1, dtype)]
    for spec in specs:
        text = generate(spec)
        assert f".to({store})" in text, spec
        for line in text.splitlines():
            if "tl.full(" in line:
                assert "dtype=tl.float32" in line, (spec, line)
            if not isinstance(spec, TypedLinear) and any(f"tl.load({a} " in line for a in ("x", "w", "score")):
                assert ".to(tl.float32)" in line, (spec, line)
            if store in line:
                assert "tl.store(" in line, (spec, line)
