"""Role prompts: the central prompt p_c and one role prompt p_i per domain.

p_c is the model's own instruction-tuning system prompt unless configured (the paper's setting), so it is resolved
once a tokenizer is known. Built-in role prompts for English and Chinese live in ``rega/data/prompts/*.yaml``; a
user file or inline ``roles`` override them. A domain without a prompt is a configuration error, raised before
any data is read.

The file may be written by a model (:class:`RolePromptWriting`, the settings of ``rega prompts``): given as
``write``, a fit writes it before it builds the corpus (:mod:`rega.distill.role_prompts` does the writing; this layer
only knows where the file is and that the domains it will hold need no prompt yet).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from rega.config import DEFAULT_SEED, ModelConfig
from rega.data.records import GENERAL
from rega.errors import ConfigError
from rega.paths import resolve_path

BUILTIN_DIR = Path(__file__).resolve().parent / "prompts"
CENTRAL = "central"  # the prompt key of examples that carry p_c


class MissingPromptError(ConfigError, KeyError):
    """A prompt asked for a domain the prompts were not resolved for (a KeyError too, for older callers)."""

    __str__ = Exception.__str__  # KeyError would quote the message


WRITING_LANGS = ("en", "zh")  # the languages of the instruction that asks a model for a role prompt


@dataclass
class RolePromptWriting:
    """How a model writes each domain's role prompt p_i from k sampled training items of that domain (``rega
    prompts``, or ``prompts.write`` of a fit).

    Args:
        output: the YAML file written (``roles`` and ``provenance``); give it as ``prompts.file`` (as
            ``prompts.write`` it is the file the corpus reads). A rerun skips the domains it holds with the same
            settings.
        model: the model that writes the prompts; unset, the base model: the model a fit trains, the embedded
            model (``embedded``) for ``rega prompts``.
        k: training items shown per domain (and held out per domain to score candidates).
        seed: seeds the draw of the items and the sampling of candidates (not the fit's seed: fits of several
            seeds share one file).
        candidates: 1 decodes greedily; more samples that many (temperature 0.7, top-p 0.95) and keeps the one
            under which the model gives k held-out answers of the domain the highest mean log-likelihood per token.
        max_words: length limit in words (characters for zh); a longer prompt is cut at a sentence end.
        lang: language of the instruction: en or zh; unset, the corpus's ``prompts.lang``.
    """

    output: str = "runs/role_prompts.yaml"
    model: ModelConfig | None = None
    k: int = 8
    seed: int = DEFAULT_SEED
    candidates: int = 1
    max_words: int = 120
    lang: str | None = None

    def filled(self, lang: str, model: ModelConfig) -> RolePromptWriting:
        """These settings with the unset ones taken from where they are used: the corpus's ``prompts.lang`` and
        the base model."""
        return replace(self, lang=self.lang or lang, model=self.model or model)

    def check(self) -> None:
        if self.lang is not None and self.lang not in WRITING_LANGS:
            raise ConfigError(
                f"the role prompt writing's lang (prompts.write.lang, else prompts.lang) must be one of "
                f"{', '.join(WRITING_LANGS)}, got {self.lang!r}"
            )
        if self.k < 1 or self.candidates < 1 or self.max_words < 1:
            raise ConfigError(
                f"k, candidates and max_words must be at least 1, got {self.k}, {self.candidates}, "
                f"{self.max_words}"
            )


@dataclass
class PromptConfig:
    """Where the prompts come from.

    Args:
        lang: language of the built-in role prompts (``en`` or ``zh``).
        file: a YAML file with ``central:`` and/or ``roles: {domain: prompt}``; overrides the built-ins.
        central: the central prompt p_c; ``None`` uses the model's own default system prompt.
        roles: inline role prompts per domain; override the file and the built-ins.
        write: a model writes the role prompts into ``write.output`` (what ``rega prompts`` does), which is then
            the prompts file: a fit writes the domains the file lacks before it builds the corpus (``{}`` takes
            every default: the trained model, k 8, seed 1234, ``lang``). Domains with an inline role are not
            written.
    """

    lang: str = "en"
    file: str | None = None
    central: str | None = None
    roles: dict[str, str] = field(default_factory=dict)
    write: RolePromptWriting | None = None


@dataclass(frozen=True)
class RolePrompts:
    """Resolved prompts: ``central`` (p_c) and ``roles`` (domain -> p_i)."""

    central: str
    roles: dict[str, str]

    def text(self, key: str) -> str:
        """The prompt text for ``central`` or a domain name."""
        if key == CENTRAL:
            return self.central
        if key not in self.roles:  # e.g. a validation set of a domain the corpus was not built for
            known = ", ".join(sorted(self.roles)) or "none"
            raise MissingPromptError(
                f"no role prompt for domain {key!r}: the prompts were resolved for {known}"
            )
        return self.roles[key]

    def to_dict(self) -> dict:
        return {"central": self.central, "roles": dict(self.roles)}


def read_prompts_file(path: Path) -> dict:
    """A prompts file's mapping (``central``, ``roles``, ``provenance``), checked; a :class:`ConfigError` names the file."""
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict) or not isinstance(data.get("roles", {}), dict):
        raise ConfigError(
            f"{path}: expected a mapping with optional 'central' and 'roles: {{domain: prompt}}'"
        )
    # written by `rega prompts`: how each role was written
    if not isinstance(data.get("provenance", {}), dict):
        raise ConfigError(f"{path}: 'provenance' must be a mapping {{domain: {{...}}}}")
    return data


def prompts_file(config: PromptConfig) -> Path | None:
    """The prompts file the corpus reads: ``file``, or the output of ``write``; a :class:`ConfigError` when both are
    set and name different files."""
    if config.write is None:
        return resolve_path(config.file) if config.file else None
    output = resolve_path(config.write.output)
    if config.file and resolve_path(config.file).resolve() != output.resolve():
        raise ConfigError(
            f"prompts.file ({config.file}) and prompts.write.output ({config.write.output}) name different files: "
            "the written file is the one the corpus reads (drop prompts.file, or set it to the same file)"
        )
    return output


def _user_file(config: PromptConfig) -> dict:
    """The prompts file's contents; empty while ``write``'s output is not written yet."""
    path = prompts_file(config)
    if path is None or (config.write is not None and not path.exists()):
        return {}
    return read_prompts_file(path)


def load_prompt_table(config: PromptConfig) -> tuple[str | None, dict[str, str]]:
    """(central or None, roles) from the built-ins, then the user file, then inline values."""
    builtin = BUILTIN_DIR / f"{config.lang}.yaml"
    merged = read_prompts_file(builtin) if builtin.exists() else {"roles": {}}
    roles = dict(merged.get("roles", {}))
    central = merged.get("central")
    user = _user_file(config)
    roles.update(user.get("roles", {}))
    central = user.get("central", central)
    roles.update(config.roles)
    if config.central is not None:
        central = config.central
    return central, {d: p for d, p in roles.items() if str(p or "").strip()}


def prompts_provenance(config: PromptConfig, domains: list[str]) -> dict[str, dict]:
    """The ``provenance`` the prompts file records (``rega prompts``) for those of ``domains`` whose role prompt
    comes from the file: a domain with an inline role is left out, since the user's prompt wins."""
    written = _user_file(config).get("provenance") or {}
    return {d: written[d] for d in sorted(set(domains)) if d in written and d not in config.roles}


def resolve_prompts(config: PromptConfig, domains: list[str], model_default: str | None) -> RolePrompts:
    """Resolve p_c and the p_i of every domain; raise :class:`ConfigError` for a domain without a prompt."""
    central, roles = load_prompt_table(config)
    if central is None:
        central = model_default if model_default is not None else ""
    missing = sorted(d for d in set(domains) if d != GENERAL and d not in roles)
    if missing and config.write is not None:
        raise ConfigError(
            f"no role prompt for domain(s) {', '.join(missing)}: prompts.write's {config.write.output} does not hold "
            "them yet (`rega fit` writes them before it builds the corpus; `rega prompts` writes them alone)"
        )
    if missing:
        raise ConfigError(
            f"no role prompt for domain(s) {', '.join(missing)}: add them under 'roles:' in the prompt config "
            f"(built-in prompts for lang={config.lang!r} cover: {', '.join(sorted(roles)) or 'none'})"
        )
    return RolePrompts(central=central, roles={d: roles[d] for d in sorted(set(domains)) if d != GENERAL})
