"""Domain metrics: unigram F1 (English and Chinese), answer extraction, torchmetrics state merging."""

from __future__ import annotations

import pytest
import torch

from rega.data.records import Record
from rega.distributed import gather_rows, shard
from rega.eval.domain.metrics import (
    LABEL,
    MC,
    ClosedSpec,
    WeightedMean,
    closed_spec,
    extract_choice,
    extract_label,
    grade_closed,
    metric_value,
    task_label_sets,
    tokens,
    unigram_f1,
)

OPTIONS = [
    "Patient having history of snoring",
    "Patient having beard",
    "Old age patient",
    "Full set of teeth present",
]


def rec(**kw) -> Record:
    base = {"id": "x", "instruction": "q", "input": "", "output": "o", "domain": "medical", "task": "t"}
    return Record(**{**base, **kw})


# --------------------------------------------------------------------------------------------- F1


def test_english_f1_squad_normalisation():
    # articles and punctuation vanish: identical bags of words
    assert unigram_f1("The cat sat on the mat.", "A cat sat on a mat") == 1.0
    # P = 2/2, R = 2/4 -> F1 = 2 * 1 * 0.5 / 1.5 = 2/3
    assert unigram_f1("cat sat", "cat sat on mat") == pytest.approx(2 / 3)
    # repeated tokens count once per occurrence: pred {the: -, dog x3}, ref {dog x1, barks}: common 1,
    # P = 1/3, R = 1/2 -> F1 = 2 * (1/3) * (1/2) / (5/6) = 0.4
    assert unigram_f1("dog dog dog", "dog barks") == pytest.approx(0.4)
    assert unigram_f1("Hello, World!", "hello world") == 1.0
    assert unigram_f1("nothing shared", "completely different") == 0.0
    assert tokens("The U.S. isn't big", "en") == ["us", "isnt", "big"]


def test_chinese_f1_is_character_level():
    # pred 中国银行 (4 chars), ref 中国人民银行 (6): common 4 -> P = 1, R = 4/6 -> F1 = 0.8
    assert unigram_f1("中国银行", "中国人民银行", lang="zh") == pytest.approx(0.8)
    # punctuation (full and half width) and spaces are dropped
    assert unigram_f1("是， 实体A;实体B。", "是，实体A;实体B", lang="zh") == 1.0
    assert tokens("云南：绿色 转型", "zh") == list("云南绿色转型")
    # as English the same strings share no whitespace-separated word
    assert unigram_f1("中国银行", "中国人民银行", lang="en") == 0.0


def test_f1_empty_cases():
    assert unigram_f1("", "") == 1.0
    assert unigram_f1("the", "a") == 1.0  # both empty after normalisation
    assert unigram_f1("", "answer") == 0.0
    assert unigram_f1("answer", "") == 0.0


# --------------------------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("B", "B"),
        ("B.", "B"),
        ("(B)", "B"),
        ("[D] text", "D"),
        ("D) Full set", "D"),
        ("Answer: B", "B"),
        ("The answer is B", "B"),
        ("The answer is (C).", "C"),
        ("**C**", "C"),
        ("Option A", "A"),
        ("b", "B"),
        ("(b)", "B"),
        ("A. Patient having history of snoring", "A"),
        ("B Patient having beard", "B"),  # bare letter + its own option text
        ("I think the correct option is D because the others are signs", "D"),
        ("Full set of teeth present", "D"),  # the option text itself
        ("It is probably old age patient, since...", "C"),
        ("Explanation first.\nB. Patient having beard", "B"),  # a line starting with "B."
        ("答案：C", "C"),
        ("选C", "C"),
        ("C．案件事实基本查清", "C"),
        ("A patient with a beard is hard to ventilate", None),  # the article "A" is not option A
        ("a lot of factors", None),
        ("Both A and B are wrong", None),
        ("E", None),  # outside the four options
        ("I don't know", None),
    ],
)
def test_extract_choice(text, expected):
    assert extract_choice(text, OPTIONS) == expected


@pytest.mark.parametrize(
    ("text", "labels", "expected"),
    [
        ("Yes, the answer is yes.", ["yes", "no", "maybe"], "yes"),
        ("The answer is no.", ["yes", "no", "maybe"], "no"),
        ("Maybe; results are mixed", ["yes", "no", "maybe"], "maybe"),
        ("It is not known", ["yes", "no", "maybe"], None),  # "no" does not match inside "not"
        ("cannot say", ["yes", "no", "maybe"], None),
        ("No", ["Yes", "No"], "No"),  # case-insensitive, canonical label returned
        ("yes.", ["Yes", "No"], "Yes"),
        ("否", ["是", "否"], "否"),
        ("这两个问句的意思是否相同？相同，是", ["是", "否"], "是"),  # "是否" is not an answer
        ("公司，中国", ["公司", "公司，中国", "中国"], "公司，中国"),  # longest at the same position
        ("中国，公司", ["公司", "公司，中国", "中国"], "中国"),  # first mentioned
        (
            "Non-Neoplasm Disease Stage",
            ["Disease", "Non-Neoplasm Disease Stage"],
            "Non-Neoplasm Disease Stage",
        ),
        ("therapy  or\nsurgery", ["Therapy or Surgery", "Disease"], "Therapy or Surgery"),  # any whitespace
        ("类别：Disease", ["Disease", "Diet"], "Disease"),  # latin label next to CJK text
        ("积极", ["消极", "中性", "积极"], "积极"),
    ],
)
def test_extract_label(text, labels, expected):
    assert extract_label(text, labels) == expected


def test_closed_spec_kinds_and_grading():
    mc = rec(choices=tuple(OPTIONS), answer="D", output="D. Full set of teeth present")
    assert closed_spec(mc) == ClosedSpec(MC, tuple(OPTIONS), "D")
    yes_no = rec(choices=("yes", "no", "maybe"), answer="no", output="no")
    assert closed_spec(yes_no).kind == LABEL
    # a label task without choices: labels = the task's set of answers
    records = [
        rec(id=str(i), answer=a, output=a, task="cmedtc") for i, a in enumerate(["Disease", "Age", "Disease"])
    ]
    labels = task_label_sets(records)
    assert labels == {("medical", "cmedtc"): ("Age", "Disease")}
    spec = closed_spec(records[1], labels[("medical", "cmedtc")])
    assert spec == ClosedSpec(LABEL, ("Age", "Disease"), "Age")
    assert closed_spec(rec()) is None  # free-form
    assert grade_closed("D. Full set of teeth present", closed_spec(mc)) == ("D", 1.0)
    assert grade_closed("B", closed_spec(mc)) == ("B", 0.0)
    assert grade_closed("no idea", closed_spec(mc)) == (None, 0.0)
    assert grade_closed("Age: over 18", spec) == ("Age", 1.0)


# --------------------------------------------------------------------------------------------- metrics


def test_metrics_compute_and_states_merge():
    spec = ClosedSpec(LABEL, ("yes", "no"), "yes")
    responses = ["yes", "no", "Yes!", "maybe", "yes", "no"]
    whole = WeightedMean()
    whole.update([grade_closed(r, spec)[1] for r in responses])
    assert metric_value(whole) == pytest.approx(3 / 6)
    # two "ranks" each see half; their sum states add up to the whole (what DDP sync does)
    left, right = WeightedMean(), WeightedMean()
    left.update([grade_closed(r, spec)[1] for r in responses[:2]])
    right.update([grade_closed(r, spec)[1] for r in responses[2:]])
    assert left._reductions["total"] is not None and left._defaults["total"].item() == 0
    merged_total = left.total + right.total
    merged_weight = left.weight + right.weight
    assert torch.equal(merged_total, whole.total) and torch.equal(merged_weight, whole.weight)
    assert float(merged_total / merged_weight) == pytest.approx(metric_value(whole))
    left.merge_state(right)
    assert metric_value(left) == pytest.approx(0.5)


def test_f1_metric_and_weighted_mean():
    f1 = WeightedMean()
    f1.update([unigram_f1("cat sat", "cat sat on mat"), unigram_f1("中国银行", "中国人民银行", "zh")])
    other = WeightedMean()
    other.update([unigram_f1("x", "x")])
    assert metric_value(other) == 1.0
    f1.merge_state(other)
    assert metric_value(f1) == pytest.approx((2 / 3 + 0.8 + 1.0) / 3)
    mean = WeightedMean()
    assert metric_value(mean) is None  # empty -> None, not NaN
    mean.update([-2.0, -6.0], [1, 3])  # token-weighted: (-2 - 6) / 4
    assert metric_value(mean) == pytest.approx(-2.0)


def test_single_process_helpers():
    items = list(range(7))
    assert shard(items, 0, 2) == [0, 2, 4, 6] and shard(items, 1, 2) == [1, 3, 5]
    assert sorted(shard(items, 0, 2) + shard(items, 1, 2)) == items
    assert gather_rows([{"a": 1}]) == [{"a": 1}]


# --------------------------------------------------------------------------------------------- progress


def test_progress_lines_say_done_total_rate_and_time_left(caplog):
    import logging

    from rega.eval.progress import Progress, format_duration, progress_line

    assert [format_duration(s) for s in (42, 185, 7620)] == ["42s", "3m05s", "2h07m"]
    assert (
        progress_line("domain generation", 120, 600, 40.0)
        == "domain generation: 120/600 (20%), 3.00 item/s, 2m40s left"
    )
    assert progress_line("x", 0, 5, 0.0) == "x: 0/5 (0%)"
    caplog.set_level(logging.INFO, logger="rega.progress")
    with Progress(3, "scoring", unit="seq", every_s=0.0, bar=False, enabled=True) as progress:
        for _ in range(3):
            progress.update()
    lines = [r.getMessage() for r in caplog.records if r.name == "rega.progress"]
    assert lines[0].startswith("scoring: 1/3 (33%), ") and "seq/s" in lines[0] and lines[0].endswith("left")
    assert lines[-1].startswith("scoring: 3/3 (100%)") and " in " in lines[-1]  # the closing line
    caplog.clear()
    with Progress(3, "quiet", enabled=False) as progress:
        progress.update(3)
    assert not caplog.records
