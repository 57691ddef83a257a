"""Where MiniLM's activation-quantization error comes from: per-role ablation of the activation quantizers.

all-MiniLM-L6-v2 (``configs/minilm_sentence.yaml``) with *float weights* and every Linear input on an
activation grid, so only activation quantization is measured. Each encoder layer has six activation
quantizers, one per Linear input, in four tensors: the attention block's input (a LayerNorm output,
feeding query/key/value), the attention context (feeding ``attention.output.dense``), the attention
block's LayerNorm output (feeding ``intermediate.dense``) and the GELU output (feeding ``output.dense``).
Rows: all at 8 bits (per calibration method), then one role at a time left float (what it costs) or
widened to 12 bits, then both FFN inputs at 12 bits (``configs/minilm_sentence_ffn12.yaml``) per
calibration method, and the roles' outlier statistics on the calibration batches (max over channels of
the per-channel max |x|, over the median channel's). Metric: mean / worst cosine of the 60 held-out
sentence embeddings to FP32. Writes ``results_act_ablation.{json,md}``.

    python scripts/results_act_ablation.py --threads 1 --out runs/results_act_ablation
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
for p in (str(REPO), str(SCRIPTS)):
    if p not in sys.path:
        sys.path.insert(0, p)

from results_fashion import build_config  # noqa: E402

from hawq import HawqError  # noqa: E402
from hawq.bitmap import LayerBits  # noqa: E402
from hawq.quant import QuantAct, calibrate, quantize_model  # noqa: E402
from hawq.run import Run, build_model_and_data, seed_everything  # noqa: E402

CONFIG = "configs/minilm_sentence.yaml"
ROLES = {  # role: the Linear whose input it is (suffix of the layer name)
    "attention input (LayerNorm out) -> query/key/value": ("attention.self.query", "attention.self.key",
                                                           "attention.self.value"),
    "attention context -> attention.output.dense": ("attention.output.dense",),
    "attention LayerNorm out -> intermediate.dense": ("intermediate.dense",),
    "GELU out -> output.dense": (".output.dense",),
}
METHODS = ("minmax", "percentile", "mse")


def _role_of(layer: str) -> str:
    for role, suffixes in ROLES.items():
        if layer.endswith(suffixes) and not (suffixes == (".output.dense",) and "attention" in layer):
            return role
    raise HawqError(f"no role for layer '{layer}'")


def _model(run: Run, method: str, wide: tuple[str, ...] = (), wide_bits: int = 12) -> torch.nn.Module:
    linears = [n for n in run.layers if "embeddings" not in n]
    bits = {n: LayerBits(32, wide_bits if _role_of(n) in wide else 8) for n in linears}
    quant = dataclasses.replace(run.cfg.quant, act_calibration=method)
    model = quantize_model(copy.deepcopy(run.fp32), bits, quant).eval()
    seed_everything(run.cfg.run.seed)
    calib = run.batches("train", run.cfg.quant.calib_batches, run.cfg.data.batch_size, shuffle=True)
    calibrate(model, calib, run.task.forward, progress=False)
    return model


def _score(run: Run, model: torch.nn.Module) -> dict[str, float]:
    m = run.evaluate(model, "eval")
    return {"cosine_mean": round(float(m["cosine_mean"]), 4), "cosine_worst": round(float(m["cosine_worst"]), 4)}


@torch.no_grad()
def _outliers(run: Run, model: torch.nn.Module) -> dict[str, float]:
    """Per role, the largest ratio (over layers) of the top channel's max |x| to the median channel's."""
    amax: dict[str, torch.Tensor] = {}
    acts = {n.removesuffix(".input_quant"): a for n, a in model.named_modules() if isinstance(a, QuantAct)}

    def hook(name: str):
        def fn(_m: Any, inp: tuple[torch.Tensor, ...]) -> None:
            a = inp[0].detach().abs().reshape(-1, inp[0].shape[-1]).amax(0)
            amax[name] = a if name not in amax else torch.maximum(amax[name], a)
        return fn

    handles = [a.register_forward_pre_hook(hook(n)) for n, a in acts.items()]
    seed_everything(run.cfg.run.seed)
    for batch in run.batches("train", run.cfg.quant.calib_batches, run.cfg.data.batch_size, shuffle=True):
        run.task.forward(model, batch)
    for h in handles:
        h.remove()
    out: dict[str, float] = {}
    for name, a in amax.items():
        r = float(a.max() / a.median())
        role = _role_of(name)
        out[role] = round(max(out.get(role, 0.0), r), 1)
    return out


def run_ablation(out_dir: Path, threads: int | None) -> dict[str, Any]:
    cfg = build_config(str(REPO / CONFIG), [], 0.0, None, None, None, threads)
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, progress=False))
    run = build_model_and_data(cfg, out_dir / "work", (REPO / CONFIG).parent)
    run.task.bind_reference(run.fp32)
    rows: list[dict[str, Any]] = []
    for method in METHODS:
        rows.append({"what": f"all 8-bit, {method}", **_score(run, _model(run, method))})
    base = _model(run, "minmax")
    ratios = _outliers(run, base)
    for role in ROLES:
        for name, act in base.named_modules():
            if isinstance(act, QuantAct):
                act.set_mode("off" if _role_of(name.removesuffix(".input_quant")) == role else "frozen")
        rows.append({"what": f"float: {role}", **_score(run, base)})
        rows.append({"what": f"12-bit: {role}", **_score(run, _model(run, "minmax", wide=(role,)))})
    ffn = tuple(r for r in ROLES if r.endswith(("intermediate.dense", "output.dense")) and "context" not in r)
    for method in METHODS:  # configs/minilm_sentence_ffn12.yaml: both FFN inputs at 12 bits
        rows.append({"what": f"12-bit FFN inputs (both), others 8-bit, {method}",
                     **_score(run, _model(run, method, wide=ffn))})
    return {"rows": rows, "outlier_ratio": ratios, "config": CONFIG}


def markdown(data: dict[str, Any]) -> str:
    lines = ["| activations (weights float) | mean cosine | worst cosine |", "|---|---|---|"]
    lines += [f"| {r['what']} | {r['cosine_mean']:.4f} | {r['cosine_worst']:.4f} |" for r in data["rows"]]
    lines += ["", "| role | top channel max / median channel max (worst layer) |", "|---|---|"]
    lines += [f"| {role} | {r} |" for role, r in data["outlier_ratio"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="runs/results_act_ablation")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        if args.threads is not None and args.threads < 1:
            raise HawqError(f"--threads must be >= 1, got {args.threads}")
        if args.threads:
            torch.set_num_threads(args.threads)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        data = run_ablation(out, args.threads)
    except HawqError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    (out / "results_act_ablation.json").write_text(json.dumps(data, indent=1))
    table = markdown(data)
    (out / "results_act_ablation.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
