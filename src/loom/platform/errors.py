"""Errors a data task raises on purpose. Each becomes one row in the failure manifest; the job goes on."""


class TaskError(Exception):
    """This task cannot produce a sample, for a reason that rerunning will not fix (a corrupt file, a mesh with no
    faces, NaN coordinates, an unsupported format, a URI that escapes the asset's folder). The message is the
    failure row's reason: it names the asset and the problem and, where it can, what to do."""


class TaskTimeout(TaskError):
    """The task ran past its time limit; its worker process was killed and restarted."""


class WorkerCrashed(TaskError):
    """The worker process died (e.g. a native crash in Blender's importer) while running this task."""
