"""Shared fixtures. Two cores oversubscribe fast: every test process and the workers it starts use one thread."""

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray with 2 CPUs for the module's tests (started once; jobs reuse it through ray.is_initialized)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()
