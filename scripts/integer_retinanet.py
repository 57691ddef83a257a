"""Integer-only export of torchvision RetinaNet-ResNet50-FPN (backbone + FPN + heads): the verdict of
``model_int.onnx`` (hawq.export.deploy.check_integer: bit-identical to the PyTorch integer model, or
fail) at the export size and, with the same file, at other image sizes; how far the integer head
outputs are from the fake-quant model's; and the detections decoded from them in float
(hawq.models.retinanet.decode_head_outputs) against torchvision's own forward of the fake-quant model.

The model: hawq's ``retinanet_resnet50_fpn`` builder (frozen BN at its defaults), random init,
``min_size = max_size = --size``, mixed 4/8-bit weights (every third layer at 4), 8-bit activations;
calibrated on 2 random images in [0, 1] of ``--size`` x ``--size``, exported from them, and checked on 2
others and on one random normalised input per ``--check-sizes`` entry.

    .venv/bin/python scripts/integer_retinanet.py --size 256 --check-sizes 320x480,512x512
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hawq.bitmap import LayerBits  # noqa: E402
from hawq.export import export_onnx_integer  # noqa: E402
from hawq.export.deploy import DetectionHeads, check_integer  # noqa: E402
from hawq.layers import quantizable_layers  # noqa: E402
from hawq.models.retinanet import decode_head_outputs  # noqa: E402
from hawq.quant import QuantConfig, calibrate, quantize_model, to_integer  # noqa: E402


def _sizes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in filter(None, text.split(",")):
        h, _, w = item.partition("x")
        if not (h.isdigit() and w.isdigit()) or min(int(h), int(w)) < 32:
            raise ValueError(item)
        out.append((int(h), int(w)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--classes", type=int, default=91)
    ap.add_argument("--check-sizes", default="320x480,512x512", help="HxW,... (each >= 32)")
    args = ap.parse_args()
    if args.size < 32:
        print("--size: at least 32 (RetinaNet's inputs are padded to multiples of 32)", file=sys.stderr)
        sys.exit(2)
    try:
        checks = _sizes(args.check_sizes)
    except ValueError as e:
        print(f"--check-sizes: '{e}' is not HxW with both sides >= 32", file=sys.stderr)
        sys.exit(2)
    from hawq.models.registry import get_model_spec

    torch.set_num_threads(1)
    torch.manual_seed(0)
    t0 = time.process_time()
    model = get_model_spec("retinanet_resnet50_fpn").builder(
        num_classes=args.classes, min_size=args.size, max_size=args.size, score_thresh=0.0,
        topk_candidates=100, detections_per_img=10).eval()
    bits = {n: LayerBits(4 if i % 3 == 1 else 8, 8) for i, n in enumerate(quantizable_layers(model))}
    quantize_model(model, bits, QuantConfig())
    images = [torch.rand(3, args.size, args.size) for _ in range(4)]
    heads = DetectionHeads(model).eval()
    with torch.no_grad():
        calib = model.transform(images[:2])[0].tensors
        image_list = model.transform(images[2:])[0]
    calibrate(heads, [calib], lambda m, b: m(b), progress=False)
    t1 = time.process_time()
    int_model = to_integer(heads, calib)
    path = export_onnx_integer(int_model, calib, Path(tempfile.mkdtemp()) / "model_int.onnx", dynamic_sizes=True)
    t2 = time.process_time()
    check = check_integer(int_model, path, image_list.tensors)
    t3 = time.process_time()
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    print(f"retinanet_resnet50_fpn {args.size}x{args.size}, {args.classes} classes: model_int.onnx {check['verdict']} "
          f"({check['verdict_reason']}; exact fraction {check['exact_fraction']}); {len(ops)} ONNX nodes, "
          f"{ops.count('ConvInteger')} ConvInteger, {ops.count('Resize')} Resize, "
          f"{path.stat().st_size / 1e6:.1f} MB")
    with torch.no_grad():
        fake, ints = heads(image_list.tensors), int_model(image_list.tensors)
        expected = model(images[2:])
    step = float(fake.abs().max()) / 127
    sizes = [tuple(t.shape[-2:]) for t in images[2:]]
    got = decode_head_outputs(model, ints, image_list, sizes)
    same_label = sum(int(g["labels"][0]) == int(e["labels"][0]) for g, e in zip(got, expected, strict=True))
    score_gap = max(abs(float(g["scores"][0]) - float(e["scores"][0])) for g, e in zip(got, expected, strict=True))
    from torchvision.ops import box_iou

    iou = min(float(box_iou(g["boxes"][:1], e["boxes"][:1])) for g, e in zip(got, expected, strict=True))
    worst = float((ints - fake).abs().max())
    print(f"  integer head outputs vs fake-quant: max diff {worst:.4g} ({worst / step:.3f} 8-bit output steps); "
          f"decoded top detection per image vs torchvision's forward of the fake-quant model: score gap "
          f"{score_gap:.2e} (bound max diff / 4 = {worst / 4:.2e}), label equal {same_label}/{len(got)}, "
          f"min IoU {iou:.3f} (an untrained head scores every anchor alike: the top one is a tie)")
    print(f"  CPU seconds (1 thread): build+calibrate {t1 - t0:.1f}, to_integer+export {t2 - t1:.1f}, "
          f"check on 2 images {t3 - t2:.1f}")
    for h, w in checks:
        t = time.process_time()
        other = check_integer(int_model, path, torch.randn(1, 3, h, w))
        print(f"  same file at {h}x{w}: {other['verdict']} ({other['verdict_reason']}), "
              f"{time.process_time() - t:.1f} CPU s")


if __name__ == "__main__":
    main()
