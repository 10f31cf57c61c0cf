"""The Triton backend compiled for a CUDA GPU (skipped without one): the examples and every kernel
variant against the NumPy backend on graphs large enough for many programs per kernel, long loops
(a hub) and several feature blocks; COO atomics; determinism of the CSR kernels; compiled (not
interpreted) kernels. Run: ``python -m pytest tests/test_triton_gpu.py -m gpu``.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

pytestmark = pytest.mark.gpu

import mpdsl  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from mpdsl.backends.triton_backend import TritonBackend  # noqa: E402
from mpdsl.backends.triton_kernels import KERNELS, SegmentReduce  # noqa: E402
from strategies import graphs  # noqa: E402
from test_passes import EXAMPLES, assert_same, random_graph  # noqa: E402
from test_triton import PROPERTY_MODEL, SNIPPETS, fp16_case, reference, to_coo, with_backend  # noqa: E402

GPU = dict(device="cuda", interpret=False)


def big_graph(seed: int = 0, nodes: int = 3000, edges: int = 40000) -> mpdsl.Graph:
    """A hub with thousands of in-edges (long loops), isolated nodes, multi-edges, three graphs."""
    rng = np.random.default_rng(seed)
    src = rng.integers(0, nodes - 50, edges)
    dst = np.where(rng.random(edges) < 0.1, 0, rng.integers(0, nodes - 50, edges))
    src[:20], dst[:20] = 7, 8
    parts = [mpdsl.Graph.from_arrays(np.stack([src, dst]), nodes), random_graph(seed + 1, nodes=30, edges=90, self_loops=True)]
    return mpdsl.Graph.batch(parts)


GRAPH = big_graph()


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_on_gpu_fp32(path):
    model, inputs, expected = reference(path, GRAPH)
    twin = with_backend(model, TritonBackend(poison=True, **GPU))
    assert_same(expected, twin.run(GRAPH, **inputs), f"{path.stem} gpu", rtol=1e-4)


def _fp16_case(source, graph):
    """(fp16 model on the GPU, inputs, NumPy fp32 outputs on the same fp16-rounded data)."""
    return fp16_case(source, graph, GPU)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_on_gpu_fp16(path):
    """Whole models on the small graph: on the big one, fp16 storage of a hub's sums (~1000 terms) loses
    what later layer norms need, in any fp16 implementation (NumPy's included)."""
    graph = random_graph(nodes=30, edges=90, self_loops=True)
    half, inputs, expected = _fp16_case(path, graph)
    assert_same(expected, half.run(graph, **inputs), f"{path.stem} gpu fp16", rtol=2e-2)


@pytest.mark.parametrize("name", sorted(SNIPPETS))
def test_kernel_variants_on_gpu_fp16(name, tmp_path):
    """Each kernel alone on the big graph: fp32 accumulation, one fp16 rounding at the store."""
    source = tmp_path / f"{name}.mp"
    source.write_text(SNIPPETS[name])
    half, inputs, expected = _fp16_case(source, GRAPH)
    assert_same(expected, half.run(GRAPH, **inputs), f"{name} gpu fp16", rtol=1e-2)


@pytest.mark.parametrize("path", [p for p in EXAMPLES if p.stem in ("gat", "gcn", "graph_transformer", "sage_max",
                                                                     "sage_mean", "gated_gcn")], ids=lambda p: p.stem)
def test_coo_atomics_on_gpu(path):
    model, inputs, expected = reference(path, GRAPH)
    arrays, dims = model.bind(GRAPH, inputs)
    backend = TritonBackend(poison=True, **GPU)
    got = backend.run(to_coo(model.optimized_for(dims)[0]), GRAPH, arrays, model.params, dims)
    assert_same(expected, got, f"{path.stem} gpu coo", rtol=1e-4)


@pytest.mark.parametrize("layout", [None, "coo"])
@pytest.mark.parametrize("name", sorted(SNIPPETS))
def test_kernel_variants_on_gpu(name, layout):
    model, inputs, expected = reference(SNIPPETS[name], GRAPH)
    twin = with_backend(model, TritonBackend(poison=True, layout=layout, **GPU))
    assert_same(expected, twin.run(GRAPH, **inputs), f"{name} gpu", rtol=1e-4)


def test_wide_features_and_small_blocks():
    """300 features: several feature blocks, a masked tail; 8-row blocks: many programs."""
    source = "model m(x: node[F], edge_w: edge[]) -> (a: node[F], b: node[F]) " \
             "{ return sum(x[src] * edge_w) by dst, max(x[src]) by dst }"
    model = mpdsl.compile(source, backend="numpy")
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(GRAPH.num_nodes, 300)), rng.normal(size=GRAPH.num_edges)
    expected = model.run(GRAPH, x=x, edge_w=w)
    for blocks in ({}, {"block_rows": 8, "block_features": 32}):
        twin = with_backend(model, TritonBackend(poison=True, **GPU, **blocks))
        assert_same(expected, twin.run(GRAPH, x=x, edge_w=w), f"wide {blocks}", rtol=1e-4)


def test_csr_kernels_are_deterministic_on_gpu():
    model, inputs, _ = reference(EXAMPLES[0], GRAPH)  # gat: attention
    runs = [with_backend(model, TritonBackend(**GPU)).run(GRAPH, **inputs)["out"] for _ in range(3)]
    for other in runs[1:]:
        np.testing.assert_array_equal(runs[0], other)


def test_kernels_are_compiled_not_interpreted():
    from triton.runtime.jit import JITFunction

    (fn,) = KERNELS.get(SegmentReduce("gspmm", "sum", True, 16, 0, "f32"), False).values()
    assert isinstance(fn, JITFunction)


def test_outputs_stay_on_the_device():
    model, inputs, expected = reference(EXAMPLES[0], GRAPH)
    arrays, dims = model.bind(GRAPH, inputs)
    program = model.optimized_for(dims)[0]
    out = TritonBackend(**GPU).run_tensors(program, GRAPH, arrays, model.params, dims)["out"]
    assert out.is_cuda


@settings(max_examples=40, deadline=None)
@given(graph=graphs(max_nodes=200, max_edges=2000))
def test_random_graphs_on_gpu(graph):
    model = mpdsl.compile(PROPERTY_MODEL, backend="numpy", seed=3)
    expected = model.run(graph)
    for layout in (None, "coo"):
        twin = with_backend(model, TritonBackend(poison=True, layout=layout, **GPU))
        assert_same(expected, twin.run(graph), f"random graph {layout}", rtol=1e-4)
