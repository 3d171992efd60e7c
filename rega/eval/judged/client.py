"""An LLM judge behind any OpenAI-compatible chat-completions endpoint (GPT-4, a local vLLM or llama.cpp server).

HTTP, authentication, timeouts and error classes are the ``openai`` package's (the ``judge`` extra). Retries are
ours, because a request gets a time budget (``request_budget_s``: every try and wait included) within which
``Retry-After`` is honoured, which openai's own loop cannot do (fixed retry count, ``Retry-After`` above two
minutes ignored). 429, 408, 409, 425, 5xx, timeouts, connection errors and non-JSON pages are retried with
exponential backoff and jitter; 401/403/404 stop the run (a wrong key or URL fails every request alike); other 4xx
fail one request. Replies are cached on disk (one JSON file per request, keyed by model, base URL, messages,
temperature and max_tokens), so a rerun costs nothing; failures are never cached. Progress is logged with counts of
ok / retried / missing requests. The API key comes only from the environment variable ``api_key_env`` names and is
only ever sent as the ``Authorization`` header: never in the config, the cache, the logs or a result.

A rating that cannot be parsed, or a request that failed, is a *missing* score (``None``), never 0: means skip
missing values and count them (:func:`summarize`); :func:`missing_problem` turns too many into a failed run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from rega.errors import ConfigError, JudgeError
from rega.eval.judged.transport import (
    FATAL_STATUS,
    RETRY_STATUS,
    RequestFailed,
    RetryableError,
    body_summary,
    openai_client,
    parse_retry_after,
    text_summary,
)
from rega.eval.progress import rate_and_time_left
from rega.io import atomic_write
from rega.paths import cache_dir as default_cache_root
from rega.paths import resolve_path

log = logging.getLogger(__name__)

KEY_LIKE = re.compile(r"sk-[A-Za-z0-9_*\-]{4,}")
PROGRESS_EVERY_S = 30.0


@dataclass
class JudgeConfig:
    """How to reach the judge, and how long to try.

    Args:
        base_url: the API root that ``/chat/completions`` is appended to, e.g. ``https://api.openai.com/v1`` or
            ``http://127.0.0.1:8000/v1`` for a local vLLM / llama.cpp server.
        model: judge model name sent in each request (paper: GPT-4-0613).
        api_key_env: NAME of the environment variable holding the API key (sent as ``Authorization: Bearer``);
            ``None`` or empty for servers without authentication. The key itself never goes into a config file.
        temperature: sampling temperature of the judge (0: as deterministic as the server allows).
        max_tokens: cap on the judge's reply (FastChat uses 2048).
        concurrency: requests in flight at once (threads).
        timeout_s: timeout of one try, in seconds.
        max_retries: retries per request after the first try (429 / 5xx / timeout / connection errors).
        backoff_s: delay before the first retry; doubled each retry, with jitter, capped at ``backoff_max_s``.
        backoff_max_s: cap on the exponential backoff delay (a server's ``Retry-After`` is honoured beyond it).
        request_budget_s: total time one request may take, tries and waits included; then its score is missing.
        abort_after_failures: stop the run after this many requests in a row ended missing (0: never).
        max_missing_share: a benchmark with a larger share of missing scores fails the evaluation (exit non-zero,
            outputs kept); ``None`` fails only a benchmark whose scores are all missing.
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
    request_budget_s: float = 300.0
    abort_after_failures: int = 20
    max_missing_share: float | None = None
    cache_dir: str | None = None

    def __post_init__(self):
        if self.concurrency < 1:
            raise ConfigError(f"judge concurrency must be >= 1, got {self.concurrency}")
        if self.max_retries < 0 or self.abort_after_failures < 0:
            raise ConfigError("judge max_retries and abort_after_failures must be >= 0")
        if not (self.timeout_s > 0 and self.request_budget_s > 0):
            raise ConfigError("judge timeout_s and request_budget_s must be > 0")
        if self.max_missing_share is not None and not 0.0 <= self.max_missing_share <= 1.0:
            raise ConfigError(f"judge max_missing_share must be within [0, 1], got {self.max_missing_share}")
        if not urllib.parse.urlparse(self.base_url).scheme.startswith("http"):
            raise ConfigError(f"judge base_url must be an http(s) URL, got {self.base_url!r}")

    @property
    def endpoint(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    def describe(self) -> dict:
        """What a result file records about the judge (no key, no cache location)."""
        keys = ("model", "base_url", "temperature", "max_tokens")
        return {key: getattr(self, key) for key in keys}


def load_judge_config(path: str | os.PathLike) -> JudgeConfig:
    """A :class:`JudgeConfig` from a YAML file of its fields (``configs/eval/judge_*.yaml``)."""
    resolved = resolve_path(path)
    if not resolved.is_file():
        raise FileNotFoundError(f"judge config {path} not found (resolved to {resolved})")
    data = yaml.safe_load(resolved.read_text(encoding="utf-8")) or {}
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
    retried: bool = False


@dataclass
class JudgeStats:
    requests: int = 0  # replies asked for (after de-duplication)
    cache_hits: int = 0
    http_calls: int = 0  # every try
    retries: int = 0  # every retry
    retried: int = 0  # requests that needed at least one retry
    failures: int = 0  # requests that ended without a reply (missing)
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


def cache_key(config: JudgeConfig, messages: Sequence[dict]) -> str:
    request = {"model": config.model, "base_url": config.base_url.rstrip("/"), "messages": list(messages)}
    request.update(temperature=config.temperature, max_tokens=config.max_tokens)
    blob = json.dumps(request, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def api_key(config: JudgeConfig) -> str | None:
    """The judge's API key, read only from the environment variable ``config.api_key_env`` names; None when no
    variable is named or it is unset or blank."""
    if not config.api_key_env:
        return None
    return os.environ.get(config.api_key_env, "").strip() or None


def missing_key(config: JudgeConfig) -> str | None:
    """Why the judge cannot authenticate, or None: its key variable is named but not set. The message names the
    variable, never a value."""
    if config.api_key_env and api_key(config) is None:
        return f"the judge's API key variable {config.api_key_env} is not set"
    return None


class JudgeClient:
    """Sends chat-completions requests to the judge, with retries, a disk cache and a thread pool.

    ``sleep``, ``clock`` and ``rng`` are injectable so tests can observe backoff delays and the time budget
    without waiting them out.
    """

    def __init__(
        self,
        config: JudgeConfig,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ):
        self.config = config
        self.stats = JudgeStats()
        self._sleep, self._clock = sleep, clock
        self._rng = rng or random.Random()
        self._rng_lock = threading.Lock()
        self._cache_dir = (
            Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_root() / "judge"
        )
        if missing_key(config):
            raise JudgeError(
                f"the judge API key is read from the environment variable {config.api_key_env}, which is "
                "not set; export it, or set api_key_env: null for a server without authentication"
            )
        self._api_key = api_key(config)
        self._client = openai_client(config, self._api_key)

    def __repr__(self) -> str:  # never show the key
        return f"JudgeClient(model={self.config.model!r}, base_url={self.config.base_url!r})"

    # -- cache ---------------------------------------------------------------------------------------------
    def _cache_path(self, key: str) -> Path:
        return self._cache_dir / key[:2] / f"{key}.json"

    def _cache_get(self, key: str) -> str | None:
        try:
            entry = json.loads(self._cache_path(key).read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        content = entry.get("content") if isinstance(entry, dict) else None
        return content if isinstance(content, str) else None

    def _cache_put(self, key: str, messages: Sequence[dict], content: str, finish_reason: str | None) -> None:
        request = {**self.config.describe(), "messages": list(messages)}
        entry = {"key": key, "request": request, "content": content, "finish_reason": finish_reason}
        with atomic_write(self._cache_path(key)) as handle:
            json.dump({**entry, "created": time.time()}, handle, ensure_ascii=False)

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

    def _try_once(self, messages: Sequence[dict], timeout: float) -> tuple[str, str | None]:
        import openai

        self.stats.add(http_calls=1)
        try:
            response = self._client.chat.completions.create(
                model=self.config.model,
                messages=list(messages),
                temperature=self.config.temperature,
                max_tokens=self.config.max_tokens,
                timeout=timeout,
            )
        except openai.APIStatusError as err:
            self._status_error(err.status_code, err.response)
        except openai.APITimeoutError:
            raise RetryableError(f"no answer within {timeout:.1f} s") from None
        except openai.APIConnectionError as err:
            raise RetryableError(f"connection error: {err.__cause__ or err}") from None
        return self._content(response)

    def _status_error(self, status: int, response) -> None:
        detail = self._redact(body_summary(response))
        if status in FATAL_STATUS:
            raise JudgeError(f"judge endpoint {self.config.endpoint} answered HTTP {status}: {detail}")
        if status in RETRY_STATUS or status >= 500:
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            raise RetryableError(f"HTTP {status}: {detail}", retry_after)
        raise RequestFailed(f"HTTP {status}: {detail}")

    def _content(self, response) -> tuple[str, str | None]:
        if isinstance(response, str):  # a 200 that is not JSON: a proxy's or gateway's page
            raise RetryableError(f"HTTP 200 with a non-JSON body: {text_summary(response)}")
        try:
            choice = response.choices[0]
            content = choice.message.content
        except (AttributeError, IndexError, TypeError):
            raise RequestFailed(
                f"response without choices[0].message.content: {str(response)[:200]}"
            ) from None
        if not isinstance(content, str):
            raise RequestFailed("response content is not a string")
        usage = getattr(response, "usage", None)
        if usage is not None:
            self.stats.add(
                prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
                completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
            )
        return content, choice.finish_reason

    def _request(self, messages: Sequence[dict]) -> tuple[str, str | None, int]:
        """(content, finish_reason, retries), within the request's time budget."""
        start = self._clock()
        deadline = start + self.config.request_budget_s
        for attempt in range(self.config.max_retries + 1):
            timeout = max(min(self.config.timeout_s, deadline - self._clock()), 0.001)
            try:
                return (*self._try_once(messages, timeout), attempt)
            except RequestFailed as err:
                err.retries = attempt
                raise
            except RetryableError as err:
                last, delay = str(err), self._delay(attempt, err.retry_after)
            spent = self._clock() - start
            over_budget = self._clock() + delay >= deadline
            if attempt == self.config.max_retries or over_budget:
                budget = f" (request_budget_s={self.config.request_budget_s:g})" if over_budget else ""
                failed = RequestFailed(f"gave up after {attempt + 1} tries in {spent:.0f} s{budget}: {last}")
                failed.retries = attempt
                raise failed
            log.debug("judge request failed (%s); retry %d in %.2fs", last, attempt + 1, delay)
            self.stats.add(retries=1)
            self._sleep(delay)
        raise AssertionError("unreachable")

    def _fetch(self, key: str, messages: Sequence[dict]) -> JudgeReply:
        try:
            content, finish_reason, retries = self._request(messages)
        except RequestFailed as err:
            self.stats.add(failures=1, retried=int(err.retries > 0))
            log.warning("judge request failed: %s", err)
            return JudgeReply(content=None, error=str(err), retried=err.retries > 0)
        self.stats.add(retried=int(retries > 0))
        self._cache_put(key, messages, content, finish_reason)
        return JudgeReply(content=content, retried=retries > 0)

    # -- many requests -------------------------------------------------------------------------------------
    def complete(self, messages: Sequence[dict]) -> JudgeReply:
        """One judge reply, from the cache when this exact request was answered before."""
        return self.complete_many([messages])[0]

    def complete_many(self, batch: Sequence[Sequence[dict]], log_every: int = 50) -> list[JudgeReply]:
        """Replies for many requests, in order; identical requests are sent once, cached ones not at all."""
        keys = [cache_key(self.config, messages) for messages in batch]
        unique = dict(zip(keys, batch))
        self.stats.add(requests=len(unique))
        replies: dict[str, JudgeReply] = {}
        for key in unique:
            content = self._cache_get(key)
            if content is not None:
                replies[key] = JudgeReply(content=content, cached=True)
        self.stats.add(cache_hits=len(replies))
        todo = [key for key in unique if key not in replies]
        if todo:
            log.info("judge %s: %d requests (%d cached)", self.config.model, len(todo), len(replies))
            replies.update(self._run_pool(todo, unique, log_every))
        return [replies[key] for key in keys]

    def _run_pool(self, todo: list[str], unique: dict, log_every: int) -> dict[str, JudgeReply]:
        pool = ThreadPoolExecutor(max_workers=self.config.concurrency, thread_name_prefix="judge")
        futures = {pool.submit(self._fetch, key, unique[key]): key for key in todo}
        replies: dict[str, JudgeReply] = {}
        counts, in_a_row, logged = {"ok": 0, "retried": 0, "missing": 0}, 0, time.monotonic()
        started = logged
        try:
            for done, future in enumerate(as_completed(futures), start=1):
                reply = replies[futures[future]] = future.result()  # a JudgeError stops the run
                counts["ok" if reply.content is not None else "missing"] += 1
                counts["retried"] += reply.retried
                in_a_row = in_a_row + 1 if reply.content is None else 0
                if done == len(todo) or done % log_every == 0 or time.monotonic() - logged > PROGRESS_EVERY_S:
                    logged = time.monotonic()
                    level = logging.WARNING if done == len(todo) and counts["missing"] else logging.INFO
                    rate = rate_and_time_left(done, len(todo), logged - started, "request")
                    log.log(level, "judge %s: %d/%d done (%s)%s", self.config.model, done, len(todo),
                            ", ".join(f"{k} {v}" for k, v in counts.items()), rate)  # fmt: skip
                if self.config.abort_after_failures and in_a_row >= self.config.abort_after_failures:
                    raise JudgeError(
                        f"judge {self.config.endpoint}: {in_a_row} requests in a row failed, stopping "
                        f"(abort_after_failures={self.config.abort_after_failures}); last: {reply.error}"
                    )
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        return replies
