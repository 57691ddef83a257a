"""hawq: Hessian-aware mixed-precision quantization for PyTorch."""

__version__ = "0.1.0"


class HawqError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with code 2."""
