from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

BnMode = Literal["eval", "train"]
Estimator = Literal["auto", "hutchinson"]
VarianceReduction = Literal["nystrom", "gauss_newton", "none"]
Curvature = Literal["hessian", "gauss_newton"]
HvpMethod = Literal["auto", "autograd", "finite_difference"]


@dataclass
class SensitivityConfig:
    """How per-layer Hessian traces are estimated (Hutchinson)."""

    # removed settings: (the only value still accepted, why); the search always divides a trace by
    # its layer's parameter count (HAWQ-V2/V3), so "normalize" never had a second working value
    RETIRED: ClassVar[dict[str, tuple[Any, str]]] = {
        "normalize": ("per_param", "traces are always normalised per parameter, trace / numel")}

    batches: int = 4  # data batches averaged ("full data" mode); one graph alive at a time
    batch_size: int = 256
    max_probes: int = 200  # Rademacher probes per layer at most
    min_probes: int = 8
    tol: float = 0.05  # stop when std_err <= tol * |trace| for every layer (plus an absolute floor)
    bn_mode: BnMode = "eval"  # "eval" (running stats) or "train" (batch stats)
    label_free: bool = False  # loss = ||f(x) - f_fp32(x)||^2 / 2 instead of the task loss
    seed: int = 0  # Rademacher probes; same seed + same inputs -> identical traces
    estimator: Estimator = "auto"  # "auto" (exact Gauss-Newton traces where the network is piecewise linear in a
    # layer, Hutchinson elsewhere) or "hutchinson" (every layer)
    exact_directions: int | None = None  # most output directions (backward passes per batch) an exact trace
    # may spend; None: 2 * min_probes * layers, exact or sampled by predicted cost; set: exact wherever the
    # directions fit it (e.g. 1000 for 1000-class heads on a GPU)
    # "nystrom" (Nyström++ control variate for slow layers), "gauss_newton" (Hutchinson on H - G only,
    # tr G from output-space probes: pays on trained networks) or "none"
    variance_reduction: VarianceReduction = "nystrom"
    curvature: Curvature = "hessian"  # "hessian": tr(H_ll), except that a layer whose
    # Hessian trace is significantly negative (indefinite block) gets its Gauss-Newton trace, with a note;
    # "gauss_newton": the (PSD) Gauss-Newton trace of every Conv2d/Linear/Embedding layer
    hvp_method: HvpMethod = "auto"  # "auto" (double backward, finite differences if unsupported), "autograd",
    # or "finite_difference"

    density_iter: int = 0  # > 0: also a whole-model eigenvalue density (SLQ, this many Lanczos steps)
    top_eigen: int = 0  # > 0: also this many top Hessian eigenvalues (power iteration)
    spectrum_batches: int = 1  # batches used for the density and eigenvalues

    def hutchinson_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`hawq.sensitivity.hessian_traces` taken from this config."""
        return {"tol": self.tol, "max_probes": self.max_probes, "min_probes": self.min_probes,
                "seed": self.seed, "method": self.hvp_method, "variance_reduction": self.variance_reduction,
                "estimator": self.estimator, "exact_directions": self.exact_directions, "curvature": self.curvature}
