"""FLOPs of a LoRA step and its time at a stated utilisation: pure arithmetic over a
:class:`rega.plan.shape.Shape`.

Per token, with P the decoder layers' linear weights, L layers of attention width d over sequences of s tokens,
A the LoRA parameters, and the LM head (hidden x vocab, H) run on the response share ρ of the positions only:

* forward: 2·P + 4·L·d·s (QKᵀ and PV, the full s² as in PaLM's MFU accounting: causal flash kernels skip about
  half of it) + 2·A + 2·H·ρ;
* backward: the base is frozen, so every linear layer computes its input gradient only (2·P, no weight gradient),
  attention twice its forward (8·L·d·s), LoRA its input and weight gradients (4·A), the head its input gradient
  (2·H·ρ);
* gradient checkpointing recomputes the decoder's forward in backward (2·P + 4·L·d·s + 2·A; not the head).

So about 4·P per token without checkpointing and 6·P with it, instead of full fine-tuning's 6·P and 8·P.
"""

from __future__ import annotations

from rega.plan.shape import Shape


def flops_per_token(
    shape: Shape, attended: float, response_share: float, checkpointing: bool
) -> dict[str, float]:
    """Forward, backward and recompute FLOPs per token (``attended``: the sequence length attention spans)."""
    linear, lora = 2 * shape.linear_params, 2 * shape.lora_params
    attention = 4 * shape.layers * shape.q_dim * attended
    head = 2 * shape.head_params * response_share
    parts = {
        "forward": linear + attention + lora + head,
        "backward": linear + 2 * attention + 2 * lora + head,
        "recompute": linear + attention + lora if checkpointing else 0.0,
    }
    parts["total"] = sum(parts.values())
    return parts


def step_seconds(flops: float, tflops: float, mfu: float) -> float:
    """Seconds for ``flops`` at ``mfu`` of a ``tflops`` peak (the FLOPs the GPU runs, recompute included;
    communication is taken as hidden behind compute)."""
    return flops / (tflops * 1e12 * mfu)
