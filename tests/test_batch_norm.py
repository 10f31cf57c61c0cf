"""``batch_norm``: the builtin that follows train() / eval(), as torch.nn.BatchNorm1d.

* eval mode: the inference formula (the former prelude layer), with the running statistics;
* training mode: the batch statistics (mean and biased variance over the rows of node and edge
  values), the running statistics updated with momentum (unbiased variance), after one and after
  several calls, by ``CompiledModel`` and by the torch module (where they are buffers);
* gradients of the torch module against torch's BatchNorm1d autograd in both modes, and finite
  differences of the NumPy gradient program of the training form;
* the Triton backend (its interpreter) against NumPy in both modes;
* the language (keyword eps / momentum, the running statistics must be parameters), the optimizer (no
  hoisting through gathers, CSE) and examples/gine.mp trained a few steps through ``to_torch``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).parent))

import mpdsl  # noqa: E402
from mpdsl.autodiff import batch_norm_statistics, grad_program, set_batch_norm_mode  # noqa: E402
from mpdsl.diagnostics import CompileError, InputError  # noqa: E402
from mpdsl.passes import optimize  # noqa: E402
from mpdsl.passes.rewrite import specialize  # noqa: E402
from mpdsl.runtime import CompiledModel  # noqa: E402
from mpdsl.torch_module import to_torch  # noqa: E402
from mpdsl.types import Domain  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
F = 4

SOURCE = """
model bn(x: node[F], e: edge[F],
         rm: param[F] = zeros, rv: param[F] = ones, g: param[F] = ones, b: param[F] = zeros,
         erm: param[F] = zeros, erv: param[F] = ones, eg: param[F] = ones, eb: param[F] = zeros)
         -> (h: node[F], m: edge[F]) {
    return batch_norm(x, rm, rv, g, b), batch_norm(e, erm, erv, eg, eb)
}
"""

# The former prelude layer (inference only).
REFERENCE = """
layer bn_old(x: any[D], running_mean: param[D], running_var: param[D], gamma: param[D], beta: param[D]) -> any[D] {
    return (x - running_mean) * rsqrt(running_var + 0.00001) * gamma + beta
}
""" + SOURCE.replace("batch_norm(", "bn_old(")

NODE = ("rm", "rv", "g", "b")
EDGE = ("erm", "erv", "eg", "eb")


def graph() -> mpdsl.Graph:
    rng = np.random.default_rng(5)
    return mpdsl.Graph.from_arrays(np.stack([rng.integers(0, 9, 23), rng.integers(0, 9, 23)]), 9)


GRAPH = graph()


def weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    result = {}
    for names in (NODE, EDGE):
        mean, var, gamma, beta = names
        result[mean] = rng.normal(size=F)
        result[var] = rng.uniform(0.5, 1.5, F)
        result[gamma] = rng.normal(size=F)
        result[beta] = rng.normal(size=F)
    return result


def inputs(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100 + seed)
    return {"x": rng.normal(1.0, 2.0, (GRAPH.num_nodes, F)), "e": rng.normal(-0.5, 0.7, (GRAPH.num_edges, F))}


def model(source: str = SOURCE, backend: str | object = "numpy", optimize: bool = True) -> CompiledModel:
    if isinstance(backend, str):
        m = mpdsl.compile(source, backend=backend, dtype="float64", dims={"F": F}, optimize=optimize)
    else:
        m = CompiledModel(mpdsl.compile(source, dtype="float64", dims={"F": F}).ir, backend)
    return m.load_weights(weights())


def torch_norms(w: dict[str, np.ndarray]) -> dict[str, torch.nn.BatchNorm1d]:
    """torch.nn.BatchNorm1d twins of the node and edge batch norms (float64, momentum 0.1, eps 1e-5)."""
    norms = {}
    for key, (mean, var, gamma, beta) in (("x", NODE), ("e", EDGE)):
        bn = torch.nn.BatchNorm1d(F).double()
        with torch.no_grad():
            bn.running_mean.copy_(torch.from_numpy(w[mean]))
            bn.running_var.copy_(torch.from_numpy(w[var]))
            bn.weight.copy_(torch.from_numpy(w[gamma]))
            bn.bias.copy_(torch.from_numpy(w[beta]))
        norms[key] = bn
    return norms


def close(got, want, rtol=1e-10, what=""):
    got = got.detach().numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
    want = want.detach().numpy() if isinstance(want, torch.Tensor) else np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(1.0, float(np.abs(want).max())), err_msg=what)


def check_statistics(params, norms, what: str) -> None:
    for key, (mean, var, _, _) in (("x", NODE), ("e", EDGE)):
        close(params[mean], norms[key].running_mean, what=f"{what}: {mean}")
        close(params[var], norms[key].running_var, what=f"{what}: {var}")


# ---- forward, running statistics -----------------------------------------------------------------


def test_the_ir_has_one_batch_norm_op_per_call():
    ir = model().ir
    ops = [v for v in ir.values if v.op == "batch_norm"]
    assert [v.attr for v in ops] == [{"eps": 1e-5, "momentum": 0.1, "mode": "auto"}] * 2
    assert [v.type.domain for v in ops] == [Domain.NODE, Domain.EDGE]
    assert batch_norm_statistics(ir) == ["rm", "rv", "erm", "erv"]


def test_eval_mode_is_the_former_prelude_formula():
    old, new = model(REFERENCE), model()
    assert not new.training
    for seed in range(2):
        want, got = old.run(GRAPH, **inputs(seed)), new.run(GRAPH, **inputs(seed))
        for name in ("h", "m"):
            close(got[name], want[name], rtol=1e-13, what=name)
    assert all(np.array_equal(new.params[k], v) for k, v in weights().items()), "eval mode updates nothing"


def test_training_forward_and_running_statistics_match_torch():
    m = model().train()
    norms = {k: bn.train() for k, bn in torch_norms(weights()).items()}
    for step in range(4):  # after one and after several training forwards
        arrays = inputs(step)
        got = m.run(GRAPH, **arrays)
        close(got["h"], norms["x"](torch.from_numpy(arrays["x"])), what=f"node values, step {step}")
        close(got["m"], norms["e"](torch.from_numpy(arrays["e"])), what=f"edge values, step {step}")
        check_statistics(m.params, norms, f"CompiledModel after {step + 1} call(s)")
    frozen = {k: v.copy() for k, v in m.params.items()}
    m.eval()
    arrays = inputs(9)
    got = m.run(GRAPH, **arrays)
    close(got["h"], norms["x"].eval()(torch.from_numpy(arrays["x"])), what="eval after training")
    assert all(np.array_equal(m.params[k], v) for k, v in frozen.items()), "eval mode leaves the statistics alone"


def test_the_reference_program_trains_like_the_optimized_one():
    plain, fused = model(optimize=False).train(), model().train()
    for step in range(2):
        a, b = plain.run(GRAPH, **inputs(step)), fused.run(GRAPH, **inputs(step))
        close(b["h"], a["h"], rtol=1e-12)
    for name in ("rm", "rv", "erm", "erv"):
        close(fused.params[name], plain.params[name], rtol=1e-12, what=name)


def test_training_needs_two_rows():
    m = model().train()
    single = mpdsl.Graph.from_arrays(np.array([[0], [0]]), 1)
    with pytest.raises(InputError, match="more than one node"):
        m.run(single, x=np.ones((1, F)), e=np.ones((1, F)))
    m.eval().run(single, x=np.ones((1, F)), e=np.ones((1, F)))


# ---- the torch module: buffers, running statistics, gradients --------------------------------------


def test_module_buffers_state_dict_and_running_statistics():
    module = to_torch(model())
    assert [n for n, _ in module.named_parameters()] == ["g", "b", "eg", "eb"]
    assert [n for n, _ in module.named_buffers()] == ["rm", "rv", "erm", "erv"]
    assert set(module.state_dict()) == set(module.compiled.param_types)
    assert list(module.weights()) == list(module.compiled.param_types)
    norms = {k: bn.train() for k, bn in torch_norms(weights()).items()}
    module.train()
    for step in range(3):
        arrays = inputs(step)
        out = module(GRAPH, **arrays) if step != 1 else _no_grad(module, arrays)
        close(out["h"], norms["x"](torch.from_numpy(arrays["x"])), what=f"node values, step {step}")
        close(out["m"], norms["e"](torch.from_numpy(arrays["e"])), what=f"edge values, step {step}")
        check_statistics({n: b for n, b in module.named_buffers()}, norms, f"torch module after {step + 1} call(s)")
    other = model()
    other.load_weights(module.state_dict())
    check_statistics(other.params, norms, "load_weights(state_dict())")
    module.eval()
    before = {n: b.clone() for n, b in module.named_buffers()}
    out = module(GRAPH, **inputs(5))
    (out["h"].sum() + out["m"].sum()).backward()
    assert all(torch.equal(before[n], b) for n, b in module.named_buffers()), "eval mode updates nothing"


def _no_grad(module, arrays):
    with torch.no_grad():
        return module(GRAPH, **arrays)


@pytest.mark.parametrize("training", [True, False])
def test_module_gradients_match_torch_batch_norm(training):
    module = to_torch(model()).train(training)
    norms = {k: bn.train(training) for k, bn in torch_norms(weights()).items()}
    arrays = inputs(3)
    rng = np.random.default_rng(7)
    projection = {k: torch.from_numpy(rng.normal(size=a.shape)) for k, a in arrays.items()}
    ours = {k: torch.from_numpy(a.copy()).requires_grad_() for k, a in arrays.items()}
    theirs = {k: torch.from_numpy(a.copy()).requires_grad_() for k, a in arrays.items()}
    out = module(GRAPH, **ours)
    (out["h"] * projection["x"]).sum().add((out["m"] * projection["e"]).sum()).backward()
    for key, name in (("x", "h"), ("e", "m")):
        want = norms[key](theirs[key])
        close(out[name], want)
        (want * projection[key]).sum().backward()
    for key, (mean, var, gamma, beta) in (("x", NODE), ("e", EDGE)):
        close(ours[key].grad, theirs[key].grad, rtol=1e-8, what=f"d {key}")
        close(getattr(module, gamma).grad, norms[key].weight.grad, rtol=1e-8, what=f"d {gamma}")
        close(getattr(module, beta).grad, norms[key].bias.grad, rtol=1e-8, what=f"d {beta}")
        assert getattr(module, mean).grad is None and not getattr(module, mean).requires_grad
    check_statistics({n: b for n, b in module.named_buffers()}, norms, "after the training step")


def test_training_programs_fix_the_mode():
    module = to_torch(model())
    for training, mode in ((True, "train"), (False, "eval")):
        programs = module.programs(training=training)
        for program in (programs.forward, programs.train_forward, programs.gradient):
            assert {v.attr["mode"] for v in program.values if v.op == "batch_norm"} == {mode}
        assert not any(v.op == "batch_norm" for v in programs.backward.values), "the backward reads residuals"
        assert not any(name.startswith("d_") and name[2:] in ("rm", "rv", "erm", "erv")
                       for name, _ in programs.backward.outputs)


def test_training_gradient_program_matches_finite_differences():
    m = model(optimize=False)
    arrays, dims = m.bind(GRAPH, inputs(4))
    program = set_batch_norm_mode(specialize(m.ir, dims), training=True)
    backward = grad_program(program, inputs=["x", "e"])
    rng = np.random.default_rng(8)
    params = weights(3)
    projection = {k: rng.normal(size=a.shape) for k, a in m.backend.run(program, GRAPH, arrays, params, dims).items()}

    def loss(params, arrays) -> float:
        outputs = m.backend.run(program, GRAPH, arrays, params, dims)
        return sum(float(np.sum(outputs[k] * r)) for k, r in projection.items())

    grads = m.backend.run(backward, GRAPH, {**arrays, **{f"d_{k}": r for k, r in projection.items()}}, params, dims)
    h = 1e-6
    for name in params:
        for i in range(F):
            plus, minus = dict(params), dict(params)
            plus[name], minus[name] = params[name].copy(), params[name].copy()
            plus[name][i] += h
            minus[name][i] -= h
            numeric = (loss(plus, arrays) - loss(minus, arrays)) / (2 * h)
            assert abs(grads[f"d_{name}"][i] - numeric) <= 1e-6 * max(1.0, abs(numeric)), (name, i)
    for key in ("x", "e"):
        for row, col in ((0, 0), (3, 2), (7, 1)):
            plus, minus = dict(arrays), dict(arrays)
            plus[key], minus[key] = arrays[key].copy(), arrays[key].copy()
            plus[key][row, col] += h
            minus[key][row, col] -= h
            numeric = (loss(params, plus) - loss(params, minus)) / (2 * h)
            assert abs(grads[f"d_{key}"][row, col] - numeric) <= 1e-6 * max(1.0, abs(numeric)), (key, row, col)
    assert all(not grads[f"d_{n}"].any() for n in ("rm", "rv", "erm", "erv")), "no gradient in the training form"


# ---- the Triton backend ----------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
def test_triton_matches_numpy(training):
    pytest.importorskip("triton")
    from mpdsl.backends.triton_backend import TritonBackend
    reference = model().train(training)
    twin = model(backend=TritonBackend(device="cpu", interpret=True)).train(training)
    for step in range(2):
        want, got = reference.run(GRAPH, **inputs(step)), twin.run(GRAPH, **inputs(step))
        for name in ("h", "m"):
            close(got[name], want[name], rtol=1e-10, what=name)
    for name, value in reference.params.items():
        close(twin.params[name], value, rtol=1e-10, what=name)
    assert (reference.params["rm"] != weights()["rm"]).all() == training
    # the gradient program of the training form too
    arrays, dims = reference.bind(GRAPH, inputs(6))
    program = set_batch_norm_mode(specialize(reference.ir, dims), training)
    backward = optimize(grad_program(program, inputs=["x"]), None, dims)[0]
    rng = np.random.default_rng(1)
    cotangents = {"d_h": rng.normal(size=arrays["x"].shape), "d_m": rng.normal(size=arrays["e"].shape)}
    want = reference.backend.run(backward, GRAPH, {**arrays, **cotangents}, reference.params, dims)
    got = twin.backend.run(backward, GRAPH, {**arrays, **cotangents}, reference.params, dims)
    for name, value in want.items():
        close(got[name], value, rtol=1e-10, what=name)


# ---- language and optimizer --------------------------------------------------------------------------


def test_keywords_and_errors():
    text = SOURCE.replace("batch_norm(x, rm, rv, g, b)", "batch_norm(x, rm, rv, g, b, eps=0.001, momentum=0.5)")
    ir = mpdsl.compile(text, dims={"F": F}).ir
    (v,) = [v for v in ir.values if v.op == "batch_norm" and v.type.domain is Domain.NODE]
    assert v.attr == {"eps": 0.001, "momentum": 0.5, "mode": "auto"}
    with pytest.raises(CompileError, match="running_mean of batch_norm must be a parameter"):
        mpdsl.compile(SOURCE.replace("batch_norm(x, rm,", "batch_norm(x, rm * 2.0,"))
    with pytest.raises(CompileError, match="must be a param"):
        mpdsl.compile(SOURCE.replace("batch_norm(x, rm, rv, g, b)", "batch_norm(x, rm, rv, erm[0], b)"))
    with pytest.raises(CompileError, match="no keyword argument 'p'"):
        mpdsl.compile(SOURCE.replace("batch_norm(x, rm, rv, g, b)", "batch_norm(x, rm, rv, g, b, p=0.5)"))


def test_batch_norm_of_gathered_values_stays_on_the_edges():
    text = SOURCE.replace("batch_norm(e, erm, erv, eg, eb)", "batch_norm(relu(x[src]), erm, erv, eg, eb)")
    text = text.replace("e: edge[F],", "")
    plain = mpdsl.compile(text, dtype="float64", dims={"F": F}, optimize=False).load_weights(weights()).train()
    fused = mpdsl.compile(text, dtype="float64", dims={"F": F}).load_weights(weights()).train()
    program = fused.optimized_ir
    (edge,) = [v for v in program.values if v.op == "batch_norm" and v.operands[0].type.domain is Domain.EDGE]
    assert edge.type.domain is Domain.EDGE, "batch_norm is not row-wise: it must not be hoisted through a gather"
    x = inputs(0)["x"]
    want, got = plain.run(GRAPH, x=x), fused.run(GRAPH, x=x)
    for name in ("h", "m"):
        close(got[name], want[name], rtol=1e-12, what=name)


def test_equal_batch_norms_are_two_updates_in_training_and_one_value_in_eval():
    """Two identical calls in training update the running statistics twice (as two torch calls of
    one BatchNorm1d module would): CSE must not merge stateful values (``Effect.STATEFUL``)."""
    text = SOURCE.replace("return batch_norm(x, rm, rv, g, b),",
                          "return batch_norm(x, rm, rv, g, b) + batch_norm(x, rm, rv, g, b),")
    plain = mpdsl.compile(text, dtype="float64", dims={"F": F}, optimize=False).load_weights(weights()).train()
    fused = mpdsl.compile(text, dtype="float64", dims={"F": F}).load_weights(weights()).train()
    assert sum(v.op == "batch_norm" for v in fused.optimized_ir.values) == 3
    for step in range(2):
        a, b = plain.run(GRAPH, **inputs(step)), fused.run(GRAPH, **inputs(step))
        close(b["h"], a["h"], rtol=1e-12)
    for name in ("rm", "rv"):
        close(fused.params[name], plain.params[name], rtol=1e-12, what=name)
    evaluated = specialize(fused.ir, {"F": F})
    frozen = set_batch_norm_mode(evaluated, training=False)
    assert sum(v.op == "batch_norm" for v in optimize(frozen, target="cpu")[0].values) == 2, \
        "in eval mode batch_norm is pure: equal calls are merged"


def test_an_unused_batch_norm_still_updates_its_statistics():
    text = SOURCE.replace("return batch_norm(x, rm, rv, g, b),", "unused = batch_norm(x, rm, rv, g, b)\n    return x,")
    for optimized in (False, True):
        m = mpdsl.compile(text, dtype="float64", dims={"F": F}, optimize=optimized).load_weights(weights()).train()
        assert any(v.op == "batch_norm" and v.operands[0].type.domain is Domain.NODE for v in m.optimized_ir.values)
        m.run(GRAPH, **inputs(0))
        assert not np.array_equal(m.params["rm"], weights()["rm"]), f"optimize={optimized}: statistics not updated"


# ---- examples/gine.mp trains through to_torch ----------------------------------------------------------


def test_gine_trains_with_batch_statistics():
    from test_passes import random_graph
    torch.manual_seed(0)
    g = random_graph(2, nodes=24, edges=80)
    rng = np.random.default_rng(2)
    x, edge_attr = rng.normal(size=(g.num_nodes, 5)), rng.normal(size=(g.num_edges, 3))
    target = torch.from_numpy(rng.normal(size=(g.num_graphs, 2)))
    compiled = mpdsl.compile(ROOT / "examples" / "gine.mp", dtype="float64", seed=1)
    module = to_torch(compiled, F=5, Fe=3)
    assert {n for n, _ in module.named_buffers()} == {"mean1", "var1", "mean2", "var2"}
    optimizer = torch.optim.Adam(module.parameters(), lr=0.01)
    start = {n: b.clone() for n, b in module.named_buffers()}
    module.train()
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(module(g, x=x, edge_attr=edge_attr)["y"], target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    trained = {n: b.clone() for n, b in module.named_buffers()}
    assert all(not torch.equal(start[n], b) for n, b in trained.items()), "train() updates the running statistics"
    module.eval()
    with torch.no_grad():
        out = module(g, x=x, edge_attr=edge_attr)
    out2 = module(g, x=x, edge_attr=edge_attr)
    assert all(torch.equal(trained[n], b) for n, b in module.named_buffers()), "eval() freezes them"
    close(out2["y"], out["y"], rtol=0)
    synced = module.sync()
    close(synced(g, x=x, edge_attr=edge_attr)["y"], out["y"], rtol=1e-12)


def test_gine_training_gradients_pass_gradcheck():
    """The optimized, split training programs of examples/gine.mp (two batch norms after fused graph
    ops) against torch's numerical gradients."""
    from test_passes import random_graph
    g = random_graph(3, nodes=14, edges=40)
    rng = np.random.default_rng(3)
    x, edge_attr = rng.normal(size=(g.num_nodes, 3)), rng.normal(size=(g.num_edges, 2))
    module = to_torch(mpdsl.compile(ROOT / "examples" / "gine.mp", dtype="float64", seed=2), F=3, Fe=2).train()
    names = [n for n, _ in module.named_parameters()]
    projection = torch.from_numpy(rng.normal(size=(g.num_nodes, 16)))

    def run(*params):
        out = torch.func.functional_call(module, dict(zip(names, params)), (g,), {"x": x, "edge_attr": edge_attr})
        return (out["h"] * projection).sum() + out["y"].sum()

    params = tuple(p.detach().clone().requires_grad_() for p in module.parameters())
    assert torch.autograd.gradcheck(run, params, fast_mode=True)
