"""Integer-only export of torchvision Inception-V3 as deployed: the verdict of ``model_int.onnx``
(hawq.export.deploy.check_integer: bit-identical to the PyTorch integer model, or fail) and how far
the integer model and PyTorch's own float32 fake-quant run are from the fake-quant model in float64.

The model: hawq's ``inception_v3`` builder without the training-only aux head, ``transform_input=True``
(as with ImageNet weights), random init with BatchNorm statistics set by one train-mode pass over the
calibration images, mixed 4/8-bit weights (every third layer at 4), 8-bit activations; calibrated on
4 random images in [0, 1] at ``--size`` and checked on 4 others.

    .venv/bin/python scripts/integer_inception.py --size 299
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import onnx
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hawq.bitmap import LayerBits  # noqa: E402
from hawq.export import export_onnx_integer  # noqa: E402
from hawq.export.deploy import check_integer  # noqa: E402
from hawq.layers import quantizable_layers  # noqa: E402
from hawq.models.registry import get_model_spec  # noqa: E402
from hawq.quant import QuantConfig, calibrate, quantize_model, to_integer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=299)
    ap.add_argument("--classes", type=int, default=1000)
    args = ap.parse_args()
    if args.size < 75:
        print("--size: Inception-V3 needs at least 75x75 inputs", file=sys.stderr)
        sys.exit(2)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    t0 = time.process_time()
    net = get_model_spec("inception_v3").builder(num_classes=args.classes, aux_logits=False, transform_input=True)
    x = torch.rand(8, 3, args.size, args.size)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # the statistics of this one batch
    with torch.no_grad():
        net.train()(x[:4])
    net.eval()
    bits = {n: LayerBits(4 if i % 3 == 1 else 8, 8) for i, n in enumerate(quantizable_layers(net))}
    q = quantize_model(net, bits, QuantConfig()).eval()
    calibrate(q, [x[:4]], lambda m, b: m(b), progress=False)
    t1 = time.process_time()
    int_model = to_integer(q, x[:2])
    path = export_onnx_integer(int_model, x[:2], Path(tempfile.mkdtemp()) / "model_int.onnx")
    t2 = time.process_time()
    check = check_integer(int_model, path, x[4:])
    t3 = time.process_time()
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    with torch.no_grad():
        ref64 = copy.deepcopy(q).double()(x[4:].double())
        fq32 = q(x[4:]).double()
        got = int_model(x[4:]).double()
    top = float(ref64.abs().max())
    d_int, d_fq32 = float((got - ref64).abs().max()), float((fq32 - ref64).abs().max())
    print(f"inception_v3 {args.size}x{args.size}: model_int.onnx {check['verdict']} ({check['verdict_reason']}; "
          f"exact fraction {check['exact_fraction']}, argmax agreement {check['argmax_agreement']}); "
          f"{len(ops)} ONNX nodes, {ops.count('ConvInteger')} ConvInteger, {ops.count('MatMulInteger')} MatMulInteger, "
          f"{ops.count('Concat')} Concat, {ops.count('Pad')} Pad")
    print(f"  vs the fake-quant model in float64 (max |logit| {top:.4g}): integer model max diff "
          f"{d_int:.4g}, PyTorch float32 fake-quant {d_fq32:.4g}; "
          f"argmax agreement integer {float((got.argmax(1) == ref64.argmax(1)).float().mean()):.3f}, "
          f"float32 {float((fq32.argmax(1) == ref64.argmax(1)).float().mean()):.3f}")
    print(f"  CPU seconds (1 thread): build+calibrate {t1 - t0:.1f}, to_integer+export {t2 - t1:.1f}, "
          f"check on 4 images {t3 - t2:.1f}")


if __name__ == "__main__":
    main()
