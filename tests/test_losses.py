"""Loss terms: the registry, the LwF-style KL to the base model, and a plugin term logged during training."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from rega.config import DataSource
from rega.data.corpus import CorpusConfig
from rega.datamodules import REGADataModule
from rega.datamodules.tokenized import collate_rows, plan_batches
from rega.errors import ConfigError
from rega.modules.attention import decoder_hidden_states
from rega.modules.lit_module import REGAModule
from rega.modules.losses import LOSS_TERMS, build_loss_terms, register_loss_term
from rega.modules.model import LoraSettings


@pytest.fixture(scope="module")
def datamodule(tiny_model_config, tmp_path_factory):
    corpus = CorpusConfig(
        strategy="rega",
        domains=[DataSource("demo:medical.jsonl", limit=8), DataSource("demo:legal.jsonl", limit=8)],
        general=[DataSource("demo:general.jsonl", limit=8)],
    )
    dm = REGADataModule(
        corpus=corpus,
        model=tiny_model_config,
        max_length=192,
        batch_size=4,
        cache=str(tmp_path_factory.mktemp("c")),
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_unknown_terms_and_settings_are_config_errors():
    with pytest.raises(ConfigError, match="unknown loss term 'nope'.*kl_to_base"):
        build_loss_terms({"nope": {}})
    with pytest.raises(ConfigError, match="kl_to_base"):
        build_loss_terms({"kl_to_base": {"wieght": 1.0}})
    with pytest.raises(ConfigError, match="temperature"):
        build_loss_terms({"kl_to_base": {"temperature": 0}})


def test_kl_to_base_is_the_kl_between_adapter_on_and_off_on_general_tokens(datamodule, tiny_model_config):
    module = REGAModule(
        model=tiny_model_config, lora=LoraSettings(dropout=0.0), loss_terms={"kl_to_base": {}}
    )
    module.configure_model()
    module.data = datamodule.training_data()  # what setup takes from the data module: the domain names
    data = datamodule.train_data
    batch = collate_rows(data, plan_batches(data.lengths.tolist(), "packed", 4, 192, seed=0)[0], pad_id=0)
    general = datamodule.domains.index("general")
    assert (batch["token_domain"] == general).any() and (batch["token_domain"] != general).any()
    term = module.loss_terms["kl_to_base"]
    _, planned, logits = module.response_losses(batch)
    assert term(module, planned, logits).item() == pytest.approx(0.0, abs=1e-6)  # lora_B starts at 0

    torch.manual_seed(0)
    for name, param in module.model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    _, planned, logits = module.response_losses(batch)
    value = term(module, planned, logits)
    value.backward()
    mask = batch["labels"][:, 1:] != -100
    # the base's logits, selected by a boolean mask here
    with torch.no_grad(), module.model.disable_adapter():
        hidden = decoder_hidden_states(module.model.get_base_model(), batch)
        base = module.model.get_base_model().get_output_embeddings()(hidden[:, :-1][mask])
    on_general = batch["token_domain"][:, 1:][mask] == general
    expected = F.kl_div(
        F.log_softmax(logits[on_general].float(), -1), F.log_softmax(base[on_general].float(), -1),
        log_target=True, reduction="sum",
    ) * 0.1  # fmt: skip
    assert value.item() == pytest.approx(expected.item(), rel=1e-5) and value.item() > 0
    grads = {n: p.grad for n, p in module.model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads) and any(g.abs().sum() > 0 for g in grads.values())


def test_a_registered_term_is_added_and_logged_in_training(datamodule, tiny_model_config, tmp_path):
    @register_loss_term("mean_logit_square")
    def mean_logit_square(weight: float = 1.0):
        return lambda module, batch, logits: weight * logits.float().pow(2).mean(-1).sum()

    try:
        module = REGAModule(model=tiny_model_config, loss_terms={"mean_logit_square": {"weight": 0.01}})
        trainer = L.Trainer(
            accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            limit_val_batches=0, default_root_dir=tmp_path,
        )  # fmt: skip
        trainer.fit(module, datamodule=datamodule)
        assert trainer.callback_metrics["train/mean_logit_square"] > 0
        assert module.hparams["loss_terms"] == {"mean_logit_square": {"weight": 0.01}}
    finally:
        LOSS_TERMS.pop("mean_logit_square")
