"""Loom: a distributed data-and-training platform for geometry-conditioned generative models of 3D and 4D content.

Importing ``loom`` pulls in nothing heavy: bpy, Ray, DeepSpeed and MLflow are imported inside the functions that
use them, so the pure layers (``loom.geometry``, ``loom.platform.config``) work with the core dependencies alone.
"""

__version__ = "0.1.0"
