"""GPU-only paths: bf16 (mixed and true), 4-bit QLoRA, FSDP. Skipped without CUDA (see conftest.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rega.config import ModelConfig
from rega.errors import ConfigError
from rega.modules.model import load_model

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_4bit_without_cuda_is_a_clear_error(tiny_model_config):
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        load_model(ModelConfig(name_or_path=tiny_model_config.name_or_path, load_in_4bit=True))


def gpu_fit(tiny_model_dir: Path, root: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [
        sys.executable, str(REPO / "cli.py"), "fit",
        "--config", str(REPO / "configs/trainer/gpu.yaml"),
        "--config", str(REPO / "tests/configs/tiny_fit.yaml"),
        *extra,
        "--model.model.name_or_path", str(tiny_model_dir),
        "--trainer.max_steps", "4",
        "--trainer.default_root_dir", str(root),
        "--trainer.logger.init_args.save_dir", str(root),
        "--data.cache", str(root / "cache"),
        "--model.adapter_dir", str(root / "adapter"),
    ]  # fmt: skip
    return subprocess.run(args, capture_output=True, timeout=900)


def assert_trained(root: Path, done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, done.stderr.decode()[-4000:]
    assert (root / "adapter" / "adapter_model.safetensors").exists()
    from safetensors.torch import load_file

    weights = load_file(root / "adapter" / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())  # B starts at zero


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_fit_on_gpu(tiny_model_dir, tmp_path, precision):
    assert_trained(tmp_path, gpu_fit(tiny_model_dir, tmp_path, "--trainer.precision", precision))
    from safetensors.torch import load_file

    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {t.dtype for t in adapter.values()} == {torch.float32}  # bf16-true too (rega.modules.precision)


@pytest.mark.gpu
def test_qlora_4bit_fit_on_gpu(tiny_model_dir, tmp_path):
    done = gpu_fit(
        tiny_model_dir, tmp_path, "--model.model.load_in_4bit", "true", "--model.model.dtype", "bfloat16"
    )
    assert_trained(tmp_path, done)


@pytest.mark.gpu
def test_qlora_model_is_quantized(tiny_model_config):
    model = load_model(
        ModelConfig(name_or_path=tiny_model_config.name_or_path, load_in_4bit=True, dtype="bfloat16")
    )
    assert getattr(model, "is_loaded_in_4bit", False)


@pytest.mark.gpu
def test_fsdp_fit_on_gpu(tiny_model_dir, tmp_path):
    done = gpu_fit(
        tiny_model_dir,
        tmp_path,
        "--config",
        str(REPO / "configs/trainer/fsdp.yaml"),
        "--trainer.devices",
        "1",
    )
    assert_trained(tmp_path, done)


# --- packed attention on CUDA: the varlen kernel against the exact per-sequence path ---------------------
def run_attention(fn, tensors, weight):
    leaves = [t.detach().requires_grad_() for t in tensors]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, weight.to(out.dtype))
    return [out.float(), *(g.float() for g in grads)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    ("kv_heads", "window"), [(8, None), (2, None), (8, 40)], ids=["mha", "gqa", "sliding"]
)
def test_varlen_attention_matches_the_per_sequence_path(dtype, kv_heads, window):
    """Outputs and q/k/v gradients of the varlen path against fp32 per-sequence attention: as close as the
    per-sequence path in the same low precision."""
    from rega.modules.attention import PackedLayout, per_sequence_packed, varlen_arguments, varlen_packed

    torch.manual_seed(0)
    rows = [[37, 100, 5, 114], [256], [60, 196]]
    position_ids = torch.cat([torch.cat([torch.arange(n) for n in row])[None] for row in rows])
    layout = PackedLayout.of(position_ids.cuda())
    exact = [torch.randn(3, h, 256, 64, device="cuda") for h in (8, kv_heads, kv_heads)]
    low = [t.to(dtype) for t in exact]
    weight = torch.randn(3, 256, 8, 64, device="cuda")
    kwargs = varlen_arguments(low[0], window, 0.0)
    assert kwargs is not None  # the fast path is available for these tensors

    def per_sequence(*t):
        return per_sequence_packed(*t, layout, None, window, 0.0)

    reference = run_attention(per_sequence, exact, weight)
    slow = run_attention(per_sequence, low, weight)
    fast = run_attention(lambda *t: varlen_packed(*t, layout, None, kwargs), low, weight)
    for name, got, same, ref in zip(["out", "dq", "dk", "dv"], fast, slow, reference):
        error, baseline = (got - ref).abs().max(), (same - ref).abs().max()
        assert error <= 2 * baseline + 1e-3 * ref.abs().max(), name
        assert error <= (2e-2 if dtype == torch.bfloat16 else 5e-3) * ref.abs().max(), name


@pytest.mark.gpu
def test_packed_bf16_rows_on_gpu_run_varlen_and_equal_examples_alone(tiny_model_config, monkeypatch):
    import numpy as np

    import rega.modules.attention as attention
    from rega.datamodules.tokenized import TokenizedExamples, collate_rows, pack_rows
    from rega.modules.lit_module import REGAModule
    from rega.modules.model import LoraSettings

    calls = []
    varlen = attention.varlen_packed
    monkeypatch.setattr(attention, "varlen_packed", lambda *a: calls.append(1) or varlen(*a))
    module = REGAModule(model=tiny_model_config, lora=LoraSettings(dropout=0.0))
    module.configure_model()
    module.cuda()
    lengths = [23, 9, 31, 14, 40, 5, 18, 27, 12]
    rng = np.random.default_rng(0)
    data = TokenizedExamples(
        tokens=rng.integers(0, len(module.tokenizer), size=sum(lengths)).astype(np.int32),
        offsets=np.concatenate([[0], np.cumsum(lengths)]),
        spans=np.array([(n // 3, n) for n in lengths], dtype=np.int32).reshape(-1, 2),
        span_offsets=np.arange(len(lengths) + 1, dtype=np.int64),  # one span each: the last two thirds
        domain_ids=np.zeros(len(lengths), dtype=np.int16), domains=["d"],
    )  # fmt: skip
    rows = pack_rows(lengths, 64)

    def on_gpu(batch):
        return {k: v.cuda() for k, v in batch.items()}

    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        losses, mask = module.token_losses(on_gpu(collate_rows(data, rows, pad_id=0)))
        assert calls  # the packed rows took the varlen kernel
        row_of, col_of = mask.nonzero(as_tuple=True)
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                sel = (row_of == r) & (col_of >= start) & (col_of < start + lengths[i] - 1)
                alone, _ = module.token_losses(
                    on_gpu(collate_rows(data, [[i]], pad_id=0))
                )  # transformers' SDPA
                torch.testing.assert_close(losses[sel], alone, rtol=1e-2, atol=1e-2)
                start += lengths[i]
