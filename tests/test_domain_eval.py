"""Domain evaluation on the tiny model: prompt rules, scoring plumbing, log-likelihood options, the command."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from rega.config import DataSource, ModelConfig
from rega.data.chat import ChatFormat
from rega.data.prompts import RolePrompts
from rega.errors import ConfigError
from rega.eval.domain import scoring as domain_mod
from rega.eval.domain.metrics import closed_spec
from rega.eval.domain.scoring import choice_candidates, evaluate_domains, load_task_records, system_prompt
from rega.eval.runner import evaluate_command
from rega.eval.settings import EvalSettings
from rega.model_source import load_tokenizer
from rega.modules.generation import Generation
from rega.modules.model import load_model

REPO = Path(__file__).resolve().parent.parent
OPTIONS = [
    "Patient having history of snoring",
    "Patient having beard",
    "Old age patient",
    "Full set of teeth present",
]
ROWS = [
    # id marker [qN] lets the fake generator answer each question
    {
        "id": "pq1",
        "instruction": "[q1] Is it? Reply yes, no or maybe.",
        "input": "ctx",
        "output": "yes",
        "domain": "medical",
        "task": "pubmedqa",
        "choices": ["yes", "no", "maybe"],
        "answer": "yes",
    },
    {
        "id": "pq2",
        "instruction": "[q2] Is it? Reply yes, no or maybe.",
        "input": "ctx",
        "output": "no",
        "domain": "medical",
        "task": "pubmedqa",
        "choices": ["yes", "no", "maybe"],
        "answer": "no",
    },
    {
        "id": "mc1",
        "instruction": "[q3] Which is not an indicator?",
        "input": "A. ...",
        "output": "D. Full set of teeth present",
        "domain": "medical",
        "task": "medmcqa",
        "choices": OPTIONS,
        "answer": "D",
    },
    {
        "id": "mc2",
        "instruction": "[q4] Which is not an indicator?",
        "input": "A. ...",
        "output": "B. Patient having beard",
        "domain": "medical",
        "task": "medmcqa",
        "choices": OPTIONS,
        "answer": "B",
    },
    {
        "id": "tc1",
        "instruction": "[q5] 判断类别",
        "input": "年龄18岁以上",
        "output": "Age",
        "domain": "medical",
        "task": "cmedtc",
        "answer": "Age",
        "lang": "zh",
    },
    {
        "id": "tc2",
        "instruction": "[q6] 判断类别",
        "input": "患有糖尿病",
        "output": "Disease",
        "domain": "medical",
        "task": "cmedtc",
        "answer": "Disease",
        "lang": "zh",
    },
    {
        "id": "tc3",
        "instruction": "[q7] 判断类别",
        "input": "有皮疹",
        "output": "Sign",
        "domain": "medical",
        "task": "cmedtc",
        "answer": "Sign",
        "lang": "zh",
    },  # beyond the limit, but its label still counts
    {
        "id": "fq1",
        "instruction": "[q8] Why do stocks fall?",
        "input": "",
        "output": "The cat sat on the mat",
        "domain": "finance",
        "task": "fiqa",
    },
    {
        "id": "fq2",
        "instruction": "[q9] 摘要",
        "input": "新闻",
        "output": "中国人民银行",
        "domain": "finance",
        "task": "finna",
        "lang": "zh",
    },
]
CANNED = {
    "q1": "Yes, it is.",  # correct
    "q2": "Maybe.",  # wrong
    "q3": "D. Full set of teeth present",  # correct
    "q4": "I am not sure",  # no answer
    "q5": "类别：Age",  # correct
    "q6": "Sign",  # wrong, but a known label (from tc3, past the limit)
    "q8": "cat sat",  # F1 2/3 against "cat sat on mat" (after normalisation)
    "q9": "中国银行",  # F1 0.8
}


@pytest.fixture(scope="module")
def tiny(tiny_model_config):
    tokenizer = load_tokenizer(tiny_model_config)
    return load_model(tiny_model_config), tokenizer, ChatFormat(tokenizer)


@pytest.fixture
def task_file(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    return path


def prompts_for(chat) -> RolePrompts:
    return RolePrompts(central=chat.default_system, roles={"medical": "ROLE-MED", "finance": "ROLE-FIN"})


def test_load_task_records_limits_per_task_but_keeps_labels(task_file):
    data = load_task_records([DataSource(str(task_file))], limit_per_task=2)
    assert [r.id for r in data.records] == ["pq1", "pq2", "mc1", "mc2", "tc1", "tc2", "fq1", "fq2"]
    assert data.labels[("medical", "cmedtc")] == ("Age", "Disease", "Sign")


def test_load_task_records_keeps_the_named_domains(task_file):
    data = load_task_records([DataSource(str(task_file))], limit_per_task=2, domains=["finance"])
    assert [r.id for r in data.records] == ["fq1", "fq2"] and set(data.labels) <= {("finance", "fiqa")}
    with pytest.raises(
        ConfigError, match=r"no evaluation task of domain\(s\) legal \(the tasks cover finance, medical\)"
    ):
        load_task_records([DataSource(str(task_file))], domains=["legal", "medical"])


def test_scoring_plumbing_with_canned_answers(tiny, task_file, monkeypatch):
    model, tokenizer, chat = tiny
    seen: list[str] = []

    def fake_generate(
        model, tokenizer, prompts, sampling, batch_size=8, max_batch_tokens=None, share_prefix=False
    ):
        for index, ids in enumerate(prompts):
            text = tokenizer.decode(ids)
            seen.append(text)
            marker = re.search(r"\[(q\d+)\]", text).group(1)
            yield Generation(index=index, token_ids=[1], text=CANNED[marker], finish_reason="stop")

    monkeypatch.setattr(domain_mod, "generate", fake_generate)
    data = load_task_records([DataSource(str(task_file))], limit_per_task=2)
    results, rows = evaluate_domains(model, tokenizer, chat, prompts_for(chat), ["central", "role"], data)
    assert len(rows) == 2 * len(data.records)
    for rule in ("central", "role"):
        med = results[rule]["domains"]["medical"]["tasks"]
        assert med["pubmedqa"] == {"n": 2, "acc": 0.5, "no_answer": 0, "metric": "acc", "score": 0.5}
        assert med["medmcqa"]["acc"] == 0.5 and med["medmcqa"]["no_answer"] == 1
        assert med["cmedtc"]["acc"] == 0.5
        fin = results[rule]["domains"]["finance"]["tasks"]
        assert fin["fiqa"]["metric"] == "f1" and fin["fiqa"]["score"] == pytest.approx(2 / 3)
        assert fin["finna"]["score"] == pytest.approx(0.8)
        assert results[rule]["domains"]["medical"]["score"] == pytest.approx(0.5)
        assert results[rule]["domains"]["finance"]["score"] == pytest.approx((2 / 3 + 0.8) / 2)
        assert results[rule]["overall"] == pytest.approx((0.5 + (2 / 3 + 0.8) / 2) / 2)
        assert results[rule]["task_mean"] == pytest.approx((0.5 * 3 + 2 / 3 + 0.8) / 5)
    by_key = {(r["rule"], r["id"]): r for r in rows}
    assert by_key[("central", "tc2")]["pred"] == "Sign" and by_key[("central", "tc2")]["score"] == 0.0
    assert by_key[("role", "mc2")]["pred"] is None
    # prompt rules: p_c under central, the domain's p_i under role
    central_prompts = [s for s in seen if "ROLE-" not in s]
    role_prompts = [s for s in seen if "ROLE-" in s]
    assert len(central_prompts) == len(role_prompts) == len(data.records)
    assert all(chat.default_system in s for s in central_prompts)
    assert sum("ROLE-FIN" in s for s in role_prompts) == 2 and sum("ROLE-MED" in s for s in role_prompts) == 6


def test_role_rule_needs_role_prompts(task_file):
    data = load_task_records([DataSource(str(task_file))])
    prompts = RolePrompts(central="pc", roles={"medical": "pm"})
    assert system_prompt("central", data.records[-1], prompts) == "pc"
    assert system_prompt("role", data.records[0], prompts) == "pm"
    with pytest.raises(ConfigError, match="finance"):
        system_prompt("role", data.records[-1], prompts)
    with pytest.raises(ConfigError, match="prompt rule"):
        system_prompt("sideways", data.records[0], prompts)


def test_choice_candidates_follow_the_answer_format(task_file):
    data = load_task_records([DataSource(str(task_file))])
    recs = {r.id: r for r in data.records}
    cands, gold = choice_candidates(recs["mc1"], closed_spec(recs["mc1"]))
    assert cands[0] == "A. Patient having history of snoring" and gold == 3
    cands, gold = choice_candidates(recs["pq2"], closed_spec(recs["pq2"]))
    assert cands == ["yes", "no", "maybe"] and gold == 1
    letter_only = recs["mc1"].__class__(**{**recs["mc1"].to_dict(), "output": "D", "choices": tuple(OPTIONS)})
    assert choice_candidates(letter_only, closed_spec(letter_only)) == (["A", "B", "C", "D"], 3)


def test_tiny_model_end_to_end_with_loglik_matches_manual(tiny, task_file):
    model, tokenizer, chat = tiny
    data = load_task_records([DataSource(str(task_file))], limit_per_task=1)
    prompts = prompts_for(chat)
    results, rows = evaluate_domains(
        model,
        tokenizer,
        chat,
        prompts,
        ["central"],
        data,
        EvalSettings(max_new_tokens=4, closed_max_new_tokens=3, loglik_choices=True, batch_size=4),
    )
    tasks = results["central"]["domains"]["medical"]["tasks"]
    assert set(tasks) == {"pubmedqa", "medmcqa", "cmedtc"} and all("ll_acc" in t for t in tasks.values())
    recs = {r.id: r for r in data.records}
    for row in rows:
        if row["kind"] != "closed":
            assert "ll_pred" not in row
            continue
        rec = recs[row["id"]]
        cands, gold = choice_candidates(rec, closed_spec(rec, data.labels.get((rec.domain, rec.task))))
        system = prompts.central
        ctx = chat.encode_prompt(system, rec.user_text)
        manual = []
        for cand in cands:
            cont = tokenizer(cand, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([ctx + cont])).logits[0].float()
            lp = torch.log_softmax(logits, -1)
            manual.append(sum(float(lp[len(ctx) + j - 1, t]) for j, t in enumerate(cont)) / len(cont))
        assert row["ll_scores"] == pytest.approx(manual, abs=1e-3)
        assert row["ll_pred"] == max(range(len(manual)), key=manual.__getitem__) and row["ll_gold"] == gold


def test_evaluate_command_base_and_adapter(tiny_model_config, task_file, tmp_path, capsys):
    from rega.modules.model import LoraSettings, add_lora

    tasks = [DataSource(str(task_file), limit=None)]
    out = tmp_path / "zero"
    evaluate_command(
        model=tiny_model_config,
        tasks=tasks,
        limit_per_task=1,
        max_new_tokens=3,
        closed_max_new_tokens=2,
        general_mc=[],
        drift=[DataSource(str(task_file), task="refs")],
        drift_limit=3,
        output=str(out),
    )
    result = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    assert list(result["rules"]) == ["central"] and result["meta"]["strategy"] == "zero_shot"
    assert result["drift"]["refs"]["n_records"] == 3
    assert (out / "predictions.jsonl").exists()
    assert "prompt rule central" in capsys.readouterr().out

    torch.manual_seed(1)
    peft_model = add_lora(load_model(tiny_model_config), LoraSettings(r=4, alpha=8))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)  # make the adapter matter
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    out2 = tmp_path / "adapter_eval"
    evaluate_command(
        model=tiny_model_config,
        adapter=str(adapter),
        strategy="rega",
        tasks=tasks,
        limit_per_task=1,
        max_new_tokens=3,
        closed_max_new_tokens=2,
        general_mc=[],
        drift=[DataSource(str(task_file), task="refs")],
        drift_limit=3,
        compare_base=True,
        output=str(out2),
    )
    result2 = json.loads((out2 / "eval.json").read_text(encoding="utf-8"))
    assert set(result2["rules"]) == {"central", "role"}
    drift = result2["drift"]["refs"]
    # the base value (adapter disabled) is the zero-shot run's value; the adapter moved the model
    assert drift["base"] == pytest.approx(result["drift"]["refs"]["logprob_per_token"], abs=1e-5)
    assert (
        drift["delta"] == pytest.approx(drift["logprob_per_token"] - drift["base"])
        and abs(drift["delta"]) > 1e-4
    )


def test_eval_configs_parse(capsys):
    from jsonargparse import CLI

    for path in sorted((REPO / "configs" / "eval").glob("*.yaml")):
        if path.name.startswith("judge_"):
            continue
        first = path.read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith("# rega evaluate --config "), path
        with pytest.raises(SystemExit) as exit_info:
            CLI(evaluate_command, args=["--config", str(path), "--print_config"], as_positional=False)
        assert exit_info.value.code == 0
        assert "shared:pubmedqa/dev.jsonl" in capsys.readouterr().out or "tasks" in path.read_text()


@pytest.mark.slow
def test_embedded_model_zero_shot_dev(shared_data, tmp_path):
    """The embedded model answers ~10 dev items of PubMedQA and MedMCQA and a small general MC set."""
    out = tmp_path / "embedded"
    evaluate_command(
        model=ModelConfig(),
        tasks=[DataSource("shared:pubmedqa/dev.jsonl"), DataSource("shared:medmcqa/dev.jsonl")],
        limit_per_task=10,
        loglik_choices=True,
        general_mc=["arc_easy"],
        general_mc_limit=20,
        drift=[DataSource("shared:general_en/dev.jsonl")],
        drift_limit=10,
        output=str(out),
    )
    result = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    tasks = result["rules"]["central"]["domains"]["medical"]["tasks"]
    assert tasks["pubmedqa"]["n"] == 10 and tasks["medmcqa"]["n"] == 10
    # a real chat model answers in the requested format: few responses without an extractable answer
    assert tasks["pubmedqa"]["no_answer"] <= 3 and tasks["medmcqa"]["no_answer"] <= 3
    assert 0.0 <= result["general_mc"]["arc_easy"]["score"] <= 1.0
    assert -6.0 < result["drift"]["general_en"]["logprob_per_token"] < 0.0


def test_closed_pass_answers_and_options_equal_the_separate_paths(tiny):
    """One prefill per batch gives the same greedy tokens as model.generate and the same option log-likelihoods
    as continuation_logprobs, for prompts of different lengths batched together."""
    from rega.config import SamplingConfig
    from rega.eval.domain.closed_pass import closed_pass
    from rega.eval.general.retention import continuation_logprobs
    from rega.modules.generation import generate

    model, tokenizer, chat = tiny
    texts = ["Is it?", "A much longer question about the patient and the outcome, please answer", "Why?"]
    contexts = [chat.encode_prompt(chat.default_system, t) for t in texts]
    words = ("yes", "no", "maybe, not sure")  # one option of several tokens: scored on top of the cache
    options = [[tokenizer(o, add_special_tokens=False)["input_ids"] for o in words]] * 3
    sampling = SamplingConfig(do_sample=False, temperature=1.0, top_p=1.0, max_new_tokens=5)
    plain = {g.index: g for g in generate(model, tokenizer, contexts, sampling, batch_size=3)}
    pairs = [(c, o) for c, opts in zip(contexts, options) for o in opts]
    separate = continuation_logprobs(model, tokenizer, pairs, batch_size=8)
    for share in (False, True):  # the system prompt and template prefilled once per batch, or every row whole
        gens, scores = closed_pass(
            model, tokenizer, contexts, options, max_new_tokens=5, batch_size=3, share_prefix=share
        )
        assert [g.token_ids for g in gens] == [plain[i].token_ids for i in range(3)]
        assert [g.finish_reason for g in gens] == [plain[i].finish_reason for i in range(3)]
        flat = [s for row in scores for s in row]
        assert [n for _, n in flat] == [n for _, n in separate]
        assert [s for s, _ in flat] == pytest.approx([s for s, _ in separate], abs=1e-4)
    only_options, _ = closed_pass(model, tokenizer, contexts, options, max_new_tokens=None)
    assert only_options == [None, None, None]


def test_loglik_scoring_generates_nothing_for_closed_tasks(tiny, task_file, monkeypatch):
    model, tokenizer, chat = tiny

    def no_generation(*args, **kwargs):
        raise AssertionError("closed tasks scored by log-likelihood must not generate")

    monkeypatch.setattr(domain_mod, "generate", no_generation)
    data = load_task_records([DataSource(str(task_file))], limit_per_task=2)
    data.records = [r for r in data.records if r.domain == "medical"]
    results, rows = evaluate_domains(
        model, tokenizer, chat, prompts_for(chat), ["central"], data, EvalSettings(closed_scoring="loglik")
    )
    pubmedqa = results["central"]["domains"]["medical"]["tasks"]["pubmedqa"]
    assert (
        pubmedqa["metric"] == "ll_acc" and "acc" not in pubmedqa and pubmedqa["score"] == pubmedqa["ll_acc"]
    )
    for row in rows:  # the picked option is the answer: a letter for multiple choice, the label otherwise
        assert row["pred"] == row["ll_label"] and row["score"] == float(row["ll_pred"] == row["ll_gold"])
        assert row["pred"] in (
            {"A", "B", "C", "D"}
            if row["task"] == "medmcqa"
            else {"yes", "no", "maybe", "Age", "Disease", "Sign"}
        )
    with pytest.raises(ConfigError, match="closed_scoring"):
        EvalSettings(closed_scoring="guess")


def test_identical_prompts_are_answered_once(tiny, task_file, monkeypatch):
    """Under ``role`` and ``role:medical`` a medical record has the same prompt: generated once, scored twice."""
    model, tokenizer, chat = tiny
    prompts_seen: list[list[int]] = []

    def counting_generate(model, tokenizer, prompts, sampling, batch_size=8, max_batch_tokens=None, **_):
        for index, ids in enumerate(prompts):
            prompts_seen.append(ids)
            marker = re.search(r"\[(q\d+)\]", tokenizer.decode(ids)).group(1)
            yield Generation(index=index, token_ids=[1], text=CANNED.get(marker, "x"), finish_reason="stop")

    monkeypatch.setattr(domain_mod, "generate", counting_generate)
    data = load_task_records([DataSource(str(task_file))], limit_per_task=2)
    data.records = [r for r in data.records if r.domain == "medical"]
    results, rows = evaluate_domains(
        model, tokenizer, chat, prompts_for(chat), ["role", "role:medical"], data
    )
    assert len(prompts_seen) == len(data.records) and len(rows) == 2 * len(data.records)
    assert results["role"] == results["role:medical"]
