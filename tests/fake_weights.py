"""Random-weight model files in the real layouts, for tests and benchmarks (no hub offline).

Each is built from the real architecture and loaded back through the same
``from_pretrained(folder)`` path users take.
"""

from __future__ import annotations

from pathlib import Path


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


def write_random_weights(root: Path) -> Path:
    """Fill ``root`` like the ``lllyasviel/Annotators`` folder, with random weights.

    HED, MiDaS DPT-hybrid and OpenPose are the real architectures at full size; the transformers
    models (UperNet segmentation, DPT depth) are the real classes with tiny configs.
    """
    import torch
    from controlnet_aux.hed import ControlNetHED_Apache2
    from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel
    from controlnet_aux.open_pose.face import FaceNet
    from controlnet_aux.open_pose.model import bodypose_model, handpose_model

    torch.manual_seed(0)
    root.mkdir(parents=True, exist_ok=True)
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
