"""``python -m hawq.quantize --config configs/X.yaml [--set key=value ...]``

Runs sensitivity -> bit allocation -> quantization -> finetuning -> export and prints a summary.
Bad input (config, data path, model name, budget) prints one line on stderr and exits with code 2.

Multi-process: ``torchrun --nproc-per-node N -m hawq.quantize --config X.yaml``. Every process
runs the pipeline (see hawq.pipeline); rank 0 writes the run folder and prints the summary. An
error found by every process (bad input) is printed once, by rank 0, and every process exits 2;
an error on one process mid-run is printed by that process, which exits non-zero, and torchrun
then stops the others.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from hawq import HawqError
from hawq.train import distributed as D


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hawq.quantize", description=__doc__.splitlines()[0])
    p.add_argument("--config", "-c", help="YAML config (see configs/); defaults apply to missing keys")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set search.budget.size_mb=0.05 (repeatable)")
    p.add_argument("--no-resume", action="store_true", help="recompute every stage (same as run.resume=false)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.add_argument("--list-models", action="store_true", help="print the registered model names and exit")
    return p


def _quiet_transformers() -> None:
    """--quiet also silences transformers' weight-loading report (it logs on its own handler)."""
    import os

    os.environ["TRANSFORMERS_VERBOSITY"] = "error"  # read when transformers is first imported
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.set_verbosity_error()


_SILENT_RANK_EXIT_DELAY_S = 10.0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # hawq's own messages at INFO; libraries (onnx, transformers) only when they warn
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("hawq").setLevel(logging.INFO)
    if args.list_models:
        from hawq.models import list_models

        print("\n".join(list_models()))
        return 0
    if args.config is None:  # a full default run into ./runs/demo is never what a bare command meant
        parser.print_usage(sys.stderr)
        print("hawq: error: --config is required (e.g. --config configs/fashion_resnet.yaml)", file=sys.stderr)
        return 2
    if args.quiet:
        _quiet_transformers()
    import os

    import torch
    import torch.distributed as dist

    owns_group = not (dist.is_available() and dist.is_initialized())  # a caller's group stays up
    # before the process group exists, every process finds the same config errors: rank 0 prints them
    rank = int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    try:
        from hawq.config import load_config, run_folder
        from hawq.pipeline import run_pipeline
        from hawq.report import summary_table

        overrides = list(args.overrides)
        if args.no_resume:
            overrides.append("run.resume=false")
        if args.quiet:
            overrides.append("run.progress=false")
        cfg = load_config(args.config, overrides)
        # CPU runs reduce with gloo; GPU runs with NCCL (the default when CUDA is available)
        on_cpu = cfg.run.device == "cpu" or not torch.cuda.is_available()
        rank, world = D.init_distributed("gloo" if on_cpu else None)
        if rank != 0:
            logging.getLogger("hawq").setLevel(logging.WARNING)  # rank 0 tells the story
        config_dir = Path(args.config).resolve().parent if args.config else None
        report = run_pipeline(cfg, config_dir)
    except HawqError as e:
        # every process fails on bad input: rank 0 prints it once; a process that failed alone prints
        # its own error (tagged with its rank) unless rank 0 already reports it
        if rank == 0 or (D.is_distributed() and not D.is_relayed(e)):
            tag = f" (rank {rank})" if rank else ""
            print(f"hawq: error{tag}: {e}", file=sys.stderr)
        else:
            # torchrun stops every worker as soon as one exits non-zero: a silent rank that left
            # first could kill rank 0 before it printed; rank 0's exit ends this wait early
            import time

            time.sleep(_SILENT_RANK_EXIT_DELAY_S)
        return 2
    except KeyboardInterrupt:
        if rank == 0:
            print("hawq: interrupted; finished stages are kept and the next run resumes from them",
                  file=sys.stderr)
        return 130
    # after an error the group is left alone (peers may be inside a collective); exiting frees it
    if owns_group:
        D.shutdown_distributed()
    if rank == 0:
        print()
        print(summary_table(report))
        procs = f" ({world} processes)" if world > 1 else ""
        print(f"\nrun folder: {run_folder(cfg)}{procs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
