"""Generation backends for distillation: transformers models (default, every device) and vLLM (optional).

A backend takes a batch of tokenized prompts plus their record ids and returns one
:class:`~rega.modules.generation.Generation` per prompt, in order. Seeds are derived from the configured seed and
the ids, so a batch (HF) or an item (vLLM) samples the same way whichever rank or run generates it.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from types import SimpleNamespace

import torch
from transformers import GenerationConfig

from rega.config import ModelConfig, SamplingConfig
from rega.errors import ConfigError
from rega.io import stable_hash
from rega.model_source import resolve_model_path
from rega.modules.generation import Generation, generate_batch, stop_token_ids
from rega.modules.model import load_model

log = logging.getLogger(__name__)

BACKENDS = ("hf", "vllm")


def derived_seed(seed: int, ids: Sequence[str]) -> int:
    return int(stable_hash([seed, list(ids)]), 16) % (2**31 - 1)


def check_backend(name: str) -> None:
    if name not in BACKENDS:
        raise ConfigError(f"unknown distillation backend {name!r}; use one of {', '.join(BACKENDS)}")
    if name == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "backend 'vllm' needs the vllm package, which is not installed here "
            "(pip install 'rega[vllm]' on a CUDA machine), or use backend: hf"
        )


class HFBackend:
    """One batch at a time through :func:`rega.modules.generation.generate_batch`: left-padded, KV cache,
    finished rows leave the batch."""

    def __init__(self, model_cfg: ModelConfig, tokenizer, sampling: SamplingConfig, device: torch.device):
        # A 4-bit model cannot be moved after loading: place it while loading instead.
        device_map = {"": device} if model_cfg.load_in_4bit else None
        self.model = load_model(model_cfg, device_map=device_map)
        if not model_cfg.load_in_4bit:
            self.model.to(device)
        self.model.eval()
        self.tokenizer = tokenizer
        self.sampling = sampling

    def generate(self, prompts: list[list[int]], ids: list[str]) -> list[Generation]:
        if self.sampling.do_sample:
            torch.manual_seed(derived_seed(self.sampling.seed, ids))
        return generate_batch(self.model, self.tokenizer, prompts, self.sampling)


class VLLMBackend:
    """vLLM on this node: continuous batching inside each call; ``tensor_parallel_size`` GPUs per engine."""

    def __init__(
        self, model_cfg: ModelConfig, tokenizer, sampling: SamplingConfig, tensor_parallel_size: int = 1
    ):
        check_backend("vllm")
        import vllm  # lazy: optional dependency

        if model_cfg.load_in_4bit:
            raise ConfigError("backend 'vllm' does not take load_in_4bit; use backend: hf")
        self.vllm = vllm
        self.llm = vllm.LLM(
            model=resolve_model_path(model_cfg),
            revision=model_cfg.revision,
            dtype=model_cfg.dtype,
            trust_remote_code=model_cfg.trust_remote_code,
            tensor_parallel_size=tensor_parallel_size,
            seed=sampling.seed,
        )
        self.sampling = sampling
        # Same stop set as the HF path: the model's generation_config end-of-turn ids plus the tokenizer's.
        try:
            gen_cfg = GenerationConfig.from_pretrained(
                resolve_model_path(model_cfg), revision=model_cfg.revision
            )
        except OSError:
            gen_cfg = None
        self.stops = stop_token_ids(SimpleNamespace(generation_config=gen_cfg), tokenizer)

    def _params(self, rid: str):
        s = self.sampling
        return self.vllm.SamplingParams(
            n=1,
            temperature=s.temperature if s.do_sample else 0.0,
            top_p=s.top_p if s.do_sample else 1.0,
            max_tokens=s.max_new_tokens,
            repetition_penalty=s.repetition_penalty,
            stop_token_ids=self.stops,
            seed=derived_seed(s.seed, [rid]) if s.do_sample else None,
        )

    def generate(self, prompts: list[list[int]], ids: list[str]) -> list[Generation]:
        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        outputs = self.llm.generate(requests, [self._params(rid) for rid in ids], use_tqdm=False)
        results = []
        for row, out in enumerate(outputs):
            best = out.outputs[0]
            tokens = [t for t in best.token_ids if t not in self.stops]
            reason = "length" if best.finish_reason == "length" else "stop"
            results.append(
                Generation(index=row, token_ids=tokens, text=best.text.strip(), finish_reason=reason)
            )
        return results
