"""Start embedded local Ray on loopback only, or join a cluster and ship our packages to it.

An exposed Ray cluster runs any code sent to it, so a laptop default must not listen on the
network. On Linux Ray replaces "127.0.0.1" with the machine's address unless
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is in the environment before Ray starts; with it set,
every Ray process listens on 127.0.0.1 (checked by tests/test_ray_cluster.py).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from manifests import log_filters

LOOPBACK = "127.0.0.1"
PROJECT_PACKAGES = ("annotators", "captioners", "manifests", "pipeline")


def _loopback_only() -> None:
    """Make this process and the Ray processes it starts use 127.0.0.1 only.

    Ray reads the variable when ``ray`` is first imported and its daemons read it at start; a
    process that imported Ray earlier gets the already-read constant updated too.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


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
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        _loopback_only()
        # A new local Ray turns token authentication on by default and warns that it did, on every run:
        # keep the protection, drop the line (manifests/log_filters.py says why not RAY_AUTH_MODE).
        log_filters.drop(log_filters.RAY_TOKEN_AUTH_ENABLED)
    import ray

    if ray.is_initialized():
        return {"mode": "existing", "address": None}
    if address is None:
        # Local workers inherit this environment: a PYTHONPATH entry makes our packages
        # importable without a runtime_env, which would bypass Ray's prestarted workers.
        root = str(Path(__file__).resolve().parents[1])
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
        ray.init(
            address="local",
            _node_ip_address=LOOPBACK,
            include_dashboard=False,
            num_cpus=num_cpus,
            logging_level=logging.WARNING,
        )
        return {"mode": "local", "address": LOOPBACK, "num_cpus": int(ray.cluster_resources().get("CPU", 0))}
    runtime_env = None if in_ray_job() else {"py_modules": project_modules()}
    ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)
    return {"mode": "cluster", "address": address, "num_cpus": int(ray.cluster_resources().get("CPU", 0))}


def is_running() -> bool:
    """True when this process is already connected to Ray (never imports Ray: a run with nothing
    to do must not pay for it)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def shutdown() -> None:
    """Stop Ray if this process started or joined it."""
    if is_running():
        sys.modules["ray"].shutdown()
