"""Which Hutchinson variant wins on layers that are not piecewise linear (BERT: GELU, softmax attention, LayerNorm).

For every quantizable layer of a benchmark case (default: ``bert_cls`` of scripts/bench_sensitivity.py) this
draws ``--probes`` Rademacher probes of four unbiased estimators of ``tr(H_ll)``'s Hutchinson part and
reports, per layer, the probes each would need under hessian_traces' stopping rule
(``std_err <= max(tol |trace|, tol 1e-3 max_l |trace_l|)``, at least ``min_probes``, at most ``max_probes``):

* ``H per layer``: ``v_l . H_ll v_l``, one single-layer HVP per probe (hawq's default);
* ``H joint``: one probe on all layers, ``v_l . (H v)_l`` off one full HVP (cross blocks add variance);
* ``R per layer`` / ``R joint``: the same on the residual ``R = H - G`` (the Gauss-Newton control
  variate: ``tr(H_ll) = tr(G_ll) + E[v_l . R_ll v_l]``, ``tr(G_ll)`` from cheap output-space passes).
  ``R`` is the Hessian of ``<sg(dl/df), f(w)>`` (the loss gradient in the outputs held constant), so
  one HVP of that surrogate gives ``R v``.

and the CPU seconds each would take (per-layer: the sum over layers of probes x that layer's HVP
time; joint: the largest probe count x one full HVP). One thread; CPU time::

    PYTHONPATH=. OMP_NUM_THREADS=1 python scripts/sensitivity_nonpwl_estimators.py --case bert_cls

``--batched K`` then times the *same* per-layer samples computed three ways, for ``K`` probes on every
Hutchinson layer whose ``B x numel`` batched probes fit ``--batched-mb`` (``B`` = layers x ``K``; a
30522-row word-embedding table does not fit and stays out of all three):

* ``unbatched``: one single-layer double backward per probe (hawq's default);
* ``batched, reverse-over-reverse``: all ``B`` block-diagonal probes (each nonzero on one layer) in ONE
  ``torch.autograd.grad(..., is_grads_batched=True)`` over every layer's gradient: probe ``b`` on layer
  ``l`` gives ``(H v_b)_l = H_ll v_b`` exactly (no cross-block terms, since ``v_b`` is zero elsewhere);
* ``batched, forward-over-reverse``: the same probes through ``vmap(jvp(grad(loss)))`` (torch.func).

and prints the largest relative difference of their per-probe values from the unbatched ones.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_sensitivity as bench  # noqa: E402

from hawq.layers import quantizable_layers  # noqa: E402
from hawq.sensitivity import certify_piecewise_linear  # noqa: E402
from hawq.sensitivity.traces import probe_seed, rademacher_like  # noqa: E402

KINDS = ("H per layer", "H joint", "R per layer", "R joint")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="bert_cls", help="a case key of scripts/bench_sensitivity.py")
    ap.add_argument("--probes", type=int, default=24, help="probes per estimator (their spread predicts the rest)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batched", type=int, default=0, metavar="K",
                    help="also time K probes per layer unbatched vs batched across layers (0: skip)")
    ap.add_argument("--batched-mb", type=float, default=256.0,
                    help="layers whose batched probes (layers x K x numel floats) exceed this stay out of --batched")
    args = ap.parse_args(argv)
    if args.case not in bench.CASES:
        raise SystemExit(f"--case: unknown case '{args.case}' (one of {', '.join(bench.CASES)})")
    if args.probes < 2:
        raise SystemExit("--probes must be >= 2")
    if args.batched < 0 or not args.batched_mb > 0:
        raise SystemExit("--batched must be >= 0 and --batched-mb > 0")
    torch.set_num_threads(1)
    case = bench.CASES[args.case][1](args.seed)
    model = case.model.eval()
    (x, y), = case.batches
    layers = quantizable_layers(model)
    modules = dict(model.named_modules())
    weights = [modules[n].weight for n in layers]
    with torch.enable_grad():
        out = model(x)
        loss = case.criterion(out, y)
        (g_out,) = torch.autograd.grad(loss, out, retain_graph=True)
        # certified layers take hawq's exact path: they are listed but not in the totals
        hutch = torch.tensor([r is not None for r in certify_piecewise_linear(out, weights)])
        grads = {"H": torch.autograd.grad(loss, weights, create_graph=True),
                 "R": torch.autograd.grad((g_out.detach() * out).sum(), weights, create_graph=True, allow_unused=True)}

    def per_layer(which: str, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        vals, cpu = torch.zeros(len(layers), dtype=torch.float64), torch.zeros(len(layers), dtype=torch.float64)
        for i, w in enumerate(weights):
            g = grads[which][i]
            if g is None or not g.requires_grad or not hutch[i]:
                continue
            v = rademacher_like([w], probe_seed(args.seed, layers[i], j))[0]
            c0 = time.process_time()
            (hv,) = torch.autograd.grad(g, w, grad_outputs=v, retain_graph=True, allow_unused=True)
            cpu[i] = time.process_time() - c0
            vals[i] = float((v * hv).sum(dtype=torch.float64)) if hv is not None else 0.0
        return vals, cpu

    def joint(which: str, j: int) -> tuple[torch.Tensor, float]:
        vs = [v * bool(h) for v, h in zip(rademacher_like(weights, probe_seed(args.seed, "joint", j)), hutch)]
        need = [i for i, g in enumerate(grads[which]) if g is not None and g.requires_grad]
        c0 = time.process_time()
        hv = torch.autograd.grad([grads[which][i] for i in need], weights, grad_outputs=[vs[i] for i in need],
                                 retain_graph=True, allow_unused=True)
        cpu = time.process_time() - c0
        return torch.tensor([float((v * h).sum(dtype=torch.float64)) if h is not None else 0.0
                             for v, h in zip(vs, hv)]), cpu

    samples, cpu = {}, {}
    for kind in KINDS:
        which, mode = kind.split(" ", 1)
        rows, times = [], []
        for j in range(args.probes):
            vals, c = (per_layer if mode == "per layer" else joint)(which, j)
            rows.append(vals)
            times.append(c if isinstance(c, torch.Tensor) else torch.tensor(c, dtype=torch.float64))
        samples[kind], cpu[kind] = torch.stack(rows), torch.stack(times).mean(0)
    means = samples["H per layer"].mean(0)
    floor = case.tol * 1e-3 * float(means.abs().max())
    targets = torch.clamp(case.tol * means.abs(), min=floor)
    print(f"case {args.case}: {len(layers)} layers, tol {case.tol}, probes {case.min_probes}..{case.max_probes}, "
          f"{args.probes} probes per estimator, one thread, CPU seconds")
    print(f"{'layer':<44s} {'tr H (est)':>11s} " + " ".join(f"{k:>12s}" for k in KINDS) + "   (probes needed)")
    need = {}
    for kind in KINDS:
        std = samples[kind].std(0)
        need[kind] = ((std / targets) ** 2).ceil().clamp(case.min_probes, case.max_probes)
    for i, n in enumerate(layers):
        print(f"{n[-44:]:<44s} {float(means[i]):11.4g} " + " ".join(f"{int(need[k][i]):12d}" for k in KINDS)
              + ("" if hutch[i] else "   (certified: exact in hawq, not in the totals)"))
    result = {}
    for kind in KINDS:
        need[kind] = need[kind] * hutch
        if kind.endswith("per layer"):
            total = float((need[kind] * cpu[kind]).sum())
            hvps = f"{int(need[kind].sum())} single-layer HVPs"
        else:
            total = float(need[kind].max() * cpu[kind])
            hvps = f"{int(need[kind].max())} full HVPs"
        result[kind] = total
        print(f"{kind:<12s}: {hvps}, predicted {total:.3f} CPU s")
    if args.batched:
        result["batched"] = compare_batched(case, model, layers, weights, grads["H"], hutch, args)
    return result


def block_forms_unbatched(grads: list, weights: list, probes: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """``v . H_ll v`` (float64) for each probe ``v`` of ``probes[l]`` (``[k, *shape]``): one double
    backward from layer ``l``'s gradient per probe, as hawq's per-layer path does."""
    out = {}
    for i, vs in probes.items():
        out[i] = torch.stack([(v * torch.autograd.grad(grads[i], weights[i], grad_outputs=v, retain_graph=True)[0])
                              .sum(dtype=torch.float64) for v in vs])
    return out


def block_diagonal(probes: dict[int, torch.Tensor], weights: list) -> tuple[list[int], dict[int, torch.Tensor]]:
    """All layers' probes as one batch of ``B`` vectors, probe ``b`` nonzero on its own layer only:
    ``{layer: [B, *shape]}`` (zeros outside that layer's rows of the batch) and each row's layer."""
    owner = [i for i, vs in probes.items() for _ in range(vs.shape[0])]
    out, start = {}, 0
    for i, vs in probes.items():
        z = torch.zeros(len(owner), *weights[i].shape, dtype=weights[i].dtype)
        z[start:start + vs.shape[0]] = vs
        out[i], start = z, start + vs.shape[0]
    return owner, out


def _split_forms(probes: dict[int, torch.Tensor], hv: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    out, start = {}, 0
    for i, vs in probes.items():
        k = vs.shape[0]
        out[i] = (vs * hv[i][start:start + k]).reshape(k, -1).sum(1, dtype=torch.float64)
        start += k
    return out


def block_forms_batched(grads: list, weights: list, probes: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """The same values as :func:`block_forms_unbatched` from ONE vmapped double backward over every
    layer's gradient (``is_grads_batched``): ``(H v)_l = H_ll v`` for a probe zero off layer ``l``."""
    _, gos = block_diagonal(probes, weights)
    order = list(probes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vmap's "falling back to a slow loop" notices
        hv = torch.autograd.grad([grads[i] for i in order], [weights[i] for i in order],
                                 grad_outputs=[gos[i] for i in order], retain_graph=True, is_grads_batched=True)
    return _split_forms(probes, dict(zip(order, hv)))


def block_forms_fwd_rev(model: torch.nn.Module, inputs: tuple, loss_of: Callable, layers: list[str],
                        probes: dict[int, torch.Tensor], weights: list) -> dict[int, torch.Tensor]:
    """The same values by forward-over-reverse: ``vmap(jvp(grad(loss)))`` over the block-diagonal probes."""
    from torch.func import functional_call, grad, jvp, vmap

    params = {n: p.detach() for n, p in model.named_parameters()}
    keys = {i: f"{layers[i]}.weight" for i in probes}
    primal = {keys[i]: params[keys[i]] for i in probes}
    _, tangents = block_diagonal(probes, weights)

    def loss(ws: dict) -> torch.Tensor:
        return loss_of(functional_call(model, {**params, **ws}, inputs))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hv = vmap(lambda t: jvp(grad(loss), (primal,), (t,))[1])({keys[i]: tangents[i] for i in probes})
    return _split_forms(probes, {i: hv[keys[i]] for i in probes})


def compare_batched(case: bench.Case, model: torch.nn.Module, layers: list[str], weights: list, grads: list,
                    hutch: torch.Tensor, args: argparse.Namespace) -> dict:
    """CPU seconds of K per-layer probes on every layer that fits, computed the three ways (module docstring)."""
    k = args.batched
    cand = [i for i, g in enumerate(grads) if hutch[i] and g is not None and g.requires_grad]
    fits = [i for i in cand if len(cand) * k * weights[i].numel() * 4 <= args.batched_mb * 2**20]
    left = [layers[i] for i in cand if i not in fits]
    probes = {i: torch.stack([rademacher_like([weights[i]], probe_seed(args.seed, layers[i], j))[0]
                              for j in range(k)]) for i in fits}
    (x, y), = case.batches

    def timed(fn: Callable) -> tuple[float, dict]:
        fn()  # warm-up: allocator, vmap's batching rules
        c0 = time.process_time()
        got = fn()
        return time.process_time() - c0, got

    t_ref, ref = timed(lambda: block_forms_unbatched(grads, weights, probes))
    runs = {"batched, reverse-over-reverse": lambda: block_forms_batched(grads, weights, probes),
            "batched, forward-over-reverse": lambda: block_forms_fwd_rev(
                model, (x,), lambda out: case.criterion(out, y), layers, probes, weights)}
    print(f"\n{k} probes on each of {len(fits)} layers ({len(fits) * k} single-layer samples), one thread, CPU s"
          + (f"; left out (batched probes over {args.batched_mb:g} MB): {', '.join(left)}" if left else ""))
    print(f"{'unbatched (one double backward per probe)':<44s} {t_ref:8.3f} s")
    out = {"unbatched": t_ref, "layers": len(fits), "probes_per_layer": k}
    for name, fn in runs.items():
        try:
            t, got = timed(fn)
        except RuntimeError as e:  # e.g. an op without a forward-mode formula
            print(f"{name:<44s} failed: {str(e).splitlines()[0][:120]}")
            continue
        diff = max(float((got[i] - ref[i]).abs().max() / ref[i].abs().max().clamp_min(1e-30)) for i in fits)
        print(f"{name:<44s} {t:8.3f} s ({t / t_ref:.2f}x the unbatched time); per-probe values differ by "
              f"{diff:.1e} relative")
        out[name] = t
    return out


if __name__ == "__main__":
    main()
