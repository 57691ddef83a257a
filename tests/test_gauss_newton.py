"""Exact Gauss-Newton traces (hawq.sensitivity.gauss_newton) against dense Hessians of tiny models."""

from __future__ import annotations

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

    def __init__(self) -> None:
        super().__init__()
        self.tok, self.pos, self.head = nn.Embedding(9, 4), nn.Embedding(6, 4), nn.Linear(4, 3)

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
