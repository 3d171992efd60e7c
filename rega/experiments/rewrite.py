"""``rega rewrite``: SDFT's rewrite of the domain data (:mod:`rega.distill.rewrite`), with the source records and
the base model taken from fit configs where the rewrite settings leave them empty (as a grid's sdft runs do).

    python cli.py rewrite --rewrite configs/grid/cpu_en_evidence_rewrite.yaml \
        --fit_configs '[configs/model/embedded.yaml, configs/experiment/cpu_en.yaml]' --output_dir runs/sdft
"""

from __future__ import annotations

from dataclasses import replace

from rega.config import DataSource, ModelConfig
from rega.distill.rewrite import RewriteConfig, run_rewrite
from rega.errors import ConfigError
from rega.lightning_cli import resolve_fit_config


def from_fit_configs(cfg: RewriteConfig, fit_configs: list[str]) -> RewriteConfig:
    """``cfg`` with its empty source and model taken from the fit configs' domain data and model."""
    resolved = resolve_fit_config(fit_configs)
    corpus = resolved["data"]["corpus"]
    source = cfg.source or [DataSource(**s) for s in corpus["domains"]]
    only = cfg.only_domains or list(corpus.get("only_domains") or [])
    model = ModelConfig(**resolved["model"]["model"]) if cfg.model == ModelConfig() else cfg.model
    return replace(cfg, source=source, only_domains=only, model=model)


def rewrite_command(
    rewrite: RewriteConfig,
    fit_configs: list[str] | None = None,
    seed: int | None = None,
    output_dir: str | None = None,
) -> None:
    """Rewrite domain responses with the base model (SDFT) and write output_dir/rewritten.jsonl.

    Args:
        rewrite: the rewrite settings.
        fit_configs: fit config files whose domain data and model are used where ``rewrite`` leaves them empty.
        seed: the sampling seed (a grid sets it from its seed list).
        output_dir: overrides ``rewrite.output_dir``.
    """
    cfg = rewrite
    if fit_configs:
        cfg = from_fit_configs(cfg, fit_configs)
    if seed is not None:
        cfg = replace(cfg, sampling=replace(cfg.sampling, seed=seed))
    if output_dir:
        cfg = replace(cfg, output_dir=output_dir)
    if not cfg.source:
        raise ConfigError("rewrite: no source: set rewrite.source or give fit_configs")
    print(f"wrote {run_rewrite(cfg)}")
