"""GPU-only paths: bf16 (mixed and true), 4-bit QLoRA, FSDP. Skipped without CUDA (see conftest.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rega.data.prompts import ConfigError
from rega.modules.model import ModelConfig, load_model

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
