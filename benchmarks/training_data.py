"""bench_training's data and models: the shared English corpus subsampled into a corpus folder (what ``rega
corpus`` writes, so that our data module reads it as users give it one), their token ids as both sides see them, the
padding HF ``group_by_length`` leaves, and LLaMAs with random weights for the GPU."""

from __future__ import annotations

import random
from pathlib import Path

from benchmarks.common import REPO

SHARED_CONFIG = REPO / "configs" / "data" / "shared_en.yaml"
# A 1B-class LLaMA (TinyLlama-1.1B shapes, the embedded tokenizer's vocabulary) for the GPU variant.
RANDOM_MODELS = {
    "random-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, max_position_embeddings=2048),
    "random-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=1024),
}  # fmt: skip


def corpus_config(central: str | None = None):
    """The corpus of configs/data/shared_en.yaml; ``central`` fixes p_c (default: the model's own system prompt)."""
    import yaml

    from rega.config import DataSource
    from rega.data.corpus import CorpusConfig
    from rega.data.prompts import PromptConfig

    raw = yaml.safe_load(SHARED_CONFIG.read_text())["corpus"]

    def sources(value) -> list:
        # A source list inline, or the name of a YAML file holding it (relative to the file naming it).
        if isinstance(value, str):
            value = yaml.safe_load((SHARED_CONFIG.parent / value).read_text())
        return [DataSource(**d) for d in value]

    defaults = CorpusConfig()
    return CorpusConfig(
        strategy=raw.get("strategy", defaults.strategy),
        mix_ratio=raw.get("mix_ratio", defaults.mix_ratio),
        seed=raw.get("seed", defaults.seed),
        skip_invalid=raw.get("skip_invalid", False),
        prompts=PromptConfig(**raw.get("prompts", {}), central=central),
        domains=sources(raw["domains"]),
        general=sources(raw["general"]),
    )


def grouped_padding(lengths: list[int], batch_size: int, seeds: int = 3) -> float:
    """Padding share of HF ``group_by_length`` batches over ``lengths`` (its own sampler, averaged over seeds)."""
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    padded = real = 0
    for seed in range(seeds):
        order = get_length_grouped_indices(lengths, batch_size, generator=torch.Generator().manual_seed(seed))
        for start in range(0, len(order), batch_size):
            batch = [lengths[i] for i in order[start : start + batch_size]]
            padded += max(batch) * len(batch)
            real += sum(batch)
    return 1 - real / padded


def write_sample(folder: Path, n: int, seed: int, model_path: str, max_length: int, batch_size: int) -> dict:
    """The real mixed corpus (strategy rega), randomly subsampled to ``n`` examples, written as a corpus folder
    (``corpus.jsonl`` + ``manifest.json``, the sample's counts in it).

    Also returns the padding HF ``group_by_length`` leaves on the sample and on the whole corpus: its sampler sorts
    within mega-batches of ``min(50, n // (4 * batch)) * batch`` examples, so a few hundred examples pad several
    times more than the real corpus does."""
    from collections import Counter

    from rega.config import ModelConfig
    from rega.data.chat import ChatFormat
    from rega.data.corpus import Corpus, build_corpus, corpus_counts, write_corpus
    from rega.model_source import load_tokenizer

    chat = ChatFormat(load_tokenizer(ModelConfig(name_or_path=model_path)))
    corpus = build_corpus(corpus_config(), model_default_prompt=chat.default_system)
    examples = random.Random(seed).sample(corpus.examples, min(n, len(corpus.examples)))
    lengths = [len(enc.input_ids) for enc in encode(chat, corpus.examples, max_length)]
    manifest = {**corpus.manifest, "num_examples": len(examples), "counts": corpus_counts(examples),
                "sample_of": len(corpus.examples)}  # fmt: skip
    write_corpus(Corpus(examples=examples, prompts=corpus.prompts, manifest=manifest), folder)
    sample_lengths = [len(enc.input_ids) for enc in encode(chat, examples, max_length)]
    return {
        "source": "configs/data/shared_en.yaml (strategy rega)",
        "corpus_examples": len(corpus.examples),
        "sampled": len(examples),
        "hf_grouped_padding_sample": round(grouped_padding(sample_lengths, batch_size), 4),
        "hf_grouped_padding_corpus": round(grouped_padding(lengths, batch_size), 4),
        "by_kind_domain": dict(Counter(f"{e.kind}/{e.domain}" for e in examples)),
    }


def read_sample(folder: str):
    """The examples :func:`write_sample` wrote, in its order."""
    from rega.data.corpus import read_corpus

    return read_corpus(folder).examples


def encode(chat, examples, max_length: int):
    encoded = chat.encode_many([(e.system, e.user_text, e.output) for e in examples], max_length)
    return [enc for enc in encoded if enc is not None]


def hf_features(chat, examples, max_length: int) -> list[dict]:
    """The examples as HF Trainer rows: token ids, an all-ones attention mask, labels -100 off the response."""
    return [
        {"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels}
        for e in encode(chat, examples, max_length)
    ]


def make_random_model(kind: str, target: Path, dtype: str) -> str:
    """A LLaMA with random weights and the embedded tokenizer, saved as safetensors (loads like any HF folder)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rega.config import ModelConfig
    from rega.model_source import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig())
    config = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=False, **RANDOM_MODELS[kind])
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return str(target)
