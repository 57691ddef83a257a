"""Latency of hawq's quantized ResNet-18 against FP32 and PyTorch's own int8, measured in one run.

Model: torchvision ResNet-18, random init (seed 0), 224x224 inputs (``--size``), batch 1 and 16, N threads
(``--threads``, default 2).
Engines, each timed as the median of ``--runs`` calls after ``--warmup`` calls (engines take
turns within every round, so load on a shared machine affects all of them alike):

* ``fp32 eager``              torchvision model in PyTorch eager (the baseline: ratio 1.00)
* ``fp32 onnxruntime``        the same model exported to ONNX, onnxruntime CPUExecutionProvider
* ``torch int8 <engine>``     ``torchvision.models.quantization.resnet18`` with the same weights, fused,
                              prepared and converted with that engine's default qconfig (random
                              calibration), one row per quantized engine (``--engines``, default every
                              one of fbgemm, x86, onednn in ``torch.backends.quantized.supported_engines``)
* ``hawq <map> integer``      ``hawq.quant.to_integer`` model with the ``int_mm`` engine (torch._int_mm)
* ``hawq <map> ort-qdq``      ``hawq.export.export_onnx`` QDQ graph (int8 weight containers) in onnxruntime
* ``hawq <map> ort-int``      ``hawq.export.export_onnx_integer``: the integer model as ConvInteger/MatMulInteger
                              and INT64 rescaling in onnxruntime (bit-identical to ``hawq <map> integer``)
* ``hawq <map> <engine>``     ``hawq.quant.to_fbgemm(engine=<engine>)``: hawq's codes and activation grids on
                              PyTorch's int8 kernels of that engine (int8 kernels, float requant multiplier;
                              on onednn a conv is fused with its residual add)

for two hawq bit maps: ``W8A8`` (all layers 8-bit) and ``W4/8A8`` (every other layer's weights at
4 bits). hawq models use ``QuantConfig(fold_bn=True)`` (HAWQ-V3 BN folding) and min/max
calibration on the same random batches. Agreement: the fraction of argmax matches on random
inputs against FP32 eager and, for hawq engines, against that map's fake-quant PyTorch model.
Each engine's time is reported with two ratios from the same run: against FP32 eager and against
PyTorch's own int8 model on the same quantized engine (``vs int8``; rows on no quantized engine are
compared with the fastest PyTorch int8 engine). The summary compares hawq W8A8 (the same weights
as PyTorch's int8 model, 8-bit everywhere) with PyTorch int8 engine by engine and batch by batch;
its headline is the minimum speed-up (PyTorch int8 time / hawq time) over all of them, and every
case where hawq is slower is listed.

    .venv/bin/python scripts/bench_integer.py            # full (batch 1 and 16, 10 rounds)
    .venv/bin/python scripts/bench_integer.py --quick    # smoke run (3 rounds, fewer images)
    .venv/bin/python scripts/bench_integer.py --quick --size 64 --batch 1   # fastest smoke run
    .venv/bin/python scripts/bench_integer.py --agreement-only --size 32 --threads 1   # no timing
    .venv/bin/python scripts/bench_integer.py --threads 1 --int8-only   # fp32 eager, torch int8 and hawq per engine
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hawq.bitmap import LayerBits  # noqa: E402
from hawq.export.onnx_qdq import export_onnx, export_onnx_integer  # noqa: E402
from hawq.layers import quantizable_layers  # noqa: E402
from hawq.quant import QuantConfig, calibrate, quantize_model, set_integer_backend, to_integer  # noqa: E402
from hawq.quant.integer import int_mm_saturates  # noqa: E402
from hawq.quant.torch_int8 import ENGINES, DuplicateChannels, to_fbgemm  # noqa: E402

ISA_ENV = ("ATEN_CPU_CAPABILITY", "FBGEMM_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def cpu_description() -> str:
    """The CPU the figures come from: model name, ATen's dispatch level, the int8-relevant ISA flags
    (AVX2, AVX-512*, VNNI, AMX from /proc/cpuinfo) and any ISA override in the environment."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:  # not Linux: model name from platform, no flags
        pass
    isa = sorted(f for f in flags if f == "avx2" or f.startswith(("avx512", "amx")) or "vnni" in f)
    overrides = [f"{k}={os.environ[k]}" for k in ISA_ENV if k in os.environ]
    return (f"CPU: {model}, {os.cpu_count()} logical CPUs, torch cpu capability "
            f"{torch.backends.cpu.get_cpu_capability()}; ISA flags: {' '.join(isa) or 'none found'}"
            + (f"; overrides: {' '.join(overrides)}" if overrides else ""))


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def round_robin_median_ms(fns: dict[str, Callable[[], object]], warmup: int, runs: int,
                          clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median time per engine; engines alternate within each round so that load changes on a
    shared machine hit every engine alike instead of whichever happened to run at that moment.
    ``clock``: ``time.perf_counter`` (wall) or ``time.process_time`` (CPU seconds of this process,
    all its threads: on a shared machine the time spent waiting for a core is not counted)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            t0 = clock()
            fn()
            times[name].append((clock() - t0) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_runner(session) -> Callable[[torch.Tensor], torch.Tensor]:
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def export_fp32(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), dynamo=True, verbose=False, external_data=False,
                                    dynamic_shapes=({0: batch},))
    program.save(str(path))
    return path


def torch_int8(fp32: nn.Module, calib: list[torch.Tensor], engine: str) -> nn.Module:
    """PyTorch's own eager int8 ResNet-18 on ``engine``: same weights, that engine's default qconfig."""
    from torch.ao.quantization import convert, get_default_qconfig, prepare
    from torchvision.models.quantization import resnet18 as quantizable_resnet18

    torch.backends.quantized.engine = engine
    model = quantizable_resnet18(weights=None, quantize=False)
    model.load_state_dict(fp32.state_dict())
    model.eval()
    model.fuse_model()
    model.qconfig = get_default_qconfig(engine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepare(model, inplace=True)
        with torch.no_grad():
            for x in calib:
                model(x)
        convert(model, inplace=True)
    # Other rows switch the global quantized engine; this model's weights are packed for ``engine``.
    model.register_forward_pre_hook(lambda *_: setattr(torch.backends.quantized, "engine", engine))
    return model


def speedup_summary(results: dict[tuple[str, int], float], engines: list[str], batches: list[int],
                    tags: list[str]) -> list[str]:
    """Lines comparing hawq with PyTorch int8 on each quantized engine and batch (same run).

    Speed-up = PyTorch int8 time / hawq time (> 1: hawq faster). The headline is the minimum over
    engines and batches of the W8A8 map (the same 8-bit weights as PyTorch's model); every case
    where hawq is slower is listed.
    """
    lines, w8 = [], []
    for tag in tags:
        for e in engines:
            for b in batches:
                hawq, ref = results.get((f"hawq {tag} {e}", b)), results.get((f"torch int8 {e}", b))
                if hawq is None or ref is None:
                    continue
                s = ref / hawq
                if tag == "W8A8":
                    w8.append((s, e, b))
                verdict = "same speed" if round(s, 2) == 1.0 else ("hawq faster" if s > 1 else "hawq SLOWER")
                lines.append(f"hawq {tag} vs torch int8 on {e}, batch {b}: {s:.2f}x ({verdict})")
    for b in batches:
        best_t = min(((results[(f"torch int8 {e}", b)], e) for e in engines if (f"torch int8 {e}", b) in results),
                     default=None)
        best_h = min(((results[(f"hawq W8A8 {e}", b)], e) for e in engines if (f"hawq W8A8 {e}", b) in results),
                     default=None)
        if best_t and best_h:
            lines.append(f"batch {b}: fastest hawq W8A8 ({best_h[1]}) vs fastest torch int8 ({best_t[1]}): "
                         f"{best_t[0] / best_h[0]:.2f}x")
    if w8:
        s, e, b = min(w8)
        lines.append(f"headline (minimum over engines and batches, W8A8): hawq is {s:.2f}x the speed of PyTorch "
                     f"int8 (worst case: {e}, batch {b})")
        slower = [f"{e} batch {b} ({s:.2f}x)" for s, e, b in sorted(w8) if round(s, 2) < 1]
        lines.append("hawq W8A8 slower than PyTorch int8 in: " + (", ".join(slower) if slower else "none"))
    return lines


def hawq_model(fp32: nn.Module, weight_bits: Callable[[int], int], calib: list[torch.Tensor]) -> nn.Module:
    model = copy.deepcopy(fp32)
    names = quantizable_layers(model)
    bits = {name: LayerBits(weight_bits(i), 8) for i, name in enumerate(names)}
    quantize_model(model, bits, QuantConfig(fold_bn=True))
    calibrate(model, calib, lambda m, b: m(b), progress=False)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few runs and images: a smoke test of the benchmark")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of PyTorch and onnxruntime (default 2)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--size", type=int, default=224, help="input height and width (default 224)")
    ap.add_argument("--runs", type=int, default=None, help="timed rounds per engine (default 10, quick 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 3, quick 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: elapsed time (an idle machine); cpu: CPU time of this process, all threads (a "
                         "shared machine: waiting for a core is not counted; with N threads it is the work, not "
                         "the latency)")
    ap.add_argument("--int8-only", action="store_true",
                    help="time only fp32 eager and the PyTorch int8 and hawq rows of every engine (no ONNX, no "
                         "to_integer)")
    ap.add_argument("--engines", nargs="+", default=None,
                    help="quantized engines (default: fbgemm, x86 and onednn where this PyTorch has them)")
    ap.add_argument("--agreement-only", action="store_true",
                    help="skip the timing; print only the agreement of every engine with FP32 and fake-quant")
    args = ap.parse_args()
    if args.agreement_only:
        args.batch = []
    runs = args.runs or (3 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    n_calib, n_eval = (2, 16) if args.quick else (4, 64)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    fp32 = torchvision.models.resnet18(weights=None).eval()
    size = args.size
    if size < 32 or args.threads < 1:
        ap.error("--size must be >= 32 and --threads >= 1")
    calib = [torch.randn(8, 3, size, size) for _ in range(n_calib)]
    eval_x = torch.randn(n_eval, 3, size, size)
    tmp = Path(tempfile.mkdtemp(prefix="hawq_bench_"))

    engines: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    fake_quant: dict[str, nn.Module] = {}  # engine name -> the hawq fake-quant model it implements
    engines["fp32 eager"] = fp32
    qengines = args.engines or [e for e in ENGINES if e in torch.backends.quantized.supported_engines]
    unknown = [e for e in qengines if e not in ENGINES or e not in torch.backends.quantized.supported_engines]
    if unknown:
        ap.error(f"--engines: '{unknown[0]}' is not one of this PyTorch's engines "
                 f"{[e for e in ENGINES if e in torch.backends.quantized.supported_engines]}")
    if not args.int8_only:
        log("exporting FP32 ONNX")
        engines["fp32 onnxruntime"] = ort_runner(ort_session(export_fp32(fp32, calib[0][:1], tmp / "fp32.onnx"),
                                                             args.threads))
    for e in qengines:
        log(f"PyTorch eager int8 ({e}): prepare / calibrate / convert")
        engines[f"torch int8 {e}"] = torch_int8(fp32, calib, e)
    maps = {"W8A8": lambda i: 8, "W4/8A8": lambda i: 4 if i % 2 else 8}
    for tag, wb in maps.items():
        log(f"hawq {tag}: quantize + calibrate, to_integer, export_onnx(_integer), to_fbgemm")
        fq = hawq_model(fp32, wb, calib)
        if not args.int8_only:
            integer = set_integer_backend(to_integer(fq), "int_mm")
            stem = tmp / f"hawq_{tag.replace('/', '_')}"
            qdq = export_onnx(fq, calib[0][:1], stem.with_suffix(".onnx"), int4=False)
            int_onnx = export_onnx_integer(integer, calib[0][:1], stem.with_suffix(".int.onnx"))
            engines[f"hawq {tag} integer"] = integer
            engines[f"hawq {tag} ort-qdq"] = ort_runner(ort_session(qdq, args.threads))
            engines[f"hawq {tag} ort-int"] = ort_runner(ort_session(int_onnx, args.threads))
            for kind in ("integer", "ort-qdq", "ort-int"):
                fake_quant[f"hawq {tag} {kind}"] = fq
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PyTorch's deprecation notice for quantized tensor creation
            for e in qengines:
                engines[f"hawq {tag} {e}"] = to_fbgemm(fq, calib, engine=e)
                fake_quant[f"hawq {tag} {e}"] = fq

    log("agreement on random inputs")
    agree: dict[str, tuple[float, float, float | None, float | None]] = {}
    outputs: dict[str, torch.Tensor] = {}

    def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
        return float((y - ref).norm() / ref.norm())

    with torch.no_grad():
        ref = fp32(eval_x)
        fq_out = {id(m): m(eval_x) for m in {id(m): m for m in fake_quant.values()}.values()}
        for name, fn in engines.items():
            out = outputs[name] = torch.cat([fn(x) for x in eval_x.split(16)])
            fq = fq_out.get(id(fake_quant[name])) if name in fake_quant else None
            agree[name] = (float((out.argmax(-1) == ref.argmax(-1)).float().mean()), rel_err(out, ref),
                           None if fq is None else float((out.argmax(-1) == fq.argmax(-1)).float().mean()),
                           None if fq is None else rel_err(out, fq))
        distinct = len(set(ref.argmax(-1).tolist()))

    results: dict[tuple[str, int], float] = {}
    with torch.no_grad():
        for batch in args.batch:
            x = torch.randn(batch, 3, size, size)
            log(f"timing {len(engines)} engines at batch {batch} ({runs} rounds)")
            fns = {name: (lambda fn=fn, x=x: fn(x)) for name, fn in engines.items()}
            clock = time.process_time if args.clock == "cpu" else time.perf_counter
            for name, ms in round_robin_median_ms(fns, warmup, runs, clock).items():
                results[(name, batch)] = ms

    timing = ("no timing" if args.agreement_only
              else f"median {args.clock} time of {runs} runs after {warmup} warmup")
    print(f"\nResNet-18 (random init), {size}x{size}, {args.threads} threads, {timing}; "
          f"torch {torch.__version__}, onnxruntime {__import__('onnxruntime').__version__}")
    print(cpu_description())
    split = {name: sum(isinstance(m, DuplicateChannels) for m in fn.modules())
             for name, fn in engines.items() if isinstance(fn, nn.Module) and name.startswith("hawq")}
    if any(split.values()):  # to_fbgemm's exact path for kernels that saturate int16 pair sums
        print("layers split into 7-bit weight halves (twice the multiply-adds) on this CPU: "
              + ", ".join(f"{name} {n}" for name, n in split.items() if n))
    if int_mm_saturates():
        print("torch._int_mm saturates int16 pair sums on this CPU: the 'integer' rows multiply 7-bit weight "
              "halves (twice the multiply-adds)")
    if not args.agreement_only:
        print("ratio = engine time / FP32 eager time, vs int8 = engine time / torch int8 time on the same "
              "quantized engine (the fastest one for rows on none), both at the same batch in this run (< 1 is faster)")
    print()
    head = f"{'engine':<22}" + "".join(f"{'b' + str(b) + ' ms':>11}{'ratio':>7}{'vs int8':>8}" for b in args.batch)
    head += f"{'top1=fp32':>11}{'err_fp32':>10}{'top1=fq':>9}{'err_fq':>9}"
    def int8_reference(name: str, b: int) -> float:
        same = [e for e in qengines if name.endswith(f" {e}")]
        if same:
            return results[(f"torch int8 {same[0]}", b)]
        return min(results[(f"torch int8 {e}", b)] for e in qengines)

    print(head)
    print("-" * len(head))
    for name in engines:
        row = f"{name:<22}"
        for b in args.batch:
            ms = results[(name, b)]
            row += f"{ms:>11.2f}{ms / results[('fp32 eager', b)]:>7.2f}{ms / int8_reference(name, b):>8.2f}"
        a_fp, e_fp, a_fq, e_fq = agree[name]
        row += f"{a_fp:>11.3f}{e_fp:>10.4f}"
        row += f"{a_fq:>9.3f}{e_fq:>9.2e}" if a_fq is not None else f"{'-':>9}{'-':>9}"
        print(row)
    print(f"\ntop1 = argmax agreement, err = relative L2 error of the logits, on {n_eval} random N(0,1) "
          f"images; fq = the hawq fake-quant PyTorch model of that map. The random-init FP32 model "
          f"predicts {distinct} distinct class(es) on them, so argmax agreement is a weak signal here.")
    for tag in maps:
        a, b = outputs.get(f"hawq {tag} ort-int"), outputs.get(f"hawq {tag} integer")
        if a is not None and b is not None:
            same = float((a == b).float().mean())
            print(f"hawq {tag}: ort-int vs integer (PyTorch) logits bit-identical: {same:.1%} of {a.numel()}, "
                  f"max |diff| {float((a - b).abs().max()):.3g}")
        qdq, fq = outputs.get(f"hawq {tag} ort-qdq"), fq_out.get(id(fake_quant.get(f"hawq {tag} ort-qdq")))
        if qdq is not None and fq is not None:
            step = float(fq.abs().max()) / 127  # hawq.export.onnx_qdq.output_step
            diff = (qdq - fq).abs()
            print(f"hawq {tag}: ort-qdq vs fake-quant (PyTorch) max |diff| {float(diff.max()) / step:.3f} output "
                  f"steps (max|y|/127), {float((diff <= step).float().mean()):.2%} of logits within one step")


    if not args.agreement_only:
        print()
        print("\n".join(speedup_summary(results, qengines, args.batch, list(maps))))


if __name__ == "__main__":
    main()
