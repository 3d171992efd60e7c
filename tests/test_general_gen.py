"""Generative general ability (general_gen): per-item metrics on hand-made answers, an evaluation of the tiny model
that writes them into eval.json, and the report's intervals and paired tests on them."""

from __future__ import annotations

import json

import pytest
import torch

from rega.config import DataSource
from rega.data.chat import ChatFormat
from rega.data.loaders import load_records
from rega.data.prompts import RolePrompts
from rega.eval.domain.metrics import unigram_f1
from rega.eval.general.generative import (
    LONG_REFERENCE,
    REPEAT_SHARE,
    SHORT_ANSWER,
    degenerate_reason,
    repeated_share,
    rouge_l,
    score_answer,
    summarize,
)
from rega.eval.pipeline import base_reference, evaluate_model
from rega.eval.settings import EvalSettings
from rega.eval.summary import scalars, summary_text
from rega.experiments.report import write_report
from rega.experiments.report_plots import general_panels, plot_vs_reference
from rega.experiments.report_runs import load_runs
from rega.io import write_json
from rega.model_source import load_tokenizer
from rega.modules.model import LoraSettings, add_lora, load_model

SOURCES = {"en": "shared:general_eval_en_dev/dev.jsonl", "zh": "shared:general_eval_zh_dev/dev.jsonl"}


# --------------------------------------------------------------------------------------------- metrics


def test_english_scores_are_word_level_after_squad_normalisation():
    # words: [cat, sat, on, mat, today] vs [cat, was, on, mat] (articles and punctuation dropped, lowercased)
    answer, reference = "The cat sat on the mat today.", "A cat was on the mat"
    # LCS cat-on-mat = 3 of 5 and 4 words: P 3/5, R 3/4, F = 2/3; the common unigrams are the same 3
    assert rouge_l(answer, reference, "en") == pytest.approx(2 / 3, abs=1e-6)
    assert unigram_f1(answer, reference, "en") == pytest.approx(2 / 3)
    # order matters for ROUGE-L, not for unigram F1: [d, c, b, a] vs [a, b, c, d] has LCS 1
    assert rouge_l("d c b e", "e b c d", "en") == pytest.approx(0.25, abs=1e-6)
    assert unigram_f1("d c b e", "e b c d", "en") == 1.0
    assert rouge_l("", "", "en") == 1.0 and rouge_l("words", "", "en") == 0.0


def test_chinese_scores_are_character_level():
    # 我爱北京天安门 (7 characters) vs 我在北京看天安门 (8): LCS 我北京天安门 = 6, P 6/7, R 6/8, F = 0.8
    assert rouge_l("我爱北京天安门。", "我在北京看天安门", "zh") == pytest.approx(0.8, abs=1e-6)
    # unigrams: common 我北京天安门 = 6 as well; reversed order keeps F1 and breaks the LCS
    assert unigram_f1("我爱北京天安门", "我在北京看天安门", "zh") == pytest.approx(0.8)
    assert rouge_l("门安天", "天安门", "zh") == pytest.approx(1 / 3, abs=1e-6)
    # LCS 我北京 = 3 of 4 and 4 characters: 0.75; the English rule sees one "word" each, different: 0
    assert rouge_l("我爱北京", "我在北京", "zh") == pytest.approx(0.75, abs=1e-6)
    assert rouge_l("我爱北京", "我在北京", "en") == 0.0


def test_length_ratio_and_missing_reference_or_base():
    scores = score_answer("one two three", "reference words here", "one two three four five six", "en")
    assert scores["length"] == 3 and scores["base_length"] == 6 and scores["length_ratio"] == 0.5
    assert scores["f1_base"] == pytest.approx(2 * 1 * 0.5 / 1.5)
    zh = score_answer("好的，谢谢", "", "好", "zh")  # characters without punctuation: 4 vs 1
    assert zh["length"] == 4 and zh["length_ratio"] == 4.0
    assert zh["f1_ref"] is None and zh["rougeL_ref"] is None  # no human reference: nothing to score against
    alone = score_answer("an answer", "a reference", None, "en")
    assert alone["f1_base"] is None and alone["length_ratio"] is None and alone["base_length"] is None
    rows = [
        {"lang": "en", **score_answer("a b c d", "a b", "a b", "en")},  # length 4 (a dropped: b c d = 3)
        {"lang": "en", **score_answer("x", "", "x y z", "en")},
    ]
    summary = summarize(rows)
    assert summary["n"] == 2 and summary["n_reference"] == 1
    # sum of lengths over sum of base lengths, not the mean of per-item ratios (3/1 and 1/3)
    assert summary["length_ratio"] == pytest.approx((3 + 1) / (1 + 3)) and summary["unit"] == "words"


def test_each_degenerate_rule_and_a_sound_answer():
    paragraph = " ".join(f"word{k}" for k in range(LONG_REFERENCE["en"]))
    assert degenerate_reason("", paragraph, "en") == "empty"
    assert degenerate_reason("  ... ", paragraph, "en") == "empty"
    for label in ("Yes", "no.", "(B)", "A", "Maybe!"):
        assert degenerate_reason(label, paragraph, "en") == "label", label
    assert degenerate_reason("否。", "", "zh") == "label"
    assert (
        degenerate_reason("Yes", "Yes", "en") is None
    )  # the reference is a label itself: so may the answer be
    short = " ".join(f"w{k}" for k in range(SHORT_ANSWER["en"] - 1))
    assert degenerate_reason(short, paragraph, "en") == "short"
    assert degenerate_reason(short, "Paris", "en") is None  # a short reference is answered in a few words
    assert degenerate_reason(short, paragraph.rsplit(" ", 1)[0], "en") is None  # reference one word too short
    assert degenerate_reason("短", "长" * LONG_REFERENCE["zh"], "zh") == "short"
    loop = "You can try it. " + "I am a bot. " * 6
    assert repeated_share(loop.split(), 4) > REPEAT_SHARE
    assert degenerate_reason(loop, "", "en") == "repeat"
    assert degenerate_reason("我是机器人" * 8, "", "zh") == "repeat"
    sound = (
        "Practise a few minutes every day, hold the pen loosely, slow down, and copy a model alphabet line "
        "by line until the letters look even."
    )
    assert degenerate_reason(sound, paragraph, "en") is None
    assert score_answer(sound, paragraph, None, "en")["degenerate"] == 0.0
    assert score_answer("B", paragraph, None, "en")["degenerate"] == 1.0


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_no_human_reference_of_the_dev_sets_is_degenerate(shared_data, lang):
    # The thresholds are calibrated on human answers: none of them reads as degenerate against itself.
    records = load_records(DataSource(SOURCES[lang], require_output=False)).records
    flagged = [r.id for r in records if r.output and degenerate_reason(r.output, r.output, r.lang)]
    assert len(records) == 50 and flagged == []


# --------------------------------------------------------------------------------------------- evaluation


@pytest.fixture(scope="module")
def tiny(tiny_model_config):
    tokenizer = load_tokenizer(tiny_model_config)
    return tokenizer, ChatFormat(tokenizer)


def test_evaluation_writes_items_aggregates_and_base_comparison(
    tiny, tiny_model_config, shared_data, tmp_path
):
    tokenizer, chat = tiny
    prompts = RolePrompts(central=chat.default_system, roles={})
    settings = EvalSettings(
        general_mc=[],
        general_gen=[DataSource(SOURCES["en"], require_output=False)],
        general_gen_limit=4,
        general_gen_max_new_tokens=12,
        batch_size=3,
    )
    torch.manual_seed(2)
    plain = load_model(tiny_model_config)
    with torch.no_grad():  # the random tiny model ends its turn at once: perturbed, it answers in words
        for param in plain.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model = add_lora(plain, LoraSettings(r=4, alpha=8))
    base = base_reference(model, tokenizer, chat, prompts, settings)
    base_answers = base["general_gen_answers"]["general_eval_en_dev"]
    assert len(base_answers) == 4 and base["general_gen"]["general_eval_en_dev"]["f1_base"] is None
    assert all(a.strip() for a in base_answers.values()), base_answers
    # LoRA B starts at zero: the adapter changes nothing, so every answer is the base answer
    same = evaluate_model(model, tokenizer, chat, prompts, ["central"], settings, base_reference=base)
    unit = same["items"]["general_gen"]["general_eval_en_dev"]
    assert unit["f1_base"] == [1.0] * 4 and unit["rougeL_base"] == [1.0] * 4
    assert unit["length"] == unit["base_length"]
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    result = evaluate_model(
        model, tokenizer, chat, prompts, ["central"], settings, base_reference=base, output_dir=tmp_path
    )
    written = json.loads(json.dumps(result))  # what eval.json holds
    unit = written["items"]["general_gen"]["general_eval_en_dev"]
    records = load_records(DataSource(SOURCES["en"], require_output=False)).records[:4]
    assert unit["ids"] == [r.id for r in records]
    rows = [json.loads(line) for line in (tmp_path / "general_gen.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == unit["ids"] and result["meta"]["files"]["general_gen"]
    for row, rec in zip(rows, records):
        assert row["f1_ref"] == pytest.approx(unigram_f1(row["answer"], rec.output, "en"))
        assert row["f1_base"] == pytest.approx(unigram_f1(row["answer"], base_answers[rec.id], "en"))
        assert row["rougeL_ref"] == pytest.approx(rouge_l(row["answer"], rec.output, "en"), abs=1e-6)
    assert unit["f1_base"] != [1.0] * 4  # the adapter now changes the answers
    summary = written["general_gen"]["general_eval_en_dev"]
    assert summary["n"] == 4 and summary["f1_ref"] == pytest.approx(sum(unit["f1_ref"]) / 4, abs=1e-5)
    assert summary["length_ratio"] == pytest.approx(sum(unit["length"]) / sum(unit["base_length"]))
    assert summary["degenerate"] == pytest.approx(sum(unit["degenerate"]) / 4)
    logged = scalars(written)
    for metric in ("f1_ref", "rougeL_ref", "f1_base", "rougeL_base", "length_ratio", "degenerate"):
        assert logged[f"eval/general_gen/general_eval_en_dev/{metric}"] == pytest.approx(summary[metric])
    assert "general generation" in summary_text(written)


# --------------------------------------------------------------------------------------------- report


def gen_eval(f1: list[float], degenerate: list[float], length: list[int], base: bool = True) -> dict:
    ids = [f"g{k}" for k in range(len(f1))]
    n = len(f1)
    unit = {
        "ids": ids, "f1_ref": f1, "rougeL_ref": f1, "f1_base": f1 if base else [None] * n,
        "rougeL_base": f1 if base else [None] * n, "length": length,
        "base_length": [20] * n if base else [None] * n, "degenerate": degenerate,
    }  # fmt: skip
    return {
        "rules": {"central": {"overall": 0.5, "task_mean": 0.5, "domains": {"medical": {"score": 0.5, "tasks": {
            "pq": {"n": 2, "acc": 0.5, "metric": "acc", "score": 0.5}}}}}},
        "general_gen": {"gen_en": {
            "f1_ref": sum(f1) / n, "rougeL_ref": sum(f1) / n, "f1_base": sum(f1) / n if base else None,
            "rougeL_base": sum(f1) / n if base else None, "degenerate": sum(degenerate) / n,
            "length_ratio": sum(length) / (20 * n) if base else None}},
        "items": {
            "domain": {"central": {"medical/pq": {"ids": ["a", "b"], "score": [1.0, 0.0], "pred": ["yes", "no"]}}},
            "general_gen": {"gen_en": unit},
        },
    }  # fmt: skip


def test_report_gives_intervals_and_paired_tests_of_the_general_gen_scores(tmp_path):
    runs = tmp_path / "runs"
    n = 40

    def put(name, strategy, result):
        write_json(
            runs / name / "done.json", {"name": name, "strategy": strategy, "mix_ratio": None, "seed": None}
        )
        write_json(runs / name / "eval" / "eval.json", result)

    put("zero_shot", "zero_shot", gen_eval([0.4] * n, [0.0] * n, [20] * n, base=False))
    put("ft", "ft", gen_eval([0.2] * n, [1.0] * 10 + [0.0] * 30, [5] * n))
    put("rega", "rega", gen_eval([0.38] * 20 + [0.42] * 20, [0.0] * n, [18] * n))
    report = write_report(runs, tmp_path / "out")
    rows = {r["label"]: r for r in report["rows"]}
    assert "gen_f1:gen_en" in report["columns"] and "gen_len_ratio:gen_en" in report["columns"]
    assert rows["FT"]["gen_len_ratio:gen_en"] == pytest.approx(0.25)
    ci = rows["REGA_c"]["_ci"]["gen_f1:gen_en"]
    assert ci["lo"] < 0.4 < ci["hi"] and ci["hi"] - ci["lo"] < 0.05
    assert rows["FT"]["_ci"]["gen_len_ratio:gen_en"] == {"lo": 0.25, "hi": 0.25, "sd": None}
    vs_ft = rows["REGA_c"]["_vs"]["FT"]
    assert vs_ft["gen_f1:gen_en"]["diff"] == pytest.approx(0.2) and vs_ft["gen_f1:gen_en"]["p"] < 0.01
    assert (
        vs_ft["gen_degenerate:gen_en"]["diff"] == pytest.approx(-0.25)
        and vs_ft["gen_degenerate:gen_en"]["hi"] < 0
    )
    assert vs_ft["gen_len_ratio:gen_en"]["diff"] == pytest.approx(0.65)
    vs_zero = rows["REGA_c"]["_vs"]["zero-shot"]
    assert vs_zero["gen_f1:gen_en"]["lo"] < 0 < vs_zero["gen_f1:gen_en"]["hi"]  # no real difference
    assert "gen_f1_vs_base:gen_en" not in vs_zero  # zero-shot has no base answers to compare with
    md = (tmp_path / "out" / "results.md").read_text()
    assert "gen_* = greedy answers" in md and "| FT |" in md
    header = (tmp_path / "out" / "results.csv").read_text().splitlines()[0]
    assert "gen_f1:gen_en ci_lo" in header and "gen_degenerate:gen_en vs FT p" in header
    # the forgetting plot: FT and REGA_c against zero-shot, one panel per general measure it compared
    assert (
        report["plots"]["general_vs_zero_shot"] and (tmp_path / "out" / "general_vs_zero_shot.png").is_file()
    )
    body = [r for r in report["rows"] if r["_vs"].get("zero-shot")]
    assert [r["label"] for r in body] == ["FT", "REGA_c"]
    panels = dict((title, columns) for columns, title in general_panels(body, "zero-shot"))
    assert panels["general answers: F1 vs reference (points)"] == ["gen_f1:gen_en"]  # not gen_f1_vs_base
    assert panels["degenerate general answers (points)"] == ["gen_degenerate:gen_en"]
    assert not plot_vs_reference(body[:1], tmp_path / "one.png")  # one run: nothing to compare across


def test_the_report_compares_a_grids_answers_with_the_zero_shot_runs(tmp_path):
    """A grid evaluates without the base model's answers: the report scores each run's answers against the
    zero-shot run's (the base model's greedy answers), per item and in the source's aggregates."""
    runs = tmp_path / "runs"
    base_answers = {"g0": "the sky is blue because of scattering", "g1": "paris is the capital of france"}
    mine = {"g0": "the sky is blue", "g1": "yes"}
    for name, strategy, answers in (("zero_shot", "zero_shot", base_answers), ("ft", "ft", mine)):
        result = gen_eval([0.5, 0.5], [0.0, 0.0], [len(a.split()) for a in answers.values()], base=False)
        result["general_gen_answers"] = {"gen_en": answers}
        done = {"name": name, "strategy": strategy, "mix_ratio": None, "seed": None}
        write_json(runs / name / "done.json", done)
        write_json(runs / name / "eval" / "eval.json", result)
    ft = next(run for run in load_runs(runs) if run["strategy"] == "ft")["eval"]
    unit = ft["items"]["general_gen"]["gen_en"]
    expected = [unigram_f1(mine[k], base_answers[k], "en") for k in ("g0", "g1")]
    assert unit["f1_base"] == pytest.approx(expected) and expected[0] > expected[1] == 0.0
    assert unit["base_length"] == [6, 5]  # SQuAD normalisation drops "the"
    assert ft["general_gen"]["gen_en"]["length_ratio"] == pytest.approx((4 + 1) / (6 + 5))
    assert ft["general_gen"]["gen_en"]["f1_base"] == pytest.approx(sum(expected) / 2)
