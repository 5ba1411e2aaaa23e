"""Sampling a trained 4D run (ShapeGen4D): being moved here from loom.training."""

from loom.training.shape4d_module import generate_4d, load_run, read_video  # noqa: F401
