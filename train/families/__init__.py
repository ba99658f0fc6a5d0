"""The model families the trainer knows: name (what ``detect_family`` reads from a base folder) -> adapter.

Each family is one ``FamilyAdapter`` subclass (the abstract adapter, train/adapter.py) in a file of this
package: unet.py (SD 1.x/2.x, SDXL) and flow.py (SD3/3.5, Flux.1). Adding a family is one new file here
and one entry in ``FAMILIES``, plus its ``FamilySpec`` in train/family_specs.py (folders, ControlNet
classes, what flags it takes: checked before any model is imported). Family files import train/adapter.py, train/latents.py
and the loss modules, never each other or this registry.

A control method other than a ControlNet (``--control_method``) is an adapter subclassing its family's, in its
own file (unet_xs.py: ControlNet-XS over SD 1.x/2.x and SDXL), registered in ``METHOD_ADAPTERS`` by (method,
family); ``adapter_class`` picks the one a run uses, so the loop never branches on the method.
"""

from __future__ import annotations

from train.adapter import FamilyAdapter
from train.families.flow import FluxAdapter, SD3Adapter
from train.families.unet import SDAdapter, SDXLAdapter
from train.families.unet_xs import SDXLXSAdapter, SDXSAdapter

FAMILIES: dict[str, type[FamilyAdapter]] = {
    adapter.name: adapter for adapter in (SDAdapter, SDXLAdapter, SD3Adapter, FluxAdapter)
}
"""Family name -> adapter class, constructed with the training resolution."""

METHOD_ADAPTERS: dict[tuple[str, str], type[FamilyAdapter]] = {
    (adapter.method, adapter.name): adapter for adapter in (SDXSAdapter, SDXLXSAdapter)
}
"""(control method, family name) -> the adapter training that method on that family; ``controlnet`` is
``FAMILIES``' own."""


def adapter_class(family: str, method: str = "controlnet") -> type[FamilyAdapter]:
    """The adapter of ``family`` for the control ``method`` (checked against ``FamilySpec.control_methods``
    before this is asked)."""
    return FAMILIES[family] if method == "controlnet" else METHOD_ADAPTERS[(method, family)]
