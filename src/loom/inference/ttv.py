"""Sampling a trained turntable-video run (TAPESTRY): being moved here from loom.training."""

from loom.training.ttv_module import generate_ttv, latents_to_uint8, load_run, write_video  # noqa: F401
