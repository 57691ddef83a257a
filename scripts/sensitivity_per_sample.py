"""Per-sample probes against shared per-layer probes for the layers left to Hutchinson (BERT classifier).

Two measurements on a case of scripts/bench_sensitivity.py (default ``bert_cls``), one thread, CPU time:

1. **Variance per probe**, per layer whose samples are independent: ``--probes`` draws of the shared
   probe ``v . (sum_i H_i) v`` and of the per-sample sum ``sum_i v_i . H_i v_i`` (each sample its own
   ``v_i``), both from one double backward in the layer's output (the same products hawq computes); the
   ratio of their variances is what per-sample probes save per double backward.
2. **Coverage and cost** of ``hessian_traces`` with ``probing="per_sample"`` (the default) and
   ``"per_layer"`` over ``--seeds`` probe seeds at the case's tolerance, against a reference from shared
   probes at ``--ref-tol``: z-scores ``(estimate - reference) / hypot(std_err, reference std_err)``
   (RMS, share beyond 2 and 3, largest), Hutchinson products and CPU seconds per run.

    PYTHONPATH=. OMP_NUM_THREADS=1 python scripts/sensitivity_per_sample.py --case bert_cls
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_sensitivity as bench  # noqa: E402

from hawq.sensitivity import OutputLoss, hessian_traces  # noqa: E402
from hawq.sensitivity.hvp import HessianOperator  # noqa: E402
from hawq.sensitivity.traces import per_sample_output_probe, probe_seed  # noqa: E402


def variance_ratios(case: bench.Case, loss: OutputLoss, probes: int, seed: int) -> dict[str, tuple[float, float]]:
    """Per layer: (variance of the shared probe's value, of the per-sample sum), ``probes`` draws each."""
    info: dict = {}
    hessian_traces(case.model, loss, case.batches[:1], tol=10.0, max_probes=2, min_probes=2, progress=False,
                   info=info, variance_reduction="none")  # only to learn which layers are independent
    names = info["per_sample_layers"]
    modules = dict(case.model.named_modules())
    out = {}
    with HessianOperator(case.model, loss, case.batches[:1], names, [modules[n].weight for n in names],
                         per_sample=range(len(names))) as op:
        session = op._open(0)
        for i, name in enumerate(names):
            x = session.io[i][0]
            per_sample = session.per_sample_forms(
                i, lambda j, n=name, x=x: per_sample_output_probe(modules[n], x, probe_seed(seed, n, "ps", j)), probes)
            # a shared probe: one weight probe for every sample, mapped through the layer the same way
            shared = session.per_sample_forms(i, lambda j, n=name, x=x: shared_probe(modules[n], x, seed, j), probes)
            out[name] = (float(shared.sum(1).var()), float(per_sample.sum(1).var()))
    return out


def shared_probe(module: torch.nn.Module, x: torch.Tensor, seed: int, j: int) -> torch.Tensor:
    """``J_i v`` for one Rademacher weight probe ``v`` shared by every sample."""
    w = module.weight
    gen = torch.Generator().manual_seed(probe_seed(seed, "shared", j))
    v = torch.randint(0, 2, w.shape, generator=gen, dtype=torch.int8).to(w.dtype) * 2 - 1
    if isinstance(module, torch.nn.Embedding):
        u = v[x]
        return u.masked_fill((x == module.padding_idx)[..., None], 0) if module.padding_idx is not None else u
    if isinstance(module, torch.nn.Linear):
        return torch.nn.functional.linear(x, v)
    return torch.nn.functional.conv2d(x, v, None, module.stride, module.padding, module.dilation, module.groups)


def coverage(case: bench.Case, loss: OutputLoss, seeds: int, ref_tol: float) -> dict[str, dict[str, float]]:
    ref = hessian_traces(case.model, loss, case.batches, tol=ref_tol, max_probes=20000, seed=7, progress=False,
                         probing="per_layer", variance_reduction="none")
    out = {}
    for probing in ("per_sample", "per_layer"):
        zs, products, c0 = [], 0, time.process_time()
        for s in range(seeds):
            got = hessian_traces(case.model, loss, case.batches, tol=case.tol, max_probes=case.max_probes,
                                 min_probes=case.min_probes, seed=100 + s, progress=False, probing=probing)
            for name, t in got.items():
                if t.estimator == "hutchinson" and t.curvature == "hessian" and t.std_err > 0:
                    zs.append((t.mean - ref[name].mean) / math.hypot(t.std_err, ref[name].std_err))
                    products += t.n
        z = torch.tensor(zs)
        out[probing] = {"cpu_s_per_run": (time.process_time() - c0) / seeds, "products_per_run": products / seeds,
                        "z": len(zs), "rms_z": float(z.square().mean().sqrt()),
                        "beyond_2": float((z.abs() > 2).float().mean()),
                        "beyond_3": float((z.abs() > 3).float().mean()), "max_z": float(z.abs().max())}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="bert_cls", help="a case key of scripts/bench_sensitivity.py")
    ap.add_argument("--probes", type=int, default=24, help="draws per layer and kind for the variances")
    ap.add_argument("--seeds", type=int, default=12, help="probe seeds for the coverage check")
    ap.add_argument("--ref-tol", type=float, default=0.005, help="tolerance of the shared-probe reference")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.case not in bench.CASES or args.probes < 2 or args.seeds < 1 or not args.ref_tol > 0:
        # one line, exit 2, before any model is built
        print(f"error: --case must be one of {', '.join(bench.CASES)}; --probes >= 2, --seeds >= 1, --ref-tol > 0",
              file=sys.stderr)
        raise SystemExit(2)
    torch.set_num_threads(1)
    case = bench.CASES[args.case][1](args.seed)
    loss = OutputLoss(lambda m, b: m(b[0]), lambda out, b: case.criterion(out, b[1]))
    print(f"{case.title}; torch {torch.__version__}, 1 thread")
    ratios = variance_ratios(case, loss, args.probes, args.seed)
    print(f"\nvariance of one double backward's value, {args.probes} draws each:")
    print(f"{'layer':60s} {'shared':>11s} {'per sample':>11s} {'ratio':>7s}")
    for name, (shared, per_sample) in ratios.items():
        print(f"{name:60s} {shared:11.4g} {per_sample:11.4g} {shared / max(per_sample, 1e-300):7.2f}")
    cover = coverage(case, loss, args.seeds, args.ref_tol)
    print(f"\nhessian_traces over {args.seeds} seeds at tol {case.tol}, against shared probes at tol "
          f"{args.ref_tol}:")
    for probing, c in cover.items():
        print(f"  {probing:10s} CPU {c['cpu_s_per_run']:.2f} s/run, {c['products_per_run']:.1f} Hutchinson "
              "products/run; "
              f"{c['z']} z: RMS {c['rms_z']:.2f}, beyond 2: {100 * c['beyond_2']:.1f}%, beyond 3: "
              f"{100 * c['beyond_3']:.1f}%, max {c['max_z']:.2f}")
    return {"ratios": ratios, "coverage": cover}


if __name__ == "__main__":
    main()
