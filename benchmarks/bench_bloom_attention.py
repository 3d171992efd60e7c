"""BLOOM's packed attention: SDPA per packed example with its ALiBi bias (rega.modules.attention, what training runs
now) against eager attention over the whole row with an additive block-diagonal mask (what it ran before, and the
only way transformers' own BLOOM keeps packed examples apart), side by side in one process (issue #32).

A random BLOOM with BLOOM-7B1's head size (128) and ``--heads`` heads, ``--layers`` blocks, LoRA r16 on its four
projections (peft, as in training), fp32 on CPU (bf16 on CUDA), in training mode with dropout off; ``--rows`` packed
rows of ``--length`` tokens, examples of 60-600 tokens. Each path runs the decoder forward and the backward of the
hidden states' sum, in alternating order each round. Reported per path: median seconds, the bytes autograd saves
for the backward (every saved tensor's storage once, weights left out: the activation memory), the
largest difference of the hidden states between the paths; headline: eager / SDPA time and saved-bytes ratios.

    .venv/bin/python benchmarks/bench_bloom_attention.py [--length 2048] [--rows 2] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from lightning.fabric.utilities.apply_func import move_data_to_device  # noqa: E402

from benchmarks.common import load_average, machine_info, repo_relative  # noqa: E402
from benchmarks.profile_step import packed_batch  # noqa: E402
from rega.config import ModelConfig  # noqa: E402
from rega.io import write_json  # noqa: E402
from rega.modules.attention import PackedLayout, decoder_hidden_states, prepare_packed_attention  # noqa: E402
from rega.modules.batch_plan import planned  # noqa: E402
from rega.modules.model import LoraSettings, add_lora  # noqa: E402

PATHS = ("eager_row", "sdpa_per_example")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--length", type=int, default=2048, help="tokens per packed row")
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--heads", type=int, default=8, help="attention heads of 128 dimensions each")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "bloom_attention.json"))
    return parser.parse_args(argv)


def tiny_bloom(heads: int, layers: int, device: str):
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    config = BloomConfig(vocab_size=1000, hidden_size=128 * heads, n_layer=layers, n_head=heads,
                         hidden_dropout=0.0, attention_dropout=0.0)  # fmt: skip
    model = BloomForCausalLM(config).to(device)
    prepare_packed_attention(model, ModelConfig(attn_implementation="eager"))
    return add_lora(model, LoraSettings(dropout=0.0)).train()


def packed_rows(rows: int, length: int, device: str) -> dict:
    batch = packed_batch(rows, length, vocab=1000, example_tokens=(60, 600))
    return move_data_to_device(planned({k: v for k, v in batch.items() if k != "token_domain"}), device)


def eager_row_hidden_states(transformer, batch: dict) -> torch.Tensor:
    """The path this replaces: transformers' eager BLOOM attention over the whole row, ALiBi from the restarting
    position ids, an additive [B, 1, L, L] block-diagonal causal mask."""
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    position_ids = batch["position_ids"]
    hidden = transformer.word_embeddings_layernorm(transformer.word_embeddings(batch["input_ids"]))
    rows, length = position_ids.shape
    heads = transformer.num_heads
    slopes = _get_alibi_slopes(heads, hidden.device)
    alibi = (slopes[None, :, None] * position_ids[:, None, :].float()).reshape(rows * heads, 1, length)
    keep = PackedLayout.of(position_ids).same_sequence()[:, None]
    mask = torch.zeros(keep.shape, dtype=hidden.dtype, device=hidden.device)
    mask.masked_fill_(~keep, torch.finfo(hidden.dtype).min)
    for block in transformer.h:
        hidden = block(hidden, alibi=alibi.to(hidden.dtype), attention_mask=mask, layer_past=None)[0]
    return transformer.ln_f(hidden)


def run(model, batch: dict, path: str, dtype: torch.dtype) -> tuple[float, int, torch.Tensor]:
    """(seconds of forward + backward, bytes saved for the backward, hidden states)."""
    saved: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:  # activations only: the weights exist before the step
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    base = model.get_base_model()
    sync(batch)
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(batch, dtype):
        if path == "eager_row":
            hidden = eager_row_hidden_states(base.transformer, batch)
        else:
            hidden = decoder_hidden_states(base, batch)
    hidden.float().sum().backward()
    sync(batch)
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds, sum(saved.values()), hidden.detach().float()


def autocast(batch: dict, dtype: torch.dtype):
    device = batch["input_ids"].device.type
    return torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)


def sync(batch: dict) -> None:
    if batch["input_ids"].is_cuda:
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    start_load = load_average()
    model = tiny_bloom(args.heads, args.layers, device)
    batch = packed_rows(args.rows, args.length, device)
    seconds: dict[str, list[float]] = {p: [] for p in PATHS}
    saved, hidden = {}, {}
    for path in PATHS:
        run(model, batch, path, dtype)  # warm-up
    for r in range(args.rounds):
        for path in PATHS[r % 2 :] + PATHS[: r % 2]:
            s, saved[path], hidden[path] = run(model, batch, path, dtype)
            seconds[path].append(s)
    median = {p: statistics.median(seconds[p]) for p in PATHS}
    report = {
        "command": " ".join(["benchmarks/bench_bloom_attention.py", *map(repo_relative, argv or sys.argv[1:])]),
        "machine": machine_info(), "device": device, "dtype": str(dtype), "threads": args.threads,
        "shape": {"rows": args.rows, "length": args.length, "heads": args.heads, "head_dim": 128,
                  "layers": args.layers, "examples_per_row": sum(map(len, batch["sequence_lengths"])) / args.rows},
        "rounds": args.rounds, "load_average": {"start": start_load, "end": load_average()},
        "seconds_median": median, "saved_mib": {p: round(saved[p] / 2**20, 1) for p in PATHS},
        "max_abs_difference": float((hidden["eager_row"] - hidden["sdpa_per_example"]).abs().max()),
        "eager_row / sdpa_per_example": {
            "time": round(statistics.median(e / s for e, s in zip(seconds["eager_row"], seconds["sdpa_per_example"])), 2),
            "saved_bytes": round(saved["eager_row"] / saved["sdpa_per_example"], 2),
        },
    }  # fmt: skip
    write_json(args.output, report)
    print(json.dumps({k: report[k] for k in ("shape", "seconds_median", "saved_mib", "max_abs_difference",
                                             "eager_row / sdpa_per_example")}, indent=1))  # fmt: skip
    return report


if __name__ == "__main__":
    main()
