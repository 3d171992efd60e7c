"""benchmarks/bench_generation.py's decode roofline on a tiny random LLaMA, and the README table run_all renders
from its report (structure and the bytes counted; nothing asserted on time)."""

from __future__ import annotations

import torch

from benchmarks.bench_generation import decode_roofline
from benchmarks.run_all import render_generation
from rega.config import SamplingConfig
from rega.data.chat import ChatFormat
from rega.model_source import load_tokenizer
from rega.modules.model import load_model


def test_decode_roofline_counts_weights_and_cache_and_renders(tiny_model_config):
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(tiny_model_config)
    model = load_model(tiny_model_config).eval()
    chat = ChatFormat(tokenizer)
    prompts = [
        chat.encode_prompt(chat.default_system, t) for t in ("Hi", "Why is the sky blue?", "Name a fruit")
    ]
    sampling = SamplingConfig(max_new_tokens=8)
    roof = decode_roofline(model, tokenizer, prompts, sampling, batch_size=3)

    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # the tied embedding once
    assert roof["weight_bytes"] == weights and roof["read_bandwidth_gbs"] > 0
    assert set(roof["batches"]) == {"1", "3"}
    c = model.config
    kv_per_token = (
        2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4
    )
    for rows, batch in roof["batches"].items():
        context = max(len(p) for p in prompts[: int(rows)]) + 8
        assert batch["bytes_per_step"] == weights + kv_per_token * context * int(rows)
        assert batch["step_ms"] > 0 and batch["share_of_roofline"] > 0

    report = {
        "instructions": 3, "sampling": {"do_sample": True, "max_new_tokens": 8}, "batch_size": 3,
        "median_tokens_per_s": {"runner": 40.0, "baseline": 10.0}, "median_ratio": 4.0, "rounds": [{}],
        "torch_threads": 1, "load_average": {"end": [0.5, 0.4, 0.3]}, "goal": ">= 4x", "decode_roofline": roof,
    }  # fmt: skip
    text = "\n".join(render_generation(report))
    assert "sampled, 3 general_en instructions, max 8 new tokens" in text and "**4.00×**" in text
    assert text.count("\n| ") == 3  # the header and one row per batch size
