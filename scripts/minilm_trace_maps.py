"""MiniLM's HAWQ bit maps from the sampled output-space traces (the default since the exact-or-sampled
choice by cost) against those from the exact traces (``sensitivity.exact_directions=384``, the path the
MiniLM tables in README / docs/results.md were measured on), at the sizes of uniform 4- and 3-bit
weights, for ``configs/minilm_sentence.yaml`` and ``configs/minilm_sentence_ffn12.yaml``. The search is
``scripts/results_gptq.py``'s (same traces cache layout, one folder per case under ``--out``).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/minilm_trace_maps.py
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

SCRIPTS = Path(__file__).resolve().parent
for p in (str(SCRIPTS.parent), str(SCRIPTS)):
    if p not in sys.path:
        sys.path.insert(0, p)

import results_gptq as R  # noqa: E402

from hawq.run import build_model_and_data  # noqa: E402

PATHS = {"sampled": [], "exact": ["sensitivity.exact_directions=384"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="minilm_sentence,minilm_sentence_ffn12")
    p.add_argument("--budgets", default="4,3", help="sizes of uniform N-bit weights")
    p.add_argument("--out", default="runs/minilm_trace_maps")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    missing = [n for n in names if not (R.REPO / f"configs/{n}.yaml").is_file()]
    if missing or not names:
        print(f"error: --configs: no configs/{missing[0] if missing else ''}.yaml", file=sys.stderr)
        return 2
    try:
        budgets = [int(b) for b in args.budgets.split(",")]
    except ValueError:
        budgets = []
    if not budgets or not all(2 <= b <= 8 for b in budgets):
        print(f"error: --budgets must be integers in 2..8, got '{args.budgets}'", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    for name in names:
        maps: dict[str, dict[int, dict[str, int]]] = {}
        for path, overrides in PATHS.items():
            cfg = R.build_config(str(R.REPO / f"configs/{name}.yaml"), overrides, 0.0, None, None, None, 1)
            out = Path(args.out) / f"{name}_{path}"
            run = build_model_and_data(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, progress=False)),
                                       out, R.REPO / "configs")
            run.task.bind_reference(run.fp32)
            t0 = time.process_time()
            maps[path] = {b: {n: lb.weight for n, lb in R._maps(run, cfg, b, out / f"b{b}", False)[0]["hawq"].items()}
                          for b in budgets}
            print(f"{name} {path}: sensitivity + search at {budgets}: {time.process_time() - t0:.1f} CPU s", flush=True)
        for b in budgets:
            a, e = maps["sampled"][b], maps["exact"][b]
            diff = {n: (a[n], e[n]) for n in a if a[n] != e[n]}
            print(f"{name} size of uniform {b}-bit: {len(diff)} of {len(a)} layers differ (sampled, exact) {diff}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
