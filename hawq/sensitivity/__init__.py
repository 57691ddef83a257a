"""Hessian sensitivity: per-layer traces (Hutchinson), top eigenvalues and spectral density."""

from hawq.sensitivity.config import SensitivityConfig
from hawq.sensitivity.gauss_newton import certify_piecewise_linear, gauss_newton_traces
from hawq.sensitivity.hvp import DoubleBackwardUnsupported, HessianOperator, resolve_layers
from hawq.sensitivity.losses import OutputLoss, label_free_loss, task_loss
from hawq.sensitivity.spectrum import (
    SpectralDensity,
    TopEigen,
    plot_density,
    spectral_density,
    top_eigenvalues,
)
from hawq.sensitivity.traces import (
    NystromSketch,
    TraceEstimate,
    batches_fingerprint,
    control_variate_samples,
    hessian_traces,
    load_traces,
    per_parameter,
    probe_seed,
    rademacher_like,
    save_traces,
    traces_cache_key,
)

__all__ = [
    "DoubleBackwardUnsupported",
    "HessianOperator",
    "NystromSketch",
    "OutputLoss",
    "SensitivityConfig",
    "SpectralDensity",
    "TopEigen",
    "TraceEstimate",
    "batches_fingerprint",
    "certify_piecewise_linear",
    "control_variate_samples",
    "gauss_newton_traces",
    "hessian_traces",
    "label_free_loss",
    "load_traces",
    "per_parameter",
    "plot_density",
    "probe_seed",
    "rademacher_like",
    "resolve_layers",
    "save_traces",
    "spectral_density",
    "task_loss",
    "top_eigenvalues",
    "traces_cache_key",
]
