"""Per-layer traces of a 1000-class torchvision ResNet: the default estimator against the alternatives.

    python scripts/sensitivity_wide_outputs.py [--model resnet18] [--exact [--seeds 10]]

For each case (random init; "confident": ``fc`` scaled until the mean max softmax exceeds 0.99) it
runs ``hessian_traces`` with the default (``estimator="auto"``: sampled output-space probes,
``gn_sampled``), with ``estimator="hutchinson"`` (what the default did before output-space probes:
1000 classes exceeded the direction cap and every layer fell back to Hutchinson + Nyström++) and,
with ``--exact``, the exact path (``exact_directions=1000``, one backward pass per output direction)
as the reference for the agreement column (z = (estimate - exact) / std_err). One batch of 8 random
64x64 images, tol 0.1, probes 8..64, one thread, CPU seconds (``time.process_time``). Needs
torchvision (no weights are downloaded).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from hawq.sensitivity import OutputLoss, hessian_traces


def make_case(arch: str, case: str) -> tuple[torch.nn.Module, list]:
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=1000).eval()
    x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 1000, (8,))
    if case == "confident":  # like a trained classifier: scale the head until it is sure
        with torch.no_grad():
            while float(torch.softmax(model(x), -1).max(-1).values.mean()) < 0.99:
                model.fc.weight.mul_(1.5)
                model.fc.bias.mul_(1.5)
    return model, [(x, y)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18", choices=["resnet18", "resnet50"])
    ap.add_argument("--exact", action="store_true", help="also the exact reference (1000 backward passes)")
    ap.add_argument("--seeds", type=int, default=1,
                    help="with --exact: repeat the default with this many probe seeds and pool the z-scores "
                         "(one seed's layers share their probes, so their z-scores move together)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    loss_fn = OutputLoss(lambda m, b: m(b[0]), lambda o, b: F.cross_entropy(o, b[1]))
    common = {"tol": 0.1, "min_probes": 8, "max_probes": 64, "seed": 0, "progress": False}
    variants = {"default (gn_sampled)": {}, "hutchinson (before)": {"estimator": "hutchinson"}}
    if args.exact:
        variants["exact reference"] = {"exact_directions": 1000}
    print(f"| case | {' | '.join(variants)} |")
    for case in ("random", "confident"):
        model, batches = make_case(args.model, case)
        results, cells = {}, []
        for name, kw in variants.items():
            t0 = time.process_time()
            results[name] = hessian_traces(model, loss_fn, batches, **common, **kw)
            seconds = time.process_time() - t0
            cost = max(t.n for t in results[name].values()) if "hutchinson" not in name else \
                f"{sum(t.n for t in results[name].values())} HVPs"
            cells.append(f"{seconds:.1f} s ({cost})")
        if args.exact:
            ref = results["exact reference"]
            for name in list(variants)[:2]:
                z = [(t.mean - ref[k].mean) / t.std_err for k, t in results[name].items() if t.std_err > 0]
                cells[list(variants).index(name)] += (f", mean abs z {sum(map(abs, z)) / len(z):.2f}, "
                                                      f"max {max(map(abs, z)):.2f}")
            if args.seeds > 1:
                z = []
                for seed in range(args.seeds):
                    got = hessian_traces(model, loss_fn, batches, **{**common, "seed": seed})
                    z += [(t.mean - ref[k].mean) / t.std_err for k, t in got.items() if t.std_err > 0]
                cells[0] += (f"; {args.seeds} seeds: mean abs z {sum(map(abs, z)) / len(z):.2f}, "
                             f"max {max(map(abs, z)):.2f}, beyond 3: {sum(abs(v) > 3 for v in z)}/{len(z)}")
        rel = max(t.std_err / abs(t.mean) for t in results["default (gn_sampled)"].values() if t.mean)
        print(f"| {case} | {' | '.join(cells)} |  (default: max relative std_err {rel:.3f})")
        assert all(math.isfinite(t.mean) for r in results.values() for t in r.values())


if __name__ == "__main__":
    main()
