"""Imports every built-in family so that each registers itself."""

from hawq.models import bert, fashion, retinanet, squeezenext, torchvision_models  # noqa: F401
