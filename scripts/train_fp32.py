"""Train the FP32 demo model shipped as checkpoints/fashion_resnet_fp32.safetensors.

    python scripts/train_fp32.py --epochs 4 --out checkpoints/fashion_resnet_fp32.safetensors

Uses the same training loop as the pipeline (hawq.train.train, no teacher), seeded, on the
Fashion-MNIST training split; prints test top-1 after each epoch.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from hawq.data import build_data
from hawq.data.config import DataConfig
from hawq.models import get_model_spec, get_task
from hawq.train import train
from hawq.train.config import DistillConfig, TrainConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=float, default=4.0)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", default=DataConfig.root)
    p.add_argument("--out", default="checkpoints/fashion_resnet_fp32.safetensors")
    args = p.parse_args()

    torch.manual_seed(args.seed)
    data = build_data(DataConfig(root=args.root))
    spec = get_model_spec("fashion_resnet")
    task = get_task(spec.task)
    model = spec.builder(num_classes=10)
    cfg = TrainConfig(epochs=args.epochs, optimizer="sgd", lr=args.lr, momentum=0.9, nesterov=True,
                      weight_decay=5e-4, schedule="cosine", warmup_steps=100, batch_size=args.batch_size,
                      distill=DistillConfig(enabled=False))
    test = data.loader("test", 1000)
    t0 = time.perf_counter()
    history = train(model, task, data.train, cfg, seed=args.seed,
                    eval_fn=lambda m: task.evaluate(m, test, progress=False))
    elapsed = time.perf_counter() - t0
    for row in history:
        print({k: v for k, v in row.items() if not isinstance(v, (list, dict))})
    model.eval()
    final = task.evaluate(model, test, progress=False)
    print(f"fp32 top-1 {final['top1']:.2f}% after {args.epochs} epochs, {elapsed:.0f} s "
          f"({dataclasses.asdict(cfg)['optimizer']}, lr {args.lr})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out),
              metadata={"model": "fashion_resnet", "epochs": str(args.epochs), "seed": str(args.seed),
                        "test_top1": f"{final['top1']:.2f}"})


if __name__ == "__main__":
    main()
