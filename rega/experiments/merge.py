"""The architectural baseline: one LoRA per domain, merged into one adapter with peft's ``add_weighted_adapter``.

Each domain's adapter is trained alone (an FT run with ``only_domains: [<domain>]``); the merged adapter is
written as a plain peft adapter folder, so ``rega evaluate --adapter`` infers with it under p_c like any other.
``combination_type`` is peft's: ``linear`` / ``ties`` / ``dare_linear`` / ``dare_ties`` / ``magnitude_prune``
combine the A and B matrices (weights and, for TIES/DARE, ``density`` and the sign election as peft defines them),
``cat`` stacks them (the exact weighted sum of the updates, rank = sum of ranks), ``*_svd`` merge the updates and
refactorise. A grid run with ``merge:`` calls :func:`merge_adapters` in its own process (``python -m
rega.experiments.merge``).
"""

from __future__ import annotations

import json
from pathlib import Path

from rega.config import ModelConfig
from rega.errors import ConfigError
from rega.io import atomic_dir, write_json
from rega.modules.export import check_adapter
from rega.modules.model import load_model

COMBINATIONS = (
    "linear", "cat", "ties", "dare_linear", "dare_ties", "magnitude_prune",
    "svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd",
)  # fmt: skip
NEEDS_DENSITY = ("ties", "dare", "magnitude_prune")
MERGED = "default"  # saved at the folder's top level, where load_adapter looks


def check_merge(adapters: dict[str, str], combination_type: str, weights: list[float] | None) -> list[float]:
    if combination_type not in COMBINATIONS:
        raise ConfigError(
            f"combination_type must be one of {', '.join(COMBINATIONS)}, got {combination_type!r}"
        )
    if len(adapters) < 2:
        raise ConfigError(f"merging needs at least two adapters, got {len(adapters)}")
    if weights is not None and len(weights) != len(adapters):
        raise ConfigError(f"{len(weights)} weights for {len(adapters)} adapters")
    for path in adapters.values():
        check_adapter(path)
    return list(weights) if weights is not None else [1.0] * len(adapters)


def merge_adapters(
    model: ModelConfig,
    adapters: dict[str, str],
    output: str,
    combination_type: str = "ties",
    weights: list[float] | None = None,
    density: float = 0.5,
) -> Path:
    """Merge the named adapters into one and save it as a peft adapter folder at ``output`` (replaced whole)."""
    from peft import PeftModel

    weights = check_merge(adapters, combination_type, weights)
    names = list(adapters)
    peft_model = PeftModel.from_pretrained(load_model(model), adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(adapters[name], adapter_name=name)
    extra = {"density": density} if any(k in combination_type for k in NEEDS_DENSITY) else {}
    peft_model.add_weighted_adapter(names, weights, MERGED, combination_type=combination_type, **extra)
    peft_model.set_adapter(MERGED)
    with atomic_dir(Path(output)) as tmp:
        peft_model.save_pretrained(tmp, selected_adapters=[MERGED])
        write_json(
            tmp / "merge.json",
            {"adapters": adapters, "weights": weights, "combination_type": combination_type, **extra},
        )
    return Path(output)


def merge_command(
    adapters: dict[str, str],
    output: str,
    model: ModelConfig | None = None,
    fit_configs: list[str] | None = None,
    combination_type: str = "ties",
    weights: list[float] | None = None,
    density: float = 0.5,
) -> None:
    """Merge LoRA adapters (one per domain) into one adapter.

    Args:
        adapters: name -> adapter folder.
        output: folder for the merged adapter (replaced whole).
        model: the base model the adapters were trained on (default: the fit configs' model, else embedded).
        fit_configs: fit config files whose model is the base model (a grid passes its own).
        combination_type: peft's combination (linear, cat, ties, dare_linear, dare_ties, magnitude_prune, *_svd).
        weights: one weight per adapter (default 1 each).
        density: share of entries kept by TIES / DARE / magnitude pruning.
    """
    if model is None and fit_configs:
        from rega.lightning_cli import resolve_fit_config

        model = ModelConfig(**resolve_fit_config(fit_configs)["model"]["model"])
    path = merge_adapters(model or ModelConfig(), adapters, output, combination_type, weights, density)
    print(json.dumps({"merged": str(path)}))


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(merge_command, as_positional=False)
