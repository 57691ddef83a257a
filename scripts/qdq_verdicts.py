"""The QDQ export verdict (hawq.export.deploy.check_qdq) on torchvision ResNets: how far onnxruntime's
outputs are from the PyTorch fake-quant model, next to how far that model's own float32 run is from
its float64 run on the same inputs (the spread the tolerance is built from).

ResNets: random init with non-trivial BatchNorm statistics (drawn), 10 classes, mixed 4/8-bit weights
(every other layer at 4), 8-bit activations, BN folded, calibrated on 8 random 64x64 images and
checked on 8 others. ``minilm``: the real all-MiniLM-L6-v2 sentence encoder, the same mixed map with
the family's pins, per-group scales (64), calibrated on 16 sentences of the bundled sentence file
and checked on the next 8 (32 tokens, padded); its output is an embedding, so no argmax test.

    .venv/bin/python scripts/qdq_verdicts.py resnet18 resnet50 minilm
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hawq.bitmap import LayerBits  # noqa: E402
from hawq.export import export_onnx  # noqa: E402
from hawq.export.deploy import check_qdq  # noqa: E402
from hawq.layers import quantizable_layers  # noqa: E402
from hawq.quant import QuantConfig, calibrate, quantize_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="torchvision model names, e.g. resnet18 resnet50")
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name in args.models:
        if name == "minilm":
            minilm()
            continue
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(num_classes=10)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
        model.eval()
        bits = {n: LayerBits(4 if i % 2 else 8, 8) for i, n in enumerate(quantizable_layers(model))}
        quantize_model(model, bits, QuantConfig(fold_bn=True))
        x = torch.randn(16, 3, args.size, args.size)
        calibrate(model, [x[:8]], lambda m, b: m(b), progress=False)
        model.eval()
        path = export_onnx(model, x[:2], Path(tempfile.mkdtemp()) / "model.onnx")
        c = check_qdq(model, path, (x[8:],), logits=True)
        print(f"{name}: onnx vs torch float32 max {c['max_abs_diff']:.4g} ({c['max_diff_in_steps']:.2f} steps), "
              f"torch float32 vs float64 max {c['fp32_fp64_max_abs_diff']:.4g}, tolerance {c['tolerance']:.4g}; "
              f"argmax differs on {c['argmax_disagreements']} (float64: {c['fp32_fp64_argmax_disagreements']}) "
              f"of 8; verdict {c['verdict']}")


def minilm() -> None:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from hawq.data.text import default_sentences_path, load_tokenizer, read_sentences
    from hawq.export.config import ExportConfig
    from hawq.export.deploy import export_artifacts
    from hawq.models import get_model_spec

    spec = get_model_spec("minilm")
    model = spec.builder().eval()
    bits = {n: LayerBits(4 if i % 2 else 8, 8) for i, n in enumerate(spec.layers(model))}
    for n, pin in spec.default_pins.items():
        bits[n] = LayerBits(pin.get("weight", 8), pin.get("activation", 8))
    quant = QuantConfig(group_size=64)
    quantize_model(model, bits, quant)
    tokenizer, sentences = load_tokenizer("minilm"), read_sentences(default_sentences_path())

    def encode(a: int, b: int) -> dict:
        return dict(tokenizer(sentences[a:b], truncation=True, max_length=32, padding="max_length",
                              return_tensors="pt"))

    calibrate(model, [encode(0, 16)], lambda m, b: m(**b), progress=False)
    model.eval()
    out = export_artifacts(model, bits, Path(tempfile.mkdtemp()), ExportConfig(safetensors=False),
                           {"name": "minilm", "kwargs": {}}, quant, encode(16, 24), logits=False)
    c = out["onnx"]["check"]
    print(f"minilm: onnx vs torch float32 max {c['max_abs_diff']:.4g} ({c['max_diff_in_steps']:.2f} steps), "
          f"torch float32 vs float64 max {c['fp32_fp64_max_abs_diff']:.4g}, tolerance {c['tolerance']:.4g}; "
          f"verdict {c['verdict']}")


if __name__ == "__main__":
    main()
