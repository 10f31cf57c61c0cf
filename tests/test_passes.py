"""Optimizer: every pass alone and the full pipeline preserve every example's meaning; the verifier
runs after each pass; FileCheck-style checks of the optimized IR; plan report; node reordering."""

import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))

import mpdsl  # noqa: E402
from filecheck import filecheck  # noqa: E402
from mpdsl.ir import print_program, verify  # noqa: E402
from mpdsl.passes import DEFAULT_PIPELINE, PASSES, Pass, PassError, PassManager, optimize, register  # noqa: E402
from mpdsl.passes.rewrite import specialize  # noqa: E402
from mpdsl.types import Domain  # noqa: E402
from model_inputs import synth_inputs  # noqa: E402
from strategies import batched_graphs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.mp"))


def random_graph(seed: int = 0, nodes: int = 40, edges: int = 160, self_loops: bool = False) -> mpdsl.Graph:
    """A batch of three graphs: one with a hub (node 0), a multi-edge, 3 isolated nodes and, with
    ``self_loops``, two self loops on node 4; a 3-node graph; a single node without edges."""
    rng = np.random.default_rng(seed)
    src = rng.integers(0, nodes - 3, edges)          # the last 3 nodes are isolated
    dst = np.where(rng.random(edges) < 0.3, 0, rng.integers(0, nodes - 3, edges))  # node 0 is a hub
    src[:5], dst[:5] = 7, 8                           # a multi-edge
    if self_loops:
        src[5:7], dst[5:7] = 4, 4
    parts = [mpdsl.Graph.from_arrays(np.stack([src, dst]), nodes),
             mpdsl.Graph.from_arrays(np.array([[0, 1, 1], [1, 0, 2]]), 3),
             mpdsl.Graph.from_arrays(np.zeros((2, 0), np.int64), 1)]
    return mpdsl.Graph.batch(parts)


def run_both(path: Path, graph: mpdsl.Graph, passes, seed: int = 0):
    reference = mpdsl.compile(path, dtype="float64", optimize=False, seed=seed)
    inputs = synth_inputs(reference, graph, np.random.default_rng(seed))
    expected = reference.run(graph, **inputs)
    optimized = mpdsl.compile(path, dtype="float64", passes=passes, layout="none")
    optimized.load_weights(reference.params)
    _, dims = optimized.bind(graph, inputs)
    program, _ = optimize(specialize(optimized.ir, dims), passes, dims, verify_each=True)
    graph, _ = optimized.with_edge_set_inputs(graph, inputs)  # the graph with the input edge sets given
    got = optimized.backend.run(program, graph, optimized.bind(graph, inputs)[0], optimized.params, dims)
    return expected, got


def assert_same(expected: dict, got: dict, what: str, rtol: float = 1e-10) -> None:
    """The same outputs, each of the same shape, without NaNs the expected one lacks (an unwritten
    element), equal to ``rtol`` with an absolute floor of ``rtol`` times the output's scale."""
    assert expected.keys() == got.keys()
    for name in expected:
        e, g = expected[name], got[name]
        assert g.shape == e.shape, f"{what}: {name} has shape {g.shape}, expected {e.shape}"
        assert not np.isnan(g).any() or np.isnan(e).any(), f"{what}: {name} has NaNs (an unwritten element?)"
        scale = max(1.0, float(np.abs(e.astype(np.float64)).max(initial=0)))
        np.testing.assert_allclose(g.astype(np.float64), e.astype(np.float64), rtol=rtol, atol=rtol * scale,
                                   err_msg=f"{what}: {name}")


@pytest.mark.parametrize("pass_name", sorted(PASSES) or DEFAULT_PIPELINE)
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_each_pass_alone_preserves_meaning(path, pass_name):
    expected, got = run_both(path, random_graph(), [pass_name])
    assert_same(expected, got, f"{path.stem} with {pass_name}")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_full_pipeline_preserves_meaning(path):
    expected, got = run_both(path, random_graph(1), None)
    assert_same(expected, got, f"{path.stem} optimized")


@settings(max_examples=15, deadline=None)
@given(graph=batched_graphs(), which=st.sampled_from(EXAMPLES), seed=st.integers(0, 1000))
def test_full_pipeline_on_random_graphs(graph, which, seed):
    expected, got = run_both(which, graph, None, seed)
    assert_same(expected, got, f"{which.stem} optimized")


def test_passes_are_registered_by_name_with_contracts():
    PassManager([])  # loads the registry
    assert set(DEFAULT_PIPELINE) <= set(PASSES)
    assert all((cls.__doc__ or "").strip() for cls in PASSES.values())


def test_pass_manager_names_the_pass_that_breaks_the_ir():
    @register
    class Breaker(Pass):
        """Drops the first value (breaks SSA on purpose)."""
        name = "breaker_for_test"

        def run(self, program, ctx):
            from mpdsl.ir import Program
            return Program(program.name, program.dims, program.values[1:], program.outputs)

    try:
        model = mpdsl.compile(ROOT / "examples" / "gcn.mp", optimize=False)
        with pytest.raises(PassError, match="pass 'breaker_for_test' produced invalid IR"):
            PassManager(["cse", "breaker_for_test"], verify_each=True).run(model.ir)
    finally:
        PASSES.pop("breaker_for_test")


def test_unknown_pass_is_a_user_error():
    with pytest.raises(mpdsl.MpdslError, match="unknown pass"):
        mpdsl.compile(ROOT / "examples" / "gcn.mp", passes=["cse", "nope"])


@pytest.mark.parametrize("check", sorted((Path(__file__).parent / "filecheck").glob("*.check")), ids=lambda p: p.stem)
def test_optimized_ir_filecheck(check):
    model = mpdsl.compile(ROOT / "examples" / f"{check.stem}.mp")
    dims = dict(model.static_dims)
    if check.stem == "sage_mean":
        dims["F"] = 64
    program, _ = model.optimized_for(dims)
    filecheck(print_program(program), check.read_text())


def test_filecheck_can_fail():
    with pytest.raises(AssertionError):
        filecheck("a\nb\n", "CHECK: b\nCHECK: a")
    with pytest.raises(AssertionError):
        filecheck("a\nb\nc\n", "CHECK: a\nCHECK-NOT: b\nCHECK: c")
    with pytest.raises(AssertionError):
        filecheck("a\nb\nc\n", "CHECK: a\nCHECK-NEXT: c")


@pytest.mark.parametrize("name", ["gcn", "sage_mean", "sage_max", "gin", "gat"])
def test_fused_programs_materialise_no_edge_by_feature_tensor(name):
    model = mpdsl.compile(ROOT / "examples" / f"{name}.mp")
    program, _ = model.optimized_for({**model.static_dims, "F": 64})
    verify(program)
    for v in program.values:
        if v.type.domain is Domain.EDGE:
            assert v.type.rank <= 1 and v.op in ("gather", "add", "leaky_relu", "mul"), (name, v)
            assert v.type.rank == 0 or name == "gat", (name, v)


def test_width_dependent_reordering_waits_for_the_dims():
    model = mpdsl.compile(ROOT / "examples" / "sage_mean.mp")
    symbolic = print_program(model.optimized_ir)
    assert "gspmm %x" in symbolic, "F unknown: the first mean stays before its matmul"
    narrowing = print_program(model.optimized_for({**model.static_dims, "F": 64})[0])
    widening = print_program(model.optimized_for({**model.static_dims, "F": 8})[0])
    assert "gspmm %x" not in narrowing and "gspmm %x" in widening


def test_a_scale_gradient_through_a_linear_layer_contracts_the_rows_first():
    """GIN's eps gradient, sum over nodes of <d_h W1^T, x>, becomes <W1^T, sum over nodes of d_h^T x>
    (a row contraction, no nodes x F product) where nothing else reads d_h W1^T; the second layer's,
    whose d_h W^T also flows on to the first layer, keeps its product. Both equal the unfused gradient."""
    from mpdsl.autodiff import grad_program
    from mpdsl.backends import get_backend
    backend = get_backend("numpy")
    model = mpdsl.compile(ROOT / "examples" / "gin.mp", dtype="float64", seed=0)
    graph = random_graph(5, nodes=20, edges=60)
    inputs = synth_inputs(model, graph, np.random.default_rng(5))
    model.run(graph, **inputs)
    arrays, dims = model.bind(graph, inputs)
    programs = model.context.training_programs(dims, "f64", False, [], list(model.params))
    backward = programs.backward
    verify(backward)
    scalar = [v for v in backward.values if v.op in ("contract_rows", "einsum") and v.type.rank == 0]
    assert sorted(v.op for v in scalar) == ["contract_rows", "einsum"], print_program(backward)
    (folded,) = [v for v in scalar if v.op == "einsum"]
    assert folded.attr["spec"] == "kf,kf->" and folded.operands[0].op == "contract_rows"
    (kept,) = [v for v in scalar if v.op == "contract_rows"]
    assert any(o.op == "matmul" for o in kept.operands)
    reference = specialize(model.ir, dims)
    rng = np.random.default_rng(6)
    cotangent = {"d_out": rng.normal(size=(graph.num_nodes, 4))}
    want = backend.run(grad_program(reference), graph, {**arrays, **cotangent}, model.params, dims)
    saved = backend.run(programs.train_forward, graph, arrays, model.params, dims)
    from model_inputs import residual_arguments
    extra_inputs, extra_params = residual_arguments(backward, programs.residuals, saved)
    got = backend.run(backward, graph, {**arrays, **cotangent, **extra_inputs}, {**model.params, **extra_params}, dims)
    for name in ("d_eps1", "d_eps2", "d_W11"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-10, atol=1e-12, err_msg=name)


def test_plan_reports_kernels_bytes_and_decisions(capsys):
    from mpdsl.cli import main
    assert main(["compile", str(ROOT / "examples" / "gcn.mp"), "--emit", "plan", "--graph",
                 str(ROOT / "examples" / "data" / "karate.npz")]) == 0
    out = capsys.readouterr().out
    assert "gspmm" in out and "csr_dst" in out and "unoptimized" in out and "bytes materialised" in out
    assert "[graph layout] no reordering" in out and "[fuse_message_aggregate]" in out
    assert "[row_fusion] node row group [" in out and "(numpy backend, from 8192 rows; " in out
    per_edge = next(line for line in out.splitlines() if line.strip().startswith("of which per-edge"))
    assert per_edge.split()[-2:] == ["0", "B"], per_edge
    assert main(["compile", str(ROOT / "examples" / "gcn.mp"), "--emit", "plan"]) == 1
    assert "pass --graph" in capsys.readouterr().err


def test_emit_ir_opt_and_passes_flag(capsys):
    from mpdsl.cli import main
    assert main(["compile", str(ROOT / "examples" / "gin.mp"), "--emit", "ir-opt"]) == 0
    assert "gspmm" in capsys.readouterr().out
    assert main(["compile", str(ROOT / "examples" / "gin.mp"), "--emit", "ir-opt", "--passes", "dce"]) == 0
    out = capsys.readouterr().out
    assert "gspmm" not in out and "aggregate" in out


def community_graph(seed=0, communities=40, size=30, edges_per_node=8):
    rng = np.random.default_rng(seed)
    n = communities * size
    src = rng.integers(0, n, n * edges_per_node)
    same = rng.random(len(src)) < 0.9
    dst = np.where(same, src // size * size + rng.integers(0, size, len(src)), rng.integers(0, n, len(src)))
    shuffle = rng.permutation(n)
    return mpdsl.Graph.from_arrays(np.stack([shuffle[src], shuffle[dst]]), n, x=rng.normal(size=(n, 6)))


@pytest.mark.parametrize("name", ["gcn", "gat", "sage_max"])
def test_node_reordering_is_invisible(name):
    g = community_graph()
    plain = mpdsl.compile(ROOT / "examples" / f"{name}.mp", dtype="float64", layout="none", seed=3)
    reordered = mpdsl.compile(ROOT / "examples" / f"{name}.mp", dtype="float64", layout="reorder", seed=3)
    np.testing.assert_allclose(reordered(g), plain(g), rtol=1e-10, atol=1e-12)
    assert reordered.last_layout is not None and reordered.last_layout.nodes is not None
    assert plain.last_layout is None


def test_community_order_makes_edges_local():
    from mpdsl.plan import decide_node_order, locality
    g = community_graph()
    decision = decide_node_order(g, "reorder")
    before = locality(g.src, g.dst, g.num_nodes)
    order = decision.order
    assert order is not None
    after = locality(order.inverse[g.src], order.inverse[g.dst], g.num_nodes)
    assert before < 0.2 and after > 0.6, (before, after)
    assert sorted(order.perm.tolist()) == list(range(g.num_nodes))


def test_auto_layout_skips_small_graphs():
    from mpdsl.plan import decide_node_order
    decision = decide_node_order(community_graph(), "auto")
    assert decision.order is None and "below" in decision.reason


def test_layout_restores_edge_and_node_outputs():
    src = """
model m(x: node[F], e: edge[F], a: param[F]) -> (h: node[F], s: edge[]) {
    score = sum(x[src] * a, -1) + sum(e, -1)
    return sum((softmax(score) by dst) * x[src]) by dst, score
}
"""
    g = community_graph(1)
    e = np.random.default_rng(0).normal(size=(g.num_edges, 6))
    plain = mpdsl.compile(src, dtype="float64", layout="none", seed=1)
    laid_out = mpdsl.compile(src, dtype="float64", layout="reorder", seed=1)
    a, b = plain(g, e=e), laid_out(g, e=e)
    assert laid_out.last_layout.edge_perm is not None and laid_out.last_layout.nodes is not None
    np.testing.assert_allclose(b["h"], a["h"], rtol=1e-10)
    np.testing.assert_allclose(b["s"], a["s"], rtol=1e-12)


def test_gpu_target_plans_coo_for_sums_onto_sources():
    src = "model m(x: node[F]) -> node[F] {\n    return sum(x[dst]) by src + sum(x[src]) by dst\n}\n"
    program = mpdsl.compile(src, optimize=False).ir
    cpu, cpu_ctx = optimize(program, verify_each=True)
    gpu, gpu_ctx = optimize(program, verify_each=True, target="gpu")
    layouts = lambda p: sorted(v.attr["layout"] for v in p.values if v.op == "gspmm")  # noqa: E731
    assert layouts(cpu) == ["csr_dst", "csr_src"]
    assert layouts(gpu) == ["coo", "csr_dst"]
    assert any("COO + atomics" in text for _, text in gpu_ctx.notes)


PRODUCT_USED_TWICE = """program @p dims() {
  %a = input : node[3] f64
  %b = input : node[4] f64
  %c = input : node[4] f64
  %W = param {init="default"} : param[4, 2] f64
  %m = mul %b, %c : node[4] f64
  %o = matmul %m, %W : node[2] f64
  %g = contract_rows %a, %c, %b {spec="a,b,b->ab"} : param[3, 4] f64
  %s = contract_rows %c, %b {spec="a,a->a"} : param[4] f64
  %t = contract_rows %a, %b {spec="a,b->ab"} : param[3, 4] f64
  return %o as o, %g as g, %s as s, %t as t
}
"""


def test_reuse_products_reads_a_computed_product():
    from mpdsl.ir import parse_program, verify
    program = verify(parse_program(PRODUCT_USED_TWICE))
    optimized, ctx = optimize(program, ["reuse_products"], verify_each=True)
    text = print_program(optimized)
    filecheck(text, """CHECK: %0 = mul %b, %c
CHECK: contract_rows %a, %0 {spec="a,b->ab"} : param[3, 4]
CHECK-NEXT: contract_rows %0 {spec="a->a"} : param[4]
CHECK-NEXT: contract_rows %a, %b {spec="a,b->ab"} : param[3, 4]""")
    assert any("read a product already computed" in note for _, note in ctx.notes)
    rng = np.random.default_rng(0)
    graph = mpdsl.Graph.from_arrays(np.array([[0, 1], [1, 2]]), 5)
    inputs = {name: rng.normal(size=(5, width)) for name, width in (("a", 3), ("b", 4), ("c", 4))}
    params = {"W": rng.normal(size=(4, 2))}
    backend = mpdsl.backends.get_backend("numpy")
    before = backend.run(program, graph, inputs, params, {})
    after = backend.run(optimized, graph, inputs, params, {})
    for name in before:
        np.testing.assert_allclose(after[name], before[name], rtol=1e-12)
