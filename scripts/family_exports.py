"""Deployment by family: the pipeline's export verdicts (QDQ ``model.onnx`` and integer-only
``model_int.onnx``) for every family, on the project's own stand-in data, one markdown row each.

Each family runs ``hawq.pipeline.run_pipeline`` as the end-to-end tests do (tests/test_models_e2e.py),
but briefly trained first so that the model is not random (``model.pretrain_epochs``; MiniLM is
the real all-MiniLM-L6-v2 and is not trained), then sensitivity, search (4/8-bit weights at the size
of uniform 6-bit), quantize and export with ``export.onnx`` and ``export.onnx_integer`` on. The
row is read from the run's report.json (``export.onnx.check`` / ``export.onnx_integer``):

* QDQ: pass/fail (hawq.export.deploy: tolerance twice the float32/float64 spread of the PyTorch
  fake-quant model, at least one output step), the worst difference in output steps and, for class
  logits, the argmax agreement; or "not written" with the exporter's one-line reason;
* integer-only: pass (bit-identical to hawq's PyTorch integer model) / fail, or "not written" with
  the reason the export stage recorded;
* the FP32 model's score after the brief training (top-1 %, accuracy %, mAP or cosine: the task's
  primary metric; the stand-in data are learnable, so a score above chance says it is not random);
* wall and CPU seconds of the whole run (CPU: this process's, with one torch thread).

Resumable: a family whose folder under ``--out`` holds a finished run (``row.json``) is not run
again (``--fresh`` reruns it). Sizes: 32x32 images (Inception-V3: 75x75, its smallest), 3 classes,
RetinaNet at 64x64 on 4 images, BERT a 2-layer 32-wide config, 16 tokens. Brief training: AdamW at
0.002, 6 epochs in batches of 8 for the images (Inception-V3: 4 epochs at 0.001 in batches of 4),
4 epochs on 128 sentences for BERT, one SGD epoch at 0.001 for RetinaNet. BERT and MiniLM run with
``quant.transformer=ibert`` (as configs/bert_sst2.yaml and configs/minilm_sentence_ibert.yaml): the
integer-only file is the whole transformer, inputs ids, attention mask and token types.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python scripts/family_exports.py --out runs/families
    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python scripts/family_exports.py --families resnet18,bert
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TINY_BERT = {"vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 64}

# the e2e tests' minimal settings, with both ONNX exports on
COMMON = ["run.progress=false", "run.threads=1", "run.stages=[sensitivity,search,quantize,export]",
          "sensitivity.batches=1", "sensitivity.batch_size=4", "sensitivity.max_probes=2",
          "sensitivity.min_probes=2", "search.weight_bits=[4,8]", "search.budget.size_uniform_bits=6",
          "quant.calib_batches=1", "data.batch_size=4", "data.eval_batch_size=8", "train.batch_size=4",
          "export.onnx=true", "export.onnx_integer=true"]
# enough for the stand-in data's classes to be learnt (above chance; SGD at 0.02 with batches of 4 left
# ResNet-50/152 and SqueezeNext at chance and diverged Inception-V3)
BRIEF_TRAINING = ["model.pretrain_epochs=6", "train.optimizer=adamw", "model.pretrain_lr=0.002",
                  "model.pretrain_weight_decay=0.0", "train.batch_size=8"]


def _images(work: Path) -> Path:
    from hawq.data.image_folder import make_fake_image_folder

    root = work / "data" / "images"
    return root if (root / "val").is_dir() else make_fake_image_folder(root, classes=3, per_class=8, size=32)


def _image_family(name: str, size: int, kwargs: str | None = None,
                  training: tuple[str, ...] = ()) -> Callable[[Path], list[str]]:
    def overrides(work: Path) -> list[str]:
        extra = [f"model.kwargs={kwargs}"] if kwargs else []
        return [f"model.name={name}", *extra, "data.name=imagenet_folder", f"data.root={_images(work)}",
                f"data.image_size={size}", *BRIEF_TRAINING, *training]
    return overrides


def _retinanet(work: Path) -> list[str]:
    from hawq.data.coco import make_fake_coco

    root = work / "data" / "coco"
    if not (root / "annotations").is_dir():
        make_fake_coco(root, n_train=4, n_val=2, size=64)
    return ["model.name=retinanet_resnet50_fpn", "model.kwargs={min_size: 64, max_size: 64}", "data.name=coco",
            f"data.root={root}", "train.distill.enabled=false", "sensitivity.batch_size=2", "data.batch_size=2",
            "train.batch_size=2", "model.pretrain_epochs=1", "model.pretrain_lr=0.001",
            # as configs/retinanet.yaml: the label-free head-output loss (exact / sampled output-space
            # traces for all layers at once) instead of per-layer Hutchinson on focal + L1
            "sensitivity.label_free=true"]


def _bert(work: Path) -> list[str]:
    from hawq.data.text import write_fake_glue

    root = work / "data" / "sst2"
    if not (root / "dev.tsv").is_file():
        write_fake_glue(root, "sst2", n_train=128, n_dev=32)
    return ["model.name=bert", f"model.kwargs={{config: {json.dumps(TINY_BERT)}}}", "data.name=glue_tsv",
            f"data.root={root}", "data.task=sst2", "data.tokenizer=minilm", "data.max_length=16",
            *BRIEF_TRAINING[1:], "model.pretrain_epochs=4", "quant.transformer=ibert"]


def _minilm(work: Path) -> list[str]:
    from hawq.data.text import default_sentences_path

    # the real sentence encoder (label-free, like configs/minilm_sentence.yaml): nothing to pretrain
    return ["model.name=minilm", "model.pretrain_epochs=0", "data.name=sentences",
            f"data.root={default_sentences_path()}", "data.tokenizer=minilm", "data.max_length=16",
            "sensitivity.label_free=true", "quant.group_size=64", "quant.act_calibration=minmax",
            "quant.transformer=ibert"]


FAMILIES: dict[str, Callable[[Path], list[str]]] = {
    "resnet18": _image_family("resnet18", 32),
    "resnet50": _image_family("resnet50", 32),
    "resnet152": _image_family("resnet152", 32),
    "squeezenext": _image_family("squeezenext", 32, "{variant: 1.0-SqNxt-23v5}"),
    # 6 epochs at 0.002 (or 4 at 0.001) in batches of 8 leave it at chance; 4 at 0.001 in batches of 4 do not
    "inception_v3": _image_family("inception_v3", 75, "{aux_logits: false}",
                                  ("model.pretrain_epochs=4", "model.pretrain_lr=0.001", "train.batch_size=4")),
    "retinanet_resnet50_fpn": _retinanet,
    "bert": _bert,
    "minilm": _minilm,
}


# ---------------------------------------------------------------------------------------------
# the row


def qdq_cell(entry: dict[str, Any] | None) -> str:
    """The QDQ verdict of report.json's ``export.onnx`` in a few words."""
    if entry is None:
        return "not run"
    if "error" in entry:
        return f"not written: {entry['error']}"
    if "check_error" in entry:
        return f"written, check failed: {entry['check_error']}"
    c = entry["check"]
    steps = c["max_diff_in_steps"]
    text = f"{c['verdict']}: worst {'n/a' if steps is None else f'{steps:.2f}'} steps"
    text += f" (tolerance {c['tolerance'] / c['step']:.2f})" if c["step"] > 0 else ""
    if "argmax_disagreements" in c:  # class logits (an encoder's embedding has no argmax to agree on)
        text += f", argmax {c['argmax_agreement']:.0%}"
    return text + ("" if c["verdict"] == "pass" else f" -- {c['verdict_reason']}")


def integer_cell(entry: dict[str, Any] | None) -> str:
    """The integer-only verdict of report.json's ``export.onnx_integer`` in a few words."""
    if entry is None:
        return "not run"
    if "skipped" in entry:
        return f"not written: {entry['skipped']}"
    if "check_error" in entry:
        return f"written, check failed: {entry['check_error']}"
    c = entry["check"]
    return "pass: bit-identical" if c["verdict"] == "pass" else f"fail: {c['verdict_reason']}"


def _one_line(text: str) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # torch.export's messages carry terminal colours
    return " ".join(text.split()).replace("|", "\\|")


def row(family: str, result: dict[str, Any]) -> str:
    cells = [family, f"{result['metric']} {result['fp32']:.4g}", _one_line(result["qdq"]),
             _one_line(result["integer"]),
             f"{result['wall_s']:.0f}", f"{result['cpu_s']:.0f}"]
    return "| " + " | ".join(cells) + " |"


HEADER = ("| family | FP32 score | model.onnx (QDQ) | model_int.onnx (integer-only) | wall s | CPU s |\n"
          "|---|---|---|---|---|---|")


# ---------------------------------------------------------------------------------------------
# running


def run_family(family: str, out: Path, fresh: bool = False) -> dict[str, Any]:
    """Run the pipeline for ``family`` in ``out/<family>`` (or reuse a finished run); its row's cells."""
    from hawq.config import load_config
    from hawq.pipeline import run_pipeline

    done = out / family / "row.json"
    if done.is_file() and not fresh:
        return json.loads(done.read_text())
    # from scratch: a left-over folder's pretraining checkpoints (other settings) would be refused
    shutil.rmtree(out / family, ignore_errors=True)
    cfg = load_config(None, [f"run.out_dir={out}", f"run.name={family}", "run.resume=false", *COMMON,
                             *FAMILIES[family](out)])
    wall, cpu = time.perf_counter(), time.process_time()
    report = run_pipeline(cfg)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    export = report.get("export", {})
    result = {"family": family, "metric": report["primary_metric"], "fp32": report["fp32_score"],
              "qdq": qdq_cell(export.get("onnx")),
              "integer": integer_cell(export.get("onnx_integer")),
              "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "timings_s": report.get("timings_s", {})}
    done.write_text(json.dumps(result, indent=1))
    return result


def parse_families(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in FAMILIES]
    if bad or not names:
        raise ValueError(f"--families: unknown family '{bad[0] if bad else text}'; known: {', '.join(FAMILIES)}")
    return names


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma-separated, default: all")
    ap.add_argument("--out", default="runs/families", help="run folders (one per family) and row.json files")
    ap.add_argument("--fresh", action="store_true", help="rerun families that already have a finished run")
    args = ap.parse_args(argv)
    try:
        families = parse_families(args.families)
    except ValueError as e:
        print(e, file=sys.stderr)
        raise SystemExit(2) from None
    out = Path(args.out)
    existing = next(p for p in (out, *out.resolve().parents) if p.exists())
    if not existing.is_dir():
        print(f"--out: {existing} is a file, not a folder", file=sys.stderr)
        raise SystemExit(2)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # MiniLM and the tokenizer ship with hawq
    import torch

    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for family in families:
        result = run_family(family, out, args.fresh)
        rows.append(row(family, result))
        print(f"{family}: QDQ {result['qdq']}; integer-only {result['integer']}", file=sys.stderr, flush=True)
    print(HEADER)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
