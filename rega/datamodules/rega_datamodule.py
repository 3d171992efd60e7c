"""REGADataModule: builds the strategy's corpus, renders every example with the model's chat template under its
prompt, tokenizes with response-only labels, caches the result on disk, and serves padding-free batches.

D_g is read from ``distill.output_dir`` when the strategy needs it and ``corpus.general`` is empty; producing it is
a stage of its own (``rega distill``, or ``rega fit`` itself before training when it runs as one process), never
work that one rank does while the others wait.

``prepare_data`` (once per node) does the expensive work and writes the cache; ``setup`` (every rank) rebuilds
the cheap corpus to derive the cache key and loads the cache. Training batches resume mid-epoch exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
from pathlib import Path

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, DistributedSampler

from rega.config import MERGED, DataSource, DistillConfig, ModelConfig
from rega.data.chat import ChatFormat
from rega.data.corpus import Corpus, CorpusConfig, build_corpus, check_config
from rega.data.loaders import load_many
from rega.data.prompts import CENTRAL, RolePrompts
from rega.data.strategies import ROLE, Example, as_examples, get_strategy
from rega.datamodules.tokenized import (
    EMPTY_BATCH,
    BatchDataset,
    TokenizedExamples,
    cache_file,
    host_counts,
    plan_batches,
    supervised_spans,
)
from rega.errors import ConfigError
from rega.io import stable_hash
from rega.model_source import load_tokenizer
from rega.paths import cache_dir

log = logging.getLogger(__name__)
CACHE_VERSION = 2  # bump when the tokenized format or rendering changes (2: supervised spans, conversations)


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
        val: list[DataSource] | None = None,
        distill: DistillConfig | None = None,
        model: ModelConfig | None = None,
        max_length: int = 512,
        batch_size: int = 8,
        batching: str = "packed",
        val_limit_per_task: int | None = 50,
        num_workers: int = 0,
        cache: str | None = None,
        seed: int = 1234,
    ):
        """
        Args:
            corpus: strategy, domain sets D_i, general set D_g, prompts, mix ratio r and seed.
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
            seed: seed of the batch plan and shuffling.
        """
        super().__init__()
        self.corpus_config = corpus or CorpusConfig()
        self.val_sources = list(val or [])
        self.distill_config = distill
        self.model_config = model or ModelConfig()
        self.max_length = max_length
        self.batch_size = batch_size
        self.batching = batching
        self.val_limit_per_task = val_limit_per_task
        self.num_workers = num_workers
        self.cache_root = Path(cache) if cache else cache_dir()
        self.seed = seed
        check_config(self._effective_corpus_config())  # fail at configuration time, not mid-run
        self._warn_if_distilled_by_another_model()
        self.strategy = self.corpus_config.strategy
        self.prompts: RolePrompts | None = None
        self.domains: list[str] = []
        self.train_data: TokenizedExamples | None = None
        self.val_data: TokenizedExamples | None = None
        self.manifest: dict = {}
        self._chat: ChatFormat | None = None
        self._resume: dict | None = None

    # --- corpus -------------------------------------------------------------------------------------------
    @property
    def pending_distillation(self) -> DistillConfig | None:
        """The distillation whose output this corpus reads as D_g, or None when it reads no distilled D_g."""
        needs = get_strategy(self.corpus_config.strategy).needs_general and not self.corpus_config.general
        return self.distill_config if needs else None

    def _warn_if_distilled_by_another_model(self) -> None:
        distill = self.pending_distillation
        if distill is not None and distill.model.name_or_path != self.model_config.name_or_path:
            log.warning(
                "D_g is distilled by %s but %s is trained: self-distillation means the trained model's own "
                "answers (set data.distill.model)", distill.model.name_or_path, self.model_config.name_or_path
            )  # fmt: skip

    def _effective_corpus_config(self) -> CorpusConfig:
        if self.pending_distillation is None:
            return self.corpus_config
        if self.distill_config is None:
            return self.corpus_config  # check_config reports the missing D_g
        path = Path(self.distill_config.output_dir) / MERGED
        return dataclasses.replace(self.corpus_config, general=[DataSource(path=str(path), domain="general")])

    @property
    def chat(self) -> ChatFormat:
        if self._chat is None:
            tokenizer = load_tokenizer(self.model_config)
            self._chat = ChatFormat(
                tokenizer, self.model_config.chat_template, self.model_config.system_placement
            )
        return self._chat

    def build_corpus(self) -> Corpus:
        return build_corpus(self._effective_corpus_config(), model_default_prompt=self.chat.default_system)

    def val_examples(self, prompts: RolePrompts) -> list[Example]:
        if not self.val_sources:
            return []
        records = load_many(self.val_sources).records
        if self.val_limit_per_task is not None:
            kept, seen = [], {}
            for rec in records:
                key = (rec.domain, rec.task)
                seen[key] = seen.get(key, 0) + 1
                if seen[key] <= self.val_limit_per_task:
                    kept.append(rec)
            records = kept
        rule = ROLE if get_strategy(self.strategy).inference[0] == ROLE else CENTRAL
        if rule == ROLE:  # e.g. single-domain FTRP: no role prompt for the other domains' validation sets
            unprompted = sorted({r.domain for r in records} - set(prompts.roles))
            if unprompted:
                log.warning("validation: no role prompt for %s (the corpus trains %s); left out",
                            ", ".join(unprompted), ", ".join(sorted(prompts.roles)))  # fmt: skip
                records = [r for r in records if r.domain in prompts.roles]
        return as_examples(records, rule, prompts, "domain")

    # --- tokenization and cache ---------------------------------------------------------------------------
    def _cache_key(self, examples: list[Example]) -> str:
        digest = hashlib.sha256()
        for ex in examples:
            # A conversation's earlier turns are part of what is tokenized; single-turn lines stay as they were.
            history = [[list(pair) for pair in ex.history]] if ex.history else []
            digest.update(
                json.dumps(
                    [ex.system, ex.user_text, ex.output, ex.domain, *history], ensure_ascii=False
                ).encode()
            )
        tok = self.chat.tokenizer
        return stable_hash(
            {
                "examples": digest.hexdigest(),
                "tokenizer": [tok.name_or_path, len(tok), getattr(tok, "chat_template", None)],
                "template": self.model_config.chat_template,
                "placement": self.model_config.system_placement,
                "max_length": self.max_length,
                "version": CACHE_VERSION,
            }
        )

    def tokenize(self, examples: list[Example], domains: list[str]) -> TokenizedExamples:
        index = {d: i for i, d in enumerate(domains)}
        encoded = self.chat.encode_many(
            [(e.system, e.user_text, e.output, e.history) for e in examples], self.max_length
        )
        kept = [(e, enc) for e, enc in zip(examples, encoded) if enc is not None]
        lengths = np.array([len(enc.input_ids) for _, enc in kept], dtype=np.int64)
        spans = [supervised_spans(enc.labels) for _, enc in kept]
        return TokenizedExamples(
            tokens=np.fromiter(
                (t for _, enc in kept for t in enc.input_ids), dtype=np.int32, count=int(lengths.sum())
            ),
            offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            prompt_lens=np.array([enc.labels.count(-100) for _, enc in kept], dtype=np.int32),
            domain_ids=np.array([index[e.domain] for e, _ in kept], dtype=np.int16),
            domains=domains,
            truncated=sum(enc.truncated for _, enc in kept),
            dropped=len(examples) - len(kept),
            spans=np.array([s for row in spans for s in row], dtype=np.int32).reshape(-1, 2),
            span_offsets=np.concatenate([[0], np.cumsum([len(row) for row in spans])]).astype(np.int64),
        )

    def _tokenized(self, examples: list[Example], domains: list[str], create: bool) -> TokenizedExamples:
        path = cache_file(self.cache_root, self._cache_key(examples))
        if path.exists():
            return TokenizedExamples.load(path)
        if not create:
            raise FileNotFoundError(f"tokenized cache {path} missing: prepare_data did not run on this node")
        data = self.tokenize(examples, domains)
        data.save(path)
        return data

    def prepare_data(self) -> None:
        self._load(create=True)

    def setup(self, stage: str | None = None) -> None:
        if self.train_data is None:
            self._load(create=False)

    def _load(self, create: bool) -> None:
        corpus = self.build_corpus()
        val = self.val_examples(corpus.prompts)
        self.prompts = corpus.prompts
        self.domains = sorted({e.domain for e in corpus.examples} | {e.domain for e in val})
        if not corpus.examples:
            raise ConfigError(
                f"strategy {self.strategy!r} builds no training examples; to score the base model use "
                "`python cli.py evaluate` without --adapter"
            )
        self.train_data = self._tokenized(corpus.examples, self.domains, create)
        if len(self.train_data) == 0:
            raise ConfigError(
                f"no training example fits data.max_length={self.max_length}: all {self.train_data.dropped} "
                "prompts leave no room for an answer (raise max_length)"
            )
        self.val_data = self._tokenized(val, self.domains, create) if val else None
        lengths = self.train_data.lengths
        self.manifest = {
            **corpus.manifest,
            "tokenized": {
                "examples": len(self.train_data),
                "tokens": int(lengths.sum()),
                "supervised_tokens": int(lengths.sum() - self.train_data.prompt_lens.sum()),
                "truncated": self.train_data.truncated,
                "dropped": self.train_data.dropped,
                "max_length": self.max_length,
            },
        }
        log.info(
            "corpus %s: %d examples, %d tokens (%d truncated, %d dropped)",
            self.strategy,
            len(self.train_data),
            int(lengths.sum()),
            self.train_data.truncated,
            self.train_data.dropped,
        )

    # --- exact resume ------------------------------------------------------------------------------------
    # Lightning checkpoints a data module's state_dict and restores it before training resumes. (Its own
    # mechanism for stateful loaders loads nothing once configure_optimizers has asked for the number of steps.)
    def state_dict(self) -> dict:
        """Where the running epoch stands: the batches the fit loop has started in it (the loader runs ahead)."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != "fit":
            return {}
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": trainer.current_epoch, "batches_done": progress.ready}

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

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        batch["host"] = host_counts(batch)  # counted before the batch moves to the GPU: no sync in the step
        return batch

    def _batches(self, data: TokenizedExamples, mode: str) -> BatchDataset:
        batches = plan_batches(data.lengths.tolist(), mode, self.batch_size, self.max_length, self.seed)
        return BatchDataset(data, batches, self.chat.tokenizer.pad_token_id)
