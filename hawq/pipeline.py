"""Stage order, run folder and resume.

A run folder ``runs/<name>/`` holds one artifact per stage. Each artifact records the hash of the
inputs it was computed from (the config sections that matter plus the upstream artifact), so a
re-run with ``run.resume: true`` reuses every stage whose inputs did not change and recomputes the
rest. ``report.json`` is written last: a folder without it is an unfinished run.

Under ``torchrun`` (a process group with several processes) every process runs the same stages:
the Hessian work is split by batches (each process takes a disjoint shard of the same seeded batch
list and the Hessian operator sums over processes), finetuning runs DDP, and everything else that
needs one answer (evaluations, the bit search, export, every file in the run folder) is done by
rank 0 and broadcast. Only rank 0 writes files and shows progress bars.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from hawq import HawqError
from hawq.bitmap import (
    BitMap,
    LayerBits,
    atomic_write_text,
    bitmap_from_dict,
    bitmap_to_dict,
    load_bitmap,
    save_bitmap,
)
from hawq.config import Config, config_to_dict, run_folder, save_config, validate
from hawq.data import DataBundle, build_data
from hawq.models import ModelSpec, Task, get_model_spec, get_task
from hawq.train import distributed as D

log = logging.getLogger("hawq")


# ---------------------------------------------------------------------------------------------
# small utilities


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``auto``/``cuda`` is this process's GPU (``cuda:LOCAL_RANK`` under torchrun), else the CPU."""
    device = _resolve_device(name)
    if device.type == "cpu" and D.is_distributed() and dist.get_backend() == "nccl":
        raise HawqError(f"run.device is '{name}' (CPU) but the process group uses NCCL, which reduces GPU "
                        "tensors only; create the group with gloo for a CPU run (hawq.quantize does so "
                        "when run.device is cpu)")
    return device


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return D.local_device() if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise HawqError(f"run.device is '{name}' but no CUDA device is available (use 'cpu' or 'auto')")
    if name == "cuda":
        return D.local_device()
    if name.startswith("cuda:") and D.is_distributed():
        raise HawqError(f"run.device '{name}' names one GPU for all {D.get_world_size()} processes; use "
                        "'cuda' or 'auto' (each process takes cuda:LOCAL_RANK)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise HawqError(f"run.device: unknown device '{name}'") from None


def digest(*parts: Any) -> str:
    """A stable hash of JSON-able parts (config sections, upstream hashes)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def state_dict_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    if isinstance(o, Path):
        return str(o)
    return str(o)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def resolve_path(path: str | None, config_dir: Path | None) -> str | None:
    """A relative path is looked up in the working directory, then next to the config file."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists() or config_dir is None:
        return str(p)
    for base in (config_dir, config_dir.parent):
        if (base / p).exists():
            return str(base / p)
    return str(p)


# ---------------------------------------------------------------------------------------------
# the run context


@dataclass
class Run:
    cfg: Config
    run_dir: Path
    device: torch.device
    spec: ModelSpec
    task: Task
    data: DataBundle
    fp32: nn.Module
    layers: list[str]
    results: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def main(self) -> bool:
        """This process writes the run folder (rank 0, or the only process)."""
        return D.is_main()

    @property
    def progress(self) -> bool:
        return self.cfg.run.progress and self.main

    def batches(self, split: str, n: int | None, batch_size: int, shuffle: bool = False,
                to_device: bool = True) -> list[Any]:
        """The first ``n`` batches of a split (seeded order), moved to the device.

        The list is the same on every process; :func:`hawq.train.distributed.shard` splits it.
        """
        loader = self.data.loader(split, batch_size, shuffle=shuffle, seed=self.cfg.run.seed)
        out = []
        for i, batch in enumerate(loader):
            if n is not None and i >= n:
                break
            out.append(self.task.to_device(batch, self.device) if to_device else batch)
        return out

    def eval_batches(self) -> Any:
        return (self.task.to_device(b, self.device)
                for b in self.data.loader("test", self.cfg.data.eval_batch_size))

    def evaluate(self, model: nn.Module, desc: str) -> dict[str, float]:
        return self.task.evaluate(model, self.eval_batches(), self.device, progress=self.progress, desc=desc)

    def primary(self, metrics: dict[str, float]) -> float:
        return float(metrics[self.task.primary_metric])


def _example_forward(run: Run):
    example = run.batches("test", 1, 2)[0]

    def forward(model: nn.Module) -> Any:
        with torch.no_grad():
            return run.task.forward(model, example)

    return forward


# ---------------------------------------------------------------------------------------------
# stage: model + data


def build_model_and_data(cfg: Config, run_dir: Path, config_dir: Path | None) -> Run:
    from hawq.data.checks import check_compatible, configure_task
    from hawq.models.compat import build_model

    device = resolve_device(cfg.run.device)
    get_model_spec(cfg.model.name)  # an unknown model name fails before any data is read
    data_cfg = copy.deepcopy(cfg.data)
    data_cfg.root = resolve_path(data_cfg.root, config_dir)
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.checkpoint = resolve_path(model_cfg.checkpoint, config_dir)
    if data_cfg.tokenizer not in (None, "minilm"):
        data_cfg.tokenizer = resolve_path(data_cfg.tokenizer, config_dir)
    data = build_data(data_cfg, seed=cfg.run.seed)
    spec, model = build_model(model_cfg, data.num_classes)
    task = get_task(spec.task)
    configure_task(task, data)
    model.to(device).eval()
    layers = spec.layers(model)
    if not layers:
        raise HawqError(f"model '{spec.name}' has no quantizable layers")
    check_compatible(spec, model, data)
    run = Run(cfg, run_dir, device, spec, task, data, model, layers)
    kwargs = dict(model_cfg.kwargs)
    num_classes = model_cfg.num_classes or data.num_classes
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    run.results["model_info"] = {"name": spec.name, "kwargs": kwargs, "checkpoint": model_cfg.checkpoint}
    return run


def pretrain_if_needed(run: Run) -> None:
    """Without a checkpoint, train the FP32 model first (and keep it in the run folder)."""
    m = run.cfg.model
    if m.checkpoint is not None or m.weights is not None or m.pretrain_epochs <= 0:
        return
    from safetensors.torch import load_file, save_file

    path = run.run_dir / "fp32.safetensors"
    key = digest(config_to_dict(run.cfg.model), config_to_dict(run.cfg.data), run.cfg.run.seed)

    def reuse() -> bool:
        meta = read_json(run.run_dir / "fp32.json")
        if run.cfg.run.resume and path.exists() and meta and meta.get("key") == key:
            run.fp32.load_state_dict(load_file(str(path), device=str(run.device)))
            return True
        return False

    if D.run_on_main(reuse):
        D.broadcast_module(run.fp32)  # rank 0 read the file; the others take its weights
        return
    from hawq.train import train

    train_cfg = dataclasses.replace(run.cfg.train, epochs=run.cfg.model.pretrain_epochs,
                                    lr=run.cfg.model.pretrain_lr, weight_decay=5e-4,
                                    distill=dataclasses.replace(run.cfg.train.distill, enabled=False))
    seed_everything(run.cfg.run.seed)
    run.fp32.train()
    train(run.fp32, run.task, run.data.train, train_cfg, device=run.device, run_dir=run.run_dir,
          seed=run.cfg.run.seed, progress=run.progress, tag="pretrain", collate_fn=run.data.collate_fn)
    run.fp32.eval()
    # DDP keeps the weights equal, but each process updated its BatchNorm statistics on its own
    # shard after the last broadcast: take rank 0's, the model that is saved
    D.broadcast_module(run.fp32)

    def save() -> None:
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in run.fp32.state_dict().items()}, str(tmp))
        tmp.replace(path)
        write_json(run.run_dir / "fp32.json", {"key": key})

    D.run_on_main(save)


# ---------------------------------------------------------------------------------------------
# stage: sensitivity


def stage_sensitivity(run: Run) -> dict[str, Any]:
    """Per-layer Hessian traces (plus the optional spectrum), cached in ``traces.json``.

    Under torchrun each process takes the batches ``rank, rank + world, ...`` of the same seeded
    list and the Hessian operator sums over processes, so every process gets the traces one process
    computes on the whole list (up to float64 summation order). The cache key fingerprints the whole
    list, so a run on any number of processes reuses the traces of a run on any other number.
    """
    from hawq.sensitivity import batches_fingerprint, hessian_traces, load_traces, save_traces, traces_cache_key

    scfg = run.cfg.sensitivity
    path = run.run_dir / "traces.json"
    all_batches = run.batches("train", scfg.batches, scfg.batch_size, shuffle=True, to_device=False)
    key = traces_cache_key(run.fp32, batches_fingerprint(all_batches),
                           {"sensitivity": config_to_dict(scfg), "seed": run.cfg.run.seed, "layers": run.layers})

    def cached() -> tuple[dict[str, Any], dict[str, Any]] | None:
        if run.cfg.run.resume and path.exists():
            try:
                traces, meta = load_traces(path)
            except HawqError as e:
                raise HawqError(f"{e}; delete {path} (or run with --no-resume) to start the sensitivity "
                                "stage over") from None
            if meta.get("key") == key:
                log.info("sensitivity: reusing %s", path)
                return traces, meta
        return None

    hit = D.run_on_main(cached)
    if hit is not None:
        run.results["sensitivity_meta"] = hit[1]
        return hit[0]
    model = copy.deepcopy(run.fp32)
    model.train(scfg.bn_mode == "train")
    world = D.get_world_size()
    if len(all_batches) < world and run.main:
        log.warning("sensitivity: %d batches for %d processes: some processes idle (set sensitivity.batches "
                    ">= %d)", len(all_batches), world, world)
    batches = [run.task.to_device(b, run.device) for b in D.shard(all_batches)]
    if scfg.label_free:
        from hawq.sensitivity import label_free_loss

        # the copy, in the same BN mode, is the reference point: the residual is zero there, so this
        # Hessian is the Gauss-Newton matrix of the output distance
        loss_fn = label_free_loss(run.task, model)
    else:
        from hawq.sensitivity import task_loss

        loss_fn = task_loss(run.task)  # outputs and a loss on them: exact Gauss-Newton traces where they apply
    kwargs = {**scfg.hutchinson_kwargs(), "seed": run.cfg.run.seed + scfg.seed}
    t0 = time.perf_counter()
    traces = hessian_traces(model, loss_fn, batches, layers=run.layers, progress=run.progress, **kwargs)
    elapsed = time.perf_counter() - t0
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    meta = {"key": key, "bn_mode": scfg.bn_mode if has_bn else None, "label_free": scfg.label_free,
            "normalize": scfg.normalize,
            "batches": len(all_batches), "batch_size": scfg.batch_size, "seed": kwargs["seed"],
            "tol": scfg.tol, "min_probes": scfg.min_probes, "max_probes": scfg.max_probes,
            "variance_reduction": scfg.variance_reduction, "estimator": scfg.estimator, "curvature": scfg.curvature,
            "exact_layers": sorted(n for n, t in traces.items() if t.estimator == "gauss_newton"),
            "sampled_layers": sorted(n for n, t in traces.items() if t.estimator == "gn_sampled"),
            "curvature_notes": {n: t.note for n, t in traces.items() if t.note},
            "hvps": sum(t.n for t in traces.values() if t.estimator == "hutchinson"),
            "backward_passes": max((t.n for t in traces.values() if t.estimator in ("gauss_newton", "gn_sampled")),
                                   default=0),
            "seconds": round(elapsed, 3), "device": str(run.device), "processes": world}
    spectrum_batches = D.shard(all_batches[: scfg.spectrum_batches])
    spectrum, density = _spectrum(run, model, loss_fn, [run.task.to_device(b, run.device) for b in spectrum_batches],
                                  kwargs["seed"])
    meta.update(spectrum)
    if world > 1:
        # The operator all-reduces every product, so the processes hold bit-identical estimates
        # (what DDP relies on for its gradients too). Check it; if they ever differed, rank 0's
        # numbers are the ones written, searched on and reported.
        mine = digest({k: dataclasses.asdict(v) for k, v in traces.items()}, spectrum)
        gathered = D.all_gather_object((len(batches), mine))
        meta["batches_per_process"] = [n for n, _ in gathered]
        meta["ranks_agree"] = len({d for _, d in gathered}) == 1
        if not meta["ranks_agree"]:
            log.warning("sensitivity: the %d processes computed different estimates; using rank 0's", world)
            traces, meta = D.broadcast_object((traces, meta))  # type: ignore[misc]

    def save() -> None:
        if density is not None:
            from hawq.sensitivity import plot_density

            plot_density(density, run.run_dir / "density.png")
        save_traces(path, traces, meta)

    D.run_on_main(save)
    run.results["sensitivity_meta"] = meta
    check_informative(traces, run.main)
    return traces


def check_informative(traces: dict[str, Any], warn: bool = True) -> None:
    """Sensitivity that carries no information makes the bit map arbitrary: stop on non-finite
    traces (the search cannot rank them), warn in one line when every trace is zero."""
    bad = sorted(n for n, t in traces.items() if not math.isfinite(t.mean))
    if bad:
        raise HawqError(f"sensitivity: the Hessian trace of '{bad[0]}' ({len(bad)} of {len(traces)} layers) is "
                        "not finite: the FP32 model's loss is not finite on this data (was it trained?)")
    if warn and traces and all(t.mean == 0 for t in traces.values()):
        log.warning("sensitivity: every Hessian trace is 0 (a flat or saturated loss: was the FP32 model "
                    "trained?); the bit map carries no sensitivity information")


def _spectrum(run: Run, model: nn.Module, loss_fn: Any, batches: list[Any], seed: int) -> tuple[dict[str, Any], Any]:
    """Optional whole-model curvature summaries: top eigenvalues and the SLQ eigenvalue density.

    Returns the summaries for ``traces.json``'s meta and the density (to plot), or None.
    """
    from hawq.sensitivity import spectral_density, top_eigenvalues

    scfg = run.cfg.sensitivity
    out: dict[str, Any] = {}
    density = None
    if scfg.top_eigen > 0:
        top = top_eigenvalues(model, loss_fn, batches, k=scfg.top_eigen, seed=seed, progress=run.progress)
        out["top_eigenvalues"] = top.values
    if scfg.density_iter > 0:
        density = spectral_density(model, loss_fn, batches, n_iter=scfg.density_iter, seed=seed,
                                   progress=run.progress)
        out["density"] = {"nodes": density.nodes, "weights": density.weights, "png": "density.png",
                          "trace_estimate": density.trace()}
    return out, density


# ---------------------------------------------------------------------------------------------
# stage: search


def stage_search(run: Run, traces: dict[str, Any]) -> tuple[BitMap, dict[str, Any]]:
    """The bit allocation, solved on rank 0 and broadcast (as bits.yaml's JSON) to every process."""
    costs = run_costs(run)  # every process needs the costs (report, uniform baseline)
    bits_dict, info = D.run_on_main(_search_on_main, run, traces, costs)
    return bitmap_from_dict(bits_dict, run.layers), info


def _search_on_main(run: Run, traces: dict[str, Any], costs: dict[str, Any]) -> tuple[dict, dict[str, Any]]:
    from hawq.search import build_search_problem, pareto_sweep, solve_problem, uniform_points, write_pareto

    path = run.run_dir / "bits.yaml"
    info_path = run.run_dir / "search.json"
    search_cfg = dataclasses.replace(run.cfg.search, pins=effective_pins(run))
    traces_key = digest({k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
                         for k, v in traces.items()})
    key = digest(config_to_dict(search_cfg), traces_key, config_to_dict(run.cfg.quant))
    info = read_json(info_path)
    if run.cfg.run.resume and path.exists() and info and info.get("key") == key:
        return bitmap_to_dict(load_bitmap(path, run.layers)), info
    problem = build_search_problem(run.fp32, traces, costs, search_cfg, per_channel=run.cfg.quant.per_channel,
                                   group_size=run.cfg.quant.group_size, progress=run.progress)
    alloc = solve_problem(problem)
    if search_cfg.pareto_points > 0:
        # the whole size/perturbation front from the same traces: cheap, and shows where the budget sits
        rows = pareto_sweep(problem, n_points=search_cfg.pareto_points, keep_other_budgets=False,
                            progress=run.progress)
        write_pareto(rows, run.run_dir / "pareto.csv", run.run_dir / "pareto.png", uniform_points(problem))
    info = {"key": key, "objective": alloc.objective, "usage": alloc.usage, "budgets": alloc.budgets,
            "status": alloc.status, "solve_time_s": alloc.solve_time_s, "notes": alloc.notes}
    save_bitmap(alloc.bits, path)
    write_json(info_path, info)
    return bitmap_to_dict(alloc.bits), info


def run_costs(run: Run) -> dict[str, Any]:
    """Per-layer params/MACs from one traced forward pass (computed once per run)."""
    if "costs" not in run.results:
        from hawq.search import layer_costs

        run.results["costs"] = layer_costs(run.fp32, _example_forward(run), run.layers)
    return run.results["costs"]


def check_budgets(run: Run) -> None:
    """Fail fast: an infeasible budget, or pins/ties naming unknown layers, is reported before the
    (expensive) sensitivity stage. Feasibility does not depend on the traces, so unit ones do."""
    from hawq.search import build_search_problem, solve_problem

    costs = run_costs(run)
    search_cfg = dataclasses.replace(run.cfg.search, pins=effective_pins(run))
    unit = {name: {"mean": 1.0, "numel": 1} for name in costs}
    flat = {name: dict.fromkeys(run.cfg.search.weight_bits, 1.0) for name in costs}
    problem = build_search_problem(run.fp32, unit, costs, search_cfg, per_channel=run.cfg.quant.per_channel,
                                   group_size=run.cfg.quant.group_size, perturbations=flat)
    solve_problem(problem)


def effective_pins(run: Run) -> dict[str, dict[str, int]]:
    """The family's default pins, overridden layer by layer by the config's."""
    return {**run.spec.default_pins, **run.cfg.search.pins}


def uniform_bits_same_size(run: Run, bits: BitMap) -> tuple[int, BitMap]:
    """The uniform-precision map the HAWQ map is compared against: same budget, same pins.

    With ``size_uniform_bits: N`` (or ``bops_uniform_bits``) it is uniform N-bit; otherwise the
    largest uniform weight precision whose size fits in the HAWQ map's size.
    """
    b = run.cfg.search.budget
    w = b.size_uniform_bits or b.bops_uniform_bits
    if w is None:
        from hawq.search import model_size_mb

        target = model_size_mb(run.fp32, bits, run.layers)
        fitting = [o for o in sorted(run.cfg.search.weight_bits)
                   if model_size_mb(run.fp32, _uniform(run, bits, o), run.layers) <= target * 1.0001]
        w = fitting[-1] if fitting else min(run.cfg.search.weight_bits)
    return w, _uniform(run, bits, w)


def _uniform(run: Run, bits: BitMap, w: int) -> BitMap:
    pins = effective_pins(run)
    a = max(run.cfg.search.activation_bits)
    # A pin fixes only the widths it names: an activation-only pin leaves the weight uniform.
    return {name: LayerBits(pins[name].get("weight", w), pins[name].get("activation", a)) if name in pins
            else LayerBits(w, a) for name in run.layers}


# ---------------------------------------------------------------------------------------------
# stage: quantize (+ calibration)


def quantized_copy(run: Run, bits: BitMap) -> nn.Module:
    from hawq.quant import calibrate, quantize_model

    model = quantize_model(copy.deepcopy(run.fp32), bits, run.cfg.quant)
    model.to(run.device).eval()
    calib = run.batches("train", run.cfg.quant.calib_batches, run.cfg.data.batch_size, shuffle=True)
    if run.cfg.quant.rounding == "gptq":  # weights first (activation quantizers off), then activation ranges
        from hawq.quant.gptq import gptq_options, gptq_round_

        n = run.cfg.quant.gptq_batches
        hess = calib if n is None else run.batches("train", n, run.cfg.data.batch_size, shuffle=True)
        if run.cfg.quant.gptq_asymmetric:  # its Hessians see the quantized activations: ranges first
            calibrate(model, calib, run.task.forward, progress=run.progress)
        gptq_round_(model, hess, run.task.forward, progress=run.progress, **gptq_options(run.cfg.quant))
    calibrate(model, calib, run.task.forward, progress=run.progress)
    return model


# ---------------------------------------------------------------------------------------------
# stage: finetune


def stage_finetune(run: Run, model: nn.Module, bits: BitMap) -> list[dict]:
    from hawq.train import train

    if run.cfg.train.epochs <= 0:
        return []
    # A checkpoint of an earlier finetune resumes only if it finetuned the same quantized model.
    key = digest(bitmap_to_dict(bits), config_to_dict(run.cfg.quant), config_to_dict(run.cfg.train),
                 state_dict_digest(run.fp32), run.cfg.run.seed)
    ckpt_dir = run.run_dir / "checkpoints"
    key_file = ckpt_dir / "finetune.key"

    def prepare() -> None:
        if key_file.exists() and (key_file.read_text().strip() != key or not run.cfg.run.resume):
            for old in ckpt_dir.glob("finetune_*"):
                old.unlink()
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(key_file, key + "\n")

    # rank 0 clears a stale checkpoint before any process looks for one to resume (the run folder
    # must be on a filesystem every process sees: one node, or shared storage)
    D.run_on_main(prepare)
    seed_everything(run.cfg.run.seed)
    model.train()
    history = train(model, run.task, run.data.train, run.cfg.train, teacher=run.fp32, device=run.device,
                    run_dir=run.run_dir, seed=run.cfg.run.seed, progress=run.progress, tag="finetune",
                    collate_fn=run.data.collate_fn,
                    eval_fn=lambda m: {f"test_{k}": v for k, v in run.evaluate(m, "eval").items()})
    model.eval()
    # DDP keeps the weights equal; BatchNorm statistics and activation ranges are per process:
    # every process keeps rank 0's (the model that was evaluated and is exported)
    D.broadcast_module(model)
    return history


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
    cfg = run.cfg
    stages = set(cfg.run.stages)

    def timed(name: str, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        run.timings[name] = round(time.perf_counter() - t0, 2)
        return out

    on_main = D.run_on_main  # rank 0 computes, every process gets the result
    if "search" in stages:
        timed("check_budgets", D.run_everywhere, check_budgets, run)
    timed("pretrain", pretrain_if_needed, run)
    run.task.bind_reference(run.fp32)
    fp32_metrics = timed("eval_fp32", on_main, run.evaluate, run.fp32, "eval fp32")
    report: dict[str, Any] = {"fp32": fp32_metrics, "fp32_top1": run.primary(fp32_metrics),
                              "fp32_weights": fp32_source(cfg), "processes": D.get_world_size()}
    if report["fp32_weights"] == "untrained" and run.main:
        log.warning("model: no checkpoint, no weights and model.pretrain_epochs is 0: the FP32 model has "
                    "random weights, so its sensitivities and bit map mean nothing")

    traces = timed("sensitivity", stage_sensitivity, run) if "sensitivity" in stages else None
    if "search" not in stages or traces is None:
        return _finish(run, report, None, None, t_start)
    bits, search_info = timed("search", stage_search, run, traces)
    report["search"] = search_info
    if "quantize" not in stages:
        return _finish(run, report, traces, bits, t_start)

    uniform_w, uniform = uniform_bits_same_size(run, bits)
    # every process needs the quantized model (finetuning); calibration is deterministic, so they agree
    qmodel = timed("quantize", D.run_everywhere, quantized_copy, run, bits)
    before = timed("eval_quant", on_main, run.evaluate, qmodel, "eval hawq")
    uniform_metrics = timed("eval_uniform", on_main, _evaluate_quantized, run, uniform, "eval uniform")
    report.update(quant_before_finetune=before, uniform_same_size=uniform_metrics,
                  quant_top1_before_finetune=run.primary(before),
                  uniform_top1_same_size=run.primary(uniform_metrics),
                  uniform_weight_bits=uniform_w)

    after = before
    if "finetune" in stages:
        history = timed("finetune", stage_finetune, run, qmodel, bits)
        if history:  # the loop evaluated the final model on the test split after its last epoch
            after = {k[len("test_"):]: v for k, v in history[-1].items() if k.startswith("test_")}
            check_not_at_chance(run, before, after)
        report["history"] = history
    report.update(quant_after_finetune=after, quant_top1_after_finetune=run.primary(after))

    if "export" in stages:
        report["export"] = timed("export", on_main, stage_export, run, qmodel, bits)
    return _finish(run, report, traces, bits, t_start)


def fp32_source(cfg: Config) -> str:
    """Where the FP32 weights come from: checkpoint, weights (torchvision), pretrained or untrained."""
    m = cfg.model
    if m.checkpoint is not None:
        return "checkpoint"
    if m.weights is not None:
        return "weights"
    return "pretrained" if m.pretrain_epochs > 0 else "untrained"


def check_not_at_chance(run: Run, before: dict[str, float], after: dict[str, float]) -> None:
    """Finetuning that takes a model from clearly above chance down to chance top-1 has diverged."""
    classes = run.data.num_classes
    if run.task.primary_metric != "top1" or not classes or classes < 2:
        return
    chance = 100.0 / classes
    top1_before, top1_after = run.primary(before), run.primary(after)
    if top1_before >= 2 * chance and top1_after <= 1.5 * chance:
        raise HawqError(f"finetuning diverged: top-1 fell from {top1_before:.1f}% to {top1_after:.1f}% (chance is "
                        f"{chance:.1f}%); lower train.lr (now {run.cfg.train.lr:g})")


def _evaluate_quantized(run: Run, bits: BitMap, desc: str) -> dict[str, float]:
    model = quantized_copy(run, bits)
    return run.evaluate(model, desc)


def stage_export(run: Run, qmodel: nn.Module, bits: BitMap) -> dict[str, Any]:
    from hawq.export import export_onnx, save_quantized

    out: dict[str, Any] = {}
    ecfg = run.cfg.export
    example = run.task.model_inputs(run.batches("test", 1, 8)[0]) if ecfg.onnx or ecfg.onnx_integer else ()
    if ecfg.safetensors:
        summary = save_quantized(qmodel, bits, run.run_dir / "model.safetensors", run.results["model_info"],
                                 quant_config=run.cfg.quant, integer=ecfg.integer)
        out["safetensors"] = {"path": "model.safetensors", **summary}
    if ecfg.onnx:
        from hawq.export import compare_onnx

        path = run.run_dir / "model.onnx"
        try:
            export_onnx(qmodel, example if len(example) > 1 else example[0], path, opset=ecfg.onnx_opset,
                        int4=ecfg.onnx_int4)
            out["onnx"] = {"path": "model.onnx", "check": compare_onnx(qmodel, path, example)}
        except Exception as e:  # noqa: BLE001
            # Some graphs (detection post-processing, HF model outputs) have no QDQ export yet; the
            # finetuned model and its safetensors are already saved, so record the reason and go on.
            out["onnx"] = {"error": f"{type(e).__name__}: {e}"}
            log.warning("onnx export skipped: %s", e)
    if ecfg.onnx_integer:
        out["onnx_integer"] = _export_onnx_integer(run, qmodel, example)
    return out


def _export_onnx_integer(run: Run, qmodel: nn.Module, example: tuple[Any, ...]) -> dict[str, Any]:
    """``model_int.onnx``: the integer-only model (ConvInteger/MatMulInteger + dyadic rescales)."""
    from hawq.export import compare_onnx_integer, export_onnx_integer
    from hawq.quant import to_integer

    if len(example) != 1:
        return {"skipped": "the integer ONNX export takes models with a single tensor input"}
    path = run.run_dir / "model_int.onnx"
    try:
        int_model = to_integer(qmodel, example[0])
        export_onnx_integer(int_model, example[0], path, opset=run.cfg.export.onnx_opset)
    except HawqError as e:  # e.g. float-only ops (transformers), layers above 8 bits, inputs above 8 bits
        log.info("integer onnx export skipped: %s", e)
        return {"skipped": str(e)}
    return {"path": "model_int.onnx", "check": compare_onnx_integer(int_model, path, example[0])}


def _finish(run: Run, report: dict[str, Any], traces: Any, bits: BitMap | None, t_start: float) -> dict[str, Any]:
    """Build and write the report on rank 0 (rank 0's timings); every process returns that report."""
    from hawq.report import build_report, write_report

    def on_main() -> dict[str, Any]:
        full = build_report(run, report, traces, bits)
        full["timings_s"] = {**run.timings, "total": round(time.perf_counter() - t_start, 2)}
        write_report(run, full, traces, bits)
        return full

    return D.run_on_main(on_main)

