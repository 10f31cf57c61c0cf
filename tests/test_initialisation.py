"""Parameter initialisation: torch.nn.Linear's rule by default, with fans decided from the program's
use (``mpdsl.initialisation``), glorot per parameter (``= glorot``) and model-wide (``init=``)."""

from pathlib import Path

import numpy as np
import pytest
import torch

import mpdsl
from mpdsl.cli import main
from mpdsl.initialisation import plan

ROOT = Path(__file__).resolve().parents[1]
KARATE = mpdsl.Graph.load(ROOT / "examples" / "data" / "karate.npz")

LINEAR = "dim H = 8\nmodel m(x: node[F], W: param[F, H], b: param[H]) -> node[H] {\n    return x @ W + b\n}\n"


def _linear_params(fan_in: int, width: int, **options):
    return mpdsl.compile(LINEAR, dims={"H": width}, dtype="float64", **options).init(0, F=fan_in).params


@pytest.mark.parametrize("fan_in", [7, 64, 300])
def test_default_weights_and_biases_have_torch_linears_statistics(fan_in):
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for W and b, fan_in the contracted axis: range and variance
    1/(3 fan_in) as the draws of torch.nn.Linear(fan_in, width)."""
    width = 1_000_000 // fan_in
    params = _linear_params(fan_in, width)
    torch.manual_seed(0)
    linear = torch.nn.Linear(fan_in, width).double()
    bound, variance = 1 / np.sqrt(fan_in), 1 / (3 * fan_in)
    for ours, theirs in ((params["W"], linear.weight), (params["b"], linear.bias)):
        theirs = theirs.detach().numpy()
        assert np.abs(ours).max() <= bound and np.abs(theirs).max() <= bound
        assert np.abs(ours).max() >= bound * (1 - 20 / ours.size)  # the largest of n draws is within ~bound / n
        samples = ours.size
        tolerance = 6 * np.sqrt(0.8 / samples)  # 6 standard errors of the variance of a uniform sample
        assert ours.var() == pytest.approx(variance, rel=tolerance)
        assert ours.var() == pytest.approx(theirs.var(), rel=2 * tolerance)
        assert abs(ours.mean()) < 6 * np.sqrt(variance / samples)


def test_typed_and_einsum_weights_take_the_contracted_axis():
    """W[etype] with W param[R, D, K] contracts D; einsum("hd,hde->he", k, W[etype]) contracts d."""
    src = ("model m(x: node[F], t: edge int, W: param[R, F, K], A: param[R, 2, K, E], b: param[K]) -> edge[2, E] {\n"
           "    m = x[src] @ W[t] + b\n"
           "    return einsum(\"hd,hde->he\", reshape(concat(m, m), [2, K]), A[t])\n}\n")
    model = mpdsl.compile(src, dims={"R": 3, "K": 50, "E": 4000}, dtype="float64")
    params = model.init(0, F=20).params
    assert np.abs(params["W"]).max() <= 1 / np.sqrt(20) < np.abs(params["W"]).max() * 1.01
    assert np.abs(params["b"]).max() <= 1 / np.sqrt(20) < np.abs(params["b"]).max() * 1.1
    assert np.abs(params["A"]).max() <= 1 / np.sqrt(50) < np.abs(params["A"]).max() * 1.01
    assert params["A"].var() == pytest.approx(1 / 150, rel=0.02)


def _fan_ins(model, **dims):
    shapes = model.param_shapes(dims)
    return {name: (p.init, p.role, p.fans(shapes)[0]) for name, p in plan(model.ir).items()}


def test_the_fan_in_of_every_parameter_of_the_examples():
    gcn = mpdsl.compile(ROOT / "examples" / "gcn.mp")
    assert _fan_ins(gcn, F=34) == {"W1": ("torch", "weight", 34), "b1": ("torch", "bias", 34),
                                   "W2": ("torch", "weight", 16), "b2": ("torch", "bias", 16)}
    gat = mpdsl.compile(ROOT / "examples" / "gat.mp")
    assert _fan_ins(gat, F=5) == {
        "W1": ("torch", "weight", 5), "a_src1": ("glorot", "other", 8), "a_dst1": ("glorot", "other", 8),
        "b1": ("torch", "bias", 5), "W2": ("torch", "weight", 64), "a_src2": ("glorot", "other", 8),
        "a_dst2": ("glorot", "other", 8), "b2": ("torch", "bias", 64)}
    gine = mpdsl.compile(ROOT / "examples" / "gine.mp")
    fans = _fan_ins(gine, F=9, Fe=3)
    first_layer = ("eps1", "W_e1", "b_e1", "W11", "b11", "W12", "b12", "mean1", "var1", "gamma1", "beta1")
    assert {k: fans[k] for k in (*first_layer, "W_out", "b_out")} == {
        "eps1": ("0.0", "other", 1), "W_e1": ("torch", "weight", 3), "b_e1": ("torch", "bias", 3),
        "W11": ("torch", "weight", 9), "b11": ("torch", "bias", 9), "W12": ("torch", "weight", 32),
        "b12": ("torch", "bias", 32), "mean1": ("zeros", "running_mean", 16), "var1": ("ones", "running_var", 16),
        "gamma1": ("ones", "gamma", 16), "beta1": ("zeros", "beta", 16),
        "W_out": ("torch", "weight", 16), "b_out": ("torch", "bias", 16)}
    rgcn = mpdsl.compile(ROOT / "examples" / "rgcn.mp")
    assert _fan_ins(rgcn, F=6) == {
        "W1": ("torch", "weight", 6), "root1": ("torch", "weight", 6), "b1": ("torch", "bias", 6),
        "W2": ("torch", "weight", 16), "root2": ("torch", "weight", 16), "b2": ("torch", "bias", 16)}
    mpnn = mpdsl.compile(ROOT / "examples" / "mpnn.mp")
    assert _fan_ins(mpnn, F=9, Fe=3) == {
        "W0": ("torch", "weight", 9), "b0": ("torch", "bias", 9),
        "We1": ("torch", "weight", 3), "be1": ("torch", "bias", 3),
        "We2": ("torch", "weight", 16), "be2": ("torch", "bias", 16),
        "W_root": ("torch", "weight", 8), "b_conv": ("torch", "bias", 8),
        "W_ih": ("torch", "weight", 8), "W_hh": ("torch", "weight", 8),
        "b_ih": ("zeros", "bias", 8), "b_hh": ("zeros", "bias", 8),
        "Wr1": ("torch", "weight", 8), "br1": ("torch", "bias", 8),
        "Wr2": ("torch", "weight", 16), "br2": ("torch", "bias", 16)}


def test_a_bias_follows_the_latest_product_it_is_added_to():
    """h + z @ O + b (a residual): b is O's bias, not the bias of the product that made h."""
    src = ("model m(x: node[F], W: param[F, H], O: param[H * 4, H], c: param[H], b: param[H]) -> node[H] {\n"
           "    h = x @ W + c\n"
           "    return h + concat(h, h, h, h) @ O + b\n}\n")
    fans = _fan_ins(mpdsl.compile(src, dims={"H": 5}), F=3)
    assert fans["c"] == ("torch", "bias", 3) and fans["b"] == ("torch", "bias", 20)


def test_written_initialisers_win_and_glorot_stays_selectable():
    src = ("model m(x: node[F], W: param[F, H] = glorot, b: param[H] = 0.5, V: param[H, H], c: param[H]) "
           "-> node[H] {\n    return (x @ W + b) @ V + c\n}\n")
    params = mpdsl.compile(src, dims={"H": 400}, dtype="float64").init(0, F=300).params
    glorot = np.sqrt(6 / 700)
    assert np.abs(params["W"]).max() <= glorot < 1.01 * np.abs(params["W"]).max()
    assert np.all(params["b"] == 0.5)
    assert np.abs(params["V"]).max() <= 1 / np.sqrt(400) < 1.01 * np.abs(params["V"]).max()
    assert np.abs(params["c"]).max() <= 1 / np.sqrt(400) < 1.1 * np.abs(params["c"]).max()


def test_the_model_wide_glorot_gives_glorot_weights_and_zero_biases():
    params = _linear_params(300, 400, init="glorot")
    glorot = np.sqrt(6 / 700)
    assert np.abs(params["W"]).max() <= glorot < 1.01 * np.abs(params["W"]).max()
    assert np.all(params["b"] == 0)
    written = ("model m(x: node[F], W: param[F, H] = torch, b: param[H] = torch) -> node[H] {\n"
               "    return x @ W + b\n}\n")
    params = mpdsl.compile(written, dims={"H": 400}, init="glorot").init(0, F=300).params
    assert np.abs(params["W"]).max() <= 1 / np.sqrt(300) < 1.01 * np.abs(params["W"]).max()
    assert np.abs(params["b"]).max() <= 1 / np.sqrt(300) and params["b"].std() > 0
    model = mpdsl.compile(LINEAR, dims={"H": 4})
    torch_values = model.init(3, F=5).params["W"].copy()
    model.default_init = "glorot"
    assert not np.array_equal(model.init(3, F=5).params["W"], torch_values)
    model.default_init = "torch"
    np.testing.assert_array_equal(model.init(3, F=5).params["W"], torch_values)


def test_batch_norm_and_layer_norm_parameters_start_as_torchs():
    src = ("model m(x: node[F], W: param[F, H], mu: param[H], var: param[H], g: param[H], s: param[H],\n"
           "        lg: param[H], ls: param[H], lg2: param[H] = 2.0) -> node[H] {\n"
           "    h = batch_norm(x @ W, mu, var, g, s)\n"
           "    return layer_norm(layer_norm(h, lg, ls), lg2, ls)\n}\n")
    params = mpdsl.compile(src, dims={"H": 3}).init(0, F=4).params
    expected = {"mu": 0, "var": 1, "g": 1, "s": 0, "lg": 1, "ls": 0, "lg2": 2}
    assert {k: params[k].tolist() for k in expected} == {k: [float(v)] * 3 for k, v in expected.items()}


def test_bad_initialiser_names_are_located_errors_with_a_hint():
    with pytest.raises(mpdsl.CompileError, match="unknown initializer 'torhc'") as err:
        mpdsl.compile("model m(x: node[F], W: param[F, F] = torhc) -> node[F] {\n    return x @ W\n}\n")
    assert err.value.span.line == 1 and err.value.span.col == 21 and "did you mean 'torch'" in str(err.value)
    layer = ("layer l(h: node[D], g: param[D] = onez) -> node[D] {\n    return h * g\n}\n"
             "model m(x: node[F], g: param[F]) -> node[F] {\n    return l(x, g)\n}\n")
    with pytest.raises(mpdsl.CompileError, match="unknown initializer 'onez'") as err:
        mpdsl.compile(layer)
    assert err.value.span.line == 1 and "did you mean 'ones'" in str(err.value)
    with pytest.raises(mpdsl.CompileError, match="input 'h' cannot have an initializer"):
        mpdsl.compile(layer.replace("h: node[D]", "h: node[D] = zeros").replace("= onez", ""))
    with pytest.raises(mpdsl.MpdslError, match="unknown model-wide initialiser 'glorrot'") as err:
        mpdsl.compile(LINEAR, init="glorrot")
    assert "did you mean 'glorot'" in str(err.value)
    model = mpdsl.compile(LINEAR)
    with pytest.raises(mpdsl.MpdslError, match="unknown model-wide initialiser 'xavier'"):
        model.default_init = "xavier"


def test_the_command_line_takes_init(tmp_path, capsys):
    program = tmp_path / "linear.mp"
    program.write_text(LINEAR)
    weights = tmp_path / "w.npz"
    assert main(["run", str(program), "--graph", str(ROOT / "examples" / "data" / "karate.npz"),
                 "--init", "glorot", "--save-weights", str(weights)]) == 0
    assert np.all(np.load(weights)["b"] == 0)
    assert main(["run", str(program), "--graph", str(ROOT / "examples" / "data" / "karate.npz"),
                 "--save-weights", str(weights)]) == 0
    assert np.load(weights)["b"].std() > 0
    assert main(["run", str(program), "--graph", "g.npz", "--init", "xavier"]) == 2
    assert "invalid choice: 'xavier'" in capsys.readouterr().err
