"""MiniLM table of issue 6: label-free mixed precision for all-MiniLM-L6-v2 sentence embeddings.

Sensitivity is label-free (Hessian of 0.5 ||e(x) - e_fp32(x)||^2 on the shipped training sentences);
three weight bit maps are compared (activations 8 bits): uniform 8-bit, uniform 4-bit and the HAWQ
map at the size of uniform 4-bit weights. Each is scored by the cosine similarity of its sentence
embeddings to the FP32 ones on the held-out sentences (mean and worst), before and after a label-free
distillation finetune on the training sentences (``--finetune-epochs``, 0 = none). Every stage is the
pipeline's own; each finished map is written to ``results_minilm.json`` at once and skipped when the
script runs again.

    python scripts/results_minilm.py --finetune-epochs 1
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
for p in (str(REPO), str(SCRIPTS)):
    if p not in sys.path:
        sys.path.insert(0, p)

from results_fashion import _seed_run, build_config, evaluate_cell, settings_key  # noqa: E402

from hawq import HawqError  # noqa: E402
from hawq.bitmap import BitMap  # noqa: E402
from hawq.config import Config  # noqa: E402
from hawq.run import build_model_and_data, example_forward, read_json, seed_everything, write_json  # noqa: E402
from hawq.search import build_search_problem, layer_costs, model_size_mb, solve_problem  # noqa: E402
from hawq.search.allocate import resolve_budgets  # noqa: E402
from hawq.search.stage import uniform_bits_same_size  # noqa: E402
from hawq.sensitivity.stage import stage_sensitivity  # noqa: E402


def run_minilm_results(cfg: Config, out_dir: Path, budget_bits: int = 4, progress: bool = True,
                       on_cell: Callable[[str, dict], None] | None = None,
                       config_dir: Path | None = None) -> dict[str, Any]:
    """Fill ``out_dir/results_minilm.json`` with the three maps' cosine scores; return its content."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results_minilm.json"
    key = settings_key(cfg)
    key["budget_bits"] = budget_bits
    data = read_json(path) if path.exists() else None
    if data is not None and (data.get("settings", {}).get("digest") != key["digest"]
                             or data["settings"].get("budget_bits") != budget_bits):
        raise HawqError(f"{path} was written with other settings; pass another --out folder or delete it")
    if data is None:
        data = {"settings": key, "cells": {}, "bits": {}, "sizes_mb": {}}

    seed = cfg.run.seed
    run = build_model_and_data(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, progress=progress)),
                               out_dir / "work", config_dir)
    run.task.bind_reference(run.fp32)
    if run.task.name != "encoder":
        raise HawqError(f"results_minilm: model '{cfg.model.name}' is not a sentence encoder (task {run.task.name})")
    brun = _seed_run(run, run.cfg, seed, budget_bits)
    brun.run_dir = out_dir / "work"
    brun.run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)
    traces = stage_sensitivity(brun)  # work/traces.json: reused when the run resumes
    costs = layer_costs(run.fp32, example_forward(brun), run.layers)
    problem = build_search_problem(run.fp32, traces, costs, brun.cfg.search, per_channel=cfg.quant.per_channel,
                                   group_size=cfg.quant.group_size, progress=progress)
    budgets = resolve_budgets(problem, brun.cfg.search)
    hawq_bits = solve_problem(problem, budgets).bits
    maps: dict[str, BitMap] = {
        "uniform8": uniform_bits_same_size(_seed_run(run, run.cfg, seed, 8), hawq_bits)[1],
        f"uniform{budget_bits}": uniform_bits_same_size(_seed_run(run, run.cfg, seed, budget_bits), hawq_bits)[1],
        "hawq": hawq_bits,
    }
    for name, bits in maps.items():
        size = model_size_mb(run.fp32, bits, run.layers, cfg.quant.per_channel, cfg.quant.group_size)
        data["bits"][name] = {n: lb.weight for n, lb in bits.items()}
        data["sizes_mb"][name] = {"size_mb": size, "budget_mb": budgets["size_mb"]}
        if name in data["cells"]:
            continue
        result = evaluate_cell(brun, bits, out_dir / "work" / f"finetune_{name}")
        data["cells"][name] = result
        write_json(path, data)
        if on_cell is not None:
            on_cell(name, result)
    data["fp32_size_mb"] = model_size_mb(run.fp32, 32)
    write_json(path, data)
    return data


def markdown_table(data: dict[str, Any]) -> str:
    def cos(m: dict | None, k: str) -> str:
        return "—" if m is None else f"{m[k]:.4f}"

    lines = ["| weights (act. 8-bit) | size (MB) | cos mean | cos worst | cos mean, finetuned | "
             "cos worst, finetuned |", "|---|---|---|---|---|---|"]
    for name, r in data["cells"].items():
        b, a = r["before_metrics"], r["after_metrics"]
        lines.append(f"| {name} | {data['sizes_mb'][name]['size_mb']:.2f} | {cos(b, 'cosine_mean')} | "
                     f"{cos(b, 'cosine_worst')} | {cos(a, 'cosine_mean')} | {cos(a, 'cosine_worst')} |")
    lines.append(f"\nFP32 size {data.get('fp32_size_mb', float('nan')):.2f} MB; "
                 f"held-out sentences: {next(iter(data['cells'].values()))['before_metrics']['n']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs/minilm_sentence.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--budget", type=int, default=4, help="size budget as uniform weight bits")
    p.add_argument("--finetune-epochs", type=float, default=1.0, help="label-free distillation; 0 = none")
    p.add_argument("--max-probes", type=int, default=None, help="Hutchinson probes per trace (sensitivity)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="runs/results_minilm")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        cfg = build_config(args.config, args.set, args.finetune_epochs, None, None, args.max_probes,
                           args.threads)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        out_dir = Path(args.out)

        def show(name: str, r: dict) -> None:
            print(f"{name}: before {r['before_metrics']} after {r['after_metrics']} ({r['seconds']}s)", flush=True)

        data = run_minilm_results(cfg, out_dir, args.budget, progress=not args.no_progress, on_cell=show,
                                  config_dir=Path(args.config).resolve().parent)
        command = "python scripts/results_minilm.py " + " ".join(sys.argv[1:] if argv is None else argv)
        table = markdown_table(data)
        (out_dir / "results_minilm.md").write_text(f"# results_minilm\n\n`{command}`\n\n{table}\n")
    except HawqError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table)
    print(f"\nwrote {out_dir}/results_minilm.json, .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
