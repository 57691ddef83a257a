"""Imports every built-in family so that each registers itself."""

from hawq.models import fashion  # noqa: F401
