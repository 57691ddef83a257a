"""The pipeline: an ordered list of stages over one :class:`~hawq.run.Run`.

Each :class:`Stage` is a function of the run and of the values earlier stages produced (its
declared ``inputs``); it returns its ``outputs`` and may write artifacts into the run folder,
resumed through :func:`hawq.run.cached`. A stage runs when ``run.stages`` enables it and its
inputs exist, so leaving out ``search`` also leaves out everything that needs the bit map.
``report.json`` is written last: a folder without it is an unfinished run.

Under ``torchrun`` (a process group with several processes) every process runs the same stages:
the Hessian work is split by batches (each process takes a disjoint shard of the same seeded batch
list and the Hessian operator sums over processes), finetuning runs DDP, and everything else that
needs one answer (evaluations, the bit search, export, every file in the run folder) is done by
rank 0 and broadcast. Only rank 0 writes files and shows progress bars.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from hawq import HawqError
from hawq.config import Config, run_folder, save_config, validate
from hawq.export.stage import stage_export
from hawq.models.registry import ModelSpec
from hawq.quant.stage import evaluate_quantized, quantized_copy
from hawq.report import build_report, write_report
from hawq.run import (  # noqa: F401  (re-exported: scripts and older callers import them from here)
    Run,
    build_model_and_data,
    digest,
    example_forward,
    read_json,
    resolve_device,
    resolve_path,
    seed_everything,
    state_dict_digest,
    write_json,
)
from hawq.search.stage import (  # noqa: F401  (re-exported, as above)
    check_budgets,
    effective_pins,
    run_costs,
    stage_search,
    uniform_bits_same_size,
)
from hawq.sensitivity.stage import check_informative, stage_sensitivity
from hawq.train import distributed as D
from hawq.train.stage import check_not_at_chance, pretrain_if_needed, stage_finetune

log = logging.getLogger("hawq")

_example_forward = example_forward  # the old private name, for callers written against the old module


# ---------------------------------------------------------------------------------------------
# the stages


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline.

    ``fn(run, *inputs)`` returns the value named by ``outputs`` (a tuple when there are several).
    ``enabled_by`` is the ``run.stages`` entry that turns it on (None: always on); ``where`` says who
    runs it: every process (``"everywhere"``: it may use collectives), every process with errors
    shared (``"checked"``: bad input fails alike everywhere) or rank 0, broadcasting the result
    (``"main"``). ``artifacts`` lists the run-folder files it writes (documentation and tests).
    """

    name: str  # also its key in report.json's timings_s
    fn: Callable[..., Any]
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    enabled_by: str | None = None
    where: Literal["everywhere", "checked", "main"] = "everywhere"
    artifacts: tuple[str, ...] = ()


def _stage_fp32(run: Run) -> dict[str, float]:
    run.task.bind_reference(run.fp32)
    metrics = D.run_on_main(run.evaluate, run.fp32, "eval fp32")
    if fp32_source(run.cfg, run.spec) == "untrained" and run.main:
        log.warning("model: no checkpoint, no weights and model.pretrain_epochs is 0: the FP32 model has "
                    "random weights, so its sensitivities and bit map mean nothing")
    return metrics


def _stage_uniform(run: Run, bits: Any) -> tuple[int, dict[str, float]]:
    """The uniform map of the same size (and pins) as the HAWQ map, quantized and evaluated."""
    uniform_w, uniform = uniform_bits_same_size(run, bits)
    return uniform_w, evaluate_quantized(run, uniform, "eval uniform")


def _stage_finetune(run: Run, qmodel: Any, bits: Any, before: dict[str, float]) -> tuple[list[dict], dict]:
    history = stage_finetune(run, qmodel, bits)
    after = before
    if history:  # the loop evaluated the final model on the test split after its last epoch
        after = {k[len("test_"):]: v for k, v in history[-1].items() if k.startswith("test_")}
        check_not_at_chance(run, before, after)
    return history, after


STAGES: list[Stage] = [
    Stage("check_budgets", check_budgets, enabled_by="search", where="checked"),
    Stage("pretrain", pretrain_if_needed, artifacts=("fp32.safetensors", "fp32.json", "checkpoints/pretrain_*")),
    Stage("eval_fp32", _stage_fp32, outputs=("fp32",)),
    Stage("sensitivity", stage_sensitivity, outputs=("traces",), enabled_by="sensitivity",
          artifacts=("traces.json", "density.png")),
    Stage("search", stage_search, inputs=("traces",), outputs=("bits", "search"), enabled_by="search",
          artifacts=("bits.yaml", "search.json", "pareto.csv", "pareto.png")),
    Stage("quantize", quantized_copy, inputs=("bits",), outputs=("qmodel",), enabled_by="quantize",
          where="checked"),
    Stage("eval_quant", lambda run, qmodel: run.evaluate(qmodel, "eval hawq"), inputs=("qmodel",),
          outputs=("before",), where="main"),
    Stage("eval_uniform", _stage_uniform, inputs=("bits",), outputs=("uniform_weight_bits", "uniform"),
          enabled_by="quantize", where="main"),
    Stage("finetune", _stage_finetune, inputs=("qmodel", "bits", "before"), outputs=("history", "after"),
          enabled_by="finetune", artifacts=("checkpoints/finetune_*", "checkpoints/finetune.key")),
    Stage("export", stage_export, inputs=("qmodel", "bits"), enabled_by="export", where="main",
          outputs=("export",), artifacts=("model.safetensors", "model.onnx", "model_int.onnx")),
]


def _run_stage(run: Run, stage: Stage, values: dict[str, Any]) -> None:
    args = [values[name] for name in stage.inputs]
    t0 = time.perf_counter()
    if stage.where == "main":  # rank 0 computes, every process gets the result
        out = D.run_on_main(stage.fn, run, *args)
    elif stage.where == "checked":
        out = D.run_everywhere(stage.fn, run, *args)
    else:
        out = stage.fn(run, *args)
    run.timings[stage.name] = round(time.perf_counter() - t0, 2)
    if len(stage.outputs) == 1:
        values[stage.outputs[0]] = out
    elif stage.outputs:
        values.update(zip(stage.outputs, out))


# ---------------------------------------------------------------------------------------------
# the whole run


def run_pipeline(cfg: Config, config_dir: Path | None = None) -> dict[str, Any]:
    """Run every configured stage and return the report (also written to ``report.json``).

    Under torchrun every process calls this with the same config and gets the same report; only
    rank 0 writes the run folder. Bad input (found while building the model and data, or an
    infeasible budget) fails on every process alike before any collective work starts.
    """
    t_start = time.perf_counter()
    validate(cfg)  # a Config built in code gets the checks load_config gives a YAML file
    D.init_distributed()
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    seed_everything(cfg.run.seed)
    run_dir = run_folder(cfg)
    # Check everything that can fail on bad input before the run folder exists.
    D.run_on_main(check_run_folder, run_dir)
    run = D.run_everywhere(build_model_and_data, cfg, run_dir, config_dir)
    D.run_on_main(_open_run_folder, cfg, run_dir)
    try:
        report = _run_stages(run, t_start)
    except BaseException as e:
        # no collectives here: the other processes may be anywhere (torchrun stops them when this
        # one exits non-zero)
        if run.main:
            write_json(run_dir / "status.json", {"status": "failed", "error": D.describe_error(e)})
        raise
    if run.main:
        write_json(run_dir / "status.json", {"status": "complete"})
    D.barrier()  # nobody reads a half-finished folder after returning
    return report


def check_run_folder(run_dir: Path) -> None:
    """The run folder is (or can become) a folder hawq can write in; probed without leaving a trace."""
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    if not existing.is_dir():
        raise HawqError(f"run.out_dir: {existing} is a file, not a folder (run folder {run_dir})")
    try:
        shutil.rmtree(tempfile.mkdtemp(dir=existing, prefix=".hawq-probe-"))
    except OSError as e:
        raise HawqError(f"run.out_dir: cannot write in {existing} ({e.strerror or e}); pick another "
                        "run.out_dir") from None


def _open_run_folder(cfg: Config, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    previous = read_json(run_dir / "status.json")
    if previous and previous.get("status") == "running":
        log.warning("run folder %s: the previous run was interrupted (status.json still said 'running'); %s",
                    run_dir, "finished stages are reused" if cfg.run.resume else "starting over")
    for orphan in run_dir.glob("*.tmp"):  # left by a write that a kill -9 cut short
        orphan.unlink(missing_ok=True)
    stale = run_dir / "report.json"
    if stale.exists():
        stale.unlink()  # this folder is an unfinished run until the new report lands
    save_config(cfg, run_dir / "config.yaml")
    write_json(run_dir / "status.json", {"status": "running"})


def _run_stages(run: Run, t_start: float) -> dict[str, Any]:
    enabled = set(run.cfg.run.stages)
    values: dict[str, Any] = {}
    for stage in STAGES:
        if stage.enabled_by is not None and stage.enabled_by not in enabled:
            continue
        if not all(name in values for name in stage.inputs):
            continue  # an upstream stage did not run (e.g. no bit map without the search)
        _run_stage(run, stage, values)
    return _finish(run, stage_report(run, values), values, t_start)


def stage_report(run: Run, values: dict[str, Any]) -> dict[str, Any]:
    """The stages' results, laid out as report.json's top-level entries (in this order)."""
    report: dict[str, Any] = {"fp32": values["fp32"], "fp32_top1": run.primary(values["fp32"]),
                              "fp32_weights": fp32_source(run.cfg, run.spec), "processes": D.get_world_size()}
    if "search" in values:
        report["search"] = values["search"]
    if "before" in values:
        before, uniform = values["before"], values["uniform"]
        report.update(quant_before_finetune=before, uniform_same_size=uniform,
                      quant_top1_before_finetune=run.primary(before),
                      uniform_top1_same_size=run.primary(uniform),
                      uniform_weight_bits=values["uniform_weight_bits"])
        if "history" in values:
            report["history"] = values["history"]
        after = values.get("after", before)
        report.update(quant_after_finetune=after, quant_top1_after_finetune=run.primary(after))
    if "export" in values:
        report["export"] = values["export"]
    return report


def fp32_source(cfg: Config, spec: ModelSpec | None = None) -> str:
    """Where the FP32 weights come from: checkpoint, weights (torchvision), shipped (with the model's
    package, ``ModelSpec.ships_weights``), pretrained or untrained."""
    m = cfg.model
    if m.checkpoint is not None:
        return "checkpoint"
    if m.weights is not None:
        return "weights"
    if spec is not None and spec.ships_weights:
        return "shipped"
    return "pretrained" if m.pretrain_epochs > 0 else "untrained"


def _finish(run: Run, report: dict[str, Any], values: dict[str, Any], t_start: float) -> dict[str, Any]:
    """Build and write the report on rank 0 (rank 0's timings); every process returns that report."""
    # the per-layer traces and bits are reported with the bit map they led to
    bits = values.get("bits")
    traces = values.get("traces") if bits is not None else None

    def on_main() -> dict[str, Any]:
        full = build_report(run, report, traces, bits)
        full["timings_s"] = {**run.timings, "total": round(time.perf_counter() - t_start, 2)}
        write_report(run, full, traces, bits)
        return full

    return D.run_on_main(on_main)


__all__ = ["STAGES", "Stage", "run_pipeline", "check_run_folder", "fp32_source", "stage_report",
           "check_informative", "check_not_at_chance", "quantized_copy", "stage_sensitivity",
           "stage_finetune", "stage_export", "pretrain_if_needed"]
