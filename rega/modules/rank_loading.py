"""Under FSDP2 only global rank 0 reads the base weights; every other rank receives just its shards.

Loading the whole base on every rank before sharding it needs the base times the ranks of a node in host memory
(8 ranks x 26 GB for a 13B model). Here rank 0 loads it as :func:`rega.modules.model.load_model` does, the other
ranks build the same module tree on the meta device (:func:`rega.modules.model.empty_model`), every rank adapts
(LoRA) and shards it the same way, and rank 0's full state (base weights and its LoRA init) is broadcast into each
rank's shards. Buffers that no state dict holds (the rotary ``inv_freq``) are broadcast after it. The meta ranks'
LoRA init draws no random numbers, which changes nothing: training seeds its dropout at every step.

4-bit (QLoRA) bases are not sharded (:func:`rega.modules.fsdp.shard_model`): every rank loads them, as before.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Callable

import torch
from torch import nn

from rega.config import ModelConfig
from rega.modules.fsdp import shard_model
from rega.modules.model import decoder_layer_classes, empty_model, load_model

log = logging.getLogger(__name__)

# Set to "1" (tests only): every rank loads the whole base, the path this module replaces, for comparison.
EVERY_RANK_LOADS = "REGA_EVERY_RANK_LOADS"


def load_sharded(
    config: ModelConfig, mesh, adapt: Callable[[nn.Module], nn.Module], forward_methods: tuple[str, ...] = ()
) -> nn.Module:
    """The model ``adapt(base)`` (LoRA and the rest, run alike on every rank) sharded over ``mesh`` (see
    :func:`shard_model`), its weights read from disk by global rank 0 alone (why: the module docstring)."""
    import torch.distributed as dist

    rng = torch.get_rng_state()
    if config.load_in_4bit or os.environ.get(EVERY_RANK_LOADS) == "1":
        model = adapt(load_model(config))
        return shard_model(model, mesh, decoder_layer_classes(model), forward_methods)
    model = adapt(empty_model(config))  # every rank, rank 0 included: the same sharded tree
    shard_model(model, mesh, decoder_layer_classes(model), forward_methods)
    state, buffers = {}, {}
    if dist.get_rank() == 0:
        torch.set_rng_state(rng)  # its LoRA init draws what every rank's did when each loaded the base
        loaded = adapt(load_model(config))
        state, buffers = loaded.state_dict(), dict(loaded.named_buffers(remove_duplicate=False))
        del loaded
    fill_from_rank_zero(model, state, buffers, torch.device(mesh.device_type))
    del state, buffers
    gc.collect()  # rank 0's loaded model is in reference cycles: free its whole base now, not at some later gc
    return model


def fill_from_rank_zero(
    model: nn.Module, state: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], device: torch.device
) -> None:
    """Load rank 0's full ``state`` (empty elsewhere) into every rank's shards of the sharded meta ``model`` (one
    weight in flight at a time, on ``device``, the mesh's), then every buffer (``buffers``: rank 0's, by name;
    non-persistent ones such as the rotary ``inv_freq`` are in no state dict)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    sent = sum(t.nbytes for t in state.values())
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, state, options=options)
    zero = dist.get_rank() == 0
    for prefix, module in model.named_modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                full = buffers[f"{prefix}.{name}" if prefix else name] if zero else None
                received = full.to(device) if zero else torch.empty_like(buffer, device=device)
                dist.broadcast(received, src=0)
                module._buffers[name] = received
    if zero:
        log.info(
            "FSDP2: weights broadcast from rank 0 (%.3f GB, base and LoRA init) to %d ranks, which built the "
            "model on the meta device",
            sent / 1e9,
            dist.get_world_size(),
        )
