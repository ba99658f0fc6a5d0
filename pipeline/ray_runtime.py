"""Start embedded local Ray on loopback only, or join a cluster and ship our packages to it.

An exposed Ray cluster runs any code sent to it, so a laptop default must not listen on the
network. On Linux Ray replaces "127.0.0.1" with the machine's address unless
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is in the environment before Ray starts; with it set,
every Ray process listens on 127.0.0.1 (checked by tests/test_ray_local.py).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
PROJECT_PACKAGES = ("annotators", "manifests", "pipeline")


def project_modules() -> list[str]:
    """Folders of this project's packages, for Ray's ``runtime_env['py_modules']``."""
    import importlib

    return [str(Path(importlib.import_module(name).__file__).parent) for name in PROJECT_PACKAGES]


def in_ray_job() -> bool:
    """True when this driver runs under ``ray job submit`` (its runtime env is set already)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ or "RAY_JOB_ID" in os.environ


def connect(address: str | None, num_cpus: int | None = None) -> dict[str, Any]:
    """Initialise Ray for this job and return how (for the summary).

    ``address`` None (and no ``RAY_ADDRESS``) starts a private local Ray on 127.0.0.1.
    Otherwise we join that cluster; outside ``ray job submit`` the driver ships the project's
    packages to the workers, so running the one script on a head node works.
    """
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    if ray.is_initialized():
        return {"mode": "existing", "address": None}
    if address is None:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        ray.init(
            address="local",
            _node_ip_address=LOOPBACK,
            include_dashboard=False,
            num_cpus=num_cpus,
            runtime_env={"py_modules": project_modules()},
            logging_level=logging.WARNING,
            log_to_driver=True,
        )
        return {"mode": "local", "address": LOOPBACK, "num_cpus": int(ray.cluster_resources().get("CPU", 0))}
    runtime_env = None if in_ray_job() else {"py_modules": project_modules()}
    ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)
    return {"mode": "cluster", "address": address, "num_cpus": int(ray.cluster_resources().get("CPU", 0))}


def shutdown() -> None:
    """Stop Ray if this process started or joined it."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
