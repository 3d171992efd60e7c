"""Judge-free general ability: multiple-choice accuracy by log-likelihood and drift from the base model.

Both run offline in minutes and sit next to the judge scores, so forgetting is visible without an LLM judge.

* **General multiple choice** (ARC, PIQA, BoolQ, HellaSwag, Winogrande, TruthfulQA-MC1, CommonsenseQA,
  OpenBookQA; C-Eval and CMMLU for Chinese): every option is scored by the log-likelihood of its text as the
  assistant's answer to the question, rendered with the chat template under p_c. ``acc`` picks the option with the
  highest summed log-probability, ``acc_norm`` divides it by the option's length in characters (lm-eval's
  definitions). C-Eval and CMMLU list lettered options and score the letters. Two backends score identical
  strings: ``lm_eval`` (lm-evaluation-harness ``simple_evaluate`` on task YAMLs generated from
  ``rega/eval/general/lm_eval_tasks/*.yaml``; with it ``lm_eval:<task>`` names run the harness's stock tasks, which
  needs the dataset hub) and ``native`` (this module's batched scorer). ``auto`` takes lm_eval for single-process runs of
  a model whose tokenizer has a chat template with a system slot, and ``native`` otherwise: under DDP (lm-eval
  forgoes distribution for an in-memory model, while the native scorer shards items across ranks) and for named
  templates such as Vicuna's that lm-eval cannot render.
* **Drift**: mean per-token log-likelihood of reference responses under the model, rendered with the chat
  template under p_c and tokenized with :meth:`ChatFormat.encode_many` (labels = response tokens): self-distilled
  base-model answers on held-out general instructions (a fine-tuned model that still assigns them high likelihood
  still behaves like its base) and general reference answers. With base-model values given, the difference is
  reported (negative = the model moved away).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from rega.data.chat import IGNORE_INDEX, ChatFormat
from rega.data.records import Record
from rega.distributed import broadcast_from_zero, dist_info, gather_rows, shard
from rega.errors import ConfigError
from rega.eval.domain.metrics import WeightedMean, metric_value
from rega.eval.general.loglik import (  # noqa: F401  (re-exported: callers import them from here)
    continuation_logprobs,
    continuation_text,
    score_on_cache,
)
from rega.io import read_jsonl
from rega.paths import resolve_path, shared_data_dir

log = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
TEXT, LETTERS_STYLE = "text", "letters"
# name -> (style, headline metric). acc_norm where the Open LLM Leaderboard / lm-eval papers report it.
BUILTIN_MC: dict[str, tuple[str, str]] = {
    "arc_easy": (TEXT, "acc_norm"),
    "arc_challenge": (TEXT, "acc_norm"),
    "piqa": (TEXT, "acc_norm"),
    "boolq": (TEXT, "acc"),
    "hellaswag": (TEXT, "acc_norm"),
    "winogrande": (TEXT, "acc"),
    "truthfulqa_mc1": (TEXT, "acc"),
    "commonsense_qa": (TEXT, "acc"),
    "openbookqa": (TEXT, "acc_norm"),
    "ceval": (LETTERS_STYLE, "acc"),
    "cmmlu": (LETTERS_STYLE, "acc"),
}
DEFAULT_MC = {"en": ["arc_easy", "piqa"], "zh": ["ceval", "cmmlu"]}
BACKENDS = ("auto", "lm_eval", "native")
STOCK_PREFIX = "lm_eval:"


@dataclass(frozen=True)
class MCSet:
    """One general multiple-choice set: a local JSONL file in the record schema, or a stock lm-eval task."""

    name: str
    path: str | None  # resolved file; None for a stock lm-eval task
    style: str = TEXT
    metric: str = "acc"

    @property
    def stock(self) -> bool:
        return self.path is None


def resolve_mc_set(spec: str) -> MCSet:
    """``arc_easy`` (a built-in name, read from ``general_mc/<name>/dev.jsonl`` in the shared data folder), a path
    to a JSONL file in the record schema (``name:letters=PATH`` or ``name=PATH`` to name it and pick a style), or
    ``lm_eval:<task>`` for a stock lm-eval task (needs the dataset hub)."""
    if spec.startswith(STOCK_PREFIX):
        return MCSet(name=spec[len(STOCK_PREFIX) :], path=None)
    if spec in BUILTIN_MC:
        style, metric = BUILTIN_MC[spec]
        return MCSet(spec, str(shared_data_dir() / "general_mc" / spec / "dev.jsonl"), style, metric)
    name, style, path = None, TEXT, spec
    if "=" in spec:
        name, path = spec.split("=", 1)
        if ":" in name:
            name, style = name.split(":", 1)
    if style not in (TEXT, LETTERS_STYLE):
        raise ConfigError(f"general_mc {spec!r}: style must be {TEXT} or {LETTERS_STYLE}, got {style!r}")
    resolved = resolve_path(path)
    if not resolved.is_file():
        known = ", ".join(BUILTIN_MC)
        raise ConfigError(
            f"general_mc {spec!r}: not a built-in set ({known}), a JSONL file, or lm_eval:<task>"
        )
    if name is None:
        name = resolved.parent.name if resolved.stem in ("dev", "test", "train") else resolved.stem
    return MCSet(name, str(resolved), style, BUILTIN_MC.get(name, (style, "acc"))[1])


def task_template(style: str) -> dict:
    return yaml.safe_load((TEMPLATE_DIR / f"mc_{style}.yaml").read_text(encoding="utf-8"))


def _render(template: Any, doc: dict) -> Any:
    """One lm-eval template field rendered exactly as lm-eval renders it (feature name, or a Jinja template)."""
    import ast

    from lm_eval.utils import apply_template

    if isinstance(template, str) and template in doc:
        return doc[template]
    text = apply_template(template, doc)
    if text.isdigit():
        return int(text)
    if text.startswith("[") and text.endswith("]"):
        return ast.literal_eval(text)
    return text


def mc_items(mc: MCSet, limit: int | None) -> list[dict]:
    """The first ``limit`` documents of a local set as {id, user, choices, gold}, rendered from its template."""
    template = task_template(mc.style)
    docs = read_jsonl(mc.path)[:limit] if limit is not None else read_jsonl(mc.path)
    items = []
    for index, doc in enumerate(docs):
        doc = {"input": "", "lang": "en", **doc}
        items.append(
            {
                "id": str(doc.get("id", index)),
                "user": _render(template["doc_to_text"], doc),
                "choices": list(_render(template["doc_to_choice"], doc)),
                "gold": int(_render(template["doc_to_target"], doc)),
            }
        )
    return items


# --------------------------------------------------------------------------------------------- general MC


def _native_mc(
    model, tokenizer, chat: ChatFormat, system: str, mc: MCSet, limit, batch_size, common_prefix: bool = False
) -> tuple[dict, list[dict]]:
    rank, world = dist_info()
    items = shard(mc_items(mc, limit), rank, world)
    pairs, owners = [], []
    for k, item in enumerate(items):
        ctx = chat.encode_prompt(system, item["user"])
        for choice in item["choices"]:
            cont = tokenizer(continuation_text(chat, system, item["user"], choice), add_special_tokens=False)[
                "input_ids"
            ]
            pairs.append((ctx, cont))
            owners.append(k)
    desc = f"general MC {mc.name}"
    scores = continuation_logprobs(
        model, tokenizer, pairs, batch_size, desc=desc, common_prefix=common_prefix
    )
    device = next(model.parameters()).device
    acc, acc_norm = WeightedMean().to(device), WeightedMean().to(device)
    rows = []
    for k, item in enumerate(items):
        lls = [s for (s, _), o in zip(scores, owners) if o == k]
        norms = [ll / max(1, len(c)) for ll, c in zip(lls, item["choices"])]
        pred, pred_norm = (
            max(range(len(lls)), key=lls.__getitem__),
            max(range(len(norms)), key=norms.__getitem__),
        )
        acc.update([float(pred == item["gold"])])
        acc_norm.update([float(pred_norm == item["gold"])])
        rows.append(
            {
                "set": mc.name,
                "id": item["id"],
                "gold": item["gold"],
                "pred": pred,
                "pred_norm": pred_norm,
                "loglik": lls,
            }
        )
    summary = {"acc": metric_value(acc), "acc_norm": metric_value(acc_norm)}
    rows = gather_rows(rows)
    summary["n"] = len(rows)
    return summary, rows


def _lm_eval_tasks(sets: list[MCSet], folder: str) -> dict[str, str]:
    """{set: lm-eval task name}: a task YAML in ``folder`` for every local set, stock tasks by their name."""
    names = {}
    for mc in sets:
        if mc.stock:
            names[mc.name] = mc.name
            continue
        task = task_template(mc.style)
        task["task"] = names[mc.name] = f"rega_{mc.name}"
        task["dataset_kwargs"]["data_files"]["test"] = mc.path
        (Path(folder) / f"rega_{mc.name}.yaml").write_text(
            yaml.safe_dump(task, allow_unicode=True), encoding="utf-8"
        )
    return names


def _lm_eval_row(mc: MCSet, sample: dict) -> dict:
    """One lm-eval sample as a general_mc.jsonl row (option log-likelihoods, plain and per-character picks)."""
    lls = [float(resp[0]) for resp in sample["filtered_resps"]]
    doc = sample["doc"]
    choices = doc.get("choices") or []
    norms = [ll / max(1, len(str(c))) for ll, c in zip(lls, choices)] if len(choices) == len(lls) else lls
    return {
        "set": mc.name, "id": str(doc.get("id", sample["doc_id"])), "gold": sample["target"],
        "pred": max(range(len(lls)), key=lls.__getitem__), "pred_norm": max(range(len(norms)), key=norms.__getitem__),
        "loglik": lls,
    }  # fmt: skip


def _lm_eval_mc(
    model, tokenizer, system: str, sets: list[MCSet], limit, batch_size
) -> dict[str, tuple[dict, list[dict]]]:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm-eval").setLevel(logging.WARNING)
    was_training = model.training
    try:
        with tempfile.TemporaryDirectory(prefix="rega-lm-eval-") as tmp:
            names = _lm_eval_tasks(sets, tmp)
            manager = TaskManager(include_path=tmp, include_defaults=any(mc.stock for mc in sets))
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            result = simple_evaluate(
                model=lm,
                tasks=list(names.values()),
                task_manager=manager,
                limit=limit,
                apply_chat_template=True,
                system_instruction=system or None,
                log_samples=True,
                bootstrap_iters=0,
                # None: do not reseed the caller's generators (training goes on after an evaluation).
                random_seed=None,
                numpy_random_seed=None,
                torch_random_seed=None,
                fewshot_random_seed=None,
            )
    finally:
        model.train(was_training)
    out = {}
    for mc in sets:
        metrics = result["results"][names[mc.name]]
        rows = [_lm_eval_row(mc, sample) for sample in result["samples"].get(names[mc.name], [])]
        summary = {"acc": metrics.get("acc,none"), "acc_norm": metrics.get("acc_norm,none"), "n": len(rows)}
        out[mc.name] = (summary, rows)
    return out


def pick_backend(backend: str, chat: ChatFormat, system: str) -> str:
    if backend not in BACKENDS:
        raise ConfigError(f"general_mc_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend != "auto":
        return backend
    _, world = dist_info()
    lm_eval_fits = chat.named is None and chat.use_system_slot and bool(system) and world == 1
    return "lm_eval" if lm_eval_fits else "native"


def general_mc_scores(
    model,
    tokenizer,
    chat: ChatFormat,
    system: str,
    sets: Sequence[MCSet],
    limit: int | None = 100,
    batch_size: int = 8,
    backend: str = "auto",
    common_prefix: bool = False,
) -> tuple[dict[str, dict], list[dict]]:
    """({set: {acc, acc_norm, n, metric, score, backend}}, per-item rows), every set under the prompt ``system``.
    ``common_prefix``: the native backend runs the leading tokens its batches' questions share once.

    Under DDP every rank must call this; the native backend shards items across ranks and syncs its metrics,
    lm-eval runs on rank 0 and its result is broadcast.
    """
    chosen = pick_backend(backend, chat, system)
    if any(mc.stock for mc in sets) and chosen != "lm_eval":
        raise ConfigError("stock lm_eval:<task> sets need general_mc_backend lm_eval (and a single process)")
    results: dict[str, tuple[dict, list[dict]]] = {}
    log.info(
        "general multiple choice (%s backend): %s, first %s items each", chosen, [m.name for m in sets], limit
    )
    if chosen == "native":
        for mc in sets:
            results[mc.name] = _native_mc(
                model, tokenizer, chat, system, mc, limit, batch_size, common_prefix
            )
    elif sets:
        rank, _ = dist_info()
        results = _lm_eval_mc(model, tokenizer, system, list(sets), limit, batch_size) if rank == 0 else {}
        results = broadcast_from_zero(results)
    summary, rows = {}, []
    for mc in sets:
        part, part_rows = results[mc.name]
        summary[mc.name] = {**part, "metric": mc.metric, "score": part.get(mc.metric), "backend": chosen}
        rows.extend(part_rows)
    return summary, rows


# --------------------------------------------------------------------------------------------- drift


def drift_scores(
    model,
    tokenizer,
    chat: ChatFormat,
    system: str,
    sources: dict[str, list[Record]],
    batch_size: int = 8,
    max_length: int = 1024,
    rows: list[dict] | None = None,
) -> dict[str, dict]:
    """{source: {logprob_per_token, ppl, n_records, n_tokens, truncated}}: token-weighted mean log-probability of
    each record's ``output`` as the answer to its instruction under ``system``. Sharded across ranks. ``rows``, when
    given, receives one {source, id, logprob, tokens} per scored record (all ranks' rows, on every rank)."""
    import math

    rank, world = dist_info()
    device = next(model.parameters()).device
    out = {}
    mine_rows: list[dict] = []
    for name, records in sources.items():
        mine = shard(records, rank, world)
        encoded = chat.encode_many(
            [(system, r.user_text, r.output) for r in mine], max_length, min_response_tokens=1
        )
        pairs, ids, truncated = [], [], 0
        for rec, enc in zip(mine, encoded):
            if enc is None:
                continue
            start = next(k for k, label in enumerate(enc.labels) if label != IGNORE_INDEX)
            pairs.append((enc.input_ids[:start], enc.input_ids[start:]))
            ids.append(rec.id)
            truncated += int(enc.truncated)
        scores = continuation_logprobs(model, tokenizer, pairs, batch_size, desc=f"drift {name}")
        mine_rows += [{"source": name, "id": i, "logprob": s, "tokens": n} for i, (s, n) in zip(ids, scores)]
        metric = WeightedMean().to(device)
        metric.update([s for s, _ in scores], [n for _, n in scores])
        value = metric_value(metric)  # synced across ranks by torchmetrics
        n_records, n_tokens, n_truncated = sum_over_ranks(
            [len(scores), sum(n for _, n in scores), truncated], device
        )
        out[name] = {
            "logprob_per_token": value,
            "ppl": math.exp(-value) if value is not None else None,
            "n_records": int(n_records),
            "n_tokens": int(n_tokens),
            "truncated": int(n_truncated),
        }
    if rows is not None:
        rows.extend(gather_rows(mine_rows))
    return out


def sum_over_ranks(values: Sequence[float], device: torch.device | str = "cpu") -> list[float]:
    """Element-wise sums over ranks (the values themselves when not distributed)."""
    _, world = dist_info()
    if world == 1:
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


@contextlib.contextmanager
def base_model(model):
    """Adapters disabled inside the block (a peft model), or the model itself."""
    disable = getattr(model, "disable_adapter", None)
    if disable is None:
        yield model
        return
    with disable():
        yield model
