"""Build a strategy's training corpus from a config and write it with a manifest.

``rega corpus --config configs/data/shared_en.yaml --output runs/corpus`` writes ``corpus.jsonl`` (or
``corpus.arrow``) and ``manifest.json``: counts per kind/prompt/domain/task, |D_i| and |D'_i| per task, r, seed,
and a hash of every input. Both files are written into a temporary folder that then replaces the output folder in
one step, so a corpus and its manifest always belong together. A corpus that would train on nothing is an error
that names the sources that came up empty.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rega.config import DEFAULT_MIX_RATIO, DEFAULT_SEED, DataSource, ModelConfig
from rega.data.chat import ChatFormat
from rega.data.loaders import LoadReport, load_many
from rega.data.prompts import (
    PromptConfig,
    RolePrompts,
    load_prompt_table,
    prompts_provenance,
    resolve_prompts,
)
from rega.data.records import GENERAL, Record
from rega.data.strategies import INTEGRATED, CorpusInputs, Example, build_examples, get_strategy, task_groups
from rega.errors import ConfigError, EmptyDataError
from rega.io import (
    atomic_dir,
    atomic_write,
    check_output_dir,
    file_sha256,
    read_jsonl,
    write_json,
    write_jsonl,
)
from rega.model_source import load_tokenizer
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
        seed: seed of the D'_i draw; unset, the fit's seed (``seed_everything``), or 1234 for ``rega corpus``.
            Set it to keep one draw across training seeds.
        skip_invalid: count and report invalid rows instead of stopping at the first.
    """

    strategy: str = "rega"
    domains: list[DataSource] = field(default_factory=list)
    general: list[DataSource] = field(default_factory=list)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    only_domains: list[str] = field(default_factory=list)
    mix_ratio: float = DEFAULT_MIX_RATIO
    seed: int | None = None
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
    if config.prompts.write is not None:
        config.prompts.write.check()
    _, roles = load_prompt_table(config.prompts)
    named = {s.domain for s in config.domains if s.domain} | set(config.only_domains)
    missing = sorted(d for d in named if d not in roles)
    if missing and config.prompts.write is None:  # else the model writes them (a fit, before the corpus)
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
        loaded = sorted({r.domain for r in domain_report.records})
        domain_report.records = [r for r in domain_report.records if r.domain in config.only_domains]
        if loaded and not domain_report.records:
            raise EmptyDataError(
                f"only_domains {config.only_domains} keeps none of the loaded domains ({', '.join(loaded)})"
            )
    general_report = None
    if config.general:
        general_report = load_many(
            config.general, skip_invalid=config.skip_invalid, allowed_domains=frozenset({GENERAL})
        )
    check_not_empty(config, domain_report, general_report)
    return domain_report, general_report


def check_not_empty(config: CorpusConfig, domains: LoadReport, general: LoadReport | None) -> None:
    """A strategy that trains must get records; the error names every source that came up empty, and why."""
    spec = get_strategy(config.strategy)
    if spec.name != "zero_shot" and not domains.records:
        raise EmptyDataError(f"nothing to train on: no domain records ({'; '.join(domains.empty)})")
    if spec.needs_general and general is not None and not general.records:
        raise EmptyDataError(
            f"strategy {spec.name!r} needs self-distilled general data D_g, but the 'general' sources hold no "
            f"records ({'; '.join(general.empty)})"
        )


def task_sizes(domain_records: list[Record], examples: list[Example]) -> list[dict]:
    """|D_i| and |D'_i| of every (domain, task), zeros included."""
    integrated = Counter((e.domain, e.task) for e in examples if e.kind == INTEGRATED)
    return [
        {"domain": d, "task": t, "size": len(group), "integrated": integrated.get((d, t), 0)}
        for (d, t), group in sorted(task_groups(domain_records).items())
    ]


def build_corpus(config: CorpusConfig, model_default_prompt: str | None = None) -> Corpus:
    """Load, validate and tag: the corpus of ``config.strategy``. Deterministic for a given seed."""
    start = time.perf_counter()
    domain_report, general_report = load_inputs(config)
    domain_records: list[Record] = domain_report.records
    domains = sorted({r.domain for r in domain_records})
    prompts = resolve_prompts(config.prompts, domains, model_default_prompt)
    spec = get_strategy(config.strategy)
    seed = DEFAULT_SEED if config.seed is None else config.seed
    examples = build_examples(
        config.strategy,
        CorpusInputs(
            domain_records=domain_records,
            general_records=general_report.records if general_report else None,
            prompts=prompts,
            mix_ratio=config.mix_ratio,
            seed=seed,
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
        "seed": seed,
        "num_examples": len(examples),
        "counts": corpus_counts(examples),
        "source_sizes": {
            "domain": dict(Counter(f"{r.domain}/{r.task}" for r in domain_records)),
            "general": len(general_report.records) if general_report else 0,
        },
        "integrates": spec.integrates or any(e.kind == INTEGRATED for e in examples),
        "tasks": task_sizes(domain_records, examples),
        "empty_sources": domain_report.empty + (general_report.empty if general_report else []),
        "skipped_rows": domain_report.skipped + (general_report.skipped if general_report else []),
        # conversations whose own system message the strategy's prompt replaced (kept in their rows)
        "dropped_system": sum(1 for e in examples if e.dropped_system),
        "prompts": prompts.to_dict(),
        "inputs": {
            "domains": _input_fingerprint(config.domains),
            "general": _input_fingerprint(config.general),
        },
    }
    # role prompts written by `rega prompts`: model, k, seed, the items' ids, candidates and scores
    if provenance := prompts_provenance(config.prompts, domains):
        manifest["prompts_provenance"] = provenance
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


CORPUS_FILES = ("corpus.jsonl", "corpus.arrow", "manifest.json")


def write_corpus(corpus: Corpus, output: str | Path, fmt: str = "jsonl") -> Path:
    """Write ``corpus.<fmt>`` and ``manifest.json`` (with the corpus file's hash) into a temporary folder that
    replaces ``output`` in one step: a kill at any moment leaves the old pair or the new pair, never a mix."""
    if fmt not in ("jsonl", "arrow"):
        raise ConfigError(f"unknown corpus format {fmt!r} (jsonl or arrow)")
    out = check_output_dir(output, CORPUS_FILES, "a corpus")
    name = f"corpus.{fmt}"
    with atomic_dir(out) as tmp:
        if fmt == "jsonl":
            write_jsonl(tmp / name, (e.to_dict() for e in corpus.examples))
        else:
            import pyarrow as pa

            table = pa.Table.from_pylist([e.to_dict() for e in corpus.examples])
            with atomic_write(tmp / name, "wb") as handle, pa.ipc.new_file(handle, table.schema) as writer:
                writer.write_table(table)
        write_json(
            tmp / "manifest.json", {**corpus.manifest, "file": name, "sha256": file_sha256(tmp / name)}
        )
    return out / name


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise ConfigError(f"{path} not found: a corpus folder is what `rega corpus --output DIR` writes")
    return json.loads(path.read_text(encoding="utf-8"))


def read_corpus(folder: str | Path) -> Corpus:
    """The corpus a :func:`write_corpus` folder holds: its examples, the prompts they were tagged with, and its
    manifest (the file's hash is checked, so a corpus and its manifest always belong together)."""
    manifest = read_manifest(folder)
    path = Path(folder) / manifest["file"]
    if file_sha256(path) != manifest["sha256"]:
        raise ConfigError(f"{path} does not match the sha256 in its manifest.json: the folder was changed")
    if path.suffix == ".arrow":
        import pyarrow as pa

        with pa.memory_map(str(path)) as source:
            rows = pa.ipc.open_file(source).read_all().to_pylist()
    else:
        rows = read_jsonl(path)
    examples = [Example.from_dict(row) for row in rows]
    return Corpus(examples=examples, prompts=RolePrompts(**manifest["prompts"]), manifest=manifest)


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
    lines += task_table(manifest)
    if manifest["skipped_rows"]:
        lines.append(f"skipped invalid rows: {len(manifest['skipped_rows'])} (listed in manifest.json)")
    if manifest.get("dropped_system"):
        lines.append(
            f"own system messages replaced by the strategy's prompt: {manifest['dropped_system']} examples "
            "(each row keeps it as dropped_system)"
        )
    lines += [f"empty source: {why}" for why in manifest.get("empty_sources", [])]
    return "\n".join(lines)


def task_table(manifest: dict) -> list[str]:
    """|D_i| per task, and |D'_i| = round(r·|D_i|) (halves up) where the strategy integrates: zeros shown."""
    tasks = manifest.get("tasks", [])
    if not tasks:
        return []
    integrates = manifest.get("integrates", False)
    header = ("domain", "task", "|D_i|") + (("|D'_i|",) if integrates else ())
    cells = [header] + [
        (t["domain"], t["task"], str(t["size"])) + ((str(t["integrated"]),) if integrates else ())
        for t in tasks
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = [""]
    for n, row in enumerate(cells):
        lines.append(
            "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    if integrates and any(t["integrated"] == 0 for t in tasks):
        lines.append("tasks with |D'_i| = 0: r·|D_i| < 0.5 rounds to none (round half up)")
    return lines


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
    check_config(corpus)
    default = None
    if corpus.prompts.central is None:
        default = ChatFormat(load_tokenizer(ModelConfig(name_or_path=model))).default_system
    built = build_corpus(corpus, model_default_prompt=default)
    path = write_corpus(built, output, format)
    print(summary_table(built.manifest))
    print(f"wrote {path} and {Path(output) / 'manifest.json'}")
