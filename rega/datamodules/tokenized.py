"""Examples tokenized with the model's chat template, stored flat (one int32 token array plus offsets), cached on
disk, and batched without wasting compute on padding.

Labels have one form from the chat format to the batch: the supervised ``[start, end)`` spans of each example
(its answers). They are stored flat (``spans``, int32, k x 2) with ``span_offsets`` (int64, n+1) saying which
are whose: one span for a single-turn example, one per assistant turn for a conversation. A batch's label tensor
holds the example's own ids on its spans and IGNORE_INDEX elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from rega.data.chat import IGNORE_INDEX, ChatFormat
from rega.data.strategies import Example
from rega.io import atomic_write, stable_hash

# Bump when the tokenized format or rendering changes (2: supervised spans, conversations; 3: spans only).
CACHE_VERSION = 3
NO_DOMAIN = -1  # token_domain of padding


@dataclass
class TokenizedExamples:
    tokens: np.ndarray  # int32, all examples concatenated
    offsets: np.ndarray  # int64, len n+1
    spans: np.ndarray  # int32 (k, 2): the supervised [start, end) runs within an example
    # int64, len n+1: example i's spans are spans[span_offsets[i] : span_offsets[i+1]]
    span_offsets: np.ndarray
    domain_ids: np.ndarray  # int16, index into `domains`
    domains: list[str]
    truncated: int = 0  # responses cut to fit max_length
    dropped: int = 0  # examples whose prompt left no room for an answer

    def label_spans(self, i: int) -> np.ndarray:
        return self.spans[self.span_offsets[i] : self.span_offsets[i + 1]]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def supervised_tokens(self) -> int:
        return int((self.spans[:, 1] - self.spans[:, 0]).sum())

    def ids(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def save(self, path: Path) -> None:
        """One .npz written atomically; plain arrays only (domain names as fixed-width unicode, not objects), so
        :meth:`load` never needs pickle."""
        with atomic_write(path, "wb") as handle:
            np.savez(
                handle,
                tokens=self.tokens,
                offsets=self.offsets,
                spans=self.spans,
                span_offsets=self.span_offsets,
                domain_ids=self.domain_ids,
                domains=np.array(self.domains, dtype=np.str_),
                stats=np.array([self.truncated, self.dropped]),
            )

    @classmethod
    def load(cls, path: Path) -> TokenizedExamples:
        with np.load(path, allow_pickle=False) as data:
            truncated, dropped = (int(x) for x in data["stats"])
            arrays = {
                name: data[name] for name in ("tokens", "offsets", "spans", "span_offsets", "domain_ids")
            }
            return cls(
                **arrays, domains=[str(d) for d in data["domains"]], truncated=truncated, dropped=dropped
            )


def flat_offsets(sizes: Sequence[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def tokenize(
    chat: ChatFormat, examples: list[Example], domains: list[str], max_length: int
) -> TokenizedExamples:
    """Render and tokenize ``examples``; those whose prompt leaves no room for an answer are dropped (counted)."""
    index = {d: i for i, d in enumerate(domains)}
    encoded = chat.encode_many([(e.system, e.user_text, e.output, e.history) for e in examples], max_length)
    kept = [(e, enc) for e, enc in zip(examples, encoded) if enc is not None]
    lengths = [len(enc.input_ids) for _, enc in kept]
    return TokenizedExamples(
        tokens=np.fromiter((t for _, enc in kept for t in enc.input_ids), dtype=np.int32, count=sum(lengths)),
        offsets=flat_offsets(lengths),
        spans=np.array([s for _, enc in kept for s in enc.spans], dtype=np.int32).reshape(-1, 2),
        span_offsets=flat_offsets([len(enc.spans) for _, enc in kept]),
        domain_ids=np.array([index[e.domain] for e, _ in kept], dtype=np.int16),
        domains=domains,
        truncated=sum(enc.truncated for _, enc in kept),
        dropped=len(examples) - len(kept),
    )


def domain_list(*example_sets: list[Example]) -> list[str]:
    """The sorted domains of a run's training and validation examples: what ``domain_ids`` index."""
    return sorted({e.domain for examples in example_sets for e in examples})


def examples_key(chat: ChatFormat, examples: list[Example], domains: list[str], max_length: int) -> str:
    """What a tokenized file depends on: each example's rendered fields, the tokenizer and template, the cut, and
    the domain list its ``domain_ids`` index (the same validation set is indexed differently by a corpus with a
    general domain and by one without)."""
    digest = hashlib.sha256()
    for ex in examples:
        # A conversation's earlier turns are part of what is tokenized; single-turn lines stay as they were.
        history = [[list(pair) for pair in ex.history]] if ex.history else []
        digest.update(
            json.dumps([ex.system, ex.user_text, ex.output, ex.domain, *history], ensure_ascii=False).encode()
        )
    identity = tokenizer_identity(chat)
    return stable_hash(
        {
            "examples": digest.hexdigest(),
            "domains": list(domains),
            **identity,
            "max_length": max_length,
            "version": CACHE_VERSION,
        }
    )


def tokenizer_identity(chat: ChatFormat) -> dict:
    """The tokenizer and how the chat format uses it: what makes the same text tokenize differently."""
    tok = chat.tokenizer
    return {
        "tokenizer": [tok.name_or_path, len(tok), getattr(tok, "chat_template", None)],
        "template": chat.template,
        "placement": chat.system_placement,
    }


def pack_rows(lengths: Sequence[int], row_tokens: int) -> list[list[int]]:
    """First-fit-decreasing bin packing of examples into rows of at most ``row_tokens`` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        # Rows fill in order, so scanning from the newest keeps this near-linear for similar lengths.
        for r in range(len(rows) - 1, max(-1, len(rows) - 64), -1):
            if room[r] >= n:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(row_tokens - n)
    return rows


def plan_batches(
    lengths: Sequence[int], mode: str, batch_size: int, max_length: int, seed: int
) -> list[list[list[int]]]:
    """Group example indices into batches; each batch is a list of rows, each row a list of example indices.

    * ``packed``: examples packed into rows of ``max_length`` tokens, ``batch_size`` rows per batch; rows hold
      several examples that cannot attend to each other (position ids restart), so almost nothing is padding.
    * ``grouped``: one example per row, examples of similar length batched together (sorted within shuffled
      mega-batches, like HF's ``group_by_length``).
    * ``padded``: one example per row in random order (the plain baseline).
    """
    rng = np.random.default_rng(seed)
    if mode == "packed":
        rows = pack_rows(list(lengths), max_length)
        rows = [rows[i] for i in rng.permutation(len(rows))]
    elif mode in ("grouped", "padded"):
        order = rng.permutation(len(lengths)).tolist()
        if mode == "grouped":
            mega = batch_size * 50
            order = [
                i
                for start in range(0, len(order), mega)
                for i in sorted(order[start : start + mega], key=lambda i: -lengths[i])
            ]
        rows = [[i] for i in order]
    else:
        raise ValueError(f"unknown batching mode {mode!r} (packed, grouped or padded)")
    return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]


EMPTY_BATCH = -1  # BatchDataset index of a batch that contributes no loss


class BatchDataset(Dataset):
    """A map-style dataset whose items are whole batches, so a (Distributed)Sampler shards and shuffles batches."""

    def __init__(self, data: TokenizedExamples, batches: list[list[list[int]]], pad_id: int):
        self.data, self.batches, self.pad_id = data, batches, pad_id

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index == EMPTY_BATCH:  # a stand-in that keeps ranks in step: the first batch with nothing to score
            batch = collate_rows(self.data, self.batches[0], self.pad_id)
            batch["labels"].fill_(IGNORE_INDEX)
            return batch
        return collate_rows(self.data, self.batches[index], self.pad_id)


def collate_rows(data: TokenizedExamples, rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Build one batch. Position ids restart at every example, which is what isolates packed examples.

    Rows with one example each also get an attention mask (padding); packed rows get none, since the mask
    transformers builds from restarting position ids is the block-diagonal one (needs ``use_cache=False``).
    """
    widths = [int(sum(data.lengths[i] for i in row)) for row in rows]
    width = max(widths)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    seq_domain = torch.full((len(rows), width), NO_DOMAIN, dtype=torch.long)
    for r, row in enumerate(rows):
        pos = 0
        for i in row:
            ids = torch.from_numpy(data.ids(i).astype(np.int64))
            n = len(ids)
            input_ids[r, pos : pos + n] = ids
            for start, end in data.label_spans(i).tolist():
                labels[r, pos + start : pos + end] = ids[start:end]
            position_ids[r, pos : pos + n] = torch.arange(n)
            seq_domain[r, pos : pos + n] = int(data.domain_ids[i])
            pos += n
        if pos < width:  # padding continues the last example's positions: never the start of a new sequence
            last = int(data.lengths[row[-1]])
            position_ids[r, pos:] = torch.arange(last, last + width - pos)
    batch = {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "token_domain": seq_domain,
    }
    if all(len(row) == 1 for row in rows):
        batch["attention_mask"] = (seq_domain != NO_DOMAIN).long()
    return batch


def host_counts(batch: dict[str, torch.Tensor]) -> dict:
    """What a training step needs to know of a batch, counted while it is still on the host: each row's width
    without its right padding, and the real and supervised token counts (read on a GPU, each would be a sync)."""
    real = batch["token_domain"] != NO_DOMAIN
    return {
        "widths": (real.cumsum(1) * real).argmax(1).add(1).tolist(),  # each row's last real column + 1
        "supervised": int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()),
        "real": int(real.sum()),
        "total": batch["input_ids"].numel(),
    }


def cache_file(cache_root: str | os.PathLike, key: str) -> Path:
    # ".v2": files without pickled arrays; the older pickled ones (plain ".npz") are never looked up again.
    return Path(cache_root) / "tokenized" / f"{key}.v2.npz"
