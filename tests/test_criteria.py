"""Sensitivity criteria (hawq.sensitivity.criteria) on small models with known answers."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hawq import HawqError
from hawq.search import weight_perturbations
from hawq.sensitivity import OutputLoss
from hawq.sensitivity import criteria as C


def _mse_setup(seed: int = 0, n: int = 64, d_in: int = 6, d_out: int = 3):
    """A linear least-squares model: loss = 0.5 ||W x - y||^2 per example, averaged."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, d_out, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(d_out, d_in, generator=g))
    x = torch.randn(n, d_in, generator=g) * torch.linspace(0.5, 2.0, d_in)
    y = torch.randn(n, d_out, generator=g)
    loss = OutputLoss(lambda m, b: m(b[0]), lambda out, b: 0.5 * (out - b[1]).pow(2).sum() / out.shape[0])
    return model, loss, [(x[: n // 2], y[: n // 2]), (x[n // 2:], y[n // 2:])], x, y


def test_curvature_criteria_match_the_least_squares_hessian():
    model, loss, batches, x, y = _mse_setup()
    d_out = model[0].weight.shape[0]
    # H of W (row-major) = I_out (x) X^T X / n: trace = d_out * mean ||x||^2, top eigenvalue = top of X^T X / n
    gram = x.double().T @ x.double() / x.shape[0]
    trace = d_out * float(torch.trace(gram))
    lam = float(torch.linalg.eigvalsh(gram)[-1])
    numel = model[0].weight.numel()

    hess = C.hessian_sensitivity(model, loss, batches, ["0"])
    assert set(hess) == {"0"} and hess["0"]["numel"] == numel
    assert hess["0"]["mean"] == pytest.approx(trace, rel=1e-5)

    eig, info = C.eigen_sensitivity(model, loss, batches, ["0"], max_iter=200, tol=1e-6)
    assert eig["0"]["mean"] == pytest.approx(lam * numel, rel=1e-3)
    assert info["0"]["eigenvalue"] == pytest.approx(lam, rel=1e-3) and info["0"]["iterations"] >= 1

    # sampled Fisher of the Gaussian model: E ||eps^T J_i||^2 = d_out ||x_i||^2, the same trace on average
    fisher = C.fisher_sensitivity(model, lambda m, b: m(b[0]), batches * 20, ["0"], C.sampled_gaussian, seed=1)
    assert fisher["0"]["mean"] == pytest.approx(trace, rel=0.15)

    # empirical Fisher: mean over examples of ||r_i x_i^T||^2 = ||r_i||^2 ||x_i||^2, by hand
    with torch.no_grad():
        r = model(x) - y
    by_hand = float((r.double().pow(2).sum(1) * x.double().pow(2).sum(1)).mean())
    emp = C.empirical_fisher_sensitivity(model, loss, batches, ["0"])
    assert emp["0"]["mean"] == pytest.approx(by_hand, rel=1e-5)


def test_every_criterion_gives_finite_values_for_every_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 12, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12 * 4 * 4, 16), nn.ReLU(),
                          nn.Linear(16, 4)).eval()
    layers = ["0", "3", "5"]
    batches = [(torch.randn(8, 1, 6, 6), torch.randint(0, 4, (8,))) for _ in range(2)]
    loss = OutputLoss(lambda m, b: m(b[0]), lambda out, b: F.cross_entropy(out, b[1]))
    results = {
        "hessian": C.hessian_sensitivity(model, loss, batches, layers, max_probes=4, min_probes=2),
        "eigen": C.eigen_sensitivity(model, loss, batches, layers, max_iter=5)[0],
        "fisher": C.fisher_sensitivity(model, lambda m, b: m(b[0]), batches, layers, C.sampled_cross_entropy),
        "empirical_fisher": C.empirical_fisher_sensitivity(model, loss, batches, layers),
        "qerror": C.qerror_sensitivity(model, layers),
        "alpha": C.alpha_sensitivity(model, layers, min_evals=5)[0],
    }
    modules = dict(model.named_modules())
    for name, sens in results.items():
        assert list(sens) == layers, name
        for layer, entry in sens.items():
            assert set(entry) == {"mean", "numel"}, name
            assert entry["numel"] == modules[layer].weight.numel(), name
            assert math.isfinite(entry["mean"]) and entry["mean"] >= 0, (name, layer)
    assert results["qerror"]["3"]["mean"] == modules["3"].weight.numel()
    with pytest.raises(HawqError, match="unknown layer"):
        C.qerror_sensitivity(model, ["nope"])


def test_power_law_fit_recovers_a_known_exponent():
    rng = np.random.default_rng(0)
    alpha, xmin = 2.5, 1.0
    tail = xmin * (1 - rng.random(4000)) ** (-1 / (alpha - 1))  # inverse-CDF Pareto samples
    bulk = rng.uniform(0.05, xmin, 3000)  # a body below xmin that the KS choice of xmin must cut off
    fit = C.fit_power_law(np.concatenate([bulk, tail]))
    assert fit["alpha"] == pytest.approx(alpha, abs=0.1)
    assert fit["xmin"] == pytest.approx(xmin, rel=0.15)
    assert fit["n"] == 7000 and fit["n_tail"] <= 4200
    with pytest.raises(HawqError, match="positive values"):
        C.fit_power_law(np.array([1.0, 2.0]))


def test_weight_esd_pools_conv_slices_and_alpha_maps_to_sensitivity():
    torch.manual_seed(0)
    w = torch.randn(8, 5, 3, 3)
    esd = C.weight_esd(w)
    by_hand = np.sort(np.concatenate([torch.linalg.svdvals(w[:, :, i, j].double()).pow(2).numpy() / 8
                                      for i in range(3) for j in range(3)]))
    np.testing.assert_allclose(esd, by_hand, rtol=1e-12)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
    sens, info = C.alpha_sensitivity(model, ["0", "2"])
    assert info["0"]["fitted"] and not info["2"]["fitted"]  # 3 eigenvalues: the median of the fitted
    assert info["2"]["alpha"] == info["0"]["alpha"]
    assert sens["0"]["mean"] == pytest.approx(64 * 64 / info["0"]["alpha"])


def test_predicted_loss_increase_is_the_hand_sum():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    perts = weight_perturbations(model, ["0", "1"], [2, 4, 8])
    sens = {"0": {"mean": 3.0, "numel": 24}, "1": {"mean": 0.5, "numel": 12}}
    got = C.predicted_loss_increase(sens, perts, {"0": 2, "1": 8})
    w0 = model[0].weight.detach().double()
    w1 = model[1].weight.detach().double()
    from hawq.quant.quantizers import quantize_weight

    d0 = float((quantize_weight(model[0].weight.detach(), 2, per_channel=True).double() - w0).pow(2).sum())
    d1 = float((quantize_weight(model[1].weight.detach(), 8, per_channel=True).double() - w1).pow(2).sum())
    assert got == pytest.approx(3.0 / 24 * d0 + 0.5 / 12 * d1, rel=1e-12)
    with pytest.raises(HawqError, match="no perturbation"):
        C.predicted_loss_increase(sens, perts, {"0": 3})


def test_split_batch_tuples_and_dicts():
    x, y = torch.arange(6).view(3, 2), torch.arange(3)
    parts = C.split_batch((x, y))
    assert len(parts) == 3 and torch.equal(parts[1][0], x[1:2]) and torch.equal(parts[2][1], y[2:3])
    d = C.split_batch({"input_ids": x, "attention_mask": x + 1})
    assert len(d) == 3 and torch.equal(d[0]["attention_mask"], x[:1] + 1)
    with pytest.raises(HawqError, match="disagree"):
        C.split_batch((x, torch.arange(2)))


def test_alpha_agrees_with_weightwatcher():
    """The built-in fit is weightwatcher's (powerlaw's) method: same alpha on layers with 32+ eigenvalues."""
    ww = pytest.importorskip("weightwatcher")
    import logging

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(32, 48, 3), nn.Flatten(), nn.Linear(96, 64))
    with torch.no_grad():  # heavy-tailed entries give a heavy-tailed spectrum
        for m in (model[0], model[2]):
            m.weight.copy_(torch.distributions.StudentT(2.5).sample(m.weight.shape) * 0.05)
    _, info = C.alpha_sensitivity(model, ["0", "2"])
    details = ww.WeightWatcher(model=model).analyze()
    names = [n for n, _ in model.named_modules()]
    theirs = {names[int(r.layer_id)]: float(r.alpha) for _, r in details.iterrows()}
    for layer in ("0", "2"):
        assert info[layer]["alpha"] == pytest.approx(theirs[layer], rel=1e-4), layer
