"""The judge's transport, below :class:`rega.eval.judged.client.JudgeClient`: the ``openai`` client (no proxy for
a loopback judge, no retries of its own), which HTTP statuses stop the run, are retried or fail one request, the
``Retry-After`` header, and one-line summaries of error bodies (an HTML page by its title)."""

from __future__ import annotations

import email.utils
import math
import re
import time
import urllib.parse

from rega.errors import JudgeError

FATAL_STATUS = frozenset({401, 403, 404})  # the same for every request: stop at once
RETRY_STATUS = frozenset({408, 409, 425, 429})  # and every 5xx
MAX_RETRY_AFTER_S = 600.0  # a server asking for a longer pause is treated as asking for this one
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
HTML_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.I | re.S)


class RetryableError(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class RequestFailed(Exception):
    """Not worth retrying, but only this request is affected (e.g. 400: the prompt is too long)."""

    retries = 0  # how many retries came before


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date."""
    if not value:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value.strip()).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S) if math.isfinite(seconds) else None


def openai_client(config, api_key: str | None):
    """An ``openai.OpenAI`` client for the judge ``config`` (a JudgeConfig)."""
    try:
        import openai
    except ImportError:
        raise JudgeError("the LLM judge needs the 'openai' package: pip install 'rega[judge]'") from None
    host = urllib.parse.urlparse(config.base_url).hostname or ""
    # A local judge server must not be sent through an HTTP proxy from the environment.
    http_client = openai.DefaultHttpxClient(trust_env=False) if host in LOOPBACK_HOSTS else None
    return openai.OpenAI(
        api_key=api_key or "none",  # servers without authentication ignore it; openai insists on one
        base_url=config.base_url,
        timeout=config.timeout_s,
        max_retries=0,  # retries are ours: see the module docstring
        http_client=http_client,
    )


def text_summary(text: str) -> str:
    if "<html" in text[:1000].lower() or "<!doctype" in text[:200].lower():
        title = HTML_TITLE.search(text)
        return f"an HTML page ({' '.join(title.group(1).split())[:100]})" if title else "an HTML page"
    return " ".join(text.split())[:300] or "(empty body)"


def body_summary(response) -> str:
    return text_summary(getattr(response, "text", None) or "")  # openai has read the error body already
