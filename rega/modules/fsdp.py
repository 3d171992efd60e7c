"""Fully sharded data parallel training with FSDP2 (``torch.distributed.fsdp.fully_shard``).

FSDP2 shards each parameter on its own (DTensor), so frozen bf16 (or 4-bit) base weights and trainable fp32 LoRA
weights live side by side in one unit, which FSDP1's flat parameters refuse. Lightning's ``ModelParallelStrategy``
sets up the process group and device mesh; ``REGAModule.configure_model`` calls :func:`shard_model`. FSDP2 runs on
CPU over gloo too, which is how it is tested without a GPU.

:class:`FSDP2Strategy` only changes what is gathered for a checkpoint: the trainable (LoRA) weights, as full
tensors, instead of every base weight (a 7B model would be copied to rank 0's memory at every checkpoint), and,
with ``shard_size``, over how many ranks each weight is sharded (HSDP: shard within a node, replicate across nodes).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Literal

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from rega.errors import ConfigError

log = logging.getLogger(__name__)

HSDP_DIMS = ("replicate", "shard")


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over every process (data parallel size = world size, no tensor parallelism).

    Args:
        timeout: timeout of the process group's collectives.
        shard_size: over how many ranks each weight is sharded. ``"all"``: every rank of every node (one flat
            mesh). ``"node"``: the processes of one node, replicated across nodes (HSDP: the per-layer all-gathers
            stay on the node's NVLink; only gradients cross the network, once per step). An integer: shards of
            that many ranks, which must divide the world size. Every rank still reads different data.
    """

    def __init__(
        self,
        timeout: timedelta | None = timedelta(minutes=30),
        shard_size: int | Literal["node", "all"] = "all",
    ) -> None:
        if shard_size not in ("node", "all") and not (type(shard_size) is int and shard_size >= 1):
            raise ConfigError(
                f"FSDP2Strategy shard_size must be 'all', 'node' or a positive integer, got {shard_size!r}"
            )
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=False,
            timeout=timeout,
        )
        self.shard_size = shard_size

    def mesh_shape(self) -> tuple[int, int]:
        """(replicas, ranks per shard) for this run's world size; refuses a shard size that does not divide it."""
        world = self.num_nodes * self.num_processes
        size = {"all": world, "node": self.num_processes}.get(self.shard_size, self.shard_size)
        if world % size:
            raise ConfigError(
                f"FSDP2Strategy shard_size={self.shard_size} does not divide the world size {world} "
                f"({self.num_nodes} nodes x {self.num_processes} processes)"
            )
        return world // size, size

    def _configure_launcher(self) -> None:
        self.mesh_shape()  # at Trainer construction, before any process starts
        super()._configure_launcher()

    def setup_environment(self) -> None:
        replicas, size = self.mesh_shape()
        if replicas == 1:
            # One flat mesh as before: Lightning's "auto" data-parallel size is the number of nodes, here every
            # process holds one shard.
            self._data_parallel_size = size
            super().setup_environment()
            return
        from torch.distributed.device_mesh import init_device_mesh

        # Lightning's own mesh is (data_parallel, tensor_parallel); HSDP needs (replicate, shard) instead, so
        # ModelParallelStrategy's mesh step is skipped rather than building a second set of process groups.
        super(ModelParallelStrategy, self).setup_environment()
        self._setup_distributed()
        self._device_mesh = init_device_mesh(
            self.root_device.type, (replicas, size), mesh_dim_names=HSDP_DIMS
        )
        self.lightning_module._device_mesh = self._device_mesh

    @property
    def distributed_sampler_kwargs(self) -> dict[str, int]:
        # Without tensor parallelism every rank is a data-parallel rank, whatever the mesh's shape.
        return {"num_replicas": self.world_size, "rank": self.global_rank}

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


def data_parallel_mesh(mesh):
    """The mesh FSDP2 shards over, from the strategy's: its ("replicate", "shard") 2-D mesh under HSDP (weights
    ``(Replicate(), Shard(0))``), else its 1-D data-parallel dimension (or ``mesh`` itself when 1-D)."""
    names = mesh.mesh_dim_names or ()
    if set(HSDP_DIMS) <= set(names):
        return mesh[HSDP_DIMS]
    return mesh["data_parallel"] if "data_parallel" in names else mesh


def shard_model(
    model: nn.Module, mesh, layer_classes: tuple[type, ...], forward_methods: tuple[str, ...] = ()
):
    """Apply FSDP2 to a (peft) model: one unit per decoder layer, the rest (embeddings, norm, head) in the root.

    ``mesh`` is the strategy's device mesh (see :func:`data_parallel_mesh`). 4-bit weights (bitsandbytes keeps
    quantization state beside the tensor, which sharding would lose) stay whole on every rank; at 4 bits a 7B base
    is 3.5 GB. ``forward_methods`` are methods other than ``forward`` that run the model (all-gather before,
    reshard after).
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = data_parallel_mesh(mesh)
    ignored = {p for p in model.parameters() if hasattr(p, "quant_state")} or None
    layers = [m for m in model.modules() if isinstance(m, layer_classes)]
    for layer in layers:
        fully_shard(layer, mesh=mesh, ignored_params=ignored)
    fully_shard(model, mesh=mesh, ignored_params=ignored)
    for name in forward_methods:
        register_fsdp_forward_method(model, name)
    replicas = f" × replicated {mesh.size(0)}×" if mesh.ndim == 2 else ""
    log.info(
        "FSDP2: %d %s units, sharded over %d ranks%s",
        len(layers),
        "/".join(c.__name__ for c in layer_classes),
        mesh.size(mesh.ndim - 1),
        replicas,
    )
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)
