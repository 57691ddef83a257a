"""Measure each Conv2d/Linear layer's latency on this CPU at each precision -> JSON for the ILP.

    .venv/bin/python scripts/build_latency_table.py                      # fashion_resnet, < 1 min
    .venv/bin/python scripts/build_latency_table.py --model resnet18 --out runs/latency_resnet18.json

Per layer (batch 1, the layer's real input shape from one traced forward):
* ``fp32``: the float module;
* ``w8a8``: torch's quantized kernels (``torch.ao.nn.quantized.Conv2d`` / ``Linear``, fbgemm/x86
  engine): quint8 activations, per-channel qint8 weights.
* ``w{w}a{a}`` for 2 <= w, a < 8: CPU has no sub-8-bit integer kernels, so they run on the int8
  kernel and repeat the ``w8a8`` time (recorded in ``notes``). Options above 8 bits have no entry
  and the table falls back to ``fp32`` (no int16 kernels).
Times are medians over repeated runs, single-threaded unless ``--threads``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.ao.nn.quantized as nnq
from torch import nn
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hawq.bitmap import atomic_write_text  # noqa: E402
from hawq.models.registry import get_model_spec  # noqa: E402
from hawq.search.latency import cpu_model_name, current_device, latency_key  # noqa: E402

INT_BITS = range(2, 9)


def median_ms(fn, min_time_s: float, max_runs: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times, start = [], time.perf_counter()
    while len(times) < max_runs and (len(times) < 5 or time.perf_counter() - start < min_time_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def layer_inputs(model: nn.Module, example: torch.Tensor) -> dict[str, torch.Tensor]:
    inputs, handles = {}, []

    def make_hook(name: str):
        def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:  # None: output unchanged
            inputs.setdefault(name, args[0].detach().clone())
        return hook

    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            handles.append(m.register_forward_hook(make_hook(name)))
    with torch.no_grad():
        model(example)
    for h in handles:
        h.remove()
    return inputs


def int8_module(m: nn.Module, x: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """A quantized copy of ``m`` (per-channel qint8 weight) and ``x`` as quint8."""
    w = m.weight.detach()
    w_scale = (w.abs().flatten(1).amax(1).clamp_min(1e-8) / 127).double()
    qw = torch.quantize_per_channel(w, w_scale, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
    x_lo, x_hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)  # the grid must hold 0 exactly
    x_scale = max(x_hi - x_lo, 1e-8) / 255
    qx = torch.quantize_per_tensor(x, x_scale, min(255, int(round(-x_lo / x_scale))), torch.quint8)
    bias = None if m.bias is None else m.bias.detach()
    if isinstance(m, nn.Conv2d):
        q = nnq.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                       m.groups, m.bias is not None)
    else:
        q = nnq.Linear(m.in_features, m.out_features, bias_=m.bias is not None)
    q.set_weight_bias(qw, bias)
    q.scale, q.zero_point = 0.05, 128  # output requantization parameters: cost is the same for any value
    return q, qx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="fashion_resnet", help="registered model name (default fashion_resnet)")
    ap.add_argument("--out", default="runs/latency_fashion_resnet.json")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--min-time", type=float, default=0.1, help="seconds of timed runs per kernel at least")
    ap.add_argument("--max-runs", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    # torch deprecates quantized-tensor creation; these are still its CPU integer kernels today.
    warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
    torch.set_num_threads(args.threads)
    engine = "x86" if "x86" in torch.backends.quantized.supported_engines else "fbgemm"
    if engine not in torch.backends.quantized.supported_engines:
        engine = torch.backends.quantized.supported_engines[-1]
    torch.backends.quantized.engine = engine
    spec = get_model_spec(args.model)
    model = spec.builder().eval()
    if spec.input_shape and len(spec.input_shape) == 1:
        sys.exit(f"{args.model}: token models are not supported by this script (Conv2d/Linear on images)")
    example = torch.randn(1, *spec.input_shape)
    inputs = layer_inputs(model, example)
    modules = dict(model.named_modules())
    layers: dict[str, dict[str, float]] = {}
    t_start = time.perf_counter()
    with torch.no_grad():
        for name in tqdm(list(inputs), desc="layers", disable=args.no_progress):
            m, x = modules[name], inputs[name]
            fp32 = median_ms(lambda m=m, x=x: m(x), args.min_time, args.max_runs)
            q, qx = int8_module(m, x)
            int8 = median_ms(lambda q=q, qx=qx: q(qx), args.min_time, args.max_runs)
            row = {"fp32": round(fp32, 6)}
            row.update({latency_key(w, a): round(int8, 6) for w in INT_BITS for a in INT_BITS})
            layers[name] = row
    table = {
        "device": current_device(),
        "torch": torch.__version__,
        "cpu_info": {"model_name": cpu_model_name(), "machine": platform.machine(),
                     "quantized_engine": engine, "threads": args.threads},
        "model": args.model,
        "input_shape": [1, *spec.input_shape],
        "notes": [
            "milliseconds per call at batch 1, median of repeated runs",
            f"w8a8 measured with torch.ao.nn.quantized kernels ({engine} engine), quint8 activations, "
            "per-channel qint8 weights",
            "sub-8-bit options (w2..w7 / a2..a7) have no CPU kernels: they run as int8 and repeat the w8a8 time",
            "options above 8 bits have no entry: lookups fall back to fp32 (no int16 kernels)",
        ],
        "layers": layers,
    }
    atomic_write_text(args.out, json.dumps(table, indent=1))
    total_fp32 = sum(r["fp32"] for r in layers.values())
    total_int8 = sum(r["w8a8"] for r in layers.values())
    print(f"{args.model}: {len(layers)} layers measured in {time.perf_counter() - t_start:.1f}s on {table['device']}")
    print(f"sum of layer latencies: fp32 {total_fp32:.3f} ms, int8 {total_int8:.3f} ms "
          f"(int8/fp32 = {total_int8 / total_fp32:.2f}x)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
