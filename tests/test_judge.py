"""The LLM judge client against a real chat-completions server on loopback, plus rating parsing and the
general-evaluation judge prompts. ``FakeJudgeServer`` is also used by test_mt_bench.py."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from rega.data.records import Record
from rega.eval.judged import general_set
from rega.eval.judged.client import (
    JudgeClient,
    JudgeConfig,
    JudgeError,
    cache_key,
    load_judge_config,
)
from rega.eval.judged.ratings import first_error, missing_problem, parse_bracket_rating, summarize
from rega.eval.judged.transport import parse_retry_after

REPO = Path(__file__).resolve().parent.parent
KEY_ENV = "REGA_TEST_JUDGE_KEY"


def default_reply(content: str, attempt: int) -> tuple[int, dict, object, float]:
    """Behaviour picked by markers in the request text; ``attempt`` counts tries of this exact text (1-based)."""
    if "FAIL429ONCE" in content and attempt == 1:
        return 429, {"Retry-After": "1"}, {"error": {"message": "rate limited"}}, 0.0
    if "FAIL500TWICE" in content and attempt <= 2:
        return 500, {}, {"error": {"message": "server error"}}, 0.0
    if "SLOWONCE" in content and attempt == 1:
        return 200, {}, None, 2.5  # longer than the client timeout
    if "ALWAYS503" in content:
        return 503, {}, "overloaded", 0.0
    if "BAD400" in content:
        return 400, {}, {"error": {"message": "context length exceeded"}}, 0.0
    if "GARBLE" in content:
        return 200, {}, "The answer is fine but I will not give a number.", 0.0
    if "HTML200" in content:  # a proxy's or login page served with 200
        return (
            200,
            {},
            b"<!DOCTYPE html><html><head><title>Sign in</title></head><body>...</body></html>",
            0.0,
        )
    if "HTML502" in content:
        return 502, {}, b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>", 0.0
    if "ALWAYS429" in content:
        return 429, {"Retry-After": "1"}, {"error": {"message": "rate limited"}}, 0.0
    if "WAIT600" in content:
        return 429, {"Retry-After": "600"}, {"error": {"message": "come back later"}}, 0.0
    return 200, {}, "A fair answer. Rating: [[7]]", 0.0


class FakeJudgeServer:
    """``POST /v1/chat/completions`` on 127.0.0.1: checks the bearer key, counts hits, replies per ``responder``."""

    def __init__(self, api_key: str | None, responder=default_reply):
        self.api_key = api_key
        self.responder = responder
        self.hits: list[dict] = []
        self.attempts: dict[str, int] = {}
        self.auth_failures = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def _send(self, status: int, headers: dict, payload) -> None:
                body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                html = body.lstrip().startswith(b"<")
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "text/html" if html else "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                request = json.loads(self.rfile.read(length))
                if self.path != "/v1/chat/completions":
                    return self._send(404, {}, {"error": "not found"})
                expected = f"Bearer {server.api_key}" if server.api_key else None
                if expected and self.headers.get("Authorization") != expected:
                    with server.lock:
                        server.auth_failures += 1
                    # Like OpenAI, echo (part of) the presented key: the client must not repeat it.
                    presented = self.headers.get("Authorization", "")
                    return self._send(
                        401, {}, {"error": {"message": f"Incorrect API key provided: {presented}"}}
                    )
                content = "\n".join(m["content"] for m in request["messages"])
                with server.lock:
                    server.hits.append(request)
                    attempt = server.attempts[content] = server.attempts.get(content, 0) + 1
                status, headers, reply, delay = server.responder(content, attempt)
                if delay:
                    time.sleep(delay)
                if status != 200 or isinstance(reply, bytes):
                    return self._send(
                        status, headers, reply if not isinstance(reply, str) else reply.encode()
                    )
                payload = {
                    "id": "chatcmpl-test",
                    "object": "chat.completion",
                    "model": request["model"],
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": reply},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
                }
                return self._send(200, headers, payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def secret(monkeypatch):
    value = f"sk-rega-test-{uuid.uuid4().hex}"
    monkeypatch.setenv(KEY_ENV, value)
    return value


@pytest.fixture
def judge_server(secret):
    with FakeJudgeServer(secret) as server:
        yield server


def make_config(server: FakeJudgeServer, tmp_path: Path, **overrides) -> JudgeConfig:
    settings = dict(
        base_url=server.base_url,
        model="judge-test",
        api_key_env=KEY_ENV,
        concurrency=4,
        timeout_s=1.0,
        max_retries=3,
        backoff_s=0.01,
        backoff_max_s=0.05,
        cache_dir=str(tmp_path / "judge-cache"),
    )
    settings.update(overrides)
    return JudgeConfig(**settings)


class RecordingSleep:
    """Records requested delays; waits at most a few milliseconds so tests stay fast."""

    def __init__(self):
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        time.sleep(min(seconds, 0.01))

    def clock(self) -> float:
        """Time as the client sees it: every requested delay counts as waited."""
        return time.monotonic() + sum(self.delays)


def assert_secret_absent(root: Path, secret: str) -> None:
    files = [p for p in root.rglob("*") if p.is_file()]
    assert files, "the run wrote no files"
    for path in files:
        assert secret.encode() not in path.read_bytes(), f"API key leaked into {path}"


def msgs(text: str) -> list[dict]:
    return [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": text}]


# -- parsing ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Rating: [[8]]", 8.0),
        ("Rating: [[8.5]]", 8.5),
        ("Rating: [9]", 9.0),  # FastChat's backup pattern
        ("I rate it [[6]] and then [[2]]", 6.0),
        ("no rating here", None),
        ("", None),
        (None, None),
        ("Rating: [[0]]", None),  # outside 1-10: missing, not 0
        ("Rating: [[11]]", None),
    ],
)
def test_parse_bracket_rating(text, expected):
    assert parse_bracket_rating(text, 1, 10) == expected


def test_summarize_skips_missing():
    assert summarize([8, None, 6.0, None]) == {"mean": 7.0, "n": 2, "missing": 2}
    assert summarize([None]) == {"mean": None, "n": 0, "missing": 1}
    assert summarize([]) == {"mean": None, "n": 0, "missing": 0}


def test_parse_retry_after():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 20 <= parse_retry_after(future) <= 31


def test_cache_key_covers_request_settings():
    base = JudgeConfig(base_url="http://127.0.0.1:1/v1", api_key_env=None)
    key = cache_key(base, msgs("q"))
    assert key == cache_key(JudgeConfig(base_url="http://127.0.0.1:1/v1/", api_key_env=None), msgs("q"))
    for changed in (
        JudgeConfig(base_url="http://127.0.0.1:1/v1", api_key_env=None, model="other"),
        JudgeConfig(base_url="http://127.0.0.1:1/v1", api_key_env=None, temperature=0.5),
        JudgeConfig(base_url="http://127.0.0.1:1/v1", api_key_env=None, max_tokens=10),
        JudgeConfig(base_url="http://127.0.0.1:2/v1", api_key_env=None),
    ):
        assert cache_key(changed, msgs("q")) != key
    assert cache_key(base, msgs("q2")) != key


@pytest.mark.parametrize(
    "path", sorted((REPO / "configs" / "eval").glob("judge_*.yaml")), ids=lambda p: p.name
)
def test_judge_configs_load_and_hold_no_key(path):
    config = load_judge_config(path)
    assert config.model and config.base_url.startswith("http")
    text = path.read_text()
    assert "sk-" not in text and "api_key:" not in text


# -- client against a loopback server ---------------------------------------------------------------------------


def test_bearer_key_sent_and_cache_prevents_repeat_calls(judge_server, tmp_path, secret, caplog):
    caplog.set_level(logging.DEBUG)
    client = JudgeClient(make_config(judge_server, tmp_path))
    first = client.complete(msgs("Grade this."))
    assert first.content == "A fair answer. Rating: [[7]]" and not first.cached
    assert judge_server.auth_failures == 0 and len(judge_server.hits) == 1
    assert judge_server.hits[0]["model"] == "judge-test" and judge_server.hits[0]["temperature"] == 0.0

    again = JudgeClient(make_config(judge_server, tmp_path)).complete(msgs("Grade this."))  # a fresh run
    assert again.cached and again.content == first.content
    assert len(judge_server.hits) == 1

    JudgeClient(make_config(judge_server, tmp_path, max_tokens=64)).complete(msgs("Grade this."))
    assert len(judge_server.hits) == 2  # another request setting is another cache entry
    assert not list((tmp_path / "judge-cache").rglob("*.tmp"))
    assert_secret_absent(tmp_path, secret)
    assert secret not in caplog.text and secret not in repr(client)


def test_retries_429_500_and_timeouts_then_succeed(judge_server, tmp_path):
    sleep = RecordingSleep()
    client = JudgeClient(make_config(judge_server, tmp_path), sleep=sleep)
    batch = [msgs("FAIL429ONCE a"), msgs("FAIL500TWICE b"), msgs("SLOWONCE c"), msgs("plain d")]
    replies = client.complete_many(batch)
    assert [r.content for r in replies] == ["A fair answer. Rating: [[7]]"] * 4
    assert all(r.error is None for r in replies)
    assert judge_server.attempts == {
        "You are a helpful assistant.\nFAIL429ONCE a": 2,
        "You are a helpful assistant.\nFAIL500TWICE b": 3,
        "You are a helpful assistant.\nSLOWONCE c": 2,
        "You are a helpful assistant.\nplain d": 1,
    }
    assert client.stats.retries == 4 and client.stats.failures == 0
    assert max(sleep.delays) >= 1.0  # Retry-After: 1 honoured, beyond backoff_max_s
    assert sum(d < 0.06 for d in sleep.delays) == 3  # exponential backoff, capped, for the others


def test_exhausted_retries_and_client_errors_are_missing_and_not_cached(judge_server, tmp_path):
    client = JudgeClient(make_config(judge_server, tmp_path, max_retries=2), sleep=RecordingSleep())
    failed, rejected, fine = client.complete_many([msgs("ALWAYS503"), msgs("BAD400"), msgs("ok")])
    assert failed.content is None and "503" in failed.error
    assert rejected.content is None and "400" in rejected.error
    assert fine.content is not None
    assert judge_server.attempts["You are a helpful assistant.\nALWAYS503"] == 3  # 1 try + 2 retries
    assert judge_server.attempts["You are a helpful assistant.\nBAD400"] == 1  # 400 is not retried
    assert client.stats.failures == 2
    client.complete_many([msgs("ALWAYS503"), msgs("ok")])  # failures are retried next run, successes cached
    assert judge_server.attempts["You are a helpful assistant.\nALWAYS503"] == 6
    assert judge_server.attempts["You are a helpful assistant.\nok"] == 1


def test_concurrent_batch_keeps_order_and_sends_duplicates_once(secret, tmp_path):
    def echo(content, attempt):
        return 200, {}, f"echo {content.rsplit(' ', 1)[-1]} [[5]]", 0.02

    with FakeJudgeServer(secret, echo) as server:
        client = JudgeClient(make_config(server, tmp_path, concurrency=4))
        batch = [msgs(f"item {i}") for i in range(10)] + [msgs("item 3")]
        replies = client.complete_many(batch)
    assert [r.content for r in replies] == [f"echo {i} [[5]]" for i in range(10)] + ["echo 3 [[5]]"]
    assert len(server.hits) == 10 and client.stats.requests == 10


def test_wrong_key_fails_fast_without_leaking_it(judge_server, tmp_path, monkeypatch):
    wrong = f"sk-wrong-{uuid.uuid4().hex}"
    monkeypatch.setenv("REGA_OTHER_KEY", wrong)
    client = JudgeClient(
        make_config(judge_server, tmp_path, api_key_env="REGA_OTHER_KEY"), sleep=RecordingSleep()
    )
    with pytest.raises(JudgeError, match="401") as info:
        client.complete_many([msgs("a"), msgs("b")])
    assert wrong not in str(info.value)
    assert judge_server.auth_failures >= 1 and not judge_server.hits


def test_missing_key_variable_is_reported_before_any_request(judge_server, tmp_path, monkeypatch):
    monkeypatch.delenv("REGA_UNSET_KEY", raising=False)
    with pytest.raises(JudgeError, match="REGA_UNSET_KEY"):
        JudgeClient(make_config(judge_server, tmp_path, api_key_env="REGA_UNSET_KEY"))
    assert not judge_server.hits


def test_server_without_auth(tmp_path):
    with FakeJudgeServer(api_key=None) as server:
        reply = JudgeClient(make_config(server, tmp_path, api_key_env=None)).complete(msgs("hello"))
    assert reply.content.endswith("[[7]]")


def test_html_pages_are_retried_then_missing_with_a_readable_error(judge_server, tmp_path, secret):
    client = JudgeClient(make_config(judge_server, tmp_path, max_retries=1), sleep=RecordingSleep())
    page200, page502 = client.complete_many([msgs("HTML200"), msgs("HTML502")])
    assert page200.content is None and "non-JSON body: an HTML page (Sign in)" in page200.error
    assert page502.content is None and "HTTP 502: an HTML page (502 Bad Gateway)" in page502.error
    assert "<html" not in page200.error + page502.error
    assert judge_server.attempts["You are a helpful assistant.\nHTML200"] == 2  # retried once, then missing
    assert secret not in page200.error + page502.error


def test_request_budget_caps_the_total_time_of_one_request(judge_server, tmp_path):
    """Endless 429s used to cost max_retries x (timeout + Retry-After): about 70 minutes with the defaults."""
    sleep = RecordingSleep()
    config = make_config(judge_server, tmp_path, max_retries=50, request_budget_s=2.5)
    reply = JudgeClient(config, sleep=sleep, clock=sleep.clock).complete(msgs("ALWAYS429"))
    assert reply.content is None and "request_budget_s=2.5" in reply.error and "HTTP 429" in reply.error
    assert len(sleep.delays) == 2 and all(1.0 <= d <= 1.1 for d in sleep.delays)  # Retry-After: 1, twice
    assert (
        judge_server.attempts["You are a helpful assistant.\nALWAYS429"] == 3
    )  # the 4th would end past 2.5 s


def test_retry_after_beyond_the_budget_gives_up_without_waiting(judge_server, tmp_path):
    sleep = RecordingSleep()
    client = JudgeClient(
        make_config(judge_server, tmp_path, request_budget_s=60), sleep=sleep, clock=sleep.clock
    )
    reply = client.complete(msgs("WAIT600"))
    assert (
        reply.content is None
        and "gave up after 1 tries" in reply.error
        and "request_budget_s=60" in reply.error
    )
    assert sleep.delays == []


def test_progress_counts_ok_retried_and_missing(judge_server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="rega.eval.judged.client")
    client = JudgeClient(make_config(judge_server, tmp_path, max_retries=1), sleep=RecordingSleep())
    client.complete_many([msgs("FAIL429ONCE x"), msgs("ALWAYS503 y"), msgs("plain z")])
    assert "judge judge-test: 3/3 done (ok 2, retried 2, missing 1)" in caplog.text
    assert client.stats.to_dict()["retried"] == 2 and client.stats.failures == 1


def test_run_stops_after_too_many_failures_in_a_row(judge_server, tmp_path):
    config = make_config(judge_server, tmp_path, max_retries=0, concurrency=1, abort_after_failures=3)
    with pytest.raises(JudgeError, match=r"3 requests in a row failed, stopping .*last: .*HTTP 503"):
        JudgeClient(config).complete_many([msgs(f"ALWAYS503 {i}") for i in range(10)])
    assert len(judge_server.hits) < 10


def test_without_the_openai_package_the_judge_fails_in_one_line(judge_server, tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "openai", None)  # import openai now raises ImportError
    with pytest.raises(JudgeError, match=r"needs the 'openai' package: pip install 'rega\[judge\]'"):
        JudgeClient(make_config(judge_server, tmp_path))


@pytest.mark.parametrize(
    ("scores", "share", "problem"),
    [
        ([None, None], None, "x: 2 of 2 judge scores missing (all of them); first error: boom"),
        ([7.0, None], None, None),
        (
            [7.0, None, None],
            0.5,
            "x: 2 of 3 judge scores missing (more than max_missing_share=0.5); first error: boom",
        ),
        ([7.0, None], 0.5, None),
        ([], None, "x: no item was judged"),
    ],
)
def test_missing_problem(scores, share, problem):
    assert missing_problem("x", {"overall": summarize(scores), "first_error": "boom"}, share) == problem
    assert missing_problem("x", {"error": "HTTP 401"}, None) == "x: HTTP 401"


def test_first_error_prefers_request_errors_then_names_unparsable_ratings():
    assert first_error([{"score": 7}, {"score": None, "error": "HTTP 429"}]) == "HTTP 429"
    assert "without a valid rating" in first_error([{"score": None, "judgment": "fine"}])
    assert first_error([{"score": 5}]) is None


# -- general evaluation judge prompts (pure) -----------------------------------------------------------------


def _record(category: str, output: str = "", instruction: str = "为什么天空是蓝色的？") -> Record:
    return Record(
        id="x-1",
        instruction=instruction,
        input="",
        output=output,
        domain="general",
        task="t",
        lang="zh",
        category=category,
    )


def test_belle_prompt_composition_and_tenfold_mapping(shared_data):
    prompts = general_set.load_belle_prompts(shared_data / "general_eval_zh_dev" / "eval_prompt.json")
    assert "open qa" in prompts and "closed qa" in prompts  # BELLE writes "open QA"; dev items "open qa"
    with_ref = general_set.build_prompt("belle", _record("open qa", "瑞利散射。"), "因为散射。", prompts)
    assert with_ref == [
        {
            "role": "user",
            "content": prompts["open qa"]
            + " 为什么天空是蓝色的？ 标准回答:瑞利散射。  模型回答：' 因为散射。'。请针对模型回答给出得分，顺便给出理由：",
        }
    ]
    no_ref = general_set.build_prompt("belle", _record("brainstorming"), "想法", prompts)[0]["content"]
    assert no_ref.endswith(" 为什么天空是蓝色的？  模型回答： '想法'。请针对模型回答给出得分，顺便给出理由：")
    assert general_set.parse_score("belle", "得分: 0.8分。回答基本正确。") == (0.8, 8.0)
    assert general_set.parse_score("belle", "得分：1") == (1.0, 10.0)
    assert general_set.parse_score("belle", "回答很好。") == (None, None)
    assert general_set.parse_score("belle", "得分: 7") == (None, None)  # outside 0-1


def test_cgev_prompt_uses_reference_only_when_present():
    with_ref = general_set.build_prompt("cgev_zh", _record("math", "答案是8。"), "8")[1]["content"]
    assert "[参考答案开始]\n答案是8。\n[参考答案结束]" in with_ref and "[[评分]]" in with_ref
    without = general_set.build_prompt("cgev_zh", _record("generation"), "一首诗")[1]["content"]
    assert "参考答案" not in without and "[AI助手的回答开始]\n一首诗\n[AI助手的回答结束]" in without
    assert general_set.parse_score("cgev_zh", "评分：[[0]]") == (0.0, 0.0)  # 0 is a valid CGev score
    assert general_set.parse_score("cgev_zh", "评分：[[10]]") == (10.0, 10.0)
    assert general_set.parse_score("cgev_zh", "评分：[[12]]") == (None, None)
    en = general_set.build_prompt("single_en", _record("vicuna", "ref", "Why?"), "Because.")
    assert en[0]["content"] == "You are a helpful assistant." and "[Question]\nWhy?\n\n" in en[1]["content"]
    assert "ref" not in en[1]["content"]


def test_score_items_macro_and_missing():
    rows = [
        {"category": "a", "score": 8.0},
        {"category": "a", "score": None},
        {"category": "b", "score": 4.0},
        {"category": "b", "score": 6.0},
    ]
    scores = general_set.score_items(rows)
    assert scores["overall"] == {"mean": 6.0, "n": 3, "missing": 1}
    assert scores["macro_mean"] == 6.5
    assert scores["per_category"]["a"] == {"mean": 8.0, "n": 1, "missing": 1}
