"""An LLM judge behind any OpenAI-compatible chat-completions endpoint (GPT-4, a local vLLM or llama.cpp server).

Standard library only (``urllib`` + a thread pool). Every request is ``POST {base_url}/chat/completions``; 429,
408, 5xx, timeouts and connection errors are retried with exponential backoff and jitter, honouring
``Retry-After``; 401/403/404 abort the run (a wrong key or URL fails every request the same way); other 4xx fail
that one request. Successful replies go to a disk cache (one JSON file per request, written atomically), keyed by
the judge model, the base URL, the full messages, the temperature and max_tokens, so a rerun costs nothing and a
run that was interrupted resumes where it stopped. Failures are never cached.

The API key is read from the environment variable named by ``JudgeConfig.api_key_env`` when the client is built
and only ever sent as the ``Authorization`` header: it is not part of the config, the cache, the logs or any result.

A rating that cannot be parsed, or a request that failed, is a *missing* score (``None``), never 0: means skip
missing values and report how many there were (:func:`summarize`).
"""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import json
import logging
import math
import os
import random
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from rega.data.prompts import ConfigError
from rega.io import atomic_write
from rega.paths import cache_dir as default_cache_root
from rega.paths import resolve_path

log = logging.getLogger(__name__)

FATAL_STATUS = frozenset({401, 403, 404})  # the same for every request: stop at once
MAX_RETRY_AFTER_S = 600.0  # a server asking for a longer pause is treated as asking for this one
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
KEY_LIKE = re.compile(r"sk-[A-Za-z0-9_*\-]{4,}")


class JudgeError(RuntimeError):
    """A judge failure that no retry can fix (missing key, wrong URL, rejected key)."""


@dataclass
class JudgeConfig:
    """How to reach the judge.

    Args:
        base_url: the API root that ``/chat/completions`` is appended to, e.g. ``https://api.openai.com/v1`` or
            ``http://127.0.0.1:8000/v1`` for a local vLLM / llama.cpp server.
        model: judge model name sent in each request (paper: GPT-4-0613).
        api_key_env: NAME of the environment variable holding the API key (sent as ``Authorization: Bearer``);
            ``None`` or empty for servers without authentication. The key itself never goes into a config file.
        temperature: sampling temperature of the judge (0: as deterministic as the server allows).
        max_tokens: cap on the judge's reply (FastChat uses 2048).
        concurrency: requests in flight at once (threads).
        timeout_s: per-request timeout in seconds.
        max_retries: retries per request after the first try (429 / 5xx / timeout / connection errors).
        backoff_s: delay before the first retry; doubled each retry, with jitter, capped at ``backoff_max_s``.
        backoff_max_s: cap on the exponential backoff delay (a server's ``Retry-After`` is honoured beyond it).
        cache_dir: where replies are cached; ``None`` uses ``$REGA_CACHE/judge``.
    """

    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-4"
    api_key_env: str | None = "OPENAI_API_KEY"
    temperature: float = 0.0
    max_tokens: int = 2048
    concurrency: int = 8
    timeout_s: float = 120.0
    max_retries: int = 6
    backoff_s: float = 1.0
    backoff_max_s: float = 60.0
    cache_dir: str | None = None

    def __post_init__(self):
        if self.concurrency < 1:
            raise ConfigError(f"judge concurrency must be >= 1, got {self.concurrency}")
        if self.max_retries < 0:
            raise ConfigError(f"judge max_retries must be >= 0, got {self.max_retries}")
        if not urllib.parse.urlparse(self.base_url).scheme.startswith("http"):
            raise ConfigError(f"judge base_url must be an http(s) URL, got {self.base_url!r}")

    @property
    def endpoint(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    def describe(self) -> dict:
        """What a result file records about the judge (no key, no cache location)."""
        return {
            "model": self.model,
            "base_url": self.base_url,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }


def load_judge_config(path: str | os.PathLike) -> JudgeConfig:
    """A :class:`JudgeConfig` from a YAML file of its fields (``configs/eval/judge_*.yaml``)."""
    data = yaml.safe_load(resolve_path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of JudgeConfig fields")
    known = set(JudgeConfig.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown judge settings {unknown}; known: {sorted(known)}")
    return JudgeConfig(**data)


@dataclass
class JudgeReply:
    """One judge answer: ``content`` is None when the request failed (``error`` says why)."""

    content: str | None
    cached: bool = False
    error: str | None = None


@dataclass
class JudgeStats:
    requests: int = 0  # replies asked for (after de-duplication)
    cache_hits: int = 0
    http_calls: int = 0  # including retries
    retries: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def to_dict(self) -> dict:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}


class _RetryableError(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class _RequestFailed(Exception):
    """Not worth retrying, but only this request is affected (e.g. 400: the prompt is too long)."""


def cache_key(config: JudgeConfig, messages: Sequence[dict]) -> str:
    blob = json.dumps(
        {
            "model": config.model,
            "base_url": config.base_url.rstrip("/"),
            "messages": list(messages),
            "temperature": config.temperature,
            "max_tokens": config.max_tokens,
        },
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


class JudgeClient:
    """Sends chat-completions requests to the judge, with retries, a disk cache and a thread pool.

    ``sleep`` and ``rng`` are injectable so tests can observe backoff delays without waiting them out.
    """

    def __init__(
        self,
        config: JudgeConfig,
        *,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ):
        self.config = config
        self.stats = JudgeStats()
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._rng_lock = threading.Lock()
        self._cache_dir = (
            Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_root() / "judge"
        )
        self._api_key: str | None = None
        if config.api_key_env:
            key = os.environ.get(config.api_key_env, "")
            if not key.strip():
                raise JudgeError(
                    f"the judge API key is read from the environment variable {config.api_key_env}, which is not set; "
                    "export it, or set api_key_env: null for a server without authentication"
                )
            self._api_key = key.strip()
        host = urllib.parse.urlparse(config.base_url).hostname or ""
        # A local judge server must not be sent through an HTTP proxy from the environment.
        handlers = [urllib.request.ProxyHandler({})] if host in LOOPBACK_HOSTS else []
        self._opener = urllib.request.build_opener(*handlers)

    def __repr__(self) -> str:  # never show the key
        return f"JudgeClient(model={self.config.model!r}, base_url={self.config.base_url!r})"

    # -- cache ---------------------------------------------------------------------------------------------
    def _cache_path(self, key: str) -> Path:
        return self._cache_dir / key[:2] / f"{key}.json"

    def _cache_get(self, key: str) -> str | None:
        path = self._cache_path(key)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        content = entry.get("content") if isinstance(entry, dict) else None
        return content if isinstance(content, str) else None

    def _cache_put(self, key: str, messages: Sequence[dict], content: str, finish_reason: str | None) -> None:
        entry = {
            "key": key,
            "request": {
                "model": self.config.model,
                "base_url": self.config.base_url,
                "temperature": self.config.temperature,
                "max_tokens": self.config.max_tokens,
                "messages": list(messages),
            },
            "content": content,
            "finish_reason": finish_reason,
            "created": time.time(),
        }
        with atomic_write(self._cache_path(key)) as handle:
            json.dump(entry, handle, ensure_ascii=False)

    def _redact(self, text: str) -> str:
        """Error bodies may echo the key (OpenAI's 401 shows part of it): keep it out of messages and logs."""
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return KEY_LIKE.sub("sk-***", text)

    # -- one request -------------------------------------------------------------------------------------
    def _delay(self, attempt: int, retry_after: float | None) -> float:
        with self._rng_lock:
            jitter = self._rng.random()
        if retry_after is not None:
            return retry_after + 0.1 * jitter * max(retry_after, self.config.backoff_s)
        base = min(self.config.backoff_max_s, self.config.backoff_s * (2**attempt))
        return base * (0.5 + 0.5 * jitter)

    def _post_once(self, body: bytes) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.config.endpoint, data=body, headers=headers, method="POST")
        self.stats.add(http_calls=1)
        try:
            with self._opener.open(request, timeout=self.config.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            detail = self._redact(_error_detail(err))
            if err.code in FATAL_STATUS:
                raise JudgeError(
                    f"judge endpoint {self.config.endpoint} answered HTTP {err.code}: {detail}"
                ) from None
            if err.code in (408, 409, 425, 429) or err.code >= 500:
                raise _RetryableError(
                    f"HTTP {err.code}: {detail}", parse_retry_after(err.headers.get("Retry-After"))
                ) from None
            raise _RequestFailed(f"HTTP {err.code}: {detail}") from None
        except (
            TimeoutError,
            urllib.error.URLError,
            http.client.HTTPException,
            ConnectionError,
            OSError,
        ) as err:
            reason = getattr(err, "reason", err)
            raise _RetryableError(f"{type(err).__name__}: {reason}") from None
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _RetryableError(f"unreadable response body ({len(raw)} bytes)") from None

    def _request(self, messages: Sequence[dict]) -> tuple[str, str | None]:
        payload = {
            "model": self.config.model,
            "messages": list(messages),
            "temperature": self.config.temperature,
            "max_tokens": self.config.max_tokens,
        }
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        last = "no attempt"
        for attempt in range(self.config.max_retries + 1):
            try:
                data = self._post_once(body)
            except _RetryableError as err:
                last = str(err)
                if attempt == self.config.max_retries:
                    break
                delay = self._delay(attempt, err.retry_after)
                log.debug("judge request failed (%s); retry %d in %.2fs", last, attempt + 1, delay)
                self.stats.add(retries=1)
                self._sleep(delay)
                continue
            try:
                choice = data["choices"][0]
                content = choice["message"]["content"]
            except (KeyError, IndexError, TypeError):
                raise _RequestFailed(
                    f"response without choices[0].message.content: {str(data)[:200]}"
                ) from None
            if not isinstance(content, str):
                raise _RequestFailed("response content is not a string")
            usage = data.get("usage") if isinstance(data, dict) else None
            if isinstance(usage, dict):
                self.stats.add(
                    prompt_tokens=int(usage.get("prompt_tokens") or 0),
                    completion_tokens=int(usage.get("completion_tokens") or 0),
                )
            return content, choice.get("finish_reason")
        raise _RequestFailed(f"gave up after {self.config.max_retries + 1} tries: {last}")

    def complete(self, messages: Sequence[dict]) -> JudgeReply:
        """One judge reply, from the cache when this exact request was answered before."""
        return self.complete_many([messages])[0]

    def _fetch(self, key: str, messages: Sequence[dict]) -> JudgeReply:
        try:
            content, finish_reason = self._request(messages)
        except _RequestFailed as err:
            self.stats.add(failures=1)
            log.warning("judge request failed: %s", err)
            return JudgeReply(content=None, error=str(err))
        self._cache_put(key, messages, content, finish_reason)
        return JudgeReply(content=content)

    def complete_many(self, batch: Sequence[Sequence[dict]], log_every: int = 50) -> list[JudgeReply]:
        """Replies for many requests, in order; identical requests are sent once, cached ones not at all."""
        keys = [cache_key(self.config, messages) for messages in batch]
        unique: dict[str, Sequence[dict]] = {}
        for key, messages in zip(keys, batch):
            unique.setdefault(key, messages)
        self.stats.add(requests=len(unique))
        replies: dict[str, JudgeReply] = {}
        todo = []
        for key in unique:
            content = self._cache_get(key)
            if content is not None:
                replies[key] = JudgeReply(content=content, cached=True)
            else:
                todo.append(key)
        self.stats.add(cache_hits=len(unique) - len(todo))
        if todo:
            log.info(
                "judge %s: %d requests (%d cached)", self.config.model, len(todo), len(unique) - len(todo)
            )
            with ThreadPoolExecutor(max_workers=self.config.concurrency, thread_name_prefix="judge") as pool:
                futures = {pool.submit(self._fetch, key, unique[key]): key for key in todo}
                pending = set(futures)
                done_count = 0
                while pending:
                    done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for future in done:
                        if future.exception() is not None:
                            for other in pending:
                                other.cancel()
                            raise future.exception()
                        replies[futures[future]] = future.result()
                        done_count += 1
                        if log_every and done_count % log_every == 0:
                            log.info("judge: %d/%d done", done_count, len(todo))
        return [replies[key] for key in keys]


def _error_detail(err: urllib.error.HTTPError) -> str:
    try:
        text = err.read().decode("utf-8", "replace")
    except Exception:  # the body is only for the message
        text = ""
    return " ".join(text.split())[:300] or str(err.reason)


# -- rating parsing and aggregation (pure) ----------------------------------------------------------------

# FastChat llm_judge/common.py: "[[8]]" first, then "[8]" as fallback.
ONE_SCORE_PATTERN = re.compile(r"\[\[(\d+\.?\d*)\]\]")
ONE_SCORE_PATTERN_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


def parse_bracket_rating(
    text: str | None, low: float | None = None, high: float | None = None
) -> float | None:
    """The rating in ``[[x]]`` (else ``[x]``), FastChat's rule; None when absent or outside ``[low, high]``."""
    if not text:
        return None
    match = ONE_SCORE_PATTERN.search(text) or ONE_SCORE_PATTERN_BACKUP.search(text)
    if not match:
        return None
    try:
        value = float(match.group(1))
    except ValueError:
        return None
    if (low is not None and value < low) or (high is not None and value > high):
        return None
    return value


def summarize(scores: Iterable[float | None]) -> dict:
    """``{"mean", "n", "missing"}``: the mean of the present scores (None when there are none)."""
    values = list(scores)
    present = [float(v) for v in values if v is not None]
    mean = round(sum(present) / len(present), 4) if present else None
    return {"mean": mean, "n": len(present), "missing": len(values) - len(present)}


def chat_messages(system: str | None, user: str) -> list[dict]:
    """OpenAI-style messages; an empty system prompt is left out, as FastChat does."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": user})
    return messages
