from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    name: str = "fashion_mnist"  # see hawq.data.DATASETS
    root: str = "/usr/share/datasets/fashion-mnist"
    batch_size: int = 128
    eval_batch_size: int = 512
    num_workers: int = 0
    train_subset: int | None = None  # first N training examples (seeded shuffle); None = all
    test_subset: int | None = None
    image_size: int | None = None  # resize for image folders (224 ResNet, 299 Inception)
    task: str | None = None  # GLUE task name for TSV data (sst2, mrpc, cola, ...)
    max_length: int = 128  # tokens, for text
    train_split: str = "train"  # image folders / COCO: sub-folder (and annotation name) of the training split
    val_split: str = "val"  # ... of the evaluation split
    tokenizer: str | None = None  # text: folder with the tokenizer files (the model checkpoint), or "minilm"
