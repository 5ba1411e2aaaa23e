"""One way to say "Ray" for every job: the ``ray`` section of a job config, starting or joining Ray, and the
environment a driver hands to its workers.

Every job kind reads the same four fields: render and cache jobs fan shards out over ``ray.workers`` actors,
evaluation splits its samples over ``ray.workers`` tasks, training runs ``ray.workers`` Ray Train ranks when
``ray.address`` is set. Each job picks its own default for ``workers`` (render: 0 = as many as the CPUs allow;
evaluation: 1 = in this process; training: 2 ranks once ``ray.address`` is set).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from loom.platform.config import config, field, require


@config
class RaySettings:
    address: str | None = field(None, help="Ray address: unset = a local Ray where the job needs one (training then "
                                "runs in this process); 'local' = a new local Ray (training: Ray Train on it); "
                                "'auto' = the cluster this machine belongs to; 'ray://head:10001' = a client")
    workers: int = field(0, help="parallel workers: render/cache actors (0 = cluster CPUs // cpus_per_worker), "
                         "evaluation tasks (1 = this process), Ray Train ranks")
    cpus_per_worker: int = field(1, help="CPUs reserved per worker (Blender and OpenMP use this many threads)")
    gpus_per_worker: float = field(0.0, help="GPUs reserved per worker (render.device=GPU, training on GPUs, "
                                   "evaluation networks on CUDA)")

    def __post_init__(self):
        require(self.workers >= 0, "ray.workers", self.workers, "must be >= 0")
        require(self.cpus_per_worker >= 1, "ray.cpus_per_worker", self.cpus_per_worker, "must be >= 1")
        require(self.gpus_per_worker >= 0, "ray.gpus_per_worker", self.gpus_per_worker, "must be >= 0")


# Environment variables a driver hands to its Ray workers (weights dirs, tracking, object-store credentials, threads).
FORWARD_ENV = ("LOOM_", "MLFLOW_", "AWS_", "GOOGLE_", "AZURE_", "OMP_NUM_THREADS", "HF_", "NCCL_")


def forwarded_env() -> dict[str, str]:
    """This process's variables that start with one of :data:`FORWARD_ENV`."""
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARD_ENV)}


def init_ray(settings: RaySettings, announce: bool = True) -> Any:
    """Join the cluster at ``settings.address``, or start a local Ray; says which on stderr."""
    import ray

    # Ray Data's INFO lines and per-operator bars would interleave with Loom's own progress bar.
    logging.getLogger("ray").setLevel(logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    if not ray.is_initialized():
        kw: dict[str, Any] = dict(include_dashboard=False, configure_logging=False, log_to_driver=False)
        address = settings.address if settings.address not in (None, "", "local") else None
        if address:
            ctx = ray.init(address=address, **kw)
            what = f"connected to the Ray cluster at {address}"
        else:
            # address="local": a new Ray of our own even where a cluster already runs on this machine (plain
            # ray.init() would join it and then refuse num_cpus)
            ctx = ray.init(address="local", num_cpus=os.cpu_count(), **kw)
            what = "started a local Ray"
        if announce:
            cpus = int(ray.cluster_resources().get("CPU", 0))
            gpus = int(ray.cluster_resources().get("GPU", 0))
            print(f"ray: {what} ({len(ray.nodes())} node(s), {cpus} CPUs, {gpus} GPUs; "
                  f"gcs {getattr(ctx, 'address_info', {}).get('gcs_address', '?')})", file=sys.stderr)
    return ray
