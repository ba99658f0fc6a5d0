"""Random-weight model files in the real layouts, for tests and benchmarks (no hub offline).

Each is built from the real architecture and loaded back through the same
``from_pretrained(folder)`` path users take. Most weights stay random; a few layers are set by
hand so that the maps are not degenerate and the post-processing really runs:

- MiDaS DPT-hybrid: the last convolution's bias is raised so the (non-negative) output is not
  clipped to zero everywhere; the random features below it still make it vary with the image.
- OpenPose body: a narrow pass-through inside the random network turns each of six saturated
  colours (``PUPPET_COLOURS``) into one keypoint's heatmap, and the part affinity fields are
  constant "upright person" directions. A "puppet" of coloured discs (``draw_puppet``) is
  therefore found as one person and drawn as a skeleton, while photos (no pure colours) give
  no keypoints at all, so part grouping stays fast.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# OpenPose body part (18-keypoint order: 0 nose, 1 neck, 2/5 right/left shoulder, 3/6 elbows)
# -> the saturated RGB colour whose disc the fake body model detects as that part.
PUPPET_COLOURS: dict[int, tuple[int, int, int]] = {
    0: (255, 255, 0),  # nose: yellow
    1: (255, 0, 0),  # neck: red
    2: (0, 255, 0),  # right shoulder: green
    3: (0, 255, 255),  # right elbow: cyan
    5: (0, 0, 255),  # left shoulder: blue
    6: (255, 0, 255),  # left elbow: magenta
}
# Where each part sits, in units of the puppet's size, relative to the neck (x right, y down);
# the person's right is on the image's left, as for a person facing the camera.
PUPPET_LAYOUT: dict[int, tuple[float, float]] = {
    0: (0.0, -1.2), 1: (0.0, 0.0), 2: (-1.0, 0.6), 3: (-1.0, 2.0), 5: (1.0, 0.6), 6: (1.0, 2.0),
}
# The limbs between those parts: {index in controlnet-aux's limb list (it picks the colour the
# limb is drawn in): (part A, part B)}.
PUPPET_LIMBS: dict[int, tuple[int, int]] = {0: (1, 2), 1: (1, 5), 2: (2, 3), 4: (5, 6), 12: (1, 0)}

# controlnet-aux's OpenPose limbs (1-based parts) and their PAF channels (minus 19), from body.py.
_LIMB_SEQ = [[2, 3], [2, 6], [3, 4], [4, 5], [6, 7], [7, 8], [2, 9], [9, 10], [10, 11], [2, 12], [12, 13],
             [13, 14], [2, 1], [1, 15], [15, 17], [1, 16], [16, 18], [3, 17], [6, 18]]
_MAP_IDX = [[31, 32], [39, 40], [33, 34], [35, 36], [41, 42], [43, 44], [19, 20], [21, 22], [23, 24], [25, 26],
            [27, 28], [29, 30], [47, 48], [49, 50], [53, 54], [51, 52], [55, 56], [37, 38], [45, 46]]
_HEAD_PARTS = {0, 14, 15, 16, 17}  # nose, eyes, ears: above the limb's first part


def draw_puppet(image: np.ndarray, neck: tuple[int, int], unit: int, radius: int | None = None) -> np.ndarray:
    """A copy of ``image`` with the puppet's coloured discs drawn, its neck at ``neck`` (x, y)."""
    import cv2

    out = np.ascontiguousarray(image).copy()
    for part, (dx, dy) in PUPPET_LAYOUT.items():
        centre = (round(neck[0] + dx * unit), round(neck[1] + dy * unit))
        cv2.circle(out, centre, radius or max(4, unit // 4), PUPPET_COLOURS[part], thickness=-1)
    return out


def puppet_points(neck: tuple[int, int], unit: int) -> dict[int, tuple[float, float]]:
    """Pixel position (x, y) of each puppet part drawn by ``draw_puppet`` with these arguments."""
    return {part: (neck[0] + dx * unit, neck[1] + dy * unit) for part, (dx, dy) in PUPPET_LAYOUT.items()}


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


def _pass_through(conv, channels: int, source_offset: int = 0, blur: bool = False) -> None:
    """Make output channel k of ``conv`` copy input channel ``source_offset + k`` (k < channels),
    optionally blurred by a 3x3 tent.

    Inputs are ReLU outputs (non-negative), so the copy survives the ReLU after the layer; the
    layer's other output channels keep their random weights.
    """
    import torch

    tent = torch.tensor([1.0, 2.0, 1.0]) / 4
    kernel = torch.outer(tent, tent) if blur else torch.tensor([[0.0, 0, 0], [0, 1, 0], [0, 0, 0]])
    c = conv.kernel_size[0] // 2
    conv.weight[:channels] = 0
    conv.bias[:channels] = 0
    for k in range(channels):
        if conv.kernel_size[0] == 1:
            conv.weight[k, source_offset + k, 0, 0] = 1
        else:
            conv.weight[k, source_offset + k, c - 1:c + 2, c - 1:c + 2] = kernel


def _colour_detectors(conv, colours: list[tuple[int, int, int]], gain: float = 4.0, slack: float = 0.25) -> None:
    """Output channel k of the first layer = 1 on pixels of saturated colour k, 0 elsewhere.

    OpenPose feeds BGR / 256 - 0.5, so each channel is about +0.5 (on) or -0.5 (off); the sum of
    channels signed by colour k reaches 1.5 only on that colour. ``slack`` lets a total deviation
    of about 64 levels (JPEG, resizing) through; photos rarely get that close to a pure colour.
    """
    conv.weight[:len(colours)] = 0
    for k, rgb in enumerate(colours):
        for channel, value in enumerate(reversed(rgb)):  # BGR
            conv.weight[k, channel, 1, 1] = gain if value else -gain
        conv.bias[k] = -gain * (1.5 - slack)


def _puppet_body_model():
    """controlnet-aux's OpenPose body network, random but for a colour-to-keypoint pass-through."""
    import torch
    from controlnet_aux.open_pose.model import bodypose_model

    model = _damp(bodypose_model())
    parts = list(PUPPET_COLOURS)
    n = len(parts)
    with torch.no_grad():
        convs = [m for m in model.model0 if isinstance(m, torch.nn.Conv2d)]
        _colour_detectors(convs[0], [PUPPET_COLOURS[p] for p in parts])
        for conv in convs[1:]:
            # blurred, so that a disc becomes one smooth bump, not a plateau of tied maxima
            # that OpenPose would read as several candidates for one part
            _pass_through(conv, n, blur=True)
        heat = [m for m in model.model6_2 if isinstance(m, torch.nn.Conv2d)]
        _pass_through(heat[0], n, source_offset=38 + 19)  # stage 6 reads [PAFs, heatmaps, backbone]
        for conv in heat[1:-1]:
            _pass_through(conv, n)
        heat[-1].weight.zero_()
        heat[-1].bias.zero_()
        for k, part in enumerate(parts):
            heat[-1].weight[part, k, 0, 0] = 5.0  # the blur spreads a disc: about 1 at its centre
        paf = [m for m in model.model6_1 if isinstance(m, torch.nn.Conv2d)][-1]
        paf.weight.zero_()
        paf.bias.copy_(_upright_pafs())
    return model


def _upright_pafs():
    """Constant part affinity fields: body limbs point down the image, head limbs up."""
    import torch

    fields = torch.zeros(38)  # (x, y) per limb; x stays 0
    for (_, part_b), (_, y_channel) in zip(_LIMB_SEQ, _MAP_IDX):
        fields[y_channel - 19] = -1.0 if part_b - 1 in _HEAD_PARTS else 1.0
    return fields


def _midas_dpt_hybrid():
    """MiDaS DPT-hybrid, random, with the last bias raised above the final ReLU's cut-off.

    With random weights its last convolution outputs about -0.2 +- 0.02 everywhere, which the
    non-negative head clips to an all-zero map; +0.5 keeps the image-dependent variation.
    """
    import torch
    from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel

    model = DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True)
    last = [m for m in model.scratch.output_conv if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last.bias.add_(0.5)
    return model


def write_random_weights(root: Path) -> Path:
    """Fill ``root`` like the ``lllyasviel/Annotators`` folder, with random weights.

    HED, MiDaS DPT-hybrid and OpenPose are the real architectures at full size; the transformers
    models (UperNet segmentation, DPT depth) are the real classes with tiny configs.
    """
    import torch
    from controlnet_aux.hed import ControlNetHED_Apache2
    from controlnet_aux.open_pose.face import FaceNet
    from controlnet_aux.open_pose.model import handpose_model

    torch.manual_seed(0)
    root.mkdir(parents=True, exist_ok=True)
    _save_fp16(ControlNetHED_Apache2().state_dict(), root / "ControlNetHED.pth")
    _save_fp16(_midas_dpt_hybrid().state_dict(), root / "dpt_hybrid-midas-501f0c75.pt")
    _save_fp16(_strip_first_prefix(_puppet_body_model().state_dict()), root / "body_pose_model.pth")
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
