"""The model families the trainer knows: name (what ``detect_family`` reads from a base folder) -> adapter.

Each family is one ``FamilyAdapter`` subclass (the abstract adapter, train/adapter.py) in a file of this
package: unet.py (SD 1.x/2.x, SDXL), flow.py (SD3/3.5, Flux.1), zimage.py (Z-Image), qwenimage.py (Qwen-Image),
hunyuandit.py (HunyuanDiT). Adding a family is one new file here
and one entry in ``FAMILIES``, plus its ``FamilySpec`` in train/family_specs.py (folders, ControlNet
classes, what flags it takes: checked before any model is imported). Family files import train/adapter.py, train/latents.py
and the loss modules, never each other or this registry.
"""

from __future__ import annotations

from train.adapter import FamilyAdapter
from train.families.flow import FluxAdapter, SD3Adapter
from train.families.qwenimage import QwenImageAdapter
from train.families.hunyuandit import HunyuanDiTAdapter
from train.families.unet import SDAdapter, SDXLAdapter
from train.families.zimage import ZImageAdapter

FAMILIES: dict[str, type[FamilyAdapter]] = {
    adapter.name: adapter for adapter in (SDAdapter, SDXLAdapter, SD3Adapter, FluxAdapter, ZImageAdapter, QwenImageAdapter,
                                           HunyuanDiTAdapter)
}
"""Family name -> adapter class, constructed with the training resolution."""
