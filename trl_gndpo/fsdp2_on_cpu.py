"""Sharding engines on CPU: FSDP2 for a CPU run, which accelerate 1.15 never selects although it runs there.

`accelerate launch` with an FSDP config starts every process with `ACCELERATE_USE_FSDP=true`. On a CPU run
(`use_cpu=True`, gloo) accelerate's state is `MULTI_CPU`, and `AcceleratorState.__init__` (accelerate/state.py) turns
FSDP on only for accelerator device types (`MULTI_GPU`, `MULTI_XPU`, ...): the plugin is dropped and the model is
silently wrapped in DDP. torch's FSDP2 (`fully_shard`) itself runs on CPU with gloo, so GNDPO selects it there.
DeepSpeed needs nothing of the kind: accelerate keeps DEEPSPEED for a CPU run, and DeepSpeed's CPU accelerator talks
gloo.
"""

import os

from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin


def select_fsdp2_on_cpu(accelerator: Accelerator, fsdp_plugin_args: dict | None) -> bool:
    """Turn on the FSDP2 plugin that a CPU run asked for (launcher or `fsdp` argument) and accelerate dropped.

    Returns True when it did. Raises for FSDP1, which GNDPO does not run on CPU, instead of falling back to DDP.
    """
    requested = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or fsdp_plugin_args is not None
    if not requested or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin(**(fsdp_plugin_args or {}))  # the launcher's FSDP_* variables fill it
    if plugin.fsdp_version != 2:
        raise ValueError(
            "FSDP on CPU runs with FSDP2 only: set `fsdp_version: 2` in the accelerate config (or drop FSDP); "
            "accelerate would otherwise silently train with DDP."
        )
    if accelerator.state.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.state.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return True
