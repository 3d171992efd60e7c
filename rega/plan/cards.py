"""The GPUs a plan is made for: memory as ``nvidia-smi`` reports it and the dense (no sparsity) bf16 tensor-core
peak from the vendor's data sheet (SXM parts where there are several). V100 has no bf16: its fp16 peak is listed
and a bf16 model is flagged."""

from __future__ import annotations

from dataclasses import dataclass

from rega.errors import ConfigError


@dataclass(frozen=True)
class Card:
    """One GPU model.

    Args:
        name: the name ``--gpu`` takes.
        memory_gib: memory the driver reports (GiB), all of which a process may use.
        tflops: dense bf16 tensor-core peak, TFLOP/s (fp16 where the card has no bf16).
        bf16: whether the card computes in bf16.
    """

    name: str
    memory_gib: float
    tflops: float
    bf16: bool = True


CARDS = {
    card.name: card
    for card in (
        Card("h100-80gb", 79.6, 989.0),  # H100 SXM5: 81559 MiB
        Card("h200-141gb", 140.4, 989.0),  # H200 SXM: 143771 MiB, same compute as H100
        Card("a100-80gb", 80.0, 312.0),
        Card("a100-40gb", 40.0, 312.0),
        Card("l40s-48gb", 45.0, 362.0),  # 46068 MiB
        Card("rtx4090-24gb", 24.0, 165.2),  # bf16 with fp32 accumulation
        Card("v100-32gb", 31.7, 125.0, bf16=False),  # fp16 tensor cores only
    )
}


def card(name: str) -> Card:
    """The card called ``name``; a ConfigError listing the known ones otherwise."""
    try:
        return CARDS[name.lower()]
    except KeyError:
        raise ConfigError(f"--gpu {name!r}: unknown card; use one of {', '.join(CARDS)}") from None
