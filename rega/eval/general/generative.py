"""Generative general ability without a judge: what the model *writes* for held-out general instructions.

General multiple choice and drift never look at a generated answer, yet fine-tuning on short-answer domain data
mostly changes how a model answers general instructions: tersely, or in the domain's format (a bare "Yes", a
letter). Here each instruction of a general source (held-out instructions with human reference answers, e.g.
``shared:general_eval_en_dev/dev.jsonl``) gets the model's greedy answer under p_c (the domain tasks' batched
generation, :func:`rega.eval.domain.scoring.greedy_answers`), scored per item:

* ``f1_ref``, ``rougeL_ref``: unigram F1 and ROUGE-L F-measure against the human reference (``None`` where the
  item has none: BELLE's open-ended classes);
* ``f1_base``, ``rougeL_base``: the same against the base model's own greedy answer (adapters disabled, generated
  once in the same run: :func:`rega.eval.pipeline.base_reference`), ``None`` without one;
* ``length`` and ``base_length``: the answer's length and the base answer's, in the tokens of the metrics (words
  for English, characters for Chinese); a source's ``length_ratio`` is sum(length) / sum(base_length), so one
  near-empty base answer cannot dominate it;
* ``degenerate`` (0/1) and its reason: ``empty``; ``label`` (the whole answer is a bare label or option letter,
  :data:`BARE_LABELS`, and the human reference is not one); ``short`` (under :data:`SHORT_ANSWER` tokens where the
  human reference has at least :data:`LONG_REFERENCE`); ``repeat`` (more than :data:`REPEAT_SHARE` of its n-grams repeat an earlier one).

Tokens follow the domain metrics' rule (:func:`rega.eval.domain.metrics.tokens`: SQuAD-normalised words for
English, characters without whitespace and punctuation for Chinese); ROUGE-L is torchmetrics' implementation
given that tokenizer. As in :func:`~rega.eval.domain.metrics.unigram_f1`, two empty texts score 1, one empty 0.
Under DDP the items are sharded across ranks and the rows gathered; every rank aggregates the same rows.
"""

from __future__ import annotations

import logging
import string
from collections.abc import Callable, Sequence

from rega.data.chat import ChatFormat
from rega.data.records import LETTERS, Record
from rega.distributed import dist_info, gather_rows, shard
from rega.eval.domain.metrics import tokens, unigram_f1

log = logging.getLogger(__name__)

# "One short phrase": the pilot of issue #33 counted fine-tuned answers under 8 words (1 -> 10 of 40); a Chinese
# character carries about half an English word, hence 15.
SHORT_ANSWER = {"en": 8, "zh": 15}
# A reference this long is a paragraph (about the median of the general_eval dev references), so a short phrase
# does not answer it; shorter references (a name, a number) are legitimately answered in a few words.
LONG_REFERENCE = {"en": 30, "zh": 60}
# Repeated n-grams: n long enough that fluent text rarely repeats one (4 words, 6 characters) ...
REPEAT_N = {"en": 4, "zh": 6}
# ... and the share of an answer's n-grams that repeat an earlier one (rep-n, Welleck et al. 2019) above which it
# is a loop: fluent answers stay under 0.1, greedy loops run towards 1.
REPEAT_SHARE = 0.3
# An answer that is nothing but one of these (case, whitespace and punctuation ignored) is a domain label: the
# shipped closed tasks' labels (pubmedqa, overruling, cmedqq, finfe) and option letters.
_EN_LABELS = ("yes", "no", "maybe", "true", "false")
_ZH_LABELS = ("是", "否", "对", "错", "正确", "错误", "不是", "积极", "消极", "中性")
BARE_LABELS = frozenset((*_EN_LABELS, *_ZH_LABELS, *(letter.lower() for letter in LETTERS)))
METRICS = ("f1_ref", "rougeL_ref", "f1_base", "rougeL_base", "length", "base_length", "degenerate")
_STRIP = string.punctuation + string.whitespace + "。，、；：？！“”‘’（）【】《》…·．"


def answer_tokens(text: str, lang: str) -> list[str]:
    """The domain metrics' tokens: words (English) or characters (Chinese)."""
    return tokens(text, "zh" if lang == "zh" else "en")


def rouge_l(prediction: str, reference: str, lang: str = "en") -> float:
    """ROUGE-L F-measure on the domain metrics' tokens (torchmetrics' LCS); two empty texts 1, one empty 0."""
    from torchmetrics.functional.text.rouge import rouge_score

    pred, ref = answer_tokens(prediction, lang), answer_tokens(reference, lang)
    if not pred or not ref:
        return float(pred == ref)
    score = rouge_score(
        prediction,
        reference,
        rouge_keys="rougeL",
        normalizer=lambda text: text,
        tokenizer=lambda text: answer_tokens(text, lang),
    )
    return float(score["rougeL_fmeasure"])


def repeated_share(toks: Sequence[str], n: int) -> float:
    """Share of the n-grams that repeat an earlier n-gram of the same text (0 with no n-gram)."""
    grams = [tuple(toks[k : k + n]) for k in range(len(toks) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def is_bare_label(text: str) -> bool:
    """Whether the whole answer is one bare label ("Yes.", "(B)", "否")."""
    return text.strip(_STRIP).casefold() in BARE_LABELS


def degenerate_reason(answer: str, reference: str, lang: str) -> str | None:
    """Why an answer is degenerate (``empty``, ``label``, ``short``, ``repeat``: the first that applies, see the
    module docstring), else None; ``reference``: the human reference ("" where there is none)."""
    lang = "zh" if lang == "zh" else "en"
    if not answer.strip(_STRIP):
        return "empty"
    if is_bare_label(answer) and not is_bare_label(reference):  # a label answers a label reference
        return "label"
    toks = answer_tokens(answer, lang)  # "A" has no English token: SQuAD drops the article
    if len(toks) < SHORT_ANSWER[lang] and len(answer_tokens(reference, lang)) >= LONG_REFERENCE[lang]:
        return "short"
    if repeated_share(toks, REPEAT_N[lang]) > REPEAT_SHARE:
        return "repeat"
    return None


def score_answer(answer: str, reference: str, base: str | None, lang: str) -> dict:
    """One item's scores (see the module docstring); ``None`` for what has no reference or no base answer."""
    has_ref = bool(answer_tokens(reference, lang))
    reason = degenerate_reason(answer, reference, lang)
    return {
        "f1_ref": unigram_f1(answer, reference, "zh" if lang == "zh" else "en") if has_ref else None,
        "rougeL_ref": rouge_l(answer, reference, lang) if has_ref else None,
        "f1_base": unigram_f1(answer, base, "zh" if lang == "zh" else "en") if base is not None else None,
        "rougeL_base": rouge_l(answer, base, lang) if base is not None else None,
        "length": len(answer_tokens(answer, lang)),
        "base_length": len(answer_tokens(base, lang)) if base is not None else None,
        "length_ratio": _ratio(answer, base, lang),
        "degenerate": float(reason is not None),
        "degenerate_reason": reason,
    }


def _ratio(answer: str, base: str | None, lang: str) -> float | None:
    if base is None or not answer_tokens(base, lang):
        return None
    return len(answer_tokens(answer, lang)) / len(answer_tokens(base, lang))


def _mean(values) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def summarize(rows: Sequence[dict]) -> dict:
    """One source's aggregates from its rows: means of the per-item scores (over the items that have them), the
    share of degenerate answers, the mean length and length_ratio = sum(length) / sum(base_length)."""
    out: dict = {"n": len(rows), "n_reference": sum(r["f1_ref"] is not None for r in rows)}
    for name in ("f1_ref", "rougeL_ref", "f1_base", "rougeL_base", "degenerate", "length"):
        out[name] = _mean(r[name] for r in rows)
    with_base = [r for r in rows if r["base_length"] is not None]
    base_total = sum(r["base_length"] for r in with_base)
    out["length_ratio"] = sum(r["length"] for r in with_base) / base_total if base_total else None
    out["unit"] = "chars" if rows and rows[0]["lang"] == "zh" else "words"
    return out


def general_gen_scores(
    model,
    tokenizer,
    chat: ChatFormat,
    system: str,
    sources: dict[str, list[Record]],
    settings,
    answer: Callable,
    base_answers: dict[str, dict[str, str]] | None = None,
    rows: list[dict] | None = None,
) -> tuple[dict[str, dict], dict[str, dict[str, str]]]:
    """({source: aggregates}, {source: {id: answer}}): each record's greedy answer under ``system`` (at most
    ``settings.general_gen_max_new_tokens`` tokens), scored against its reference and, where ``base_answers``
    has it, the base model's answer. ``answer``: the domain tasks' batched greedy generation,
    :func:`rega.eval.domain.scoring.greedy_answers` (passed in: that module imports this package). ``rows`` receives
    one row per item (all ranks' rows, in record order)."""
    rank, world = dist_info()
    base_answers = base_answers or {}
    summary: dict[str, dict] = {}
    answers: dict[str, dict[str, str]] = {}
    for name, records in sources.items():
        mine = shard(records, rank, world)
        prompts = [chat.encode_prompt(system, rec.user_text, rec.history) for rec in mine]
        cap, desc = settings.general_gen_max_new_tokens, f"general generation {name}"
        gens = answer(model, tokenizer, prompts, cap, settings, desc)
        base = base_answers.get(name, {})
        part = []
        for rec, gen in zip(mine, gens):
            scores = score_answer(gen.text, rec.output, base.get(rec.id), rec.lang)
            row = {"source": name, "id": rec.id, "lang": rec.lang, "answer": gen.text}
            part.append({**row, "finish_reason": gen.finish_reason, **scores})
        order = {rec.id: k for k, rec in enumerate(records)}
        gathered = sorted(gather_rows(part), key=lambda r: order[r["id"]])
        summary[name] = summarize(gathered)
        answers[name] = {r["id"]: r["answer"] for r in gathered}
        if rows is not None:
            rows.extend(gathered)
        log.info("general generation %s: %s", name, summary[name])
    return summary, answers


def compare_with_base_answers(result: dict, base_answers: dict[str, dict[str, str]]) -> None:
    """Fill an evaluation's base comparisons (per item ``f1_base``, ``rougeL_base``, ``base_length``; each source's
    ``f1_base``, ``rougeL_base``, ``length_ratio``) from ``base_answers``, in place, for the sources evaluated
    without them. The report uses a zero-shot run's answers (the base model's greedy answers, the same for every
    seed), so a grid need not answer as the base model again in every job."""
    answers = result.get("general_gen_answers") or {}
    for name, unit in ((result.get("items") or {}).get("general_gen") or {}).items():
        base, mine = base_answers.get(name) or {}, answers.get(name) or {}
        if not base or any(value is not None for value in unit["f1_base"]):
            continue
        lang = "zh" if result["general_gen"][name].get("unit") == "chars" else "en"
        for k, item in enumerate(unit["ids"]):
            if item in base and item in mine:
                scores = score_answer(mine[item], "", base[item], lang)
                for key in ("f1_base", "rougeL_base", "base_length"):
                    unit[key][k] = round(float(scores[key]), 6)
        rows = [{"lang": lang, **{key: unit[key][k] for key in METRICS}} for k in range(len(unit["ids"]))]
        again = summarize(rows)
        result["general_gen"][name].update(
            {key: again[key] for key in ("f1_base", "rougeL_base", "length_ratio")}
        )
