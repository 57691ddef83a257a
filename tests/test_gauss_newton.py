"""Exact Gauss-Newton traces (hawq.sensitivity.gauss_newton) against dense Hessians of tiny models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from hawq import HawqError
from hawq.sensitivity import (
    OutputLoss,
    certify_piecewise_linear,
    hessian_traces,
    label_free_loss,
    load_traces,
    save_traces,
)
from hawq.sensitivity.gauss_newton import output_hessian, per_sample_sq_norms
from hawq.sensitivity.traces import PER_SAMPLE_MIN_ROUNDS, per_sample_output_probe


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


CE = OutputLoss(lambda m, b: m(b[0]), lambda o, b: F.cross_entropy(o, b[1]))


class ReluCNN(nn.Module):
    """Every op the certificate must accept: eval BN, max/avg pools, strided/grouped/dilated convs,
    an in-place ReLU straight after a conv, a residual add, flatten and a linear head."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2, stride=2)
        self.c3 = nn.Conv2d(4, 4, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4 * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.max_pool2d(F.relu(self.bn(self.c1(x))), 2)
        z = self.relu(self.c2(y)) + self.c3(F.avg_pool2d(y, 2))
        return self.fc(z.flatten(1))


def relu_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = ReluCNN().double()
    with torch.no_grad():  # non-trivial running statistics
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def image_batches(n: int = 2, size: int = 6, classes: int = 5) -> list:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 3, 16, 16, generator=g, dtype=torch.float64),
             torch.randint(0, classes, (size,), generator=g)) for _ in range(n)]


def dense_block_traces(model: nn.Module, loss_fn, batches: list, names: list[str]) -> dict[str, float]:
    """tr(H_ll) from torch.autograd.functional.hessian of the batch-mean loss, one layer at a time."""
    params = dict(model.named_parameters())
    out = {}
    for name in names:
        w = params[name + ".weight"]

        def f(flat: torch.Tensor, name: str = name, w: torch.Tensor = w) -> torch.Tensor:
            override = {name + ".weight": flat.view(w.shape)}

            def call(*args: torch.Tensor) -> torch.Tensor:  # the model with this layer's weight replaced
                return functional_call(model, override, args)

            return sum(loss_fn.loss(loss_fn.forward(call, b), b) for b in batches) / len(batches)

        out[name] = float(torch.autograd.functional.hessian(f, w.detach().reshape(-1)).diagonal().sum())
    return out


def test_exact_traces_equal_dense_hessian_on_a_relu_cnn() -> None:
    model, batches = relu_cnn(), image_batches()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    got = hessian_traces(model, CE, batches, progress=False)
    want = dense_block_traces(model, CE, batches, ["c1", "c2", "c3", "fc"])
    for name, t in got.items():
        assert t.estimator == "gauss_newton" and t.std_err == 0.0
        # per batch: 5 classes give 4 non-zero directions of the softmax Hessian, plus the per-sample check
        assert t.n == 2 * (4 + 1)
        assert t.mean == pytest.approx(want[name], rel=1e-10), name
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())
    again = hessian_traces(model, CE, batches, progress=False)
    assert {k: v.mean for k, v in again.items()} == {k: v.mean for k, v in got.items()}  # deterministic


def test_exact_traces_for_other_losses_and_sequence_inputs() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.LeakyReLU(0.1), nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 7, 6, generator=g, dtype=torch.float64)  # (batch, tokens, features): ghost norms
    target = torch.randn(4, 7, 3, generator=g, dtype=torch.float64)
    mse = OutputLoss(lambda m, b: m(b[0]), lambda o, b: 0.5 * ((o - b[1]) ** 2).sum() / o.shape[0])
    smooth = OutputLoss(lambda m, b: m(b[0]).mean(1),
                        lambda o, b: F.cross_entropy(o, b[1], label_smoothing=0.1))
    labels = torch.randint(0, 3, (4,), generator=g)
    for loss_fn, batch in ((mse, (x, target)), (smooth, (x, labels))):
        got = hessian_traces(model, loss_fn, [batch], progress=False)
        want = dense_block_traces(model, loss_fn, [batch], ["0", "2", "4"])
        for name, t in got.items():
            assert t.estimator == "gauss_newton"
            assert t.mean == pytest.approx(want[name], rel=1e-10), name


@pytest.mark.parametrize("chunk", [1 << 25, 100])  # 100 elements: one sample per chunk
def test_per_sample_norms_match_per_sample_gradients(chunk: int, monkeypatch) -> None:
    import hawq.sensitivity.gauss_newton as gn

    monkeypatch.setattr(gn, "_CHUNK_ELEMENTS", chunk)
    torch.manual_seed(4)
    for module, x in ((nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2).double(),
                       torch.randn(3, 4, 9, 9, dtype=torch.float64)),
                      # few positions, wide kernel: Gram matrices of positions instead of per-sample gradients
                      (nn.Conv2d(8, 16, 3, padding=1).double(), torch.randn(3, 8, 3, 3, dtype=torch.float64)),
                      (nn.Conv2d(2, 5, 3, padding="valid").double(), torch.randn(3, 2, 5, 5, dtype=torch.float64)),
                      (nn.Linear(5, 4).double(), torch.randn(3, 5, dtype=torch.float64)),
                      (nn.Linear(5, 4).double(), torch.randn(3, 6, 5, dtype=torch.float64))):
        out = module(x)
        grad_out = torch.randn_like(out)
        check_per_sample_norms(module, x, grad_out)


def test_input_cache_reuses_each_layers_input_side_across_backward_passes(monkeypatch) -> None:
    """Every output direction reuses a layer's unfolded input (or its Gram matrix): computed once per
    chunk, the norms unchanged, and nothing kept past the budget."""
    import hawq.sensitivity.gauss_newton as gn

    made = []
    real = gn._input_side
    monkeypatch.setattr(gn, "_input_side", lambda *a: made.append(1) or real(*a))
    monkeypatch.setattr(gn, "_CHUNK_ELEMENTS", 1000)  # several chunks per layer
    torch.manual_seed(6)
    for module, x in ((nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2).double(), torch.randn(5, 4, 9, 9)),
                      (nn.Conv2d(8, 16, 3, padding=1).double(), torch.randn(5, 8, 3, 3)),  # Gram side
                      (nn.Linear(5, 4).double(), torch.randn(5, 5)),  # one position
                      (nn.Linear(5, 4).double(), torch.randn(5, 6, 5))):
        x = x.double()
        out = module(x)
        cache = gn.InputCache(1 << 20)
        for _ in range(3):
            grad_out = torch.randn_like(out)
            want = per_sample_sq_norms(module, x, grad_out)
            assert per_sample_sq_norms(module, x, grad_out, cache=cache, key="l").tolist() == want.tolist()
        chunks = len(cache.store)
        made.clear()
        per_sample_sq_norms(module, x, torch.randn_like(out), cache=cache, key="l")
        assert chunks >= 1 and not made, type(module).__name__  # every chunk came from the cache
        full = gn.InputCache(0)
        per_sample_sq_norms(module, x, torch.randn_like(out), cache=full, key="l")
        assert not full.store and full.left == 0


def check_per_sample_norms(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> None:
    """per_sample_sq_norms against one autograd weight gradient per sample."""
    want = []
    for i in range(x.shape[0]):
        (gw,) = torch.autograd.grad(module(x[i:i + 1]), module.weight, grad_out[i:i + 1])
        want.append(float(gw.square().sum()))
    got = per_sample_sq_norms(module, x, grad_out)
    assert got.tolist() == pytest.approx(want, rel=1e-10), type(module).__name__


def test_embedding_per_sample_norms_count_repeated_ids_and_skip_padding() -> None:
    torch.manual_seed(9)
    ids = torch.tensor([[1, 2, 1, 0, 0], [3, 3, 3, 4, 0], [5, 6, 7, 8, 9]])
    for padding_idx in (None, 0):
        module = nn.Embedding(10, 4, padding_idx=padding_idx).double()
        check_per_sample_norms(module, ids, torch.randn(3, 5, 4, dtype=torch.float64))

def test_certificate_names_the_op_that_breaks_it() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(3, 4)
    reasons = certify_piecewise_linear(model(x), [model[0].weight, model[2].weight, model[4].weight])
    assert reasons[0] is not None and "TanhBackward0" in reasons[0]
    assert reasons[1] is None and reasons[2] is None  # only ReLU and linear maps after them

    lin = nn.Linear(4, 4)
    assert "AddmmBackward0" in certify_piecewise_linear(lin(torch.relu(lin(x))), [lin.weight])[0]  # quadratic
    # linear in the weight, but used twice: one module output does not carry its whole gradient
    assert "more than once" in certify_piecewise_linear(lin(x) + lin(2 * x), [lin.weight])[0]
    bn = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).train()
    assert "NativeBatchNormBackward0" in certify_piecewise_linear(bn(x), [bn[0].weight, bn[2].weight])[0]
    bn.eval()
    assert certify_piecewise_linear(bn(x), [bn[0].weight, bn[2].weight]) == [None, None]
    attn = torch.randn(3, 4)
    q = nn.Linear(4, 4)
    scores = q(attn) @ q(attn).T  # a product of two tensors that depend on the same weight
    assert certify_piecewise_linear(scores, [q.weight])[0] is not None


def test_uncertified_layers_fall_back_to_hutchinson() -> None:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(7)
    batches = [(torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g))]
    got = hessian_traces(model, CE, batches, tol=0.02, max_probes=2000, progress=False)
    want = dense_block_traces(model, CE, batches, ["0", "2", "4"])
    assert got["0"].estimator == "hutchinson" and got["0"].std_err > 0
    assert abs(got["0"].mean - want["0"]) <= 3 * got["0"].std_err
    for name in ("2", "4"):
        assert got[name].estimator == "gauss_newton"
        assert got[name].mean == pytest.approx(want[name], rel=1e-10)
    # a plain callable, or estimator="hutchinson": every layer by Hutchinson's estimator
    for kwargs in ({"loss_fn": lambda m, b: CE(m, b)}, {"loss_fn": CE, "estimator": "hutchinson"}):
        loss_fn = kwargs.pop("loss_fn")
        plain = hessian_traces(model, loss_fn, batches, tol=0.2, progress=False, **kwargs)
        assert {t.estimator for t in plain.values()} == {"hutchinson"}
    with pytest.raises(HawqError, match="estimator must be 'auto' or 'hutchinson'"):
        hessian_traces(model, CE, batches, estimator="exact", progress=False)


def test_train_mode_bn_and_coupled_losses_are_not_exact() -> None:
    model, batches = relu_cnn(), image_batches(n=1)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    got = hessian_traces(model.train(), CE, batches, tol=0.3, progress=False)
    assert got["c1"].estimator == "hutchinson"  # batch statistics depend on c1's weights nonlinearly
    assert got["fc"].estimator == "gauss_newton"  # nothing nonlinear after the head
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())
    coupled = OutputLoss(CE.forward, lambda o, b: torch.logsumexp(o.flatten(), 0))  # mixes samples
    got = hessian_traces(model.eval(), coupled, batches, tol=0.3, progress=False)
    assert {t.estimator for t in got.values()} == {"hutchinson"}
    hess = output_hessian(torch.randn(3, 4, dtype=torch.float64), lambda o: torch.logsumexp(o.flatten(), 0))
    assert isinstance(hess, str) and "couples samples" in hess
    # more outputs per sample than min_probes * layers: output-space probes instead of every direction
    wide = OutputLoss(lambda m, b: m(b[0]).repeat(1, 20), lambda o, b: 0.5 * (o ** 2).sum())
    want = dense_block_traces(model, wide, batches, ["fc"])["fc"]
    got = hessian_traces(model, wide, batches, layers=["fc"], tol=0.3, progress=False)
    assert got["fc"].estimator == "gn_sampled" and 0 < got["fc"].std_err <= 0.3 * got["fc"].mean
    assert abs(got["fc"].mean - want) <= 4 * got["fc"].std_err
    got = hessian_traces(model, wide, batches, layers=["fc"], exact_directions=100, progress=False)
    assert got["fc"].estimator == "gauss_newton"  # the cap raised: 100 outputs (and directions) per sample
    assert got["fc"].mean == pytest.approx(want, rel=1e-10)
    with pytest.raises(HawqError, match="exact_directions"):
        hessian_traces(model, wide, batches, exact_directions=0, progress=False)


def test_label_free_loss_is_exact_at_its_reference_point() -> None:
    from hawq.models.tasks import ClassificationTask

    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    batches = [(torch.randn(8, 5, dtype=torch.float64), torch.zeros(8, dtype=torch.long))]
    loss_fn = label_free_loss(ClassificationTask(), model)
    got = hessian_traces(model, loss_fn, batches, progress=False)
    # residual zero: tr(H_00) = ||J_0||_F^2 / batch even through the tanh
    want = dense_block_traces(model, loss_fn, batches, ["0", "2"])
    for name in ("0", "2"):
        assert got[name].estimator == "gauss_newton"
        assert got[name].mean == pytest.approx(want[name], rel=1e-9)
    # a token model: embedding table, tanh, mean over tokens (all exact at the reference point)
    tokens = nn.Sequential(nn.Embedding(7, 4, padding_idx=0), nn.Tanh(), nn.Linear(4, 3)).double()
    task = ClassificationTask()
    task.forward = lambda m, b: m(b[0]).mean(1)
    ids = torch.tensor([[1, 2, 2, 0], [3, 4, 5, 6], [6, 6, 1, 0]])
    token_loss = label_free_loss(task, tokens)
    got = hessian_traces(tokens, token_loss, [(ids, None)], progress=False)
    want = dense_block_traces(tokens, token_loss, [(ids, None)], ["0", "2"])
    for name in ("0", "2"):
        assert got[name].estimator == "gauss_newton"
        assert got[name].mean == pytest.approx(want[name], rel=1e-9)
    other = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()  # away from the reference
    away = hessian_traces(other, loss_fn, batches, tol=0.3, progress=False)
    assert away["0"].estimator == "hutchinson" and away["2"].estimator == "gauss_newton"


class PositionTokens(nn.Module):
    """Token + position embeddings, as BERT: the position ids are broadcast over the batch (shape (1, T))."""

    def __init__(self, outputs: int = 3) -> None:
        super().__init__()
        self.tok, self.pos, self.head = nn.Embedding(9, 4), nn.Embedding(6, 4), nn.Linear(4, outputs)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1])[None]
        return self.head(torch.relu(self.tok(ids) + self.pos(positions))).mean(1)


def test_layers_whose_dim_0_is_not_the_sample_fall_back() -> None:
    torch.manual_seed(10)
    model = PositionTokens().double()
    ids = torch.tensor([[1, 2, 3, 4, 5], [5, 6, 7, 8, 8], [2, 2, 1, 0, 3]])
    batch = (ids, torch.tensor([0, 2, 1]))
    got = hessian_traces(model, CE, [batch], tol=0.02, max_probes=3000, progress=False)
    want = dense_block_traces(model, CE, [batch], ["tok", "pos", "head"])
    assert got["pos"].estimator == "hutchinson"  # one row of position ids serves every sample
    assert abs(got["pos"].mean - want["pos"]) <= 3 * got["pos"].std_err
    for name in ("tok", "head"):
        assert got[name].estimator == "gauss_newton"
        assert got[name].mean == pytest.approx(want[name], rel=1e-10)


def test_non_finite_outputs_name_the_batch() -> None:
    model, batches = relu_cnn(), image_batches(n=2)
    with pytest.raises(HawqError, match="no batches"):  # not a NaN trace from an empty mean
        hessian_traces(model, CE, [], progress=False)
    bad = [batches[0], (batches[1][0] * float("nan"), batches[1][1])]
    with pytest.raises(HawqError, match="batch 1"):
        hessian_traces(model, CE, bad, progress=False)


def test_traces_json_records_the_estimator(tmp_path) -> None:
    model, batches = relu_cnn(), image_batches(n=1)
    traces = hessian_traces(model, CE, batches, progress=False)
    save_traces(tmp_path / "t.json", traces, {"seed": 0})
    loaded, _ = load_traces(tmp_path / "t.json")
    assert loaded == traces
    text = (tmp_path / "t.json").read_text().replace('"estimator": "gauss_newton"', '"estimator": "magic"')
    (tmp_path / "bad.json").write_text(text)
    with pytest.raises(HawqError, match="invalid estimate"):
        load_traces(tmp_path / "bad.json")


# ---------------------------------------------------------------- sampled output-space probes (gn_sampled)
def dense_gn_traces(model: nn.Module, loss_fn, batches: list, names: list[str]) -> dict[str, float]:
    """tr(J_l^T (d^2 l) J_l) from dense Jacobians of the outputs and the per-sample output Hessians."""
    params = dict(model.named_parameters())
    out = {}
    for name in names:
        w = params[name + ".weight"]
        total = 0.0
        for b in batches:
            def f(flat: torch.Tensor, b=b, name=name, w=w) -> torch.Tensor:
                call = lambda *args: functional_call(model, {name + ".weight": flat.view(w.shape)}, args)  # noqa: E731
                return loss_fn.forward(call, b)
            outputs = f(w.detach().reshape(-1))
            jac = torch.autograd.functional.jacobian(f, w.detach().reshape(-1))
            jac = jac.reshape(outputs.shape[0], -1, w.numel())  # (B, C, P)
            hess, _ = output_hessian(outputs.detach(), lambda o, b=b: loss_fn.loss(o, b))
            total += float(torch.einsum("bcp,bcd,bdp->", jac, hess, jac))
        out[name] = total / len(batches)
    return out


def wide_relu_cnn(classes: int = 12) -> nn.Module:
    torch.manual_seed(0)
    model = ReluCNN(classes).double()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def z_scores(model: nn.Module, loss_fn, batches: list, want: dict[str, float], seeds: int, **kw) -> torch.Tensor:
    zs = []
    for seed in range(seeds):
        got = hessian_traces(model, loss_fn, batches, seed=seed, progress=False, **kw)
        for name, value in want.items():
            t = got[name]
            assert t.estimator == "gn_sampled" and t.n > 0
            if t.std_err <= 1e-9 * abs(value):  # a zero-variance layer (e.g. the head under an isotropic loss)
                assert t.mean == pytest.approx(value, rel=1e-8)
                continue
            zs.append((t.mean - value) / t.std_err)
    return torch.tensor(zs)


def test_sampled_traces_are_unbiased_with_honest_errors() -> None:
    """More classes (12) than the direction cap (3): eval BN, residual sum, strided/grouped convs."""
    model, batches = wide_relu_cnn(), image_batches(n=2, classes=12)
    names = ["c1", "c2", "c3", "fc"]
    # cross-entropy: the analytic softmax factor; a squared error of mixed outputs: eigen-decomposed
    # output Hessians M M^T / B (a diagonal one, as for plain squared errors, skips the decomposition:
    # the 'wide' loss of test_train_mode_bn_and_coupled_losses_are_not_exact)
    mix = torch.randn(12, 12, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    mixed = OutputLoss(CE.forward, lambda o, b: 0.5 * ((o - 1) @ mix).square().sum(1).mean())
    for loss_fn in (CE, mixed):
        want = dense_block_traces(model, loss_fn, batches, names)
        assert want == pytest.approx(dense_gn_traces(model, loss_fn, batches, names), rel=1e-9)
        z = z_scores(model, loss_fn, batches, want, seeds=8, tol=0.1, exact_directions=3)
        assert z.numel() >= 20
        assert float(z.abs().mean()) < 1.5 and float(z.abs().max()) < 5, z


def test_sampled_traces_stop_on_the_usual_rule_and_are_deterministic() -> None:
    model, batches = wide_relu_cnn(), image_batches(n=1, classes=12)
    kw = {"exact_directions": 2, "min_probes": 4, "max_probes": 40, "progress": False}
    loose = hessian_traces(model, CE, batches, tol=0.3, **kw)
    tight = hessian_traces(model, CE, batches, tol=0.03, **kw)
    for name in loose:
        assert loose[name].std_err <= 0.3 * loose[name].mean or loose[name].n >= 40
        assert tight[name].std_err <= 0.03 * tight[name].mean or tight[name].n >= 40
    assert sum(t.n for t in tight.values()) > sum(t.n for t in loose.values())
    assert hessian_traces(model, CE, batches, tol=0.3, **kw) == loose  # same seed, same numbers


def test_saturated_softmax_is_not_read_as_coupled() -> None:
    """A confident softmax has Hessian entries (~1e-31) below the rounding of its O(1) terms; the
    block-diagonality check used to fail on them and send every layer to Hutchinson."""
    logits = torch.tensor([[47.3, -35, -22.4, -23.5]] * 3)
    labels = torch.zeros(3, dtype=torch.long)
    got = output_hessian(logits, lambda o: F.cross_entropy(o, labels))
    assert not isinstance(got, str), got
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():
        model[2].weight.mul_(60)
        model[2].bias.copy_(torch.tensor([60.0, -40.0, -25.0, -20.0]))
    batches = [(torch.randn(6, 5), torch.zeros(6, dtype=torch.long))]
    assert float(torch.softmax(model(batches[0][0]).detach(), -1).max(-1).values.min()) > 1 - 1e-6
    exact = hessian_traces(model, CE, batches, progress=False)
    assert {t.estimator for t in exact.values()} == {"gauss_newton"}
    sampled = hessian_traces(model, CE, batches, exact_directions=2, progress=False)
    assert {t.estimator for t in sampled.values()} == {"gn_sampled"}
    assert all(math.isfinite(t.mean) and t.mean >= 0 for t in sampled.values())


def tanh_mlp(seed: int = 5) -> tuple[nn.Module, list]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        model[0].weight.mul_(2)
    x = torch.randn(16, 4, dtype=torch.float64)
    return model, [(x, 5 * torch.sign(torch.randn(16, 3, dtype=torch.float64)))]


MSE = OutputLoss(lambda m, b: m(b[0]), lambda o, b: 0.5 * ((o - b[1]) ** 2).sum(1).mean())


def test_gauss_newton_curvature_on_smooth_layers() -> None:
    model, batches = tanh_mlp()
    want = dense_gn_traces(model, MSE, batches, ["0", "2"])
    got = hessian_traces(model, MSE, batches, curvature="gauss_newton", progress=False)
    for name in ("0", "2"):  # the tanh layer is not certified, but its Gauss-Newton trace is exact
        assert got[name].estimator == "gauss_newton" and got[name].curvature == "gauss_newton"
        assert got[name].mean == pytest.approx(want[name], rel=1e-10)
    gelu = nn.Sequential(nn.Linear(4, 5), nn.GELU(), nn.Linear(5, 7)).double()
    with torch.no_grad():
        gelu[2].weight.mul_(3)
    labels = [(batches[0][0], torch.arange(16) % 7)]
    want = dense_gn_traces(gelu, CE, labels, ["0", "2"])
    z = []
    for seed in range(6):
        got = hessian_traces(gelu, CE, labels, curvature="gauss_newton", exact_directions=2, tol=0.1, seed=seed,
                             progress=False)
        for name in ("0", "2"):
            assert got[name].estimator == "gn_sampled" and got[name].mean > 0
            z.append((got[name].mean - want[name]) / got[name].std_err)
    assert float(torch.tensor(z).abs().mean()) < 1.5 and max(abs(v) for v in z) < 5
    with pytest.raises(HawqError, match="curvature='gauss_newton' needs"):
        hessian_traces(model, lambda m, b: MSE(m, b), batches, curvature="gauss_newton", progress=False)
    with pytest.raises(HawqError, match="curvature must be"):
        hessian_traces(model, MSE, batches, curvature="psd", progress=False)


def test_significantly_negative_hessian_trace_takes_the_gauss_newton_trace(tmp_path) -> None:
    model, batches = tanh_mlp()
    hessian = dense_block_traces(model, MSE, batches, ["0"])["0"]
    assert hessian < -5  # the tanh's second-order term dominates: an indefinite block
    got = hessian_traces(model, MSE, batches, tol=0.05, progress=False)
    t = got["0"]
    assert t.curvature == "gauss_newton" and t.estimator == "gauss_newton"
    assert t.mean == pytest.approx(dense_gn_traces(model, MSE, batches, ["0"])["0"], rel=1e-10) and t.mean > 0
    assert "significantly negative" in t.note and "Gauss-Newton trace is used" in t.note
    assert got["2"].curvature == "hessian" and not got["2"].note  # certified: Hessian = Gauss-Newton
    save_traces(tmp_path / "t.json", got, {})
    assert load_traces(tmp_path / "t.json")[0] == got
    # without an OutputLoss there is no Gauss-Newton trace: the Hessian estimate stays (the search
    # then uses its magnitude)
    plain = hessian_traces(model, lambda m, b: MSE(m, b), batches, tol=0.05, progress=False)
    assert plain["0"].mean < 0 and plain["0"].curvature == "hessian"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_every_estimator_runs_on_cuda() -> None:
    model, batches = wide_relu_cnn(), image_batches(n=2, classes=12)
    cpu_exact = hessian_traces(model, CE, batches, progress=False)
    cpu_sampled = hessian_traces(model, CE, batches, exact_directions=3, tol=0.1, progress=False)
    gpu_batches = [(x.cuda(), y.cuda()) for x, y in batches]
    model.cuda()
    exact = hessian_traces(model, CE, gpu_batches, progress=False)
    sampled = hessian_traces(model, CE, gpu_batches, exact_directions=3, tol=0.1, progress=False)
    for name, t in exact.items():
        assert t.estimator == "gauss_newton" and t.mean == pytest.approx(cpu_exact[name].mean, rel=1e-8)
        s, c = sampled[name], cpu_sampled[name]
        assert s.estimator == "gn_sampled" and abs(s.mean - c.mean) <= 5 * math.hypot(s.std_err, c.std_err)
    smooth, smooth_batches = tanh_mlp()
    smooth.cuda()
    smooth_batches = [(x.cuda(), t.cuda()) for x, t in smooth_batches]
    hess = hessian_traces(smooth, MSE, smooth_batches, tol=0.1, progress=False)  # Hutchinson + the negative rule
    assert hess["0"].curvature == "gauss_newton" and hess["2"].estimator == "gauss_newton"
    gn = hessian_traces(smooth, MSE, smooth_batches, curvature="gauss_newton", exact_directions=1, tol=0.1,
                        progress=False)
    assert {t.estimator for t in gn.values()} == {"gn_sampled"}


def test_sampled_traces_for_token_outputs_with_ignored_tokens() -> None:
    """(B, T, C) outputs, cross-entropy per token with ignored positions: the softmax factor per position."""
    from hawq.sensitivity.gauss_newton import _loss_gradient, softmax_cross_entropy_factor

    torch.manual_seed(4)
    model = nn.Sequential(nn.Embedding(11, 6), nn.ReLU(), nn.Linear(6, 9)).double()
    ids = torch.randint(0, 11, (5, 4), generator=torch.Generator().manual_seed(2))
    labels = torch.randint(0, 9, (5, 4), generator=torch.Generator().manual_seed(3))
    labels[:, -1] = -100  # padding
    tokens = OutputLoss(lambda m, b: m(b[0]), lambda o, b: F.cross_entropy(o.flatten(0, 1), b[1].flatten()))
    batches = [(ids, labels)]
    outputs = model(ids)
    leaf, g = _loss_gradient(outputs, lambda o: tokens.loss(o, batches[0]))
    factor = softmax_cross_entropy_factor(outputs, g, leaf)
    assert factor is not None and float(factor.alpha[:, -1].abs().max()) == 0  # ignored tokens: no curvature
    want = dense_block_traces(model, tokens, batches, ["0", "2"])
    z = z_scores(model, tokens, batches, want, seeds=6, tol=0.1, exact_directions=4)
    assert float(z.abs().mean()) < 1.5 and float(z.abs().max()) < 5, z


def test_exact_columns_trade_backward_passes_for_variance() -> None:
    from hawq.sensitivity.gauss_newton import exact_columns

    flat = torch.full((8, 1000), 1e-3, dtype=torch.float64)  # a random-init softmax: no column stands out
    assert exact_columns(flat, tol=0.1, min_probes=8, cap=64, samples=8) == 0
    peaked = flat * 1e-6
    peaked[:, 0] = 1.0  # a confident net: one column per sample carries almost everything
    assert exact_columns(peaked, tol=0.1, min_probes=8, cap=64, samples=8) == 1
    assert exact_columns(peaked, tol=0.0, min_probes=8, cap=64, samples=8) == 64  # no tolerance: all allowed
    assert exact_columns(torch.zeros(2, 5, dtype=torch.float64), tol=0.1, min_probes=8, cap=64, samples=2) == 0


def test_gauss_newton_control_variate_for_hutchinson_layers() -> None:
    """variance_reduction='gauss_newton': tr(G_ll) from output probes + Hutchinson on H_ll - G_ll only."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 5)).double()
    x, y = torch.randn(24, 8, dtype=torch.float64), torch.randint(0, 5, (24,))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(150):  # fit the batch: a small loss gradient in the outputs, a small residual block
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    batches = [(x, y)]
    want = dense_block_traces(model, CE, batches, ["0"])["0"]
    z, spent = [], {}
    for vr in ("none", "gauss_newton"):
        for seed in range(3):
            got = hessian_traces(model, CE, batches, layers=["0"], tol=0.05, seed=seed, variance_reduction=vr,
                                 progress=False)["0"]
            assert got.estimator == "hutchinson" and got.std_err > 0
            z.append((got.mean - want) / got.std_err)
            spent[vr] = spent.get(vr, 0) + got.n
    assert float(torch.tensor(z).abs().mean()) < 1.5 and max(abs(v) for v in z) < 5, z
    assert spent["gauss_newton"] < spent["none"]  # HVPs plus output-space passes
    with pytest.raises(HawqError, match="variance_reduction='gauss_newton' needs an OutputLoss"):
        hessian_traces(model, lambda m, b: CE(m, b), batches, variance_reduction="gauss_newton", progress=False)


def test_sampled_errors_cover_float32_rounding_on_a_saturated_softmax() -> None:
    """With a confident softmax the exact columns carry nearly all of a layer's trace, so the probe
    spread can fall below the float32 rounding of the backward passes: on the 1000-class ResNet-50 of
    scripts/bench_sensitivity.py (case r50_1000) `fc` had 663.46109 +- 1.2e-6 against the exact path's
    663.46234 (1151 SE). The standard error keeps a floor of ROUNDING_ULPS * eps * |trace|."""
    from hawq.sensitivity.gauss_newton import ROUNDING_ULPS

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 40))
    with torch.no_grad():
        model[4].weight.mul_(200)
    x = torch.randn(16, 16)
    with torch.no_grad():
        y = model(x).argmax(-1)
    assert float(torch.softmax(model(x).detach(), -1).max(-1).values.mean()) > 0.99
    batches = [(x, y)]
    exact = hessian_traces(model, CE, batches, progress=False)
    sampled = hessian_traces(model, CE, batches, exact_directions=4, progress=False)
    for name, t in sampled.items():
        assert exact[name].estimator == "gauss_newton" and t.estimator == "gn_sampled"
        assert t.std_err >= ROUNDING_ULPS * torch.finfo(torch.float32).eps * abs(t.mean) * 0.999
        assert abs(t.mean - exact[name].mean) <= 4 * t.std_err, (name, t, exact[name])


def test_auto_chooses_exact_or_sampled_by_predicted_backward_passes() -> None:
    """Under the direction cap the default costs both: a label-free loss on 48 outputs per sample takes
    the sampled estimate (~8 probes predicted, against 48 exact passes), unbiased against dense Hessian
    blocks; a 10-class head stays exact (9 directions against at least 8 probes, times the margin)."""
    from hawq.models.tasks import ClassificationTask

    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 12), nn.GELU(), nn.Linear(12, 12), nn.Tanh(),
                          nn.Linear(12, 48)).double()
    batches = [(torch.randn(16, 5, dtype=torch.float64), torch.zeros(16, dtype=torch.long))]
    loss_fn = label_free_loss(ClassificationTask(), model)
    names = ["0", "2", "4", "6"]  # cap 2 * 8 * 4 = 64 >= 48 outputs: the exact path is allowed
    want = dense_block_traces(model, loss_fn, batches, names)
    info: dict = {}
    got = hessian_traces(model, loss_fn, batches, tol=0.2, progress=False, info=info)
    choice = info["output_space"]
    assert choice["mode"] == "sampled" and choice["exact_passes"] == 48
    assert choice["sampled_passes_predicted"] * 2 < 48 and "sampled" in choice["why"]
    assert all(got[n].estimator == "gn_sampled" and got[n].n < 48 for n in names)
    z = z_scores(model, loss_fn, batches, want, seeds=6, tol=0.2)
    assert float(z.abs().mean()) < 1.5 and float(z.abs().max()) < 5, z
    # tol 0: no probe count is enough, so the exact path
    exact = hessian_traces(model, loss_fn, batches, tol=0.0, progress=False, info=info)
    assert info["output_space"]["mode"] == "exact"
    for n in names:
        assert exact[n].estimator == "gauss_newton" and exact[n].mean == pytest.approx(want[n], rel=1e-9)
    # a cap the caller names is a budget for exact traces: exact wherever the directions fit it
    named = hessian_traces(model, loss_fn, batches, tol=0.2, exact_directions=48, progress=False, info=info)
    assert info["output_space"]["mode"] == "exact" and "exact_directions=48" in info["output_space"]["why"]
    assert all(named[n].estimator == "gauss_newton" and named[n].mean == exact[n].mean for n in names)
    hessian_traces(model, loss_fn, batches, tol=0.2, exact_directions=47, progress=False, info=info)
    assert info["output_space"]["mode"] == "sampled"

    ten = wide_relu_cnn(10)
    ten_batches = image_batches(n=1, size=32, classes=10)
    info = {}
    got = hessian_traces(ten, CE, ten_batches, tol=0.1, progress=False, info=info)
    assert info["output_space"]["mode"] == "exact" and info["output_space"]["exact_passes"] == 9
    want = dense_block_traces(ten, CE, ten_batches, ["c1", "fc"])
    for n in ("c1", "fc"):
        assert got[n].estimator == "gauss_newton" and got[n].std_err == 0
        assert got[n].mean == pytest.approx(want[n], rel=1e-10)
    # a loose tolerance and min_probes 3 would predict ~3 probes; plans use at least 8: still exact
    loose = hessian_traces(ten, CE, ten_batches, tol=0.3, min_probes=3, progress=False, info=info)
    assert info["output_space"]["mode"] == "exact" and loose["c1"].mean == got["c1"].mean


class TinyAttention(nn.Module):
    """Token embeddings, one softmax-attention head, a residual LayerNorm and a GELU MLP, mean over tokens:
    no layer is piecewise linear (the transformer case of scripts/bench_sensitivity.py, in small)."""

    def __init__(self, outputs: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.q, self.k, self.v = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)
        self.ln = nn.LayerNorm(6)
        self.ff1, self.ff2 = nn.Linear(6, 8), nn.Linear(8, outputs)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        att = torch.softmax(self.q(h) @ self.k(h).transpose(1, 2) / 6 ** 0.5, dim=-1)
        h = self.ln(h + att @ self.v(h))
        return self.ff2(F.gelu(self.ff1(h))).mean(1)


def test_transformer_traces_are_unbiased_on_both_paths() -> None:
    """Softmax attention, LayerNorm, GELU. A label-free loss on 40 outputs: the default picks the sampled
    output-space estimate (cheaper than 40 exact passes) for every layer, unbiased against dense Hessian
    blocks (H = G at the reference point). Cross-entropy: nothing is certified, per-layer Hutchinson +
    Nystrom++ on one graph, unbiased with honest errors too."""
    from hawq.models.tasks import ClassificationTask

    torch.manual_seed(6)
    model = TinyAttention(40).double().eval()
    ids = torch.randint(0, 11, (16, 5), generator=torch.Generator().manual_seed(2))
    task = ClassificationTask()
    task.forward = lambda m, b: m(b[0])
    loss_fn = label_free_loss(task, model)
    names = ["emb", "q", "k", "v", "ff1", "ff2"]
    batches = [(ids, None)]
    want = dense_block_traces(model, loss_fn, batches, names)
    info: dict = {}
    hessian_traces(model, loss_fn, batches, tol=0.2, progress=False, info=info)
    assert info["output_space"]["mode"] == "sampled"
    z = z_scores(model, loss_fn, batches, want, seeds=6, tol=0.2)
    assert z.numel() >= 30  # ff2 (the head) has no variance under this isotropic loss: checked as exact
    assert float(z.abs().mean()) < 1.5 and float(z.abs().max()) < 5, z

    head = TinyAttention(5).double().eval()
    labels = torch.randint(0, 5, (16,), generator=torch.Generator().manual_seed(3))
    ce = OutputLoss(lambda m, b: m(b[0]), lambda o, b: F.cross_entropy(o, b[1]))
    opt = torch.optim.Adam(head.parameters(), 1e-2)
    for _ in range(60):  # partly fitted, as the benchmark's BERT classifier: fewer indefinite blocks
        opt.zero_grad()
        ce(head, (ids, labels)).backward()
        opt.step()
    want = dense_block_traces(head, ce, [(ids, labels)], names)
    want_gn = dense_gn_traces(head, ce, [(ids, labels)], names)
    zs = []
    for seed in range(6):
        got = hessian_traces(head, ce, [(ids, labels)], tol=0.1, seed=seed, progress=False)
        for n in names:
            t = got[n]
            if t.curvature == "gauss_newton":  # an indefinite block (the negative-trace rule): its exact GN trace
                assert want[n] < 0 and t.estimator == "gauss_newton" and "negative" in t.note
                assert t.mean == pytest.approx(want_gn[n], rel=1e-8)
                continue
            if n == "ff2":  # the head is linear in its own weight: certified, exact
                assert t.estimator == "gauss_newton" and t.mean == pytest.approx(want[n], rel=1e-8)
                continue
            assert t.estimator == "hutchinson" and t.std_err > 0, (n, t)
            zs.append((t.mean - want[n]) / t.std_err)
    zs = torch.tensor(zs)
    assert zs.numel() >= 10, zs  # the others went to the negative-trace rule (checked above)
    assert float(zs.abs().mean()) < 1.5 and float(zs.abs().max()) < 5, zs


def test_a_layer_shared_by_the_batch_is_sampled_at_the_batch_level() -> None:
    """Position ids of shape (1, T) give no per-sample norms; on Rademacher output tails the batch-level
    norm is unbiased (independent signs per sample cancel the cross terms), so the label-free sampled path
    measures it too instead of sending it to Hutchinson (MiniLM's position embeddings)."""
    from hawq.models.tasks import ClassificationTask

    torch.manual_seed(11)
    model = PositionTokens(outputs=30).double()
    ids = torch.randint(0, 9, (12, 5), generator=torch.Generator().manual_seed(4))
    task = ClassificationTask()
    task.forward = lambda m, b: m(b[0])
    loss_fn = label_free_loss(task, model)
    batches = [(ids, None)]
    want = dense_block_traces(model, loss_fn, batches, ["tok", "pos", "head"])
    info: dict = {}
    got = hessian_traces(model, loss_fn, batches, tol=0.2, progress=False, info=info)
    assert info["output_space"]["mode"] == "sampled" and info["output_space"]["exact_columns"] == 0
    assert got["pos"].estimator == "gn_sampled" and got["pos"].std_err > 0
    z = z_scores(model, loss_fn, batches, {"pos": want["pos"], "tok": want["tok"]}, seeds=10, tol=0.2)
    assert z.numel() == 20 and float(z.abs().mean()) < 1.5 and float(z.abs().max()) < 5, z
    # with exact directions (a tolerance of 0) the batch-level norm would be biased: Hutchinson again
    exact = hessian_traces(model, loss_fn, batches, tol=0.0, max_probes=8, progress=False)
    assert exact["pos"].estimator == "hutchinson" and exact["tok"].estimator == "gauss_newton"


class SharedHeadNet(nn.Module):
    """A stem and one head conv applied to two feature levels, as RetinaNet's heads run on every FPN level;
    ``series=True`` applies the head to its own output instead (a reuse the certificate must reject)."""

    def __init__(self, series: bool = False) -> None:
        super().__init__()
        self.series = series
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.h = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.c1(x))
        if self.series:
            return self.h(torch.relu(self.h(a))).flatten(1)
        b = F.avg_pool2d(a, 2)
        return torch.cat([self.h(a).flatten(1), self.h(b).flatten(1)], 1)


def test_summed_calls_sq_norms_match_per_sample_gradients() -> None:
    from hawq.sensitivity.gauss_newton import summed_calls_sq_norms

    torch.manual_seed(3)
    model = SharedHeadNet().double()
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    calls = []
    model.h.register_forward_hook(lambda m, args, out: calls.append((args[0].detach(), out)))
    out = model(x)
    cot = torch.randn_like(out)
    grads = torch.autograd.grad(out, [o for _, o in calls], grad_outputs=cot)
    got = summed_calls_sq_norms(model.h, [(xi, g) for (xi, _), g in zip(calls, grads)])
    for i in range(3):  # sample i's own gradient of <out_i, cot_i>, both calls together
        (gw,) = torch.autograd.grad((model(x[i:i + 1]) * cot[i:i + 1]).sum(), model.h.weight)
        assert float(got[i]) == pytest.approx(float(gw.square().sum()), rel=1e-10)


def test_label_free_traces_with_many_outputs_and_a_shared_head_are_sampled_and_unbiased() -> None:
    """1500 outputs per sample (over the 1024 a dense output Hessian may have) under the label-free loss:
    its diagonal output Hessian is factored in O(C) and the head called on two levels sums its calls, so
    both layers are sampled in the output space (RetinaNet's case), against dense Hessian blocks."""
    from hawq.models.tasks import ClassificationTask

    torch.manual_seed(4)
    model = SharedHeadNet().double().eval()
    batches = [(torch.randn(3, 2, 20, 20, dtype=torch.float64), None)]
    loss_fn = label_free_loss(ClassificationTask(), model)
    want = dense_block_traces(model, loss_fn, batches, ["c1", "h"])
    info: dict = {}
    hessian_traces(model, loss_fn, batches, tol=0.1, progress=False, info=info)
    assert info["output_space"]["outputs_per_sample"] == 1500 and info["output_space"]["mode"] == "sampled"
    z = z_scores(model, loss_fn, batches, want, seeds=6, tol=0.1)
    assert float(z.abs().mean()) < 1.5 and float(z.abs().max()) < 5, z
    # the same head applied in series: at the reference point (zero residual) the Hessian is the
    # Gauss-Newton matrix whatever the ops, and the summed calls give the total Jacobian: sampled, unbiased
    series = SharedHeadNet(series=True).double().eval()
    sb = [(torch.randn(3, 2, 20, 20, dtype=torch.float64), None)]
    series_loss = label_free_loss(ClassificationTask(), series)
    z = z_scores(series, series_loss, sb, dense_block_traces(series, series_loss, sb, ["c1", "h"]), seeds=6, tol=0.1)
    assert float(z.abs().mean()) < 1.5 and float(z.abs().max()) < 5, z
    # away from the reference the residual term counts: the weight meeting itself in a product is not
    # certified (Hutchinson), the stem still is
    torch.manual_seed(5)
    away = label_free_loss(ClassificationTask(), SharedHeadNet(series=True).double().eval())
    got = hessian_traces(series, away, sb, tol=0.3, progress=False)
    assert got["h"].estimator == "hutchinson" and got["c1"].estimator == "gn_sampled"


class SmoothTokensAndImage(nn.Module):
    """An Embedding with padding_idx, a SiLU Conv2d on an image and a LayerNorm/GELU MLP: no layer but the
    head is piecewise linear, every layer's samples are independent (per-sample probes apply)."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(9, 4, padding_idx=0)
        self.conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.ln = nn.LayerNorm(7)
        self.ff = nn.Linear(7, 6)
        self.head = nn.Linear(6, classes)

    def forward(self, batch: tuple) -> torch.Tensor:
        ids, image = batch
        tokens = torch.tanh(self.emb(ids)).mean(1)  # (B, 4)
        pixels = F.silu(self.conv(image)).mean((2, 3))  # (B, 3)
        return self.head(F.gelu(self.ff(self.ln(torch.cat([tokens, pixels], 1)))))


def smooth_batches(n: int = 1, size: int = 12) -> list:
    g = torch.Generator().manual_seed(21)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 9, (size, 5), generator=g)
        ids[:, -1] = 0  # padding at the end of every sequence
        image = torch.randn(size, 2, 6, 6, generator=g, dtype=torch.float64)
        out.append(((ids, image), torch.randint(0, 4, (size,), generator=g)))
    return out


SMOOTH_CE = OutputLoss(lambda m, b: m(b[0]), lambda o, b: F.cross_entropy(o, b[1]))


def test_per_sample_output_probes_map_an_independent_weight_probe_per_sample() -> None:
    torch.manual_seed(3)
    lin = nn.Linear(3, 4).double()
    x = torch.randn(5, 6, 3, dtype=torch.float64)  # 6 tokens >= 3 inputs: each v_i is recoverable
    u = per_sample_output_probe(lin, x, seed=11)
    assert u.shape == (5, 6, 4) and torch.equal(u, per_sample_output_probe(lin, x, seed=11))
    vs = [torch.linalg.lstsq(x[i], u[i]).solution.T for i in range(5)]  # u_i = x_i v_i^T
    for v in vs:
        assert torch.allclose(v.abs(), torch.ones_like(v), atol=1e-9)  # +-1 weight probes (no bias)
    assert len({tuple(v.sign().reshape(-1).tolist()) for v in vs}) == 5  # a different probe per sample
    emb = nn.Embedding(9, 4, padding_idx=0)
    ids = torch.tensor([[1, 2, 1, 0], [1, 3, 3, 0]])
    u = per_sample_output_probe(emb, ids, seed=2)
    assert torch.equal(u[0, 0], u[0, 2]) and torch.equal(u[1, 1], u[1, 2])  # one row, one probe in a sample
    assert not torch.equal(u[0, 0], u[1, 0])  # row 1 of sample 0 and of sample 1: independent
    assert (u[:, 3] == 0).all() and set(u[:, :3].unique().tolist()) == {-1.0, 1.0}  # padding: no gradient
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2).double()
    x = torch.randn(3, 4, 7, 7, dtype=torch.float64)
    u = per_sample_output_probe(conv, x, seed=5)
    gen = torch.Generator().manual_seed(5)
    v = torch.randint(0, 2, (3, *conv.weight.shape), generator=gen, dtype=torch.int8).double() * 2 - 1
    for i in range(3):
        want = F.conv2d(x[i:i + 1], v[i], None, conv.stride, conv.padding, conv.dilation, conv.groups)
        assert torch.allclose(u[i:i + 1], want, atol=1e-12)


@pytest.mark.parametrize("n_batches", [1, 2])
def test_per_sample_probes_are_unbiased_with_honest_errors_and_stop_early(n_batches: int) -> None:
    """Embedding (padding_idx), SiLU Conv2d, LayerNorm/GELU Linear left to Hutchinson: each sample its own
    probe (the default), against dense Hessian blocks; the standard error pooled over the samples lets a
    layer stop after a few rounds instead of min_probes shared probes."""
    torch.manual_seed(4)
    model = SmoothTokensAndImage().double().eval()
    batches = smooth_batches(n_batches)
    names = ["emb", "conv", "ff"]
    want = dense_block_traces(model, SMOOTH_CE, batches, names)
    zs, rounds = [], []
    for seed in range(8):
        info: dict = {}
        got = hessian_traces(model, SMOOTH_CE, batches, tol=0.3, seed=seed, progress=False, info=info,
                             variance_reduction="none")  # per-sample probes all the way (no hand-over)
        assert info["per_sample_layers"] == names and got["head"].estimator == "gauss_newton"
        for n in names:
            t = got[n]
            if t.curvature == "gauss_newton":  # the negative-trace rule (an indefinite block)
                assert want[n] < 0
                continue
            assert t.estimator == "hutchinson" and t.std_err > 0
            zs.append((t.mean - want[n]) / t.std_err)
            rounds.append(t.n)
    zs = torch.tensor(zs)
    assert zs.numel() >= 16 and float(zs.abs().mean()) < 1.5 and float(zs.abs().max()) < 5, zs
    again = hessian_traces(model, SMOOTH_CE, batches, tol=0.3, seed=7, progress=False, variance_reduction="none")
    assert again == got  # deterministic under the seed
    shared: dict = {}
    plain = hessian_traces(model, SMOOTH_CE, batches, tol=0.3, seed=7, progress=False, probing="per_layer",
                           variance_reduction="none", info=shared)
    assert "per_sample_layers" not in shared and plain != again
    # the floor: PER_SAMPLE_MIN_ROUNDS rounds of 12 or 24 samples have more degrees of freedom than 8
    # shared probes; 2 samples need more rounds (Welch-Satterthwaite: at most samples * (rounds - 1))
    loose = hessian_traces(model, SMOOTH_CE, batches, tol=10.0, progress=False)
    loose_plain = hessian_traces(model, SMOOTH_CE, batches, tol=10.0, progress=False, probing="per_layer")
    assert [loose[n].n for n in names] == [PER_SAMPLE_MIN_ROUNDS] * 3 and [loose_plain[n].n for n in names] == [8] * 3
    (ids, image), labels = batches[0]
    few = hessian_traces(model, SMOOTH_CE, [((ids[:2], image[:2]), labels[:2])], tol=10.0, progress=False)
    assert all(few[n].n > PER_SAMPLE_MIN_ROUNDS for n in names)
    # with Nystrom++ (the default), a layer still predicting more than 3 * min_probes rounds after its first
    # rounds goes on with shared probes, which may build a sketch; the trial rounds stay counted
    info = {}
    slow = hessian_traces(model, SMOOTH_CE, batches, tol=0.1, progress=False, info=info)
    handed = [n for n in names if n not in info["per_sample_layers"]]
    assert handed and all(slow[n].n >= PER_SAMPLE_MIN_ROUNDS + 8 for n in handed), (handed, slow)


def test_per_sample_probes_only_where_the_samples_are_independent() -> None:
    torch.manual_seed(10)
    # position ids broadcast over the batch: one probe for all samples (the pos table's values serve all)
    model = PositionTokens().double()
    ids = torch.tensor([[1, 2, 3, 4, 5], [5, 6, 7, 8, 8], [2, 2, 1, 0, 3]])
    info: dict = {}
    got = hessian_traces(model, CE, [(ids, torch.tensor([0, 2, 1]))], tol=0.3, progress=False, info=info)
    assert got["pos"].estimator == "hutchinson" and info["per_sample_layers"] == []
    # train-mode BatchNorm couples the samples before it; a loss that mixes samples couples all of them
    cnn, batches = relu_cnn(), image_batches(n=1)
    info = {}
    got = hessian_traces(cnn.train(), CE, batches, tol=0.3, progress=False, info=info)
    assert got["c1"].estimator == "hutchinson" and "c1" not in info["per_sample_layers"]
    coupled = OutputLoss(CE.forward, lambda o, b: torch.logsumexp(o.flatten(), 0))
    info = {}
    hessian_traces(cnn.eval(), coupled, batches, tol=0.3, progress=False, info=info)
    assert info["per_sample_layers"] == []
    # a plain loss callable has no outputs to check the samples with: shared probes
    info = {}
    smooth = SmoothTokensAndImage().double().eval()
    hessian_traces(smooth, lambda m, b: SMOOTH_CE(m, b), smooth_batches(), tol=0.3, progress=False, info=info)
    assert info["per_sample_layers"] == []
