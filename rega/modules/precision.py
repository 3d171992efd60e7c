"""``bf16-true`` for LoRA: the frozen base in bf16, everything trainable in fp32.

Lightning's ``bf16-true`` casts the whole module, the LoRA weights too, and with them their gradients and AdamW's
states. bf16 keeps 8 significant bits: an update smaller than about 1/256 of a weight rounds away, and at the
cosine schedule's end (lr 2e-5) nearly every LoRA update is that small. :class:`FrozenHalfPrecision` casts only
the frozen floating-point weights; trainable weights are made (outside Lightning's bf16 default-dtype context)
and kept in fp32. peft runs each adapter in its weights' dtype, so the LoRA products are fp32 on a bf16 base.

What it saves over ``bf16-mixed``: only the cast of a base loaded in fp32 (``bf16-mixed`` keeps fp32 weights and
casts them in autocast). A base loaded in bfloat16, as every GPU model config does, is the same bf16 under both;
then the difference is the forward: no autocast, so the ops on bf16 weights run in bf16 and the LoRA ones in fp32.
Buffers (rotary frequencies) keep their dtype. :func:`frozen_half_precision` puts this plugin in place of
``precision: bf16-true`` (or ``16-true``); the CLI does that for every fit.
"""

from __future__ import annotations

import contextlib

import torch
from lightning.pytorch.plugins.precision import HalfPrecision
from torch import nn

from rega.errors import ConfigError

HALF_TRUE = ("bf16-true", "16-true")


class FrozenHalfPrecision(HalfPrecision):
    """Lightning's ``bf16-true``/``16-true`` with trainable weights (and so their optimizer states) in fp32."""

    def convert_module(self, module: nn.Module) -> nn.Module:
        from torch.distributed.tensor import DTensor

        for name, param in module.named_parameters():
            if not param.is_floating_point() or hasattr(
                param, "quant_state"
            ):  # 4-bit weights stay as they are
                continue
            dtype = torch.float32 if param.requires_grad else self._desired_input_dtype
            if param.dtype == dtype:
                continue
            if isinstance(
                param, DTensor
            ):  # FSDP2 has sized its gathers by the dtype the weights were sharded in
                raise ConfigError(
                    f"precision {self.precision} with FSDP2: {name} is {param.dtype} after sharding; load the "
                    "base in that dtype (--model.model.dtype bfloat16) so that nothing is cast after sharding"
                )
            param.data = param.data.to(dtype)
        return module

    def tensor_init_context(self) -> contextlib.AbstractContextManager:
        # The LoRA weights are made in configure_model: in fp32. The base loads in its configured dtype.
        return contextlib.nullcontext()


def frozen_half_precision(trainer_config: dict) -> dict:
    """``trainer_config`` (Trainer keyword arguments) with ``precision: bf16-true``/``16-true`` replaced by the
    matching :class:`FrozenHalfPrecision` plugin; other precisions are left alone."""
    precision = trainer_config.get("precision")
    if precision not in HALF_TRUE:
        return trainer_config
    plugins = trainer_config.get("plugins")
    plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    return {**trainer_config, "precision": None, "plugins": [*plugins, FrozenHalfPrecision(precision)]}
