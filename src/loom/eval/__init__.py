"""Evaluation: metrics (:mod:`loom.eval.metrics`, one per file), feature networks (:mod:`loom.eval.networks`) and
their local weights (:mod:`loom.eval.weights`)."""
