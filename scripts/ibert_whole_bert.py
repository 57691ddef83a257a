"""Integer-only whole BERT models vs their I-BERT-aware fake-quant models, and their ONNX files.

``quantize_model(model, bits, QuantConfig(transformer="ibert"))`` on a Hugging Face BERT traces the
whole model (``hawq.quant.ibert.TraceableBert``: embeddings, every encoder layer, pooler or mean
pooling); ``to_integer`` converts it and ``export_onnx_integer`` writes it with the inputs
``input_ids, attention_mask, token_type_ids``. Models: all-MiniLM-L6-v2 (real weights) on the bundled
sentences (calibrated on the first 32, compared on the next 32, padded to 24 tokens), w8a8 per
channel and w4a8 with per-group (64) weights; a 2-layer 32-wide BERT classifier (random weights)
on random ids with padding. "steps" = max |diff| / (max |reference| / 127); reference = the
fake-quant model in float64 with the float32 model's weight codes (:func:`same_codes_float64`), and
the float32 fake-quant model's own distance to it for scale; "equal" = within 1e-6 of max |reference|.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python scripts/ibert_whole_bert.py
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hawq.bitmap import uniform_bitmap  # noqa: E402
from hawq.export.onnx_qdq import compare_onnx_integer, export_onnx_integer  # noqa: E402
from hawq.layers import quantizable_layers  # noqa: E402
from hawq.quant import QuantConfig, calibrate, quantize_model, to_integer  # noqa: E402

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def same_codes_float64(q: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of the fake-quant model with the *same* weight codes: each quantized layer's weight
    is replaced by its fake-quantized float32 value first (rounding float64 weights anew would move
    values near a code boundary to the other code)."""
    q64 = copy.deepcopy(q)
    with torch.no_grad():
        for m in q64.modules():
            if hasattr(m, "quantized_weight") and getattr(m, "weight_bits", 32) < 32:
                m.weight.copy_(m.quantized_weight())
    return q64.double()


def compare(model: torch.nn.Module, weight_bits: int, group_size: int | None, calib: Batch, test: Batch,
            logits: bool) -> str:
    q = quantize_model(copy.deepcopy(model), uniform_bitmap(quantizable_layers(model), weight_bits, 8),
                       QuantConfig(transformer="ibert", group_size=group_size))
    calibrate(q, [calib], lambda m, b: m(*b), progress=False)
    q.eval()
    start = time.perf_counter()
    int_model = to_integer(q, calib)
    convert_s = time.perf_counter() - start
    with torch.no_grad():
        out = int_model(*test).double()
        fq32 = q(*test).double()
        ref = same_codes_float64(q)(*test)
        fp32 = model(*test)
        fp32 = (fp32 if isinstance(fp32, torch.Tensor) else fp32.logits).double()

    def agreement(a: torch.Tensor, b: torch.Tensor) -> str:
        steps = float((a - b).abs().max()) / (float(b.abs().max()) / 127)
        equal = float(((a - b).abs() <= 1e-6 * b.abs().max()).double().mean())
        text = (f"{steps:.3f} steps at worst, {equal:.2%} of outputs equal, "
                f"min cosine {float(F.cosine_similarity(a, b, dim=1).min()):.7f}")
        return text + (f", argmax {float((a.argmax(1) == b.argmax(1)).double().mean()):.0%}" if logits else "")

    text = (f"integer vs fake-quant (float64): {agreement(out, ref)}; fake-quant float32 vs float64: "
            f"{agreement(fq32, ref)}")
    if not logits:
        text += (f"; cosine to FP32, mean: integer {float(F.cosine_similarity(out, fp32, dim=1).mean()):.4f}, "
                 f"fake-quant float32 {float(F.cosine_similarity(fq32, fp32, dim=1).mean()):.4f}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model_int.onnx"
        export_onnx_integer(int_model, test, path)
        check = compare_onnx_integer(int_model, path, test)
        size = path.stat().st_size / 1e6
    return text + (f"; ONNX {size:.1f} MB, {check['exact_fraction']:.0%} of outputs bit-identical; "
                   f"to_integer {convert_s:.1f} s")


def main() -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import BertConfig, BertForSequenceClassification

    from hawq.data.text import default_sentences_path, load_tokenizer, read_sentences
    from hawq.models.bert import minilm

    tokenizer, sentences = load_tokenizer("minilm"), read_sentences(default_sentences_path())

    def tokens(part: list[str]) -> Batch:
        t = tokenizer(part, truncation=True, max_length=24, padding="max_length", return_tensors="pt",
                      return_token_type_ids=True)
        return t["input_ids"], t["attention_mask"], t["token_type_ids"]

    model = minilm().eval()
    calib, test = tokens(sentences[:32]), tokens(sentences[32:64])
    for bits, group in ((8, None), (4, 64)):
        label = f"w{bits}a8" + (f", groups of {group}" if group else ", per channel")
        print(f"MiniLM (whole encoder), 32 held-out sentences, {label}: "
              + compare(model, bits, group, calib, test, logits=False), flush=True)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=3, attn_implementation="eager")
    tiny = BertForSequenceClassification(cfg).eval()
    g = torch.Generator().manual_seed(1)

    def random_batch(n: int) -> Batch:
        mask = (torch.arange(16) < torch.randint(6, 17, (n, 1), generator=g)).long()
        return torch.randint(1000, 30000, (n, 16), generator=g) * mask, mask, torch.zeros(n, 16, dtype=torch.long)

    print("2-layer BERT classifier (random weights), 256 random sequences, w8a8: "
          + compare(tiny, 8, None, random_batch(64), random_batch(256), logits=True), flush=True)


if __name__ == "__main__":
    main()
