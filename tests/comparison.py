"""Helpers shared by the tests that compare mpdsl models with PyTorch / PyG references.

The pattern: build a torch module with seeded non-zero parameters (``build``), copy them into
an mpdsl model under its names and layouts (``a``, ``lin_t``), run both on the same graph and
check that

* the reference output is not trivial (``assert_nontrivial``), so agreeing with it means
  something;
* the two agree to a dtype-dependent tolerance (``assert_close``; ``tolerances``): rtol 1e-10 in
  float64 and 1e-5 in float32, atol scaled by the magnitude of the reference output;
* perturbing any one copied parameter breaks the agreement (``assert_perturbations_detected``),
  so every copied weight matters and the comparison is able to fail.

``compare`` does all three. Outputs are arrays, or dicts of arrays by output name for models
with several (or named) results: the comparison functions take either, and ``as_outputs`` turns a
single-result model's array into ``{"out": array}``.

Importing ``one_torch_thread`` into a test module runs that module's torch on one thread.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest

torch = pytest.importorskip("torch")

DTYPES = ("float32", "float64")
TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}
# (rtol, atol); atol is scaled by the magnitude of the reference output (at least 1).
TOLERANCES = {"float32": (1e-5, 1e-6), "float64": (1e-10, 1e-12)}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The references run on tiny tensors: one intra-op thread is fastest, and avoids stalls of
    tens to hundreds of milliseconds per op when the cores are busy (restored afterwards).
    Autouse in every test module that imports it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------
# Reference modules and their weights


def randomize_(module, seed: int, *, running_var: tuple[float, float] = (0.5, 1.5)) -> None:
    """Fill every parameter of ``module`` with seeded non-zero values (uniform, variance about
    1 / fan_in for matrices, scale 0.5 for vectors and scalars), so that biases, eps, attention
    vectors, skips and priors are exercised too (PyG initialises biases to zero, skips and priors
    to one); likewise the running statistics of every ``BatchNorm1d`` (mean uniform in
    [-0.5, 0.5], variance uniform in ``running_var``)."""
    gen = torch.Generator().manual_seed(seed)

    def symmetric(shape, scale):
        return (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * scale

    def uniform(shape, low, high):
        return torch.rand(shape, generator=gen, dtype=torch.float64) * (high - low) + low

    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            scale = np.sqrt(3.0 / p.shape[-1]) if p.dim() >= 2 else 0.5
            p.copy_(symmetric(p.shape, scale).to(p.dtype))
        for _, m in sorted(module.named_modules()):
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.copy_(uniform(m.running_mean.shape, -0.5, 0.5).to(m.running_mean.dtype))
                m.running_var.copy_(uniform(m.running_var.shape, *running_var).to(m.running_var.dtype))


def build(factory: Callable[[], object], dtype: str, seed: int, **randomize):
    """A torch module from ``factory`` in eval mode, in ``dtype``, with randomized parameters
    (``randomize`` is passed on to ``randomize_``)."""
    torch.manual_seed(seed)
    module = factory()
    module = module.double() if dtype == "float64" else module.float()
    randomize_(module, seed, **randomize)
    return module.eval()


def a(tensor) -> np.ndarray:
    """A parameter as a numpy array (a copy, in the module's dtype)."""
    return tensor.detach().cpu().numpy().copy()


def lin_t(linear) -> np.ndarray:
    """A torch Linear's weight [out, in] as an mpdsl param[in, out]."""
    return a(linear.weight).T.copy()


def heads_t(linear, heads: int) -> np.ndarray:
    """A Linear(in, heads * c) weight as param[in, heads, c] (torch views the output as [.., H, C])."""
    return lin_t(linear).reshape(lin_t(linear).shape[0], heads, -1)


# ------------------------------------------------------------------------------------------------
# Comparison


def as_outputs(result) -> dict[str, np.ndarray]:
    """A model's result as a dict of outputs by name (a single unnamed result is ``"out"``)."""
    return result if isinstance(result, dict) else {"out": result}


def _like(result, want):
    """``result`` in the form of ``want``: a dict of outputs where ``want`` is one."""
    return as_outputs(result) if isinstance(want, dict) else result


def tolerances(want: np.ndarray, dtype: str) -> tuple[float, float]:
    """(rtol, atol) for comparing with ``want``: atol scaled by max |want| (at least 1)."""
    rtol, atol = TOLERANCES[dtype]
    return rtol, atol * max(1.0, float(np.abs(want).max(initial=0.0)))


def assert_close(got, want, dtype: str, what: str) -> None:
    """mpdsl's ``got`` has ``dtype``, the shape of the reference ``want`` and agrees with it to
    ``tolerances`` (a NaN agrees with nothing); dicts must have the same outputs."""
    if isinstance(want, dict):
        assert set(got) == set(want), f"{what}: outputs {sorted(got)} != reference {sorted(want)}"
        for name in want:
            assert_close(got[name], want[name], dtype, f"{what}/{name}")
        return
    assert got.dtype == np.dtype(dtype), f"{what}: mpdsl returned {got.dtype}, expected {dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape} != reference {want.shape}"
    rtol, atol = tolerances(want, dtype)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, equal_nan=False,
                               err_msg=f"{what}: mpdsl disagrees with the reference")


def is_close(got, want, dtype: str) -> bool:
    """Whether ``assert_close`` would accept the values and shapes (dtype aside)."""
    if isinstance(want, dict):
        return set(got) == set(want) and all(is_close(got[k], want[k], dtype) for k in want)
    rtol, atol = tolerances(want, dtype)
    return got.shape == want.shape and bool(np.allclose(got, want, rtol=rtol, atol=atol))


def assert_nontrivial(want, what: str, *, single_row_ok: bool = False) -> None:
    """The reference output is finite and not (nearly) constant, so agreeing with it means
    something. ``single_row_ok``: an output of one row (a graph-level output on a single graph)
    need not vary across rows."""
    if isinstance(want, dict):
        for name, w in want.items():
            assert_nontrivial(w, f"{what}/{name}", single_row_ok=single_row_ok)
        return
    assert np.isfinite(want).all(), f"{what}: reference output is not finite"
    assert np.abs(want).max() > 1e-2, f"{what}: reference output is nearly zero"
    if not (single_row_ok and want.shape[0] == 1):
        assert np.ptp(want, axis=0).max() > 1e-2, f"{what}: reference output is the same for every row"


def assert_perturbations_detected(model, weights: dict[str, np.ndarray], graph, want, dtype: str,
                                  what: str, seed: int = 0, *,
                                  invariant: frozenset[str] = frozenset()) -> None:
    """Perturbing any one parameter must break the agreement: every copied weight matters, and
    the comparison is able to fail. For the parameters in ``invariant``, which the output
    provably does not depend on, it must not. The model gets ``weights`` back afterwards."""
    rng = np.random.default_rng(seed)
    try:
        for name, value in weights.items():
            delta = 0.05 * rng.standard_normal(value.shape) + 0.05
            model.load_weights({**weights, name: value + delta.astype(value.dtype)})
            close = is_close(_like(model(graph), want), want, dtype)
            if name in invariant:
                assert close, f"{what}: the output was expected to be invariant to {name!r}"
            else:
                assert not close, f"{what}: perturbing parameter {name!r} went unnoticed by the comparison"
    finally:
        model.load_weights(weights)


def compare(model, weights, graph, want, dtype: str, what: str, perturb: bool = True, *,
            invariant: frozenset[str] = frozenset()) -> None:
    """Load ``weights`` into ``model``; the reference ``want`` is nontrivial, the model agrees
    with it on ``graph`` and (with ``perturb``) every perturbed parameter breaks the agreement."""
    model.load_weights(weights)
    assert_nontrivial(want, what)
    assert_close(_like(model(graph), want), want, dtype, what)
    if perturb:
        assert_perturbations_detected(model, weights, graph, want, dtype, what, invariant=invariant)
