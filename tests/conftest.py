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


def _save_fp16(state: dict, path: Path) -> None:
    """Save a state dict in half precision (half the disk; loads back into fp32 modules)."""
    import torch

    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, path)


def _strip_first_prefix(state: dict) -> dict:
    """OpenPose's body/hand files store keys without the module's first name component."""
    return {k.split(".", 1)[1]: v for k, v in state.items()}


def _damp(module, factor: float = 0.05):
    """Shrink random weights so OpenPose's heatmaps stay below its peak threshold: random
    full-scale weights make thousands of fake keypoints and a very slow part-grouping step."""
    import torch

    with torch.no_grad():
        for p in module.parameters():
            p.mul_(factor)
    return module


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory) -> Path:
    """A weights folder in the real ``lllyasviel/Annotators`` layout, with random weights.

    HED, MiDaS DPT-hybrid and OpenPose are the real architectures at full size; the transformers
    models (UperNet segmentation, DPT depth) are the real classes with tiny configs.
    """
    import torch
    from controlnet_aux.hed import ControlNetHED_Apache2
    from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel
    from controlnet_aux.open_pose.face import FaceNet
    from controlnet_aux.open_pose.model import bodypose_model, handpose_model

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("weights")
    _save_fp16(ControlNetHED_Apache2().state_dict(), root / "ControlNetHED.pth")
    _save_fp16(DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True).state_dict(),
               root / "dpt_hybrid-midas-501f0c75.pt")
    _save_fp16(_strip_first_prefix(_damp(bodypose_model()).state_dict()), root / "body_pose_model.pth")
    _save_fp16(_strip_first_prefix(_damp(handpose_model()).state_dict()), root / "hand_pose_model.pth")
    _save_fp16(_damp(FaceNet()).state_dict(), root / "facenet.pth")
    _tiny_upernet(root / "upernet-convnext-small")
    _tiny_dpt(root / "dpt-tiny")
    return root


def _tiny_upernet(folder: Path) -> None:
    from transformers import ConvNextConfig, SegformerImageProcessor, UperNetConfig, UperNetForSemanticSegmentation

    backbone = ConvNextConfig(num_channels=3, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                              out_features=["stage1", "stage2", "stage3", "stage4"])
    config = UperNetConfig(backbone_config=backbone, hidden_size=16, auxiliary_in_channels=32,
                           auxiliary_channels=8, num_labels=150)
    UperNetForSemanticSegmentation(config).save_pretrained(folder)
    SegformerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder)


def _tiny_dpt(folder: Path) -> None:
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    config = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                       image_size=64, patch_size=16, neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16,
                       backbone_out_indices=[0, 1, 2, 3], head_hidden_size=8)
    DPTForDepthEstimation(config).save_pretrained(folder)
    DPTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder)


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
