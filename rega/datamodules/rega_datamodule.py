"""REGADataModule: builds the strategy's corpus (running self-distillation first when it needs D_g and none is
given), renders every example with the model's chat template under its prompt, tokenizes with response-only labels,
caches the result on disk, and serves padding-free batches.

``prepare_data`` (once per node) does the expensive work and writes the cache; ``setup`` (every rank) rebuilds
the cheap corpus to derive the cache key and loads the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, DistributedSampler

from rega.data.chat import ChatFormat
from rega.data.corpus import Corpus, CorpusConfig, build_corpus, check_config
from rega.data.loaders import DataSource, load_many
from rega.data.prompts import CENTRAL, RolePrompts
from rega.data.strategies import ROLE, Example, as_examples, get_strategy
from rega.datamodules.tokenized import BatchDataset, TokenizedExamples, cache_file, plan_batches
from rega.distill.runner import MERGED, DistillConfig
from rega.io import stable_hash
from rega.modules.model import ModelConfig, load_tokenizer
from rega.paths import cache_dir

log = logging.getLogger(__name__)
CACHE_VERSION = 1  # bump when the tokenized format or rendering changes


class TrainerEpochSampler(DistributedSampler):
    """A seeded per-epoch shuffle (for one process too) that takes its epoch from the trainer when iterated.

    On resume Lightning creates the iterator before it restores the epoch and calls ``set_epoch``, which would
    replay epoch 0's order; reading ``trainer.current_epoch`` at the first draw keeps a resumed run on the
    uninterrupted run's order. Lightning leaves an existing DistributedSampler in place under DDP.
    """

    trainer = None

    def __iter__(self):
        # Lazy: the order is drawn at the first next(), after a resume has restored the trainer's epoch
        # (Lightning may create the iterator earlier, while estimating the number of steps).
        def indices():
            if self.trainer is not None:
                self.set_epoch(self.trainer.current_epoch)
            yield from super(TrainerEpochSampler, self).__iter__()

        return indices()


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
            distill: self-distillation settings, used when the strategy needs D_g and ``corpus.general`` is empty.
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
        self.strategy = self.corpus_config.strategy
        self.prompts: RolePrompts | None = None
        self.domains: list[str] = []
        self.train_data: TokenizedExamples | None = None
        self.val_data: TokenizedExamples | None = None
        self.manifest: dict = {}
        self._chat: ChatFormat | None = None

    # --- corpus -------------------------------------------------------------------------------------------
    def _needs_distillation(self) -> bool:
        return get_strategy(self.corpus_config.strategy).needs_general and not self.corpus_config.general

    def _distill_config(self) -> DistillConfig:
        # Distil with the model being trained: θ answers under its own p_c.
        return dataclasses.replace(self.distill_config, model=self.model_config)

    def _effective_corpus_config(self) -> CorpusConfig:
        if not self._needs_distillation():
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
        headline = get_strategy(self.strategy).inference[0]
        return as_examples(records, ROLE if headline == ROLE else CENTRAL, prompts, "domain")

    # --- tokenization and cache ---------------------------------------------------------------------------
    def _cache_key(self, examples: list[Example]) -> str:
        digest = hashlib.sha256()
        for ex in examples:
            digest.update(
                json.dumps([ex.system, ex.user_text, ex.output, ex.domain], ensure_ascii=False).encode()
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
            [(e.system, e.user_text, e.output) for e in examples], self.max_length
        )
        kept = [(e, enc) for e, enc in zip(examples, encoded) if enc is not None]
        lengths = np.array([len(enc.input_ids) for _, enc in kept], dtype=np.int64)
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
        if self._needs_distillation() and self.distill_config is not None:
            from rega.distill.runner import run_distillation

            # In this process: a multi-device distill config must not relaunch the training command per rank.
            run_distillation(self._distill_config(), in_process=True)
        self._load(create=True)

    def setup(self, stage: str | None = None) -> None:
        if self.train_data is None:
            self._load(create=False)

    def _load(self, create: bool) -> None:
        corpus = self.build_corpus()
        val = self.val_examples(corpus.prompts)
        self.prompts = corpus.prompts
        self.domains = sorted({e.domain for e in corpus.examples} | {e.domain for e in val})
        self.train_data = self._tokenized(corpus.examples, self.domains, create)
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

    # --- loaders ------------------------------------------------------------------------------------------
    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _loader(self, data: TokenizedExamples, mode: str, shuffle: bool) -> DataLoader:
        batches = plan_batches(data.lengths.tolist(), mode, self.batch_size, self.max_length, self.seed)
        dataset = BatchDataset(data, batches, self.chat.tokenizer.pad_token_id)
        world, rank = self._rank()
        sampler = TrainerEpochSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=self.seed)
        sampler.trainer = getattr(self, "trainer", None)
        return DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_data, self.batching, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_data is None:
            return []
        return self._loader(self.val_data, "grouped", shuffle=False)
