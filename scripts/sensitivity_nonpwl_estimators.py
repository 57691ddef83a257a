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
"""

from __future__ import annotations

import argparse
import sys
import time
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
    args = ap.parse_args(argv)
    if args.case not in bench.CASES:
        raise SystemExit(f"--case: unknown case '{args.case}' (one of {', '.join(bench.CASES)})")
    if args.probes < 2:
        raise SystemExit("--probes must be >= 2")
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
    return result


if __name__ == "__main__":
    main()
