"""The catalogue of bad input, run through the command line (``rega.cli.main`` in-process): every failure a user
can cause ends in one ``error:`` line that names the cause and the source, exit 2, no traceback; a bug exits 1;
``--debug`` shows the traceback. Then interrupted writers: a kill mid-write leaves the previous outputs whole, the
next run removes what the killed one left behind, and written files follow the umask.

Inputs are tiny and no model is trained; the tiny random LLaMA of conftest.py loads where a command needs a model.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_judge import FakeJudgeServer, default_reply

from rega.cli import main
from rega.io import HOST, atomic_dir, atomic_write
from rega.paths import REPO_ROOT

PC = "You are a helpful assistant."
GOOD = [{"id": f"m{i}", "instruction": f"Question {i}?", "output": f"Answer {i}."} for i in range(6)]


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, the one error line, all of stderr); fails unless stderr holds exactly one ``error:`` line."""
    with pytest.raises(SystemExit) as info:
        main(args)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return info.value.code, errors[0], err


def corpus_args(tmp_path: Path, domains=None, general=None, **corpus) -> list[str]:
    medical = jsonl(tmp_path / "medical.jsonl", GOOD)
    config = {
        "strategy": "rega",
        "prompts": {"lang": "en", "central": PC},
        "domains": domains if domains is not None else [{"path": str(medical), "domain": "medical"}],
        "general": general if general is not None else [{"path": "demo:general.jsonl", "domain": "general"}],
        **corpus,
    }
    path = tmp_path / "corpus.yaml"
    path.write_text(yaml.safe_dump({"corpus": config}))
    return ["corpus", "--config", str(path), "--output", str(tmp_path / "out")]


def source(path: Path, domain: str = "medical") -> list[dict]:
    return [{"path": str(path), "domain": domain}]


# ---------------------------------------------------------------------------------------- data and corpus


def _empty_domain_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    return corpus_args(
        tmp_path, domains=source(empty)
    ), rf"nothing to train on: no domain records \({empty}: holds no records\)"


def _utf16_file_emptied_by_skip_invalid(tmp_path):
    path = tmp_path / "utf16.jsonl"
    path.write_bytes(json.dumps(GOOD[0]).encode("utf-16"))
    args = corpus_args(tmp_path, domains=source(path), skip_invalid=True)
    return args, rf"nothing to train on: .*{path}: all 1 rows invalid and skipped .*UTF-16 byte-order mark"


def _rega_with_empty_general_file(tmp_path):
    empty = tmp_path / "general.jsonl"
    empty.write_text("\n")
    args = corpus_args(tmp_path, general=source(empty, "general"))
    return (
        args,
        rf"strategy .rega. needs self-distilled general data D_g, but the 'general' sources hold no records \({empty}",
    )


def _only_domains_matching_nothing(tmp_path):
    return corpus_args(tmp_path, only_domains=["legal"]), r"only_domains \['legal'\] keeps none of the loaded"


def _malformed_json_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD[0]) + '\n{"id": "x", "instruction": "Q\n', encoding="utf-8")
    return corpus_args(
        tmp_path, domains=source(path)
    ), rf"{path}:2: malformed JSON at column 30: Invalid control character$"


def _csv_record_spanning_lines(tmp_path):
    path = tmp_path / "multi.csv"
    path.write_text('id,instruction,output\na,"two\nlines",\n', encoding="utf-8")
    return corpus_args(tmp_path, domains=source(path)), rf"{path}:2: field 'output': missing"


def _wrongly_typed_field(tmp_path):
    path = jsonl(tmp_path / "typed.jsonl", [{"id": "x", "instruction": "Q", "output": 3}])
    return corpus_args(
        tmp_path, domains=source(path)
    ), rf"{path}:1: field 'output': expected a string, got int 3"


def _missing_file(tmp_path):
    return corpus_args(
        tmp_path, domains=source(tmp_path / "gone.jsonl")
    ), r"data source .*gone\.jsonl' not found"


def _unknown_strategy(tmp_path):
    return corpus_args(tmp_path, strategy="regaa"), r"unknown strategy 'regaa'; registered: "


def _mix_ratio_out_of_range(tmp_path):
    return corpus_args(tmp_path, mix_ratio=1.5), r"mix_ratio must be within \[0, 1\], got 1.5"


def _domain_without_role_prompt(tmp_path):
    path = jsonl(tmp_path / "tax.jsonl", GOOD)
    return corpus_args(tmp_path, domains=source(path, "tax")), r"no role prompt for domain\(s\) tax"


def _output_folder_in_use(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("mine")
    return corpus_args(tmp_path), r"output folder .*out holds files that are not a corpus \(thesis\.tex\)"


CORPUS_CASES = {f.__name__[1:]: f for f in (
    _empty_domain_file, _utf16_file_emptied_by_skip_invalid, _rega_with_empty_general_file,
    _only_domains_matching_nothing, _malformed_json_line, _csv_record_spanning_lines, _wrongly_typed_field,
    _missing_file, _unknown_strategy, _mix_ratio_out_of_range, _domain_without_role_prompt, _output_folder_in_use,
)}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CORPUS_CASES))
def test_corpus_bad_input(tmp_path, capsys, case):
    args, pattern = CORPUS_CASES[case](tmp_path)
    code, line, _ = run_cli(args, capsys)
    assert code == 2 and re.match(f"error: {pattern}", line), line
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_empty_source_and_tasks_without_integrated_samples_are_warned_by_name(tmp_path, capsys):
    empty = tmp_path / "legal.jsonl"
    empty.write_text("")
    medical = jsonl(tmp_path / "few.jsonl", GOOD[:4])  # 0.1 x 4 = 0.4 rounds to no D'_i sample
    main(corpus_args(tmp_path, domains=source(medical) + source(empty, "legal")))
    captured = capsys.readouterr()
    assert f"empty source: {empty}: holds no records" in captured.err
    assert "task medical/medical gets no D'_i sample (r·|D_i| = 0.1·4 < 0.5 rounds to 0)" in captured.err
    assert ["medical", "medical", "4", "0"] in [line.split() for line in captured.out.splitlines()]


# ---------------------------------------------------------------------------------------- model sources


@pytest.fixture
def hub(monkeypatch):
    """A hub endpoint on loopback (or a closed port) and no offline flags; the probe's memo is cleared."""
    import huggingface_hub.constants

    from rega import model_source

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    model_source._probe_hub.cache_clear()

    def use(endpoint: str) -> None:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)

    yield use
    model_source._probe_hub.cache_clear()


class Hub404(FakeJudgeServer):
    """Answers every request with 404, like the hub for an unknown model."""

    def __init__(self):
        super().__init__(api_key=None)
        self.httpd.RequestHandlerClass.do_GET = lambda handler: handler._send(404, {}, {"error": "not found"})


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_model_folder_missing_or_empty(tmp_path, capsys):
    (tmp_path / "empty_model").mkdir()
    for model, pattern in (
        (tmp_path / "missing", rf"model folder {tmp_path / 'missing'} does not exist"),
        (
            tmp_path / "empty_model",
            rf"model folder {tmp_path / 'empty_model'} holds no model \(no config\.json\)",
        ),
    ):
        code, line, _ = run_cli(
            [*corpus_args(tmp_path, prompts={"lang": "en"}), "--model", str(model)], capsys
        )
        assert code == 2 and re.match(f"error: {pattern}$", line), line


def test_unknown_hub_model_offline_fails_at_once_saying_so(tmp_path, capsys, hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = [*corpus_args(tmp_path, prompts={"lang": "en"}), "--model", "rega-test/no-such-model"]
    code, line, _ = run_cli(args, capsys)
    assert code == 2 and "not in the Hugging Face cache, and offline mode is on (HF_HUB_OFFLINE)" in line


def test_unreachable_hub_fails_fast_naming_the_endpoint(tmp_path, capsys, hub):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    hub(endpoint)
    args = [*corpus_args(tmp_path, prompts={"lang": "en"}), "--model", "rega-test/no-such-model"]
    code, line, _ = run_cli(args, capsys)
    assert code == 2 and f"cannot reach the hub ({endpoint}: " in line and "give a model folder" in line


def test_hub_without_the_model(tmp_path, capsys, hub):
    with Hub404() as server:
        hub(server.base_url.removesuffix("/v1"))
        args = [*corpus_args(tmp_path, prompts={"lang": "en"}), "--model", "rega-test/no-such-model"]
        code, line, _ = run_cli(args, capsys)
    assert code == 2 and line.endswith("has no such model")


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir):
    """A real LoRA adapter of the tiny model (no training: the weights do not matter here)."""
    from rega.config import ModelConfig
    from rega.modules.model import LoraSettings, add_lora, load_model

    path = tmp_path_factory.mktemp("adapter")
    add_lora(
        load_model(ModelConfig(name_or_path=str(tiny_model_dir))), LoraSettings(r=2, alpha=4)
    ).save_pretrained(path)
    return path


def merge_args(model: Path | str, adapter: Path, output: Path, *extra: str) -> list[str]:
    return [
        "merge",
        "--model.name_or_path",
        str(model),
        "--adapter",
        str(adapter),
        "--output",
        str(output),
        *extra,
    ]


def test_gguf_missing_corrupt_or_truncated(tmp_path, capsys, adapter_dir):
    from rega.model_source import embedded_gguf_path

    (tmp_path / "corrupt.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 40)
    (tmp_path / "truncated.gguf").write_bytes(embedded_gguf_path().read_bytes()[:300_000])
    for name, pattern in (
        ("missing.gguf", "GGUF file .*missing.gguf not found"),
        ("corrupt.gguf", ".*corrupt.gguf: not a GGUF model \\(no general.architecture or no tensors\\)"),
        ("truncated.gguf", ".*truncated.gguf: not a readable GGUF file, truncated or corrupt"),
    ):
        args = merge_args(tmp_path, adapter_dir, tmp_path / "merged", "--model.gguf_file", name)
        code, line, _ = run_cli(args, capsys)
        assert code == 2 and re.match(f"error: {pattern}", line), line


def test_merge_output_folder_and_adapter_problems(tmp_path, capsys, tiny_model_dir, adapter_dir):
    (tmp_path / "holds_model").mkdir()
    (tmp_path / "holds_model" / "config.json").write_text("{}")
    (tmp_path / "not_empty").mkdir()
    (tmp_path / "not_empty" / "notes.txt").write_text("mine")
    (tmp_path / "no_config").mkdir()
    for adapter, output, pattern in (
        (
            adapter_dir,
            tmp_path / "holds_model",
            r".*holds_model already holds a model; choose another output",
        ),
        (adapter_dir, tmp_path / "not_empty", r"output folder .*not_empty is not empty"),
        (tmp_path / "gone", tmp_path / "new", r"adapter folder .*gone does not exist"),
        (
            tmp_path / "no_config",
            tmp_path / "new",
            r".*no_config is not a peft adapter folder \(no adapter_config",
        ),
    ):
        code, line, _ = run_cli(merge_args(tiny_model_dir, adapter, output), capsys)
        assert code == 2 and re.match(f"error: {pattern}", line), line
    assert not (tmp_path / "new").exists()


def test_adapter_of_another_base_model(tmp_path, capsys, tiny_model_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    from rega.modules.model import LoraSettings, add_lora

    other = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1))  # fmt: skip
    add_lora(other, LoraSettings(r=2, alpha=4)).save_pretrained(tmp_path / "other")
    code, line, _ = run_cli(merge_args(tiny_model_dir, tmp_path / "other", tmp_path / "merged"), capsys)
    assert code == 2 and re.match(
        rf"error: adapter {tmp_path / 'other'} does not fit {tiny_model_dir}: ", line
    )
    assert not (tmp_path / "merged").exists()


# ---------------------------------------------------------------------------------------- evaluation and judge

KEY_ENV = "REGA_TEST_JUDGE_KEY"


def eval_args(tmp_path: Path, model: Path, *extra: str, judge: str | None = None) -> list[str]:
    args = [
        "evaluate",
        "--model.name_or_path",
        str(model),
        "--general_mc",
        "[]",
        "--output",
        str(tmp_path / "ev"),
    ]
    if judge:
        args += ["--judge", "[general_en]", "--judge_config", judge, "--judge_limit", "2"]
    return [*args, *extra]


def judge_yaml(tmp_path: Path, base_url: str, **settings) -> str:
    config = {"base_url": base_url, "model": "judge-test", "api_key_env": KEY_ENV, "timeout_s": 2.0,
              "max_retries": 1, "backoff_s": 0.01, "cache_dir": str(tmp_path / "judge-cache"), **settings}  # fmt: skip
    (tmp_path / "judge.yaml").write_text(yaml.safe_dump(config))
    return str(tmp_path / "judge.yaml")


def test_evaluation_of_zero_items_or_with_missing_inputs(tmp_path, capsys, tiny_model_dir):
    empty = tmp_path / "dev.jsonl"
    empty.write_text("")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "paper.pdf").write_text("mine")
    cases = (
        (
            ["--tasks", json.dumps(source(empty))],
            rf"no evaluation items: the task sources hold no records \({empty}\)",
        ),
        (["--adapter", str(tmp_path / "gone")], r"adapter folder .*gone does not exist"),
        (
            ["--output", str(tmp_path / "used")],
            r"output folder .*used holds files that are not evaluation outputs",
        ),
        (["--judge", "[mt_bnch]"], r"unknown judge benchmark 'mt_bnch'"),
    )
    for extra, pattern in cases:
        code, line, _ = run_cli(eval_args(tmp_path, tiny_model_dir, *extra), capsys)
        assert code == 2 and re.match(f"error: {pattern}", line), line


def test_judge_key_unset_or_openai_missing_fails_before_the_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    judge = judge_yaml(tmp_path, "http://127.0.0.1:9/v1")
    model = tmp_path / "never_loaded"  # a model load would fail on this path: the judge is checked first
    code, line, _ = run_cli(eval_args(tmp_path, model, judge=judge), capsys)
    assert code == 2 and f"environment variable {KEY_ENV}, which is not set" in line
    monkeypatch.setenv(KEY_ENV, "sk-test")
    monkeypatch.setitem(sys.modules, "openai", None)
    code, line, _ = run_cli(eval_args(tmp_path, model, judge=judge), capsys)
    assert code == 2 and line == "error: the LLM judge needs the 'openai' package: pip install 'rega[judge]'"


EXTRA_REPLIES = {"RATE11": (200, {}, "Rating: [[11]]", 0.0)}  # a rating outside 1-10


def marked_reply(content: str, attempt: int):
    return next(
        (reply for marker, reply in EXTRA_REPLIES.items() if marker in content), None
    ) or default_reply(content, attempt)


@pytest.fixture
def judged(tmp_path, monkeypatch, tiny_model_dir):
    """Evaluate general_en on two items with answers ``marker`` (no generation) against a loopback judge."""
    from rega.eval.judged import general_set

    data = tmp_path / "shared" / "general_eval_en_dev"
    data.mkdir(parents=True)
    jsonl(
        data / "dev.jsonl", [{"id": f"g{i}", "instruction": f"Say {i}.", "category": "x"} for i in range(2)]
    )
    monkeypatch.setenv("REGA_SHARED_DATA", str(tmp_path / "shared"))
    secret = "sk-rega-bad-input-0123456789"
    monkeypatch.setenv(KEY_ENV, secret)

    def run(marker: str, capsys, key: str = secret, **settings):
        def answers(model, tokenizer, chat, system, records, **kwargs):
            return [{"id": r.id, "category": "x", "answer": marker, "reference": ""} for r in records]

        monkeypatch.setattr(general_set, "generate_general_answers", answers)
        with FakeJudgeServer(key, marked_reply) as server:
            config = judge_yaml(tmp_path, server.base_url, **settings)
            outcome = run_cli(eval_args(tmp_path, tiny_model_dir, judge=config), capsys)
        assert secret not in outcome[2]
        return outcome

    return run


@pytest.mark.parametrize(
    ("marker", "settings", "pattern"),
    [
        (
            "GARBLE",
            {},
            r"general_en: 2 of 2 judge scores missing \(all of them\); first error: a judgment without",
        ),
        ("RATE11", {}, r"general_en: 2 of 2 judge scores missing \(all of them\)"),
        ("HTML200", {}, r"general_en: 2 of 2 .*first error: gave up after 2 tries .*HTML page \(Sign in\)"),
        ("ALWAYS429", {"request_budget_s": 0.5}, r"general_en: 2 of 2 .*request_budget_s=0.5\): HTTP 429"),
    ],
    ids=["unparsable_ratings", "ratings_out_of_range", "html_pages", "endless_429"],
)
def test_judged_evaluation_with_every_score_missing_fails_and_keeps_outputs(judged, capsys, tmp_path, marker,
                                                                            settings, pattern):  # fmt: skip
    code, line, _ = judged(marker, capsys, **settings)
    assert code == 2 and re.match(f"error: {pattern}", line), line
    assert line.endswith(f"(outputs kept in {tmp_path / 'ev'})")
    scores = json.loads((tmp_path / "ev" / "general_en" / "scores.json").read_text())
    assert scores["overall"] == {"mean": None, "n": 0, "missing": 2}
    final = str(tmp_path / "ev" / "general_en")  # scores.json's own paths too, not the deleted staging folder
    assert scores["answers_path"].startswith(final) and scores["judgments_path"].startswith(final)
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["judge"]["general_en"][
        "answers_path"
    ] == str(
        tmp_path / "ev" / "general_en" / "answers.jsonl"
    )  # paths name the final folder, not the temporary one


def test_rejected_judge_key(judged, capsys):
    code, line, _ = judged("fine", capsys, key="sk-the-server-expects-another-key")
    assert code == 2 and re.match(r"error: general_en: judge endpoint .* answered HTTP 401: ", line), line


def test_a_judge_share_threshold_is_configurable(judged, capsys):
    """One unparsable rating in two: fine by default (not all missing), too many with max_missing_share 0.25."""
    EXTRA_REPLIES["Say 1."] = (200, {}, "no rating", 0.0)
    try:
        code, line, _ = judged("fine", capsys, max_missing_share=0.25)
    finally:
        EXTRA_REPLIES.pop("Say 1.")
    assert code == 2 and "1 of 2 judge scores missing (more than max_missing_share=0.25)" in line


# ---------------------------------------------------------------------------------------- training and the command line


def test_fit_on_nothing_fails_naming_the_source(tmp_path, capsys, tiny_model_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    args = ["fit", "--config", str(REPO_ROOT / "configs/trainer/cpu.yaml"),
            "--config", str(REPO_ROOT / "tests/configs/tiny_fit.yaml"),
            "--model.model.name_or_path", str(tiny_model_dir), "--data.corpus.domains", json.dumps(source(empty)),
            "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
            "--data.cache", str(tmp_path / "cache"), "--model.adapter_dir", str(tmp_path / "adapter")]  # fmt: skip
    code, line, _ = run_cli(args, capsys)
    assert code == 2 and line == f"error: nothing to train on: no domain records ({empty}: holds no records)"
    assert not (tmp_path / "adapter").exists() and not list(tmp_path.rglob("summary.json"))


def test_help_lists_only_working_commands_and_lightning_test_is_refused(capsys):
    main(["--help"])
    usage = capsys.readouterr().out.splitlines()[0]
    assert usage.startswith("usage: rega {fit,validate,corpus,") and "test" not in usage
    assert "predict" in usage  # the project's own command (rega.use.predict), not Lightning's
    code, line, _ = run_cli(["test", "--config", "x.yaml"], capsys)
    assert code == 2 and line.startswith("error: 'test' is not available; ") and "rega evaluate" in line
    code, line, _ = run_cli(["tarin"], capsys)
    assert code == 2 and line.startswith("error: unknown command 'tarin'; rega {fit,")


def test_bad_plugin_module(capsys, monkeypatch):
    monkeypatch.setenv("REGA_PLUGINS", "rega_no_such_plugin")
    code, line, _ = run_cli(["corpus", "--help"], capsys)
    assert code == 2 and line.startswith(
        "error: REGA_PLUGINS names 'rega_no_such_plugin', which cannot be imported"
    )


def test_a_bug_exits_1_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    import rega.data.corpus

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(rega.data.corpus, "build_corpus", broken)
    code, line, _ = run_cli(corpus_args(tmp_path), capsys)
    assert code == 1 and line == (
        "error: unexpected ZeroDivisionError: division by zero (rerun with --debug or REGA_DEBUG=1 for the traceback)"
    )
    with pytest.raises(ZeroDivisionError):
        main([*corpus_args(tmp_path), "--debug"])
    monkeypatch.setenv("REGA_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(corpus_args(tmp_path))


def test_several_problems_get_one_line_each(tmp_path, capsys, monkeypatch):
    import rega.data.corpus
    from rega.errors import JudgeError

    problems = ("mt_bench: 160 of 160 judge scores missing (all of them)", "general_en: no item was judged")

    def fails(*args, **kwargs):
        raise JudgeError(*problems)

    monkeypatch.setattr(rega.data.corpus, "build_corpus", fails)
    with pytest.raises(SystemExit) as info:
        main(corpus_args(tmp_path))
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {problem}" for problem in problems]


def test_real_process_exit_code_and_no_traceback(tmp_path):
    args = [sys.executable, str(REPO_ROOT / "cli.py"), "merge", "--model.name_or_path", str(tmp_path / "none"),
            "--adapter", str(tmp_path / "none"), "--output", str(tmp_path / "out")]  # fmt: skip
    done = subprocess.run(
        args, capture_output=True, text=True, timeout=120, env={**os.environ, "REGA_DEBUG": ""}
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"error: adapter folder {tmp_path / 'none'} does not exist"


# ---------------------------------------------------------------------------------------- interrupted writers


def dead_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(done.stdout)


def stale_temp(target: Path, folder: bool = False) -> Path:
    """What a writer of ``target`` killed on this host leaves: a temporary name with a dead process id."""
    path = target.parent / f".{target.name}.~{HOST}~{dead_pid()}~abc.tmp"
    path.mkdir() if folder else path.write_text("half")
    return path


def test_written_files_and_folders_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_write(tmp_path / "a.json") as handle:
            handle.write("{}")
        with atomic_dir(tmp_path / "d") as folder:
            (folder / "x").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640  # mkstemp alone would give 0600
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o750  # mkdtemp alone would give 0700


def test_a_live_writers_temp_file_is_left_alone(tmp_path):
    live = tmp_path / f".a.json.~{HOST}~{os.getppid()}~x.tmp"
    live.write_text("being written")
    dead = stale_temp(tmp_path / "a.json")
    with atomic_write(tmp_path / "a.json") as handle:
        handle.write("{}")
    assert live.exists() and not dead.exists()


KILLED_CACHE_WRITE = """
import os, sys
import numpy as np
from pathlib import Path
from rega.datamodules.tokenized import TokenizedExamples

def killed(handle, **arrays):  # half the bytes are out when the process dies
    handle.write(b"PK half a zip"); handle.flush(); os._exit(9)

np.savez = killed
TokenizedExamples(np.arange(3, dtype=np.int32), np.array([0, 3]), np.array([[1, 3]], dtype=np.int32),
                  np.array([0, 1]), np.array([0], dtype=np.int16), ["medical"]).save(Path(sys.argv[1]))
"""


def test_tokenized_cache_kill_and_no_pickle(tmp_path, monkeypatch):
    import numpy as np

    from rega.datamodules.tokenized import TokenizedExamples

    path = tmp_path / "tokenized" / "key.v2.npz"
    done = subprocess.run([sys.executable, "-c", KILLED_CACHE_WRITE, str(path)], cwd=REPO_ROOT, timeout=120)
    assert done.returncode == 9 and not path.exists()  # no half-written cache file under the real name
    assert [p.name for p in path.parent.iterdir()][0].startswith(".key.v2.npz.~")
    spans = np.array([[1, 2], [1, 3]], dtype=np.int32)
    data = TokenizedExamples(np.arange(5, dtype=np.int32), np.array([0, 2, 5]), spans, np.array([0, 1, 2]),
                             np.array([0, 1], dtype=np.int16), ["legal", "medical"], truncated=1)  # fmt: skip
    data.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["key.v2.npz"]  # the killed run's temp file is gone
    real_load = np.load
    monkeypatch.setattr(np, "load", lambda *a, **k: real_load(*a, **{**k, "allow_pickle": False}) if not k.get(
        "allow_pickle") else pytest.fail("the cache must be read without pickle"))  # fmt: skip
    loaded = TokenizedExamples.load(path)
    assert (
        loaded.domains == ["legal", "medical"]
        and loaded.truncated == 1
        and loaded.tokens.tolist() == [0, 1, 2, 3, 4]
        and loaded.spans.tolist() == [[1, 2], [1, 3]]
    )


KILLED_MERGE = """
import os, sys
from transformers import PreTrainedModel
from rega.cli import main

def killed(self, folder, **kwargs):  # the first weights are on disk when the process dies
    open(os.path.join(folder, "model.safetensors"), "wb").write(b"half"); os._exit(9)

PreTrainedModel.save_pretrained = killed
main(sys.argv[1:])
"""


def test_merge_kill_leaves_no_model_and_the_next_merge_cleans_up(tmp_path, tiny_model_dir, adapter_dir):
    out = tmp_path / "merged"
    args = merge_args(tiny_model_dir, adapter_dir, out)
    done = subprocess.run([sys.executable, "-c", KILLED_MERGE, *args], cwd=REPO_ROOT, timeout=300)
    assert done.returncode == 9 and not out.exists()
    (left,) = [p for p in tmp_path.iterdir() if p.name.startswith(".merged.~")]
    main(args)
    assert not left.exists() and (out / "config.json").exists() and (out / "model.safetensors").exists()


def test_evaluation_outputs_are_replaced_together(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from rega.eval import runner

    task = jsonl(tmp_path / "dev.jsonl", [{"id": f"d{i}", "instruction": f"Q{i}?", "output": "yes", "domain": "medical",
                                           "choices": ["yes", "no"], "answer": "yes"} for i in range(2)])  # fmt: skip
    args = eval_args(tmp_path, tiny_model_dir, "--tasks", json.dumps(source(task)), "--max_new_tokens", "2")
    main(args)
    out = tmp_path / "ev"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"eval.json", "predictions.jsonl"} <= set(before)

    def killed(path, obj):  # the predictions of the new run are written, eval.json is next
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "write_json", killed)
    with pytest.raises(SystemExit):
        main([*args, "--limit_per_task", "1"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old outputs, whole
    monkeypatch.undo()
    left = stale_temp(out, folder=True)  # as a SIGKILL would leave it
    main([*args, "--limit_per_task", "1"])
    result = json.loads((out / "eval.json").read_text())
    assert not left.exists() and result["meta"]["files"]["predictions"] == str(out / "predictions.jsonl")
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 1


def test_report_kill_is_visible_and_the_next_report_is_whole(tmp_path, monkeypatch):
    from rega.experiments import report

    run = tmp_path / "runs" / "ft"
    (run / "eval").mkdir(parents=True)
    (run / "done.json").write_text(json.dumps({"name": "ft", "strategy": "ft", "mix_ratio": None}))
    domains = {"medical": {"score": 0.5, "tasks": {"qa": {"score": 0.5, "metric": "acc"}}}}
    (run / "eval" / "eval.json").write_text(
        json.dumps({"rules": {"central": {"overall": 0.5, "domains": domains}}})
    )
    out = tmp_path / "report"
    report.write_report(tmp_path / "runs", out)
    assert report.check_report(out) == []

    def killed(path, obj):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        report.write_report(tmp_path / "runs", out)
    assert report.check_report(out) == [
        f"{out}: no complete report.json (an interrupted report? run report again)"
    ]
    monkeypatch.undo()
    left = stale_temp(out / "results.md")
    report.write_report(tmp_path / "runs", out)
    assert report.check_report(out) == [] and not left.exists()


@pytest.mark.parametrize("refusal", ["access", "removal"])
def test_a_refused_overwrite_leaves_the_old_output_and_no_temp(tmp_path, monkeypatch, refusal):
    """A previous output this user may not remove (a read-only folder; tests run as root, so simulated): the old
    output stays whole, the new one goes, and no hidden folder is left."""
    import shutil

    from rega import io

    out = tmp_path / "out"
    with atomic_dir(out) as folder:
        (folder / "corpus.jsonl").write_text("old")
    if refusal == "access":
        monkeypatch.setattr(io.os, "access", lambda path, mode: Path(path) != out)
    else:
        real = shutil.rmtree

        def refuses_once(path, *args, **kwargs):  # the removal of the old contents, after the exchange
            monkeypatch.setattr(io.shutil, "rmtree", real)
            raise PermissionError(13, "Permission denied", str(path))

        monkeypatch.setattr(io.shutil, "rmtree", refuses_once)
    with pytest.raises(PermissionError), atomic_dir(out) as folder:
        (folder / "corpus.jsonl").write_text("new")
    assert (out / "corpus.jsonl").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_evaluation_refuses_an_invalid_task_row_or_skips_it_and_says_so(tmp_path, capsys, tiny_model_dir):
    good = {
        "instruction": "Q?",
        "output": "yes",
        "domain": "medical",
        "choices": ["yes", "no"],
        "answer": "yes",
    }
    task = jsonl(
        tmp_path / "dev.jsonl", [{**good, "id": "a"}, {"id": "b", "domain": "medical"}, {**good, "id": "c"}]
    )
    args = eval_args(tmp_path, tiny_model_dir, "--tasks", json.dumps(source(task)), "--max_new_tokens", "2")
    code, line, _ = run_cli(args, capsys)
    assert code == 2 and line.startswith(f"error: {task}:2") and "field" in line, line
    main([*args, "--skip_invalid", "true"])
    assert "skipped 1 invalid rows (skip_invalid)" in capsys.readouterr().out
    meta = json.loads((tmp_path / "ev" / "eval.json").read_text())["meta"]
    assert meta["n_records"] == 2 and meta["skipped_invalid"]["n"] == 1
