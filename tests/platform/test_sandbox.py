"""The sandbox turns hangs, native crashes and exceptions into task errors and keeps serving."""

import os
import signal
import time

import pytest

from loom.platform.errors import TaskError, TaskTimeout, WorkerCrashed
from loom.platform.sandbox import Sandbox


def behave(params):
    """Entry point run inside the sandbox child."""
    what = params["what"]
    if what == "echo":
        return {"pid": os.getpid(), "x": params["x"]}
    if what == "hang":
        time.sleep(60)
    if what == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    if what == "task-error":
        raise TaskError("mesh has no faces")
    if what == "bug":
        raise KeyError("oops")
    if what == "bpy":
        import bpy

        return bpy.app.version_string
    return None


ENTRY = "tests.platform.test_sandbox:behave"


@pytest.fixture()
def box(tmp_path):
    with Sandbox(ENTRY, log_dir=str(tmp_path), env={"OMP_NUM_THREADS": "1"}) as b:
        yield b


def test_results_come_back_and_process_is_reused(box):
    a = box.run({"what": "echo", "x": 1}, timeout=30)
    b = box.run({"what": "echo", "x": 2}, timeout=30)
    assert (a["x"], b["x"]) == (1, 2)
    assert a["pid"] == b["pid"] != os.getpid()


def test_timeout_kills_and_next_task_gets_fresh_process(box):
    pid = box.run({"what": "echo", "x": 0}, timeout=30)["pid"]
    with pytest.raises(TaskTimeout, match="timed out"):
        box.run({"what": "hang"}, timeout=1)
    assert box.run({"what": "echo", "x": 3}, timeout=30)["pid"] != pid


def test_native_crash_is_a_task_error(box):
    with pytest.raises(WorkerCrashed, match="SIGSEGV"):
        box.run({"what": "segv"}, timeout=30)
    assert box.run({"what": "echo", "x": 4}, timeout=30)["x"] == 4


def test_task_errors_and_bugs_keep_their_message(box):
    with pytest.raises(TaskError, match="no faces"):
        box.run({"what": "task-error"}, timeout=30)
    with pytest.raises(TaskError, match="KeyError"):
        box.run({"what": "bug"}, timeout=30)
    assert box.starts == 1


def test_a_parent_that_imported_bpy_still_starts_bpy_workers(tmp_path):
    """Importing bpy adds Blender's scripts/modules (with a ``bpy`` package of its own) to sys.path; a spawned child
    inherits that path and must still import the bpy wheel."""
    bpy = pytest.importorskip("bpy")
    import sys

    assert any("/scripts" in p for p in sys.path)  # the precondition: the parent's path holds Blender's folders
    with Sandbox(ENTRY, log_dir=str(tmp_path), env={"OMP_NUM_THREADS": "1"}, preload=("bpy",)) as b:
        assert b.run({"what": "bpy"}, timeout=60) == bpy.app.version_string


def say(params):
    """Entry point: write ``text`` to the log straight, through Python's stdout and through the C library's
    (buffered: how Blender prints), then maybe exit."""
    import ctypes
    import sys

    for i in range(params.get("lines", 2)):
        os.write(1, f"{params['text']} (raw {i})\n".encode())
        print(f"{params['text']} (python {i})")
        ctypes.CDLL(None).printf(f"{params['text']} (printf {i})\n".encode())
    if params.get("exit"):
        sys.exit(3)  # not caught by the child's loop: the process ends, flushing what is still buffered
    return "said"


def test_a_failure_reason_quotes_the_log_lines_of_its_own_task_only(tmp_path, monkeypatch):
    """Two tasks in one long-lived child: the second one's crash report must not quote the first one's lines,
    whether they were written unbuffered or left in a stdout buffer by the first task."""
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)  # the child buffers its output, as a Ray worker's does
    with Sandbox("tests.platform.test_sandbox:say", log_dir=str(tmp_path), env={"OMP_NUM_THREADS": "1"}) as b:
        assert b.run({"text": "first task", "lines": 5}, timeout=30) == "said"
        with pytest.raises(WorkerCrashed) as err:
            b.run({"text": "second task", "exit": True}, timeout=30)
        reason = str(err.value)
        assert "exit code 3" in reason and "second task" in reason
        assert "first task" not in reason, reason
        assert b.starts == 1  # both tasks ran in the same child
        # the next task gets a fresh child and a clean slate too
        with pytest.raises(WorkerCrashed) as err:
            b.run({"text": "third task", "exit": True}, timeout=30)
        assert "third task" in str(err.value) and "second task" not in str(err.value)
