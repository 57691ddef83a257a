"""Benchmark: hawq.sensitivity.hessian_traces vs PyHessian used HAWQ-V2 style (one Hutchinson loop per layer).

Baseline = what a user has today: for each layer, freeze every other parameter, build PyHessian's
``hessian`` object on the batch (forward + backward with create_graph, as PyHessian does) and run a
Hutchinson loop of ``pyhessian.utils.hessian_vector_product`` on that layer alone. PyHessian's own
``trace()`` stops on the relative change of the running mean; to compare like with like the baseline
uses hawq's stopping rule (std_err <= max(tol * |trace|, tol * 1e-3 * max trace)), the same probe
seeds, model, batch and BatchNorm mode. If PyHessian cannot be imported, the same algorithm is run
with plain ``torch.autograd.grad`` (the script says which).

hawq runs its default: exact traces from the Gauss-Newton identity for every layer through which the
network is piecewise linear (all of them in these ReLU / eval-BatchNorm ResNets: one backward pass
per output direction), Hutchinson with Nyström++ for any other layer. Ablations (first two cases):
hawq restricted to Hutchinson (``estimator="hutchinson"``), with and without Nyström++.

Also measured: the cost of one HVP under the implementation choices hawq considered, and how many
probes hawq's opt-in joint probing (one full HVP per probe for all layers) would need.

    .venv/bin/python scripts/bench_sensitivity.py [--quick] [--tol 0.05] [--threads N]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hawq.layers import quantizable_layers
from hawq.sensitivity import OutputLoss, TraceEstimate, hessian_traces, probe_seed, rademacher_like

try:
    from pyhessian import hessian as PyHessian
    from pyhessian.utils import hessian_vector_product

    BASELINE = "PyHessian 0.1 (pip) hessian class + hessian_vector_product, per layer"
except ImportError:  # faithful re-implementation of the same per-layer algorithm
    PyHessian = None
    BASELINE = "PyHessian per-layer algorithm re-implemented with torch.autograd.grad (pyhessian not importable)"

    def hessian_vector_product(grads, params, v):  # noqa: D103  (PyHessian's utils.hessian_vector_product)
        return torch.autograd.grad(grads, params, grad_outputs=v, only_inputs=True, retain_graph=True)


def ce(model: nn.Module, batch) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


# the same loss split into outputs and a loss on them: what lets hawq use exact Gauss-Newton traces
CE_OUTPUTS = OutputLoss(lambda model, batch: model(batch[0]), lambda out, batch: F.cross_entropy(out, batch[1]))


def dataloader_hv_product(model: nn.Module, batches: list, params: list, v: list) -> list:
    """PyHessian's ``hessian.dataloader_hv_product``: a fresh graph per batch per HVP, size-weighted."""
    total, count = [torch.zeros_like(p) for p in params], 0
    for x, y in batches:
        grads = torch.autograd.grad(ce(model, (x, y)), params, create_graph=True)
        hv = torch.autograd.grad(grads, params, grad_outputs=v)
        total = [t + h * len(x) for t, h in zip(total, hv)]
        count += len(x)
    return [t / count for t in total]


def timed(fn, repeat: int = 3) -> float:
    """Fastest CPU time of ``repeat`` calls after a warm-up (CPU time: other jobs do not inflate it)."""
    fn()  # warm-up (allocator, kernels)
    best = math.inf
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def per_layer_baseline(model: nn.Module, batches: list, layers: list[str], tol: float, max_probes: int,
                       min_probes: int, seed: int, floor: float) -> dict[str, TraceEstimate]:
    """HAWQ-V2 with PyHessian: one Hutchinson loop per layer.

    One batch: PyHessian's single-batch mode (one graph per layer, HVPs on it). Several batches:
    PyHessian's data-loader mode (``dataloader_hv_product``: forward + backward + HVP per batch per probe).
    """
    batch = batches[0]
    modules = dict(model.named_modules())
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    out = {}
    try:
        for name in layers:
            w = modules[name].weight
            for p in model.parameters():
                p.requires_grad_(p is w)
            model.zero_grad(set_to_none=True)
            hess = None
            if PyHessian is not None and len(batches) > 1:
                hess = PyHessian(model, lambda out, y: F.cross_entropy(out, y), dataloader=batches, cuda=False)
            elif PyHessian is not None:
                hess = PyHessian(model, lambda out, y: F.cross_entropy(out, y), data=batch, cuda=False)
                grads, params = hess.gradsH, hess.params
            elif len(batches) > 1:
                params = [w]
            else:
                loss = ce(model, batch)
                params = [w]
                grads = list(torch.autograd.grad(loss, params, create_graph=True))
            samples: list[float] = []
            while True:
                v = rademacher_like([w], probe_seed(seed, name, len(samples)))  # hawq's probes
                if len(batches) > 1 and hess is not None:
                    hv = hess.dataloader_hv_product(v)[1]
                elif len(batches) > 1:
                    hv = dataloader_hv_product(model, batches, params, v)
                else:
                    hv = hessian_vector_product(grads, params, v)
                samples.append(float((hv[0].double() * v[0].double()).sum()))
                n = len(samples)
                if n >= min_probes:
                    mean = sum(samples) / n
                    se = math.sqrt(sum((s - mean) ** 2 for s in samples) / (n - 1) / n)
                    if se <= max(tol * abs(mean), floor) or n >= max_probes:
                        break
            model.zero_grad(set_to_none=True)
            out[name] = TraceEstimate(mean, se, n, w.numel())
            del hess
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
        model.zero_grad(set_to_none=True)
    return out


def hvp_variants(model: nn.Module, batch, layers: list[str]) -> dict[str, float]:
    """CPU seconds per HVP (all layers) for the implementation choices hawq measured, and one gradient."""
    modules = dict(model.named_modules())
    weights = [modules[n].weight for n in layers]
    res = {"gradient (forward + backward)": timed(lambda: torch.autograd.grad(ce(model, batch), weights))}
    grads = torch.autograd.grad(ce(model, batch), weights, create_graph=True)
    res["graph build (forward + create_graph backward)"] = timed(
        lambda: torch.autograd.grad(ce(model, batch), weights, create_graph=True))
    v = rademacher_like(weights, 1)
    res["HVP: double backward on a kept graph (hawq)"] = timed(
        lambda: torch.autograd.grad(grads, weights, grad_outputs=v, retain_graph=True))
    k = 4
    vb = [torch.stack(t) for t in zip(*[rademacher_like(weights, s) for s in range(k)])]
    res[f"HVP: {k} probes batched (is_grads_batched), per probe"] = timed(
        lambda: torch.autograd.grad(grads, weights, grad_outputs=vb, retain_graph=True, is_grads_batched=True),
        repeat=2) / k
    from torch.func import functional_call, grad, jvp

    names = [f"{n}.weight" for n in layers]
    params = {n: w.detach() for n, w in zip(names, weights)}
    tangents = dict(zip(names, v))

    def loss_of(p):
        return F.cross_entropy(functional_call(model, p, (batch[0],)), batch[1])

    res["HVP: forward-over-reverse (torch.func jvp of grad), no reuse"] = timed(
        lambda: jvp(grad(loss_of), (params,), (tangents,)))
    return res


def run_case(title: str, model: nn.Module, batches: list, tol: float, max_probes: int, min_probes: int,
             seed: int, joint_probes: int = 0, repeats: int = 1, ablation: tuple[str, ...] = (),
             costs: bool = True) -> float:
    model.eval()  # BatchNorm running statistics (HAWQ measures the trained, deployed network)
    layers = quantizable_layers(model)
    print(f"\n== {title}: {len(layers)} layers, {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{len(batches)} batch(es) of {tuple(batches[0][0].shape)}")
    batch = batches[0]
    if costs:
        cost = hvp_variants(model, batch, layers)
        for k, t in cost.items():
            print(f"  {k:<62s} {t * 1e3:9.1f} ms CPU")
        g = cost["gradient (forward + backward)"]
        print(f"  one HVP / one gradient cost ratio: "
              f"{cost['HVP: double backward on a kept graph (hawq)'] / g:.2f} (double backward on kept graph), "
              f"{cost['HVP: forward-over-reverse (torch.func jvp of grad), no reuse'] / g:.2f} "
              "(forward-over-reverse)")

    def run_ours(estimator: str = "auto", variance_reduction: str = "nystrom"):
        return hessian_traces(model, CE_OUTPUTS, batches, tol=tol, max_probes=max_probes, min_probes=min_probes,
                              seed=seed, progress=False, variance_reduction=variance_reduction, estimator=estimator)

    # alternate the two (A B A B ...) and keep each one's fastest run: other jobs on a shared
    # machine only ever add time; CPU time of this process is reported too (immune to that load)
    wall = {"hawq": [], "base": []}
    cpu = {"hawq": [], "base": []}
    floor = None
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        ours = run_ours()
        wall["hawq"].append(time.perf_counter() - w0)
        cpu["hawq"].append(time.process_time() - c0)
        floor = tol * 1e-3 * max(abs(t.mean) for t in ours.values())
        w0, c0 = time.perf_counter(), time.process_time()
        base = per_layer_baseline(model, batches, layers, tol, max_probes, min_probes, seed, floor)
        wall["base"].append(time.perf_counter() - w0)
        cpu["base"].append(time.process_time() - c0)
    t_ours, t_base = min(wall["hawq"]), min(wall["base"])
    c_ours, c_base = min(cpu["hawq"]), min(cpu["base"])

    hvps_base = sum(t.n for t in base.values())
    capped = sum(t.n >= max_probes for t in base.values())
    plain = None
    for variance_reduction in ablation:  # hawq with Hutchinson only: what each lever buys
        c0 = time.process_time()
        got = run_ours("hutchinson", variance_reduction)
        c_abl = time.process_time() - c0
        what = {"nystrom": "Hutchinson + Nyström++ on one shared graph",
                "none": "plain Hutchinson on one shared graph"}[variance_reduction]
        print(f"  ablation, hawq with {what}: CPU {c_abl:7.2f} s, {sum(t.n for t in got.values())} single-layer "
              f"HVPs -> baseline / this = {c_base / c_abl:.2f}x")
        if variance_reduction == "none":
            plain = got
    exact = [t for t in ours.values() if t.estimator == "gauss_newton"]
    hutch = [t for t in ours.values() if t.estimator == "hutchinson"]
    parts = []
    if exact:
        parts.append(f"{len(exact)} layer(s) exact from {max(t.n for t in exact)} backward passes")
    if hutch:
        parts.append(f"{len(hutch)} layer(s) by Hutchinson, {sum(t.n for t in hutch)} single-layer HVPs "
                     f"({min(t.n for t in hutch)}..{max(t.n for t in hutch)} per layer)")
    print(f"  hawq (default: exact Gauss-Newton traces where certified, Nyström++ Hutchinson elsewhere): "
          f"wall {t_ours:7.2f} s, CPU {c_ours:7.2f} s; {'; '.join(parts)}")
    print(f"  baseline ({BASELINE}): wall {t_base:7.2f} s, CPU {c_base:7.2f} s, {hvps_base} single-layer HVPs "
          f"({min(t.n for t in base.values())}..{max(t.n for t in base.values())} probes per layer)")
    if capped:
        print(f"  WARNING: the baseline hit max_probes={max_probes} on {capped} layer(s): not equal precision there")
    worst, worst_name = -1.0, ""
    for name in layers:
        a, b = ours[name], base[name]
        z = abs(a.mean - b.mean) / math.sqrt(a.std_err**2 + b.std_err**2)
        if z > worst:
            worst, worst_name = z, name
    print(f"  {'layer':<28s} {'hawq trace':>12s} {'+-':>9s} {'baseline':>12s} {'+-':>9s}")
    for name in layers:
        a, b = ours[name], base[name]
        print(f"  {name:<28s} {a.mean:12.4g} {a.std_err:9.2g} {b.mean:12.4g} {b.std_err:9.2g}")
    print(f"  largest disagreement: {worst:.2f} standard errors (layer {worst_name}; std error of the "
          "difference = sqrt(se_hawq^2 + se_base^2); se_hawq = 0 where exact)")
    # The baseline's standard errors are themselves estimates from as few as min_probes heavy-tailed
    # samples, so an exact trace can sit more than 3 of them away. Settle each such layer with an
    # independent long Hutchinson run (other probe seeds, tol 0.01).
    flagged = [n for n in layers if ours[n].estimator == "gauss_newton"
               and abs(ours[n].mean - base[n].mean) > 3 * base[n].std_err]
    if flagged:
        c0 = time.process_time()
        ref = hessian_traces(model, CE_OUTPUTS, batches, layers=flagged, tol=0.01, max_probes=20000, min_probes=16,
                             seed=seed + 1, estimator="hutchinson", progress=False)
        for n in flagged:
            r = ref[n]
            print(f"  check {n}: exact {ours[n].mean:.4g}, baseline {base[n].mean:.4g} +- {base[n].std_err:.2g} "
                  f"({base[n].n} probes); long Hutchinson run: {r.mean:.4g} +- {r.std_err:.2g} ({r.n} HVPs) -> "
                  f"exact is {abs(ours[n].mean - r.mean) / r.std_err:.2f} standard errors from it, the baseline "
                  f"{abs(base[n].mean - r.mean) / math.hypot(r.std_err, base[n].std_err):.2f}")
        print(f"  (check runs: {time.process_time() - c0:.0f} s CPU, not part of either timing)")
    ratio = c_base / c_ours
    print(f"  baseline / hawq: {t_base / t_ours:.2f}x wall time, {ratio:.2f}x CPU time "
          f"(best of {repeats} alternating runs each)", flush=True)
    if joint_probes:
        t0 = time.perf_counter()
        joint = hessian_traces(model, ce, [batch], tol=0.0, max_probes=joint_probes, min_probes=joint_probes,
                               seed=seed, probing="joint", progress=False)
        t_joint = time.perf_counter() - t0
        need = max(joint[n].std_err ** 2 * joint_probes / max(tol * abs(ours[n].mean), floor) ** 2 for n in layers)
        ref = plain if plain is not None else base  # plain per-layer Hutchinson: every sample is one probe
        var_ratio = max((joint[n].std_err ** 2 * joint[n].n) / (ref[n].std_err ** 2 * ref[n].n) for n in layers)
        print(f"  joint probing (opt-in, one full HVP per probe): {joint_probes} probes in {t_joint:.1f} s; "
              f"per-probe variance up to {var_ratio:.0f}x plain per-layer probes'; would need ~{need:.0f} probes "
              f"(~{need * t_joint / joint_probes:.0f} s) for tol={tol}", flush=True)
    return ratio


def fashion_batches(count: int, size: int, seed: int) -> list:
    """``count`` batches of real Fashion-MNIST test images (random 1x28x28 inputs if not installed)."""
    one = fashion_batch(count * size)
    if one is None:
        g = torch.Generator().manual_seed(seed + 7)
        one = (torch.randn(count * size, 1, 28, 28, generator=g), torch.randint(0, 10, (count * size,), generator=g))
    return [(one[0][i * size:(i + 1) * size], one[1][i * size:(i + 1) * size]) for i in range(count)]


def fashion_batch(n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    root = Path("/usr/share/datasets/fashion-mnist")
    if not root.is_dir():
        return None
    from hawq.data.fashion_mnist import load_fashion_mnist

    ds = load_fashion_mnist(root, "test")
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n]
    return ds.tensors[0][idx], ds.tensors[1][idx]


def fashion32(split: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Fashion-MNIST as 3x32x32 images (zero-padded, grey copied to 3 channels) for a CIFAR-size ResNet-18."""
    root = Path("/usr/share/datasets/fashion-mnist")
    if not root.is_dir():
        return None
    from hawq.data.fashion_mnist import load_fashion_mnist

    x, y = load_fashion_mnist(root, split).tensors
    return F.pad(x, (2, 2, 2, 2)).expand(-1, 3, -1, -1).contiguous(), y


def trained_resnet18(seed: int, epochs: int = 1) -> tuple[nn.Module, str] | None:
    """torchvision ResNet-18 (10 classes) trained ``epochs`` on Fashion-MNIST at 32x32, cached in runs/.

    HAWQ measures the trained network it is about to quantize, and a trained network's Hessian blocks
    have the few dominant directions a random one lacks; no trained ResNet-18 is available offline,
    so the script trains one once (about 5 minutes on 2 cores) and reuses it.
    """
    import torchvision
    from safetensors.torch import load_file, save_file

    data = fashion32("train")
    if data is None:
        return None
    cache_dir = Path(__file__).resolve().parents[1] / "runs" / "bench_cache"
    cache = cache_dir / f"resnet18_fashion32_s{seed}_e{epochs}.safetensors"
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=10)
    if cache.exists():
        model.load_state_dict(load_file(cache))
    else:
        print(f"(training ResNet-18 on Fashion-MNIST 32x32 for {epochs} epoch(s), cached at {cache})", flush=True)
        x, y = data
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        steps = epochs * (len(x) // 128)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=steps)
        g = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=g)
            for i in range(len(x) // 128):
                idx = order[i * 128:(i + 1) * 128]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(cache))
    model.eval()
    tx, ty = fashion32("test")
    with torch.no_grad():
        acc = sum(int((model(tx[i:i + 500]).argmax(1) == ty[i:i + 500]).sum()) for i in range(0, len(tx), 500))
    return model, f"trained {epochs} epoch(s) on Fashion-MNIST 32x32, test top-1 {100 * acc / len(tx):.2f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="Fashion ResNet only, one run (~2 min)")
    ap.add_argument("--tol", type=float, default=0.05,
                    help="relative standard error both sides must reach (hawq's default 0.05)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1 keeps CPU time meaningful on a shared machine)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tol, max_probes, min_probes, repeats = args.tol, 1000, 8, 1
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s), tol={tol}, "
          f"probes {min_probes}..{max_probes}, seed {args.seed}, best of {repeats} run(s)")
    print(f"baseline: {BASELINE}")
    ratios = []

    import torchvision

    from hawq.models.fashion import fashion_resnet

    def trained_fashion() -> tuple[nn.Module, str]:
        model = fashion_resnet()
        ckpt = Path(__file__).resolve().parents[1] / "checkpoints" / "fashion_resnet_fp32.safetensors"
        if ckpt.exists():  # the shipped FP32 checkpoint (90.3% top-1): the network HAWQ really measures
            from safetensors.torch import load_file

            model.load_state_dict(load_file(ckpt))
            return model, "trained (shipped checkpoint)"
        return model, "random init"

    torch.manual_seed(args.seed)
    batch = fashion_batch(64)
    if batch is None:
        print("\n(Fashion-MNIST not found at /usr/share/datasets/fashion-mnist: using random 1x28x28 inputs)")
        g = torch.Generator().manual_seed(args.seed)
        batch = (torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g))
    model, how = trained_fashion()
    ratios.append(run_case(f"hawq.models.fashion ResNet ({how}), Fashion-MNIST test batch of 64", model, [batch],
                           tol, max_probes, min_probes, args.seed, joint_probes=8, repeats=repeats,
                           ablation=("nystrom", "none")))
    extra = []
    if not args.quick:
        r18 = trained_resnet18(args.seed)
        if r18 is not None:
            model, how = r18
            x32, y32 = fashion32("test")
            idx = torch.randperm(len(x32), generator=torch.Generator().manual_seed(args.seed))[:64]
            ratios.append(run_case(f"torchvision ResNet-18 ({how}), Fashion-MNIST 3x32x32 test batch of 64", model,
                                   [(x32[idx], y32[idx])], tol, max_probes, min_probes, args.seed, repeats=repeats,
                                   ablation=("nystrom",)))
        four = fashion_batches(4, 64, args.seed)
        model, how = trained_fashion()
        ratios.append(run_case(f"hawq.models.fashion ResNet ({how}), 4 Fashion-MNIST batches of 64 "
                               "(the pipeline's default data mode; baseline: PyHessian dataloader mode)",
                               model, four, tol, max_probes, min_probes, args.seed, repeats=repeats, costs=False))
        # Reported, not in the mean: an untrained network on random inputs and labels and a loose
        # tolerance (the hard cases for Hutchinson + Nyström++: plain probes stop early there), and a
        # network that is not piecewise linear (SiLU), where hawq falls back to Hutchinson + Nyström++.
        torch.manual_seed(args.seed)
        g = torch.Generator().manual_seed(args.seed + 1)
        batch = (torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g))
        extra.append(("ResNet-18, random init, random inputs and labels", run_case(
            "torchvision ResNet-18 (random init, 10 classes), random 3x32x32 batch of 64 (not in the mean)",
            torchvision.models.resnet18(num_classes=10), [batch], tol, max_probes, min_probes, args.seed,
            costs=False)))
        loose = 0.15
        model, how = trained_fashion()
        extra.append((f"Fashion ResNet, 1 batch, tol={loose}", run_case(
            f"same Fashion ResNet, 1 batch, at the demo config's looser tol={loose} (not in the mean)",
            model, [fashion_batch(64) or batch], loose, max_probes, min_probes, args.seed, costs=False)))
        model, how = trained_fashion()
        for parent in list(model.modules()):  # SiLU is smooth: the second-order term stays, no exact traces
            for child_name, child in parent.named_children():
                if isinstance(child, nn.ReLU):
                    setattr(parent, child_name, nn.SiLU())
        extra.append(("Fashion ResNet with SiLU for ReLU (Hutchinson fallback)", run_case(
            f"same Fashion ResNet ({how}) with every ReLU replaced by SiLU, 1 batch: not piecewise linear, so "
            "hawq falls back to Hutchinson + Nyström++ (not in the mean)",
            model, [fashion_batch(64) or batch], tol, max_probes, min_probes, args.seed, costs=False)))
    geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    print(f"\nper model at tol={tol} (CPU time): {', '.join(f'{r:.2f}x' for r in ratios)} "
          f"(geometric mean {geo:.2f}x)")
    for what, r in extra:
        print(f"not in the mean: {what}: {r:.2f}x")
    print(f"speed-up: {geo:.1f} x faster than PyHessian per-layer")


if __name__ == "__main__":
    main()
