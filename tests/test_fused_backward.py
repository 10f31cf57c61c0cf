"""Fused backward programs against the unfused gradient program.

* every example model: its optimized training programs (the train-forward with its residuals, then
  the backward, as ``CompileContext.training_programs`` splits them) give the outputs and every
  parameter and float-input gradient of the unoptimized gradient program (float64, rtol 1e-10), on
  hypothesis graphs (empty, isolated nodes, self loops, multi-edges, a hub) and on a fixed batch;
* ``match_gspmm`` (the max / min backward's sums over matching endpoints) equals its unfused
  definition on the NumPy backend and in Triton's interpreter, on graphs with ties;
* max / min aggregations of gathered node values, by dst and by src, train without an E x F value:
  their backward reads node residuals only.
"""

from __future__ import annotations

import functools
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
from mpdsl.ir import Program, make_value, verify  # noqa: E402
from mpdsl.passes import optimize  # noqa: E402
from mpdsl.types import Dim, Domain, TensorType  # noqa: E402
from model_inputs import residual_arguments, synth_inputs, with_edge_sets  # noqa: E402
from mpdsl.plan import space_rows  # noqa: E402
from strategies import graphs  # noqa: E402
from test_passes import EXAMPLES, random_graph  # noqa: E402

RTOL = 1e-10


class TrainingCase:
    """An example model in float64 with its parameters and dims bound on a fixed graph, its
    optimized training programs (eval form: no dropout masks) and its unoptimized gradient
    program, both with respect to every parameter and every float input."""

    def __init__(self, path: Path, seed: int = 0):
        self.model = mpdsl.compile(path, dtype="float64", seed=seed)
        base = random_graph(seed, nodes=12, edges=40, self_loops=True)
        rng = np.random.default_rng(seed)
        inputs = synth_inputs(self.model, base, rng)
        self.model.run(base, **inputs)  # creates the parameters and binds the dims
        self.params = {k: v + 0.1 * rng.normal(size=v.shape) for k, v in self.model.params.items()}
        _, self.dims = self.model.bind(base, inputs)
        self.grad_inputs = [n for n, t in self.model.input_types.items() if t.is_float]
        wrt = list(self.model.param_types)
        context = self.model.context
        self.programs = context.training_programs(self.dims, "f64", False, self.grad_inputs, wrt)
        reference = context.reference(self.dims, "f64", "eval")
        self.reference = grad_program(reference, wrt=wrt, inputs=self.grad_inputs, keep_outputs=True)
        self.outputs = [n for n, _ in reference.outputs]

    def check(self, graph: mpdsl.Graph, seed: int = 0, backend=None) -> None:
        """The training programs run on ``backend`` (default: the model's, NumPy) against the
        unfused gradient program on the NumPy backend."""
        graph, arrays, cotangents = self.arguments(graph, seed)
        want = self.model.backend.run(self.reference, graph, {**arrays, **cotangents}, self.params, self.dims)
        got = self.run(graph, arrays, cotangents, backend or self.model.backend)
        for name, value in want.items():
            scale = max(1.0, float(np.abs(value).max(initial=0.0)))
            np.testing.assert_allclose(got[name], value, rtol=RTOL, atol=1e-12 * scale, err_msg=name)

    def arguments(self, graph: mpdsl.Graph, seed: int) -> tuple[mpdsl.Graph, dict, dict]:
        """The graph with the model's input edge sets, its inputs and the outputs' cotangents (from ``seed``)."""
        rng = np.random.default_rng(seed)
        graph = with_edge_sets(self.model, graph, seed)  # the model's input edge sets, if any
        arrays, _ = self.model.bind(graph, synth_inputs(self.model, graph, rng))
        forward_types = dict(self.programs.train_forward.outputs)
        cotangents = {f"d_{n}": rng.normal(size=self._rows(graph, forward_types[n].type)) for n in self.outputs}
        return graph, arrays, cotangents

    def run(self, graph: mpdsl.Graph, arrays: dict, cotangents: dict, backend) -> dict:
        """The train-forward's outputs and the backward's on ``backend``."""
        first = backend.run(self.programs.train_forward, graph, arrays, self.params, self.dims)
        inputs, params = residual_arguments(self.programs.backward, self.programs.residuals, first)
        return {**first, **backend.run(self.programs.backward, graph, {**arrays, **cotangents, **inputs},
                                       {**self.params, **params}, self.dims)}

    def _rows(self, graph: mpdsl.Graph, t: TensorType) -> tuple[int, ...]:
        shape = tuple(d.substitute(self.dims).value for d in t.shape)
        return shape if t.domain is Domain.PARAM else (space_rows(self.reference, graph)[t.space],) + shape


@functools.cache
def training_case(path: Path) -> TrainingCase:
    return TrainingCase(path)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
@settings(max_examples=6)
@given(graph=graphs(max_nodes=10, max_edges=30, features=1), seed=st.integers(0, 2**16))
def test_training_programs_equal_the_unfused_gradient_on_every_example(path, graph, seed):
    training_case(path).check(graph, seed)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_training_programs_equal_the_unfused_gradient_on_a_batch_with_a_hub(path):
    training_case(path).check(random_graph(5, nodes=14, edges=50, self_loops=True), seed=5)


# ------------------------------------------------------------------------------------------------
# match_gspmm


def match_program(by: str, weighted: bool, width: int = 3) -> Program:
    """``out = match_gspmm(a, b[, x]) by <by>`` on three float64 node inputs of ``width`` features."""
    t = TensorType(Domain.NODE, (Dim(width),), "f64")
    operands = [make_value("input", [], {"name": name}, t) for name in ("a", "b", "x")[:3 if weighted else 2]]
    out = make_value("match_gspmm", operands, {"by": by, "layout": "auto"}, t)
    return verify(Program("match", (), tuple(operands) + (out,), (("out", out),)))


def unfused(program: Program) -> Program:
    """The program with its match_gspmm replaced by its definition (the gradient builder's)."""
    from mpdsl.autodiff import GradBuilder, _unfuse

    (v,) = [v for v in program.values if v.op == "match_gspmm"]
    b = GradBuilder("f64")
    b.like = v
    root = _unfuse(v, b)
    values = tuple(program.values[:-1]) + tuple(b.values)
    return verify(Program("match_unfused", (), values, (("out", root),)))


def tied_values(graph: mpdsl.Graph, seed: int, width: int = 3) -> dict[str, np.ndarray]:
    """a, b with many equal entries (small integers, and b the max of a over in-edges), x normal."""
    rng = np.random.default_rng(seed)
    n = graph.num_nodes
    a = rng.integers(-2, 3, size=(n, width)).astype(np.float64)
    b = rng.integers(-2, 3, size=(n, width)).astype(np.float64)
    if graph.num_edges:
        b[graph.dst] = a[graph.src]  # a destination's b equals one of its sources' a
    return {"a": a, "b": b, "x": rng.normal(size=(n, width))}


@pytest.mark.parametrize("by", ["dst", "src"])
@pytest.mark.parametrize("weighted", [False, True], ids=["count", "weighted"])
@settings(max_examples=25)
@given(graph=graphs(max_nodes=30, max_edges=120, features=1), seed=st.integers(0, 2**16))
def test_match_gspmm_equals_its_unfused_definition(by, weighted, graph, seed):
    program = match_program(by, weighted)
    inputs = tied_values(graph, seed)
    numpy = get_backend("numpy")
    want = numpy.run(unfused(program), graph, inputs, {}, {})["out"]
    got = numpy.run(program, graph, inputs, {}, {})["out"]
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=0)
    if not weighted:
        assert np.array_equal(got, np.round(got)) and (got >= 0).all()


@pytest.mark.parametrize("by", ["dst", "src"])
@pytest.mark.parametrize("weighted", [False, True], ids=["count", "weighted"])
def test_match_gspmm_triton_kernel_equals_the_numpy_backend(by, weighted):
    pytest.importorskip("triton")
    from mpdsl.backends.triton_backend import TritonBackend

    graph = random_graph(2, nodes=30, edges=120, self_loops=True)
    program = match_program(by, weighted, width=5)
    inputs = tied_values(graph, 2, width=5)
    want = get_backend("numpy").run(program, graph, inputs, {}, {})["out"]
    triton = TritonBackend(interpret=True, device="cpu", poison=True)
    got = triton.run(program, graph, inputs, {}, {})["out"]
    assert triton.last_launches and all("match_gspmm" in name for name in triton.last_launches)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=0)


# ------------------------------------------------------------------------------------------------
# max / min backward: node residuals only

EXTREMUM_MODELS = {
    "max_by_dst": "model m(x: node[F], W: param[F, F]) -> node[F] { return max(relu(x @ W)[src]) by dst }",
    "min_by_dst": "model m(x: node[F], W: param[F, F]) -> node[F] { return min(tanh(x @ W)[src]) by dst }",
    "max_by_src": "model m(x: node[F], W: param[F, F]) -> node[F] { return max(relu(x @ W)[dst]) by src }",
}


def edge_values_wider_than_a_scalar(program: Program) -> list[str]:
    return [f"{v.op} {v.type}" for v in program.values if v.type.domain is Domain.EDGE and v.type.rank > 0]


@pytest.mark.parametrize("name", sorted(EXTREMUM_MODELS) + ["sage_max"])
def test_extremum_backward_keeps_node_residuals_only(name):
    source = EXAMPLES[[p.stem for p in EXAMPLES].index(name)] if name == "sage_max" else EXTREMUM_MODELS[name]
    model = mpdsl.compile(source, dims={"F": 8} if name != "sage_max" else None)
    dims = {"F": 8}
    wrt = list(model.param_types)
    programs = model.context.training_programs(dims, "f32", True, ["x"], wrt)
    for program in (programs.gradient, programs.train_forward, programs.backward):
        assert edge_values_wider_than_a_scalar(program) == [], program.name
    count_by = {v.attr["by"] for v in programs.train_forward.values if v.op == "match_gspmm"}
    route_by = {v.attr["by"] for v in programs.backward.values if v.op == "match_gspmm"}
    reduce_by = "src" if name == "max_by_src" else "dst"
    assert count_by == {reduce_by} and route_by == {"src" if reduce_by == "dst" else "dst"}
    residual_types = [v.type for v in programs.backward.values if v.name in programs.residuals]
    assert all(t.domain in (Domain.NODE, Domain.PARAM) for t in residual_types), residual_types


@pytest.mark.parametrize("name", sorted(EXTREMUM_MODELS))
def test_extremum_backward_splits_ties_as_the_unfused_gradient(name):
    """Integer features (many ties): the fused training programs equal the unfused gradient."""
    model = mpdsl.compile(EXTREMUM_MODELS[name], dtype="float64", dims={"F": 3}, seed=0)
    graph = random_graph(4, nodes=20, edges=80, self_loops=True)
    rng = np.random.default_rng(4)
    x = rng.integers(-2, 3, size=(graph.num_nodes, 3)).astype(np.float64)
    eye = {"W": np.eye(3)}  # relu(x @ I) and tanh(x @ I) keep the ties of x
    wrt = ["W"]
    programs = model.context.training_programs({"F": 3}, "f64", False, ["x"], wrt)
    reference = grad_program(model.context.reference({"F": 3}, "f64", "eval"), wrt=wrt, inputs=["x"])
    g = rng.normal(size=(graph.num_nodes, 3))
    backend = model.backend
    want = backend.run(reference, graph, {"x": x, "d_out": g}, eye, {"F": 3})
    first = backend.run(programs.train_forward, graph, {"x": x}, eye, {"F": 3})
    inputs, params = residual_arguments(programs.backward, programs.residuals, first)
    got = backend.run(programs.backward, graph, {"x": x, "d_out": g, **inputs}, {**eye, **params}, {"F": 3})
    assert {v.op for v in programs.backward.values} >= {"match_gspmm"}
    for key in ("d_W", "d_x"):
        np.testing.assert_allclose(got[key], want[key], rtol=RTOL, atol=1e-12, err_msg=key)


def test_fuse_match_aggregate_leaves_other_masks_alone():
    """A sum of a mask that is not eq(a[src], b[dst]) of full-width node values stays an aggregate."""
    source = ("model m(x: node[F], e: edge[F]) -> (a: node[F], b: node[F]) { return sum(e) by dst, "
              "max(e) by dst }")
    model = mpdsl.compile(source, dims={"F": 4})
    gradient = grad_program(model.context.reference({"F": 4}, None, "eval"), wrt=[], inputs=["e"])
    fused, _ = optimize(gradient, None, {"F": 4})
    assert not any(v.op == "match_gspmm" for v in fused.values)


# ------------------------------------------------------------------------------------------------
# The plan of training programs (mpdsl compile --emit plan --training)


def training_plan(name: str, capsys) -> str:
    from mpdsl.cli import main

    assert main(["compile", str(EXAMPLES[[p.stem for p in EXAMPLES].index(name)]), "--emit", "plan", "--training",
                 "--dim", "F=64"]) == 0
    out = capsys.readouterr().out
    return out[out.index("training step of"):]


def table_rows(section: str) -> list[list[str]]:
    """The kernel lines of a plan section: [kernel, op, result, type, dtype, layout, ...]."""
    return [line.split() for line in section.splitlines() if line[:1].isdigit()]


@pytest.mark.parametrize("name, fused", [("gcn", "gspmm"), ("sage_mean", "gspmm"), ("gin", "gspmm"),
                                         ("sage_max", "match_gspmm")])
def test_training_plan_shows_no_edge_by_feature_tensor(name, fused, capsys):
    plan = training_plan(name, capsys)
    forward, backward = plan.split("\nbackward:\n")
    for section in (forward, backward):
        rows = table_rows(section)
        assert rows
        wide = [row for row in rows if row[3].startswith("edge[") and row[3] != "edge[]"]
        assert wide == [], wide
    assert any(row[1] == fused and row[5] == "csr_src" for row in table_rows(backward)), backward
    assert "residuals:" in forward and "(per-edge 0 B)" in forward
    totals = plan[plan.index("training step (train-forward + backward):"):]
    assert "kernels" in totals and "of which per-edge" in totals


def test_training_plan_filecheck(capsys):
    from filecheck import filecheck

    check = Path(__file__).parent / "filecheck" / "training" / "sage_max.check"
    filecheck(training_plan("sage_max", capsys), check.read_text())


def test_training_flag_needs_the_plan(capsys):
    from mpdsl.cli import main

    assert main(["compile", str(EXAMPLES[0]), "--emit", "ir", "--training"]) == 2
    assert "--training plans the training step" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# GIN's and GCN's backward: the elementwise epilogues of the g-SpMMs by src run fused by rows


@pytest.mark.parametrize("name", ["gcn", "gin"])
def test_backward_gspmm_epilogues_run_in_row_groups(name):
    """The elementwise ops after each g-SpMM by src of the backward (GIN's (1 + eps) g add, GCN's
    normalisation scales, the relu' masks) run in a row group, block by block, not as whole N x F
    passes of their own."""
    from mpdsl.backends.row_fusion import RowGroup
    from mpdsl.ops import OPS, Trait

    model = mpdsl.compile(EXAMPLES[[p.stem for p in EXAMPLES].index(name)])
    backward = model.to_torch(F=64).programs(training=True, F=64).backward
    schedule = model.backend.schedule(backward)
    grouped = {id(m) for step in schedule if isinstance(step, RowGroup) for m in step.members}
    sources = [v for v in backward.values if v.op == "gspmm" and v.attr["by"] == "src"]
    assert sources
    epilogues = [v for v in backward.values if OPS[v.op].has(Trait.ELEMENTWISE) and v.type.domain is Domain.NODE
                 and any(o in sources for o in v.operands)]
    assert epilogues and all(id(v) in grouped for v in epilogues)


def test_sage_max_training_programs_run_on_the_triton_backend():
    """The fused max backward (match_gspmm by dst and by src) in Triton's interpreter equals the
    unfused gradient program on the NumPy backend."""
    pytest.importorskip("triton")
    from mpdsl.backends.triton_backend import TritonBackend

    case = TrainingCase(EXAMPLES[[p.stem for p in EXAMPLES].index("sage_max")])
    assert any(v.op == "match_gspmm" for v in case.programs.backward.values)
    triton = TritonBackend(interpret=True, device="cpu", poison=True)
    case.check(random_graph(6, nodes=12, edges=40, self_loops=True), seed=6, backend=triton)
    assert any("match_gspmm" in name for name in triton.last_launches)
