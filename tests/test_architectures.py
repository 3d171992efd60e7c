"""The packing contract per architecture: inside a packed row, each example's loss and LoRA gradients equal
its own alone (fp32, CPU), through REGAModule.token_losses as training runs it, every backward on
a thread of its own as on CUDA (tests/autograd_thread.py).

Each architecture is a tiny random model built here with the embedded model's tokenizer (so REGAModule loads
it the normal way). "Alone" is the plain peft/transformers forward of one unpadded example: an independent
reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from autograd_thread import backward_on_another_thread
from safetensors.torch import load_file

from rega.config import ModelConfig
from rega.data.chat import IGNORE_INDEX, ChatFormat
from rega.datamodules.tokenized import TokenizedExamples, collate_rows, pack_rows
from rega.errors import ConfigError
from rega.model_source import load_tokenizer
from rega.modules.architectures import ARCHITECTURES
from rega.modules.attention import (
    PackedLayout,
    per_sequence_packed,
    prepare_packed_attention,
    varlen_kwargs,
)
from rega.modules.generation import GREEDY, generate_batch, left_padded, pad_token_id, prefill, prefill_rows
from rega.modules.lit_module import REGAModule
from rega.modules.model import LoraSettings, decoder_layer_classes, load_model

REPO = Path(__file__).resolve().parent.parent
LENGTHS = [23, 9, 31, 14, 40, 5, 18, 27, 12]  # several longer than Mistral's test window (24)
ROW = 64


def tiny_config(arch: str, tokenizer):
    """The registry's tiny settings for ``arch``; ``gpt2`` stands for a family without a record."""
    import transformers

    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id, "vocab_size": len(tokenizer)}  # fmt: skip
    if arch == "gpt2":
        return transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **ids)
    record = ARCHITECTURES[arch]
    return getattr(transformers, record.config_class)(**record.tiny, **ids)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """arch -> folder of a tiny random model of that architecture, saved with the embedded tokenizer."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(ModelConfig())
    made = {}

    def make(arch: str) -> Path:
        if arch not in made:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(tiny_config(arch, tokenizer))
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            model.save_pretrained(path, safe_serialization=True)
            tokenizer.save_pretrained(path)
            made[arch] = path
        return made[arch]

    return make


def random_examples(vocab: int, lengths=LENGTHS) -> TokenizedExamples:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, size=sum(lengths)).astype(np.int32)
    return TokenizedExamples(
        tokens=tokens, offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        spans=np.array([(n // 3, n) for n in lengths], dtype=np.int32).reshape(-1, 2),
        span_offsets=np.arange(len(lengths) + 1, dtype=np.int64),  # one span each: the last two thirds
        domain_ids=np.zeros(len(lengths), dtype=np.int16), domains=["d"],
    )  # fmt: skip


def lora_module(path: Path, **model_options) -> REGAModule:
    module = REGAModule(
        model=ModelConfig(name_or_path=str(path), **model_options), lora=LoraSettings(dropout=0.0)
    )
    torch.manual_seed(1)
    module.configure_model()
    with torch.no_grad():  # B starts at zero, which would leave every A gradient zero
        for name, param in module.model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    return module


def lora_params(module) -> list[torch.Tensor]:
    return [p for n, p in module.model.named_parameters() if "lora_" in n]


def grads_of(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """``loss``'s gradients through ``.backward()`` (reentrant checkpointing refuses ``torch.autograd.grad``)."""
    for param in params:
        param.grad = None
    loss.backward(retain_graph=True)
    return [param.grad.clone() for param in params]


def alone(module, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Per-token response losses and LoRA gradients of one example through the plain peft forward."""
    logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    losses = F.cross_entropy(logits[:, :-1][keep].float(), targets[keep], reduction="none")
    return losses.detach(), grads_of(losses.sum(), lora_params(module))


def checkpointed_module(path: Path, attn: str, checkpointing: str) -> REGAModule:
    """:func:`lora_module` with gradient checkpointing ``off``, ``non-reentrant`` (what every load path sets) or
    ``reentrant`` (what a user may set; the layout must survive it too)."""
    module = lora_module(path, attn_implementation=attn, gradient_checkpointing=checkpointing != "off")
    if checkpointing == "reentrant":
        kwargs = {"use_reentrant": True}
        module.model.get_base_model().activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    return module


CHECKPOINTING = ["off", "non-reentrant", "reentrant"]
# Every registered family, with every attention implementation its record lists.
CASES = [
    (a, attn, c) for a, record in ARCHITECTURES.items() for attn in record.attention for c in CHECKPOINTING
]


@pytest.mark.parametrize(("arch", "attn", "checkpointing"), CASES, ids=["-".join(c) for c in CASES])
def test_packed_examples_equal_themselves_alone(tiny_dirs, arch, attn, checkpointing):
    """Every backward runs on a thread of its own, as CUDA's autograd engine runs it: a checkpointed layer
    recomputes its forward there, and must still keep the packed examples apart."""
    module = checkpointed_module(tiny_dirs(arch), attn, checkpointing)
    data = random_examples(len(module.tokenizer))
    rows = pack_rows(data.lengths.tolist(), ROW)
    assert any(len(r) > 1 for r in rows) and any(sum(data.lengths[r]) < ROW for r in rows)  # packs, and pads
    batch = collate_rows(data, rows, pad_id=0)
    params = lora_params(module)
    with backward_on_another_thread():
        losses, mask = module.token_losses(batch)
        row_of, col_of = mask.nonzero(as_tuple=True)
        checked = 0
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                n = int(data.lengths[i])
                sel = (row_of == r) & (col_of >= start) & (col_of < start + n - 1)
                grads = grads_of(losses[sel].sum(), params)
                ref_losses, ref_grads = alone(module, collate_rows(data, [[i]], pad_id=0))
                torch.testing.assert_close(losses[sel].detach(), ref_losses, rtol=1e-4, atol=1e-5)
                for got, want in zip(grads, ref_grads):
                    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6)
                start, checked = start + n, checked + 1
    assert checked == len(LENGTHS)


@pytest.mark.parametrize("four_bit", [False, True], ids=["plain", "4-bit"])
def test_every_load_path_checkpoints_non_reentrantly(tiny_dirs, four_bit):
    """What each load path configures. The 4-bit path is taken by the flag bitsandbytes' loader sets, which is
    what peft's preparation reads (no GPU needed to see what it configures)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from rega.modules.model import add_lora

    model = load_model(ModelConfig(name_or_path=str(tiny_dirs("llama"))))
    model.is_loaded_in_4bit = four_bit
    peft_model = add_lora(model, LoraSettings(r=2, alpha=4), gradient_checkpointing=True)
    layers = [m for m in peft_model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert layers and all(layer.gradient_checkpointing for layer in layers)
    assert {repr(layer._gradient_checkpointing_func.keywords) for layer in layers} == {
        "{'use_reentrant': False}"
    }


@pytest.mark.parametrize("arch", ["llama", "bloom"])
def test_the_check_sees_a_leak(tiny_dirs, arch):
    """Control: the same rows run as one causal sequence each (what BLOOM did before) give other losses, so
    the equalities above are not trivial for these tiny models."""
    module = lora_module(tiny_dirs(arch))
    data = random_examples(len(module.tokenizer))
    rows = pack_rows(data.lengths.tolist(), ROW)
    batch = collate_rows(data, rows, pad_id=0)
    with torch.no_grad():
        losses, _ = module.token_losses(batch)
        logits = module.model(input_ids=batch["input_ids"]).logits  # no restart: examples see each other
    targets = batch["labels"][:, 1:]
    leaked = F.cross_entropy(
        logits[:, :-1][targets != IGNORE_INDEX], targets[targets != IGNORE_INDEX], reduction="none"
    )
    assert not torch.allclose(leaked, losses, rtol=1e-3, atol=1e-4)


def adapted_modules(module) -> set[str]:
    return {
        n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in module.model.named_parameters() if ".lora_A" in n
    }


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_lora_targets_and_fused_inputs_follow_the_record(tiny_dirs, arch):
    record = ARCHITECTURES[arch]
    module = lora_module(tiny_dirs(arch))
    assert adapted_modules(module) == set(record.lora_targets)
    fused = set()  # the names of each module's children that share one fast-LoRA input group
    for parent in module.model.modules():
        for child in parent.children():
            group = getattr(child, "_fast_group", None)
            if group is not None:
                fused.add(tuple(sorted(n for n, c in parent.named_children() if c in group.members)))
    assert fused == {tuple(sorted(g)) for g in record.shared_inputs}


def test_explicit_lora_targets_win(tiny_dirs):
    explicit = REGAModule(
        model=ModelConfig(name_or_path=str(tiny_dirs("llama"))), lora=LoraSettings(target_modules=["q_proj"])
    )
    explicit.configure_model()
    assert adapted_modules(explicit) == {"q_proj"}


def test_decoder_layer_classes_come_from_the_model(tiny_dirs):
    from transformers.models.bloom.modeling_bloom import BloomBlock
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    assert decoder_layer_classes(lora_module(tiny_dirs("llama")).model) == (
        LlamaDecoderLayer,
    )  # through peft
    assert decoder_layer_classes(load_model(ModelConfig(name_or_path=str(tiny_dirs("bloom"))))) == (
        BloomBlock,
    )


def test_compile_layers_finds_every_architectures_decoder_layers(tiny_dirs):
    """compile_layers compiles the decoder blocks of any architecture (BLOOM keeps them in ``transformer.h``, not
    ``.layers``), and nothing else."""
    for arch in ("llama", "bloom"):
        module = REGAModule(model=ModelConfig(name_or_path=str(tiny_dirs(arch))), compile_layers=True)
        module.configure_model()
        layer_types = decoder_layer_classes(module.model)
        compiled = [m for m in module.model.modules() if m._compiled_call_impl is not None]
        assert all(isinstance(m, layer_types) for m in compiled), arch
        assert len(compiled) == module.model.config.num_hidden_layers > 0, arch


def test_bloom_loads_with_eager_attention(tiny_dirs):
    model = load_model(
        ModelConfig(name_or_path=str(tiny_dirs("bloom")))
    )  # sdpa requested: transformers refuses it
    assert model.config._attn_implementation == "eager"


def test_bloom_packed_rows_keep_nothing_of_the_rows_length_squared(tiny_dirs):
    """BLOOM attends per packed example (SDPA with each example's ALiBi bias): no tensor the backward keeps spans
    a row's length on two axes, as eager attention's scores and block mask over the whole row did."""
    module = lora_module(tiny_dirs("bloom"))
    data = random_examples(len(module.tokenizer))
    rows = pack_rows(data.lengths.tolist(), ROW)
    batch = collate_rows(data, rows, pad_id=0)
    width = batch["input_ids"].size(1)
    assert max(len(row) for row in rows) > 1 and max(data.lengths) < width
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(t.shape) or t, lambda t: t):
        module.token_losses(batch)[0].sum().backward()
    assert shapes and not [s for s in shapes if len(s) >= 2 and s[-1] == s[-2] == width]


def test_flash_attention_is_refused_not_leaked(tiny_dirs):
    config = ModelConfig(name_or_path=str(tiny_dirs("llama")), attn_implementation="flash_attention_2")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="flash_attention_2"):
            load_model(config)
    base = load_model(ModelConfig(name_or_path=config.name_or_path))
    with pytest.raises(ConfigError, match="mix the examples"):
        prepare_packed_attention(base, config)


def test_unverified_architecture_trains_one_example_per_row_only(tiny_dirs):
    module = lora_module(tiny_dirs("gpt2"))
    data = random_examples(len(module.tokenizer))
    with torch.no_grad():
        with pytest.raises(ConfigError, match="batching grouped"):
            module.token_losses(collate_rows(data, pack_rows(data.lengths.tolist(), ROW), pad_id=0))
        grouped = collate_rows(
            data, [[0], [1], [2]], pad_id=0
        )  # padded rows with a mask: transformers' own path
        losses, _ = module.token_losses(grouped)
    assert torch.isfinite(losses).all()


def test_varlen_causal_arguments_for_each_signature():
    new = frozenset({"query", "window_size", "enable_gqa", "scale"})
    assert varlen_kwargs(new, None) == {"window_size": (-1, 0)}
    assert varlen_kwargs(new, 24) == {"window_size": (23, 0)}  # 24 keys, as transformers' sliding mask
    old = frozenset({"query", "is_causal"})
    assert varlen_kwargs(old, None) == {"is_causal": True}
    assert varlen_kwargs(old, 24) is None  # no sliding window there: the exact per-sequence path instead


@pytest.mark.parametrize("window", [None, 6])
def test_per_sequence_attention_equals_the_block_diagonal_mask(window):
    torch.manual_seed(0)
    position_ids = torch.tensor(
        [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1], [*range(11), 0, 1, 2, 3, 4]]
    )
    layout = PackedLayout.of(position_ids)
    q = torch.randn(2, 4, 16, 8, requires_grad=True)
    k, v = (torch.randn(2, 2, 16, 8, requires_grad=True) for _ in range(2))  # grouped-query heads
    out = per_sequence_packed(q, k, v, layout, None, window, 0.0)
    keep = layout.same_sequence()
    if window is not None:
        i = torch.arange(16)
        keep = keep & (i[None, :] > i[:, None] - window)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None], enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    weights = torch.randn_like(ref)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    for got, want in zip(grads, torch.autograd.grad((ref * weights).sum(), (q, k, v))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_belle_config_fits_a_tiny_bloom(tiny_dirs, tmp_path):
    """configs/model/belle_7b.yaml through `cli.py fit` (a few steps), on a tiny random BLOOM in fp32."""
    args = [
        sys.executable, str(REPO / "cli.py"), "fit",
        "--config", str(REPO / "configs/trainer/cpu.yaml"),
        "--config", str(REPO / "tests/configs/tiny_fit.yaml"),
        "--config", str(REPO / "configs/model/belle_7b.yaml"),
        "--model.model.name_or_path", str(tiny_dirs("bloom")), "--model.model.dtype", "float32",
        "--trainer.max_steps", "3", "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "1",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--data.cache", str(tmp_path / "cache"), "--model.adapter_dir", str(tmp_path / "adapter"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, capture_output=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr.decode()[-4000:]
    adapter = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())  # trained (B starts at zero)


def reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, window_size=None,
                     is_causal=False, enable_gqa=False, scale=None, **unused):  # fmt: skip
    """A CPU stand-in for torch's varlen_attn with flash-attention's semantics ([T, H, D] tensors, sequences
    delimited by ``cu_seq_q``, window (left, right) keys around each query), to test the wrapper around it."""
    left = window_size[0] if window_size is not None else -1
    if not (is_causal or (window_size is not None and window_size[1] == 0)):
        raise AssertionError("not causal")
    bounds = cu_seq_q.tolist()
    assert cu_seq_q is cu_seq_k and max_q >= max(e - s for s, e in zip(bounds, bounds[1:]))
    outs = []
    for s, e in zip(bounds, bounds[1:]):
        i = torch.arange(e - s)
        keep = (i[None, :] <= i[:, None]) & ((i[None, :] >= i[:, None] - left) if left >= 0 else True)
        q, k, v = (t[s:e].transpose(0, 1)[None] for t in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale, enable_gqa=enable_gqa)
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("signature", ["torch-2.13", "torch-2.10"])
@pytest.mark.parametrize("window", [None, 6])
def test_varlen_wrapper_feeds_the_kernel_flattened_rows(monkeypatch, signature, window):
    """varlen_packed (flattening, cumulative lengths, GQA, scale, causal window) on CPU with a stand-in
    kernel: the same outputs and gradients as the exact per-sequence path. Older signatures lack enable_gqa
    and scale, which the wrapper then provides itself."""
    import rega.modules.attention as attention

    params = {"torch-2.13": {"window_size", "enable_gqa", "scale"}, "torch-2.10": {"is_causal"}}[signature]
    monkeypatch.setattr(attention, "varlen_function", lambda: (reference_varlen, frozenset(params)))
    kwargs = varlen_kwargs(frozenset(params), window)
    if kwargs is None:
        pytest.skip("this signature has no sliding window: the per-sequence path runs instead")
    torch.manual_seed(0)
    layout = PackedLayout.of(torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1], [*range(16)]]))
    inputs = [torch.randn(2, h, 16, 8) for h in (4, 2, 2)]
    scale = 0.3
    results = []
    for run in (lambda q, k, v: attention.varlen_packed(q, k, v, layout, scale, kwargs),
                lambda q, k, v: per_sequence_packed(q, k, v, layout, scale, window, 0.0)):  # fmt: skip
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = run(*leaves)
        results.append([out, *torch.autograd.grad((out * out).sum(), leaves)])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_shared_prefix_prefill_answers_as_whole_rows_on_every_family(tiny_dirs, arch):
    """Evaluation prefills a batch's common system prompt once and repeats its KV cache (BLOOM's ALiBi, Qwen2's
    biases, Mistral's window included): the same last logits and the same greedy answers as whole rows."""
    from transformers import AutoModelForCausalLM

    path = tiny_dirs(arch)
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(path)))
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    chat = ChatFormat(tokenizer)
    texts = ["Hi", "A much longer question about the patient, the outcome and the dose", "Why so?"]
    prompts = [chat.encode_prompt(chat.default_system, t) for t in texts]
    pad = pad_token_id(tokenizer)
    with torch.inference_mode():
        whole = prefill(model, *left_padded(prompts, pad))
        shared = prefill_rows(model, prompts, pad, share_prefix=True)
    torch.testing.assert_close(shared.last_logits, whole.last_logits, atol=1e-5, rtol=1e-5)
    greedy = replace(GREEDY, max_new_tokens=8)
    answers = [g.token_ids for g in generate_batch(model, tokenizer, prompts, greedy, share_prefix=True)]
    assert answers == [g.token_ids for g in generate_batch(model, tokenizer, prompts, greedy)]
