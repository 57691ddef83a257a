"""Second-order rounding table (issue 16, section 1): GPTQ against round-to-nearest, no finetuning.

For each model -- the Fashion ResNet (``configs/fashion_resnet.yaml``, shipped FP32 checkpoint, full
10k test set, size of uniform 3-bit weights) and all-MiniLM-L6-v2 (``configs/minilm_sentence.yaml``,
real weights, size of uniform 4-bit weights) -- two weight bit maps of the same size, the uniform one
and the HAWQ one (the pipeline's sensitivity and ILP), are quantized with the pipeline's own
``quantized_copy`` under each rounding variant (``quant.rounding: nearest`` and ``gptq`` with its
options), activation ranges calibrated, and evaluated without any finetuning. Every cell is written to
``results_gptq.json`` at once and skipped when the script runs again (same settings).

    python scripts/results_gptq.py --models fashion --threads 1 --out runs/results_gptq/fashion
    python scripts/results_gptq.py --models minilm --threads 1 --out runs/results_gptq/minilm
    python scripts/results_gptq.py --models minilm --variants nearest_weights_only,gptq_weights_only \
        --threads 1 --out runs/results_gptq/minilm   # activations off: what the weights alone cost
    python scripts/results_gptq.py --models minilm_ffn12 --variants nearest,gptq,gptq_act_order_clip_4x \
        --threads 1 --out runs/results_gptq/minilm_ffn12   # FFN inputs on 12-bit grids
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
for p in (str(REPO), str(SCRIPTS)):
    if p not in sys.path:
        sys.path.insert(0, p)

from results_fashion import _seed_run, build_config, settings_key  # noqa: E402

from hawq import HawqError  # noqa: E402
from hawq.bitmap import BitMap  # noqa: E402
from hawq.config import Config  # noqa: E402
from hawq.quant import set_act_quant  # noqa: E402
from hawq.quant.config import check_rounding  # noqa: E402
from hawq.quant.stage import quantized_copy  # noqa: E402
from hawq.run import Run, build_model_and_data, example_forward, read_json, seed_everything, write_json  # noqa: E402
from hawq.search import bops_g, build_search_problem, layer_costs, model_size_mb, solve_problem  # noqa: E402
from hawq.search.allocate import resolve_budgets  # noqa: E402
from hawq.search.stage import uniform_bits_same_size  # noqa: E402
from hawq.sensitivity.stage import stage_sensitivity  # noqa: E402

MODELS = {  # name: (config, size budget as uniform weight bits, metric shown in the table)
    "fashion": ("configs/fashion_resnet.yaml", 3, "top1"),
    "minilm": ("configs/minilm_sentence.yaml", 4, "cosine_mean"),
    # the same with the FFN inputs (LayerNorm and GELU outputs) on 12-bit activation grids
    "minilm_ffn12": ("configs/minilm_sentence_ffn12.yaml", 4, "cosine_mean"),
}
VARIANTS: dict[str, dict[str, Any]] = {  # QuantConfig overrides of each rounding variant
    "nearest": {"rounding": "nearest"},
    "gptq": {"rounding": "gptq"},
    "gptq_act_order": {"rounding": "gptq", "gptq_act_order": True},
    "gptq_clip": {"rounding": "gptq", "gptq_clip_search": True},
    "gptq_act_order_clip": {"rounding": "gptq", "gptq_act_order": True, "gptq_clip_search": True},
    # ... and 4x the calibration batches (MiniLM: its whole training split, 240 sentences)
    "gptq_act_order_clip_4x": {"rounding": "gptq", "gptq_act_order": True, "gptq_clip_search": True,
                               "gptq_batches": "4x"},
    "gptq_asym": {"rounding": "gptq", "gptq_asymmetric": True},
    # activation ranges by the MSE-optimal clipped extent instead of min-max (quant.act_calibration)
    "nearest_mse": {"rounding": "nearest", "act_calibration": "mse"},
    "gptq_mse": {"rounding": "gptq", "act_calibration": "mse"},
    "gptq_percentile": {"rounding": "gptq", "act_calibration": "percentile"},  # act_percentile 99.99
    # diagnostics: the same models evaluated with activation quantization off (weights alone)
    "nearest_weights_only": {"rounding": "nearest", "weights_only": True},
    "gptq_weights_only": {"rounding": "gptq", "weights_only": True},
}


def _maps(run: Run, cfg: Config, budget_bits: int, out_dir: Path,
          progress: bool) -> tuple[dict[str, BitMap], dict[str, Any]]:
    """The uniform map at the budget and the HAWQ map of the same size (traces cached in ``out_dir``), and the
    layer costs (MACs) for their BOPs."""
    brun = _seed_run(run, cfg, cfg.run.seed, budget_bits)
    brun.run_dir = out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.run.seed)
    traces = stage_sensitivity(brun)  # traces.json: reused when the script runs again
    costs = layer_costs(run.fp32, example_forward(brun), run.layers)
    problem = build_search_problem(run.fp32, traces, costs, brun.cfg.search, per_channel=cfg.quant.per_channel,
                                   group_size=cfg.quant.group_size, progress=progress)
    hawq_bits = solve_problem(problem, resolve_budgets(problem, brun.cfg.search)).bits
    uniform = uniform_bits_same_size(brun, hawq_bits)[1]
    return {f"uniform{budget_bits}": uniform, "hawq": hawq_bits}, costs


def _with_quant(run: Run, **changes: Any) -> Run:
    if changes.get("gptq_batches") == "4x":
        changes["gptq_batches"] = 4 * run.cfg.quant.calib_batches
    cfg = dataclasses.replace(run.cfg, quant=dataclasses.replace(run.cfg.quant, **changes))
    check_rounding(cfg.quant)
    return dataclasses.replace(run, cfg=cfg)


def run_gptq_results(models: Sequence[str], variants: Sequence[str], out_dir: Path, overrides: Sequence[str] = (),
                     threads: int | None = None, progress: bool = True,
                     on_cell: Callable[[str, dict], None] | None = None) -> dict[str, Any]:
    """Fill ``out_dir/results_gptq.json`` (one cell per model/map/variant); return its content."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results_gptq.json"
    data = read_json(path) if path.exists() else None
    data = data or {"settings": {}, "cells": {}, "fp32": {}, "sizes_mb": {}}
    for model in models:
        config, budget_bits, metric = MODELS[model]
        cfg = build_config(str(REPO / config), overrides, 0.0, None, None, None, threads)
        key = settings_key(cfg)["digest"]
        if data["settings"].get(model, key) != key:
            raise HawqError(f"{path} holds {model} cells of other settings; pass another --out or delete it")
        data["settings"][model] = key
        run = build_model_and_data(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, progress=progress)),
                                   out_dir / f"work_{model}", (REPO / config).parent)
        run.task.bind_reference(run.fp32)
        if model not in data["fp32"]:
            data["fp32"][model] = run.evaluate(run.fp32, "eval fp32")
            write_json(path, data)
        maps, costs = _maps(run, cfg, budget_bits, out_dir / f"work_{model}", progress)
        for map_name, bits in maps.items():
            data["sizes_mb"][f"{model}/{map_name}"] = model_size_mb(run.fp32, bits, run.layers, cfg.quant.per_channel,
                                                                   cfg.quant.group_size)
            # activation widths count here (the size counts weights only): MACs x weight bits x activation bits
            data.setdefault("bops_g", {})[f"{model}/{map_name}"] = round(bops_g(run.fp32, bits, costs=costs), 3)
            for variant in variants:
                cell = f"{model}/{map_name}/{variant}"
                if cell in data["cells"]:
                    continue
                changes = dict(VARIANTS[variant])
                weights_only = changes.pop("weights_only", False)
                vrun = _with_quant(run, **changes)
                seed_everything(cfg.run.seed)
                t0 = time.process_time()
                qmodel = quantized_copy(vrun, bits)
                cpu_quantize = time.process_time() - t0
                if weights_only:
                    set_act_quant(qmodel, False)
                metrics = vrun.evaluate(qmodel, f"eval {cell}")
                data["cells"][cell] = {"metric": metric, "value": float(metrics[metric]), "metrics": metrics,
                                       "cpu_s_quantize": round(cpu_quantize, 1),
                                       "weight_bits": {n: lb.weight for n, lb in bits.items()}}
                write_json(path, data)
                if on_cell is not None:
                    on_cell(cell, data["cells"][cell])
    return data


def markdown_table(data: dict[str, Any]) -> str:
    lines = ["| model | weights | size (MB) | BOPs (G) | rounding | metric | value | vs FP32 | "
             "quantize CPU s |", "|---|---|---|---|---|---|---|---|---|"]
    for cell, r in data["cells"].items():
        model, map_name, variant = cell.split("/")
        fp32 = float(data["fp32"][model][r["metric"]])
        bops = data.get("bops_g", {}).get(f"{model}/{map_name}")
        lines.append(f"| {model} | {map_name} | {data['sizes_mb'][f'{model}/{map_name}']:.3f} | "
                     f"{'' if bops is None else bops} | {variant} | "
                     f"{r['metric']} | {r['value']:.4f} | {r['value'] - fp32:+.4f} | {r['cpu_s_quantize']} |")
    fp = ", ".join(f"{m} {v[MODELS[m][2]]:.4f}" for m, v in data["fp32"].items())
    lines.append(f"\nFP32: {fp}")
    return "\n".join(lines)


def _names(text: str, valid: Sequence[str], what: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in valid]
    if bad or not names:
        raise HawqError(f"--{what}: unknown '{bad[0] if bad else text}'; choose from {', '.join(valid)}")
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="fashion,minilm", help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--variants", default="nearest,gptq,gptq_act_order_clip,gptq_act_order_clip_4x,gptq_asym",
                   help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (both models)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="runs/results_gptq")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        models = _names(args.models, list(MODELS), "models")
        variants = _names(args.variants, list(VARIANTS), "variants")
        if args.threads:
            torch.set_num_threads(args.threads)
        out_dir = Path(args.out)

        def show(cell: str, r: dict) -> None:
            print(f"{cell}: {r['metric']} {r['value']:.4f} (quantize {r['cpu_s_quantize']} CPU s)", flush=True)

        data = run_gptq_results(models, variants, out_dir, args.set, args.threads, not args.no_progress, show)
        command = "python scripts/results_gptq.py " + " ".join(sys.argv[1:] if argv is None else argv)
        table = markdown_table(data)
        (out_dir / "results_gptq.md").write_text(f"# results_gptq\n\n`{command}`\n\n{table}\n")
    except HawqError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table)
    print(f"\nwrote {out_dir}/results_gptq.json, .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
