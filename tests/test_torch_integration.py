"""Compiled models inside torch (``mpdsl.torch_module``): the opaque op ``mpdsl::run``.

* every example model trains a few steps through the Triton backend (its interpreter, CPU tensors)
  with a guard that fails on any host copy in the step (``host_copy_guard``), and its gradients
  equal the NumPy backend's (float64 rtol 1e-8);
* the NumPy backend reads the parameters' memory (no copies: ``data_ptr``);
* the tensor-only call (PyG's style) and a PyG ``Data`` equal ``module(graph)``;
* ``torch.compile`` (backends eager and inductor) and ``torch.export`` (also saved and loaded in a
  fresh process) give the eager outputs and gradients for GCN, GAT, GINE, MPNN, RGCN;
* half precision: ``.half()`` and autocast float16 on the Triton backend equal float32 within
  ``HALF_TOLERANCE``; the NumPy backend refuses half precision;
* bad calls get one clear message.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

sys.path.insert(0, str(Path(__file__).parent))

import mpdsl  # noqa: E402
from mpdsl.backends import BackendError  # noqa: E402
from mpdsl.backends.triton_backend import TritonBackend  # noqa: E402
from mpdsl.diagnostics import InputError  # noqa: E402
from mpdsl.runtime import CompiledModel  # noqa: E402
from mpdsl.torch_module import graph_of  # noqa: E402
from host_copy_guard import HostCopyError, no_host_copies  # noqa: E402
from model_inputs import graph_holding, synth_inputs  # noqa: E402
from test_passes import random_graph  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p.stem for p in (ROOT / "examples").glob("*.mp"))
COMPILED_EXAMPLES = ["gcn", "gat", "gine", "mpnn", "rgcn"]
HALF_TOLERANCE = 2e-2  # max |f16 - f32| <= HALF_TOLERANCE * max |f32| (outputs and gradients)


def triton_twin(model: CompiledModel, graph: mpdsl.Graph | None = None, **options) -> CompiledModel:
    """The model on the Triton backend (interpreter, CPU tensors) with the same weights (initialised
    for ``graph`` first where their shapes are bound from the data)."""
    if graph is not None and not model.params:
        model.init(model.seed, graph=graph)
    twin = CompiledModel(model.ir, TritonBackend(interpret=True, device=options.pop("device", None), **options),
                         source_name=model.source_name, seed=model.seed)
    return twin.load_weights(model.params)


def graph_with_inputs(model: CompiledModel, seed: int = 0, **sizes) -> mpdsl.Graph:
    """A batch of three graphs (hub, multi-edge, self loops, isolated nodes) holding random values for
    every input of ``model``."""
    base = random_graph(seed, **(sizes or dict(nodes=20, edges=60)), self_loops=True)
    inputs = synth_inputs(model, base, np.random.default_rng(seed))
    return graph_holding(model, base, inputs, {"batch": base["batch"]})


def projection_loss(out) -> torch.Tensor:
    """A loss that weights every output element differently (sin of its position)."""
    outputs = [out] if isinstance(out, torch.Tensor) else [o for o in out.values()]
    total = torch.zeros((), dtype=torch.float64)
    for o in outputs:
        if o.is_floating_point():
            weights = torch.arange(o.numel(), dtype=torch.float64).sin().reshape(o.shape)
            total = total + (o.double() * weights).sum()
    return total


def train_step(module, optimizer, seed: int, *args, **kwargs) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)  # the same dropout masks on both backends
    optimizer.zero_grad()
    projection_loss(module(*args, **kwargs)).backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    optimizer.step()
    return grads


# ---- device residency: Triton end to end ----------------------------------------------------------


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_trains_through_triton_without_host_copies(name):
    reference = mpdsl.compile(ROOT / "examples" / f"{name}.mp", dtype="float64", seed=1)
    graph = graph_with_inputs(reference)
    reference.run(graph)  # binds the dims, creates the parameters
    modules = [reference.to_torch(graph).train(), triton_twin(reference).to_torch(graph).train()]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.01) for m in modules]
    for step in range(3):
        expected = train_step(modules[0], optimizers[0], step, graph)
        if step == 0:
            got = train_step(modules[1], optimizers[1], step, graph)  # first step: the graph moves to the device
        else:
            with no_host_copies():
                got = train_step(modules[1], optimizers[1], step, graph)
        assert set(got) == set(expected)
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=1e-8, atol=1e-10 * max(1.0, value.abs().max().item()),
                                       msg=f"{name} step {step}: d {key}")
    for (key, p), (_, q) in zip(modules[0].named_parameters(), modules[1].named_parameters()):
        torch.testing.assert_close(q, p, rtol=1e-8, atol=1e-10, msg=key)


def test_triton_float32_gradients_match_numpy():
    for name in ("gat", "gine"):
        reference = mpdsl.compile(ROOT / "examples" / f"{name}.mp", seed=2)
        graph = graph_with_inputs(reference, seed=2)
        reference.run(graph)
        modules = [reference.to_torch(graph).eval(), triton_twin(reference).to_torch(graph).eval()]
        grads = [train_step(m, torch.optim.SGD(m.parameters(), lr=0.0), 0, graph) for m in modules]
        for key, value in grads[0].items():
            torch.testing.assert_close(grads[1][key], value, rtol=1e-4, atol=1e-5 * max(1.0, value.abs().max().item()),
                                       msg=f"{name}: d {key}")


def test_triton_outputs_stay_on_the_device_of_the_parameters():
    reference = mpdsl.compile(ROOT / "examples" / "gcn.mp")
    graph = graph_with_inputs(reference)
    module = triton_twin(reference, graph).to_torch(graph)
    out = module(graph)
    assert out.device == next(module.parameters()).device
    # an eager call hands the op the Graph itself: no structure tensors are made for it
    assert graph.cached_only(("torch.edge_index", "cpu")) is None


def test_the_guard_catches_a_host_copy():
    """The guard itself: a step that converts a tensor to NumPy fails."""
    with pytest.raises(HostCopyError, match="Tensor.numpy"), no_host_copies():
        torch.ones(3).numpy()
    with pytest.raises(HostCopyError, match="torch.from_numpy"), no_host_copies():
        torch.from_numpy(np.ones(3))
    model = mpdsl.compile(ROOT / "examples" / "gcn.mp")  # the NumPy backend reads host memory: refused
    graph = graph_with_inputs(model)
    module = model.to_torch(graph)
    with pytest.raises(HostCopyError), no_host_copies():
        module(graph)


# ---- the NumPy backend: zero copies ---------------------------------------------------------------


def test_numpy_backend_reads_the_parameters_and_inputs_in_place(monkeypatch):
    model = mpdsl.compile(ROOT / "examples" / "gcn.mp")
    graph = graph_with_inputs(model)
    module = model.to_torch(graph)
    x = torch.from_numpy(np.asarray(graph["x"], dtype=np.float32).copy())
    seen: dict[str, int] = {}
    original = model.backend.run

    def recording(program, graph, inputs, params, dims, **kwargs):
        seen.update({n: a.__array_interface__["data"][0] for n, a in {**inputs, **params}.items()})
        return original(program, graph, inputs, params, dims, **kwargs)

    monkeypatch.setattr(model.backend, "run", recording)
    projection_loss(module(graph, x=x)).backward()
    for name, p in module.named_parameters():
        assert seen[name] == p.data_ptr(), f"parameter {name} was copied"
    assert seen["x"] == x.data_ptr(), "the input x was copied"


# ---- calls in PyG's style -------------------------------------------------------------------------


def test_tensor_only_call_equals_the_graph_call():
    model = mpdsl.compile(ROOT / "examples" / "gine.mp", dtype="float64", seed=3)
    graph = graph_with_inputs(model)
    module = model.to_torch(graph).eval()
    expected = module(graph)
    tensors = {n: torch.from_numpy(np.array(graph[n])) for n in model.input_types}
    edge_index = torch.from_numpy(np.array(graph.edge_index))
    batch = torch.from_numpy(np.array(graph["batch"]))
    got = module(edge_index=edge_index, batch=batch, num_graphs=graph.num_graphs, **tensors)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    again = module(edge_index=edge_index.clone(), batch=batch.clone(), **tensors)  # equal contents: same graph
    torch.testing.assert_close(again, expected, rtol=1e-12, atol=0)
    assert graph_of([edge_index.clone(), batch.clone()], graph.num_nodes) is graph_of([edge_index, batch],
                                                                                        graph.num_nodes)


def test_pyg_data_call_uses_its_tensors():
    pyg_data = pytest.importorskip("torch_geometric.data")
    model = mpdsl.compile(ROOT / "examples" / "gcn.mp", dtype="float64", seed=3)
    graph = graph_with_inputs(model)
    module = model.to_torch(graph).eval()
    data = pyg_data.Data(x=torch.from_numpy(np.array(graph["x"])), edge_index=torch.from_numpy(np.array(graph.edge_index)))
    torch.testing.assert_close(module(data), module(graph), rtol=1e-12, atol=0)


# ---- torch.compile and torch.export ---------------------------------------------------------------


def compiled_case(name: str):
    model = mpdsl.compile(ROOT / "examples" / f"{name}.mp", dtype="float64", seed=4)
    graph = graph_with_inputs(model)
    module = model.to_torch(graph).eval()
    kwargs = {n: torch.from_numpy(np.array(graph[n])) for n in model.input_types}
    kwargs["edge_index"] = torch.from_numpy(np.array(graph.edge_index))
    if any(t.domain.name == "GRAPH" for t in [v.type for v in model.ir.values]):
        kwargs["batch"] = torch.from_numpy(np.array(graph["batch"]))
        kwargs["num_graphs"] = graph.num_graphs
    return module, kwargs


def outputs_and_grads(module, call, kwargs):
    module.zero_grad()
    out = call(**kwargs)
    projection_loss(out).backward()
    flat = out if isinstance(out, torch.Tensor) else torch.cat([o.reshape(-1) for o in out.values()])
    return flat.detach(), {n: p.grad.clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("name", COMPILED_EXAMPLES)
@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_torch_compile_equals_eager(name, backend):
    module, kwargs = compiled_case(name)
    expected, expected_grads = outputs_and_grads(module, module, kwargs)
    torch._dynamo.reset()
    compiled = torch.compile(module, backend=backend)
    got, grads = outputs_and_grads(module, compiled, kwargs)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    for key, value in expected_grads.items():
        torch.testing.assert_close(grads[key], value, rtol=1e-10, atol=1e-12, msg=key)


@pytest.mark.parametrize("name", COMPILED_EXAMPLES)
def test_torch_export_equals_eager(name):
    module, kwargs = compiled_case(name)
    expected, expected_grads = outputs_and_grads(module, module, kwargs)
    exported = torch.export.export(module, (), kwargs)
    assert any("mpdsl.run" in str(node.target) for node in exported.graph.nodes)
    runnable = exported.module()
    runnable.zero_grad()  # its parameters may be the module's own
    out = runnable(**kwargs)
    flat = out if isinstance(out, torch.Tensor) else torch.cat([o.reshape(-1) for o in out.values()])
    torch.testing.assert_close(flat.detach(), expected, rtol=1e-10, atol=1e-12)
    params = dict(runnable.named_parameters())
    projection_loss(out).backward()
    for key, value in expected_grads.items():
        torch.testing.assert_close(params[key].grad, value, rtol=1e-10, atol=1e-12, msg=key)


def test_saved_export_loads_in_a_fresh_process(tmp_path):
    module, kwargs = compiled_case("gcn")
    expected = module(**kwargs).detach()
    torch.export.save(torch.export.export(module, (), kwargs), tmp_path / "gcn.pt2")
    torch.save({"kwargs": kwargs, "expected": expected}, tmp_path / "case.pt")
    script = (
        "import sys, torch, mpdsl.torch_module\n"
        "case = torch.load(sys.argv[2])\n"
        "out = torch.export.load(sys.argv[1]).module()(**case['kwargs'])\n"
        "torch.testing.assert_close(out, case['expected'], rtol=1e-10, atol=1e-12)\n"
        "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "gcn.pt2"), str(tmp_path / "case.pt")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_training_mode_compiles_with_dropout_and_batch_norm():
    model = mpdsl.compile(ROOT / "examples" / "gine.mp", dtype="float64", seed=5)
    graph = graph_with_inputs(model)
    module = model.to_torch(graph).train()
    kwargs = {n: torch.from_numpy(np.array(graph[n])) for n in model.input_types}
    kwargs.update(edge_index=torch.from_numpy(np.array(graph.edge_index)),
                  batch=torch.from_numpy(np.array(graph["batch"])), num_graphs=graph.num_graphs)
    statistics = {n: b.clone() for n, b in module.named_buffers()}
    torch.manual_seed(0)
    expected, expected_grads = outputs_and_grads(module, module, kwargs)
    eager_statistics = {n: b.clone() for n, b in module.named_buffers()}
    for name, value in statistics.items():
        getattr(module, name).copy_(value)
    torch._dynamo.reset()
    torch.manual_seed(0)
    got, grads = outputs_and_grads(module, torch.compile(module, backend="eager"), kwargs)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    for key, value in expected_grads.items():
        torch.testing.assert_close(grads[key], value, rtol=1e-10, atol=1e-12, msg=key)
    for key, value in eager_statistics.items():
        torch.testing.assert_close(getattr(module, key), value, rtol=1e-12, atol=0, msg=key)


# ---- precision ------------------------------------------------------------------------------------


def assert_half_close(half: torch.Tensor, single: torch.Tensor, what: str) -> None:
    error = (half.float() - single.float()).abs().max().item()
    scale = max(single.abs().max().item(), 1e-6)
    assert error <= HALF_TOLERANCE * scale, f"{what}: max error {error:.3g} against max {scale:.3g}"


@pytest.mark.parametrize("name", ["gcn", "gat", "sage_max"])
def test_half_and_autocast_on_triton_equal_float32(name):
    reference = mpdsl.compile(ROOT / "examples" / f"{name}.mp", seed=6)
    graph = graph_with_inputs(reference)
    module = triton_twin(reference, graph).to_torch(graph).eval()
    single, single_grads = outputs_and_grads(module, lambda: module(graph), {})
    with torch.autocast("cpu", dtype=torch.float16):
        half, half_grads = outputs_and_grads(module, lambda: module(graph), {})
    assert half.dtype == torch.float16
    assert_half_close(half, single, f"{name} autocast output")
    for key, value in single_grads.items():
        assert half_grads[key].dtype == torch.float32  # the parameters' own dtype
        assert_half_close(half_grads[key], value, f"{name} autocast d {key}")
    module.half()
    out = module(graph)
    assert out.dtype == torch.float16 and next(module.parameters()).dtype == torch.float16
    assert_half_close(out.detach(), single, f"{name} .half() output")


def test_numpy_backend_refuses_half_precision():
    model = mpdsl.compile(ROOT / "examples" / "gcn.mp")
    graph = graph_with_inputs(model)
    module = model.to_torch(graph)
    with pytest.raises(BackendError, match="computes in float32 or float64"):
        module.half()(graph)
    module.float()
    with pytest.raises(BackendError, match="computes in float32 or float64"), torch.autocast("cpu", dtype=torch.bfloat16):
        module(graph)


# ---- bad calls ------------------------------------------------------------------------------------


def test_bad_calls_get_one_clear_message():
    model = mpdsl.compile(ROOT / "examples" / "gcn.mp")
    graph = graph_with_inputs(model)
    module = model.to_torch(graph)
    x = torch.from_numpy(np.asarray(graph["x"], dtype=np.float32))
    edge_index = torch.from_numpy(np.array(graph.edge_index))
    with pytest.raises(InputError, match="needs a graph"):
        module(x=x)
    with pytest.raises(InputError, match="edge_index has dtype"):
        module(x=x, edge_index=edge_index.float())
    with pytest.raises(InputError, match=r"edge_index has shape \[3"):
        module(x=x, edge_index=torch.zeros((3, 4), dtype=torch.int64))
    with pytest.raises(InputError, match="is on meta but the module is on cpu"):
        module(x=x.to("meta"), edge_index=edge_index)
    with pytest.raises(InputError, match="has no input named y2"):
        module(x=x, edge_index=edge_index, y2=x)
    with pytest.raises(InputError, match="is nan"):
        module(x=torch.full_like(x, float("nan")), edge_index=edge_index)
    with pytest.raises(mpdsl.GraphError):
        module(x=x, edge_index=edge_index + graph.num_nodes)
    with pytest.raises(InputError, match="has 3 rows but the graph has"):
        module(x=x[:3], edge_index=edge_index, num_nodes=graph.num_nodes)


# ---- on a CUDA device (skipped without one) ---------------------------------------------------------


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", COMPILED_EXAMPLES + ["sage_max", "gated_gcn"])
def test_cuda_training_step_matches_numpy(name):
    """Eval mode (no dropout: masks drawn on two devices differ), three SGD steps, no host copy after
    the first."""
    reference = mpdsl.compile(ROOT / "examples" / f"{name}.mp", dtype="float64", seed=1)
    graph = graph_with_inputs(reference, nodes=400, edges=3000)
    reference.run(graph)
    cpu = reference.to_torch(graph).eval()
    twin = CompiledModel(reference.ir, TritonBackend(interpret=False), seed=1).load_weights(reference.params)
    cuda = twin.to_torch(graph).eval().to("cuda")
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.01) for m in (cpu, cuda)]
    for step in range(3):
        expected = train_step(cpu, optimizers[0], step, graph)
        if step == 0:
            got = train_step(cuda, optimizers[1], step, graph)
        else:
            with no_host_copies():
                got = train_step(cuda, optimizers[1], step, graph)
        for key, value in expected.items():
            assert got[key].device.type == "cuda"
            torch.testing.assert_close(got[key].cpu(), value, rtol=1e-7, atol=1e-9, msg=f"{name} d {key}")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_compile_and_export(dtype):
    model = CompiledModel(mpdsl.compile(ROOT / "examples" / "gat.mp", seed=6).ir, TritonBackend(interpret=False))
    graph = graph_with_inputs(model, nodes=400, edges=3000)
    module = model.to_torch(graph).eval().to("cuda")
    single = module(graph).detach()
    with torch.autocast("cuda", dtype=dtype):
        half = module(graph)
    assert half.dtype == dtype and half.device.type == "cuda"
    assert_half_close(half.detach(), single, f"autocast {dtype}")
    kwargs = {"x": torch.from_numpy(np.asarray(graph["x"], np.float32)).cuda(),
              "edge_index": torch.from_numpy(np.array(graph.edge_index)).cuda()}
    torch._dynamo.reset()
    compiled = torch.compile(module)
    torch.testing.assert_close(compiled(**kwargs), module(**kwargs), rtol=1e-5, atol=1e-6)
    exported = torch.export.export(module, (), kwargs)
    torch.testing.assert_close(exported.module()(**kwargs), module(**kwargs), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("compiled_programs", [True, False], ids=["one-c-function", "op-by-op"])
def test_a_retained_graph_runs_its_backward_twice(compiled_programs):
    """An eager call keeps its residuals on the autograd context (NumPy arrays, not op outputs): a
    graph retained for a second backward reads them again, and each backward adds the same gradient."""
    from mpdsl.backends.numpy_backend import NumpyBackend
    model = mpdsl.compile(ROOT / "examples" / "gine.mp", dtype="float64")
    model.backend = NumpyBackend(compiled_programs=compiled_programs)
    graph = graph_with_inputs(model)
    module = model.to_torch(graph)
    out = module(graph)
    loss = sum((o ** 2).sum() for o in (out.values() if isinstance(out, dict) else [out]))
    loss.backward(retain_graph=True)
    first = {name: p.grad.clone() for name, p in module.named_parameters()}
    loss.backward()
    for name, p in module.named_parameters():
        np.testing.assert_allclose(p.grad.numpy(), 2 * first[name].numpy(), rtol=1e-12, err_msg=name)
    assert any(float(g.abs().max()) > 0 for g in first.values())
