"""Using a trained model: `rega chat` (history, commands, no TTY needed), `rega predict` (prompt rules, resume,
refusal of changed settings, metric plugins) and the command list of `rega --help`."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rega.cli import COMMANDS, LIGHTNING_COMMANDS, main
from rega.config import ModelConfig, SamplingConfig
from rega.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
SHORT = SamplingConfig(do_sample=False, temperature=1.0, top_p=1.0, max_new_tokens=3)


def test_help_lists_every_command_once_with_one_line(capsys):
    main(["--help"])
    lines = capsys.readouterr().out.splitlines()
    listed = [line.split()[0] for line in lines[1:-1]]
    assert listed == [
        *LIGHTNING_COMMANDS,
        *COMMANDS,
    ]  # fit, validate and every project command, chat + predict
    assert {"chat", "predict"} <= set(listed) and "test" not in listed
    assert all(len(line.split(maxsplit=1)) == 2 for line in lines[1:-1])  # each with its summary


def test_lightning_test_stays_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--config", "x.yaml"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: 'test' is not available; ")


# ------------------------------------------------------------------------------------------------ chat


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    from rega.use.loading import load_for_use

    return load_for_use(ModelConfig(name_or_path=str(tiny_model_dir)), None, "cpu")


def session_of(loaded, **kwargs):
    from rega.use.chat import ChatSession

    return ChatSession(loaded, system="You are terse.", sampling=SHORT, **kwargs)


def test_chat_history_grows_reset_clears_and_system_changes_the_prompt(loaded):
    from rega.use.chat import run_session

    session = session_of(loaded)
    out = io.StringIO()
    run_session(session, io.StringIO("hello there\n\nhow are you\n"), out)
    assert [user for user, _ in session.history] == ["hello there", "how are you"]  # blank lines are skipped
    before = session.render("next")
    assert "hello there" in before and "how are you" in before and "You are terse." in before

    assert session.handle("/system You are a pirate.", out)
    after = session.render("next")
    assert "You are a pirate." in after and "You are terse." not in after and "hello there" in after

    session.handle("/reset", out)
    assert session.history == [] and "hello there" not in session.render("next")
    assert "(history cleared)" in out.getvalue()

    run_session(session, io.StringIO("one\n/exit\ntwo\n"), out)  # nothing after /exit is read
    assert [user for user, _ in session.history] == ["one"]


def test_chat_role_command_and_unknown_commands(loaded):
    session = session_of(loaded)
    out = io.StringIO()
    session.handle("/role medical", out)
    assert session.system.startswith("You are an experienced medical expert")
    session.handle("/role astrology", out)  # a typo is reported, the session goes on
    assert "(error: no role prompt for domain(s) astrology" in out.getvalue()
    assert session.system.startswith("You are an experienced medical expert")
    session.handle("/what", out)
    assert "/reset forgets the history" in out.getvalue()


def test_chat_drops_the_oldest_exchanges_to_fit_the_context(loaded):
    from rega.use.chat import encode

    alone = len(encode(loaded, "You are terse.", "third one", []))
    session = session_of(loaded, max_context_tokens=alone + SHORT.max_new_tokens + 5)  # no room for history
    out = io.StringIO()
    for text in ("first question", "second one", "third one"):
        session.handle(text, out)
    assert [user for user, _ in session.history] == ["third one"]
    assert "(dropped the 1 oldest exchange(s)" in out.getvalue()


def test_chat_command_reads_a_pipe(tiny_model_dir):
    """No TTY: the command reads stdin lines, answers each (streamed to stdout) and ends at /exit."""
    command = [sys.executable, str(REPO / "cli.py"), "chat", "--model.name_or_path", str(tiny_model_dir),
               "--role", "legal", "--decoding.max_new_tokens", "3", "--device", "cpu"]  # fmt: skip
    done = subprocess.run(command, input="hi\n/system\n/exit\nnever\n", capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(system prompt: 'You are an experienced legal expert" in done.stdout
    assert (
        "system prompt: 'You are an experienced legal expert" in done.stderr
    )  # the banner, not in the answers
    both = subprocess.run([*command, "--system", "x"], input="", capture_output=True, text=True, timeout=300)
    assert both.returncode == 2 and both.stderr.strip().endswith(
        "error: give either --role DOMAIN or --system TEXT, not both"
    )


# ------------------------------------------------------------------------------------------------ predict


def predict_args(tiny_model_dir, output, *extra):
    return ["predict", "--input_file", "demo:medical.jsonl", "--limit", "6", "--batch_size", "2",
            "--model.name_or_path", str(tiny_model_dir), "--decoding.max_new_tokens", "3", "--device", "cpu",
            "--output", str(output), *extra]  # fmt: skip


def rows(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "predictions.jsonl").read_text().splitlines()]


def test_predict_resumes_after_a_kill_generating_only_what_is_missing(tiny_model_dir, tmp_path, monkeypatch):
    import rega.use.predict as predict

    real, prompts_seen = predict.generate_batch, []

    def counting(model, tokenizer, prompts, sampling, fail_after=None):
        prompts_seen.append(len(prompts))
        if fail_after is not None and len(prompts_seen) > fail_after:
            raise KeyboardInterrupt  # killed mid-run, after one whole batch was written
        return real(model, tokenizer, prompts, sampling)

    out = tmp_path / "pred"
    monkeypatch.setattr(predict, "generate_batch", lambda *a: counting(*a, fail_after=1))
    with pytest.raises(SystemExit):
        main(predict_args(tiny_model_dir, out, "--rule", "role"))
    assert not (out / "predictions.jsonl").exists() and prompts_seen == [2, 2]
    monkeypatch.setattr(predict, "generate_batch", counting)
    prompts_seen.clear()
    main(predict_args(tiny_model_dir, out, "--rule", "role"))
    assert sum(prompts_seen) == 4  # the 2 answered before the kill are not generated again
    got = rows(out)
    assert [r["id"] for r in got] == [f"demo-med-{k}" for k in ("mcq-001", "mcq-002", "mcq-003", "mcq-004",
                                                                 "mcq-005", "mcq-006")]  # fmt: skip
    assert {(r["rule"], r["prompt"]) for r in got} == {("role", "medical")}
    assert got[0]["system"].startswith("You are an experienced medical expert") and got[0]["reference"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["sampling"]["do_sample"] is False  # greedy by default
    prompts_seen.clear()
    main(predict_args(tiny_model_dir, out, "--rule", "role", "--limit", "7"))  # one more record: one answer
    assert prompts_seen == [1] and len(rows(out)) == 7


def test_predict_refuses_changed_settings_naming_the_field(tiny_model_dir, tmp_path):
    out = tmp_path / "pred"
    main(predict_args(tiny_model_dir, out, "--limit", "2"))
    assert {r["rule"] for r in rows(out)} == {"central"}
    for extra, field in (
        (["--decoding.max_new_tokens", "4"], "sampling.max_new_tokens: 3 -> 4"),
        (["--rule", "role:legal"], "rule: 'central' -> 'role:legal'"),
        (["--prompts.central", "Be brief."], "prompts.central: "),
    ):
        with pytest.raises(ConfigError, match=f"made with other settings.*{field}"):
            from rega.use.predict import predict_command

            predict_command(**parse_predict(tiny_model_dir, out, ["--limit", "2", *extra]))


def parse_predict(tiny_model_dir, output, extra) -> dict:
    from jsonargparse import ArgumentParser

    from rega.use.predict import predict_command

    parser = ArgumentParser()
    parser.add_function_arguments(predict_command)
    return parser.instantiate_classes(parser.parse_args(predict_args(tiny_model_dir, output, *extra)[1:]))


METRIC_PLUGIN = '''
def starts_like_reference(response: str, record) -> float:
    """1.0 when the answer's first character is the reference's (e.g. the option letter)."""
    return float(bool(response) and response[:1] == record.output[:1])
'''


def test_predict_metric_from_a_plugin_module(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """docs/extending.md's metric example: a function, and one YAML line naming it."""
    (tmp_path / "my_metrics.py").write_text(METRIC_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "predict.yaml"
    config.write_text("metrics: [my_metrics.starts_like_reference]\n")
    out = tmp_path / "pred"
    main([*predict_args(tiny_model_dir, out), "--config", str(config)])
    got = rows(out)
    assert all(set(r["scores"]) == {"starts_like_reference"} for r in got)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["metrics"]["starts_like_reference"]) == {"medical/demo_med_mcq"}
    assert "starts_like_reference: medical/demo_med_mcq" in capsys.readouterr().out


def test_predict_counts_skipped_rows_and_leaves_only_its_outputs(tiny_model_dir, tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    good = {"instruction": "Is water wet?", "domain": "medical"}
    source.write_text(
        "\n".join(json.dumps(r) for r in [good, {"domain": "medical"}, {**good, "id": "b"}]) + "\n"
    )
    out = tmp_path / "pred"
    main(["predict", "--input_file", str(source), "--model.name_or_path", str(tiny_model_dir),
          "--decoding.max_new_tokens", "2", "--device", "cpu", "--output", str(out), "--skip_invalid", "true"])  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["records"] == 2 and summary["skipped_invalid"] == 1
    assert f"{source}:2" in summary["skipped_rows"][0]
    assert "1 invalid rows skipped" in capsys.readouterr().out
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    "text", ["The patient reports a mild cough. " * 600, "患者报告轻微咳嗽，没有发烧。" * 1500]
)
def test_chat_cuts_a_message_longer_than_the_context(loaded, monkeypatch, text):
    """A 20,000-character message is sent as a bounded prompt (the tiny model's own limit, 1,024 positions, is
    below max_context_tokens), its head and tail kept; the cut is said in one line."""
    import rega.use.chat as chat

    assert len(text) >= 20_000
    sent = []
    monkeypatch.setattr(chat, "stream_reply", lambda loaded, ids, sampling, out: sent.append(ids) or "ok")
    session = session_of(loaded, max_context_tokens=2048)
    out = io.StringIO()
    session.handle(text, out)
    limit = loaded.model.config.max_position_embeddings
    assert len(sent[0]) + SHORT.max_new_tokens <= min(2048, limit)
    assert len(sent[0]) > min(2048, limit) - SHORT.max_new_tokens - 40  # the room is used, not wasted
    (line,) = [line for line in out.getvalue().splitlines() if line.startswith("(message cut:")]
    kept = session.history[0][0]
    assert kept.startswith(text[:10]) and kept.endswith(text.strip()[-10:]) and chat.CUT_MARK in kept


def test_chat_with_standard_input_closed(tiny_model_dir):
    command = [sys.executable, str(REPO / "cli.py"), "chat", "--model.name_or_path", str(tiny_model_dir),
               "--decoding.max_new_tokens", "3", "--device", "cpu"]  # fmt: skip
    done = subprocess.run(
        " ".join(command) + " 0<&-", shell=True, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "error" not in done.stderr
