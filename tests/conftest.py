"""Shared fixtures: generated collections, one local Ray for the session, one annotated manifest."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline import ray_runtime
from pipeline.annotate import run
from pipeline.config import AnnotateConfig
from pipeline.samples import write_demo_collection

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def local_ray():
    """Embedded local Ray on 127.0.0.1 with 2 CPUs, shared by every test that runs the job."""
    info = ray_runtime.connect(None, num_cpus=2)
    yield info
    ray_runtime.shutdown()


@pytest.fixture(scope="session")
def demo_collection(tmp_path_factory) -> Path:
    """The demo's raw collection: real photos, drawn scenes, edge cases (20 images)."""
    return write_demo_collection(tmp_path_factory.mktemp("collection") / "photos")


@pytest.fixture(scope="session")
def demo_manifest(local_ray, demo_collection, tmp_path_factory) -> Path:
    """The demo collection annotated with Canny in shards of 8 (read-only for tests)."""
    out = tmp_path_factory.mktemp("manifest") / "demo"
    run(AnnotateConfig(input=str(demo_collection), output=str(out), shard_size=8))
    return out


@pytest.fixture
def manifest_copy(demo_manifest, tmp_path) -> Path:
    """A copy of the demo manifest a test may change."""
    return Path(shutil.copytree(demo_manifest, tmp_path / "manifest"))
