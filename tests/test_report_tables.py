"""Per-item results, trivial baselines and the report's statistics tables, on hand-made run records."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from rega.config import DataSource
from rega.errors import UserError
from rega.eval.domain.scoring import load_task_records
from rega.eval.items import domain_items, drift_items, mc_items, train_sibling, trivial_baselines
from rega.experiments.report import write_report
from rega.io import write_json


def write_rows(path: Path, answers: list[str]) -> None:
    rows = [
        {"id": f"{path.stem}-{k}", "instruction": "Is it?", "output": a, "domain": "medical", "task": "pq",
         "choices": ["yes", "no", "maybe"], "answer": a}
        for k, a in enumerate(answers)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_majority_class_comes_from_the_training_split(tmp_path):
    write_rows(tmp_path / "dev.jsonl", ["no", "no", "no", "yes"])
    write_rows(tmp_path / "train.jsonl", ["yes"] * 5 + ["no"] * 2)
    source = DataSource(str(tmp_path / "dev.jsonl"))
    assert train_sibling(source).path == str(tmp_path / "train.jsonl")
    data = load_task_records([source])
    base = trivial_baselines([source], data.records, data.labels)["medical/pq"]
    # "yes" is the training majority: always "yes" scores 1/4 on these dev items, not the dev majority's 3/4
    assert base == {"n": 4, "majority": "yes", "majority_rate": 0.25, "majority_from": "train",
                    "chance": pytest.approx(1 / 3), "gold": {"no": 3, "yes": 1}}  # fmt: skip
    (tmp_path / "train.jsonl").unlink()
    base = trivial_baselines([source], data.records, data.labels)["medical/pq"]
    assert base["majority"] == "no" and base["majority_rate"] == 0.75 and base["majority_from"] == "evaluated"
    assert (
        train_sibling(DataSource(str(tmp_path / "mine.jsonl"))) is None
    )  # only dev/test files have siblings


def test_item_results_keep_ids_and_numbers_only():
    rows = [
        {"rule": "central", "domain": "medical", "task": "pq", "id": "a", "kind": "closed", "pred": "yes",
         "score": 1.0, "response": "Yes, because...", "ll_pred": 1, "ll_gold": 0, "ll_label": "no"},
        {"rule": "central", "domain": "medical", "task": "pq", "id": "b", "kind": "closed", "pred": None,
         "score": 0.0, "response": "?", "ll_pred": 0, "ll_gold": 0, "ll_label": "yes"},
    ]  # fmt: skip
    unit = domain_items(rows)["central"]["medical/pq"]
    assert unit == {"ids": ["a", "b"], "score": [1.0, 0.0], "pred": ["yes", "(none)"], "ll_score": [0.0, 1.0],
                    "ll_pred": ["no", "yes"]}  # fmt: skip
    mc = mc_items(
        [{"set": "arc", "id": 3, "gold": 1, "pred": 0, "pred_norm": 1}], {"arc": {"metric": "acc_norm"}}
    )
    assert mc == {"arc": {"ids": ["3"], "score": [1.0]}}
    drift = drift_items([{"source": "ref", "id": "r1", "logprob": -12.3456789, "tokens": 7}])
    assert drift == {"ref": {"ids": ["r1"], "logprob": [-12.34568], "tokens": [7]}}


def fake_eval(scores: list[float], preds: list[str], mc: list[float], drift: list[float]) -> dict:
    ids = [f"q{k}" for k in range(len(scores))]
    acc = sum(scores) / len(scores)
    return {
        "rules": {"central": {"overall": acc, "task_mean": acc, "domains": {"medical": {"score": acc, "tasks": {
            "pq": {"n": len(scores), "acc": acc, "metric": "acc", "score": acc}}}}}},
        "general_mc": {"arc": {"score": sum(mc) / len(mc), "metric": "acc"}},
        "drift": {"ref": {"logprob_per_token": sum(drift) / (2 * len(drift))}},
        "items": {
            "domain": {"central": {"medical/pq": {"ids": ids, "score": scores, "pred": preds}}},
            "general_mc": {"arc": {"ids": ids[: len(mc)], "score": mc}},
            "drift": {"ref": {"ids": ids[: len(drift)], "logprob": drift, "tokens": [2] * len(drift)}},
        },
        "baselines": {"medical/pq": {"n": len(scores), "majority": "yes", "majority_rate": 0.5,
                                     "majority_from": "train", "chance": 1 / 3, "gold": {"yes": 20, "no": 20}}},
    }  # fmt: skip


def test_report_gives_intervals_paired_tests_seeds_and_label_distributions(tmp_path):
    runs = tmp_path / "runs"
    n = 40
    gold = ["yes"] * 20 + ["no"] * 20
    always_yes = [1.0] * 20 + [0.0] * 20
    right = [1.0] * 36 + [0.0] * 4

    def put(name, strategy, evals, seeds, **meta):
        for seed, result in zip(seeds, evals):
            folder = runs / name / f"seed_{seed}" if seed is not None else runs / name
            write_json(
                folder / "done.json",
                {"name": name, "strategy": strategy, "mix_ratio": None, "seed": seed, **meta},
            )
            write_json(folder / "eval" / "eval.json", result)

    put("zero_shot", "zero_shot", [fake_eval(always_yes, ["yes"] * n, [1, 0, 1, 0], [-2.0] * 4)], [None])
    put("ft", "ft", [fake_eval(always_yes, ["yes"] * n, [1, 0, 0, 0], [-3.0] * 4)] * 2, [1, 2])
    rega = [fake_eval(right, gold[:36] + ["maybe"] * 4, [1, 1, 1, 0], [-2.2] * 4) for _ in range(2)]
    put("rega", "rega", rega, [1, 2])
    # a single-domain FT (sorted first) is not the FT the paired tables compare with
    put("a_medical", "ft", [fake_eval(right, gold, [1, 1, 1, 1], [-2.0] * 4)], [1], only_domains=["medical"])

    report = write_report(runs, tmp_path / "out")
    assert report["statistics"] is True
    rows = {r["label"]: r for r in report["rows"]}
    assert rows["FT"]["seeds"] == "1 2" and rows["FT"]["pq (acc)"] == pytest.approx(0.5)
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| FT | 50.0 ±0.0 [" in md and "†" in md  # always "yes" does not beat the majority rate
    assert "REGA_c | 90.0 ±0.0 [" in md
    assert "Paired difference to FT" in md and "Paired difference to zero-shot" in md
    vs_ft = rows["REGA_c"]["_vs"]["FT"]["pq (acc)"]
    assert vs_ft["diff"] == pytest.approx(0.4) and vs_ft["lo"] > 0 and vs_ft["p"] < 0.01
    assert "| REGA_c | yes 50 · no 40 · maybe 10 |" in md.replace("no 40 · yes 50", "yes 50 · no 40")
    header = (tmp_path / "out" / "results.csv").read_text().splitlines()[0]
    assert (
        "pq (acc) ci_lo" in header
        and "pq (acc) vs FT p" in header
        and header.startswith("label,run,strategy")
    )
    logprob = rows["REGA_c"]["_vs"]["zero-shot"]["logprob:ref"]
    assert logprob["diff"] == pytest.approx(-0.1) and logprob["test"] == "bootstrap"  # REGA has two seeds


def test_report_refuses_records_scored_on_different_drift_references(tmp_path):
    # Drift items pair by instruction id: a run scored on a re-sampled reference shares the ids, not the answers.
    runs = tmp_path / "runs"
    same = fake_eval([1.0, 0.0], ["yes", "no"], [1, 0], [-2.0, -2.5])
    resampled = fake_eval([1.0, 0.0], ["yes", "no"], [1, 0], [-2.0, -2.5])
    resampled["items"]["drift"]["ref"]["tokens"] = [2, 3]
    for name, result in (("ft", same), ("ftsd", same), ("rega", resampled)):
        write_json(
            runs / name / "done.json", {"name": name, "strategy": name, "mix_ratio": None, "seed": None}
        )
        write_json(runs / name / "eval" / "eval.json", result)
    with pytest.raises(
        UserError, match=r"rega/eval/eval.json: drift source 'ref' item q1 has 3 answer tokens, 2 in"
    ):
        write_report(runs, tmp_path / "out")
    assert not (tmp_path / "out" / "results.md").exists()
    (runs / "rega" / "done.json").unlink()
    assert write_report(runs, tmp_path / "out")["statistics"] is True


def test_report_lists_evaluations_that_skipped_invalid_rows(tmp_path):
    runs = tmp_path / "runs"
    for name, skipped in (("ft", {"n": 2, "first": ["tasks.jsonl:3: no output", "tasks.jsonl:7: no output"]}),
                          ("zero_shot", {"n": 0, "first": []})):  # fmt: skip
        result = fake_eval([1.0] * 4, ["yes"] * 4, [1, 0, 1, 0], [-2.0] * 4)
        result.setdefault("meta", {})["skipped_invalid"] = skipped
        write_json(
            runs / name / "done.json", {"name": name, "strategy": name, "mix_ratio": None, "seed": None}
        )
        write_json(runs / name / "eval" / "eval.json", result)
    write_report(runs, tmp_path / "out")
    md = (tmp_path / "out" / "results.md").read_text()
    assert "* ft: 2 invalid rows skipped in evaluation (first: tasks.jsonl:3: no output, tasks.jsonl:7" in md
    assert "* zero_shot" not in md


def test_report_shows_the_ratio_the_corpus_was_built_with(tmp_path):
    """r comes from the fit's summary (the corpus manifest's), not from the grid's request (None when unset)."""
    runs = tmp_path / "runs"
    for name, requested, built in (("rega", None, 0.1), ("rega_r0.3", 0.3, 0.3), ("ft", None, None)):
        write_json(runs / name / "done.json", {"name": name, "strategy": name.split("_")[0],
                                               "mix_ratio": requested, "seed": None})  # fmt: skip
        write_json(
            runs / name / "eval" / "eval.json", fake_eval([1.0, 0.0], ["yes", "no"], [1, 0], [-2.0, -2.5])
        )
        write_json(runs / name / "fit" / "version_0" / "summary.json", {"mix_ratio": 0.5})  # an earlier try's
        write_json(runs / name / "fit" / "version_1" / "summary.json", {"mix_ratio": built})
    write_report(runs, tmp_path / "out")
    with open(tmp_path / "out" / "results.csv", encoding="utf-8") as table:
        rows = {(row["run"], row["rule"]): row for row in csv.DictReader(table)}
    assert [rows[run, "central"]["mix_ratio"] for run in ("rega", "rega_r0.3", "ft")] == ["0.1", "0.3", ""]
    assert rows["rega", "central"]["label"] == "REGA_c (r=0.1)"
