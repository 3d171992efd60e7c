"""MT-Bench and the general (CGev-style) evaluation: FastChat fidelity against published GPT-4 judgments,
multi-turn rendering, answer generation on the tiny model, and end-to-end grading with a loopback judge."""

from __future__ import annotations

import json

import pytest
from test_judge import KEY_ENV, FakeJudgeServer, assert_secret_absent

from rega.data.chat import ChatFormat
from rega.eval.judged import general_set, mt_bench, mt_bench_answers
from rega.eval.judged.client import JudgeClient, JudgeConfig
from rega.eval.judged.mt_bench_validate import validate_judge_pipeline
from rega.io import read_jsonl

SYSTEM = "You are a careful assistant."


@pytest.fixture(scope="module")
def tiny(tiny_model_config):
    from rega.model_source import load_tokenizer
    from rega.modules.model import load_model

    tokenizer = load_tokenizer(tiny_model_config)
    model = load_model(tiny_model_config)
    return model, tokenizer, ChatFormat(tokenizer)


@pytest.fixture
def secret(monkeypatch):
    import uuid

    value = f"sk-rega-test-{uuid.uuid4().hex}"
    monkeypatch.setenv(KEY_ENV, value)
    return value


def judge_config(server: FakeJudgeServer, tmp_path, **overrides) -> JudgeConfig:
    settings = dict(
        base_url=server.base_url,
        model="judge-test",
        api_key_env=KEY_ENV,
        concurrency=4,
        timeout_s=5.0,
        max_retries=2,
        backoff_s=0.01,
        backoff_max_s=0.02,
        cache_dir=str(tmp_path / "judge-cache"),
    )
    settings.update(overrides)
    return JudgeConfig(**settings)


def pick_questions(shared_data, ids):
    questions = {
        q["question_id"]: q for q in mt_bench.load_questions(shared_data / "mt_bench" / "question.jsonl")
    }
    return [questions[i] for i in ids]


# -- fidelity to FastChat ----------------------------------------------------------------------------------------


def test_published_gpt4_judgments_are_reproduced(shared_data):
    """Every judge prompt in the published GPT-4 judgment file is rebuilt character for character from question,
    model answer and reference, with the same prompt name; every stored judgment parses to the stored score."""
    report = validate_judge_pipeline(shared_data / "mt_bench")
    assert report["records"] == 650
    assert report["all_match"] == report["records"], report["mismatches"]


def test_prompt_selection_and_rating_rules():
    assert mt_bench.judge_prompt_name("writing", 1) == "single-v1"
    assert mt_bench.judge_prompt_name("writing", 2) == "single-v1-multi-turn"
    assert mt_bench.judge_prompt_name("reasoning", 1) == "single-math-v1"
    assert mt_bench.judge_prompt_name("coding", 2) == "single-math-v1-multi-turn"
    assert mt_bench.judge_prompt_name("math", 1, has_reference=False) == "single-v1"
    assert mt_bench.parse_rating("Rating: [[9]]") == 9.0
    assert mt_bench.parse_rating("score [8.5] overall") == 8.5
    assert mt_bench.parse_rating("Rating: 7/10") is None
    assert (
        mt_bench_answers.TEMPERATURE_CONFIG["writing"] == 0.7
        and mt_bench_answers.TEMPERATURE_CONFIG["math"] == 0.0
    )
    assert (
        mt_bench_answers.TEMPERATURE_CONFIG["stem"] == 0.1
        and mt_bench_answers.TEMPERATURE_CONFIG["humanities"] == 0.1
    )


def test_scores_follow_fastchat_show_result():
    rows = [
        {"question_id": 1, "category": "writing", "turn": 1, "score": 8},
        {"question_id": 1, "category": "writing", "turn": 2, "score": 6},
        {"question_id": 2, "category": "math", "turn": 1, "score": -1},  # FastChat's "no rating"
        {"question_id": 2, "category": "math", "turn": 2, "score": None},
        {"question_id": 3, "category": "math", "turn": 1, "score": 3},
    ]
    scores = mt_bench.score_judgments(rows)
    assert scores["turn_1"] == {"mean": 5.5, "n": 2, "missing": 1}
    assert scores["turn_2"] == {"mean": 6.0, "n": 1, "missing": 1}
    assert scores["overall"] == {"mean": round(17 / 3, 4), "n": 3, "missing": 2}
    assert scores["per_category"]["math"] == {
        "mean": 3.0,
        "n": 1,
        "missing": 2,
        "turn_1": 3.0,
        "turn_2": None,
    }


# -- multi-turn rendering ----------------------------------------------------------------------------------------


def test_multi_turn_rendering_with_the_chat_template(tiny):
    _, tokenizer, chat = tiny
    first = mt_bench_answers.render_conversation(chat, SYSTEM, ["Q-one"], [])
    assert first == chat.prompt_text(SYSTEM, "Q-one")
    second = mt_bench_answers.render_conversation(chat, SYSTEM, ["Q-one", "Q-two"], ["A-one"])
    expected = tokenizer.apply_chat_template(
        [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Q-one"},
            {"role": "assistant", "content": "A-one"},
            {"role": "user", "content": "Q-two"},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert second == expected
    assert second.index(SYSTEM) < second.index("Q-one") < second.index("A-one") < second.index("Q-two")
    assert second.count(SYSTEM) == 1
    # Turn 1 of the conversation is exactly what single-turn evaluation renders.
    assert second.startswith(first)
    prefixed = ChatFormat(tokenizer, system_placement="prefix")
    text = mt_bench_answers.render_conversation(prefixed, SYSTEM, ["Q-one", "Q-two"], ["A-one"])
    assert f"{SYSTEM}\n\nQ-one" in text and text.count(SYSTEM) == 1


def test_multi_turn_rendering_with_a_named_template(tiny):
    _, tokenizer, _ = tiny
    vicuna = ChatFormat(tokenizer, template="vicuna_v1.1")
    text = mt_bench_answers.render_conversation(vicuna, "SYS", ["Q1", "Q2"], ["A1"])
    # FastChat's vicuna_v1.1 conversation format.
    assert text == f"SYS USER: Q1 ASSISTANT: A1{tokenizer.eos_token}USER: Q2 ASSISTANT:"
    ids = mt_bench_answers.encode_conversation(vicuna, "SYS", ["Q1"], [])
    assert ids == vicuna.encode_prompt("SYS", "Q1")


# -- generation and end-to-end grading ----------------------------------------------------------------------------


def test_generate_answers_in_fastchat_format(tiny, shared_data, tmp_path):
    model, tokenizer, chat = tiny
    # writing (temperature 0.7), math (greedy), extraction (greedy)
    questions = pick_questions(shared_data, [81, 111, 131])
    rows = mt_bench_answers.generate_answers(
        model, tokenizer, chat, SYSTEM, questions, model_id="tiny", max_new_tokens=5, batch_size=2
    )
    assert [r["question_id"] for r in rows] == [81, 111, 131]
    for row in rows:
        assert set(row) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert row["model_id"] == "tiny" and len(row["choices"]) == 1 and len(row["choices"][0]["turns"]) == 2
        assert all(isinstance(t, str) for t in row["choices"][0]["turns"])
    again = mt_bench_answers.generate_answers(
        model, tokenizer, chat, SYSTEM, questions[1:], model_id="tiny", max_new_tokens=5
    )
    assert [r["choices"][0]["turns"] for r in again] == [r["choices"][0]["turns"] for r in rows[1:]]  # greedy

    result = mt_bench.run_mt_bench(
        model,
        tokenizer,
        chat,
        SYSTEM,
        None,
        shared_data / "mt_bench" / "question.jsonl",
        tmp_path / "out",
        model_id="tiny",
        question_ids=[81, 111],
        max_new_tokens=4,
    )
    assert result["judge"] is None and result["n_questions"] == 2
    assert result["overall"] == {"mean": None, "n": 0, "missing": 4}
    assert len(read_jsonl(tmp_path / "out" / "model_answer" / "tiny.jsonl")) == 2
    json.dumps(result)


def mt_bench_judge(content: str, attempt: int):
    """Rates by prompt kind, so the expected means are known; one question's turn 1 gets an unparsable reply."""
    if "[The Start of Reference Answer]" in content and attempt == 1:
        return 500, {}, {"error": "flaky"}, 0.0  # a retry then succeeds
    if "Compose an engaging travel blog post" in content and "<|The Start of Assistant A's" not in content:
        return 200, {}, "I cannot decide.", 0.0
    if "<|The Start of Reference Answer|>" in content:
        return 200, {}, "Some mistakes. Rating: [[3]]", 0.0
    if "[The Start of Reference Answer]" in content:
        return 200, {}, "Correct. Rating: [[9]]", 0.0
    if "<|The Start of Assistant A's Conversation" in content:
        return 200, {}, "Fine follow-up. Rating: [[6]]", 0.0
    return 200, {}, "Good. Rating: [[8]]", 0.0


def test_mt_bench_end_to_end_with_loopback_judge(tiny, shared_data, secret, tmp_path):
    model, tokenizer, chat = tiny
    questions_path = shared_data / "mt_bench" / "question.jsonl"
    with FakeJudgeServer(secret, mt_bench_judge) as server:
        config = judge_config(server, tmp_path)
        result = mt_bench.run_mt_bench(
            model,
            tokenizer,
            chat,
            SYSTEM,
            config,
            questions_path,
            tmp_path / "out",
            model_id="tiny/model",
            question_ids=[81, 91, 111],
            max_new_tokens=4,
        )
        # 3 questions x 2 turns, plus the retry of q111's flaky turn-1 grading.
        assert len(server.hits) == 6 + 1
        hits = len(server.hits)
        # Re-grading the saved answers costs nothing: every judge reply comes from the cache.
        again = mt_bench.run_mt_bench(
            model,
            tokenizer,
            chat,
            SYSTEM,
            config,
            questions_path,
            tmp_path / "out",
            model_id="tiny/model",
            question_ids=[81, 91, 111],
            reuse_answers=True,
        )
        assert len(server.hits) == hits and again["judge_stats"]["cache_hits"] == 6
    assert result["turn_1"] == {"mean": 8.5, "n": 2, "missing": 1}  # q81: unparsable; q91: 8; q111: 9
    assert result["turn_2"] == {"mean": 5.0, "n": 3, "missing": 0}  # 6, 6, 3
    assert result["overall"] == {"mean": 6.4, "n": 5, "missing": 1}
    assert result["per_category"]["math"] == {"mean": 6.0, "n": 2, "missing": 0, "turn_1": 9.0, "turn_2": 3.0}
    assert result["per_category"]["writing"]["missing"] == 1
    assert again["overall"] == result["overall"]

    judgments = read_jsonl(result["judgments_path"])
    assert {(j["question_id"], j["turn"]) for j in judgments} == {
        (q, t) for q in (81, 91, 111) for t in (1, 2)
    }
    by_key = {(j["question_id"], j["turn"]): j for j in judgments}
    assert by_key[(111, 2)]["judge"] == ["judge-test", "single-math-v1-multi-turn"]
    assert by_key[(81, 1)]["score"] is None and by_key[(81, 1)]["judgment"] == "I cannot decide."
    answers = {a["question_id"]: a for a in read_jsonl(result["answers_path"])}
    assert answers[91]["choices"][0]["turns"][1] in by_key[(91, 2)]["user_prompt"]
    scores_file = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert scores_file["overall"] == result["overall"]
    assert_secret_absent(tmp_path, secret)


def test_general_zh_and_en_with_loopback_judge(tiny, shared_data, secret, tmp_path):
    model, tokenizer, chat = tiny

    def judge(content, attempt):
        if "得分" in content:  # BELLE prompts: 0-1
            return 200, {}, "得分: 0.7分。理由：基本正确。", 0.0
        if "[[评分]]" in content:
            return 200, {}, "评价：一般。评分：[[6]]", 0.0
        return 200, {}, "Rating: [[4]]", 0.0

    data = shared_data / "general_eval_zh_dev" / "dev.jsonl"
    with FakeJudgeServer(secret, judge) as server:
        config = judge_config(server, tmp_path)
        cgev = general_set.run_general_zh(
            model, tokenizer, chat, SYSTEM, config, data, tmp_path / "zh", limit=3, max_new_tokens=4
        )
        belle = general_set.run_general_zh(
            model,
            tokenizer,
            chat,
            SYSTEM,
            config,
            data,
            tmp_path / "zh-belle",
            limit=3,
            max_new_tokens=4,
            prompt_style="belle",
        )
        en = general_set.run_general_en(
            model,
            tokenizer,
            chat,
            SYSTEM,
            config,
            shared_data / "general_eval_en_dev" / "dev.jsonl",
            tmp_path / "en",
            limit=2,
            max_new_tokens=4,
        )
        assert len(server.hits) == 3 + 3 + 2
    assert cgev["overall"] == {"mean": 6.0, "n": 3, "missing": 0} and cgev["prompt_style"] == "cgev_zh"
    assert belle["overall"] == {"mean": 7.0, "n": 3, "missing": 0}  # 0.7 on BELLE's 0-1 scale x 10
    assert en["overall"] == {"mean": 4.0, "n": 2, "missing": 0} and en["benchmark"] == "general_en"
    assert sum(v["n"] for v in cgev["per_category"].values()) == 3
    rows = read_jsonl(belle["judgments_path"])
    assert all(r["raw_score"] == 0.7 and r["score"] == 7.0 for r in rows)
    no_judge = general_set.run_general_zh(
        model, tokenizer, chat, SYSTEM, None, data, tmp_path / "nojudge", limit=2, max_new_tokens=4
    )
    assert no_judge["overall"] == {"mean": None, "n": 0, "missing": 2} and no_judge["judgments_path"] is None
    json.dumps([cgev, belle, en, no_judge])
    assert_secret_absent(tmp_path, secret)


def test_judge_client_can_be_shared(tiny, shared_data, secret, tmp_path):
    """The runner may pass one client for several benchmarks (one cache, one pool, one set of stats)."""
    model, tokenizer, chat = tiny
    with FakeJudgeServer(secret) as server:
        client = JudgeClient(judge_config(server, tmp_path))
        general_set.run_general_zh(
            model,
            tokenizer,
            chat,
            SYSTEM,
            None,
            shared_data / "general_eval_zh_dev" / "dev.jsonl",
            tmp_path / "zh",
            limit=2,
            max_new_tokens=3,
            judge_client=client,
        )
        assert client.stats.requests == 2 and len(server.hits) == 2


# -- through `rega evaluate`: grading an existing answer file, validating the judge pipeline ---------------------


def test_evaluate_grades_an_answer_file_without_a_model(tiny, shared_data, secret, tmp_path, capsys):
    """What ``python -m rega.eval.mt_bench judge`` did: a FastChat answer file graded, no model loaded."""
    import yaml

    from rega.eval.runner import evaluate_command

    model, tokenizer, chat = tiny
    questions_path = shared_data / "mt_bench" / "question.jsonl"
    made = mt_bench.run_mt_bench(
        model, tokenizer, chat, SYSTEM, None, questions_path, tmp_path / "made", model_id="other/model",
        question_ids=[81, 111], max_new_tokens=3,
    )  # fmt: skip
    with FakeJudgeServer(secret, mt_bench_judge) as server:
        judge_file = tmp_path / "judge.yaml"
        settings = {"cache_dir": str(tmp_path / "cache"), "max_retries": 2, "backoff_s": 0.01}
        judge_file.write_text(yaml.safe_dump({**vars(judge_config(server, tmp_path)), **settings}))
        evaluate_command(
            judge=["mt_bench"], judge_config=str(judge_file), judge_answers=made["answers_path"],
            output=str(tmp_path / "graded"),
        )  # fmt: skip
        assert len(server.hits) == 4 + 1  # two questions, two turns, one retried reply
    result = json.loads((tmp_path / "graded" / "eval.json").read_text())["judge"]["mt_bench"]
    assert result["model_id"] == "other/model" and result["answers_path"] == made["answers_path"]
    assert result["overall"] == {"mean": 6.0, "n": 3, "missing": 1}  # q81: unparsable, 6; q111: 9, 3
    assert (tmp_path / "graded" / "mt_bench" / "scores.json").exists()
    assert "mt_bench: mean 6.0 (n=3, missing 1)" in capsys.readouterr().out
    assert_secret_absent(tmp_path, secret)


def test_evaluate_validates_the_judge_pipeline(shared_data, capsys):
    from rega.eval.runner import evaluate_command

    evaluate_command(validate_judge=str(shared_data / "mt_bench"))
    report = json.loads(capsys.readouterr().out)
    assert report["records"] == 650 and report["all_match"] == 650
