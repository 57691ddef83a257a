"""Train the FP32 demo model shipped as checkpoints/fashion_resnet_fp32.safetensors.

    python scripts/train_fp32.py --epochs 2 --out checkpoints/fashion_resnet_fp32.safetensors

The recipe of the shipped file: seed 0, SGD (momentum 0.9, Nesterov, weight decay 5e-4), one-cycle
learning rate peaking at 0.1, batch 128, 2 epochs over the 60k training images; it reached 90.32%
top-1 on the 10k test images. Prints test top-1 after each epoch.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from hawq.data import build_data
from hawq.data.config import DataConfig
from hawq.models import get_model_spec, get_task


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.1)
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
    loader = data.loader("train", args.batch_size, shuffle=True, seed=args.seed)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.epochs * len(loader))
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        top1 = task.evaluate(model, data.loader("test", 1000), progress=False)["top1"]
        print(f"epoch {epoch + 1}: test top-1 {top1:.2f}%  ({time.perf_counter() - t0:.0f} s)", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp),
              metadata={"model": "fashion_resnet", "epochs": str(args.epochs), "seed": str(args.seed),
                        "test_top1": f"{top1:.2f}"})
    tmp.replace(out)


if __name__ == "__main__":
    main()
