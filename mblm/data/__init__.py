"""Datasets for training MBLM: the distributed dataset base class, batch types, the built-in
datasets (PG19, PG19Masked, Clevr, Python sources) and helpers for bytes, images and tokens."""
