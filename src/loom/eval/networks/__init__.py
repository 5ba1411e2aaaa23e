"""Feature networks of the metrics: Inception (FID, KID), I3D (FVD), the LPIPS network, CLIP.

Each module has a ``load(root=None)`` that builds the real network from the local weights directory
(:mod:`loom.eval.weights`; nothing downloads) and a ``tiny_random(seed)`` stand-in: a small randomly initialised
network with the same input contract and the same code path (preprocessing, feature extraction), used by the tests
and by anything that must run without the weights.
"""
