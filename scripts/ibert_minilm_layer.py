"""Integer I-BERT MiniLM encoder layer vs its I-BERT-aware fake-quant model, on held-out real sentences.

MiniLM's (all-MiniLM-L6-v2) first encoder layer, w8a8, calibrated on half of the sentences of the
bundled sentence file and compared on the other half: ``to_integer``
against the fake-quant model (``quantize_model(..., QuantConfig(transformer="ibert"))``) evaluated in float64.
One encoder layer (``TraceableBertLayer``); the whole model is scripts/ibert_whole_bert.py's.
"steps" = max |diff| / (max |reference| / 127).

    .venv/bin/python scripts/ibert_minilm_layer.py
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hawq.bitmap import uniform_bitmap  # noqa: E402
from hawq.layers import quantizable_layers  # noqa: E402
from hawq.quant import QuantConfig, calibrate, quantize_model, to_integer  # noqa: E402
from hawq.quant.ibert import TraceableBertLayer, additive_attention_mask  # noqa: E402


def compare(layer: torch.nn.Module, calib: tuple[torch.Tensor, ...], test: tuple[torch.Tensor, ...]) -> str:
    q = quantize_model(copy.deepcopy(layer), uniform_bitmap(quantizable_layers(layer), 8, 8),
                       QuantConfig(transformer="ibert"))
    calibrate(q, [calib], lambda m, b: m(*b), progress=False)
    int_model = to_integer(q, example_input=calib)
    with torch.no_grad():
        out = int_model(*test).double()
        ref = copy.deepcopy(q).double()(*(t.double() for t in test))
    steps = float((out - ref).abs().max()) / (float(ref.abs().max()) / 127)
    equal = float(((out - ref).abs() <= 1e-6 * ref.abs().max()).double().mean())
    cos = float(F.cosine_similarity(out.flatten(1), ref.flatten(1), dim=1).min())
    return f"{steps:.3f} output steps at worst, {equal:.3%} of outputs equal, min cosine {cos:.8f}"


def minilm_layer0() -> tuple[torch.nn.Module, Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]]:
    """MiniLM's first encoder layer and ``embed(n, max_length) -> (hidden, padding mask)`` of the first
    ``n`` bundled sentences (the layer's real input; also the fixture of tests/test_integer_bert.py)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from hawq.data.text import default_sentences_path, load_tokenizer, read_sentences
    from hawq.models.bert import minilm

    model = minilm().eval()
    tokenizer, sentences = load_tokenizer("minilm"), read_sentences(default_sentences_path())

    def embed(n: int, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = tokenizer(sentences[:n], truncation=True, max_length=max_length, padding="max_length",
                           return_tensors="pt")
        with torch.no_grad():  # the real input of encoder layer 0
            return model.bert.embeddings(input_ids=tokens["input_ids"]), tokens["attention_mask"]

    return model.bert.encoder.layer[0], embed


def main() -> None:
    torch.set_num_threads(1)
    hf, embed = minilm_layer0()
    hidden, padding = embed(24, 12)
    hidden = hidden[padding.sum(1) == 12][:16]  # sentences of 12 tokens: no padding
    print(f"MiniLM layer 0, {hidden[1::2].shape[0]} held-out sentences x 12 tokens: "
          + compare(TraceableBertLayer(hf).eval(), (hidden[::2],), (hidden[1::2],)))
    hidden, padding = embed(32, 16)
    mask = additive_attention_mask(padding)
    print("MiniLM layer 0, 16 held-out sentences padded to 16 tokens (padding mask): "
          + compare(TraceableBertLayer(hf, masked=True).eval(), (hidden[::2], mask[::2]), (hidden[1::2], mask[1::2])))


if __name__ == "__main__":
    main()
