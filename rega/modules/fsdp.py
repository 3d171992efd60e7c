"""Fully sharded data parallel training with FSDP2 (``torch.distributed.fsdp.fully_shard``).

FSDP2 shards each parameter on its own (DTensor), so frozen bf16 (or 4-bit) base weights and trainable fp32 LoRA
weights live side by side in one unit, which FSDP1's flat parameters refuse. Lightning's ``ModelParallelStrategy``
sets up the process group and device mesh; ``REGAModule.configure_model`` calls :func:`shard_model`. FSDP2 runs on
CPU over gloo too, which is how it is tested without a GPU.

:class:`FSDP2Strategy` only changes what is gathered for a checkpoint: the trainable (LoRA) weights, as full
tensors, instead of every base weight (a 7B model would be copied to rank 0's memory at every checkpoint).
"""

from __future__ import annotations

import logging
from datetime import timedelta

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

log = logging.getLogger(__name__)


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over every process (data parallel size = world size, no tensor parallelism).

    Args:
        timeout: timeout of the process group's collectives.
    """

    def __init__(self, timeout: timedelta | None = timedelta(minutes=30)) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=False,
            timeout=timeout,
        )

    def setup_environment(self) -> None:
        # Lightning's "auto" data-parallel size is the number of nodes: here every process holds one shard.
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def lightning_module_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable weights as full CPU tensors, on every rank (each rank takes part in the gathers)."""
        return trainable_state_dict(self.lightning_module)


def trainable_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    state = {}
    for name, param in module.named_parameters():
        if param.requires_grad:
            tensor = param.full_tensor() if isinstance(param, DTensor) else param
            state[name] = tensor.detach().cpu()
    return state


def shard_model(
    model: nn.Module, mesh, layer_classes: tuple[type, ...], forward_methods: tuple[str, ...] = ()
):
    """Apply FSDP2 to a (peft) model: one unit per decoder layer, the rest (embeddings, norm, head) in the root.

    4-bit weights (bitsandbytes keeps quantization state beside the tensor, which sharding would lose) stay whole
    on every rank; at 4 bits a 7B base is 3.5 GB. ``forward_methods`` are methods other than ``forward`` that run
    the model (all-gather before, reshard after).
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    ignored = {p for p in model.parameters() if hasattr(p, "quant_state")} or None
    layers = [m for m in model.modules() if isinstance(m, layer_classes)]
    for layer in layers:
        fully_shard(layer, mesh=mesh, ignored_params=ignored)
    fully_shard(model, mesh=mesh, ignored_params=ignored)
    for name in forward_methods:
        register_fsdp_forward_method(model, name)
    log.info(
        "FSDP2: %d %s units over %d ranks",
        len(layers),
        "/".join(c.__name__ for c in layer_classes),
        mesh.size(),
    )
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)
