"""Run tasks in a long-lived child process that a native crash or a hang can only cost one task.

Blender's importers can abort the whole process on malformed input, and a huge mesh can render for hours. So
each Ray worker owns one ``Sandbox``: a spawned child process that imports bpy once (start-up is paid once per
worker, not per asset) and runs tasks sent over a pipe. If a task exceeds its timeout the child is killed; if the
child dies, the task becomes a failure row naming the exit signal and the tail of the child's log, and the next
task gets a fresh child.

The child's stdout/stderr (Blender is chatty) go to a log file, not to the job's console. A failure reason quotes
the log lines of its own task only: the parent notes where the log ends when it sends a task, and the child flushes
its output when a task ends, so lines of earlier tasks of the same child never reach a later task's reason.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import time
import traceback
from typing import Any

from loom.platform.errors import TaskError, TaskTimeout, WorkerCrashed


def _resolve(entry: str):
    mod, _, fn = entry.partition(":")
    return getattr(importlib.import_module(mod), fn)


def _blender_path(p: str) -> bool:
    """A ``sys.path`` entry that importing bpy adds (its bundled ``scripts/...`` folders, the user's Blender config)."""
    p = p.replace("\\", "/")
    return "/scripts" in p and ("/bpy/" in p or "/blender/" in p)


def _flush_output() -> None:
    """Write this task's buffered output to the log now: Python's, and the C library's (Blender prints with printf,
    fully buffered when stdout is a file), so that none of it lands among the next task's lines."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # no C library to flush (not Linux/macOS): Python's output was flushed
        pass


def _serve(conn, entry: str, log_path: str, env: dict[str, str], preload: tuple[str, ...] = ()) -> None:
    """Child main loop: receive params, call entry(params), send ("ok", result) or ("err", kind, message)."""
    # A spawned child starts with its parent's sys.path. If the parent imported bpy, that holds Blender's
    # scripts/modules, whose own ``bpy`` package (needing the ``_bpy`` built-in) would shadow the bpy wheel here.
    sys.path[:] = [p for p in sys.path if not _blender_path(p)]
    os.environ.update(env)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    try:
        fn = _resolve(entry)
        for mod in preload:  # e.g. bpy: seconds of import paid at start-up rather than in the first task
            importlib.import_module(mod)
    except Exception as e:  # noqa: BLE001 - reported to the parent verbatim
        conn.send(("fatal", f"cannot load {entry}: {type(e).__name__}: {e}"))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            params = conn.recv()
        except EOFError:
            return
        if params is None:
            return
        try:
            result = ("ok", fn(params))
        except TaskError as e:
            result = ("err", type(e).__name__, str(e))
        except Exception as e:  # noqa: BLE001 - an unexpected bug in one task must not end the worker
            result = ("err", type(e).__name__, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}")
        _flush_output()  # before the parent sends the next task and notes where that one's lines start
        conn.send(result)


class Sandbox:
    """One child process running ``entry`` ("module:function") on each ``run(params)``."""

    def __init__(self, entry: str, *, env: dict[str, str] | None = None, log_dir: str | None = None,
                 start_timeout: float = 120.0, preload: tuple[str, ...] = ()):
        self.entry = entry
        self.preload = tuple(preload)
        self.env = dict(env or {})
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="loom-sandbox-")
        os.makedirs(self.log_dir, exist_ok=True)
        self.start_timeout = start_timeout
        self._proc: mp.Process | None = None
        self._conn = None
        self.log_path = ""
        self._task_log_start = 0  # where the current task's lines start in the log
        self.starts = 0

    def start(self) -> None:
        """Start the child now (e.g. while the job is still being scheduled) instead of at the first task."""
        if self._proc is None or not self._proc.is_alive():
            self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")  # never fork a process that may hold Ray or bpy state
        parent, child = ctx.Pipe()
        self.log_path = os.path.join(self.log_dir, f"worker-{os.getpid()}-{self.starts}.log")
        self._proc = ctx.Process(target=_serve, args=(child, self.entry, self.log_path, self.env, self.preload), daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent
        self.starts += 1
        if not parent.poll(self.start_timeout):
            self.close()
            raise RuntimeError(f"sandbox worker for {self.entry} did not start within {self.start_timeout} s")
        msg = parent.recv()
        if msg[0] == "fatal":
            self.close()
            raise RuntimeError(msg[1])

    def _log_size(self) -> int:
        try:
            return os.path.getsize(self.log_path)
        except OSError:
            return 0

    def _log_tail(self, n: int = 15) -> str:
        """The last ``n`` log lines written since the current task was sent (never an earlier task's)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._task_log_start)
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:]).strip()

    def run(self, params: dict[str, Any], timeout: float) -> Any:
        """Result of ``entry(params)``; raises TaskError (incl. TaskTimeout, WorkerCrashed) for a failed task."""
        if self._proc is None or not self._proc.is_alive():
            self._start()
        self._task_log_start = self._log_size()
        t0 = time.monotonic()
        try:
            self._conn.send(params)
            ready = self._conn.poll(timeout)
        except (BrokenPipeError, EOFError, OSError):
            ready = True  # fall through to recv, which reports the crash
        if not ready:
            self.close(kill=True)
            tail = self._log_tail()
            raise TaskTimeout(f"timed out after {timeout:.0f} s (raise render.timeout_s for big meshes)"
                              + (f"; last log lines:\n{tail}" if tail else ""))
        try:
            msg = self._conn.recv()
        except (EOFError, OSError):
            self._proc.join(5)
            code = self._proc.exitcode
            tail = self._log_tail()
            self.close()
            sig = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
            raise WorkerCrashed(
                f"the worker process died ({sig}) after {time.monotonic() - t0:.1f} s; last log lines:\n{tail}"
            ) from None
        if msg[0] == "ok":
            return msg[1]
        _, kind, text = msg
        raise TaskError(text if kind == "TaskError" else f"{kind}: {text}" if not text.startswith(kind) else text)

    def close(self, kill: bool = False) -> None:
        if kill and self._proc is not None and self._proc.is_alive():
            self._proc.kill()
        if self._conn is not None:
            try:
                self._conn.send(None)
            except Exception:  # noqa: BLE001 - already gone
                pass
            self._conn.close()
            self._conn = None
        if self._proc is not None:
            self._proc.join(2)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5)
            self._proc = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
