"""Build a strategy's training corpus from a config and write it with a manifest.

``rega corpus --config configs/data/shared_en.yaml --output runs/corpus`` writes ``corpus.jsonl`` (or
``corpus.arrow``) and ``manifest.json``: counts per kind/prompt/domain/task, r, seed, and a hash of every input.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rega.data.loaders import DataSource, LoadReport, load_many
from rega.data.prompts import ConfigError, PromptConfig, RolePrompts, load_prompt_table, resolve_prompts
from rega.data.records import GENERAL, Record
from rega.data.strategies import CorpusInputs, Example, build_examples, get_strategy
from rega.io import atomic_write, file_sha256, write_json, write_jsonl
from rega.paths import resolve_path

log = logging.getLogger(__name__)


@dataclass
class CorpusConfig:
    """What goes into a training corpus.

    Args:
        strategy: a registered strategy: zero_shot, ft, ftsd, ftrp, rega (or your own).
        domains: the domain sets D_i; each source names its domain (or its rows do).
        general: the self-distilled general set D_g (needed by ftsd and rega).
        prompts: the central prompt p_c and the role prompts p_i.
        only_domains: keep only these domains (single-domain variants, e.g. ``[medical]``); empty keeps all.
        mix_ratio: r, the share of each task of D_i added again under p_c (role integration).
        seed: seed of the D'_i draw.
        skip_invalid: count and report invalid rows instead of stopping at the first.
    """

    strategy: str = "rega"
    domains: list[DataSource] = field(default_factory=list)
    general: list[DataSource] = field(default_factory=list)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    only_domains: list[str] = field(default_factory=list)
    mix_ratio: float = 0.1
    seed: int = 1234
    skip_invalid: bool = False


@dataclass
class Corpus:
    examples: list[Example]
    prompts: RolePrompts
    manifest: dict


def check_config(config: CorpusConfig) -> None:
    """Everything that can be checked before reading data: strategy, r, D_g presence, prompts of named domains."""
    spec = get_strategy(config.strategy)
    if not 0.0 <= config.mix_ratio <= 1.0:
        raise ConfigError(f"mix_ratio must be within [0, 1], got {config.mix_ratio}")
    if spec.needs_general and not config.general:
        raise ConfigError(
            f"strategy {config.strategy!r} needs self-distilled general data D_g: set 'general'"
        )
    if spec.name != "zero_shot" and not config.domains:
        raise ConfigError(f"strategy {config.strategy!r} needs at least one domain source under 'domains'")
    _, roles = load_prompt_table(config.prompts)
    named = {s.domain for s in config.domains if s.domain} | set(config.only_domains)
    missing = sorted(d for d in named if d not in roles)
    if missing:
        raise ConfigError(f"no role prompt for domain(s) {', '.join(missing)}: add them under prompts.roles")


def _input_fingerprint(sources: list[DataSource]) -> list[dict]:
    out = []
    for src in sources:
        path = resolve_path(src.path)
        digest = file_sha256(path) if path.is_file() else None  # hub ids and folders: recorded by name
        out.append({**asdict(src), "resolved": str(path), "sha256": digest})
    return out


def load_inputs(config: CorpusConfig) -> tuple[LoadReport, LoadReport | None]:
    check_config(config)
    _, roles = load_prompt_table(config.prompts)
    allowed = frozenset(roles) | {s.domain for s in config.domains if s.domain}
    domain_report = load_many(config.domains, skip_invalid=config.skip_invalid, allowed_domains=allowed)
    if config.only_domains:
        domain_report.records = [r for r in domain_report.records if r.domain in config.only_domains]
    general_report = None
    if config.general:
        general_report = load_many(
            config.general, skip_invalid=config.skip_invalid, allowed_domains=frozenset({GENERAL})
        )
    return domain_report, general_report


def build_corpus(config: CorpusConfig, model_default_prompt: str | None = None) -> Corpus:
    """Load, validate and tag: the corpus of ``config.strategy``. Deterministic for a given seed."""
    start = time.perf_counter()
    domain_report, general_report = load_inputs(config)
    domain_records: list[Record] = domain_report.records
    domains = sorted({r.domain for r in domain_records})
    prompts = resolve_prompts(config.prompts, domains, model_default_prompt)
    spec = get_strategy(config.strategy)
    examples = build_examples(
        config.strategy,
        CorpusInputs(
            domain_records=domain_records,
            general_records=general_report.records if general_report else None,
            prompts=prompts,
            mix_ratio=config.mix_ratio,
            seed=config.seed,
        ),
    )
    ids = Counter(e.id for e in examples)
    clash = [i for i, n in ids.items() if n > 1]
    if clash:
        raise ConfigError(
            f"example id {clash[0]!r} occurs {ids[clash[0]]} times: D_g and D_i ids must not overlap"
        )
    manifest = {
        "strategy": spec.name,
        "inference": list(spec.inference),
        "mix_ratio": config.mix_ratio,
        "seed": config.seed,
        "num_examples": len(examples),
        "counts": corpus_counts(examples),
        "source_sizes": {
            "domain": dict(Counter(f"{r.domain}/{r.task}" for r in domain_records)),
            "general": len(general_report.records) if general_report else 0,
        },
        "skipped_rows": domain_report.skipped + (general_report.skipped if general_report else []),
        "prompts": prompts.to_dict(),
        "inputs": {
            "domains": _input_fingerprint(config.domains),
            "general": _input_fingerprint(config.general),
        },
    }
    log.info("built %d %s examples in %.2f s", len(examples), spec.name, time.perf_counter() - start)
    return Corpus(examples=examples, prompts=prompts, manifest=manifest)


def corpus_counts(examples: list[Example]) -> dict:
    by = Counter((e.kind, e.prompt, e.domain, e.task) for e in examples)
    return {
        "by_kind": dict(Counter(e.kind for e in examples)),
        "by_prompt": dict(Counter(e.prompt for e in examples)),
        "by_domain": dict(Counter(e.domain for e in examples)),
        "rows": [
            {"kind": k, "prompt": p, "domain": d, "task": t, "count": n}
            for (k, p, d, t), n in sorted(by.items())
        ],
    }


def write_corpus(corpus: Corpus, output: str | Path, fmt: str = "jsonl") -> Path:
    """Write ``corpus.<fmt>`` then ``manifest.json`` (with the corpus file's hash), each atomically."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        path = out / "corpus.jsonl"
        write_jsonl(path, (e.to_dict() for e in corpus.examples))
    elif fmt == "arrow":
        import pyarrow as pa

        path = out / "corpus.arrow"
        table = pa.Table.from_pylist([e.to_dict() for e in corpus.examples])
        with atomic_write(path, "wb") as handle, pa.ipc.new_file(handle, table.schema) as writer:
            writer.write_table(table)
    else:
        raise ConfigError(f"unknown corpus format {fmt!r} (jsonl or arrow)")
    write_json(out / "manifest.json", {**corpus.manifest, "file": path.name, "sha256": file_sha256(path)})
    return path


def summary_table(manifest: dict) -> str:
    rows = manifest["counts"]["rows"]
    header = ("kind", "prompt", "domain", "task", "count")
    cells = [header] + [tuple(str(r[h]) for h in header) for r in rows]
    cells.append(("total", "", "", "", str(manifest["num_examples"])))
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = [f"strategy={manifest['strategy']}  r={manifest['mix_ratio']}  seed={manifest['seed']}"]
    for n, row in enumerate(cells):
        lines.append(
            "  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        )
        if n == 0 or n == len(cells) - 2:
            lines.append("  ".join("-" * w for w in widths))
    if manifest["skipped_rows"]:
        lines.append(f"skipped invalid rows: {len(manifest['skipped_rows'])} (listed in manifest.json)")
    return "\n".join(lines)


def corpus_command(
    corpus: CorpusConfig, output: str = "runs/corpus", format: str = "jsonl", model: str = "embedded"
):
    """Build the training corpus of a strategy and write it with manifest.json.

    Args:
        corpus: the corpus configuration (strategy, domains, general, prompts, mix_ratio, seed).
        output: output folder for corpus.<format> and manifest.json.
        format: jsonl or arrow.
        model: model whose default system prompt is p_c when ``prompts.central`` is unset (``embedded``, a
            folder or hub id); only its tokenizer is loaded.
    """
    config = corpus
    from rega.data.chat import ChatFormat
    from rega.modules.model import ModelConfig, load_tokenizer

    check_config(config)
    default = None
    if config.prompts.central is None:
        default = ChatFormat(load_tokenizer(ModelConfig(name_or_path=model))).default_system
    built = build_corpus(config, model_default_prompt=default)
    path = write_corpus(built, output, format)
    print(summary_table(built.manifest))
    print(f"wrote {path} and {Path(output) / 'manifest.json'}")
    return None
