"""``bf16-true`` keeps what trains in fp32 (rega.modules.precision): the frozen base in bf16, the LoRA weights and
AdamW's states in fp32. On CPU, which computes bf16 as CUDA stores it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rega.cli import main
from rega.errors import ConfigError
from rega.modules.lit_module import REGAModule
from rega.modules.precision import FrozenHalfPrecision, frozen_half_precision

REPO = Path(__file__).resolve().parent.parent


def fitted(tiny_model_config, tmp_path, datamodule, **trainer_kwargs) -> REGAModule:
    import lightning as L

    module = REGAModule(model=tiny_model_config, learning_rate=1e-2, adapter_dir=str(tmp_path / "adapter"))
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, default_root_dir=tmp_path,
                        **trainer_kwargs)  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    return module


def dtypes(module: REGAModule, trainable: bool) -> set[torch.dtype]:
    return {p.dtype for p in module.parameters() if p.requires_grad == trainable and p.is_floating_point()}


@pytest.fixture(scope="module")
def datamodule(tiny_model_config, tmp_path_factory):
    from rega.data.corpus import CorpusConfig, DataSource
    from rega.datamodules import REGADataModule

    corpus = CorpusConfig(domains=[DataSource("demo:medical.jsonl", limit=8)], general=[DataSource("demo:general.jsonl", limit=8)])  # fmt: skip
    dm = REGADataModule(corpus=corpus, model=tiny_model_config, max_length=128, batch_size=4,
                        cache=str(tmp_path_factory.mktemp("cache")))  # fmt: skip
    dm.prepare_data()
    return dm


def test_bf16_true_keeps_lora_weights_and_adam_states_in_fp32(tiny_model_config, tmp_path, datamodule):
    assert tiny_model_config.dtype == "float32"  # a base loaded in fp32: the plugin casts its frozen weights
    module = fitted(tiny_model_config, tmp_path, datamodule, plugins=[FrozenHalfPrecision("bf16-true")])
    assert dtypes(module, trainable=False) == {torch.bfloat16}
    assert dtypes(module, trainable=True) == {torch.float32}
    states = module.trainer.optimizers[0].state.values()
    assert states and {s["exp_avg"].dtype for s in states} == {s["exp_avg_sq"].dtype for s in states} == {
        torch.float32
    }
    # What Lightning's own bf16-true does, and this plugin exists to avoid: bf16 adapters and states.
    plain = fitted(tiny_model_config, tmp_path / "lightning", datamodule, precision="bf16-true")
    assert dtypes(plain, trainable=True) == {torch.bfloat16}


def test_the_cli_puts_the_plugin_in_place_of_bf16_true(tiny_model_dir, tmp_path):
    assert frozen_half_precision({"precision": "bf16-mixed"}) == {"precision": "bf16-mixed"}
    config = frozen_half_precision({"precision": "bf16-true", "plugins": None})
    assert config["precision"] is None and isinstance(config["plugins"][0], FrozenHalfPrecision)
    main(["fit", "--config", str(REPO / "configs/trainer/cpu.yaml"), "--config", str(REPO / "tests/configs/tiny_fit.yaml"),
          "--config", str(REPO / "configs/trainer/bf16_true.yaml"), "--model.model.name_or_path", str(tiny_model_dir),
          "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
          "--data.cache", str(tmp_path / "cache"), "--model.adapter_dir", str(tmp_path / "adapter"),
          "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0"])  # fmt: skip
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert adapter and {t.dtype for t in adapter.values()} == {torch.float32}


def test_a_sharded_weight_in_another_dtype_is_refused_not_cast(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(4, 4)).requires_grad_(False)
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        with pytest.raises(ConfigError, match=r"0\.weight is torch\.float32 after sharding.*dtype bfloat16"):
            FrozenHalfPrecision("bf16-true").convert_module(model)
    finally:
        dist.destroy_process_group()
