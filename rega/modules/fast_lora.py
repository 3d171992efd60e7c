"""LoRA forward without peft's per-adapter overhead: shared dropout masks, fused A projections, cheap masks.

peft's ``lora.Linear`` computes ``base(x) + B(A(dropout(x))) * scaling`` per adapted projection. On a LLaMA layer
that is seven dropout masks (q, k, v and gate, up read the same input) and seven rank-r matmuls, and on CPU
``F.dropout``'s ``bernoulli_`` mask costs about as much as the frozen projection's own matmul
(benchmarks/README.md, ``benchmarks/profile_step.py``). :func:`speed_up_lora` changes the adapters' forward only:

* **one dropout mask per layer input**, shared by the adapters that read it (q/k/v, gate/up; o and down alone).
  Each adapter still sees its input with each element dropped with probability p and the survivors scaled by
  1/(1-p), so every adapter's marginal distribution is unchanged; what changes is that the sibling adapters' masks
  are now equal instead of independent (4 masks per LLaMA layer instead of 7).
* **the A projections of a group fused into one matmul** (their weights concatenated each forward, so gradients
  reach the original ``lora_A`` parameters), each B added to the frozen projection's output inside one ``addmm``.
* **masks from random bits**: 16 random bits per element, compared with ``round(p * 2**16)``; the drop
  probability is that over 2**16 (p=0.05: 0.0500031) and the survivors' scale is its exact 1/(1-p). The bits come
  from torch's default generator (seeded per step by ``REGAModule``), so a resumed run draws the same masks, and
  gradient checkpointing's RNG replay recomputes the same masks.

Nothing else changes: the modules stay peft ``LoraLayer`` instances with the same parameters and state-dict names
(the class is swapped for a subclass that only overrides ``forward``), so adapters save, load and shard (FSDP2)
as before. Whatever the fast path does not cover (disabled or merged adapters, several active adapters, DoRA
and other variants, a bias on B, per-sample adapter names, 4-bit base layers) runs peft's own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear

from rega.modules.architectures import architecture_of

MASK_BITS = 16


class InputGroup:
    """Adapters that read the same input: the first one called computes the mask and the fused A product for all;
    the others take their slice if they get the same tensor (else they compute alone)."""

    def __init__(self, members: list[FastLoraLinear]):
        self.members = members
        self._input: torch.Tensor | None = None
        self._pending: dict[int, torch.Tensor] = {}

    def take(self, member: FastLoraLinear, x: torch.Tensor, adapter: str) -> tuple[torch.Tensor, float]:
        """(x's dropped A projection for ``member`` [..., r], the factor its B output is scaled by)."""
        index = self.members.index(member)
        if self._input is x and index in self._pending:
            part = self._pending.pop(index)
            if not self._pending:
                self._input = None
            return part, member._fast_scale(adapter)
        members = self.members[index:]
        if (
            not all(m._fast_ready(adapter) for m in members)
            or len({m._fast_p(adapter) for m in members}) != 1
        ):
            members = [member]
        dropped, keep_scale = drop(x.to(member.lora_A[adapter].weight.dtype), member._fast_p(adapter))
        weights = [m.lora_A[adapter].weight for m in members]
        product = F.linear(dropped, torch.cat(weights) if len(weights) > 1 else weights[0])
        parts = product.split([w.shape[0] for w in weights], -1)
        self._pending = {index + i: part for i, part in enumerate(parts[1:], 1)}
        self._input = x if self._pending else None
        return parts[0], member._fast_scale(adapter)


def drop(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """``x`` with elements zeroed with probability round(p·2^16)/2^16 (not rescaled), and the survivors' scale."""
    if p <= 0:
        return x, 1.0
    threshold = round(p * 2**MASK_BITS)
    if threshold >= 2**MASK_BITS:
        return torch.zeros_like(x), 0.0
    count = x.numel()
    # All 64 bits random (a bare random_() leaves the sign bit 0); 4 masks' worth of bits per draw.
    bits = torch.empty((count + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), 2**63 - 1)
    bits = bits.view(torch.int16)[:count].view(x.shape)
    keep = bits >= threshold - 2 ** (MASK_BITS - 1)  # int16 is signed: shift the threshold with it
    return x * keep.to(x.dtype), 1.0 / (1.0 - threshold / 2**MASK_BITS)


class FastLoraLinear(LoraLinear):
    """peft's ``lora.Linear`` with the forward of this module (same state; see the module docstring)."""

    _fast_group: InputGroup | None = None

    def _fast_ready(self, adapter: str) -> bool:
        return (
            adapter in self.lora_A
            and adapter not in self.lora_variant  # DoRA and other variants: peft's forward
            and self.lora_B[adapter].bias is None  # lora_bias=True: peft's forward
        )

    def _fast_p(self, adapter: str) -> float:
        dropout = self.lora_dropout[adapter]
        return float(dropout.p) if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0

    def _fast_scale(self, adapter: str) -> float:
        p = self._fast_p(adapter)
        keep = 1.0 - round(p * 2**MASK_BITS) / 2**MASK_BITS if p > 0 else 1.0
        return self.scaling[adapter] / keep if keep > 0 else 0.0

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapters = self.active_adapters
        if (
            args
            or kwargs
            or self.disable_adapters
            or self.merged
            or len(adapters) != 1
            or not self._fast_ready(adapters[0])
        ):
            return super().forward(x, *args, **kwargs)
        adapter = adapters[0]
        result = self.base_layer(x)
        group = self._fast_group or InputGroup([self])
        part, scale = group.take(self, x, adapter)
        weight = self.lora_B[adapter].weight
        update = weight * scale  # [out, r]: folding the scale into B costs nothing
        flat = result.reshape(-1, result.shape[-1])
        out = torch.addmm(flat.to(part.dtype), part.reshape(-1, part.shape[-1]), update.t())
        return out.view(result.shape).to(result.dtype)


def speed_up_lora(model, enabled: bool = True):
    """Switch ``model``'s (a peft model's) plain LoRA linears to :class:`FastLoraLinear` and group those that read
    the same input (the architecture's ``shared_inputs``). Returns ``model``. ``enabled=False`` leaves it as it is."""
    if not enabled:
        return model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    record = architecture_of(base)
    groups = record.shared_inputs if record else ()
    for module in model.modules():
        children = dict(module.named_children())
        for child in children.values():
            if type(child) is LoraLinear:
                child.__class__ = FastLoraLinear
        for names in groups:
            members = [children.get(n) for n in names]
            if all(isinstance(m, FastLoraLinear) for m in members):
                group = InputGroup(members)
                for member in members:
                    member._fast_group = group
    return model
