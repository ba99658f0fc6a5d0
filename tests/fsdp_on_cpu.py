"""Run train/train.py with accelerate's FSDP path switched on for CPU processes (tests only).

accelerate 1.16 sets up FSDP only on GPUs: a CPU launch of an FSDP config becomes plain multi-CPU DDP (and
train/sharding.py refuses it). torch's FSDP2 (``fully_shard``) itself runs on CPU over gloo, so the tests start
this script instead of train/train.py: it makes accelerate's state FSDP, with the launch's own plugin, and then
runs train/train.py unchanged."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


AcceleratorState.__init__ = _init_with_fsdp_on_cpu
TRAIN = Path(__file__).resolve().parents[1] / "train" / "train.py"
sys.argv[0] = str(TRAIN)
runpy.run_path(str(TRAIN), run_name="__main__")
