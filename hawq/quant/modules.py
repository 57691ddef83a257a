"""Fake-quantized drop-in modules (thin wrappers over :mod:`hawq.quant.quantizers`).

``QuantConv2d``/``QuantLinear``/``QuantEmbedding`` subclass their float counterparts so
``state_dict`` keys and ``isinstance`` checks are unchanged; they add

* ``weight_bits``, ``act_bits`` (ints; 32 = float),
* ``input_quant: QuantAct | None`` -- the HAWQ convention: a layer's activation bits quantize its input,
* ``weight_scale() -> Tensor`` and ``int_weight() -> (codes, scale)`` for export.

``QuantBnConv2d`` is a ``QuantConv2d`` that folds the following ``BatchNorm2d`` into its weights
before quantizing them (HAWQ-V3); the BN module itself stays in the model, as a
``FoldedBatchNorm2d`` whose forward is the identity, so its parameters keep their names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hawq import HawqError
from hawq.choices import check_choice
from hawq.quant.config import QuantConfig
from hawq.quant.observers import ACT_CALIBRATIONS, mse_extent, strided_sample
from hawq.quant.quantizers import (
    FLOAT_BITS,
    fake_quant_act,
    fake_quant_weight_ste,
    quantize_to_int,
    weight_scale,
)

ACT_MODES = ("calibrating", "tracking", "frozen", "off")
QUANTIZING_MODES = ("tracking", "frozen")
PERCENTILE_SAMPLE = 1 << 20  # elements used per batch for the percentile estimate (strided, deterministic)


def _percentile(values: Tensor, q: float) -> Tensor:
    flat = values.detach().flatten()
    if flat.numel() > PERCENTILE_SAMPLE:
        flat = flat[:: flat.numel() // PERCENTILE_SAMPLE + 1]
    k = max(1, min(flat.numel(), round(q / 100.0 * flat.numel())))
    return flat.float().kthvalue(k).values


class QuantAct(nn.Module):
    """Activation quantizer with range calibration.

    Modes: ``"calibrating"`` observes ranges and passes ``x`` through unchanged; ``"tracking"``
    fake-quantizes and, in training mode only, keeps adapting the range by an EMA (decay
    ``ema_decay``; HAWQ-V3 QAT; ``calibrate(..., track_in_training=True)``); ``"frozen"`` (the default)
    fake-quantizes with a fixed ``scale``; ``"off"`` passes through. The grid is either
    symmetric signed (``[-(2^(b-1)-1), 2^(b-1)-1]``) or unsigned (``[0, 2^b-1]``), both with
    ``zero_point`` 0; with ``signed=None`` the sign is chosen from the observed minimum
    (``min >= 0``, e.g. after a ReLU, gives unsigned and one more bit of resolution).

    Calibration methods (``QuantConfig.act_calibration``): ``"minmax"`` (running extremes over all
    batches), ``"ema"`` (exponential moving average of per-batch extremes, decay ``ema_decay``),
    ``"percentile"`` (mean over batches of the ``act_percentile``-th percentile of ``|x|``, or of
    ``x`` when unsigned, which clips outliers), ``"mse"`` (the extent whose grid minimises the squared
    quantization error over a fixed-stride sample of every calibration batch so far,
    :func:`hawq.quant.observers.mse_extent`).
    """

    def __init__(self, bits: int, signed: bool | None = None, cfg: QuantConfig | None = None) -> None:
        super().__init__()
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
            raise HawqError(f"QuantAct: bits must be an integer in 2..16, got {bits!r}")
        cfg = cfg or QuantConfig()
        check_choice(cfg.act_calibration, ACT_CALIBRATIONS, "QuantAct: act_calibration")
        self.bits = bits
        self.fixed_signed = signed
        self.method = cfg.act_calibration
        self.percentile = float(cfg.act_percentile)
        self.ema_decay = float(cfg.ema_decay)
        self.mode = "frozen"
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))
        self.register_buffer("min_val", torch.tensor(0.0))
        self.register_buffer("max_val", torch.tensor(0.0))
        self.register_buffer("range_val", torch.tensor(0.0))  # |x| extent used by the percentile and mse methods
        self.register_buffer("num_batches", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("signed", torch.tensor(True if signed is None else signed))
        self._flags: tuple[bool, bool] | None = None  # (calibrated, signed) mirrored from the buffers
        self._mse_samples: list[Tensor] = []  # "mse": the calibration batches' samples, pooled

    # --- grid -------------------------------------------------------------------------------
    def _host_flags(self) -> tuple[bool, bool]:
        # Python copies of two buffers, so a forward on a GPU does not synchronise to read them.
        if self._flags is None:
            self._flags = (int(self.num_batches) > 0, bool(self.signed))
        return self._flags

    def _load_from_state_dict(self, *args: object, **kwargs: object) -> None:
        self._flags = None
        super()._load_from_state_dict(*args, **kwargs)

    def reset(self) -> None:
        """Forget the calibrated range."""
        self.num_batches.zero_()
        self.range_val.zero_()
        self._flags = None
        self._mse_samples = []

    @property
    def calibrated(self) -> bool:
        return self._host_flags()[0]

    @property
    def is_signed(self) -> bool:
        return self._host_flags()[1]

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1) - 1) if self.is_signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.is_signed else 2**self.bits - 1

    def set_mode(self, mode: str) -> None:
        if mode not in ACT_MODES:
            raise HawqError(f"QuantAct: mode must be one of {', '.join(ACT_MODES)}, got '{mode}'")
        self.mode = mode

    # --- calibration ------------------------------------------------------------------------
    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Update the range statistics with one batch and recompute ``scale``."""
        x = x.detach()
        bmin, bmax = x.min().float(), x.max().float()
        first = not self.calibrated
        if self.method == "ema" and not first:
            d = self.ema_decay
            self.min_val.mul_(d).add_((1 - d) * bmin)
            self.max_val.mul_(d).add_((1 - d) * bmax)
        elif first:
            self.min_val.copy_(bmin)
            self.max_val.copy_(bmax)
        else:
            self.min_val.copy_(torch.minimum(self.min_val, bmin))
            self.max_val.copy_(torch.maximum(self.max_val, bmax))
        if self.fixed_signed is None:
            self.signed.fill_(bool(self.min_val < 0))
        if self.method == "mse":  # one search over every batch seen, not a mean of per-batch optima
            self._mse_samples.append(strided_sample(x))
            signed = bool(self.signed)
            amax = torch.maximum(self.min_val.abs(), self.max_val.abs()) if signed else self.max_val.clamp_min(0)
            self.range_val.copy_(mse_extent(torch.cat(self._mse_samples), self.bits, signed, amax=amax))
        elif self.method == "percentile":
            p = self._batch_extent(x, bool(self.signed))
            n = float(self.num_batches)
            self.range_val.copy_((self.range_val * n + p) / (n + 1))
        self.num_batches += 1
        self._flags = None
        self._update_scale()

    def _batch_extent(self, x: Tensor, signed: bool) -> Tensor:
        """One batch's clipped extent (percentile or MSE methods)."""
        if self.method == "mse":
            return mse_extent(x, self.bits, signed).to(self.range_val.device)
        return _percentile(x.abs() if signed else x.clamp_min(0), self.percentile)

    def _update_scale(self) -> None:
        # Tensor ops only (no host sync): this runs every training step in "tracking" mode.
        signed = self.signed
        if self.method in ("percentile", "mse"):
            extent = self.range_val
        else:
            extent = torch.where(signed, torch.maximum(self.min_val.abs(), self.max_val.abs()),
                                 self.max_val.clamp_min(0))
        extent = extent.float()
        qmax = torch.where(signed, 2.0 ** (self.bits - 1) - 1, 2.0**self.bits - 1)
        self.scale.copy_(torch.where(extent > 0, extent / qmax, torch.ones_like(extent)))

    @torch.no_grad()
    def track(self, x: Tensor) -> None:
        """QAT range update: EMA of the batch extremes (or percentile); the grid's sign stays fixed."""
        d = self.ema_decay
        x = x.detach()
        self.min_val.mul_(d).add_((1 - d) * x.min().float())
        self.max_val.mul_(d).add_((1 - d) * x.max().float())
        if self.method in ("percentile", "mse"):
            self.range_val.mul_(d).add_((1 - d) * self._batch_extent(x, self.is_signed))
        self._update_scale()

    # --- forward ----------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "off":
            return x
        if self.mode == "calibrating":
            self.observe(x)
            return x
        if self.mode == "tracking" and self.training and self.calibrated:
            self.track(x)
        if not self.calibrated:
            raise HawqError("QuantAct used before calibration: run hawq.quant.calibrate(model, batches, "
                            "forward) or set_act_calibration(model, True) and run a few batches")
        if x.dtype in (torch.float16, torch.bfloat16):  # autocast: round on a float32 grid, cast back
            return fake_quant_act(x.float(), self.scale, self.qmin, self.qmax).to(x.dtype)
        return fake_quant_act(x, self.scale.to(x.dtype), self.qmin, self.qmax)

    def extra_repr(self) -> str:
        sign = "signed" if self.is_signed else "unsigned"
        return (f"bits={self.bits}, {sign}, method={self.method}, mode={self.mode}, "
                f"scale={float(self.scale):.4g}")


class _QuantWeightMixin:
    """Shared weight-quantization state of the quantized layers."""

    weight: nn.Parameter
    weight_bits: int
    act_bits: int
    per_channel: bool
    group_size: int | None

    def _init_quant(self, weight_bits: int, act_bits: int, cfg: QuantConfig, group_ok: bool) -> None:
        self.weight_bits = int(weight_bits)
        self.act_bits = int(act_bits)
        self.per_channel = cfg.per_channel
        self.group_size = cfg.group_size if group_ok else None

    def quant_source_weight(self) -> Tensor:
        """The float weight that gets quantized (the BN-folded one for ``QuantBnConv2d``)."""
        return self.weight

    def quantized_weight(self) -> Tensor:
        return fake_quant_weight_ste(self.quant_source_weight(), self.weight_bits, self.per_channel,
                                     self.group_size)

    def weight_scale(self) -> Tensor:
        """Compact weight scale: ``()``, ``(out,)`` or ``(*, groups)`` (see ``hawq.quant.weight_scale``)."""
        return weight_scale(self.quant_source_weight().detach(), self.weight_bits, self.per_channel,
                            self.group_size)

    def int_weight(self) -> tuple[Tensor, Tensor]:
        """``(codes, scale)``: int8 codes (int16 above 8 bits) and the compact scale."""
        if self.weight_bits >= FLOAT_BITS:
            raise HawqError("int_weight: this layer keeps float weights (weight_bits >= 32)")
        return quantize_to_int(self.quant_source_weight().detach(), self.weight_bits, self.per_channel,
                               self.group_size)

    def _quant_bias(self, bias: Tensor | None) -> Tensor | None:
        """Round the bias to the int32 accumulator grid (scale ``s_in * s_w``), as integer inference does."""
        iq = getattr(self, "input_quant", None)
        if (bias is None or iq is None or iq.mode not in QUANTIZING_MODES or self.weight_bits >= FLOAT_BITS
                or self.group_size is not None):
            return bias
        s = (iq.scale * self.weight_scale()).to(bias.dtype)
        return bias + (torch.round(bias / s) * s - bias).detach()

    def _quant_input(self, x: Tensor) -> Tensor:
        iq = getattr(self, "input_quant", None)
        return x if iq is None else iq(x)


def _make_input_quant(act_bits: int, cfg: QuantConfig) -> QuantAct | None:
    return QuantAct(act_bits, None, cfg) if act_bits < FLOAT_BITS else None


def _share_params(dst: nn.Module, src: nn.Module) -> None:
    """Reuse ``src``'s Parameter objects and buffers (an optimizer built earlier keeps working)."""
    for name, p in src.named_parameters(recurse=False):
        setattr(dst, name, p)
    for name, b in src.named_buffers(recurse=False):
        setattr(dst, name, b)
    dst.train(src.training)


class QuantConv2d(nn.Conv2d, _QuantWeightMixin):
    """``nn.Conv2d`` with STE weight fake-quant and an input activation quantizer."""

    input_quant: QuantAct | None

    @classmethod
    def from_float(cls, module: nn.Conv2d, weight_bits: int, act_bits: int,
                   cfg: QuantConfig | None = None) -> QuantConv2d:
        if not isinstance(module, nn.Conv2d):
            raise HawqError(f"QuantConv2d.from_float: expected nn.Conv2d, got {type(module).__name__}")
        cfg = cfg or QuantConfig()
        q = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                module.dilation, module.groups, module.bias is not None, module.padding_mode,
                device="meta", dtype=module.weight.dtype)
        _share_params(q, module)
        q._init_quant(weight_bits, act_bits, cfg, group_ok=False)
        q.input_quant = _make_input_quant(act_bits, cfg)
        if q.input_quant is not None:
            q.input_quant.to(module.weight.device)
        return q

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self._quant_input(x), self.quantized_weight(), self._quant_bias(self.bias))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", weight_bits={self.weight_bits}, act_bits={self.act_bits}"


class QuantLinear(nn.Linear, _QuantWeightMixin):
    """``nn.Linear`` with STE weight fake-quant (per channel or per group) and an input quantizer."""

    input_quant: QuantAct | None

    @classmethod
    def from_float(cls, module: nn.Linear, weight_bits: int, act_bits: int,
                   cfg: QuantConfig | None = None) -> QuantLinear:
        if not isinstance(module, nn.Linear):
            raise HawqError(f"QuantLinear.from_float: expected nn.Linear, got {type(module).__name__}")
        cfg = cfg or QuantConfig()
        q = cls(module.in_features, module.out_features, module.bias is not None, device="meta",
                dtype=module.weight.dtype)
        _share_params(q, module)
        q._init_quant(weight_bits, act_bits, cfg, group_ok=True)
        q.input_quant = _make_input_quant(act_bits, cfg)
        if q.input_quant is not None:
            q.input_quant.to(module.weight.device)
        return q

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self._quant_input(x), self.quantized_weight(), self._quant_bias(self.bias))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", weight_bits={self.weight_bits}, act_bits={self.act_bits}"


class QuantEmbedding(nn.Embedding, _QuantWeightMixin):
    """``nn.Embedding`` with STE weight fake-quant (per row or per group); no input quantizer (indices)."""

    input_quant = None

    @classmethod
    def from_float(cls, module: nn.Embedding, weight_bits: int, act_bits: int = FLOAT_BITS,
                   cfg: QuantConfig | None = None) -> QuantEmbedding:
        if not isinstance(module, nn.Embedding):
            raise HawqError(f"QuantEmbedding.from_float: expected nn.Embedding, got {type(module).__name__}")
        cfg = cfg or QuantConfig()
        q = cls(module.num_embeddings, module.embedding_dim, module.padding_idx, module.max_norm,
                module.norm_type, module.scale_grad_by_freq, module.sparse, device="meta",
                dtype=module.weight.dtype)
        _share_params(q, module)
        q._init_quant(weight_bits, act_bits, cfg, group_ok=True)
        return q

    def forward(self, x: Tensor) -> Tensor:
        return F.embedding(x, self.quantized_weight(), self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", weight_bits={self.weight_bits}"


class FoldedBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d whose affine map has been folded into the preceding ``QuantBnConv2d``.

    It keeps its parameters and running statistics (same ``state_dict`` keys), but its forward
    is the identity: the conv applies it.
    """

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d) -> FoldedBatchNorm2d:
        f = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device="meta")
        _share_params(f, bn)
        return f

    def forward(self, x: Tensor) -> Tensor:
        return x


class QuantBnConv2d(QuantConv2d):
    """Conv2d + BatchNorm2d folded, then fake-quantized (HAWQ-V3 ``QuantBnConv2d``).

    Eval (or ``freeze_bn_stats=True``): ``W' = W * g``, ``b' = beta + (b - mean) * g`` with
    ``g = gamma / sqrt(running_var + eps)``. Training: a float conv gives the batch statistics
    (which also update the running ones), and those are folded instead, so the quantized weights
    see the same normalisation the float network trains with.
    """

    freeze_bn_stats: bool = False

    @classmethod
    def from_conv_bn(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, weight_bits: int, act_bits: int,
                     cfg: QuantConfig | None = None) -> tuple[QuantBnConv2d, FoldedBatchNorm2d]:
        """Build the folded conv and the identity BN that replaces ``bn`` in the model."""
        if not isinstance(bn, nn.BatchNorm2d) or bn.num_features != conv.out_channels:
            raise HawqError("QuantBnConv2d: the BatchNorm2d must follow the conv and match its out_channels")
        if not bn.track_running_stats:
            raise HawqError("QuantBnConv2d: BatchNorm2d without running statistics cannot be folded")
        q = super().from_float(conv, weight_bits, act_bits, cfg)
        folded = bn if isinstance(bn, FoldedBatchNorm2d) else FoldedBatchNorm2d.from_bn(bn)
        object.__setattr__(q, "_bn", folded)  # not a child: the BN keeps its own place and names
        return q, folded

    @property
    def bn(self) -> FoldedBatchNorm2d:
        return self._bn

    def _bn_factor(self, var: Tensor) -> Tensor:
        gamma = self.bn.weight if self.bn.affine else torch.ones_like(var)
        return gamma / torch.sqrt(var + self.bn.eps)

    def folded_weight_bias(self, mean: Tensor | None = None,
                           var: Tensor | None = None) -> tuple[Tensor, Tensor]:
        bn = self.bn
        mean = bn.running_mean if mean is None else mean
        var = bn.running_var if var is None else var
        g = self._bn_factor(var)
        beta = bn.bias if bn.affine else torch.zeros_like(mean)
        b = self.bias if self.bias is not None else torch.zeros_like(mean)
        return self.weight * g.reshape(-1, 1, 1, 1), beta + (b - mean) * g

    def quant_source_weight(self) -> Tensor:
        return self.folded_weight_bias()[0]

    def forward(self, x: Tensor) -> Tensor:
        x = self._quant_input(x)
        bn = self.bn
        if self.training and not self.freeze_bn_stats:
            with torch.no_grad():
                y = self._conv_forward(x, self.weight, self.bias)
                mean = y.mean(dim=(0, 2, 3))
                var = y.var(dim=(0, 2, 3), unbiased=False)
                n = y.numel() / y.shape[1]
                bn.num_batches_tracked += 1
                m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
                bn.running_mean.mul_(1 - m).add_(m * mean)
                bn.running_var.mul_(1 - m).add_(m * var * n / max(n - 1, 1))
            w, b = self.folded_weight_bias(mean, var)
            wq = fake_quant_weight_ste(w, self.weight_bits, self.per_channel, None)
            return self._conv_forward(x, wq, b)
        w, b = self.folded_weight_bias()
        wq = fake_quant_weight_ste(w, self.weight_bits, self.per_channel, None)
        return self._conv_forward(x, wq, self._quant_bias(b))


QUANT_MODULES: tuple[type[nn.Module], ...] = (QuantConv2d, QuantLinear, QuantEmbedding)
