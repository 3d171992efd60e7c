"""EvaluationCallback with an LLM judge (#13): MT-Bench graded by a loopback judge during a tiny fit — scores logged
as scalars, files under the eval folder, the API key nowhere in the run directory — and, without the key, one log
line saying the judged benchmarks are skipped."""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

import pytest
import yaml
from test_eval_callback import ROWS, TinyData, TinyModule, trainer_for
from test_judge import KEY_ENV, FakeJudgeServer, assert_secret_absent

from rega.callbacks import EvaluationCallback
from rega.config import DataSource
from rega.errors import ConfigError


@pytest.fixture
def task_file(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return path


def judge_file(tmp_path: Path, base_url: str) -> str:
    config = {"base_url": base_url, "model": "judge-test", "api_key_env": KEY_ENV, "timeout_s": 5.0,
              "max_retries": 1, "backoff_s": 0.01, "cache_dir": str(tmp_path / "judge-cache")}  # fmt: skip
    (tmp_path / "judge.yaml").write_text(yaml.safe_dump(config))
    return str(tmp_path / "judge.yaml")


def judged_callback(task: Path, judge_config: str, output_dir: Path | None = None) -> EvaluationCallback:
    return EvaluationCallback(
        tasks=[DataSource(str(task))], limit_per_task=1, max_new_tokens=2, closed_max_new_tokens=2,
        general_mc=[], compare_base=False, rules=["central"],
        judge=["mt_bench"], judge_config=judge_config, judge_limit=1, judge_max_new_tokens=8,
        output_dir=None if output_dir is None else str(output_dir),
    )  # fmt: skip


def test_callback_runs_the_judge_and_logs_its_score(
    tiny_model_config, task_file, tmp_path, shared_data, monkeypatch
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    secret = f"sk-rega-callback-{uuid.uuid4().hex}"
    monkeypatch.setenv(KEY_ENV, secret)
    module = TinyModule(tiny_model_config)
    with FakeJudgeServer(secret) as server:  # every grading: "Rating: [[7]]"
        callback = judged_callback(task_file, judge_file(tmp_path, server.base_url))
        trainer = trainer_for(tmp_path / "run", callback)
        trainer.fit(module, datamodule=TinyData(module.chat.default_system))
        assert len(server.hits) == 2 and server.auth_failures == 0  # one question, two turns

    eval_dir = Path(trainer.log_dir) / "eval"
    result = json.loads((eval_dir / "eval.json").read_text(encoding="utf-8"))
    mt_bench = result["judge"]["mt_bench"]
    assert mt_bench["overall"] == {"mean": 7.0, "n": 2, "missing": 0} and mt_bench["n_questions"] == 1
    scores = json.loads((eval_dir / "epoch2" / "mt_bench" / "scores.json").read_text(encoding="utf-8"))
    assert scores["overall"] == mt_bench["overall"]
    assert (eval_dir / "epoch2" / "mt_bench" / "model_judgment" / "judge-test_single.jsonl").exists()
    assert float(trainer.callback_metrics["eval/mt_bench/score"]) == 7.0
    events = EventAccumulator(trainer.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("eval/mt_bench/score")] == [(4, 7.0)]
    assert_secret_absent(tmp_path / "run", secret)


def test_callback_without_the_key_skips_the_judge_in_one_line(
    tiny_model_config, task_file, tmp_path, shared_data, monkeypatch, caplog
):
    monkeypatch.delenv(KEY_ENV, raising=False)
    module = TinyModule(tiny_model_config)
    with FakeJudgeServer("unused") as server, caplog.at_level(logging.INFO, logger="rega"):
        callback = judged_callback(task_file, judge_file(tmp_path, server.base_url))
        trainer = trainer_for(tmp_path / "run", callback, logger=False)
        trainer.fit(module, datamodule=TinyData("p_c"))
        assert server.hits == []
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert skipped == [
        f"evaluation: judged benchmarks mt_bench skipped: the judge's API key variable {KEY_ENV} is not set"
    ]
    result = callback.results[-1]
    assert "judge" not in result and result["rules"]["central"]["overall"] is not None  # the rest still ran


def test_callback_without_a_judge_says_nothing(caplog):
    with caplog.at_level(logging.INFO, logger="rega"):
        callback = EvaluationCallback(general_mc=[])
    assert callback.judge.benchmarks == [] and caplog.records == []
    with pytest.raises(ConfigError, match="go together"):
        EvaluationCallback(judge=["mt_bench"])


@pytest.mark.slow
def test_callback_judges_once_under_ddp(tiny_model_config, task_file, tmp_path, shared_data, monkeypatch):
    """Two CPU processes (gloo): rank 0 alone answers and asks the judge (two gradings, not four), the other rank
    waits for the broadcast instead of hanging or judging again, and rank 0 writes the judged result."""
    import lightning as L

    secret = f"sk-rega-ddp-{uuid.uuid4().hex}"
    monkeypatch.setenv(KEY_ENV, secret)  # the spawned ranks inherit the environment
    module = TinyModule(tiny_model_config)
    out = tmp_path / "ddp"
    with FakeJudgeServer(secret) as server:
        callback = judged_callback(task_file, judge_file(tmp_path, server.base_url), output_dir=out)
        trainer = L.Trainer(
            max_epochs=2, accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
            limit_train_batches=1, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[callback],
        )  # fmt: skip
        trainer.fit(module, datamodule=TinyData(module.chat.default_system))
        assert len(server.hits) == 2 and server.auth_failures == 0
    result = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    assert result["judge"]["mt_bench"]["overall"] == {"mean": 7.0, "n": 2, "missing": 0}
    assert_secret_absent(tmp_path, secret)
