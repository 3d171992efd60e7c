"""Role prompts: the central prompt p_c and one role prompt p_i per domain.

p_c is the model's own instruction-tuning system prompt unless configured (the paper's setting), so it is resolved
once a tokenizer is known. Built-in role prompts for English and Chinese live in ``rega/data/prompts/*.yaml``; a
user file or inline ``roles`` override them. A domain without a prompt is a configuration error, raised before
any data is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rega.data.records import GENERAL
from rega.errors import ConfigError
from rega.paths import resolve_path

BUILTIN_DIR = Path(__file__).resolve().parent / "prompts"
CENTRAL = "central"  # the prompt key of examples that carry p_c


class MissingPromptError(ConfigError, KeyError):
    """A prompt asked for a domain the prompts were not resolved for (a KeyError too, for older callers)."""

    __str__ = Exception.__str__  # KeyError would quote the message


@dataclass
class PromptConfig:
    """Where the prompts come from.

    Args:
        lang: language of the built-in role prompts (``en`` or ``zh``).
        file: a YAML file with ``central:`` and/or ``roles: {domain: prompt}``; overrides the built-ins.
        central: the central prompt p_c; ``None`` uses the model's own default system prompt.
        roles: inline role prompts per domain; override the file and the built-ins.
    """

    lang: str = "en"
    file: str | None = None
    central: str | None = None
    roles: dict[str, str] = field(default_factory=dict)


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


def _read_yaml(path: Path) -> dict:
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict) or not isinstance(data.get("roles", {}), dict):
        raise ConfigError(
            f"{path}: expected a mapping with optional 'central' and 'roles: {{domain: prompt}}'"
        )
    # written by `rega prompts`: how each role was written
    if not isinstance(data.get("provenance", {}), dict):
        raise ConfigError(f"{path}: 'provenance' must be a mapping {{domain: {{...}}}}")
    return data


def load_prompt_table(config: PromptConfig) -> tuple[str | None, dict[str, str]]:
    """(central or None, roles) from the built-ins, then the user file, then inline values."""
    builtin = BUILTIN_DIR / f"{config.lang}.yaml"
    merged = _read_yaml(builtin) if builtin.exists() else {"roles": {}}
    roles = dict(merged.get("roles", {}))
    central = merged.get("central")
    if config.file:
        user = _read_yaml(resolve_path(config.file))
        roles.update(user.get("roles", {}))
        central = user.get("central", central)
    roles.update(config.roles)
    if config.central is not None:
        central = config.central
    return central, {d: p for d, p in roles.items() if str(p or "").strip()}


def prompts_provenance(config: PromptConfig, domains: list[str]) -> dict[str, dict]:
    """The ``provenance`` the prompts file records (``rega prompts``) for those of ``domains`` whose role prompt
    comes from the file: a domain with an inline role is left out, since the user's prompt wins."""
    if not config.file:
        return {}
    written = _read_yaml(resolve_path(config.file)).get("provenance") or {}
    return {d: written[d] for d in sorted(set(domains)) if d in written and d not in config.roles}


def resolve_prompts(config: PromptConfig, domains: list[str], model_default: str | None) -> RolePrompts:
    """Resolve p_c and the p_i of every domain; raise :class:`ConfigError` for a domain without a prompt."""
    central, roles = load_prompt_table(config)
    if central is None:
        central = model_default if model_default is not None else ""
    missing = sorted(d for d in set(domains) if d != GENERAL and d not in roles)
    if missing:
        raise ConfigError(
            f"no role prompt for domain(s) {', '.join(missing)}: add them under 'roles:' in the prompt config "
            f"(built-in prompts for lang={config.lang!r} cover: {', '.join(sorted(roles)) or 'none'})"
        )
    return RolePrompts(central=central, roles={d: roles[d] for d in sorted(set(domains)) if d != GENERAL})
