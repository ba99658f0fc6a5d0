"""Shared fixtures: generated collections, one local Ray for the session, one annotated manifest."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from demo.samples import write_demo_collection
from pipeline import ray_runtime
from pipeline.annotate import run
from pipeline.config import AnnotateConfig
from tests.fake_weights import write_random_weights

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one state per process and refuses a second Accelerator with another
    precision; in-process training runs each start from none."""
    yield
    import sys

    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(True)


@pytest.fixture(scope="session", autouse=True)
def row_cache_dir(tmp_path_factory) -> Path:
    """Training's row cache in a temp folder, never ~/.cache (launched processes inherit it)."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("controlforge_cache")
        mp.setenv("CONTROLFORGE_CACHE", str(path))
        yield path


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


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory) -> Path:
    """A weights folder in the real ``lllyasviel/Annotators`` layout, with random weights."""
    return write_random_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="session")
def photos() -> dict[str, "np.ndarray"]:
    """scikit-image's real photos, prepared at 256 (a person in ``astronaut``, none in ``coffee``)."""
    import io

    from PIL import Image
    from skimage import data

    from pipeline.decode import PrepareSettings, prepare

    out = {}
    for name in ("astronaut", "coffee", "chelsea"):
        buf = io.BytesIO()
        Image.fromarray(getattr(data, name)()).save(buf, "PNG")
        out[name] = prepare(buf.getvalue(), PrepareSettings(256)).image
    return out


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """A tiny Stable Diffusion folder (diffusers layout) built from configs."""
    from tests.tiny_sd import write_tiny_sd

    return write_tiny_sd(tmp_path_factory.mktemp("tiny_sd") / "sd")


@pytest.fixture(scope="session")
def stacked_manifest(local_ray, demo_collection, tmp_path_factory) -> Path:
    """The demo's photos and scenes with two conditions: canny and an inverted channel."""
    out = tmp_path_factory.mktemp("manifest") / "stacked"
    run(AnnotateConfig(input=str(demo_collection / "scenes"), output=str(out),
                       annotators=("canny", "tests.plugins:InvertAnnotator"), resolution=64))
    return out


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> Path:
    """A tiny SD3-style folder (MMDiT, two CLIPs + T5, 16-channel VAE) built from configs."""
    from tests.tiny_flow import write_tiny_sd3

    return write_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3") / "sd3")


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> Path:
    """A tiny Flux.1-dev-style folder (double + single blocks, guidance embeds, CLIP + T5) built from configs."""
    from tests.tiny_flow import write_tiny_flux

    return write_tiny_flux(tmp_path_factory.mktemp("tiny_flux") / "flux")


@pytest.fixture(scope="session")
def tiny_zimage(tmp_path_factory) -> Path:
    """A tiny Z-Image-style folder (single-stream transformer, Qwen3 text encoder, 16-channel VAE) from configs."""
    from tests.tiny_zimage import write_tiny_zimage

    return write_tiny_zimage(tmp_path_factory.mktemp("tiny_zimage") / "zimage")


@pytest.fixture(scope="session")
def tiny_qwenimage(tmp_path_factory) -> Path:
    """A tiny Qwen-Image folder (MMDiT, video VAE, Qwen2.5-VL text encoder) built from configs."""
    from tests.tiny_qwenimage import write_tiny_qwenimage

    return write_tiny_qwenimage(tmp_path_factory.mktemp("tiny_qwenimage") / "qwenimage")


@pytest.fixture(scope="session")
def tiny_hunyuandit(tmp_path_factory) -> Path:
    """A tiny HunyuanDiT-style folder (skip-connected DiT, BERT + mT5, DDPM v-prediction) built from configs."""
    from tests.tiny_hunyuandit import write_tiny_hunyuandit

    return write_tiny_hunyuandit(tmp_path_factory.mktemp("tiny_hunyuandit") / "hunyuandit")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """A tiny SDXL-style folder (two CLIPs, pooled embeds, time ids) built from configs."""
    from tests.tiny_sd import write_tiny_sdxl

    return write_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl") / "sdxl")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> str:
    """A local S3-compatible server (moto's server mode) on 127.0.0.1 and a free port; returns its endpoint.

    For the rest of the session this process's environment points at it (``AWS_ENDPOINT_URL``, dummy
    keys, ``AWS_REGION``/``AWS_DEFAULT_REGION``; no ~/.aws files, no instance metadata), and so do the
    processes it starts. Local Ray workers inherit the environment Ray was started with, so Ray is
    (re)started here with it, on 2 CPUs like ``local_ray`` (whose later users find it running).
    """
    try:
        import moto.server  # noqa: F401
    except ImportError:
        pytest.fail("moto[server] is not installed: pip install -e '.[dev]'")
    with socket.socket() as probe:  # a free port on loopback
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=2).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"moto's S3 server did not start on {endpoint} (log: {log.name})")
            time.sleep(0.2)
    empty = str(tmp_path_factory.mktemp("aws") / "none")
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_CONFIG_FILE": empty, "AWS_SHARED_CREDENTIALS_FILE": empty}
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        for name, value in env.items():
            mp.setenv(name, value)
        ray_runtime.shutdown()  # a Ray started earlier has workers without the variables above
        ray_runtime.connect(None, num_cpus=2)
        try:
            yield endpoint
        finally:
            server.terminate()
            server.wait(timeout=30)
            log.close()

