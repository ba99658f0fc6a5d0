"""The model families the trainer knows: name (what ``detect_family`` reads from a base folder) -> adapter.

Each family is one ``FamilyAdapter`` subclass (the abstract adapter, train/adapter.py) in a file of this
package: unet.py (SD 1.x/2.x, SDXL), flow.py (SD3/3.5, Flux.1), zimage.py (Z-Image), qwenimage.py (Qwen-Image),
hunyuandit.py (HunyuanDiT), sana.py (Sana). Adding a family is one new file here
and one entry in ``FAMILIES``, plus its ``FamilySpec`` in train/family_specs.py (folders, ControlNet
classes, what flags it takes: checked before any model is imported). Family files import train/adapter.py, train/latents.py
and the loss modules, never each other or this registry.

A control method other than a ControlNet (``--control_method``) is an adapter subclassing its family's, in its
own file (unet_xs.py: ControlNet-XS over SD 1.x/2.x and SDXL; train/channel_concat.py: Flux channel-concat),
registered in train/models.py ``METHOD_ADAPTERS`` by (family, method), so the loop never branches on the method.
"""

from __future__ import annotations

from train.adapter import FamilyAdapter
from train.families.flow import FluxAdapter, SD3Adapter
from train.families.qwenimage import QwenImageAdapter
from train.families.hunyuandit import HunyuanDiTAdapter
from train.families.sana import SanaAdapter
from train.families.unet import SDAdapter, SDXLAdapter
from train.families.zimage import ZImageAdapter

FAMILIES: dict[str, type[FamilyAdapter]] = {
    adapter.name: adapter for adapter in (SDAdapter, SDXLAdapter, SD3Adapter, FluxAdapter, ZImageAdapter, QwenImageAdapter,
                                           HunyuanDiTAdapter, SanaAdapter)
}
"""Family name -> adapter class, constructed with the training resolution."""
