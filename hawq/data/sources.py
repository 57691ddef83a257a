"""Registers the data sets beyond Fashion-MNIST (image folders, COCO, GLUE TSV, sentences).

Builders import their heavy dependencies (torchvision, transformers, pycocotools) only when called.
"""

from __future__ import annotations

from hawq.data import DataBundle, register_dataset
from hawq.data.config import DataConfig


def _imagenet_folder(cfg: DataConfig) -> DataBundle:
    from hawq.data.image_folder import build_imagenet_folder

    return build_imagenet_folder(cfg)


def _coco(cfg: DataConfig) -> DataBundle:
    from hawq.data.coco import build_coco

    return build_coco(cfg)


def _glue_tsv(cfg: DataConfig) -> DataBundle:
    from hawq.data.text import build_glue_tsv

    return build_glue_tsv(cfg)


def _sentences(cfg: DataConfig) -> DataBundle:
    from hawq.data.text import build_sentences

    return build_sentences(cfg)


register_dataset("imagenet_folder", _imagenet_folder)
register_dataset("coco", _coco)
register_dataset("glue_tsv", _glue_tsv)
register_dataset("sentences", _sentences)
