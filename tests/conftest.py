"""Shared fixtures. Two cores oversubscribe fast: every test process and the workers it starts use one thread."""

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def _loom_home(tmp_path_factory):
    """Jobs that log to the default MLflow store ($LOOM_HOME, else the working directory) write into a temporary
    folder, never into the checkout or the developer's own store; tests that read the store set LOOM_HOME
    themselves."""
    old = os.environ.get("LOOM_HOME")
    os.environ["LOOM_HOME"] = str(tmp_path_factory.mktemp("loom-home"))
    yield
    if old is None:
        os.environ.pop("LOOM_HOME", None)
    else:
        os.environ["LOOM_HOME"] = old


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray with 2 CPUs for the module's tests (started once; jobs reuse it through ray.is_initialized)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()
