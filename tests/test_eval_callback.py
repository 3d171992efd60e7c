"""EvaluationCallback in a tiny Lightning run: schedule, eval files, TensorBoard scalars and text."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from rega.callbacks import EvaluationCallback
from rega.config import DataSource
from rega.data.chat import ChatFormat
from rega.data.prompts import RolePrompts
from rega.datamodules import TrainingData
from rega.model_source import load_tokenizer
from rega.modules.model import LoraSettings, add_lora, load_model

ROWS = [
    {"id": "pq1", "instruction": "Is it? Reply yes, no or maybe.", "input": "ctx", "output": "yes",
     "domain": "medical", "task": "pubmedqa", "choices": ["yes", "no", "maybe"], "answer": "yes"},
    {"id": "mc1", "instruction": "Which one?", "input": "A. a\nB. b", "output": "B. b", "domain": "medical",
     "task": "medmcqa", "choices": ["a", "b"], "answer": "B"},
    {"id": "op1", "instruction": "Explain.", "input": "", "output": "Because it is so.", "domain": "medical",
     "task": "open"},
]  # fmt: skip


class TinyModule(L.LightningModule):
    """What the callback relies on: ``.model`` (peft-wrapped causal LM), ``.tokenizer``, ``.chat``."""

    def __init__(self, config):
        super().__init__()
        self.tokenizer = load_tokenizer(config)
        self.chat = ChatFormat(self.tokenizer)
        torch.manual_seed(0)
        self.model = add_lora(load_model(config), LoraSettings(r=4, alpha=8))
        self.model.train()

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch, labels=batch).loss
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=5e-2)


class TinyData(L.LightningDataModule):
    """What the callback relies on: ``training_data()`` with the strategy and the prompts (set in setup)."""

    def __init__(self, central: str):
        super().__init__()
        self.central, self.prompts = central, None

    def setup(self, stage: str) -> None:
        self.prompts = RolePrompts(central=self.central, roles={"medical": "You are a careful doctor."})

    def training_data(self) -> TrainingData:
        return TrainingData(strategy="rega", prompts=self.prompts)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return DataLoader([torch.randint(100, 5000, (12,), generator=g) for _ in range(4)], batch_size=2)


@pytest.fixture
def task_file(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return path


def trainer_for(tmp_path, callback, logger=True):
    return L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        default_root_dir=str(
            tmp_path
        ),  # without a logger the callback writes under it, not the working directory
        logger=TensorBoardLogger(str(tmp_path), name="tb") if logger else False,
        limit_train_batches=2,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        callbacks=[callback],
    )


def test_callback_evaluates_after_epoch_two_and_logs(tiny_model_config, task_file, tmp_path, shared_data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    module = TinyModule(tiny_model_config)
    callback = EvaluationCallback(
        tasks=[DataSource(str(task_file))],
        limit_per_task=2,
        max_new_tokens=4,
        closed_max_new_tokens=3,
        loglik_choices=True,
        general_mc=["arc_easy"],
        general_mc_limit=2,
        general_mc_backend="native",
        drift=[DataSource("shared:general_en/dev.jsonl")],
        drift_limit=2,
    )
    trainer = trainer_for(tmp_path, callback)
    trainer.fit(module, datamodule=TinyData(module.chat.default_system))

    eval_dir = Path(trainer.log_dir) / "eval"
    result = json.loads((eval_dir / "eval.json").read_text(encoding="utf-8"))
    assert {"tag", "epoch", "global_step", "rules", "general_mc", "drift", "samples", "meta"} <= set(result)
    assert (result["tag"], result["epoch"], result["global_step"]) == ("epoch2", 2, 4)
    assert set(result["rules"]) == {"central", "role"}  # the rega strategy's inference rules
    tasks = result["rules"]["role"]["domains"]["medical"]["tasks"]
    assert set(tasks) == {"pubmedqa", "medmcqa", "open"} and "ll_acc" in tasks["medmcqa"]
    assert result["general_mc"]["arc_easy"]["n"] == 2 and "delta" in result["general_mc"]["arc_easy"]
    assert "delta" in result["drift"]["general_en"]  # compare_base: adapters disabled once, at the first eval
    # evaluated once: epoch 2 ends where training ends, so the end-of-training evaluation is skipped
    assert sorted(p.name for p in eval_dir.glob("eval*.json")) == ["eval.json", "eval_epoch2.json"]
    assert (eval_dir / "base.json").exists() and (eval_dir / "epoch2" / "predictions.jsonl").exists()
    assert len(callback.results) == 1

    events = EventAccumulator(trainer.log_dir, size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    for tag in (
        "eval/central/overall",
        "eval/role/overall",
        "eval/central/medical/pubmedqa/acc",
        "eval/role/medical/open/f1",
        "eval/general_mc/arc_easy",
        "eval/drift/general_en/logprob_per_token",
    ):
        assert tag in scalars, tag
        assert [e.step for e in events.Scalars(tag)] == [4]
    assert events.Scalars("eval/central/overall")[0].value == pytest.approx(
        result["rules"]["central"]["overall"]
    )
    assert float(trainer.callback_metrics["eval/central/overall"]) == pytest.approx(
        result["rules"]["central"]["overall"]
    )  # ModelCheckpoint can monitor it
    assert "eval/samples/text_summary" in events.Tags()["tensors"]
    text = events.Tensors("eval/samples/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text.startswith("| rule | task |") and "pq1" in text


def test_callback_epochs_and_fit_end(tiny_model_config, task_file, tmp_path):
    module = TinyModule(tiny_model_config)
    out = tmp_path / "evals"
    callback = EvaluationCallback(
        tasks=[DataSource(str(task_file))],
        limit_per_task=1,
        max_new_tokens=2,
        closed_max_new_tokens=2,
        after_epochs=[1],
        general_mc=[],
        compare_base=False,
        rules=["central"],
        output_dir=str(out),
    )
    trainer_for(tmp_path, callback, logger=False).fit(module, datamodule=TinyData("p_c"))
    assert sorted(p.name for p in out.glob("eval*.json")) == [
        "eval.json",
        "eval_epoch1.json",
        "eval_step4.json",
    ]
    latest = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    assert (latest["tag"], latest["global_step"]) == ("step4", 4) and list(latest["rules"]) == ["central"]
    assert [r["tag"] for r in callback.results] == ["epoch1", "step4"]


@pytest.mark.slow
def test_callback_under_ddp_shards_and_syncs(tiny_model_config, task_file, tmp_path, shared_data):
    """Two CPU processes (gloo): work is sharded, metrics synced, rows gathered; rank 0 writes one eval.json.

    Marked slow only for its cost (two spawned processes, ~20-30 s on two shared cores).
    """
    module = TinyModule(tiny_model_config)
    out = tmp_path / "ddp"
    callback = EvaluationCallback(
        tasks=[DataSource(str(task_file))],
        max_new_tokens=3,
        closed_max_new_tokens=2,
        batch_size=1,
        loglik_choices=True,
        general_mc=["arc_easy"],
        general_mc_limit=3,
        drift=[DataSource("shared:general_en/dev.jsonl")],
        drift_limit=3,
        compare_base=False,
        output_dir=str(out),
    )
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        logger=False,
        limit_train_batches=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.fit(module, datamodule=TinyData("p_c"))
    result = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    rows = [json.loads(line) for line in (out / "epoch2" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * len(ROWS)  # both rules, every record once, gathered from both ranks
    for rule in ("central", "role"):
        tasks = result["rules"][rule]["domains"]["medical"]["tasks"]
        for task, summary in tasks.items():
            mine = [r for r in rows if r["rule"] == rule and r["task"] == task]
            assert summary["n"] == len(mine) == 1
            assert summary["score"] == pytest.approx(sum(r["score"] for r in mine) / len(mine))
    assert (
        result["general_mc"]["arc_easy"]["n"] == 3 and result["general_mc"]["arc_easy"]["backend"] == "native"
    )
    mc_rows = [json.loads(line) for line in (out / "epoch2" / "general_mc.jsonl").read_text().splitlines()]
    assert result["general_mc"]["arc_easy"]["acc"] == pytest.approx(
        sum(r["pred"] == r["gold"] for r in mc_rows) / 3
    )
    assert result["drift"]["general_en"]["n_records"] == 3
