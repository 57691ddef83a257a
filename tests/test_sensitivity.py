"""hawq.sensitivity against exact Hessians of tiny models (torch.autograd.functional.hessian)."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.func import functional_call

from hawq import HawqError
from hawq.sensitivity import (
    NystromSketch,
    OutputLoss,
    TraceEstimate,
    batches_fingerprint,
    control_variate_samples,
    hessian_traces,
    label_free_loss,
    load_traces,
    plot_density,
    rademacher_like,
    save_traces,
    spectral_density,
    top_eigenvalues,
    traces_cache_key,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models: extra threads only add synchronisation (and steal cores from parallel jobs)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def ce_loss(model: nn.Module, batch) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


CE_OUTPUTS = OutputLoss(lambda m, b: m(b[0]), lambda o, b: F.cross_entropy(o, b[1]))  # exact traces where possible


def make_mlp(act: nn.Module | None = None) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), act or nn.Tanh(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).double()


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 4, 3, stride=2)
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.bn1(self.conv1(x)))
        x = torch.tanh(self.conv2(x))
        return self.fc(x.flatten(1))


def make_cnn() -> nn.Module:
    torch.manual_seed(1)
    return TinyCNN().double()


def mlp_batches(n: int = 3, size: int = 8, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (size,), generator=g))
            for _ in range(n)]


def cnn_batches(n: int = 2, size: int = 6) -> list:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(size, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (size,), generator=g))
            for _ in range(n)]


def exact_hessian(model: nn.Module, batches: list, names: list[str]) -> torch.Tensor:
    """Hessian of the batch-mean loss w.r.t. the concatenated parameters ``names`` (dense)."""
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    flat0 = torch.cat([params[n].detach().reshape(-1) for n in names])
    buffers = {k: v.clone() for k, v in model.named_buffers()}

    def f(flat: torch.Tensor) -> torch.Tensor:
        override = {n: p.view(s) for n, p, s in zip(names, flat.split(sizes), shapes)}
        return sum(F.cross_entropy(functional_call(model, override, (x,)), y) for x, y in batches) / len(batches)

    H = torch.autograd.functional.hessian(f, flat0)
    with torch.no_grad():  # the train-mode forwards above updated BatchNorm statistics
        for k, v in model.named_buffers():
            v.copy_(buffers[k])
    return H


def block_traces(H: torch.Tensor, model: nn.Module, names: list[str]) -> list[float]:
    params = dict(model.named_parameters())
    out, start = [], 0
    for n in names:
        k = params[n].numel()
        out.append(float(H[start:start + k, start:start + k].diagonal().sum()))
        start += k
    return out


@pytest.mark.parametrize("kind,probing", [("mlp", "per_layer"), ("mlp", "joint"), ("cnn_eval", "per_layer"),
                                          ("cnn_train", "per_layer")])
def test_traces_match_exact_blocks(kind: str, probing: str) -> None:
    model = make_mlp() if kind == "mlp" else make_cnn()
    batches = mlp_batches() if kind == "mlp" else cnn_batches()
    model.train(kind == "cnn_train")
    layers = ["0", "2", "4"] if kind == "mlp" else ["conv1", "conv2", "fc"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    traces = hessian_traces(model, ce_loss, batches, tol=0.0, max_probes=300, min_probes=300, progress=False,
                            probing=probing)
    assert list(traces) == layers  # layers=None -> quantizable layers in named_modules order
    for k, v in model.state_dict().items():  # weights and BN running stats untouched
        assert torch.equal(v, before[k]), k
    exact = block_traces(exact_hessian(model, batches, [f"{n}.weight" for n in layers]), model,
                         [f"{n}.weight" for n in layers])
    for name, ex in zip(layers, exact):
        t = traces[name]
        assert t.n == 300 and t.numel == dict(model.named_modules())[name].weight.numel()
        assert 0 < t.std_err < abs(ex)
        assert abs(t.mean - ex) <= 3 * t.std_err, (name, t, ex)


def test_std_err_falls_like_inverse_sqrt_probes() -> None:
    model, batches = make_mlp(), mlp_batches()
    small = hessian_traces(model, ce_loss, batches, tol=0.0, max_probes=60, min_probes=60, progress=False)
    large = hessian_traces(model, ce_loss, batches, tol=0.0, max_probes=240, min_probes=240, progress=False)
    for name in small:
        ratio = small[name].std_err / large[name].std_err
        assert 1.5 < ratio < 2.6, (name, ratio)  # 1/sqrt(n): 4x the probes halves the error


def test_nystrom_sketch_exact_for_low_rank_psd() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 3, generator=g, dtype=torch.float64)
    H = a @ a.T  # rank 3: a 6-probe sketch spans its range, so the approximation is H itself
    S = (torch.randint(0, 2, (6, 40), generator=g) * 2 - 1).double()
    sketch = NystromSketch(S, S @ H)
    assert sketch.rank == 3
    assert math.isclose(sketch.trace, float(H.trace()), rel_tol=1e-5)
    v = torch.randn(40, generator=g, dtype=torch.float64)
    assert math.isclose(sketch.quadratic(v), float(v @ H @ v), rel_tol=1e-5)


def test_control_variate_beta_is_predictable_and_adapts() -> None:
    g = torch.Generator().manual_seed(0)
    q = 5.0 + torch.randn(400, generator=g, dtype=torch.float64)
    good = control_variate_samples(q, q - 5.0 + 2.0, trace=2.0)  # c tracks q exactly: zero variance
    assert torch.allclose(good, torch.full_like(q, 5.0))
    noise = 3.0 * torch.randn(400, generator=g, dtype=torch.float64)  # c unrelated to q: beta -> 0
    bad = control_variate_samples(q, noise, trace=0.0)
    assert float(bad[100:].var()) < 1.5 * float(q[100:].var()) < float((q - noise)[100:].var())
    # sample j uses only samples < j: appending more samples never changes the earlier ones
    assert torch.equal(control_variate_samples(q[:50], noise[:50], 0.0), bad[:50])


@pytest.mark.parametrize("kind", ["mlp", "cnn_eval"])
def test_nystrom_traces_unbiased_and_never_worse(kind: str) -> None:
    model = make_mlp() if kind == "mlp" else make_cnn().eval()
    batches = mlp_batches() if kind == "mlp" else cnn_batches()
    layers = ["0", "2", "4"] if kind == "mlp" else ["conv1", "conv2", "fc"]
    kw = dict(tol=0.0, max_probes=160, min_probes=8, seed=2, progress=False)
    cv = hessian_traces(model, ce_loss, batches, variance_reduction="nystrom", **kw)
    plain = hessian_traces(model, ce_loss, batches, variance_reduction="none", **kw)
    exact = block_traces(exact_hessian(model, batches, [f"{n}.weight" for n in layers]), model,
                         [f"{n}.weight" for n in layers])
    for name, ex in zip(layers, exact):
        assert cv[name].n == plain[name].n == 160  # the 8 sketch probes count in n
        # (+ rounding: a sketch of nearly the block's dimension leaves a zero-variance residual)
        assert abs(cv[name].mean - ex) <= 3 * cv[name].std_err + 1e-10 * abs(ex), (name, cv[name], ex)
        assert abs(plain[name].mean - ex) <= 3 * plain[name].std_err, (name, plain[name], ex)
        # same number of Hessian-vector products: never clearly worse (the leave-one-out check keeps
        # plain probes where the sketch would not pay, and beta adapts) ...
        assert cv[name].std_err <= 1.2 * plain[name].std_err, (name, cv[name], plain[name])
    # ... and much better on the last layer, whose block a rank-8 sketch nearly captures
    assert cv[layers[-1]].std_err < 0.5 * plain[layers[-1]].std_err


def test_nystrom_only_for_slow_layers() -> None:
    model, batches = make_mlp(), mlp_batches()
    # loose tolerance: every layer converges on its first 8 plain probes, so nothing switches
    kw = dict(tol=0.5, max_probes=400, min_probes=8, seed=1, progress=False)
    assert hessian_traces(model, ce_loss, batches, variance_reduction="nystrom", **kw) == \
        hessian_traces(model, ce_loss, batches, variance_reduction="none", **kw)
    with pytest.raises(HawqError, match="variance_reduction"):
        hessian_traces(model, ce_loss, batches, variance_reduction="hutch++", progress=False)


def test_stopping_rule_and_determinism() -> None:
    model, batches = make_mlp(), mlp_batches()
    a = hessian_traces(model, ce_loss, batches, tol=0.2, max_probes=2000, min_probes=8, seed=5, progress=False)
    b = hessian_traces(model, ce_loss, batches, tol=0.2, max_probes=2000, min_probes=8, seed=5, progress=False)
    c = hessian_traces(model, ce_loss, batches, tol=0.2, max_probes=2000, min_probes=8, seed=6, progress=False)
    assert a == b  # bit-identical under the same seed
    assert a != c
    floor = 0.2 * 1e-3 * max(abs(t.mean) for t in a.values())
    for name, t in a.items():
        assert 8 <= t.n < 2000
        assert t.std_err <= max(0.2 * abs(t.mean), floor)
        # a layer's estimate after n probes depends neither on the chunking nor on the other layers
        alone = hessian_traces(model, ce_loss, batches, layers=[name], tol=0.0, max_probes=t.n, min_probes=t.n,
                               seed=5, progress=False)
        assert math.isclose(t.mean, alone[name].mean, rel_tol=1e-12, abs_tol=1e-15)
    assert len({t.n for t in a.values()}) > 1  # layers stop on their own


def test_single_layer_subset_and_float32_model() -> None:
    model = make_mlp().float()
    batches = [(x.float(), y) for x, y in mlp_batches()]
    traces = hessian_traces(model, ce_loss, batches, layers=["2"], tol=0.1, progress=False)
    assert list(traces) == ["2"] and traces["2"].numel == 24 and math.isfinite(traces["2"].mean)


def test_input_errors() -> None:
    model, batches = make_mlp(), mlp_batches()
    with pytest.raises(HawqError, match=r"unknown layer.*'nope'.*valid layers: 0, 2, 4"):
        hessian_traces(model, ce_loss, batches, layers=["nope"], progress=False)
    frozen = make_mlp().requires_grad_(False)
    with pytest.raises(HawqError, match="no parameters that require grad"):
        hessian_traces(frozen, ce_loss, batches, progress=False)
    bad = [batches[0], (batches[1][0] * float("nan"), batches[1][1])]
    with pytest.raises(HawqError, match="non-finite loss.*batch 1"):
        hessian_traces(model, ce_loss, bad, progress=False)

    def inf_grad_loss(m: nn.Module, b) -> torch.Tensor:  # finite loss, infinite gradient (sqrt at 0)
        return ce_loss(m, b) + torch.sqrt((m[0].weight - m[0].weight.detach()).abs()).sum()

    with pytest.raises(HawqError, match="non-finite gradient on batch 0"):
        hessian_traces(model, inf_grad_loss, batches, progress=False)
    with pytest.raises(HawqError, match="no batches"):
        hessian_traces(model, ce_loss, [], progress=False)
    with pytest.raises(HawqError, match="min_probes"):
        hessian_traces(model, ce_loss, batches, min_probes=50, max_probes=10, progress=False)
    with pytest.raises(HawqError, match="tol"):
        hessian_traces(model, ce_loss, batches, tol=float("nan"), progress=False)
    with pytest.raises(HawqError, match="probing"):
        hessian_traces(model, ce_loss, batches, probing="diagonal", progress=False)
    with pytest.raises(HawqError, match="not used by the loss"):
        hessian_traces(model, lambda m, b: F.cross_entropy(m[:3](b[0])[:, :3], b[1]), batches, progress=False)


def test_save_load_roundtrip_and_cache_key(tmp_path) -> None:
    model, batches = make_mlp(), mlp_batches()
    traces = hessian_traces(model, ce_loss, batches, tol=0.2, progress=False)
    key = traces_cache_key(model, batches_fingerprint(batches), {"tol": 0.2, "seed": 0})
    path = tmp_path / "run" / "traces.json"
    save_traces(path, traces, {"cache_key": key, "bn_mode": "eval"})
    loaded, meta = load_traces(path)
    assert loaded == traces and meta["cache_key"] == key and meta["bn_mode"] == "eval"
    assert set(json.loads(path.read_text())) == {"layers", "meta"}
    assert [p.name for p in path.parent.iterdir()] == ["traces.json"]  # no temp file left behind
    # the key changes with the weights, the data and the config, and only then
    assert key == traces_cache_key(make_mlp(), batches_fingerprint(mlp_batches()), {"seed": 0, "tol": 0.2})
    assert key != traces_cache_key(model, batches_fingerprint(mlp_batches(seed=1)), {"tol": 0.2, "seed": 0})
    assert key != traces_cache_key(model, batches_fingerprint(batches), {"tol": 0.1, "seed": 0})
    other = make_mlp()
    with torch.no_grad():
        other[4].weight[0, 0] += 1e-6
    assert key != traces_cache_key(other, batches_fingerprint(batches), {"tol": 0.2, "seed": 0})
    (tmp_path / "bad.json").write_text('{"layers": {"fc": {"mean": 1.0}}}')
    with pytest.raises(HawqError, match="exactly mean, std_err, n, numel"):
        load_traces(tmp_path / "bad.json")
    with pytest.raises(HawqError, match="not found"):
        load_traces(tmp_path / "missing.json")
    with pytest.raises(HawqError, match="invalid JSON"):
        (tmp_path / "junk.json").write_text("{")
        load_traces(tmp_path / "junk.json")
    assert isinstance(loaded["0"], TraceEstimate)


def test_top_eigenvalues_match_exact() -> None:
    model, batches = make_mlp(), mlp_batches()
    names = [n for n, _ in model.named_parameters()]
    evals = torch.linalg.eigvalsh(exact_hessian(model, batches, names))
    by_magnitude = evals[evals.abs().argsort(descending=True)]
    top = top_eigenvalues(model, ce_loss, batches, k=2, max_iter=3000, tol=1e-6, progress=False)
    for got, want in zip(top.values, by_magnitude[:2].tolist()):
        assert abs(got - want) <= 1e-3 * abs(want), (top.values, by_magnitude[:3])
    v0, v1 = (torch.cat([t.reshape(-1) for t in vec.values()]) for vec in top.vectors)
    assert abs(float(v0 @ v1)) < 1e-6  # deflation keeps the eigenvectors orthogonal
    # one layer's block
    H2 = exact_hessian(model, batches, ["2.weight"])
    want = torch.linalg.eigvalsh(H2)
    want = float(want[want.abs().argmax()])
    got = top_eigenvalues(model, ce_loss, batches, layers="2", max_iter=3000, tol=1e-6, progress=False)
    assert abs(got.values[0] - want) <= 1e-3 * abs(want)
    assert list(got.vectors[0]) == ["2"]


def test_spectral_density_is_exact_when_lanczos_spans_the_space(tmp_path) -> None:
    model, batches = make_mlp(), mlp_batches()
    H = exact_hessian(model, batches, ["4.weight"])
    dens = spectral_density(model, ce_loss, batches, n_iter=40, n_v=2, layers="4", progress=False)
    assert dens.dim == 12
    exact = torch.linalg.eigvalsh(H)
    for nodes, weights in zip(dens.nodes, dens.weights):
        assert math.isclose(sum(weights), 1.0, rel_tol=1e-9)
        assert max(nodes) == pytest.approx(float(exact.max()), rel=1e-6)
        assert min(nodes) == pytest.approx(float(exact.min()), rel=1e-6, abs=1e-9)
    # the quadrature integrates x exactly: sum(w * node) = v^T H v / |v|^2 for the start vector v,
    # so dim * that is the Hutchinson estimate with the same Rademacher probes
    probes = [rademacher_like([model[4].weight], run)[0].reshape(-1) for run in range(2)]
    hutchinson = sum(float(v @ H @ v) for v in probes) / 2
    assert dens.trace() == pytest.approx(hutchinson, rel=1e-8)
    path = tmp_path / "density.png"
    plot_density(dens, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_label_free_hessian_is_gauss_newton() -> None:
    from hawq.models.tasks import ClassificationTask

    task = ClassificationTask()
    model = make_mlp()
    batches = mlp_batches(n=1)
    loss_fn = label_free_loss(task, model)
    x = batches[0][0]
    w = model[2].weight
    # Gauss-Newton block for layer "2": J^T J / batch, J = d outputs / d w
    J = torch.func.jacrev(lambda wv: functional_call(model, {"2.weight": wv}, (x,)))(w.detach())
    J = J.reshape(-1, w.numel())
    gn_trace = float((J.detach() ** 2).sum()) / x.shape[0]
    traces = hessian_traces(model, loss_fn, batches, layers=["2"], tol=0.0, max_probes=200, min_probes=200,
                            progress=False, estimator="hutchinson")
    assert abs(traces["2"].mean - gn_trace) <= 3 * traces["2"].std_err
    exact = hessian_traces(model, loss_fn, batches, layers=["2"], progress=False)["2"]  # zero residual: exact
    assert exact.estimator == "gauss_newton" and exact.mean == pytest.approx(gn_trace, rel=1e-12)
    assert loss_fn(model, batches[0]).item() == 0.0


class TanhOnceDifferentiable(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class TanhDetachedBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return (grad * (1 - y * y)).detach()  # a backward outside autograd (e.g. a numpy kernel)


class CustomTanh(nn.Module):
    def __init__(self, fn: type[torch.autograd.Function]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn.apply(x)


@pytest.mark.parametrize("fn", [TanhOnceDifferentiable, TanhDetachedBackward])
def test_fallback_to_finite_differences(fn) -> None:
    batches = mlp_batches()
    reference = hessian_traces(make_mlp(), ce_loss, batches, tol=0.0, max_probes=20, min_probes=20,
                               progress=False)
    model = make_mlp(CustomTanh(fn))
    with pytest.warns(RuntimeWarning, match=rf"op '{fn.__name__}Backward' in module '1'.*finite-difference"):
        got = hessian_traces(model, ce_loss, batches, tol=0.0, max_probes=20, min_probes=20, progress=False)
    for name in reference:  # same probes, so only finite-difference error separates the two
        assert got[name].mean == pytest.approx(reference[name].mean, rel=1e-6, abs=1e-9)
    with pytest.raises(HawqError, match="double backward is not supported"):
        hessian_traces(model, ce_loss, batches, max_probes=10, method="autograd", progress=False)
    # with an OutputLoss the per-sample check offers the tanh layer per-sample probes, which need autograd's
    # double backward: after the fall-back it takes the shared probes, the same ones as probing="per_layer"
    reference = hessian_traces(make_mlp(), CE_OUTPUTS, batches, tol=0.0, max_probes=20, min_probes=20,
                               progress=False, probing="per_layer")
    info: dict = {}
    with pytest.warns(RuntimeWarning, match="finite-difference"):
        got = hessian_traces(model, CE_OUTPUTS, batches, tol=0.0, max_probes=20, min_probes=20, progress=False,
                             info=info)
    assert info["per_sample_layers"] == []
    assert [t.estimator for t in got.values()] == ["hutchinson", "hutchinson", "gauss_newton"]
    for name, t in reference.items():
        assert got[name].n == t.n and got[name].mean == pytest.approx(t.mean, rel=1e-6, abs=1e-9)


def test_no_fallback_warning_for_plain_models() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hessian_traces(make_mlp(), ce_loss, mlp_batches(), tol=0.5, progress=False)


def _distributed_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from hawq.train import distributed as D

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        batches = mlp_batches(n=4)
        # each rank sees only its own batches, in unequal shares: 3 on rank 0, 1 on rank 1
        mine = [batches[0], batches[2], batches[3]] if rank == 0 else [batches[1]]
        traces = hessian_traces(make_mlp(), ce_loss, mine, tol=0.0, max_probes=12, min_probes=12,
                                progress=False)
        # room to switch to the Nyström control variate: its sketch is built from all-reduced products
        cv = hessian_traces(make_mlp(), ce_loss, mine, tol=0.0, max_probes=40, min_probes=8, progress=False)
        top = top_eigenvalues(make_mlp(), ce_loss, mine, max_iter=30, tol=1e-9, progress=False)
        # exact Gauss-Newton traces for the last layer (nothing nonlinear after it), Hutchinson for the rest
        gn = hessian_traces(make_mlp(), CE_OUTPUTS, mine, tol=0.0, max_probes=12, min_probes=12, progress=False)
        # sampled output-space probes (cap 1 direction): independent probes per rank, all-reduced rounds
        sampled = hessian_traces(make_mlp(), CE_OUTPUTS, mine, tol=0.05, max_probes=30, min_probes=4,
                                 exact_directions=1, progress=False)
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump({"traces": {k: [t.mean, t.std_err] for k, t in traces.items()}, "top": top.values,
                       "gn": {k: [t.mean, t.std_err, t.estimator] for k, t in gn.items()},
                       "sampled": {k: [t.mean, t.std_err, t.n, t.estimator] for k, t in sampled.items()},
                       "cv": {k: [t.mean, t.std_err] for k, t in cv.items()}}, f)
        D.shutdown_distributed()  # barrier, then teardown, as a torchrun program ends on success
    finally:
        if dist.is_initialized():  # after a failure: no barrier, the peer may never reach it
            dist.destroy_process_group()


def test_distributed_equals_single_process(tmp_path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    batches = mlp_batches(n=4)
    single = hessian_traces(make_mlp(), ce_loss, batches, tol=0.0, max_probes=12, min_probes=12, progress=False)
    cv = hessian_traces(make_mlp(), ce_loss, batches, tol=0.0, max_probes=40, min_probes=8, progress=False)
    plain = hessian_traces(make_mlp(), ce_loss, batches, tol=0.0, max_probes=40, min_probes=8, progress=False,
                           variance_reduction="none")
    assert any(cv[n].std_err < 0.5 * plain[n].std_err for n in cv)  # some layer did switch
    top = top_eigenvalues(make_mlp(), ce_loss, batches, max_iter=30, tol=1e-9, progress=False)
    # ranks draw shared per-layer probes (per-sample probes need every sample's values on one process)
    gn = hessian_traces(make_mlp(), CE_OUTPUTS, batches, tol=0.0, max_probes=12, min_probes=12, progress=False,
                        probing="per_layer")
    assert [t.estimator for t in gn.values()] == ["hutchinson", "hutchinson", "gauss_newton"]
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for name, t in single.items():
            assert got["traces"][name][0] == pytest.approx(t.mean, rel=1e-10)
            assert got["traces"][name][1] == pytest.approx(t.std_err, rel=1e-8)
            assert got["cv"][name][0] == pytest.approx(cv[name].mean, rel=1e-7)
            assert got["cv"][name][1] == pytest.approx(cv[name].std_err, rel=1e-6)
        assert got["top"][0] == pytest.approx(top.values[0], rel=1e-10)
        for name, t in gn.items():
            assert got["gn"][name] == [pytest.approx(t.mean, rel=1e-10), pytest.approx(t.std_err, rel=1e-8),
                                       t.estimator]
        # another draw than one process (probes depend on the rank), the same on both ranks, within errors
        assert got["sampled"] == json.loads((tmp_path / "rank0.json").read_text())["sampled"]
        name = list(gn)[-1]
        mean, err, _, estimator = got["sampled"][name]
        assert estimator == "gn_sampled" and 0 < err <= 0.05 * mean
        assert abs(mean - gn[name].mean) <= 5 * err


def test_batched_probes_and_config_kwargs() -> None:
    from hawq.sensitivity import SensitivityConfig

    model, batches = make_cnn().eval(), cnn_batches()
    one = hessian_traces(model, ce_loss, batches, tol=0.0, max_probes=10, min_probes=10, progress=False)
    four = hessian_traces(model, ce_loss, batches, tol=0.0, max_probes=10, min_probes=10, progress=False,
                          probes_per_pass=4)
    for name in one:  # same probes through one vmapped double backward: equal up to rounding
        assert four[name].mean == pytest.approx(one[name].mean, rel=1e-10)
        assert four[name].n == 10
    cfg = SensitivityConfig(tol=0.3, max_probes=16, min_probes=4, seed=3)
    got = hessian_traces(model, ce_loss, batches, progress=False, **cfg.hutchinson_kwargs())
    assert got == hessian_traces(model, ce_loss, batches, tol=0.3, max_probes=16, min_probes=4, seed=3,
                                 progress=False)


# ---------------------------------------------------------------------- embedding rows, batched probes
class TinyText(nn.Module):
    """Embedding -> LayerNorm -> Linear -> GELU -> mean over tokens -> Linear: nothing piecewise linear."""

    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.emb, self.norm = nn.Embedding(20, 4), nn.LayerNorm(4)
        self.fc, self.head = nn.Linear(4, 6), nn.Linear(6, 3)
        self.tied = tied

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc(self.norm(self.emb(ids))))
        out = self.head(h.mean(1))
        if self.tied:  # the table used a second time, as a projection (every row then matters)
            out = out + self.norm(self.emb(ids)).mean(1) @ self.emb.weight[:3].T
        return out


def text_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randint(2, 13, (5, 3), generator=g), torch.randint(0, 3, (5,), generator=g)


def test_embedding_probes_cover_only_the_looked_up_rows_and_stay_unbiased() -> None:
    from hawq.sensitivity.hvp import HessianOperator, embedding_rows
    from hawq.sensitivity.traces import rademacher_rows

    model, batch = TinyText().double(), text_batch()
    layers = ["emb", "fc", "head"]
    weights = [dict(model.named_modules())[n].weight for n in layers]
    loss = ce_loss(model, batch)
    rows = embedding_rows(loss.grad_fn, weights)
    assert list(rows) == [0] and torch.equal(rows[0], batch[0].unique())
    tied = TinyText(tied=True).double()
    assert embedding_rows(ce_loss(tied, batch).grad_fn, [tied.emb.weight]) == {}  # a second use: whole table

    # same probe on the looked-up rows -> the same sample, whatever the rest of the table holds
    with HessianOperator(model, ce_loss, [batch], ["emb"], [model.emb.weight]) as op:
        v = rademacher_rows(model.emb.weight, rows[0], 7)
        full = v.clone()
        off = torch.ones(20, dtype=torch.bool)
        off[rows[0]] = False
        full[off] = rademacher_like([model.emb.weight], 8)[0][off]
        got = op.block_quadratic_forms({0: (lambda j: [v, full][j], 2)})[0]
        assert torch.equal(op.rows[0], rows[0])
    assert abs(float(got[0] - got[1])) <= 1e-12 * abs(float(got[1]))

    exact = block_traces(exact_hessian(model, [batch], [f"{n}.weight" for n in layers]), model,
                         [f"{n}.weight" for n in layers])
    traces = hessian_traces(model, ce_loss, [batch], tol=0.0, min_probes=200, max_probes=200, progress=False,
                            variance_reduction="none")
    for name, ex in zip(layers, exact):
        t = traces[name]
        assert t.n == 200 and 0 < t.std_err and abs(t.mean - ex) <= 4 * t.std_err, (name, t, ex)


def test_control_variate_samples_reuse_known_samples_exactly() -> None:
    g = torch.Generator().manual_seed(0)
    q, c = torch.randn(12, generator=g, dtype=torch.float64), torch.randn(12, generator=g, dtype=torch.float64)
    whole = control_variate_samples(q, c, 0.3)
    assert torch.equal(control_variate_samples(q, c, 0.3, known=control_variate_samples(q[:7], c[:7], 0.3)), whole)


def test_probes_batched_across_layers_give_the_unbatched_samples() -> None:
    """scripts/sensitivity_nonpwl_estimators.py's candidate: every layer's probes in one vmapped double
    backward; the samples equal the per-layer double backward's and average to the dense block traces."""
    from conftest import load_script

    nonpwl = load_script("sensitivity_nonpwl_estimators")
    model, batch = TinyText().double(), text_batch()
    layers = ["emb", "norm", "fc", "head"]
    weights = [dict(model.named_modules())[n].weight for n in layers]
    grads = torch.autograd.grad(ce_loss(model, batch), weights, create_graph=True)
    probes = {i: torch.stack([rademacher_like([w], 100 * i + j)[0] for j in range(64)]) for i, w in enumerate(weights)}
    ref = nonpwl.block_forms_unbatched(grads, weights, probes)
    got = nonpwl.block_forms_batched(grads, weights, probes)
    fwd = nonpwl.block_forms_fwd_rev(model, (batch[0],), lambda out: F.cross_entropy(out, batch[1]), layers, probes,
                                     weights)
    exact = block_traces(exact_hessian(model, [batch], [f"{n}.weight" for n in layers]), model,
                         [f"{n}.weight" for n in layers])
    for i, ex in enumerate(exact):
        assert torch.allclose(got[i], ref[i], rtol=1e-10, atol=1e-12) and torch.allclose(fwd[i], ref[i], rtol=1e-8,
                                                                                          atol=1e-10)
        se = float(got[i].std() / 8)
        assert se > 0 and abs(float(got[i].mean()) - ex) <= 4 * se, (layers[i], float(got[i].mean()), se, ex)
