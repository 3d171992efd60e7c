"""REGADataModule: turns a corpus and a tokenizer into batches. The corpus is built from its configuration (the
strategy's examples, :mod:`rega.data.corpus`) or read from a folder written by ``rega corpus`` (``corpus_dir``);
the tokenizer is the model's (its config is linked from the model's). Tokenization and batch planning live in
:mod:`rega.datamodules.tokenized`.

D_g is read from ``distill.output_dir`` when the strategy needs it and ``corpus.general`` is empty; producing it is
a stage of its own (``rega distill``, or ``rega fit`` itself before training when it runs as one process), never
work that one rank does while the others wait. So is the file of ``corpus.prompts.write`` (``rega prompts``, or
``rega fit`` before it starts its processes: :mod:`rega.distill.role_prompts`).

``prepare_data`` (once per node) builds the corpus once, tokenizes it into a cache keyed by its content, and
writes a small record, keyed by the configuration, naming those files; ``setup`` (every rank) reads the record
and the files without building anything. Training batches resume mid-epoch exactly.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from dataclasses import asdict, replace
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader, DistributedSampler

from rega.config import DEFAULT_SEED, MERGED, DataSource, DistillConfig, ModelConfig
from rega.data.chat import ChatFormat
from rega.data.corpus import Corpus, CorpusConfig, build_corpus, check_config, read_corpus, read_manifest
from rega.data.loaders import load_many
from rega.data.prompts import CENTRAL, RolePrompts, RolePromptWriting, prompts_file
from rega.data.records import GENERAL, Record
from rega.data.strategies import DOMAIN, ROLE, Example, as_examples, get_strategy
from rega.datamodules.contract import TrainingData
from rega.datamodules.tokenized import (
    CACHE_VERSION,
    EMPTY_BATCH,
    BatchDataset,
    TokenizedExamples,
    cache_file,
    domain_list,
    examples_key,
    plan_batches,
    tokenize,
    tokenizer_identity,
)
from rega.errors import ConfigError
from rega.io import stable_hash, write_json
from rega.model_source import load_tokenizer
from rega.paths import cache_dir, resolve_path

log = logging.getLogger(__name__)


class TrainerEpochSampler(DistributedSampler):
    """A seeded per-epoch shuffle (for one process too) that takes its epoch from the trainer when iterated, and
    skips the batches that a resumed epoch trained on before its checkpoint.

    On resume Lightning creates the iterator before it restores the epoch and calls ``set_epoch``, which would
    replay epoch 0's order; reading ``trainer.current_epoch`` at the first draw keeps a resumed run on the
    uninterrupted run's order. Lightning leaves an existing DistributedSampler in place under DDP.
    """

    datamodule = None  # the REGADataModule, whose checkpointed state says where a resumed epoch stopped

    def __iter__(self):
        # Lazy: the order is drawn at the first next(), after a resume has restored the trainer's epoch
        # (Lightning may create the iterator earlier, while estimating the number of steps).
        def indices():
            skip = 0
            if self.datamodule is not None and self.datamodule.trainer is not None:
                epoch = self.datamodule.trainer.current_epoch
                self.set_epoch(epoch)
                skip = self.datamodule.batches_to_skip(epoch)
                self.datamodule.epoch_started(epoch, skip)
            yield from itertools.islice(super(TrainerEpochSampler, self).__iter__(), skip, None)

        return indices()


class ShardedEvalSampler(DistributedSampler):
    """Rank r takes batches r, r + world, ...: every batch once (DistributedSampler repeats some to even the
    ranks out, which would count them twice in the metrics). Ranks with fewer batches get index -1, an empty
    batch, so that all ranks run the same number of forwards (FSDP gathers weights in each)."""

    def __iter__(self):
        mine = list(range(self.rank, len(self.dataset), self.num_replicas))
        return iter(mine + [EMPTY_BATCH] * (len(self) - len(mine)))

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.num_replicas)


class REGADataModule(L.LightningDataModule):
    def __init__(
        self,
        corpus: CorpusConfig | None = None,
        corpus_dir: str | None = None,
        val: list[DataSource] | None = None,
        distill: DistillConfig | None = None,
        model: ModelConfig | None = None,
        max_length: int = 512,
        batch_size: int = 8,
        batching: str = "packed",
        val_limit_per_task: int | None = 50,
        num_workers: int = 0,
        cache: str | None = None,
        seed: int = DEFAULT_SEED,
    ):
        """
        Args:
            corpus: strategy, domain sets D_i, general set D_g, prompts, mix ratio r and seed.
            corpus_dir: instead of ``corpus``, a folder written by ``rega corpus`` (``corpus.jsonl`` or
                ``corpus.arrow`` with ``manifest.json``): trains on exactly those examples, under the prompts
                and strategy its manifest records.
            val: dev sets for validation loss (logged per domain), rendered with the strategy's inference prompt.
            distill: self-distillation settings (or a distill YAML file: one file for ``rega distill`` and fit); D_g
                is its ``output_dir``, read when the strategy needs D_g and ``corpus.general`` is empty.
            model: the model whose tokenizer and chat template render the data (linked from the model's config).
            max_length: longest example in tokens; longer responses are cut, prompts are kept whole.
            batch_size: rows per batch (per device).
            batching: ``packed`` (several examples per row, isolated, almost no padding), ``grouped`` (one example
                per row, similar lengths together) or ``padded`` (one example per row, random order).
            val_limit_per_task: validation examples per task (first N), to keep validation cheap.
            num_workers: DataLoader worker processes.
            cache: folder for tokenized datasets (default ``$REGA_CACHE``).
            seed: the fit's (``seed_everything``): batch plan, shuffling, the corpus draw unless corpus.seed is set.
        """
        super().__init__()
        if corpus is not None and corpus_dir is not None:
            raise ConfigError(
                "data.corpus and data.corpus_dir both set: give the corpus's config or its folder"
            )
        self.model_config = model or ModelConfig()
        self.corpus_config = with_fit_defaults(corpus or CorpusConfig(), seed, self.model_config)
        self.corpus_dir = Path(corpus_dir) if corpus_dir is not None else None
        self.val_sources = list(val or [])
        self.distill_config = distill
        self.max_length, self.batch_size, self.batching, self.seed = max_length, batch_size, batching, seed
        self.val_limit_per_task = val_limit_per_task
        self.num_workers = num_workers
        self.cache_root = Path(cache) if cache else cache_dir()
        if self.corpus_dir is None:
            check_config(self._effective_corpus_config())  # fail at configuration time, not mid-run
            self._warn_if_distilled_by_another_model()
        self.strategy = (
            read_manifest(self.corpus_dir)["strategy"] if self.corpus_dir else self.corpus_config.strategy
        )
        self._chat: ChatFormat | None = None
        self._resume: dict | None = None
        # (epoch, optimizer steps done before its first batch): what a checkpoint's progress is counted from
        self._epoch_start: tuple[int, int] | None = None
        self._adopt(None, None, [], None, {})  # set by prepare_data or setup

    # --- corpus -------------------------------------------------------------------------------------------
    @property
    def pending_distillation(self) -> DistillConfig | None:
        """The distillation whose output this corpus reads as D_g, or None when it reads no distilled D_g."""
        if self.corpus_dir is not None:
            return None
        needs = get_strategy(self.corpus_config.strategy).needs_general and not self.corpus_config.general
        return self.distill_config if needs else None

    @property
    def pending_role_prompts(self) -> RolePromptWriting | None:
        """How the prompts file this corpus reads is written (``corpus.prompts.write``, model filled in), or None."""
        return None if self.corpus_dir is not None else self.corpus_config.prompts.write

    def _warn_if_distilled_by_another_model(self) -> None:
        distill = self.pending_distillation
        if distill is not None and distill.model.name_or_path != self.model_config.name_or_path:
            log.warning(
                "D_g is distilled by %s but %s is trained: self-distillation means the trained model's own "
                "answers (set data.distill.model)", distill.model.name_or_path, self.model_config.name_or_path
            )  # fmt: skip

    def _effective_corpus_config(self) -> CorpusConfig:
        """The corpus config with D_g pointed at the distillation's output when the strategy reads it from there."""
        if self.pending_distillation is None:
            return self.corpus_config
        path = Path(self.distill_config.output_dir) / MERGED
        return replace(self.corpus_config, general=[DataSource(path=str(path), domain=GENERAL)])

    @property
    def chat(self) -> ChatFormat:
        if self._chat is None:
            tokenizer = load_tokenizer(self.model_config)
            self._chat = ChatFormat(
                tokenizer, self.model_config.chat_template, self.model_config.system_placement
            )
        return self._chat

    def build_corpus(self) -> Corpus:
        if self.corpus_dir is not None:
            return read_corpus(self.corpus_dir)
        return build_corpus(self._effective_corpus_config(), model_default_prompt=self.chat.default_system)

    def val_examples(self, prompts: RolePrompts) -> list[Example]:
        if not self.val_sources:
            return []
        records = first_per_task(load_many(self.val_sources).records, self.val_limit_per_task)
        rule = ROLE if get_strategy(self.strategy).inference[0] == ROLE else CENTRAL
        if rule == ROLE:  # e.g. single-domain FTRP: no role prompt for the other domains' validation sets
            unprompted = sorted({r.domain for r in records} - set(prompts.roles))
            if unprompted:
                log.warning("validation: no role prompt for %s (the corpus trains %s); left out",
                            ", ".join(unprompted), ", ".join(sorted(prompts.roles)))  # fmt: skip
                records = [r for r in records if r.domain in prompts.roles]
        return as_examples(records, rule, prompts, DOMAIN)

    # --- prepare once, set up on every rank ----------------------------------------------------------------
    def record_key(self) -> str:
        """Everything the prepared data depends on that is known before building the corpus: the configuration,
        the size and time of its local input files, the tokenizer and the cut."""
        corpus = (
            {"dir": str(self.corpus_dir.resolve())}
            if self.corpus_dir
            else asdict(self._effective_corpus_config())
        )
        sources = self._input_sources()
        return stable_hash(
            {
                "corpus": corpus,
                "inputs": [file_stamp(source) for source in sources],
                "val": [asdict(s) for s in self.val_sources],
                "val_limit": self.val_limit_per_task,
                **tokenizer_identity(self.chat),
                "max_length": self.max_length,
                "version": CACHE_VERSION,
            }
        )

    def _input_sources(self) -> list[str]:
        if self.corpus_dir is not None:
            return [str(self.corpus_dir / name) for name in ("manifest.json", "corpus.jsonl", "corpus.arrow")]
        config = self._effective_corpus_config()
        prompts = prompts_file(config.prompts)  # a file rewritten (prompts.write, by hand) is another input
        sources = [s.path for s in [*config.domains, *config.general, *self.val_sources]]
        return sources + ([str(prompts)] if prompts else [])

    def _record_path(self) -> Path:
        return self.cache_root / "prepared" / f"{self.record_key()}.json"

    def prepare_data(self) -> None:
        corpus = self.build_corpus()
        val = self.val_examples(corpus.prompts)
        domains = domain_list(corpus.examples, val)
        if not corpus.examples:
            raise ConfigError(
                f"strategy {self.strategy!r} builds no training examples; to score the base model use "
                "`python cli.py evaluate` without --adapter"
            )
        train_key, train = self._tokenized(corpus.examples, domains)
        val_key, val_data = self._tokenized(val, domains) if val else (None, None)
        manifest = {**corpus.manifest, "tokenized": self._tokenized_stats(train)}
        record = {"train": train_key, "val": val_key, "domains": domains, "prompts": corpus.prompts.to_dict()}
        write_json(self._record_path(), {**record, "manifest": manifest})
        self._adopt(train, val_data, domains, corpus.prompts, manifest)

    def setup(self, stage: str | None = None) -> None:
        if self.train_data is not None:
            return
        path = self._record_path()
        if not path.exists():
            raise FileNotFoundError(f"prepared data {path} missing: prepare_data did not run on this node")
        record = json.loads(path.read_text(encoding="utf-8"))
        train = TokenizedExamples.load(cache_file(self.cache_root, record["train"]))
        val = TokenizedExamples.load(cache_file(self.cache_root, record["val"])) if record["val"] else None
        self._adopt(train, val, record["domains"], RolePrompts(**record["prompts"]), record["manifest"])

    def _tokenized(self, examples: list[Example], domains: list[str]) -> tuple[str, TokenizedExamples]:
        """The examples' tokenized file (content-addressed: reused by any run that renders the same tokens)."""
        key = examples_key(self.chat, examples, domains, self.max_length)
        path = cache_file(self.cache_root, key)
        if path.exists():
            return key, TokenizedExamples.load(path)
        data = tokenize(self.chat, examples, domains, self.max_length)
        data.save(path)
        return key, data

    def _tokenized_stats(self, train: TokenizedExamples) -> dict:
        if len(train) == 0:
            raise ConfigError(
                f"no training example fits data.max_length={self.max_length}: all {train.dropped} "
                "prompts leave no room for an answer (raise max_length)"
            )
        return {
            "examples": len(train),
            "tokens": int(train.lengths.sum()),
            "supervised_tokens": train.supervised_tokens,
            "truncated": train.truncated,
            "dropped": train.dropped,
            "max_length": self.max_length,
        }

    def _adopt(self, train, val, domains: list[str], prompts: RolePrompts | None, manifest: dict) -> None:
        self.train_data: TokenizedExamples | None = train
        self.val_data: TokenizedExamples | None = val
        self.domains, self.prompts, self.manifest = domains, prompts, manifest
        if train is None:
            return
        tokens = manifest["tokenized"]
        log.info("corpus %s: %d examples, %d tokens (%d truncated, %d dropped)",
                 self.strategy, tokens["examples"], tokens["tokens"], tokens["truncated"], tokens["dropped"])  # fmt: skip

    def training_data(self) -> TrainingData:
        """What the module, its loss terms and the evaluation callback need of this data (set up first)."""
        integrates = get_strategy(self.strategy).integrates
        return TrainingData(
            domains=tuple(self.domains), strategy=self.strategy, prompts=self.prompts, batch_size=self.batch_size,
            corpus_counts=self.manifest.get("counts", {}).get("by_kind"), tokenized=self.manifest.get("tokenized"),
            mix_ratio=self.manifest.get("mix_ratio") if integrates else None, corpus_seed=self.manifest.get("seed"),
        )  # fmt: skip

    # --- exact resume ------------------------------------------------------------------------------------
    # Lightning checkpoints a data module's state_dict and restores it before training resumes. (Its own
    # mechanism for stateful loaders loads nothing once configure_optimizers has asked for the number of steps.)
    def state_dict(self) -> dict:
        """Where the running epoch stands: its batches whose optimizer step has completed. REGAModule steps once
        per batch, so these are the optimizer steps (``trainer.global_step``) since the epoch began; neither the
        batches fetched (the loader runs ahead) nor those started (a step a signal interrupts) count."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != "fit":
            return {}
        epoch, start = self._epoch_start or (None, 0)
        done = trainer.global_step - start if epoch == trainer.current_epoch else 0
        return {"epoch": trainer.current_epoch, "batches_done": done}

    def epoch_started(self, epoch: int, skipped: int) -> None:
        """The sampler drew ``epoch``'s order; ``skipped`` of its batches were trained before a resume."""
        self._epoch_start = (epoch, self.trainer.global_step - skipped)

    def load_state_dict(self, state: dict) -> None:
        self._resume = dict(state)

    def batches_to_skip(self, epoch: int) -> int:
        """Batches of ``epoch`` trained before the checkpoint this run resumed from (once; then 0)."""
        resume, self._resume = self._resume, None
        return resume["batches_done"] if resume and resume.get("epoch") == epoch else 0

    # --- loaders ------------------------------------------------------------------------------------------
    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def train_dataloader(self) -> DataLoader:
        world, rank = self._rank()
        dataset = self._batches(self.train_data, self.batching)
        sampler = TrainerEpochSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed)
        sampler.datamodule = self
        return DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_data is None:
            return []
        world, rank = self._rank()
        dataset = self._batches(self.val_data, "grouped")
        sampler = ShardedEvalSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=self.num_workers)

    def _batches(self, data: TokenizedExamples, mode: str) -> BatchDataset:
        batches = plan_batches(data.lengths.tolist(), mode, self.batch_size, self.max_length, self.seed)
        return BatchDataset(data, batches, self.chat.tokenizer.pad_token_id)


def with_fit_defaults(corpus: CorpusConfig, seed: int, model: ModelConfig) -> CorpusConfig:
    """The corpus config with what it leaves to the fit filled in: the draw's seed (the fit's) and the model that
    writes the role prompts (the trained one), with their language (``prompts.lang``)."""
    corpus, prompts = corpus if corpus.seed is not None else replace(corpus, seed=seed), corpus.prompts
    write = prompts.write.filled(prompts.lang, model) if prompts.write else None
    return replace(corpus, prompts=replace(prompts, write=write)) if write else corpus


def first_per_task(records: list[Record], limit: int | None) -> list[Record]:
    """The first ``limit`` records of each (domain, task), in order; all of them without a limit."""
    if limit is None:
        return records
    seen: dict[tuple[str, str], int] = {}
    kept = []
    for rec in records:
        key = (rec.domain, rec.task)
        seen[key] = seen.get(key, 0) + 1
        if seen[key] <= limit:
            kept.append(rec)
    return kept


def file_stamp(path: str) -> list | None:
    """Size and modification time of a local input file (None for hub datasets and missing files): a record
    written for other contents of the same files is not reused."""
    resolved = resolve_path(path)
    if not resolved.is_file():
        return None
    stat = resolved.stat()
    return [str(resolved), stat.st_size, stat.st_mtime_ns]
