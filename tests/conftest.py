"""Shared fixtures: the shared data folder, a tiny random LLaMA (fast tests) and the embedded model (slow tests)."""

from __future__ import annotations

import os

import pytest
import torch

from rega.paths import shared_data_dir


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data():
    path = shared_data_dir()
    if not path.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"shared data folder {path} is missing in CI (set REGA_SHARED_DATA)")
        pytest.skip(f"shared data folder {path} not found")
    return path


def tiny_llama(tokenizer, **overrides):
    """A tiny random LlamaForCausalLM over ``tokenizer``'s vocabulary, initialised from seed 0 (``overrides``: other
    LlamaConfig settings, e.g. ``initializer_range``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        **overrides,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random LlamaForCausalLM saved with the embedded model's tokenizer (so chat templates are real)."""
    from rega.config import ModelConfig
    from rega.model_source import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig())
    model = tiny_llama(tokenizer)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_config(tiny_model_dir):
    from rega.config import ModelConfig

    return ModelConfig(name_or_path=str(tiny_model_dir))
