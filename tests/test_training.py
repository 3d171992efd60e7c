"""Training: label masking, padding-free batches, LoRA-only updates, exact resume, DDP, adapter export."""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cluster_helpers import fit_args, read_scalars, run_env

from rega.config import DataSource, ModelConfig
from rega.data.chat import IGNORE_INDEX, ChatFormat
from rega.data.corpus import CorpusConfig, write_corpus
from rega.datamodules import REGADataModule
from rega.datamodules.tokenized import collate_rows, domain_list, examples_key, pack_rows, plan_batches
from rega.errors import ConfigError
from rega.model_source import load_tokenizer
from rega.modules.lit_module import REGAModule
from rega.modules.model import LoraSettings

REPO = Path(__file__).resolve().parent.parent
DEMO_DOMAINS = [
    DataSource("demo:medical.jsonl"),
    DataSource("demo:legal.jsonl"),
    DataSource("demo:finance.jsonl"),
]


def demo_corpus(strategy: str = "rega") -> CorpusConfig:
    return CorpusConfig(
        strategy=strategy, domains=DEMO_DOMAINS, general=[DataSource("demo:general.jsonl", limit=20)]
    )


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig())


def encode_one(chat, system, user, response, max_length):
    return chat.encode_many([(system, user, response)], max_length)[0]


@pytest.mark.parametrize("placement", ["system", "prefix"])
def test_labels_mask_everything_but_the_response(tokenizer, placement):
    chat = ChatFormat(tokenizer, system_placement=placement)
    system, user, response = (
        "You are a legal expert.",
        "Is a verbal contract binding?",
        "Often yes, with exceptions.",
    )
    enc = encode_one(chat, system, user, response, max_length=512)
    prompt_ids = chat.encode_prompt(system, user)
    assert enc.input_ids[: len(prompt_ids)] == prompt_ids
    assert enc.labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    answer = enc.labels[len(prompt_ids) :]
    assert IGNORE_INDEX not in answer and answer == enc.input_ids[len(prompt_ids) :]
    assert tokenizer.decode(answer).startswith(response)
    rendered = tokenizer.decode(prompt_ids)
    if placement == "system":
        assert "<|im_start|>system\nYou are a legal expert.<|im_end|>" in rendered
    else:  # prefixed to the user turn, and the template's own default system prompt stays
        assert "<|im_start|>user\nYou are a legal expert.\n\nIs a verbal contract binding?" in rendered


@pytest.mark.parametrize("template", ["vicuna_v1.1", "belle"])
def test_named_templates_render_their_exact_format(tokenizer, template):
    chat = ChatFormat(tokenizer, template=template)
    if template == "vicuna_v1.1":
        assert chat.prompt_text(chat.default_system, "Hi").endswith("questions. USER: Hi ASSISTANT:")
    else:
        assert chat.default_system is None
        assert chat.prompt_text("", "你好") == "Human: 你好\n\nAssistant:"
    enc = encode_one(chat, chat.default_system or "", "Hi", "Hello there.", max_length=128)
    answer = [t for t in enc.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(answer).strip().startswith("Hello there.")
    assert answer[-1] == tokenizer.eos_token_id


def test_truncation_keeps_the_prompt_and_cuts_the_response(tokenizer):
    chat = ChatFormat(tokenizer)
    prompt_len = len(chat.encode_prompt("sys", "question"))
    enc = encode_one(chat, "sys", "question", "word " * 200, max_length=prompt_len + 10)
    assert enc.truncated and len(enc.input_ids) == prompt_len + 10
    assert (
        encode_one(chat, "sys", "question " * 300, "answer " * 20, max_length=64) is None
    )  # no room: dropped


def test_pack_rows_respects_capacity_and_keeps_every_example():
    lengths = [5, 9, 3, 7, 7, 2, 10, 1]
    rows = pack_rows(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)


@pytest.fixture(scope="module")
def datamodule(tiny_model_config, tmp_path_factory):
    dm = REGADataModule(
        corpus=demo_corpus(),
        val=[DataSource("demo:medical.jsonl", limit=8), DataSource("demo:legal.jsonl", limit=8)],
        model=tiny_model_config,
        max_length=256,
        batch_size=4,
        cache=str(tmp_path_factory.mktemp("cache")),
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_a_cached_validation_set_is_indexed_by_the_domains_of_the_run_that_reads_it(
    datamodule, tiny_model_config
):
    # The same validation examples under a corpus with a general domain (REGA) and one without (FT): a file cached
    # by the first must not hand the second domain ids that index the first's list (a crash or mislabelled losses).
    val = [DataSource("demo:medical.jsonl", limit=8), DataSource("demo:legal.jsonl", limit=8)]
    for strategy in ("rega", "ft"):
        dm = REGADataModule(
            corpus=demo_corpus(strategy), val=val, model=tiny_model_config, max_length=256,
            cache=str(datamodule.cache_root),
        )  # fmt: skip
        dm.prepare_data()
        expected = [e.domain for e in dm.val_examples(dm.build_corpus().prompts)]
        assert [dm.domains[i] for i in dm.val_data.domain_ids] == expected
    assert "general" not in dm.domains


def test_cache_is_keyed_by_everything_that_changes_tokens(datamodule, tiny_model_config):
    corpus = datamodule.build_corpus()

    def keys(dm):  # the tokenized file's key (from the examples) and the prepared record's (from the config)
        corpus = dm.build_corpus()
        domains = domain_list(corpus.examples, dm.val_examples(corpus.prompts))
        return examples_key(dm.chat, corpus.examples, domains, dm.max_length), dm.record_key()

    key, record = keys(datamodule)
    assert key == examples_key(datamodule.chat, corpus.examples, datamodule.domains, 256)
    same = REGADataModule(
        corpus=demo_corpus(), model=tiny_model_config, max_length=256, cache=str(datamodule.cache_root)
    )
    assert keys(same)[0] == key and same.record_key() != record  # no validation sets: another record
    longer = REGADataModule(
        corpus=demo_corpus(), model=tiny_model_config, max_length=300, cache=str(datamodule.cache_root)
    )
    assert all(a != b for a, b in zip(keys(longer), (key, record)))
    vicuna = ModelConfig(name_or_path=tiny_model_config.name_or_path, chat_template="vicuna_v1.1")
    other = REGADataModule(
        corpus=demo_corpus(), model=vicuna, max_length=256, cache=str(datamodule.cache_root)
    )
    assert all(a != b for a, b in zip(keys(other), (key, record)))
    corpus_b = REGADataModule(
        corpus=CorpusConfig(strategy="ftrp", domains=DEMO_DOMAINS), model=tiny_model_config, max_length=256
    )
    assert all(a != b for a, b in zip(keys(corpus_b), (key, record)))


def test_setup_on_another_rank_reads_what_prepare_data_wrote(datamodule, tiny_model_config, monkeypatch):
    import rega.datamodules.rega_datamodule as module

    def no_build(*args, **kwargs):
        raise AssertionError("setup built the corpus")

    monkeypatch.setattr(module, "build_corpus", no_build)
    other = REGADataModule(
        corpus=demo_corpus(),
        val=[DataSource("demo:medical.jsonl", limit=8), DataSource("demo:legal.jsonl", limit=8)],
        model=tiny_model_config,
        max_length=256,
        batch_size=4,
        cache=str(datamodule.cache_root),
    )
    other.setup("fit")
    assert other.domains == datamodule.domains and other.prompts == datamodule.prompts
    assert other.manifest == datamodule.manifest
    assert np.array_equal(other.train_data.tokens, datamodule.train_data.tokens)
    assert np.array_equal(other.train_data.spans, datamodule.train_data.spans)


def test_a_corpus_folder_trains_on_exactly_its_examples(datamodule, tiny_model_config, tmp_path):
    write_corpus(datamodule.build_corpus(), tmp_path / "corpus")
    fixed = REGADataModule(
        corpus_dir=str(tmp_path / "corpus"),
        val=[DataSource("demo:medical.jsonl", limit=8), DataSource("demo:legal.jsonl", limit=8)],
        model=tiny_model_config,
        max_length=256,
        batch_size=4,
        cache=str(tmp_path / "cache"),
    )
    fixed.prepare_data()
    assert fixed.strategy == "rega" and fixed.pending_distillation is None
    assert fixed.prompts == datamodule.prompts and fixed.domains == datamodule.domains
    assert np.array_equal(fixed.train_data.tokens, datamodule.train_data.tokens)
    with pytest.raises(ConfigError, match="data.corpus and data.corpus_dir"):
        REGADataModule(corpus=demo_corpus(), corpus_dir=str(tmp_path / "corpus"), model=tiny_model_config)


@pytest.mark.parametrize("mode", ["packed", "grouped"])
def test_batched_loss_equals_examples_one_at_a_time(datamodule, tiny_model_config, mode):
    """Each example's loss inside a packed/grouped batch (the per-sequence attention REGAModule trains with)
    equals its loss alone (the plain peft forward: transformers' masked SDPA)."""
    module = REGAModule(model=tiny_model_config, lora=LoraSettings(dropout=0.0))
    module.configure_model()
    data = datamodule.train_data
    rows = plan_batches(data.lengths.tolist(), mode, 4, 256, seed=0)[0]
    batch = collate_rows(data, rows, pad_id=0)
    module.train()  # dropout 0: training mode changes nothing else
    with torch.no_grad():
        losses, mask = module.token_losses(batch)
        row_of, col_of = mask.nonzero(as_tuple=True)
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                n = int(data.lengths[i])
                sel = (row_of == r) & (col_of >= start) & (col_of < start + n - 1)
                single = collate_rows(data, [[i]], pad_id=0)
                logits = module.model(
                    input_ids=single["input_ids"], attention_mask=single["attention_mask"]
                ).logits
                targets = single["labels"][0, 1:]
                keep = targets != IGNORE_INDEX
                single_losses = F.cross_entropy(logits[0, :-1][keep], targets[keep], reduction="none")
                torch.testing.assert_close(losses[sel], single_losses, rtol=1e-4, atol=1e-5)
                start += n
    assert mode != "packed" or any(len(row) > 1 for row in rows)  # the packed case really packs


def test_micro_batches_give_the_whole_batch_gradient(datamodule, tiny_model_config, tmp_path):
    import lightning as L

    class Grads(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}

    grads = {}
    for micro in (None, 1, 3):
        module = REGAModule(model=tiny_model_config, lora=LoraSettings(dropout=0.0), micro_batch_size=micro)
        torch.manual_seed(0)  # the same LoRA initialisation
        module.configure_model()
        callback = Grads()
        trainer = L.Trainer(
            accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            limit_val_batches=0, default_root_dir=tmp_path, callbacks=[callback],
        )  # fmt: skip
        trainer.fit(module, datamodule=datamodule)
        grads[micro] = callback.grads
    assert grads[None] and grads[None].keys() == grads[1].keys() == grads[3].keys()
    assert any(g.abs().max() > 0 for g in grads[None].values())
    for micro in (1, 3):
        for name, grad in grads[None].items():
            torch.testing.assert_close(grads[micro][name], grad, rtol=1e-4, atol=1e-7)


def test_a_checkpointed_step_with_its_backward_on_another_thread_gives_the_plain_gradient(
    datamodule, tiny_model_config, tmp_path
):
    """A training step as on CUDA (backward on autograd's own thread, layers recomputed there) gives the same
    gradients as a plain step: nothing the packed forward needs is kept in thread- or context-bound state."""
    import dataclasses

    import lightning as L
    from autograd_thread import backward_on_another_thread

    class Grads(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}

    grads = []
    for checkpointing in (False, True):
        model = dataclasses.replace(tiny_model_config, gradient_checkpointing=checkpointing)
        module = REGAModule(model=model, lora=LoraSettings(dropout=0.0), micro_batch_size=2)
        torch.manual_seed(0)
        module.configure_model()
        with torch.no_grad():  # B starts at zero, which would leave every A gradient zero
            for name, param in module.model.named_parameters():
                param.add_(torch.randn_like(param) * 0.05 if "lora_B" in name else 0)
        callback = Grads()
        trainer = L.Trainer(
            accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            limit_val_batches=0, default_root_dir=tmp_path, callbacks=[callback],
        )  # fmt: skip
        with backward_on_another_thread() if checkpointing else contextlib.nullcontext():
            trainer.fit(module, datamodule=datamodule)
        grads.append(callback.grads)
    plain, threaded = grads
    assert plain.keys() == threaded.keys() and any("lora_A" in n for n in plain)
    for name, grad in plain.items():
        torch.testing.assert_close(threaded[name], grad, rtol=1e-4, atol=1e-7)


def test_trainer_options_replaced_by_module_ones_are_refused(capsys):
    from rega.cli import main

    refused = (("accumulate_grad_batches", "micro_batch_size"), ("gradient_clip_val", "max_grad_norm"))
    for option, replacement in refused:
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", str(REPO / "tests/configs/tiny_fit.yaml"), f"--trainer.{option}", "2"])
        assert exit_info.value.code == 2
        assert replacement in capsys.readouterr().err


def test_training_changes_lora_weights_only(datamodule, tiny_model_config, tmp_path):
    import lightning as L

    module = REGAModule(model=tiny_model_config, learning_rate=1e-2, adapter_dir=str(tmp_path / "adapter"))
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=2,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=datamodule)
    changed = {n for n, p in module.named_parameters() if not torch.equal(before[n], p.detach())}
    lora = {n for n, p in module.named_parameters() if "lora_" in n}
    assert changed and changed <= lora
    assert {n for n in lora if "lora_B" in n} <= changed
    assert all(p.requires_grad == ("lora_" in n) for n, p in module.named_parameters())

    from peft import PeftModel

    from rega.modules.model import load_model

    base = load_model(tiny_model_config)
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(load_model(tiny_model_config), tmp_path / "adapter")(
            input_ids=ids
        ).logits
    assert not torch.allclose(plain, adapted)


def test_killed_run_resumes_like_an_uninterrupted_one(tiny_model_dir, tmp_path):
    """Killed right after a mid-epoch checkpoint, a run resumed from it continues the uninterrupted loss curve."""
    every_2_steps = [
        "--config",
        str(REPO / "tests/configs/step_checkpoints.yaml"),
        "--trainer.max_epochs",
        "3",
    ]
    full, broken = tmp_path / "full", tmp_path / "broken"
    done = subprocess.run(fit_args(tiny_model_dir, full, *every_2_steps), env=run_env(), capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    # A quiet run: no third-party noise (rega.logs), the parameter counts instead of Lightning's summary table.
    printed = (done.stdout + done.stderr).decode()
    noise = ("is_gradient_checkpointing", "LeafSpec", "litlogger", "FLOPs", "transfer_batch_to_device")
    assert not [n for n in noise if n in printed]
    assert "trainable of" in printed and "REGA run finished" in printed
    reference = read_scalars(full, "train/loss")
    steps_per_epoch = json.loads(next(full.rglob("summary.json")).read_text())["optimizer_steps"] // 3
    assert steps_per_epoch % 2 == 1  # so the checkpoint at step steps_per_epoch + 1 is mid-epoch

    kill = [
        "--trainer.callbacks+=cluster_helpers.ExitAtStep",
        f"--trainer.callbacks.step={steps_per_epoch + 2}",
    ]
    killed = subprocess.run(
        fit_args(tiny_model_dir, broken, *every_2_steps, *kill), env=run_env(), capture_output=True
    )
    assert killed.returncode == 17, killed.stderr.decode()[-3000:]
    checkpoint = next(broken.rglob("last.ckpt"))
    state = torch.load(checkpoint, weights_only=False, map_location="cpu")
    assert state["state_dict"] and all("lora_" in k for k in state["state_dict"])  # only trainable weights
    assert state["global_step"] == steps_per_epoch + 1 and state["epoch"] == 1  # in the middle of epoch 1

    resumed = subprocess.run(
        [*fit_args(tiny_model_dir, broken, *every_2_steps), "--ckpt_path", str(checkpoint)],
        env=run_env(),
        capture_output=True,
    )
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    assert b"not resumable" not in resumed.stderr
    after = read_scalars(broken, "train/loss")
    assert sorted(after) == sorted(reference)  # no step repeated, none skipped
    for step in reference:
        assert after[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step
    for tag in ("val/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/padding_fraction"):
        assert read_scalars(full, tag), tag
    assert any(read_scalars(full, f"val/loss_{d}") for d in ("medical", "legal"))
    assert (full / "adapter" / "adapter_config.json").exists()
    summary = json.loads(next(full.rglob("summary.json")).read_text())
    assert summary["strategy"] == "rega" and summary["optimizer_steps"] > 0


def test_ddp_with_two_cpu_processes_trains(tiny_model_dir, tmp_path):
    args = fit_args(tiny_model_dir, tmp_path, "--config", str(REPO / "configs/trainer/ddp_cpu.yaml"),
                    "--trainer.max_epochs", "1", "--trainer.max_steps", "3")  # fmt: skip
    done = subprocess.run(args, env=run_env(), capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert read_scalars(tmp_path, "train/loss")


def test_model_trains_with_dropout_active(tiny_model_config):
    module = REGAModule(model=tiny_model_config, lora=LoraSettings(dropout=0.5))
    module.configure_model()
    assert all(m.training for m in module.model.modules())


def test_single_domain_ftrp_validates_the_domains_it_has_prompts_for(tiny_model_config, tmp_path):
    dm = REGADataModule(
        corpus=CorpusConfig(strategy="ftrp", domains=DEMO_DOMAINS, only_domains=["medical"]),
        val=[DataSource("demo:medical.jsonl", limit=4), DataSource("demo:legal.jsonl", limit=4)],
        model=tiny_model_config,
        max_length=256,
        cache=str(tmp_path),
    )
    dm.prepare_data()
    assert dm.val_data is not None and {dm.domains[i] for i in dm.val_data.domain_ids} == {"medical"}


def test_zero_shot_fit_is_refused_in_one_line(tiny_model_config, tmp_path):
    from rega.errors import ConfigError

    dm = REGADataModule(
        corpus=CorpusConfig(strategy="zero_shot"), model=tiny_model_config, cache=str(tmp_path)
    )
    with pytest.raises(ConfigError, match="builds no training examples.*cli.py evaluate"):
        dm.prepare_data()


def test_the_fit_summary_leaves_out_a_metric_the_run_did_not_log(tmp_path):
    from rega.lightning_cli import summary_lines

    summary = {"strategy": "ft", "model": "m", "optimizer_steps": 3, "seconds": 1.0, "adapter": "a",
               "log_dir": str(tmp_path), "metrics": {"train/loss": 1.5}}  # fmt: skip
    out = "\n".join(summary_lines(summary))
    assert "train/loss=1.5000" in out and "val/loss" not in out and "nan" not in out
