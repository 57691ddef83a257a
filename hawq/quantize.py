"""``python -m hawq.quantize --config configs/X.yaml [--set key=value ...]``

Runs sensitivity -> bit allocation -> quantization -> finetuning -> export and prints a summary.
Bad input (config, data path, model name, budget) prints one line on stderr and exits with code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from hawq import HawqError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hawq.quantize", description=__doc__.splitlines()[0])
    p.add_argument("--config", "-c", help="YAML config (see configs/); defaults apply to missing keys")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set search.budget.size_mb=0.05 (repeatable)")
    p.add_argument("--no-resume", action="store_true", help="recompute every stage (same as run.resume=false)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.add_argument("--list-models", action="store_true", help="print the registered model names and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # hawq's own messages at INFO; libraries (onnx, transformers) only when they warn
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("hawq").setLevel(logging.INFO)
    try:
        if args.list_models:
            from hawq.models import list_models

            print("\n".join(list_models()))
            return 0
        from hawq.config import load_config
        from hawq.pipeline import run_pipeline
        from hawq.report import summary_table

        overrides = list(args.overrides)
        if args.no_resume:
            overrides.append("run.resume=false")
        if args.quiet:
            overrides.append("run.progress=false")
        cfg = load_config(args.config, overrides)
        config_dir = Path(args.config).resolve().parent if args.config else None
        report = run_pipeline(cfg, config_dir)
    except HawqError as e:
        print(f"hawq: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hawq: interrupted; finished stages are kept and the next run resumes from them", file=sys.stderr)
        return 130
    print()
    print(summary_table(report))
    print(f"\nrun folder: {Path(cfg.run.out_dir) / cfg.run.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
