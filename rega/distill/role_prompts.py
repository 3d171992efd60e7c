"""Role prompts written by a model: ``rega prompts`` writes each domain's p_i from k of its training items.

For every domain of the data config's ``domains`` sources, ``k`` training items are drawn (seeded per domain, so a
domain's draw does not depend on the others) and the model (the base model by default) is asked, under the
instruction :data:`INSTRUCTIONS` [``lang``], to write the role prompt. The instruction shows the k items'
instructions and answers, each cut to :data:`ITEM_CHARS` characters, and asks for one paragraph of system prompt
that tells an assistant which expert role to take for this domain and the answer format these items need
(English and Chinese wordings; ``{items}`` is where the items go). The request is sent as the user turn under
the model's own default system prompt.

With ``candidates: 1`` the prompt is decoded greedily; with more, that many are sampled (temperature 0.7, top-p
0.95, seeded) and each is scored by the model's mean log-likelihood per token of k *held-out* items' answers of
the domain (drawn after the k shown ones) under that candidate as system prompt; the best is kept. A prompt longer
than ``max_words`` (words in English, characters in Chinese) is cut at the last sentence end that fits.

The output YAML is a prompts file (``roles: {domain: prompt}``) plus ``provenance: {domain: {...}}``: the model,
k, the seed, the sampled items' ids, the candidates and their scores, and the instruction's language. Give it as
``prompts.file`` of a corpus config: the corpus manifest then records the provenance under ``prompts_provenance``,
and inline ``prompts.roles`` still override it (a user-written prompt always wins: domains that have one are not
written at all). The file is rewritten atomically after every domain, and a rerun skips the domains it already
holds with the same settings (model, lang, k, seed, candidates, max_words, instruction), so each domain is
written exactly once; a role in the file without provenance was written by hand and is kept.

The settings are one :class:`~rega.data.prompts.RolePromptWriting`, the command's options and a fit's
``data.corpus.prompts.write`` alike. With the latter, ``rega fit`` writes what the file lacks before it builds the
corpus (:func:`ensure_role_prompts`, from the LightningCLI's ``before_fit``), in the fit's only process or in the
one that starts the others, before it starts them; fits started together take turns on a lock beside the file.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import random
import re
from pathlib import Path

import yaml

from rega.config import EMBEDDED, ModelConfig, SamplingConfig
from rega.data.chat import ChatFormat
from rega.data.corpus import CorpusConfig
from rega.data.loaders import load_many
from rega.data.prompts import RolePromptWriting
from rega.data.records import GENERAL, Record
from rega.errors import ConfigError, EmptyDataError, UserError
from rega.eval.progress import Progress
from rega.io import atomic_write, stable_hash, waiting_lock
from rega.model_source import load_tokenizer
from rega.modules.generation import generate
from rega.modules.model import load_model
from rega.paths import resolve_path

log = logging.getLogger(__name__)

ITEM_CHARS = 400  # each shown instruction and answer is cut to this many characters
INSTRUCTIONS = {
    "en": (
        "Here are {k} example tasks from one domain, each with its instruction and answer:\n\n{items}\n\n"
        "Write a system prompt for an AI assistant that will answer tasks like these. In one paragraph, tell the "
        "assistant which expert role to take for this domain and the answer format these tasks need. Reply with "
        "the system prompt only."
    ),
    "zh": (
        "以下是同一领域的{k}个示例任务，每个包含指令和答案：\n\n{items}\n\n"
        "请为将要回答此类任务的AI助手写一段系统提示词。用一段话告诉助手在这个领域应扮演什么专家角色，"
        "以及这些任务需要的回答格式。只回复系统提示词本身。"
    ),
}
ITEM_FORMAT = {
    "en": "Example {n}\nInstruction: {instruction}\nAnswer: {answer}",
    "zh": "示例{n}\n指令：{instruction}\n答案：{answer}",
}
SAMPLED = {"temperature": 0.7, "top_p": 0.95}
SETTINGS = ("model", "lang", "k", "seed", "candidates", "max_words", "instruction")
SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s*")


class EmptyPromptError(UserError, RuntimeError):
    """The model wrote no usable text for a domain."""


def _cut(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def instruction_text(lang: str, items: list[Record]) -> str:
    """The request for one domain's role prompt, showing ``items``."""
    shown = [
        ITEM_FORMAT[lang].format(
            n=n, instruction=_cut(rec.user_text, ITEM_CHARS), answer=_cut(rec.output, ITEM_CHARS)
        )
        for n, rec in enumerate(items, 1)
    ]
    return INSTRUCTIONS[lang].format(k=len(items), items="\n\n".join(shown))


def _length(text: str, lang: str) -> int:
    return len(re.sub(r"\s", "", text)) if lang == "zh" else len(text.split())


def limit_length(text: str, max_words: int, lang: str = "en") -> str:
    """One paragraph of at most ``max_words`` words (characters for ``zh``), cut at the last sentence end that
    fits; a first sentence that is already too long is cut at the limit."""
    text = " ".join(text.split()).strip().strip('"“”')
    if _length(text, lang) <= max_words:
        return text
    kept = ""
    for sentence in (s for s in SENTENCE_END.split(text) if s):
        joined = f"{kept} {sentence}".strip() if lang != "zh" else kept + sentence
        if _length(joined, lang) > max_words:
            break
        kept = joined
    if kept:
        return kept
    if lang == "zh":
        return "".join(text.split())[:max_words]
    return " ".join(text.split()[:max_words])


def domain_seed(seed: int, domain: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{domain}".encode()).digest()[:8], "big")


def sample_items(records: list[Record], domain: str, k: int, seed: int) -> tuple[list[Record], list[Record]]:
    """(k shown items, up to k held-out items) of one domain: one seeded draw of 2k, in the order of ids."""
    pool = sorted(records, key=lambda r: r.id)
    drawn = random.Random(domain_seed(seed, domain)).sample(pool, min(len(pool), 2 * k))
    return drawn[:k], drawn[k:]


def domain_records(corpus: CorpusConfig) -> dict[str, list[Record]]:
    """The training records of every domain of the corpus config (``only_domains`` applied), by domain."""
    if not corpus.domains:
        raise ConfigError("no domain sources under 'domains': nothing to write role prompts for")
    report = load_many(corpus.domains, skip_invalid=corpus.skip_invalid)
    out: dict[str, list[Record]] = {}
    for rec in report.records:
        if rec.domain != GENERAL and (not corpus.only_domains or rec.domain in corpus.only_domains):
            out.setdefault(rec.domain, []).append(rec)
    if not out:
        raise EmptyDataError(f"no domain records to write role prompts from ({'; '.join(report.empty)})")
    return dict(sorted(out.items()))


def read_output(path: Path) -> dict:
    if not path.exists():
        return {"roles": {}, "provenance": {}}
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a prompts file (a mapping with 'roles' and 'provenance')")
    return {**data, "roles": dict(data.get("roles") or {}), "provenance": dict(data.get("provenance") or {})}


def write_output(path: Path, data: dict) -> None:
    with atomic_write(path) as handle:
        yaml.safe_dump(data, handle, allow_unicode=True, sort_keys=False, width=100)


class Writer:
    """The model, its tokenizer and chat format, loaded once on first use."""

    def __init__(self, model: ModelConfig):
        self.config, self.model = model, None

    def load(self):
        if self.model is None:
            import torch

            self.tokenizer = load_tokenizer(self.config)
            self.chat = ChatFormat(self.tokenizer, self.config.chat_template, self.config.system_placement)
            self.model = load_model(self.config).to("cuda" if torch.cuda.is_available() else "cpu")
        return self

    def drafts(self, request: str, candidates: int, max_new_tokens: int, seed: int) -> list[str]:
        ids = self.chat.encode_prompt(self.chat.default_system or "", request)
        sampling = SamplingConfig(
            do_sample=candidates > 1,
            **(SAMPLED if candidates > 1 else {"temperature": 1.0, "top_p": 1.0}),
            max_new_tokens=max_new_tokens,
            seed=seed,
        )
        texts = [""] * candidates
        for gen in generate(self.model, self.tokenizer, [ids] * candidates, sampling, batch_size=candidates):
            texts[gen.index] = gen.text
        return texts

    def score(self, prompt: str, held_out: list[Record]) -> float:
        """Mean log-likelihood per token of the held-out answers with ``prompt`` as system prompt."""
        from rega.eval.general.loglik import continuation_logprobs, continuation_text

        pairs = [
            (
                self.chat.encode_prompt(prompt, rec.user_text),
                self.tokenizer(
                    continuation_text(self.chat, prompt, rec.user_text, rec.output), add_special_tokens=False
                )["input_ids"],
            )
            for rec in held_out
        ]
        scored = continuation_logprobs(self.model, self.tokenizer, pairs, share_prefix=False)
        return sum(lp for lp, _ in scored) / max(1, sum(n for _, n in scored))


def settings_of(writing: RolePromptWriting) -> dict:
    """What a domain's provenance records of the settings, and a rerun compares (``writing`` filled in)."""
    lang = writing.lang
    return {
        "model": writing.model.name_or_path,
        "lang": lang,
        "k": writing.k,
        "seed": writing.seed,
        "candidates": writing.candidates,
        "max_words": writing.max_words,
        "instruction": stable_hash([INSTRUCTIONS[lang], ITEM_FORMAT[lang], ITEM_CHARS]),
    }


def _done(data: dict, domain: str, settings: dict) -> bool:
    """Written before with the same settings, or written by hand (a role without provenance)."""
    if domain not in data["roles"]:
        return False
    prov = data["provenance"].get(domain)
    return prov is None or {key: prov.get(key) for key in SETTINGS} == settings


def write_domain(writer: Writer, domain: str, records: list[Record], settings: dict) -> tuple[str, dict]:
    """(the chosen prompt, its provenance) of one domain."""
    k, candidates, lang = settings["k"], settings["candidates"], settings["lang"]
    shown, held_out = sample_items(records, domain, k, settings["seed"])
    if candidates > 1 and not held_out:
        raise EmptyDataError(
            f"domain {domain!r} has {len(records)} records: scoring candidates needs held-out items beyond the "
            f"k={k} shown ones (lower k or use candidates: 1)"
        )
    writer.load()
    max_new_tokens = 3 * settings["max_words"] + 16
    texts = writer.drafts(instruction_text(lang, shown), candidates, max_new_tokens, settings["seed"])
    drafts = [limit_length(text, settings["max_words"], lang) for text in texts]
    usable = [i for i, text in enumerate(drafts) if text]
    if not usable:
        raise EmptyPromptError(
            f"{settings['model']} wrote an empty role prompt for domain {domain!r}: try candidates > 1 or another "
            "model"
        )
    scores = [
        round(writer.score(drafts[i], held_out), 6) if candidates > 1 and drafts[i] else None
        for i in range(candidates)
    ]
    best = max(usable, key=lambda i: scores[i] if scores[i] is not None else 0.0)
    provenance = {
        **settings,
        "items": [rec.id for rec in shown],
        "held_out": [rec.id for rec in held_out] if candidates > 1 else [],
        "drafts": drafts,
        "scores": scores if candidates > 1 else [],
        "chosen": best,
    }
    return drafts[best], provenance


def pending_domains(corpus: CorpusConfig, data: dict, settings: dict) -> dict[str, list[Record]]:
    """The domains of ``corpus`` whose role prompt ``data`` (the file) lacks for ``settings``, with their records:
    a domain with an inline role is never written."""
    return {
        domain: records
        for domain, records in domain_records(corpus).items()
        if domain not in corpus.prompts.roles and not _done(data, domain, settings)
    }


def write_role_prompts(corpus: CorpusConfig, writing: RolePromptWriting) -> dict:
    """Write the role prompt of every domain of ``corpus`` without one into ``writing.output``; return the file's
    data."""
    writing = filled(corpus, writing)
    path = resolve_path(writing.output)
    data = read_output(path)
    settings = settings_of(writing)
    writer = Writer(writing.model)
    pending = pending_domains(corpus, data, settings)
    # a line per domain (each takes minutes): done / total, rate, time left
    with Progress(len(pending), "role prompts", unit="domain", every_s=0) as progress:
        for domain, records in pending.items():
            data["roles"][domain], data["provenance"][domain] = write_domain(
                writer, domain, records, settings
            )
            write_output(path, data)  # after every domain: a killed run keeps what it finished
            progress.update()
    return data


def filled(corpus: CorpusConfig, writing: RolePromptWriting) -> RolePromptWriting:
    """``writing`` checked, its unset language the corpus's and its unset model the embedded base model (a fit has
    put the trained model there already)."""
    writing = writing.filled(corpus.prompts.lang, ModelConfig(name_or_path=EMBEDDED))
    writing.check()
    return writing


def ensure_role_prompts(corpus: CorpusConfig, writing: RolePromptWriting, here: bool) -> Path:
    """The prompts file of a fit's ``prompts.write``, every domain in it: what it lacks is written when ``here``
    (this process is the fit's only one, or starts the others after this), else it must hold them already.

    Fits started together that name one file take turns (a lock beside it): the first writes, the others find
    the domains done. The global random generators are left as they were, so the fit trains as one whose file
    existed.
    """
    from rega.distill.runner import preserved_random_state

    path = resolve_path(writing.output)
    if here:
        waiting = functools.partial(log.info, "prompts: another fit is writing %s; waiting for it", path)
        with waiting_lock(path.parent / f".{path.name}.lock", on_wait=waiting), preserved_random_state():
            write_role_prompts(corpus, writing)
        _release_device_memory()
        return path
    writing = filled(corpus, writing)
    missing = pending_domains(corpus, read_output(path), settings_of(writing))
    if missing:
        model = writing.model.name_or_path
        raise ConfigError(
            f"prompts.write: {path} lacks the role prompts of {', '.join(missing)} (or holds them written with "
            "other settings), and a fit whose processes start side by side (torchrun, SLURM, several nodes, "
            "ddp_fork) does not write them: write them first with `python cli.py prompts --config DATA_CONFIG "
            f"--output {writing.output} --model.name_or_path {model} --k {writing.k} --seed {writing.seed} "
            f"--candidates {writing.candidates} --max_words {writing.max_words} --lang {writing.lang}`, or run the "
            "fit once on one device"
        )
    return path


def _release_device_memory() -> None:
    """The writing model is gone; give its cached GPU memory back before the fit loads the model it trains."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def prompts_command(corpus: CorpusConfig, **writing):
    """Write each domain's role prompt p_i with a model from k sampled training items of that domain.

    The other options are :class:`~rega.data.prompts.RolePromptWriting`'s, a fit's ``data.corpus.prompts.write``.

    Args:
        corpus: the data config: its ``domains`` sources (and ``only_domains``) give the domains and their items;
            domains with an inline ``prompts.roles`` entry keep it and are not written.
    """
    settings = RolePromptWriting(**writing)
    data = write_role_prompts(corpus, settings)
    for domain, prompt in data["roles"].items():
        print(f"{domain}: {prompt}")
    print(f"wrote {settings.output}")
