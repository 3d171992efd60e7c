"""What ``chat`` and ``predict`` share: the model (base or with an adapter) on its device, and the prompt text."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rega.config import ModelConfig
from rega.data.chat import ChatFormat
from rega.data.prompts import PromptConfig, RolePrompts, resolve_prompts
from rega.errors import ConfigError
from rega.model_source import load_tokenizer
from rega.modules.export import check_adapter, load_adapter
from rega.modules.model import load_model


@dataclass
class LoadedModel:
    model: object  # a causal LM, peft-wrapped when an adapter was given; in eval mode
    tokenizer: object
    chat: ChatFormat
    device: str


def pick_device(device: str) -> str:
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_chat_format(config: ModelConfig):
    """(tokenizer, ChatFormat): enough to render prompts before any weights load."""
    tokenizer = load_tokenizer(config)
    return tokenizer, ChatFormat(tokenizer, config.chat_template, config.system_placement)


def load_for_use(config: ModelConfig, adapter: str | None, device: str = "auto") -> LoadedModel:
    """The base model, with ``adapter`` on top when given; the adapter is checked before the base loads."""
    if adapter:
        check_adapter(adapter)
    tokenizer, chat = load_chat_format(config)
    target = pick_device(device)
    # A 4-bit model cannot be moved once loaded: it is placed while loading.
    model = load_model(config, device_map={"": target} if config.load_in_4bit else None)
    if not config.load_in_4bit:
        model.to(target)
    if adapter:
        model = load_adapter(model, adapter, config.name_or_path)
    model.eval()
    return LoadedModel(model, tokenizer, chat, target)


def role_prompts(prompts: PromptConfig | None, domains: list[str], chat: ChatFormat) -> RolePrompts:
    """p_c (the model's own system prompt unless configured) and the role prompts p_i of ``domains``."""
    return resolve_prompts(prompts or PromptConfig(), domains, chat.default_system)


def system_text(chat: ChatFormat, prompts: PromptConfig | None, role: str | None, system: str | None) -> str:
    """The system prompt of a chat: ``system`` as given, else the role prompt of ``role``, else p_c."""
    if system is not None and role is not None:
        raise ConfigError("give either --role DOMAIN or --system TEXT, not both")
    if system is not None:
        return system
    resolved = role_prompts(prompts, [role] if role else [], chat)
    return resolved.text(role) if role else resolved.central


def use_settings(model: ModelConfig | None, threads: int | None) -> ModelConfig:
    """What ``chat`` and ``predict`` make of the arguments they share: torch's CPU threads (``None``: torch's
    default) and the model (default the embedded one)."""
    if threads:
        torch.set_num_threads(threads)
    return model or ModelConfig()
