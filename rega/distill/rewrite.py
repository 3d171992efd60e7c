"""SDFT-style self-distillation of the domain data (Yang et al., ACL 2024, "Self-Distillation Bridges
Distribution Gap in Language Model Fine-Tuning"), REGA's closest relative: the base model rewrites each domain
response in its own words given the reference answer, and fine-tuning on the rewrites moves the model less.

For every domain record (x, y) the base model answers, under p_c, a rewrite prompt holding x and the reference y;
the rewrite ỹ replaces y when it is usable, else y is kept (as SDFT keeps the original response when the
distilled one is wrong):

* closed task (choices/answer): the answer extracted from ỹ (:mod:`rega.eval.domain.metrics` rules) must be the
  gold one;
* free-form task: ỹ must pass the self-distillation quality gates (not empty, not degenerate).

Generation is the self-distillation runner's (batched, restartable, sharded, quality gates): the rewrite prompts
are written as instruction records to ``output_dir/prompts.jsonl``, distilled into ``output_dir/distill/`` and
joined back by id into ``output_dir/rewritten.jsonl`` — the domain records with their outputs replaced and
``meta.rewrite`` saying which answer was kept and why — plus ``summary.json``. The ``sdft`` strategy trains on
that file (``data.corpus.domains: [{path: .../rewritten.jsonl}]``; the grid sets it, see ``GridRun.rewrite``).

    python cli.py rewrite --rewrite configs/grid/cpu_en_evidence_rewrite.yaml \
        --fit_configs '[configs/model/embedded.yaml, configs/experiment/cpu_en.yaml]' --output_dir runs/sdft

(the command, which reads the fit configs, is :mod:`rega.experiments.rewrite`).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from rega.config import DataSource, DistillConfig, ModelConfig, SamplingConfig
from rega.data.loaders import load_many
from rega.data.records import Record
from rega.distill.runner import run_distillation
from rega.errors import ConfigError
from rega.eval.domain.metrics import closed_spec, grade_closed, task_label_sets
from rega.io import read_jsonl, write_json, write_jsonl

log = logging.getLogger(__name__)

# SDFT's distillation template (Yang et al., 2024, appendix), sent as the user turn under p_c.
SDFT_TEMPLATE = (
    "Below is an instruction that describes a task, along with a reference answer. Using the reference answer "
    "as a guide, write your own response.\n\n### Instruction:\n{instruction}\n\n### Reference Answer:\n"
    "{reference}\n\n### Response:"
)
REWRITTEN = "rewritten.jsonl"


@dataclass
class RewriteConfig:
    """What to rewrite and how.

    Args:
        source: the domain records (with reference answers); empty: the ``data.corpus.domains`` of the fit
            configs given to ``python cli.py rewrite``.
        only_domains: rewrite only these domains (empty: all).
        output_dir: folder for prompts.jsonl, distill/, rewritten.jsonl and summary.json.
        model: the base model that rewrites (empty name: the fit configs' model).
        template: the rewrite prompt, with ``{instruction}`` (the user turn) and ``{reference}``.
        sampling: decoding of the rewrites (default: the self-distillation's temperature 0.7, top-p 0.95).
        batch_size: prompts per generation batch.
        max_prompt_tokens: longer rewrite prompts are not rewritten (their reference is kept).
    """

    source: list[DataSource] = field(default_factory=list)
    only_domains: list[str] = field(default_factory=list)
    output_dir: str = "runs/rewrite"
    model: ModelConfig = field(default_factory=ModelConfig)
    template: str = SDFT_TEMPLATE
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=256))
    batch_size: int = 16
    max_prompt_tokens: int = 2048

    def __post_init__(self) -> None:
        # plain dicts when built from YAML without the CLI's parser
        self.source = [DataSource(**s) if isinstance(s, dict) else s for s in self.source]
        if isinstance(self.model, dict):
            self.model = ModelConfig(**self.model)
        if isinstance(self.sampling, dict):
            self.sampling = SamplingConfig(**self.sampling)


def rewrite_prompt(record: Record, template: str) -> dict:
    """The instruction record the base model answers for ``record`` (same id)."""
    text = template.format(instruction=record.user_text, reference=record.output)
    return {"id": record.id, "instruction": text, "input": "", "lang": record.lang}


def usable(record: Record, text: str | None, labels) -> tuple[bool, str]:
    """Whether the rewrite ``text`` replaces the reference, and why (or why not)."""
    if text is None:
        return False, "not rewritten (dropped by the quality gates or prompt too long)"
    spec = closed_spec(record, labels.get((record.domain, record.task)))
    if spec is None:
        return True, "rewrite"
    pred, score = grade_closed(text, spec)
    return (
        (True, "rewrite, gold answer kept")
        if score == 1.0
        else (False, f"rewrite answers {pred!r}, gold {spec.gold!r}")
    )


def join_rewrites(records: list[Record], rewrites: dict[str, str], meta: dict) -> tuple[list[Record], dict]:
    """The records with usable rewrites as outputs (``meta.rewrite`` on each), and counts per task."""
    labels = task_label_sets(records)
    out, counts = [], Counter()
    for rec in records:
        ok, why = usable(rec, rewrites.get(rec.id), labels)
        counts[(rec.task, "rewrite" if ok else "reference")] += 1
        info = {**meta, "kept": "rewrite" if ok else "reference", "why": why}
        out.append(
            replace(
                rec, output=rewrites[rec.id] if ok else rec.output, meta={**(rec.meta or {}), "rewrite": info}
            )
        )
    per_task: dict[str, dict] = {}
    for (task, kept), n in sorted(counts.items()):
        per_task.setdefault(task, {"rewrite": 0, "reference": 0})[kept] = n
    return out, per_task


def run_rewrite(cfg: RewriteConfig) -> Path:
    """Rewrite the domain records of ``cfg`` and write ``rewritten.jsonl``; returns its path. Restartable: a rerun
    generates only the rewrites that are missing."""
    records = load_many(cfg.source).records
    if cfg.only_domains:
        records = [r for r in records if r.domain in cfg.only_domains]
    if not records:
        raise ConfigError("rewrite: the sources hold no domain records")
    out = Path(cfg.output_dir)
    write_jsonl(out / "prompts.jsonl", [rewrite_prompt(r, cfg.template) for r in records])
    distill = DistillConfig(
        source=[DataSource(path=str(out / "prompts.jsonl"))],
        output_dir=str(out / "distill"),
        model=cfg.model,
        sampling=cfg.sampling,
        batch_size=cfg.batch_size,
        max_prompt_tokens=cfg.max_prompt_tokens,
    )
    merged = run_distillation(distill)
    rewrites = {row["id"]: row["output"] for row in read_jsonl(merged)}
    meta = {"model": cfg.model.name_or_path, "sampling": vars(cfg.sampling), "method": "sdft"}
    rewritten, per_task = join_rewrites(records, rewrites, meta)
    write_jsonl(out / REWRITTEN, [r.to_dict() for r in rewritten])
    summary = {
        "records": len(records),
        "per_task": per_task,
        "distilled": str(merged),
        "output": str(out / REWRITTEN),
    }
    write_json(out / "summary.json", summary)
    log.info("rewrite: %s", json.dumps(per_task))
    return out / REWRITTEN


__all__ = ["RewriteConfig", "join_rewrites", "run_rewrite"]
