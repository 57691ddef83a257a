"""to_fbgemm vs the fake-quant model on the demo ResNet, one JSON line per (seed, bits, BN folding, engine).

The model is test_quant_torch_int8's fixture (width-8 ResNet trained 40 steps on fake Fashion-MNIST) for
each seed; TRAIN_THREADS (default 1) sets the threads it trains on (its float summation order).
Fields: agree (top-1 agreement), flip_margins (fake-quant top-2 margins of the disagreeing samples,
in classifier-input steps), emax/emean (|logit error| in steps), ref_vs_64 (argmax differences between
the float32 and float64 fake-quant models). Run it under kernel-ISA overrides to compare, e.g.

    PYTHONPATH=. python scripts/check_fbgemm_isa.py 0,1,2,3,4,5
    FBGEMM_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 \\
        PYTHONPATH=. python scripts/check_fbgemm_isa.py 0,4,5
    ONEDNN_MAX_CPU_ISA=AVX512_CORE FBGEMM_ENABLE_INSTRUCTIONS=AVX512 \\
        PYTHONPATH=. python scripts/check_fbgemm_isa.py 0,4,5

TAG=name also saves every output under $TMPDIR/hawq_isa/out_<name>/ for bitwise comparison.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
import warnings

import torch
from torch import nn

from hawq.bitmap import uniform_bitmap
from hawq.data.fashion_mnist import load_fashion_mnist, make_fake_fashion_mnist
from hawq.layers import quantizable_layers
from hawq.models.fashion import fashion_resnet
from hawq.quant import QuantConfig, calibrate, quantize_model
from hawq.quant.torch_int8 import to_fbgemm

CACHE = os.path.join(tempfile.gettempdir(), "hawq_isa")
CASES = [(8, True, "fbgemm"), (4, True, "fbgemm"), (8, False, "fbgemm"), (4, False, "fbgemm"),
         (8, True, "onednn"), (4, True, "onednn")]


def trained(seed: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """test_quant_torch_int8's fixture model for ``seed`` (cached per seed and training thread count)."""
    torch.manual_seed(seed)
    root = make_fake_fashion_mnist(tempfile.mkdtemp(), n_train=512, n_test=256)
    train_x, train_y = load_fashion_mnist(root, "train").tensors
    test_x, _ = load_fashion_mnist(root, "test").tensors
    model = fashion_resnet(width=8)
    threads = int(os.environ.get("TRAIN_THREADS", "1"))
    path = f"{CACHE}/model_{seed}_t{threads}.pt"
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), train_x, test_x
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) * 2 - 0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(40):
        idx = torch.randint(0, len(train_x), (64,), generator=g)
        loss = nn.functional.cross_entropy(model(train_x[idx]), train_y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(model.state_dict(), path)
    torch.set_num_threads(1)
    return model.eval(), train_x, test_x


def main() -> None:
    warnings.filterwarnings("ignore")
    os.makedirs(CACHE, exist_ok=True)
    torch.set_num_threads(1)
    for seed in [int(s) for s in sys.argv[1].split(",")]:
        model, train_x, test_x = trained(seed)
        for wb, fold, eng in CASES:
            bits = uniform_bitmap(quantizable_layers(model), wb, 8)
            fq = quantize_model(copy.deepcopy(model), bits, QuantConfig(fold_bn=fold))
            calibrate(fq, train_x[:128].split(64), lambda m, b: m(b), progress=False)
            fast = to_fbgemm(fq, train_x[:128], engine=eng)
            with torch.no_grad():
                ref, out = fq(test_x), fast(test_x)
                ref64 = copy.deepcopy(fq).double()(test_x.double()).float()
            step = float(fq.fc.input_quant.scale) * float(fq.fc.quantized_weight().abs().sum(1).max())
            err = (out - ref).abs()
            top2 = ref.topk(2, 1).values
            margin = (top2[:, 0] - top2[:, 1]) / step
            flips = out.argmax(1) != ref.argmax(1)
            row = dict(seed=seed, wb=wb, fold=fold, eng=eng, agree=float((~flips).float().mean()),
                       nflip=int(flips.sum()), flip_margins=[round(float(m), 3) for m in margin[flips]],
                       ref_vs_64=int((ref.argmax(1) != ref64.argmax(1)).sum()),
                       emax=float(err.max() / step), emean=float(err.mean() / step),
                       small_margin=int((margin < 1).sum()))
            tag = os.environ.get("TAG")
            if tag:
                os.makedirs(f"{CACHE}/out_{tag}", exist_ok=True)
                torch.save({"out": out, "ref": ref}, f"{CACHE}/out_{tag}/{seed}_{wb}_{fold}_{eng}.pt")
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
