"""The fused attention backward against the unfused gradient program.

Training differentiates a program whose attention the optimizer fused first
(``mpdsl.passes.PRE_GRADIENT_PASSES``); the adjoint of ``attention`` is then a destination pass
for the scores (``attention_score_grad``) and a source pass for the values
(``attention_value_grad``) that recompute the softmax weights from the scores and the per-node
log-sum-exp (``segment_logsumexp``), the one statistic saved from the forward. Checked here:

* on the attention examples, the optimized gradient program (and its forward / backward split)
  gives the gradients of the reference program's unfused gradient, float64, rtol 1e-10;
* on hypothesis graphs (empty, isolated nodes, self loops, multi-edges, a hub), d scores and
  d values of one attention, per-head and scalar scores, by dst and by src;
* a GAT layer's training programs hold no E x H x K value: the forward, its residuals and the
  backward have no edge value of higher rank than the scores, and the plan's per-edge bytes say so;
* nor an E x H residual: the backward recomputes the leaky-ReLU scores from their per-node halves
  (``autodiff.rematerialized``), the plan (FileCheck) and the 8 x 8 gradients say so;
* the Triton kernels, in the interpreter, agree with the NumPy backend.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))

import mpdsl  # noqa: E402
from mpdsl.autodiff import grad_program  # noqa: E402
from mpdsl.backends import get_backend  # noqa: E402
from mpdsl.passes import optimize  # noqa: E402
from mpdsl.passes.rewrite import specialize  # noqa: E402
from mpdsl.plan import program_costs  # noqa: E402
from mpdsl.types import Domain  # noqa: E402
from model_inputs import residual_arguments, synth_inputs  # noqa: E402
from strategies import graphs  # noqa: E402
from test_passes import random_graph  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FUSED_BACKWARD = {"segment_logsumexp", "attention_score_grad", "attention_value_grad"}
# (path, dims the data does not bind)
EXAMPLES = [(ROOT / "examples" / "gat.mp", {}), (ROOT / "examples" / "graph_transformer.mp", {}),
            (ROOT / "benchmarks" / "models" / "gat.mp", {"H": 3, "C": 2})]
NUMPY = get_backend("numpy")


def assert_gradients_equal(got: dict, want: dict, names, what: str) -> None:
    for name in names:
        scale = max(1.0, float(np.abs(want[name]).max(initial=0.0)))
        np.testing.assert_allclose(got[name], want[name], rtol=1e-10, atol=1e-12 * scale, err_msg=f"{what}: {name}")


class ExampleCase:
    """A float64 example model on a small batched graph (a hub, a multi-edge, self loops, isolated
    nodes, an edge-less member) with perturbed parameters and random output cotangents."""

    def __init__(self, path: Path, dims: dict, seed: int = 0):
        self.model = mpdsl.compile(path, dtype="float64", seed=seed, dims=dims or None)
        self.graph = random_graph(seed, nodes=14, edges=50, self_loops=True)
        rng = np.random.default_rng(seed)
        inputs = synth_inputs(self.model, self.graph, rng)
        self.model.run(self.graph, **inputs)
        self.params = {k: v + 0.3 * rng.normal(size=v.shape) for k, v in self.model.params.items()}
        self.arrays, self.dims = self.model.bind(self.graph, inputs)
        self.reference = specialize(self.model.ir, self.dims)
        self.float_inputs = [v.name for v in self.reference.inputs if v.type.is_float]
        outputs = NUMPY.run(self.reference, self.graph, self.arrays, self.params, self.dims)
        self.cotangents = {f"d_{k}": rng.normal(size=v.shape) for k, v in outputs.items()}
        self.wanted = [f"d_{n}" for n in list(self.params) + self.float_inputs]

    def run(self, program, backend=NUMPY, **extra) -> dict:
        return backend.run(program, self.graph, {**self.arrays, **self.cotangents, **extra}, self.params, self.dims)

    def unfused_gradients(self) -> dict:
        return self.run(grad_program(self.reference, inputs=self.float_inputs))

    def training_programs(self):
        return self.model.context.training_programs(self.dims, "f64", False, self.float_inputs, list(self.params))

    def run_split(self, programs, backend=NUMPY) -> dict:
        """The backward part's gradients, on the residuals of a run of the train-forward part."""
        inputs, params = residual_arguments(programs.backward, programs.residuals,
                                            self.run(programs.train_forward, backend))
        return backend.run(programs.backward, self.graph, {**self.arrays, **self.cotangents, **inputs},
                           {**self.params, **params}, self.dims)


@pytest.mark.parametrize("path,dims", EXAMPLES, ids=["gat", "graph_transformer", "benchmark_gat"])
def test_fused_backward_equals_the_unfused_gradient_on_the_attention_examples(path, dims):
    case = ExampleCase(path, dims)
    programs = case.training_programs()
    assert FUSED_BACKWARD <= {v.op for v in programs.gradient.values}
    assert not any(v.op == "softmax" for v in programs.gradient.values)
    want = case.unfused_gradients()
    assert_gradients_equal(case.run(programs.gradient), want, case.wanted, "whole gradient program")
    # the split a training step runs: the forward part, then the backward part on its residuals
    rest = case.run_split(programs)
    assert_gradients_equal(rest, want, case.wanted, "forward / backward split")


def test_the_unfused_gradient_is_kept_without_the_fusion_pass_or_without_optimizing():
    case = ExampleCase(*EXAMPLES[0])
    for model in (mpdsl.compile(EXAMPLES[0][0], dtype="float64", optimize=False),
                  mpdsl.compile(EXAMPLES[0][0], dtype="float64", passes=["cse", "fuse_message_aggregate", "dce"])):
        programs = model.context.training_programs(case.dims, "f64", False, case.float_inputs, list(case.params))
        assert not FUSED_BACKWARD & {v.op for v in programs.gradient.values}


# ---- hypothesis graphs: one attention, its fused and unfused gradients ---------------------------

ATTENTION_SOURCES = {
    ("heads", "dst"): "model m(s: edge[H], x: node[H, K]) -> node[H, K] { return sum((softmax(s) by dst) * x[src]) by dst }",
    ("heads", "src"): "model m(s: edge[H], x: node[H, K]) -> node[H, K] { return sum((softmax(s) by src) * x[dst]) by src }",
    ("scalar", "dst"): "model m(s: edge[], x: node[F]) -> node[F] { return sum((softmax(s) by dst) * x[src]) by dst }",
    ("scalar", "src"): "model m(s: edge[], x: node[F]) -> node[F] { return sum((softmax(s) by src) * x[dst]) by src }",
}
SHAPES = {"heads": ((2,), (2, 3)), "scalar": ((), (4,))}


def attention_gradients(graph: mpdsl.Graph, scores: str, by: str, seed: int):
    """(fused, unfused) gradients d_s, d_x of <g, attention(s, x)> on ``graph``."""
    model = mpdsl.compile(ATTENTION_SOURCES[scores, by], dtype="float64")
    score_shape, value_shape = SHAPES[scores]
    rng = np.random.default_rng(seed)
    inputs = {"s": 3 * rng.normal(size=(graph.num_edges,) + score_shape),
              "x": rng.normal(size=(graph.num_nodes,) + value_shape)}
    arrays, dims = model.bind(graph, inputs)
    reference = specialize(model.ir, dims)
    fused, _ = optimize(reference, ["fuse_attention"], dims)
    assert any(v.op == "attention" for v in fused.values)
    arrays["d_out"] = rng.normal(size=(graph.num_nodes,) + value_shape)
    fused_grad = grad_program(fused, inputs=["s", "x"])
    assert FUSED_BACKWARD <= {v.op for v in fused_grad.values}
    want = NUMPY.run(grad_program(reference, inputs=["s", "x"]), graph, arrays, {}, dims)
    return fused_grad, (graph, arrays, dims), want


@settings(max_examples=30, deadline=None)
@given(graph=graphs(max_nodes=30, max_edges=120), scores=st.sampled_from(sorted(SHAPES)),
       by=st.sampled_from(["dst", "src"]), seed=st.integers(0, 2**32 - 1))
def test_fused_attention_gradients_on_random_graphs(graph, scores, by, seed):
    program, (g, arrays, dims), want = attention_gradients(graph, scores, by, seed)
    got = NUMPY.run(program, g, arrays, {}, dims)
    assert_gradients_equal(got, want, ["d_s", "d_x"], f"{scores} scores by {by}")


def test_nodes_without_in_edges_get_no_value_gradient_and_isolated_nodes_none():
    """A node without in-edges has attention 0 whatever its neighbours' values: its cotangent reaches
    no score and no value; an isolated node's value gets gradient 0."""
    graph = mpdsl.Graph.from_arrays(np.array([[0, 0, 1], [1, 2, 2]]), 4)  # node 0: no in-edges; node 3 isolated
    program, (g, arrays, dims), want = attention_gradients(graph, "heads", "dst", 0)
    arrays["d_out"][[1, 2]] = 0.0  # only nodes 0 and 3 (no in-edges) have a cotangent
    got = NUMPY.run(program, g, arrays, {}, dims)
    assert np.all(got["d_s"] == 0) and np.all(got["d_x"] == 0)


# ---- a GAT layer's training programs materialise no E x H x K value --------------------------------


@pytest.mark.parametrize("training", [False, True])
def test_gat_training_programs_hold_no_edge_by_feature_tensor(training):
    model = mpdsl.compile(ROOT / "benchmarks" / "models" / "gat.mp", dims={"F": 64, "H": 8, "C": 8})
    params = [v.name for v in model.ir.values if v.op == "param"]
    programs = model.context.training_programs({"F": 64, "H": 8, "C": 8}, "f32", training, ["x"], params)
    score_width = 8  # edge[H]: an edge value wider than this is an E x H x K tensor (edge[H, 1] is not)
    residual_values = dict(programs.train_forward.outputs)
    for what, values in (("forward", programs.train_forward.values), ("backward", programs.backward.values),
                         ("residuals", [residual_values[n] for n in programs.residuals])):
        wide = [str(v.type) for v in values
                if v.type.domain is Domain.EDGE and np.prod([d.value for d in v.type.shape]) > score_width]
        assert not wide, f"{what} holds E x H x K values: {wide}"
    assert FUSED_BACKWARD - {"segment_logsumexp"} <= {v.op for v in programs.backward.values}
    assert "segment_logsumexp" in {v.op for v in programs.train_forward.values}
    rows = {Domain.NODE: 100_000, Domain.EDGE: 1_000_000, Domain.GRAPH: 1, Domain.PARAM: 1}
    for program in (programs.train_forward, programs.backward):  # the plan's per-edge values: E x H at most
        edge_bytes = [c.bytes_out for c in program_costs(program, rows, {}) if c.value.type.domain is Domain.EDGE]
        assert max(edge_bytes, default=0) <= 1_000_000 * 8 * 4


@pytest.mark.parametrize("passes", [None, "without canonicalize"])
def test_gat_backward_sums_the_score_cotangent_once_per_endpoint(passes):
    """The leaky-relu score's adjoint reaches the backward as a product and as an elementwise einsum
    of the same operands, one of them reshaped; ``canonicalize`` spells both one way so that CSE
    leaves one segment sum by dst and one by src (four without it)."""
    from mpdsl.passes import DEFAULT_PIPELINE

    pipeline = None if passes is None else [p for p in DEFAULT_PIPELINE if p != "canonicalize"]
    model = mpdsl.compile(ROOT / "benchmarks" / "models" / "gat.mp", dims={"F": 64, "H": 8, "C": 8}, passes=pipeline)
    params = [v.name for v in model.ir.values if v.op == "param"]
    programs = model.context.training_programs({"F": 64, "H": 8, "C": 8}, "f32", True, [], params)
    sums = [v for v in programs.backward.values if v.op == "aggregate"]
    assert len(sums) == (2 if passes is None else 4), [str(v.type) for v in sums]


# ---- the edge scores are recomputed by the backward, not saved ---------------------------------------

BENCHMARK_GAT_DIMS = {"F": 64, "H": 8, "C": 8}


def test_gat_training_plan_filecheck(capsys):
    """The plan of the benchmark GAT's training step: the scores and the leaky ReLU's derivative hold
    no E x H residual; the backward recomputes the scores from the two node[H] halves."""
    from filecheck import filecheck
    from mpdsl.cli import main

    dims = [arg for name, value in BENCHMARK_GAT_DIMS.items() for arg in ("--dim", f"{name}={value}")]
    assert main(["compile", str(ROOT / "benchmarks" / "models" / "gat.mp"), "--emit", "plan", "--training",
                 *dims]) == 0
    out = capsys.readouterr().out
    check = Path(__file__).parent / "filecheck" / "training" / "gat_benchmark.check"
    filecheck(out[out.index("training step of"):], check.read_text())


@pytest.mark.parametrize("training", [False, True])
def test_gat_training_step_saves_no_edge_value(training):
    """No residual of the GAT training step is an edge value: the leaky-ReLU scores are recomputed by
    the backward from gathers of node residuals (their per-node halves), and the backward's
    leaky-ReLU derivative reads the recomputed scores."""
    model = mpdsl.compile(ROOT / "benchmarks" / "models" / "gat.mp", dims=BENCHMARK_GAT_DIMS)
    params = [v.name for v in model.ir.values if v.op == "param"]
    programs = model.context.training_programs(BENCHMARK_GAT_DIMS, "f32", training, ["x"], params)
    saved = dict(programs.train_forward.outputs)
    assert [n for n in programs.residuals if saved[n].type.domain is Domain.EDGE] == []
    residual_inputs = {id(v) for v in programs.backward.values if v.name in programs.residuals}
    (score,) = [v for v in programs.backward.values if v.op == "leaky_relu"]
    (total,) = score.operands
    assert total.op == "add" and all(o.op == "gather" and id(o.operands[0]) in residual_inputs
                                     for o in total.operands)
    assert {v.op for v in programs.backward.values if score in v.operands} >= \
        {"attention_score_grad", "attention_value_grad", "gt"}


def test_gat_8x8_split_recomputing_the_scores_equals_the_unfused_gradient():
    """The benchmark GAT with H = C = 8, float64: the train-forward (which saves no score) then the
    backward (which recomputes them) give every gradient of the unfused gradient program."""
    case = ExampleCase(ROOT / "benchmarks" / "models" / "gat.mp", {"H": 8, "C": 8}, seed=4)
    programs = case.training_programs()
    saved = dict(programs.train_forward.outputs)
    assert not any(saved[n].type.domain is Domain.EDGE for n in programs.residuals)
    assert any(v.op == "leaky_relu" for v in programs.backward.values)
    want = case.unfused_gradients()
    rest = case.run_split(programs)
    assert_gradients_equal(rest, want, case.wanted, "forward / backward split, H = C = 8")


def test_the_attention_hands_its_log_sum_exp_to_the_training_forwards_residual(monkeypatch):
    """On a graph where the compiled kernels run, the train-forward's attention also yields the
    log-sum-exp residual (one pass over the edges fewer), with the bits of the residual's own pass."""
    from mpdsl.backends import numpy_backend
    model = mpdsl.compile(ROOT / "benchmarks" / "models" / "gat.mp", dtype="float64", seed=0, dims={"H": 4, "C": 3})
    graph = random_graph(3, nodes=600, edges=30000, self_loops=True)
    inputs = synth_inputs(model, graph, np.random.default_rng(3))
    model.run(graph, **inputs)  # initialises the parameters
    arrays, dims = model.bind(graph, inputs)
    programs = model.context.training_programs(dims, "f64", False, ["x"], list(model.params))
    assert any(v.op == "segment_logsumexp" for _, v in programs.train_forward.outputs)
    handed: list[int] = []
    original = numpy_backend.ExecContext.__init__

    def run(keep: bool) -> dict:
        def init(self, *args, **kwargs):
            original(self, *args, **kwargs)
            self.handed_on = _HandOffs(handed, keep)

        monkeypatch.setattr(numpy_backend.ExecContext, "__init__", init)
        return NUMPY.run(programs.train_forward, graph, arrays, model.params, dims)

    with_hand_off = run(keep=True)
    assert handed, "the attention did not hand its log-sum-exp on"
    own_pass = run(keep=False)
    for name in with_hand_off:
        np.testing.assert_array_equal(with_hand_off[name], own_pass[name], err_msg=name)


class _HandOffs(dict):
    """``ExecContext.handed_on`` that records what is handed on, and drops it unless ``keep``."""

    def __init__(self, log: list, keep: bool):
        super().__init__()
        self.log, self.keep = log, keep

    def __setitem__(self, key, value):
        self.log.append(key)
        if self.keep:
            super().__setitem__(key, value)


# ---- Triton kernels in the interpreter ------------------------------------------------------------


@pytest.fixture
def triton_backend():
    pytest.importorskip("torch")
    pytest.importorskip("triton")
    from mpdsl.backends.triton_backend import TritonBackend

    return TritonBackend(interpret=True, device="cpu", poison=True)


def test_triton_fused_backward_matches_numpy_on_the_gat_example(triton_backend):
    case = ExampleCase(*EXAMPLES[0], seed=1)
    programs = case.training_programs()
    got = case.run(programs.gradient, triton_backend)
    launched = " ".join(triton_backend.last_launches)
    assert all(f"mpdsl_{kind}_" in launched for kind in ("logsumexp", "attention_score_grad", "attention_value_grad"))
    assert_gradients_equal(got, case.run(programs.gradient), case.wanted, "triton")


def test_triton_runs_the_gat_split_that_recomputes_the_scores(triton_backend):
    """Triton (interpreter): the benchmark GAT's train-forward and backward, which recomputes the
    scores from node residuals, equal the NumPy backend's run of the same programs."""
    case = ExampleCase(ROOT / "benchmarks" / "models" / "gat.mp", {"H": 3, "C": 2}, seed=2)
    programs = case.training_programs()
    assert any(v.op == "leaky_relu" for v in programs.backward.values)
    results = [case.run_split(programs, backend) for backend in (NUMPY, triton_backend)]
    assert_gradients_equal(results[1], results[0], case.wanted, "triton split")
    assert_gradients_equal(results[0], case.unfused_gradients(), case.wanted, "numpy split")


@pytest.mark.parametrize("scores", sorted(SHAPES))
@pytest.mark.parametrize("by", ["dst", "src"])
@pytest.mark.parametrize("nodes,edges", [(0, 0), (5, 0), (30, 90)])
def test_triton_fused_attention_gradients_match_numpy(triton_backend, scores, by, nodes, edges):
    graph = random_graph(2, nodes=nodes, edges=edges, self_loops=True) if edges else \
        mpdsl.Graph.from_arrays(np.zeros((2, 0), np.int64), nodes)
    program, (g, arrays, dims), want = attention_gradients(graph, scores, by, 3)
    got = triton_backend.run(program, g, arrays, {}, dims)
    assert_gradients_equal(got, want, ["d_s", "d_x"], f"triton, {scores} scores by {by}")
