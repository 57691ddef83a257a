"""Registers the data sets beyond Fashion-MNIST (image folders, COCO, GLUE TSV)."""
