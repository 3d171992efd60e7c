"""Loss terms added to REGAModule's response-token cross-entropy (regularisers, distillation losses, ...).

A term is registered under a name with :func:`register_loss_term` and switched on from YAML:

    model:
      loss_terms:
        kl_to_base: {weight: 0.1, domains: [general]}

The registered function receives the term's settings and returns the term: a callable
``term(module, batch, logits) -> tensor`` evaluated on every micro-batch. ``logits`` [N, V] are those of the
positions that predict a response token (the LM head runs there only), in the order of the planned micro-batch's
``response_index``, ``response_targets`` and ``response_domain`` [N]; ``domain_positions`` maps a domain id to its
rows of ``logits`` (:mod:`rega.modules.batch_plan`). The term returns a sum over those positions, in the units of
the summed cross-entropy: REGAModule divides the total by the batch's response-token count, so a term weighs the
same whatever the micro-batch size. Gather with these indices rather than boolean masks: a mask's count is a
value the host must wait for on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from rega.errors import ConfigError

LossTerm = Callable[..., torch.Tensor]
LOSS_TERMS: dict[str, Callable[..., LossTerm]] = {}


def register_loss_term(name: str):
    """Register a factory ``f(**settings) -> term`` under ``name`` (see the module docstring)."""

    def register(factory: Callable[..., LossTerm]) -> Callable[..., LossTerm]:
        LOSS_TERMS[name] = factory
        return factory

    return register


def build_loss_terms(spec: dict[str, dict] | None) -> dict[str, LossTerm]:
    """The terms named in ``spec`` ({name: settings}), built once; an unknown name or setting is a ConfigError."""
    terms = {}
    for name, settings in (spec or {}).items():
        if name not in LOSS_TERMS:
            raise ConfigError(
                f"unknown loss term {name!r} (registered: {', '.join(sorted(LOSS_TERMS)) or 'none'}); a plugin "
                "module named in $REGA_PLUGINS can register more"
            )
        try:
            terms[name] = LOSS_TERMS[name](**(settings or {}))
        except TypeError as err:
            raise ConfigError(f"loss term {name!r}: {err}") from None
    return terms


@register_loss_term("kl_to_base")
def kl_to_base(weight: float = 0.1, domains: list[str] | None = None, temperature: float = 1.0) -> LossTerm:
    """LwF-style regularisation towards the base model: ``weight * T^2 * KL(p_base || p_adapted)`` per response
    token of the given domains (default ``general``; ``[]``: every token), both at temperature T. The base is
    the same network with the adapter disabled, so no second copy of the weights is held.
    """
    if weight < 0 or temperature <= 0:
        raise ConfigError(f"kl_to_base: weight must be >= 0 and temperature > 0, got {weight}, {temperature}")
    names = ["general"] if domains is None else list(domains)

    def term(module, batch: dict, logits: torch.Tensor) -> torch.Tensor:
        selected = selected_positions(module, batch, names)
        if selected is not None and not len(selected):
            return logits.sum() * 0.0  # keeps the graph (and FSDP's hooks) alike on every micro-batch
        index = (
            batch["response_index"] if selected is None else batch["response_index"].index_select(0, selected)
        )
        with torch.no_grad(), module.model.disable_adapter():
            base = module.model.response_logits(batch, index)
        adapted = logits if selected is None else logits.index_select(0, selected)
        adapted = F.log_softmax(adapted.float() / temperature, dim=-1)
        target = F.log_softmax(base.float() / temperature, dim=-1)
        kl = F.kl_div(adapted, target, log_target=True, reduction="sum")
        return weight * temperature**2 * kl

    return term


def selected_positions(module, batch: dict, domains: list[str]) -> torch.Tensor | list | None:
    """The rows of a micro-batch's response logits that belong to examples of ``domains``: None for all (no
    domains given), an empty list for none, else their indices (from the host plan: no host sync)."""
    if not domains:
        return None
    names = list(module.data.domains)
    if not names:
        raise RuntimeError(
            f"a loss term restricted to domains {domains} needs a data module's domains (REGADataModule)"
        )
    positions = batch["domain_positions"]
    parts = [positions[i] for i, name in enumerate(names) if name in domains and i in positions]
    if len(parts) > 1:
        return torch.cat(parts)
    return parts[0] if parts else []
