"""Draw docs/architecture.png: the pipeline's stages, their run-folder artifacts and the
quantization contract. Regenerate after changing hawq.pipeline.STAGES:

    python scripts/draw_architecture.py [--out docs/architecture.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from hawq.pipeline import STAGES  # noqa: E402

# (title, module, the STAGES entries it draws, value passed on)
COLUMNS = [
    ("model + data", "hawq.run", (), "Run"),
    ("pretrain", "hawq.train.stage", ("pretrain",), "fp32"),
    ("sensitivity", "hawq.sensitivity.stage", ("sensitivity",), "traces"),
    ("search", "hawq.search.stage", ("check_budgets", "search"), "bits"),
    ("quantize + eval", "hawq.quant.stage", ("quantize", "eval_quant", "eval_uniform"), "qmodel"),
    ("finetune", "hawq.train.stage", ("finetune",), "qmodel"),
    ("export", "hawq.export.stage", ("export",), ""),
    ("report", "hawq.report", (), ""),
]
EXTRA_ARTIFACTS = {"model + data": ("config.yaml", "status.json"),
                   "report": ("report.json", "report.md", "metrics.json", "traces_bits.png", "training.png")}
STAGE_COLOR, ART_COLOR, CONTRACT_COLOR, CACHE_COLOR = "#dbe9f6", "#fdf1d6", "#e3f2e1", "#f3e5f5"


def box(ax, x, y, w, h, text, color, size=9, weight="normal"):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                facecolor=color, edgecolor="#444444", linewidth=1.0))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size, weight=weight, wrap=True)


def arrow(ax, x0, y0, x1, y1, label="", style="-|>", color="#333333"):
    ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle=style, mutation_scale=12, color=color,
                                 linewidth=1.1))
    if label:
        ax.text((x0 + x1) / 2, (y0 + y1) / 2 + 0.12, label, ha="center", va="bottom", fontsize=8,
                style="italic", color="#333333")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "architecture.png"))
    args = parser.parse_args(argv)
    by_name = {s.name: s for s in STAGES}
    drawn = {n for _, _, names, _ in COLUMNS for n in names} | {"eval_fp32"}
    missing = set(by_name) - drawn
    if missing:  # the picture must show every stage the pipeline runs
        raise SystemExit(f"draw_architecture: STAGES has {sorted(missing)}, not in the picture; add them")

    fig, ax = plt.subplots(figsize=(17, 8.2))
    ax.set_xlim(0, 17)
    ax.set_ylim(0, 8.2)
    ax.axis("off")
    ax.text(0.2, 7.9, "hawq.pipeline.STAGES: one Run, stages in order (rank 0 writes the run folder)",
            fontsize=12, weight="bold", va="center")

    w, gap, x0, y_stage, h_stage = 1.75, 0.32, 0.25, 6.3, 1.1
    centers = []
    for i, (title, module, names, value) in enumerate(COLUMNS):
        x = x0 + i * (w + gap)
        centers.append(x + w / 2)
        enabled = sorted({by_name[n].enabled_by for n in names if by_name[n].enabled_by})
        on = f"\nrun.stages: {', '.join(enabled)}" if enabled else ""
        box(ax, x, y_stage, w, h_stage, f"{title}\n{module}{on}", STAGE_COLOR, size=8.5)
        arts = [a for n in names for a in by_name[n].artifacts] + list(EXTRA_ARTIFACTS.get(title, ()))
        if arts:
            box(ax, x, 3.95, w, 1.55, "\n".join(arts), ART_COLOR, size=7.5)
            arrow(ax, x + w / 2, y_stage, x + w / 2, 5.5)
        if i + 1 < len(COLUMNS):
            arrow(ax, x + w, y_stage + h_stage / 2, x + w + gap, y_stage + h_stage / 2)
            if value:
                ax.text(x + w + gap / 2, y_stage + h_stage + 0.08, value, ha="center", fontsize=8, style="italic")
    quant_col = x0 + 4 * (w + gap) + w / 2  # the quantized model stays in memory: room for the legend
    ax.text(quant_col, 4.72, "run folder\nruns/<name>/\n(yellow: the files\neach stage writes)", fontsize=8.5,
            ha="center", va="center", color="#7a5b00")

    box(ax, 0.25, 3.0, 16.0, 0.7,
        "one artifact cache, hawq.run.cached(run, artifact, key, compute): key = digest(the settings that matter + "
        "the upstream artifact)\nrun.resume and an equal stored key -> load;  otherwise compute, and write "
        "atomically (the key last)", CACHE_COLOR, size=9)

    # the quantization contract
    ax.text(0.2, 2.55, "the quantization contract (hawq.quant): everything downstream reads only these",
            fontsize=11, weight="bold", va="center")
    box(ax, 0.25, 0.55, 3.2, 1.6, "QuantConfig\n(per-channel / group, BN folding,\nactivation calibration, "
        "rounding)\n+ bit map {layer: LayerBits(w, a)}", CONTRACT_COLOR, size=8.5)
    box(ax, 4.35, 0.55, 3.5, 1.6, "quantize_model(model, bits, cfg)\nQuant* modules: fake-quant for\n"
        "calibration, GPTQ and QAT;\ntheir state = scales + codes", CONTRACT_COLOR, size=8.5)
    arrow(ax, 3.45, 1.35, 4.35, 1.35)
    targets = [("to_integer: dyadic integer model\n(bit-exact PyTorch reference)", 1.6),
               ("fbgemm / onednn conversion\n(PyTorch quantized engines)", 0.85),
               ("export: model.safetensors, model.onnx (QDQ),\nmodel_int.onnx (integer-only)", 0.1)]
    for text, y in targets:
        box(ax, 9.0, y + 0.05, 4.6, 0.6, text, CONTRACT_COLOR, size=8)
        arrow(ax, 7.85, 1.35, 9.0, y + 0.35)
    ax.text(13.9, 1.0, "the search prices a layer at b bits as\n"
            "tr(H_l) / n_l * ||Q_b(W_l) - W_l||^2\nwith the same quantizer (HAWQ-V2/V3)",
            fontsize=8.5, va="center")
    fig.savefig(args.out, dpi=110, bbox_inches="tight")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
