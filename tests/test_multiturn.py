"""Multi-turn records (OpenAI ``messages``, ShareGPT ``conversations``) in training, distillation and evaluation,
and the language of rows without ``lang``, detected from their text (checked on the shared en and zh sets)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import rega.eval.domain.scoring as domain_mod
from rega.config import DataSource
from rega.data.chat import IGNORE_INDEX, ChatFormat
from rega.data.corpus import CorpusConfig, build_corpus, summary_table
from rega.data.loaders import load_records
from rega.data.prompts import RolePrompts
from rega.data.records import RecordError, record_from_dict
from rega.data.strategies import CENTRAL, Example, as_examples
from rega.datamodules import REGADataModule
from rega.datamodules.tokenized import TokenizedExamples, collate_rows, plan_batches, tokenize
from rega.model_source import load_tokenizer
from rega.modules.generation import Generation
from rega.modules.lit_module import REGAModule
from rega.modules.model import LoraSettings

HISTORY = (("What is a tort?", "A civil wrong."), ("Name one.", "Negligence."))
LAST = ("Is it a crime?", "Usually not: it is civil.")
EOT = "<|im_end|>\n"  # the embedded (and tiny) model's end of an assistant turn


def sharegpt(i: int, turns: int = 3, system: str | None = None, **extra) -> dict:
    conv = [{"from": "system", "value": system}] if system else []
    for k in range(turns):
        conv += [
            {"from": "human", "value": f"Question {i}.{k} about a contract?"},
            {"from": "gpt", "value": f"Answer {i}.{k} names a clause."},
        ]
    return {"id": f"sg-{i}", "conversations": conv, **extra}


def openai(i: int, turns: int = 2, **extra) -> dict:
    messages = []
    for k in range(turns):
        messages += [
            {"role": "user", "content": f"Symptom question {i}.{k}?"},
            {"role": "assistant", "content": f"Reply {i}.{k} about rest."},
        ]
    return {"id": f"oa-{i}", "messages": messages, **extra}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def answers(row: dict) -> list[str]:
    turns = row.get("messages") or row["conversations"]
    return [
        t.get("content", t.get("value"))
        for t in turns
        if t.get("role", t.get("from")) in ("gpt", "assistant")
    ]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_config):
    return load_tokenizer(tiny_model_config)


# --------------------------------------------------------------------------------------------- records


def test_sharegpt_and_messages_give_the_same_record():
    gpt = [{"from": "system", "value": "Be terse."}]
    oai = [{"role": "system", "content": "Be terse."}]
    for u, a in (*HISTORY, LAST):
        gpt += [{"from": "human", "value": u}, {"from": "gpt", "value": a}]
        oai += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    a = record_from_dict({"id": "x", "conversations": gpt}, "a.jsonl:1", domain="legal")
    b = record_from_dict({"id": "x", "messages": oai}, "b.jsonl:1", domain="legal")
    assert a == b
    assert (a.instruction, a.input, a.output, a.history, a.system) == (
        *LAST[:1],
        "",
        LAST[1],
        HISTORY,
        "Be terse.",
    )
    assert a.lang == "en" and a.user_text == LAST[0]
    assert record_from_dict(a.to_dict(), "again") == a  # written back as messages
    assert a.to_dict()["messages"] == oai
    # "user" and "model" are accepted too; a conversation may also be a single exchange
    single = record_from_dict({"id": "s", "conversations": [{"from": "user", "value": "Hi?"},
                                                            {"from": "model", "value": "Hello."}]}, "c:1", domain="legal")  # fmt: skip
    assert (single.history, single.system, single.output) == ((), None, "Hello.")


BAD_CONVERSATIONS = [
    ({"messages": [{"role": "bot", "content": "x"}]}, r"field 'messages\[0\]': unknown role 'bot'"),
    ({"messages": "hello"}, r"field 'messages': expected a non-empty list of turns"),
    ({"messages": [{"role": "user", "content": " "}]}, r"field 'messages\[0\]': the user turn has no text"),
    (
        {"messages": [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Q?"}]},
        r"field 'messages\[0\]': role 'assistant' where 'user' belongs",
    ),
    (
        {
            "conversations": [
                {"from": "system", "value": "S"},
                {"from": "human", "value": "Q?"},
                {"from": "system", "value": "T"},
            ]
        },
        r"field 'conversations\[2\]': role 'system' where 'assistant' belongs",
    ),  # fmt: skip
    ({"messages": [{"role": "user", "content": "Q?"}]}, r"field 'messages': ends with a user turn"),
    (
        {
            "messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}],
            "output": "A",
        },
        r"field 'messages': given together with 'output'",
    ),
]


@pytest.mark.parametrize(("row", "message"), BAD_CONVERSATIONS)
def test_bad_conversations_are_refused_by_place_and_turn(tmp_path, row, message):
    path = write_jsonl(tmp_path / "chat.jsonl", [openai(0), {"id": "bad", **row}])
    with pytest.raises(RecordError, match=re.escape(f"{path}:2: ") + message):
        load_records(DataSource(str(path), domain="legal"))


def test_an_instruction_pool_conversation_may_end_with_the_user():
    turns = [{"role": "user", "content": "Q1?"}, {"role": "assistant", "content": "A1."}]
    rec = record_from_dict(
        {"id": "p", "messages": [*turns, {"role": "user", "content": "Q2?"}]}, "p:1", domain="general",
        require_output=False,
    )  # fmt: skip
    assert (rec.instruction, rec.output, rec.history) == ("Q2?", "", (("Q1?", "A1."),))


def test_examples_keep_the_turns_and_name_the_dropped_system_message():
    rec = record_from_dict(sharegpt(1, system="Talk like a pirate."), "f:1", domain="legal")
    prompts = RolePrompts(central="P_C", roles={"legal": "P_LEGAL"})
    (ex,) = as_examples([rec], CENTRAL, prompts, "domain")
    assert ex.system == "P_C" and ex.dropped_system == "Talk like a pirate." and len(ex.history) == 2
    row = ex.to_dict()
    assert row["history"][0] == ["Question 1.0 about a contract?", "Answer 1.0 names a clause."]
    single = record_from_dict({"id": "s", "instruction": "Q?", "output": "A."}, "f:2", domain="legal")
    assert "history" not in as_examples([single], CENTRAL, prompts, "domain")[0].to_dict()


def test_the_corpus_manifest_counts_the_replaced_system_messages(tmp_path):
    rows = [sharegpt(i, system="Talk like a pirate." if i % 2 else None) for i in range(6)]
    config = CorpusConfig(
        strategy="ft", domains=[DataSource(str(write_jsonl(tmp_path / "l.jsonl", rows)), domain="legal")]
    )
    corpus = build_corpus(config, model_default_prompt="P_C")
    assert corpus.manifest["dropped_system"] == 3
    assert "own system messages replaced by the strategy's prompt: 3 examples" in summary_table(
        corpus.manifest
    )
    assert "own system" not in summary_table({**corpus.manifest, "dropped_system": 0})


# --------------------------------------------------------------------------------------------- labels


def encode_one(chat, system, user, response, max_length, history=()):
    return chat.encode_many([(system, user, response, history)], max_length)[0]


def runs_of_labels(labels: list[int]) -> list[tuple[int, int]]:
    """The [start, end) runs of supervised positions in a batch row's labels."""
    runs: list[tuple[int, int]] = []
    for k, label in enumerate(labels):
        if label == IGNORE_INDEX:
            continue
        if runs and runs[-1][1] == k:
            runs[-1] = (runs[-1][0], k + 1)
        else:
            runs.append((k, k + 1))
    return runs


@pytest.mark.parametrize(
    ("template", "placement"),
    [(None, "system"), (None, "prefix"), ("vicuna_v1.1", "auto"), ("belle", "auto")],
)
def test_labels_cover_every_assistant_turn_and_nothing_else(tokenizer, template, placement):
    chat = ChatFormat(tokenizer, template, placement)
    enc = encode_one(chat, "ROLE PROMPT", LAST[0], LAST[1], max_length=512, history=HISTORY)
    spans = enc.spans
    assert len(spans) == 3  # one per assistant turn
    supervised = [tokenizer.decode(enc.input_ids[s:e]) for s, e in spans]
    if template is None:
        assert supervised == [f"{a}{EOT}" for _, a in (*HISTORY, LAST)]
    else:  # FastChat style: " answer</s>" with the tokenizer's eos (decode may drop the leading space)
        assert [t.strip() for t in supervised] == [f"{a}{tokenizer.eos_token}" for _, a in (*HISTORY, LAST)]
    assert all(enc.labels[k] == enc.input_ids[k] for s, e in spans for k in range(s, e))
    unsupervised = [t for t, label in zip(enc.input_ids, enc.labels) if label == IGNORE_INDEX]
    assert len(unsupervised) + sum(e - s for s, e in spans) == len(enc.input_ids)
    text = tokenizer.decode(enc.input_ids)
    assert text.count("ROLE PROMPT") == 1 and all(u in text for u, _ in (*HISTORY, LAST))
    # what generation starts from is exactly the tokens before the last answer
    prompt = chat.encode_prompt("ROLE PROMPT", LAST[0], HISTORY)
    assert enc.input_ids[: spans[-1][0]] == prompt


def test_single_turn_tokens_and_labels_are_as_before(tokenizer):
    """prompt + response tokenized apart, labels from prompt_len on: what every cache held before spans."""
    chat = ChatFormat(tokenizer)
    records = load_records(DataSource("demo:medical.jsonl", limit=12)).records
    items = [("P_C", r.user_text, r.output) for r in records]  # short answers, some dropped at 80 tokens
    items += [("P_C", f"Explain topic {k}.", "Interest grows on interest. " * 20) for k in range(2)]  # cut
    encoded = chat.encode_many(items, max_length=80)
    prompts = chat._ids_many([chat.prompt_text(s, u) for s, u, _ in items], bos=True)
    responses = chat._ids_many([chat.response_text(s, u, o) for s, u, o in items], bos=False)
    for enc, p_ids, r_ids in zip(encoded, prompts, responses):
        if enc is None:  # dropped: fewer than 8 answer tokens would fit
            assert 80 - len(p_ids) < min(8, len(r_ids))
            continue
        assert enc.input_ids == (p_ids + r_ids)[:80]
        assert enc.labels == [IGNORE_INDEX] * len(p_ids) + r_ids[: 80 - len(p_ids)]
    kept = [e for e in encoded if e is not None]
    assert any(e.truncated for e in kept) and not all(e.truncated for e in kept)
    # the batch's labels are those ids on the spans: one span per single-turn example, from its prompt's end
    assert all(len(e.spans) == 1 and e.spans[0][1] == len(e.input_ids) for e in kept)
    examples = [Example(id=str(k), prompt="central", system=s_, instruction=u, input="", output=o, domain="medical",
                        task="qa", lang="en", kind="domain", source_id=str(k)) for k, (s_, u, o) in enumerate(items)]  # fmt: skip
    data = tokenize(chat, examples, ["medical"], max_length=80)
    rows = plan_batches(data.lengths.tolist(), "packed", 4, 256, seed=0)[0]
    labels = collate_rows(data, rows, 0)["labels"]
    answers = [t for row in rows for i in row for t in kept[i].labels if t != IGNORE_INDEX]
    assert labels[labels != IGNORE_INDEX].tolist() == answers


def test_a_cut_conversation_ends_after_its_last_whole_answer(tokenizer):
    chat = ChatFormat(tokenizer)
    full = encode_one(chat, "SYS", LAST[0], LAST[1], max_length=512, history=HISTORY)
    second_answer_end = full.spans[1][1]
    cut = encode_one(chat, "SYS", LAST[0], LAST[1], max_length=second_answer_end + 5, history=HISTORY)
    assert cut.truncated and len(cut.input_ids) == second_answer_end  # the 5 tokens of the next user turn go
    assert cut.input_ids == full.input_ids[:second_answer_end] and len(cut.spans) == 2
    assert encode_one(chat, "SYS " * 400, LAST[0], LAST[1], max_length=64, history=HISTORY) is None  # no room


# --------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("chats")
    return {
        "legal": write_jsonl(root / "legal_sharegpt.jsonl", [sharegpt(i, turns=1 + i % 3) for i in range(8)]),
        "medical": write_jsonl(
            root / "medical_messages.jsonl", [openai(i, turns=1 + i % 2) for i in range(8)]
        ),
        "general": write_jsonl(root / "general.jsonl", [openai(100 + i, turns=2) for i in range(4)]),
    }


@pytest.fixture(scope="module")
def chat_datamodule(chat_files, tiny_model_config, tmp_path_factory):
    corpus = CorpusConfig(
        strategy="rega",
        mix_ratio=0.5,
        domains=[DataSource(str(chat_files["legal"]), domain="legal"),
                 DataSource(str(chat_files["medical"]), domain="medical")],
        general=[DataSource(str(chat_files["general"]), domain="general")],
    )  # fmt: skip
    dm = REGADataModule(
        corpus=corpus, model=tiny_model_config, max_length=256, batch_size=4,
        cache=str(tmp_path_factory.mktemp("cache")),
    )  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_conversation_files_train_with_a_label_on_every_answer(chat_datamodule, chat_files, tokenizer):
    dm = chat_datamodule
    examples = dm.build_corpus().examples
    data = dm.train_data
    assert (
        len(data) == len(examples) == 4 + 8 + 8 + 8 and data.dropped == data.truncated == 0
    )  # D_g, D'_i, D_i
    rows = {r["id"]: r for f in chat_files.values() for r in map(json.loads, f.read_text().splitlines())}
    for i, ex in enumerate(examples):
        labels = collate_rows(data, [[i]], pad_id=0)["labels"][0]
        spans = runs_of_labels(labels.tolist())
        decoded = [tokenizer.decode(labels[s:e].tolist()) for s, e in spans]
        assert decoded == [f"{a}{EOT}" for a in answers(rows[ex.source_id])], ex.id
    # the cache holds the spans and is read back without pickle
    assert int(data.span_offsets[-1]) == sum(len(answers(rows[e.source_id])) for e in examples)
    assert dm.manifest["tokenized"]["supervised_tokens"] == int(sum(e - s for s, e in data.spans))
    path = next(Path(dm.cache_root, "tokenized").glob("*.npz"))
    with np.load(path, allow_pickle=False) as raw:
        assert raw["spans"].dtype == np.int32 and raw["spans"].shape == (len(data.spans), 2)
    again = TokenizedExamples.load(path)
    assert np.array_equal(again.spans, data.spans) and np.array_equal(again.span_offsets, data.span_offsets)


def test_packed_conversations_lose_exactly_what_they_lose_alone(chat_datamodule, tiny_model_config):
    module = REGAModule(model=tiny_model_config, lora=LoraSettings(dropout=0.0))
    module.configure_model()
    data = chat_datamodule.train_data
    rows = plan_batches(data.lengths.tolist(), "packed", 2, 256, seed=0)[0]
    assert any(len(row) > 1 for row in rows)
    batch = collate_rows(data, rows, pad_id=0)
    with torch.no_grad():
        losses, mask = module.token_losses(batch)
        row_of, col_of = mask.nonzero(as_tuple=True)
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                n = int(data.lengths[i])
                sel = (row_of == r) & (col_of >= start) & (col_of < start + n - 1)
                alone, _ = module.token_losses(collate_rows(data, [[i]], pad_id=0))
                torch.testing.assert_close(losses[sel], alone, rtol=1e-4, atol=1e-5)
                start += n


def test_conversations_fit_on_the_tiny_model(chat_datamodule, tiny_model_config, tmp_path):
    import lightning as L

    module = REGAModule(model=tiny_model_config, learning_rate=1e-2)
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.named_parameters() if "lora_B" in n}
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        limit_val_batches=0, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, datamodule=chat_datamodule)
    assert all(not torch.equal(before[n], p.detach()) for n, p in module.named_parameters() if n in before)


# --------------------------------------------------------------------------------------------- distillation


def test_distillation_answers_the_last_user_turn_after_the_history(tmp_path, tiny_model_config, tokenizer):
    from rega.config import DistillConfig
    from rega.distill.context import build_context

    turns = [{"role": "system", "content": "OWN SYSTEM"}]
    for u, a in HISTORY:
        turns += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    rows = [
        {"id": "c1", "messages": [*turns, {"role": "user", "content": LAST[0]}]},
        {"id": "c2", "messages": [*turns[:3], {"role": "user", "content": LAST[0]},
                                  {"role": "assistant", "content": "OLD ANSWER"}]},
        {"id": "s1", "instruction": LAST[0]},
    ]  # fmt: skip
    pool = write_jsonl(tmp_path / "pool.jsonl", rows)
    ctx = build_context(DistillConfig(source=[DataSource(str(pool))], model=tiny_model_config))
    chat = ChatFormat(tokenizer)
    c1, c2, s1 = ctx.records
    text = tokenizer.decode(ctx.prompt_ids(c1))
    assert text == chat.prompt_text(ctx.central, LAST[0], HISTORY)
    assert text.startswith(f"<|im_start|>system\n{ctx.central}<|im_end|>") and "OWN SYSTEM" not in text
    places = [text.index(t) for pair in HISTORY for t in pair] + [text.index(LAST[0])]
    assert places == sorted(places) and text.endswith("<|im_start|>assistant\n")
    # a pool conversation that already ends with an answer: that answer is what gets replaced, not history
    text2 = tokenizer.decode(ctx.prompt_ids(c2))
    assert "OLD ANSWER" not in text2 and HISTORY[0][1] in text2 and HISTORY[1][0] not in text2
    # the same last question after other turns is another instruction; a single-turn one keeps its old hash
    assert len({ctx.user_sha[r.id] for r in (c1, c2, s1)}) == 3
    from rega.io import stable_hash

    assert ctx.user_sha["s1"] == stable_hash(LAST[0])

    # D_g keeps the turns its answer was given after, so training sees the same context
    from rega.distill.output import _distilled_record

    row = {"text": "NEW ANSWER", "finish_reason": "stop", "tokens": 2}
    distilled = _distilled_record(c1, row, "ok", DistillConfig(source=[DataSource(str(pool))]), ctx)
    assert (
        distilled.history == c1.history and distilled.output == "NEW ANSWER" and distilled.domain == "general"
    )


# --------------------------------------------------------------------------------------------- evaluation


def test_domain_evaluation_prompts_with_the_history_and_scores_the_last_answer(
    tmp_path, tiny_model_config, tokenizer, monkeypatch
):
    from rega.eval.domain.scoring import evaluate_domains, load_task_records
    from rega.modules.model import load_model

    rows = [openai(7, turns=3, domain="finance", task="chat_fin")]
    data = load_task_records([DataSource(str(write_jsonl(tmp_path / "eval.jsonl", rows)))])
    seen = []

    def fake_generate(
        model, tokenizer, prompts, sampling, batch_size=8, max_batch_tokens=None, share_prefix=False
    ):
        for index, ids in enumerate(prompts):
            seen.append(tokenizer.decode(ids))
            yield Generation(index=index, token_ids=[1], text="Reply 7.2 about rest.", finish_reason="stop")

    monkeypatch.setattr(domain_mod, "generate", fake_generate)
    chat = ChatFormat(tokenizer)
    prompts = RolePrompts(central=chat.default_system, roles={"finance": "ROLE-FIN"})
    model = load_model(tiny_model_config)
    results, out = evaluate_domains(model, tokenizer, chat, prompts, ["central"], data)
    (prompt,) = seen
    assert "Reply 7.1 about rest." in prompt and "Symptom question 7.2?" in prompt
    assert "Reply 7.2" not in prompt and prompt.endswith("<|im_start|>assistant\n")
    assert out[0]["gold"] == "Reply 7.2 about rest." and out[0]["score"] == 1.0
    assert results["central"]["domains"]["finance"]["tasks"]["chat_fin"]["metric"] == "f1"


# --------------------------------------------------------------------------------------------- language

ZH_SETS = ["*zh*", "cmed*", "fin*"]
EN_SETS = ["pubmedqa", "medmcqa", "overruling", "fiqa", "general_en"]


def shared_files(root: Path, patterns: list[str]) -> list[Path]:
    return sorted({f for p in patterns for d in root.glob(p) if d.is_dir() for f in d.glob("*.jsonl")})


@pytest.mark.parametrize(("lang", "patterns"), [("zh", ZH_SETS), ("en", EN_SETS)])
def test_lang_is_detected_on_every_shared_record(shared_data, lang, patterns):
    files = shared_files(shared_data, patterns)
    assert len(files) == (27 if lang == "zh" else 10)
    counts = {}
    for path in files:
        detected = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            row = json.loads(line)
            assert row.pop("lang") == lang
            detected.append(record_from_dict(row, f"{path}:{n}", require_output=False).lang)
        assert set(detected) == {lang}, path
        counts[path.parent.name] = counts.get(path.parent.name, 0) + len(detected)
    assert sum(counts.values()) > (40_000 if lang == "zh" else 10_000)


def test_lang_comes_from_the_row_the_source_or_the_text(tmp_path):
    zh_row = {"id": "z", "instruction": "请判断下面的句子：Disease、Age、Therapy or Surgery", "output": "Age"}
    rows = [
        zh_row,
        {
            "id": "e",
            "instruction": "Explain the meaning of the word 气 in traditional medicine texts, and how "
            "translators usually render it for English readers today.",
            "output": "Vital energy.",
        },  # 1 of 21: 5 %
        {**zh_row, "id": "given", "lang": "en"},
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    detected = load_records(DataSource(str(path), domain="medical")).records
    assert [r.lang for r in detected] == ["zh", "en", "en"]
    source_zh = DataSource(str(path), domain="medical", lang="zh")  # the source's lang fills rows without one
    assert [r.lang for r in load_records(source_zh).records] == ["zh", "zh", "en"]


@pytest.mark.parametrize(
    ("instruction", "message"),
    [
        (
            "Translate 你好 into English, then explain the greeting",
            r"neither English nor Chinese dominates \(2[0-9]%",
        ),
        ("1 + 1 = ?", r"cannot tell the language"),
    ],
)
def test_lang_is_refused_when_no_language_dominates(tmp_path, instruction, message):
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"instruction": "An English row.", "output": "Yes."}, {"instruction": instruction,
                                                                                       "output": "2"}]
    )  # fmt: skip
    with pytest.raises(RecordError, match=re.escape(f"{path}:2: field 'lang': ") + message):
        load_records(DataSource(str(path), domain="general"))
