"""The Triton backend, run in Triton's interpreter on the CPU (no GPU needed): every example model and
every kernel variant against the NumPy backend (fp32, fp16, fp64; CSR and COO layouts), hypothesis
random graphs, poisoned output buffers, the kernel cache, ``emit_triton`` and the error messages.

Kernels are generated and decorated lazily (at their first launch), so the interpreter is chosen per
backend: ``TritonBackend(interpret=True, device="cpu")`` here, which leaves TRITON_INTERPRET alone for
other test modules; tests of the default backend set TRITON_INTERPRET=1 through monkeypatch. Graphs stay
small and blocks large, so that each kernel launches one or two programs.
"""

import re
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import mpdsl  # noqa: E402
from mpdsl import syntax, typecheck  # noqa: E402
from mpdsl.backends import BACKENDS, BackendError, get_backend  # noqa: E402
from mpdsl.backends import _Unsupported  # noqa: E402
from mpdsl.backends.triton_backend import KERNEL_OPS, TritonBackend, emit_triton, kernel_specs  # noqa: E402
from mpdsl.backends.triton_kernels import (BUILTINS, KERNELS, Attention, AttentionScoreGrad,  # noqa: E402
                                           AttentionValueGrad, CooAttention, CooGspmm, SegmentLogSumExp,
                                           SegmentReduce, SegmentSoftmax, TypedLinear, generate)
from mpdsl.diagnostics import InputError  # noqa: E402
from mpdsl.ops import OPS  # noqa: E402
from mpdsl.passes.rewrite import rewrite  # noqa: E402
from mpdsl.runtime import CompiledModel  # noqa: E402
from model_inputs import synth_inputs as shared_synth_inputs  # noqa: E402
from strategies import batched_graphs, graphs  # noqa: E402
from test_passes import EXAMPLES, assert_same, random_graph  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CPU = dict(device="cpu", interpret=True)  # interpreter on the CPU even where a GPU exists


# ---- helpers ----------------------------------------------------------------------------------


GRAPH = random_graph(nodes=30, edges=90, self_loops=True)


def synth_inputs(model: CompiledModel, graph: mpdsl.Graph, seed: int = 0) -> dict:
    return shared_synth_inputs(model, graph, np.random.default_rng(seed), keep_graph_features=True)


def reference(source, graph: mpdsl.Graph, seed: int = 0, dtype: str = "float32"):
    """(numpy model, its inputs, its outputs)."""
    model = mpdsl.compile(source, backend="numpy", dtype=dtype, seed=seed)
    inputs = synth_inputs(model, graph, seed)
    return model, inputs, model.run(graph, **inputs)


def with_backend(model: CompiledModel, backend: TritonBackend) -> CompiledModel:
    twin = CompiledModel(model.ir, backend, source_name=model.source_name, seed=model.seed)
    twin.load_weights(model.params)
    return twin


def to_coo(program):
    """The program with every gspmm / attention given the COO layout (never chosen by the CPU plan)."""
    def rule(v, rw):
        if v.attr["layout"] == "coo":
            return None
        return rw.emit(v.op, list(v.operands), {**v.attr, "layout": "coo"}, like=v)

    return rewrite(program, {"gspmm": [rule], "attention": [rule]})[0]


def compile_f16(path: Path, backend) -> CompiledModel:
    """A float16 program (the public API offers float32/float64; the IR and the runtime take f16)."""
    module = syntax.parse(path.read_text(), str(path))
    imports = syntax.resolve_import_graph(module, path.parent)
    program = typecheck.check(module, None, "f16", None, imports.modules, syntax.prelude(), imports.direct)
    return CompiledModel(program, backend, source_name=str(path))


# ---- coverage and registration ----------------------------------------------------------------


def test_every_op_has_a_rule():
    assert TritonBackend.missing_rules() == []
    assert not [op for op in OPS if isinstance(TritonBackend.rules[op], _Unsupported)]
    assert set(KERNEL_OPS) <= set(OPS)


def test_registered_by_name():
    assert BACKENDS["triton"] is TritonBackend
    assert isinstance(get_backend("triton"), TritonBackend)
    model = mpdsl.compile(ROOT / "examples" / "gcn.mp", backend="triton")
    assert model.backend.name == "triton"


# ---- every example against NumPy --------------------------------------------------------------


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_matches_numpy_fp32(path):
    """fp32, with every kernel output poisoned with NaN first: each kernel writes every element."""
    model, inputs, expected = reference(path, GRAPH)
    twin = with_backend(model, TritonBackend(poison=True, **CPU))
    got = twin.run(GRAPH, **inputs)
    assert all(v.dtype == np.float32 for v in got.values())
    assert_same(expected, got, path.stem, rtol=1e-4)
    assert twin.backend.last_launches, "every example has graph ops"


def fp16_case(source, graph, device_options):
    """(fp16 model with poisoned outputs, inputs, NumPy fp32 outputs on the same fp16-rounded data)."""
    model, inputs, _ = reference(source, graph)
    inputs = {k: v.astype(np.float16).astype(np.float32) if v.dtype.kind == "f" else v for k, v in inputs.items()}
    model.load_weights({k: v.astype(np.float16).astype(np.float32) for k, v in model.params.items()})
    expected = model.run(graph, **inputs)
    half = compile_f16(source, TritonBackend(poison=True, **device_options))
    half.load_weights(model.params)
    return half, inputs, expected


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_matches_numpy_fp16(path):
    """fp16 storage, fp32 compute: against NumPy fp32 on the same fp16-rounded weights and inputs."""
    half, inputs, expected = fp16_case(path, GRAPH, CPU)
    got = half.run(GRAPH, **inputs)
    assert all(v.dtype == np.float16 for v in got.values())
    assert_same(expected, got, f"{path.stem} fp16", rtol=2e-2)


@pytest.mark.parametrize("name", ["gat", "rgcn", "pna"])
def test_examples_match_numpy_fp64(name):
    """fp64 programs accumulate in fp64 inside the kernels."""
    model, inputs, expected = reference(ROOT / "examples" / f"{name}.mp", GRAPH, dtype="float64")
    got = with_backend(model, TritonBackend(poison=True, **CPU)).run(GRAPH, **inputs)
    assert_same(expected, got, f"{name} fp64", rtol=1e-9)


COO_EXAMPLES = [p for p in EXAMPLES if p.stem in ("gat", "gcn", "gated_gcn", "graph_transformer", "sage_max",
                                                   "sage_mean")]


@pytest.mark.parametrize("path", COO_EXAMPLES, ids=lambda p: p.stem)
def test_coo_layout_matches_numpy(path):
    """The COO + atomics kernels, selected by rewriting the plan's layout attribute to "coo"."""
    model, inputs, expected = reference(path, GRAPH)
    arrays, dims = model.bind(GRAPH, inputs)
    program = to_coo(model.optimized_for(dims)[0])
    assert 'layout="coo"' in str(program)
    backend = TritonBackend(poison=True, **CPU)
    got = backend.run(program, GRAPH, arrays, model.params, dims)
    assert any("_coo_" in name for name in backend.last_launches)
    assert_same(expected, got, f"{path.stem} coo", rtol=1e-4)


def test_coo_backend_option():
    path = ROOT / "examples" / "gat.mp"
    model, inputs, expected = reference(path, GRAPH)
    twin = with_backend(model, TritonBackend(layout="coo", poison=True, **CPU))
    assert_same(expected, twin.run(GRAPH, **inputs), "gat with layout='coo'", rtol=1e-4)
    assert all("_coo_" in name for name in twin.backend.last_launches)
    with pytest.raises(BackendError):
        TritonBackend(layout="ell")


# ---- every kernel variant ---------------------------------------------------------------------

SNIPPETS = {
    "gspmm_scalar_weight": "model m(x: node[F], edge_w: edge[]) -> node[F] { return sum(x[src] * edge_w) by dst }",
    "gspmm_max_by_src": "model m(x: node[F], edge_w: edge[]) -> node[F] { return max(x[dst] * edge_w) by src }",
    "gspmm_min_mean": "model m(x: node[F], edge_w: edge[]) -> (a: node[F], b: node[F]) "
                      "{ return min(x[src]) by dst, mean(x[src] * edge_w) by dst }",
    "gspmm_per_head": "model m(x: node[F], W: param[F, 2, 3], edge_h: edge[2]) -> (a: node[2, 3], b: node[2, 3], "
                      "c: node[2, 3]) { z = x @ W\n return sum(z[src] * edge_h) by dst, mean(z[dst] * edge_h) by src, "
                      "max(z[src] * edge_h) by dst }",
    "aggregate_std_by_src": "model m(x: node[F], edge_attr: edge[F]) -> (a: node[F], b: node[F], c: node[F], "
                            "d: node[F]) { return std(x[src]) by dst, std(edge_attr) by src, max(edge_attr) by src, "
                            "mean(edge_attr) by dst }",
    "softmax_by_src": "model m(edge_s: edge[3]) -> edge[3] { return softmax(edge_s) by src }",
    "by_graph": "model m(x: node[F]) -> (a: node[F], b: graph[F], c: graph[F], d: graph[F], e: graph[F]) "
                "{ return softmax(x) by graph, max(x) by graph, min(x) by graph, std(x) by graph, mean(x) by graph }",
    "attention_by_src": "model m(x: node[F], W: param[F, 2, 3], edge_h: edge[2]) -> node[2, 3] { z = x @ W\n "
                        "return sum((softmax(edge_h) by src) * z[dst]) by src }",
    "attention_scalar": "model m(x: node[F], edge_w: edge[]) -> node[F] "
                        "{ return sum((softmax(edge_w) by dst) * x[src]) by dst }",
    "typed_linear_wide": "dim R = 3\nmodel m(x: node[F], edge_type: edge int, W0: param[F, 2, 4], "
                         "Wr: param[R, 4, 5]) -> edge[2, 5] { z = x @ W0\n return z[src] @ Wr[edge_type] }",
    "typed_linear_dst": "dim R = 3\nmodel m(x: node[F], edge_type: edge int, Wr: param[R, F, 20]) -> node[20] "
                        "{ return sum(x[dst] @ Wr[edge_type]) by src }",
}
EXPECTED_KERNELS = {
    "gspmm_scalar_weight": {"gspmm"}, "gspmm_max_by_src": {"gspmm"}, "gspmm_min_mean": {"gspmm"},
    "gspmm_per_head": {"gspmm"}, "aggregate_std_by_src": {"aggregate"}, "softmax_by_src": {"softmax"},
    "by_graph": {"softmax", "aggregate"}, "attention_by_src": {"attention"}, "attention_scalar": {"attention"},
    "typed_linear_wide": {"typed_linear"}, "typed_linear_dst": {"typed_linear", "aggregate"},
}


@pytest.mark.parametrize("layout", [None, "coo"])
@pytest.mark.parametrize("name", sorted(SNIPPETS))
def test_kernel_variants_match_numpy(name, layout):
    model, inputs, expected = reference(SNIPPETS[name], GRAPH)
    program = model.optimized_for(model.bind(GRAPH, inputs)[1])[0]
    assert {v.op for v in program.values} & set(KERNEL_OPS) == EXPECTED_KERNELS[name]
    twin = with_backend(model, TritonBackend(poison=True, layout=layout, **CPU))
    assert_same(expected, twin.run(GRAPH, **inputs), name, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(SNIPPETS))
def test_kernel_variants_fp16(name, tmp_path):
    source = tmp_path / f"{name}.mp"
    source.write_text(SNIPPETS[name])
    half, inputs, expected = fp16_case(source, GRAPH, CPU)
    assert_same(expected, half.run(GRAPH, **inputs), f"{name} fp16", rtol=1e-2)


DENSE = """
model m(x: node[F], W: param[F, 2, 3], V: param[F, 3], e: edge[F])
        -> (a: node[2, 3], b: node[2, 3], c: node[F], d: edge[3], f: node[F], g: node[3]) {
    z = x @ W
    a = softmax(z, -1) + softmax(z, 0) + abs(z) * exp(-z) - softplus(z) + silu(z) + gelu(z)
    b0 = minimum(z, 0.5) + maximum(z, -0.5) ** 2.0 + tanh(z) + sigmoid(z) + log(abs(z) + 1)
    b = b0 + sqrt(abs(z)) * rsqrt(abs(z) + 1)
    c = elu(x, 1.5) + leaky_relu(x, 2.0) + leaky_relu(x, 0.1) + relu(-x) + x / (in_degree() + 1) + out_degree()
    d = concat(e, x[src] - x[dst], axis=-1) @ concat(V, V, axis=0)
    f = mean(z, 0)[0] * max(x, -1) + min(x, -1) + sum(reshape(z, [6]), -1) + x
    g = einsum("hd,hd->d", z, W[0]) + einsum("fhd,f->d", W, sum(V, -1))
    return a, b, c, d, f, g
}
"""


def test_dense_ops_match_numpy():
    """Every elementwise and dense op as torch ops, with the NumPy backend's broadcasting."""
    model, inputs, expected = reference(DENSE, GRAPH)
    program = model.optimized_for(model.bind(GRAPH, inputs)[1])[0]
    covered = {"abs", "axis_softmax", "exp", "log", "sqrt", "rsqrt", "tanh", "sigmoid", "relu", "neg", "silu",
               "softplus", "gelu", "elu", "leaky_relu", "minimum", "maximum", "add", "sub", "mul", "div", "concat",
               "einsum", "reduce", "reshape", "select", "degree", "matmul", "gather", "const"}
    assert covered <= {v.op for v in program.values}
    assert_same(expected, with_backend(model, TritonBackend(**CPU)).run(GRAPH, **inputs), "dense ops", rtol=1e-4)


def test_reference_ir_without_passes():
    """optimize=False: the unfused IR (aggregate, softmax of gathered values) as written."""
    path = ROOT / "examples" / "gat.mp"
    model = mpdsl.compile(path, backend="numpy", optimize=False)
    inputs = synth_inputs(model, GRAPH)
    expected = model.run(GRAPH, **inputs)
    twin = CompiledModel(model.ir, TritonBackend(poison=True, **CPU), optimize=False)
    twin.load_weights(model.params)
    assert_same(expected, twin.run(GRAPH, **inputs), "gat unoptimized", rtol=1e-4)
    assert {n.split("_")[1] for n in twin.backend.last_launches} == {"softmax", "aggregate"}


# ---- random graphs ----------------------------------------------------------------------------

PROPERTY_MODEL = """
model m(x: node[F], W: param[F, 2, 3], a_src: param[2, 3], a_dst: param[2, 3])
        -> (s: node[F], mx: node[F], heads: node[2, 3], att: node[2, 3], sm: edge[2], g: graph[F], d: node[F]) {
    z = x @ W
    score = leaky_relu(sum(z[src] * a_src, -1) + sum(z[dst] * a_dst, -1), 0.2)
    w = sigmoid(sum(score, -1))
    return sum(x[src] * w) by dst, max(x[dst] * w) by src, mean(z[src] * sigmoid(score)) by dst,
           sum((softmax(score) by dst) * z[src]) by dst, softmax(score) by src, mean(x) by graph, std(x[src]) by dst
}
"""


def _property_check(graph: mpdsl.Graph, layout) -> None:
    model = mpdsl.compile(PROPERTY_MODEL, backend="numpy", seed=3)
    expected = model.run(graph)
    twin = with_backend(model, TritonBackend(poison=True, layout=layout, **CPU))
    assert_same(expected, twin.run(graph), "random graph", rtol=1e-4)


@settings(max_examples=30, deadline=None)
@given(graph=graphs(max_nodes=40, max_edges=120), layout=st.sampled_from([None, "coo"]))
def test_random_graphs(graph, layout):
    """Random graphs: empty, isolated nodes, self loops, multi-edges, a hub, no edges."""
    _property_check(graph, layout)


@settings(max_examples=12, deadline=None)
@given(graph=batched_graphs(max_graphs=4, max_nodes=8, max_edges=20, empty_members=True))
def test_random_batches(graph):
    _property_check(graph, None)


@pytest.mark.parametrize("nodes", [0, 1, 4])
def test_graphs_without_edges(nodes):
    graph = mpdsl.Graph.from_arrays(np.zeros((2, 0), np.int64), nodes, x=np.ones((nodes, 3)))
    _property_check(graph, None)
    _property_check(graph, "coo")


def test_typed_linear_on_random_types():
    src = SNIPPETS["typed_linear_wide"]
    for seed in range(3):
        graph = random_graph(seed, nodes=20, edges=60, self_loops=True)
        model, inputs, expected = reference(src, graph, seed)
        got = with_backend(model, TritonBackend(poison=True, block_m=16, **CPU)).run(graph, **inputs)
        assert_same(expected, got, f"typed_linear seed {seed}", rtol=1e-4)  # several tiles per relation


# ---- properties of the kernels ----------------------------------------------------------------


def test_kernels_are_deterministic_and_small_blocks_agree():
    path = ROOT / "examples" / "gat.mp"
    model, inputs, expected = reference(path, GRAPH)
    first = with_backend(model, TritonBackend(**CPU)).run(GRAPH, **inputs)
    again = with_backend(model, TritonBackend(**CPU)).run(GRAPH, **inputs)
    np.testing.assert_array_equal(first["out"], again["out"])  # no atomics: bitwise reproducible
    tiled = with_backend(model, TritonBackend(block_rows=8, block_features=16, **CPU)).run(GRAPH, **inputs)
    assert_same(expected, tiled, "gat with 8 x 16 blocks", rtol=1e-4)  # several programs per kernel


def test_kernel_cache_by_hash_of_op_and_shapes():
    path = ROOT / "examples" / "mpnn.mp"  # three identical mean aggregations per run
    model, inputs, _ = reference(path, GRAPH)
    twin = with_backend(model, TritonBackend(**CPU))
    twin.run(GRAPH, **inputs)
    launched = twin.backend.last_launches
    assert len(set(launched)) < len(launched)
    before = KERNELS.compilations
    twin.run(GRAPH, **inputs)
    with_backend(model, TritonBackend(**CPU)).run(GRAPH, **inputs)
    assert KERNELS.compilations == before, "a second run must reuse the cached kernels"
    spec = SegmentReduce("gspmm", "sum", True, 16, 0, "f32")
    assert spec.key == SegmentReduce("gspmm", "sum", True, 16, 0, "f32").key
    assert spec.key != SegmentReduce("gspmm", "sum", True, 32, 0, "f32").key
    assert spec.key != SegmentReduce("gspmm", "max", True, 16, 0, "f32").key
    KERNELS.get(spec, True)
    count = KERNELS.compilations
    KERNELS.get(SegmentReduce("gspmm", "sum", True, 16, 0, "f32"), True)
    assert KERNELS.compilations == count and spec.key in KERNELS.sources


def test_generated_source_follows_attributes_and_shapes():
    text = generate(Attention(64, 8, "f16"))
    assert "feat < 64" in text and "feat[None, :] // 8" in text and "tl.float16" in text and "tl.float32" in text
    assert "tl.atomic" not in text
    mx = generate(SegmentReduce("gspmm", "max", True, 12, 1, "f32"))
    assert 'float("-inf")' in mx and "tl.maximum" in mx and "feat < 12" in mx and "w + member" in mx
    assert "tl.load(w" not in generate(SegmentReduce("gspmm", "sum", True, 12, 0, "f32"))


def test_kernels_use_only_triton_builtins():
    """No tl.max / tl.sum / tl.zeros (jit functions whose interpreter-or-compiled mode is fixed when
    triton is imported): each kernel runs in the mode it was decorated in."""
    specs = [SegmentReduce("gspmm", r, True, 12, g, "f32") for r in ("sum", "mean", "max", "min", "std")
             for g in (0, 1, 3)]
    specs += [SegmentReduce("aggregate", "std", False, 5, 0, "f16"), Attention(8, 2, "f64"), SegmentSoftmax(3, "f32"),
              TypedLinear(7, 9, "f16"), CooGspmm("max", 6, 2, "f32"), CooAttention(6, 3, "f32"),
              SegmentLogSumExp(3, "f16"), AttentionScoreGrad(12, 3, "f32"), AttentionValueGrad(12, 1, "f64")]
    for spec in specs:
        assert set(re.findall(r"tl\.(\w+)", generate(spec))) <= BUILTINS, spec


def test_dropout_in_training_and_eval():
    src = "model m(x: node[F]) -> node[F] { return dropout(x, 0.5) }"
    model, inputs, expected = reference(src, GRAPH)
    twin = with_backend(model, TritonBackend(**CPU))
    np.testing.assert_array_equal(twin.run(GRAPH, **inputs)["out"], expected["out"])  # eval: identity
    twin.train()
    dropped = twin.run(GRAPH, **inputs)["out"]
    kept = dropped != 0
    assert 0.2 < kept.mean() < 0.8
    np.testing.assert_allclose(dropped[kept], 2 * expected["out"][kept], rtol=1e-6)


def test_run_tensors_returns_device_tensors():
    path = ROOT / "examples" / "gcn.mp"
    model, inputs, expected = reference(path, GRAPH)
    arrays, dims = model.bind(GRAPH, inputs)
    program = model.optimized_for(dims)[0]
    params = {k: torch.from_numpy(v) for k, v in model.params.items()}
    out = TritonBackend(**CPU).run_tensors(program, GRAPH, arrays, params, dims)["out"]
    assert isinstance(out, torch.Tensor) and out.device.type == "cpu"
    reference_out = get_backend("numpy").run(program, GRAPH, arrays, model.params, dims)["out"]
    np.testing.assert_allclose(out.numpy(), reference_out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["rgcn", "hgt", "rgat"])
def test_out_of_range_ids_are_input_errors(name):
    model, inputs, _ = reference(ROOT / "examples" / f"{name}.mp", GRAPH)
    bad = dict(inputs)
    key = "edge_type" if "edge_type" in bad else "node_type"
    bad[key] = bad[key].copy()
    bad[key][3] = 99
    model.layout = "none"  # the gpu target runs the graph in its given order: compare in that order
    with pytest.raises(InputError) as numpy_err:
        model.run(GRAPH, **bad)
    with pytest.raises(InputError) as triton_err:
        with_backend(model, TritonBackend(**CPU)).run(GRAPH, **bad)
    assert triton_err.value.message == numpy_err.value.message
    assert triton_err.value.message.startswith(f"{key}[3] = 99 ")


# ---- emit and the command line ----------------------------------------------------------------


def test_emit_triton_heads_each_kernel_with_its_ir_op():
    model = mpdsl.compile(ROOT / "examples" / "gat.mp")
    text = emit_triton(model.optimized_ir, model.static_dims)
    assert '# %13 = attention %12, %0 {by="dst", layout="csr_dst"} : node[8, 8] f32' in text
    assert text.count("@triton.jit") == 2 and "import triton.language as tl" in text
    compile(text, "<emitted>", "exec")  # valid Python
    assert "/home/" not in text and "/tmp/" not in text


def test_emitted_kernels_are_the_ones_that_run():
    path = ROOT / "examples" / "mpnn.mp"
    model, inputs, _ = reference(path, GRAPH)
    dims = model.bind(GRAPH, inputs)[1]
    program = model.optimized_for(dims)[0]
    text = emit_triton(program, dims)
    assert "printed above" in text  # three identical aggregations share one kernel
    twin = with_backend(model, TritonBackend(**CPU))
    twin.run(GRAPH, **inputs)
    for name in set(twin.backend.last_launches):
        assert f"def {name}(" in text
    assert [s.name for _, s in kernel_specs(program, dims)] == twin.backend.last_launches
    coo = emit_triton(program, dims, layout="coo")
    assert "tl.atomic" not in coo  # mpnn has no gspmm / attention: COO does not apply


def test_emit_triton_coo_and_unbound_dims():
    model = mpdsl.compile(ROOT / "examples" / "gin.mp")  # its first gspmm reads x: node[F]
    with pytest.raises(BackendError) as err:
        emit_triton(model.optimized_ir, model.static_dims)
    assert "F" in err.value.message and "--graph" in err.value.hint
    dims = {**model.static_dims, "F": 34}
    program = model.optimized_for(dims)[0]
    coo = emit_triton(to_coo(program), dims)
    assert "tl.atomic_add" in coo and "_finish(" in coo and coo.count("@triton.jit") == 4
    compile(coo, "<emitted>", "exec")


def test_cli_run_with_the_triton_backend(capsys, monkeypatch):
    from mpdsl.cli import main

    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")

    karate = str(ROOT / "examples" / "data" / "karate.npz")
    assert main(["run", str(ROOT / "examples" / "gcn.mp"), "--graph", karate, "--backend", "triton"]) == 0
    out, err = capsys.readouterr()
    assert "out: shape [34, 4], dtype float32" in out and "on triton" in err


# ---- errors -----------------------------------------------------------------------------------


def test_without_gpu_or_interpreter_a_one_line_error(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = mpdsl.compile(ROOT / "examples" / "gcn.mp", backend="triton")
    with pytest.raises(BackendError) as err:
        model(mpdsl.Graph.load(ROOT / "examples" / "data" / "karate.npz"))
    rendered = err.value.render()
    assert "TRITON_INTERPRET=1" in rendered and "\n" not in rendered


@pytest.mark.parametrize("module", ["triton", "torch"])
def test_without_triton_or_torch_an_install_hint(monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = mpdsl.compile(ROOT / "examples" / "gcn.mp", backend="triton")
    with pytest.raises(BackendError) as err:
        model(mpdsl.Graph.load(ROOT / "examples" / "data" / "karate.npz"))
    assert 'pip install "mpdsl[triton]"' in err.value.render() and "\n" not in err.value.render()
