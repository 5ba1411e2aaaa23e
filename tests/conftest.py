"""Shared fixtures. Two cores oversubscribe fast: every test process and the workers it starts use one thread.

Blender: the modules named ``*blender*`` drive real bpy renders end to end; they are marked ``blender`` and skip,
saying why, where bpy is not installed (Python 3.12, or an install without the render extra). ``--allow-skips REGEX``
(``make test-py312``) fails the run when any test skips for a reason REGEX does not match, so that the skips of the
Blender tests cannot hide other tests skipping for want of something that should be installed."""

import importlib.util
import os
import re

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

HAS_BPY = importlib.util.find_spec("bpy") is not None
NO_BPY = ("needs Blender (bpy), which is not installed: pip install -e '.[render]' on Python 3.11 "
          "(bpy 5.0) or 3.13 (bpy 5.1+); none is built for 3.12")


def pytest_addoption(parser):
    parser.addoption("--allow-skips", metavar="REGEX", default=None,
                     help="fail the run if a test is skipped for a reason that REGEX does not match (re.search)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "blender" in item.path.name:  # test_*_blender_e2e.py, test_zero_area_blender.py
            item.add_marker(pytest.mark.blender)
            if not HAS_BPY:
                item.add_marker(pytest.mark.skip(reason=NO_BPY))


def skip_reason(report) -> str | None:
    """The reason of a skipped test's report (None for a test that ran or an expected failure)."""
    if not report.skipped or hasattr(report, "wasxfail"):
        return None
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def pytest_configure(config):
    pattern = config.getoption("--allow-skips")
    if pattern:
        config.pluginmanager.register(SkipGuard(re.compile(pattern)), "loom-skip-guard")


class SkipGuard:
    """Collects skips whose reason the allowed pattern does not match; a run with any of them fails."""

    def __init__(self, allowed: re.Pattern):
        self.allowed = allowed
        self.unexpected: list[tuple[str, str]] = []

    def pytest_runtest_logreport(self, report):
        reason = skip_reason(report)
        if reason is not None and not self.allowed.search(reason):
            self.unexpected.append((report.nodeid, reason))

    def pytest_collectreport(self, report):  # a module-level importorskip skips the whole file at collection
        self.pytest_runtest_logreport(report)

    def pytest_terminal_summary(self, terminalreporter):
        if self.unexpected:
            terminalreporter.section("skips not allowed by --allow-skips", red=True)
            for nodeid, reason in self.unexpected:
                terminalreporter.line(f"{nodeid}: {reason}")

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session):
        if self.unexpected and session.exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


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

    # address="local": a Ray of the tests' own even where a cluster runs on this machine (`ray start`, e.g. another
    # test run's multi-node tests): plain ray.init() would join it and refuse num_cpus, as loom.platform.ray says
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()
