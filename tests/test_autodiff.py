"""Reverse-mode differentiation on the IR and compiled models as torch modules.

* finite differences (float64, NumPy backend) for every example model: the gradient program, before
  and after the optimizer passes and split into its forward and backward parts, against central
  differences of a random projection of the outputs (with dropout masks too); the adjoints of the
  fused ops against the reference; the gradient programs on the Triton backend (its interpreter);
* torch autograd through PyG's GCNConv, SAGEConv (mean, max), GINConv and GATConv with the same
  weights: parameter and input gradients agree to float64 rtol 1e-8;
* the optimized backward programs of the fused GCN / SAGE / GIN layers materialise no E x F tensor;
* torch modules: parameters, state_dict round trips, float32 / float64, node reordering, the
  dropout mask shared by forward and backward (gradcheck), and a GCN that trains on the karate club
  with torch.optim.Adam;
* every op has an adjoint rule or an explicit not-differentiable entry.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).parent))

import mpdsl  # noqa: E402
from mpdsl import autodiff  # noqa: E402
from mpdsl.autodiff import (ADJOINTS, NOT_DIFFERENTIABLE, grad_program, mask_dropout, missing_adjoints,  # noqa: E402
                            split_program)
from mpdsl.ir import parse_program, print_program, verify  # noqa: E402
from mpdsl.ops import OPS, Trait, is_pure  # noqa: E402
from mpdsl.passes import optimize  # noqa: E402
from mpdsl.passes.rewrite import specialize  # noqa: E402
from mpdsl.plan import space_rows  # noqa: E402
from mpdsl.torch_module import to_torch  # noqa: E402
from mpdsl.types import Domain  # noqa: E402
from model_inputs import residual_arguments  # noqa: E402
from test_passes import EXAMPLES, random_graph, synth_inputs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KARATE = ROOT / "examples" / "data" / "karate.npz"


# ------------------------------------------------------------------------------------------------
# 1. Finite differences for every example model


class Case:
    """A float64 reference model with perturbed parameters, inputs on a small graph and the loss
    <R, outputs> for a fixed random projection R."""

    def __init__(self, source, seed: int = 0, training: bool = False):
        self.model = mpdsl.compile(source, dtype="float64", optimize=False, seed=seed)
        self.graph = random_graph(seed, nodes=12, edges=40)
        rng = np.random.default_rng(seed)
        inputs = synth_inputs(self.model, self.graph, rng)
        self.graph, inputs = self.model.with_edge_set_inputs(self.graph, inputs)  # the input edge sets, if any
        self.model.run(self.graph, **inputs)  # binds the dims, creates the parameters
        self.params = {k: np.asarray(v + 0.1 * rng.normal(size=v.shape)) for k, v in self.model.params.items()}
        self.arrays, self.dims = self.model.bind(self.graph, inputs)
        program = specialize(self.model.ir, self.dims)
        if training:
            program, masks = mask_dropout(program)
            assert masks, "no dropout to mask"
            rows = {Domain.NODE: self.graph.num_nodes, Domain.EDGE: self.graph.num_edges}
            for name, t, p in masks:
                shape = (rows[t.domain],) + tuple(d.value for d in t.shape)
                self.arrays[name] = (rng.random(shape) >= p) / (1 - p)
        self.program = program
        outputs = self.run(self.params)
        self.projection = {k: rng.normal(size=v.shape) for k, v in outputs.items()}

    def run(self, params, program=None):
        return self.model.backend.run(program or self.program, self.graph, self.arrays, params, self.dims)

    def loss(self, params) -> float:
        outputs = self.run(params)
        return sum(float(np.sum(outputs[k] * r)) for k, r in self.projection.items())

    def gradients(self, backward) -> dict[str, np.ndarray]:
        cotangents = {f"d_{k}": r for k, r in self.projection.items()}
        result = self.model.backend.run(backward, self.graph, {**self.arrays, **cotangents}, self.params, self.dims)
        return {name: result[f"d_{name}"] for name in self.params}


def check_finite_differences(case: Case, grads: dict[str, np.ndarray], entries: int = 3, seed: int = 0) -> int:
    """Central differences on ``entries`` random entries of every parameter; returns the count."""
    rng = np.random.default_rng(seed)
    scale = max(1.0, abs(case.loss(case.params)))
    h = 1e-5
    checked = 0
    for name, value in case.params.items():
        assert grads[name].shape == value.shape, name
        assert np.isfinite(grads[name]).all(), name
        picks = {tuple(int(rng.integers(0, s)) for s in value.shape) for _ in range(entries)}
        for index in picks:
            plus, minus = dict(case.params), dict(case.params)
            plus[name], minus[name] = value.copy(), value.copy()
            plus[name][index] += h
            minus[name][index] -= h
            numeric = (case.loss(plus) - case.loss(minus)) / (2 * h)
            analytic = grads[name][index]
            assert abs(numeric - analytic) <= 1e-5 * abs(numeric) + 1e-8 * scale, \
                f"d loss / d {name}{list(index)}: finite differences {numeric!r}, gradient program {analytic!r}"
            checked += 1
    return checked


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_gradients_match_finite_differences(path):
    case = Case(path)
    backward = grad_program(case.program)
    optimized, _ = optimize(backward, None, case.dims, verify_each=True)
    grads = case.gradients(backward)
    assert set(grads) == set(case.model.param_types)
    check_finite_differences(case, grads)
    for name, g in case.gradients(optimized).items():  # the optimizer preserves the backward program
        np.testing.assert_allclose(g, grads[name], rtol=1e-9, atol=1e-11 * max(1.0, np.abs(grads[name]).max()),
                                   err_msg=name)
    check_split(case, grads)


def check_split(case: Case, grads: dict[str, np.ndarray]) -> None:
    """The optimized gradient program split where the cotangents come in: the forward part gives the
    outputs and the residuals, the backward part the same gradients, recomputing no forward value but
    pure elementwise functions and gathers of the residuals (``rematerialized``), and no residual is
    one that would take fewer bytes recomputed."""
    whole, _ = optimize(grad_program(case.program, keep_outputs=True), None, case.dims)
    names = [n for n, _ in case.program.outputs]
    forward, backward, residuals = split_program(whole, names, [f"d_{n}" for n in names])
    late = {id(v) for v in backward.values if v.name in {f"d_{n}" for n in names}}
    for v in backward.values:
        if any(id(o) in late for o in v.operands):
            late.add(id(v))
    recomputed = [v for v in backward.values if id(v) not in late and not OPS[v.op].has(Trait.SOURCE)]
    assert all((OPS[v.op].has(Trait.ELEMENTWISE) or v.op == "gather") and is_pure(v) for v in recomputed), \
        "the backward part recomputes a forward value that is neither elementwise nor a gather"
    saved = {id(v): v for name, v in forward.outputs if name in residuals}
    assert not autodiff.rematerialized(saved, space_rows(forward)), \
        "a residual is recomputable from the other residuals in fewer bytes"
    first = case.run(case.params, forward)
    for name, want in case.run(case.params).items():
        np.testing.assert_allclose(first[name], want, rtol=1e-10, atol=1e-12)
    saved_inputs, saved_params = residual_arguments(backward, residuals, first)
    inputs = {**case.arrays, **{f"d_{k}": r for k, r in case.projection.items()}, **saved_inputs}
    rest = case.model.backend.run(backward, case.graph, inputs, {**case.params, **saved_params}, case.dims)
    for name, g in grads.items():
        np.testing.assert_allclose(rest[f"d_{name}"], g, rtol=1e-9, atol=1e-11 * max(1.0, np.abs(g).max()),
                                   err_msg=f"split: {name}")


def test_gradients_with_dropout_masks_match_finite_differences():
    case = Case(ROOT / "examples" / "gcn.mp", seed=3, training=True)
    assert not any(v.op == "dropout" for v in case.program.values)
    check_finite_differences(case, case.gradients(grad_program(case.program)), entries=6)


EDGE_OF_NODE_HALVES = """program @m dims() {
  %x = input : node[4] f32
  %Wa = param {init="default"} : param[4, 2] f32
  %Wb = param {init="default"} : param[4, 2] f32
  %0 = matmul %x, %Wa : node[2] f32
  %1 = matmul %x, %Wb : node[2] f32
  %2 = gather %0 {index="src"} : edge[2] f32
  %3 = gather %1 {index="dst"} : edge[2] f32
  %4 = add %2, %3 : edge[2] f32
  %5 = exp %4 : edge[2] f32
  %6 = exp %5 : edge[2] f32
  return %6 as y
}
"""


def test_an_edge_value_is_recomputed_from_node_values_only_when_they_take_fewer_bytes():
    """``rematerialized``: exp(a[src] + b[dst]) (a, b node values of a matmul) is recomputed through
    its gathers when a and b at node rows take fewer bytes than it at edge rows, or when they are
    residuals anyway; otherwise, or without the rows, it stays a residual."""
    from mpdsl.types import Space

    program = verify(parse_program(EDGE_OF_NODE_HALVES))
    a, b, gather_a, gather_b, total, score = program.values[3:9]
    needed = {id(score): score}
    cone = {id(score), id(total), id(gather_a), id(gather_b)}

    def rows(nodes: int, edges: int) -> dict:
        return {Space(Domain.NODE): nodes, Space(Domain.EDGE): edges, Space(Domain.PARAM): 1}

    assert autodiff.rematerialized(needed, rows(100, 1000)) == cone  # 2 x 100 x 2 floats < 1000 x 2
    assert autodiff.rematerialized(needed, rows(100, 200)) == set()  # 2 x 100 x 2 floats = 200 x 2
    assert autodiff.rematerialized(needed) == set()
    assert autodiff.rematerialized({**needed, id(a): a}, rows(100, 150)) == cone  # only b is new: 100 x 2 < 150 x 2
    assert autodiff.rematerialized({**needed, id(a): a, id(b): b}) == cone  # recomputing saves no new value
    # the outer exp of the inner one is recomputed from it, whether the inner one is saved or recomputed
    outer = program.values[9]
    assert autodiff.rematerialized({id(outer): outer, id(score): score}, rows(100, 1000)) == cone | {id(outer)}
    assert autodiff.rematerialized({id(outer): outer, id(score): score}, rows(100, 200)) == {id(outer)}


@pytest.mark.parametrize("name", ["gcn", "gat", "sage_max", "sage_mean", "rgcn", "rgat"])
def test_fused_op_adjoints_agree_with_the_reference(name):
    """Differentiating the optimized program (gspmm, attention, typed_linear) gives the gradients of
    the reference program."""
    case = Case(ROOT / "examples" / f"{name}.mp", seed=1)
    fused, _ = optimize(case.program, None, case.dims)
    assert {v.op for v in fused.values} & {"gspmm", "attention", "typed_linear"}
    want = case.gradients(grad_program(case.program))
    got = case.gradients(grad_program(fused))
    for param, g in want.items():
        np.testing.assert_allclose(got[param], g, rtol=1e-9, atol=1e-12 * max(1.0, np.abs(g).max()), err_msg=param)


def test_gradient_program_interface_and_round_trip():
    model = mpdsl.compile(ROOT / "examples" / "gine.mp", dtype="float64")
    program = grad_program(model.ir, wrt=["W11", "eps1"], inputs=["x"], dims={"F": 5, "Fe": 3})
    assert [name for name, _ in program.outputs] == ["d_W11", "d_eps1", "d_x"]
    cotangents = {v.attr["name"]: v.type for v in program.inputs if v.attr["name"].startswith("d_")}
    assert set(cotangents) == {"d_h", "d_y"}
    assert cotangents["d_y"].domain is Domain.GRAPH
    text = print_program(program)
    assert print_program(verify(parse_program(text))) == text
    with pytest.raises(mpdsl.CompileError, match="no parameter named 'nope'"):
        grad_program(model.ir, wrt=["nope"])


# ------------------------------------------------------------------------------------------------
# 2. Against torch autograd through PyG


pyg = pytest.importorskip("torch_geometric")
import test_pyg_reference as ref  # noqa: E402


def gradients_in_mpdsl_layout(module, to_mpdsl) -> dict[str, np.ndarray]:
    """A PyG module's parameter gradients under the mpdsl names and layouts: the weight-copying
    helper applied to a copy whose parameters hold the gradients (the layouts are linear maps)."""
    holder = copy.deepcopy(module)
    with torch.no_grad():
        for (_, p), (_, q) in zip(module.named_parameters(), holder.named_parameters()):
            q.copy_(p.grad if p.grad is not None else torch.zeros_like(p))
    return to_mpdsl(holder)


def compare_with_pyg(model, conv, weights, case, to_mpdsl, what: str) -> None:
    rng = np.random.default_rng(0)
    x_pyg = torch.from_numpy(case.x.copy()).requires_grad_()
    out_pyg = conv(x_pyg, torch.from_numpy(case.edge_index))
    projection = torch.from_numpy(rng.normal(size=tuple(out_pyg.shape)))
    (out_pyg * projection).sum().backward()
    want = gradients_in_mpdsl_layout(conv, to_mpdsl)

    model.load_weights(weights)
    module = to_torch(model).eval()
    x = torch.from_numpy(case.x.copy()).requires_grad_()
    out = module(case.mpdsl_graph("float64"), x=x)
    np.testing.assert_allclose(out.detach().numpy(), out_pyg.detach().numpy(), rtol=1e-10, atol=1e-12)
    (out * projection).sum().backward()
    assert set(want) == {n for n, _ in module.named_parameters()}
    for name, p in module.named_parameters():
        assert np.abs(want[name]).max() > 0, f"{what}: PyG gradient of {name} is zero"
        np.testing.assert_allclose(p.grad.numpy(), want[name], rtol=1e-8,
                                   atol=1e-12 * max(1.0, np.abs(want[name]).max()),
                                   err_msg=f"{what}: d {name}")
    np.testing.assert_allclose(x.grad.numpy(), x_pyg.grad.numpy(), rtol=1e-8, atol=1e-12,
                               err_msg=f"{what}: d x")


@pytest.mark.parametrize("graph_name", ["karate", "random"])
@pytest.mark.parametrize("kind", list(ref.LAYERS))
def test_single_layer_gradients_match_pyg(kind, graph_name):
    spec = ref.LAYERS[kind]
    case = ref.graph_case(graph_name)
    if spec.self_loops:
        case = case.with_self_loops()
    conv = ref.build(lambda: spec.factory(case.x.shape[1]), "float64", seed=11)
    if kind == "gin":
        with torch.no_grad():
            conv.eps.fill_(ref.GIN_EPS)
    conv.train()  # no dropout in these layers; autograd as in training
    compare_with_pyg(ref.compiled_layer(kind, "float64"), conv, spec.weights(conv), case, spec.weights,
                     f"{kind} on {case.name}")


@pytest.mark.parametrize("example", list(ref.EXAMPLE_STACKS))
def test_example_model_gradients_match_pyg(example):
    stack_cls, self_loops = ref.EXAMPLE_STACKS[example]
    case = ref.graph_case("random")
    if self_loops:
        case = case.with_self_loops()
    model = ref.compiled_example(example, "float64")
    stack = ref.build(lambda: stack_cls(case.x.shape[1], model.dims), "float64", seed=23)  # eval: no dropout
    compare_with_pyg(model, stack, stack.mpdsl_weights(), case, lambda m: m.mpdsl_weights(),
                     f"examples/{example}.mp on {case.name}")


# ------------------------------------------------------------------------------------------------
# 3. Fused backward programs


@pytest.mark.parametrize("name", ["gcn", "sage_mean", "gin"])
@pytest.mark.parametrize("training", [False, True])
def test_fused_backward_materialises_no_edge_by_feature_tensor(name, training):
    model = mpdsl.compile(ROOT / "examples" / f"{name}.mp")
    programs = to_torch(model, F=64).programs(training=training, F=64)
    for program in (programs.gradient, programs.train_forward, programs.backward):
        verify(program)
        edge_values = [v for v in program.values if v.type.domain is Domain.EDGE]
        assert all(v.type.rank == 0 for v in edge_values), [str(v.type) for v in edge_values]
        assert not any(v.op in ("gather", "aggregate") for v in program.values if v.type.rank > 0)
    assert any(v.op == "gspmm" and v.attr["by"] == "src" for v in programs.backward.values), \
        "the transposed aggregations should be fused g-SpMMs by src"
    assert programs.residuals and not any(v.op == "gspmm" and v.attr["by"] == "dst" for v in programs.backward.values), \
        "the backward part reads the forward aggregations as residuals instead of recomputing them"


# ------------------------------------------------------------------------------------------------
# 4. Torch modules


def test_module_parameters_forward_and_state_dict_round_trip():
    graph = mpdsl.Graph.load(KARATE)
    model = mpdsl.compile(ROOT / "examples" / "gat.mp", seed=2)
    module = to_torch(model, graph)
    assert [n for n, _ in module.named_parameters()] == list(model.param_types)
    assert all(isinstance(p, torch.nn.Parameter) for p in module.parameters())
    module.eval()
    out = module(graph)
    assert out.dtype == torch.float32
    np.testing.assert_array_equal(out.detach().numpy(), model(graph))
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.01)
    other = mpdsl.compile(ROOT / "examples" / "gat.mp", seed=5)
    other.load_weights(module.state_dict())
    np.testing.assert_allclose(other(graph), module(graph).detach().numpy(), rtol=1e-6, atol=1e-7)
    restored = to_torch(mpdsl.compile(ROOT / "examples" / "gat.mp", seed=7), graph)
    restored.load_state_dict(module.state_dict())
    np.testing.assert_array_equal(restored.eval()(graph).detach().numpy(), module(graph).detach().numpy())


def test_float32_and_float64_modules_agree():
    graph = mpdsl.Graph.load(KARATE)
    single = to_torch(mpdsl.compile(ROOT / "examples" / "sage_max.mp", seed=1), graph).eval()
    double = copy.deepcopy(single).double()
    projection = torch.from_numpy(np.random.default_rng(0).normal(size=(34, 4)))
    for module in (single, double):
        (module(graph) * projection.to(module.W_s1.dtype)).sum().backward()
    for (name, p), (_, q) in zip(single.named_parameters(), double.named_parameters()):
        assert p.grad.dtype == torch.float32 and q.grad.dtype == torch.float64
        np.testing.assert_allclose(p.grad.numpy(), q.grad.numpy(), rtol=1e-3, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("name", ["gat", "sage_max"])
def test_node_reordering_is_invisible_to_gradients(name):
    from test_passes import community_graph
    graph = community_graph()
    x = np.random.default_rng(1).normal(size=(graph.num_nodes, 6))
    grads = []
    for layout in ("none", "reorder"):
        module = to_torch(mpdsl.compile(ROOT / "examples" / f"{name}.mp", dtype="float64", layout=layout, seed=3),
                          graph).eval()
        features = torch.from_numpy(x.copy()).requires_grad_()
        out = module(graph, x=features)
        assert (module.last_layout is not None and module.last_layout.nodes is not None) == (layout == "reorder")
        (out * torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape).sin()).sum().backward()
        grads.append({"x": features.grad, **{n: p.grad for n, p in module.named_parameters()}})
    for key, g in grads[0].items():
        torch.testing.assert_close(grads[1][key], g, rtol=1e-9, atol=1e-11, msg=key)


def test_training_mode_reuses_the_dropout_mask_in_backward():
    graph = mpdsl.Graph.load(KARATE)
    module = to_torch(mpdsl.compile(ROOT / "examples" / "gcn.mp", dtype="float64", seed=4), graph).train()
    assert not torch.equal(module(graph), module(graph)), "dropout draws a new mask per call in training"
    names = [n for n, _ in module.named_parameters()]

    def run(*params):
        torch.manual_seed(0)  # the same masks at every evaluation
        return torch.func.functional_call(module, dict(zip(names, params)), (graph,))

    params = tuple(p.detach().clone().requires_grad_() for p in module.parameters())
    assert torch.autograd.gradcheck(run, params, fast_mode=True)
    module.eval()
    torch.testing.assert_close(module(graph), module(graph))


def test_gcn_trains_on_the_karate_club():
    torch.manual_seed(0)
    graph = mpdsl.Graph.load(KARATE)
    y = torch.from_numpy(np.array(graph["y"])).long()
    labelled = torch.tensor([int(np.flatnonzero(graph["y"] == c)[0]) for c in range(4)])
    module = to_torch(mpdsl.compile(ROOT / "examples" / "gcn.mp", seed=0), graph)
    optimizer = torch.optim.Adam(module.parameters(), lr=0.02, weight_decay=5e-4)
    module.train()
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(module(graph)[labelled], y[labelled])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    module.eval()
    with torch.no_grad():
        predicted = module(graph).argmax(-1)
    train_accuracy = (predicted[labelled] == y[labelled]).float().mean().item()
    assert train_accuracy > 0.9 and losses[-1] < 0.5 * losses[0], (train_accuracy, losses[0], losses[-1])
    assert (predicted == y).float().mean().item() > 0.5  # it generalises to the unlabelled members


@pytest.mark.parametrize("name", ["gcn", "meshgraphnets", "hgt"])
def test_gradient_programs_run_on_the_triton_backend(name):
    """The ops the adjoints add have torch rules in the Triton backend (run in its interpreter)."""
    pytest.importorskip("triton")
    from mpdsl.backends.triton_backend import TritonBackend
    case = Case(ROOT / "examples" / f"{name}.mp", seed=2)
    backward = grad_program(case.program)
    assert {v.op for v in backward.values} & {"contract_rows", "slice", "gt", "broadcast"}
    cotangents = {f"d_{k}": r for k, r in case.projection.items()}
    got = TritonBackend(interpret=True).run(backward, case.graph, {**case.arrays, **cotangents}, case.params,
                                            case.dims)
    for param, g in case.gradients(backward).items():
        np.testing.assert_allclose(got[f"d_{param}"], g, rtol=1e-9, atol=1e-11 * max(1.0, np.abs(g).max()),
                                   err_msg=param)


# ------------------------------------------------------------------------------------------------
# 5. Coverage and errors


def test_every_op_has_an_adjoint_rule_or_is_marked_not_differentiable():
    assert missing_adjoints() == [], f"ops without an adjoint rule: {missing_adjoints()}"
    assert not set(ADJOINTS) & set(NOT_DIFFERENTIABLE)
    assert {"gt", "eq", "contract_rows", "broadcast", "slice", "pad"} <= set(OPS)


def test_adjoint_coverage_check_can_fail():
    from mpdsl.ops import op

    op("frobnicate_for_test", 1)(lambda types, attrs, declared: types[0])
    try:
        assert missing_adjoints() == ["frobnicate_for_test"]
    finally:
        OPS.pop("frobnicate_for_test")
    assert missing_adjoints() == []


def test_op_without_adjoint_is_a_missing_rule_naming_op_and_location(monkeypatch):
    from mpdsl.ops import MissingRule

    source = "model m(x: node[F], W: param[F, 4]) -> node[4] {\n    h = x @ W\n    return tanh(h)\n}\n"
    model = mpdsl.compile(source, dtype="float64")
    monkeypatch.delitem(ADJOINTS, "tanh")
    with pytest.raises(MissingRule) as err:
        grad_program(model.ir)
    assert "'tanh'" in str(err.value) and ":3:" in str(err.value)
