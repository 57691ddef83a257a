"""CPU cost of RetinaNet's sensitivity stage: the training loss (per-layer Hutchinson) against the
label-free loss on the raw head outputs (output-space probes for every layer at once).

    OMP_NUM_THREADS=1 python scripts/sensitivity_retinanet.py [--size 128] [--batch 4] [--loss lf task]

The stand-in data of the tests (``make_fake_coco``: noisy images with bright rectangles, 2 classes),
torchvision RetinaNet-ResNet50-FPN with a 91-way head at random init (no weights are downloaded),
resized to ``--size``; one batch, ``configs/retinanet.yaml``'s tol 0.1 and probes 8..100, seed 0. For
each loss: CPU seconds (``time.process_time``), the estimators used, the passes spent (backward passes
for ``gn_sampled``, HVPs per layer for ``hutchinson``) and, with both losses, the median ratio of the
traces (they measure different curvatures: the focal + L1 training loss against the head outputs'
Gauss-Newton matrix, so only their ranking is comparable). Also one training forward+backward on the
same batch, the unit the finetune stage pays per batch.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time

import torch

from hawq.data import build_data
from hawq.data.coco import make_fake_coco
from hawq.data.config import DataConfig
from hawq.models import get_task
from hawq.models.compat import build_model
from hawq.models.config import ModelConfig
from hawq.sensitivity import hessian_traces, label_free_loss, task_loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--loss", nargs="+", choices=["lf", "task"], default=["lf", "task"])
    args = ap.parse_args()
    root = make_fake_coco(tempfile.mkdtemp(), n_train=args.batch, n_val=1, size=args.size, classes=2)
    coco = build_data(DataConfig(name="coco", root=str(root)))
    torch.manual_seed(0)
    spec, model = build_model(ModelConfig(name="retinanet_resnet50_fpn",
                                          kwargs={"min_size": args.size, "max_size": args.size}), 91)
    model.eval()
    task = get_task(spec.task)
    batch = next(iter(coco.loader("train", args.batch)))
    t0 = time.process_time()
    task.loss(model, batch).backward()
    model.zero_grad(set_to_none=True)
    print(f"one training forward+backward: {time.process_time() - t0:.2f} CPU s")
    layers = spec.layers(model)
    results = {}
    for loss in args.loss:
        loss_fn = label_free_loss(task, model) if loss == "lf" else task_loss(task)
        t0 = time.process_time()
        traces = hessian_traces(model, loss_fn, [batch], layers=layers, tol=0.1, min_probes=8, max_probes=100,
                                seed=0, progress=False)
        seconds = time.process_time() - t0
        kinds = collections.Counter(t.estimator for t in traces.values())
        passes = {k: sorted({t.n for t in traces.values() if t.estimator == k}) for k in kinds}
        print(f"{loss}: {seconds:.1f} CPU s, {dict(kinds)} of {len(layers)} layers, passes {passes}")
        results[loss] = traces
    if len(results) == 2:
        ratios = torch.tensor([results["lf"][n].mean / results["task"][n].mean for n in layers
                               if results["task"][n].mean > 0])
        order = [sorted(layers, key=lambda n, r=r: results[r][n].mean) for r in ("lf", "task")]
        top = len(set(order[0][-10:]) & set(order[1][-10:]))
        print(f"trace ratio lf/task: median {float(ratios.median()):.3g}; top-10 layers shared: {top}/10")


if __name__ == "__main__":
    main()
