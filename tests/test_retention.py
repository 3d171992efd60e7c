"""Judge-free general ability: option log-likelihoods, general multiple choice (native and lm-eval), drift."""

from __future__ import annotations

import json

import pytest
import torch

from rega.config import DataSource
from rega.data.chat import ChatFormat
from rega.data.loaders import load_records
from rega.data.prompts import RolePrompts
from rega.errors import ConfigError
from rega.eval.general.retention import (
    continuation_logprobs,
    continuation_text,
    drift_scores,
    general_mc_scores,
    mc_items,
    pick_backend,
    resolve_mc_set,
)
from rega.eval.pipeline import base_reference, evaluate_model
from rega.eval.settings import EvalSettings
from rega.model_source import load_tokenizer
from rega.modules.model import LoraSettings, add_lora, load_model


@pytest.fixture(scope="module")
def tiny(tiny_model_config):
    tokenizer = load_tokenizer(tiny_model_config)
    return load_model(tiny_model_config), tokenizer, ChatFormat(tokenizer)


def manual_logprob(model, ctx: list[int], cont: list[int]) -> float:
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].float(), -1)
    return sum(float(lp[len(ctx) + j - 1, t]) for j, t in enumerate(cont))


def test_continuation_logprobs_match_a_full_forward(tiny):
    model, tokenizer, _ = tiny
    g = torch.Generator().manual_seed(0)
    pairs = []
    # a system prompt every question starts with
    head = torch.randint(100, 40000, (10,), generator=g).tolist()
    for length, options in ((30, 3), (57, 1), (12, 4), (5, 2), (9, 2)):
        ctx = head + torch.randint(100, 40000, (length,), generator=g).tolist()
        for k in range(options):  # options of one question share the context
            pairs.append((ctx, torch.randint(100, 40000, (1 + k,), generator=g).tolist()))
    expected = [manual_logprob(model, ctx, cont) for ctx, cont in pairs]
    forwards = {}
    # common: the head runs once per batch
    for share, common in ((True, False), (False, False), (True, True)):
        rows: list[int] = []
        hook = model.register_forward_pre_hook(
            lambda _, a, kw, rows=rows: rows.append(kw["input_ids"].shape[0]), with_kwargs=True
        )
        try:
            got = continuation_logprobs(
                model, tokenizer, pairs, batch_size=8, share_prefix=share, common_prefix=common
            )
        finally:
            hook.remove()
        assert [n for _, n in got] == [len(cont) for _, cont in pairs]
        assert [s for s, _ in got] == pytest.approx(expected, abs=1e-3)
        forwards[share, common] = rows
    shared, common = forwards[True, False], forwards[True, True]
    # one more forward per batch: the head alone, one row
    assert len(common) > len(shared) and common.count(1) > shared.count(1)
    # context cut from the left to fit max_length, continuation kept; the caller's train mode is restored
    model.train()
    ((total, n),) = continuation_logprobs(
        model, tokenizer, [(list(range(100, 160)), [300, 301])], max_length=20
    )
    assert model.training
    model.eval()
    assert n == 2 and total == pytest.approx(
        manual_logprob(model, list(range(142, 160)), [300, 301]), abs=1e-3
    )


def test_mc_sets_resolve_and_render(shared_data, tmp_path):
    arc = resolve_mc_set("arc_easy")
    assert arc.path.endswith("general_mc/arc_easy/dev.jsonl") and arc.metric == "acc_norm" and not arc.stock
    assert resolve_mc_set("lm_eval:hellaswag").stock
    custom = tmp_path / "mine.jsonl"
    custom.write_text(json.dumps({"instruction": "2+2?", "choices": ["3", "4"], "answer": "B"}) + "\n")
    assert resolve_mc_set(str(custom)).name == "mine"
    named = resolve_mc_set(f"quiz:letters={custom}")
    assert (named.name, named.style) == ("quiz", "letters")
    with pytest.raises(ConfigError, match="general_mc"):
        resolve_mc_set("no_such_benchmark")
    items = mc_items(arc, limit=2)
    assert len(items) == 2 and items[0]["user"] and len(items[0]["choices"]) >= 3
    first = json.loads((shared_data / "general_mc/arc_easy/dev.jsonl").read_text().splitlines()[0])
    assert items[0]["choices"] == first["choices"] and items[0]["gold"] == "ABCDE".index(first["answer"])
    ceval = mc_items(resolve_mc_set("ceval"), limit=1)[0]
    assert (
        ceval["choices"] == ["A", "B", "C", "D"]
        and "\nA. " in ceval["user"]
        and "请直接回答" in ceval["user"]
    )
    quiz = mc_items(named, limit=None)[0]
    assert quiz["user"].endswith("Answer with the letter of the correct option.") and quiz["gold"] == 1


def test_native_and_lm_eval_backends_agree(tiny, shared_data):
    model, tokenizer, chat = tiny
    sets = [resolve_mc_set("arc_easy"), resolve_mc_set("ceval")]
    native, native_rows = general_mc_scores(
        model, tokenizer, chat, chat.default_system, sets, limit=6, backend="native"
    )
    harness, harness_rows = general_mc_scores(
        model, tokenizer, chat, chat.default_system, sets, limit=6, backend="lm_eval"
    )
    assert native["arc_easy"]["n"] == harness["arc_easy"]["n"] == 6
    assert native["arc_easy"]["backend"] == "native" and harness["arc_easy"]["backend"] == "lm_eval"
    for name in ("arc_easy", "ceval"):
        assert native[name]["acc"] == pytest.approx(harness[name]["acc"])
        assert native[name]["score"] == native[name][native[name]["metric"]]
    for a, b in zip(native_rows, harness_rows, strict=True):
        assert (a["set"], a["id"], a["gold"], a["pred"]) == (b["set"], b["id"], b["gold"], b["pred"])
        # lm-eval's continuation also holds the template's newline after the assistant header: the same
        # constant for every option of a question, so the ranking (acc) is the same
        offsets = [x - y for x, y in zip(a["loglik"], b["loglik"], strict=True)]
        assert max(offsets) - min(offsets) < 1e-3
    # the native item matches a manual computation
    item = mc_items(sets[0], limit=1)[0]
    ctx = chat.encode_prompt(chat.default_system, item["user"])
    conts = [
        tokenizer(continuation_text(chat, chat.default_system, item["user"], c), add_special_tokens=False)[
            "input_ids"
        ]
        for c in item["choices"]
    ]
    assert native_rows[0]["loglik"] == pytest.approx([manual_logprob(model, ctx, c) for c in conts], abs=1e-3)


def test_backend_choice():
    class Named:
        named, use_system_slot = object(), True

    class Hf:
        named, use_system_slot = None, True

    assert pick_backend("auto", Hf(), "system") == "lm_eval"
    assert pick_backend("auto", Named(), "system") == "native"  # lm-eval cannot render named templates
    assert (
        pick_backend("auto", Hf(), "") == "native"
    )  # an empty p_c must not let the template insert its default
    assert pick_backend("native", Hf(), "system") == "native"
    with pytest.raises(ConfigError):
        pick_backend("vllm", Hf(), "x")


def test_drift_matches_manual_and_base_reference(tiny, tiny_model_config, shared_data):
    model, tokenizer, chat = tiny
    records = load_records(DataSource("shared:general_en/dev.jsonl", limit=3)).records
    system = chat.default_system
    got = drift_scores(model, tokenizer, chat, system, {"general_en": records}, batch_size=2)["general_en"]
    total = tokens = 0
    for rec in records:
        enc = chat.encode_many([(system, rec.user_text, rec.output)], 1024, min_response_tokens=1)[0]
        start = next(k for k, label in enumerate(enc.labels) if label != -100)
        total += manual_logprob(model, enc.input_ids[:start], enc.input_ids[start:])
        tokens += len(enc.input_ids) - start
    assert got["n_records"] == 3 and got["n_tokens"] == tokens and got["truncated"] == 0
    assert got["logprob_per_token"] == pytest.approx(total / tokens, abs=1e-4)

    # with LoRA adapters that matter, the base reference (adapters disabled) equals the plain model
    torch.manual_seed(2)
    peft_model = add_lora(load_model(tiny_model_config), LoraSettings(r=4, alpha=8))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    prompts = RolePrompts(central=system, roles={})
    settings = EvalSettings(
        general_mc=["arc_easy"],
        general_mc_limit=3,
        general_mc_backend="native",
        drift=[DataSource("shared:general_en/dev.jsonl")],
        drift_limit=3,
    )
    base = base_reference(peft_model, tokenizer, chat, prompts, settings)
    assert base["drift"]["general_en"]["logprob_per_token"] == pytest.approx(
        got["logprob_per_token"], abs=1e-4
    )
    tuned = evaluate_model(peft_model, tokenizer, chat, prompts, ["central"], settings, base_reference=base)
    drift = tuned["drift"]["general_en"]
    assert drift["base"] == base["drift"]["general_en"]["logprob_per_token"]
    assert drift["delta"] == pytest.approx(drift["logprob_per_token"] - drift["base"]) and drift["delta"] != 0
    # lm-eval scores the in-memory peft model the same way
    harness, _ = general_mc_scores(
        peft_model, tokenizer, chat, system, [resolve_mc_set("arc_easy")], 3, backend="lm_eval"
    )
    assert harness["arc_easy"]["acc"] == pytest.approx(tuned["general_mc"]["arc_easy"]["acc"])
    assert tuned["general_mc"]["arc_easy"]["delta"] == pytest.approx(
        tuned["general_mc"]["arc_easy"]["score"] - base["general_mc"]["arc_easy"]["score"]
    )
