#!/usr/bin/env python3
"""Benchmark ccm: the latency, CPU and memory it adds between a client and an upstream.

    python bench/bench.py            # full run (~1-2 min on 2 cores)
    python bench/bench.py --quick    # smoke run (~15 s)

What it does (everything on 127.0.0.1, stdlib only):
  * starts a fast fake upstream in a subprocess (`bench.py --fake-upstream PORT`): a raw asyncio
    HTTP/1.1 keep-alive server answering POST /v1/messages (Anthropic JSON or SSE),
    POST /v1/chat/completions (OpenAI JSON or chunk stream ending with `data: [DONE]`) and
    POST /v1beta/models/M:generateContent / :streamGenerateContent?alt=sse (Gemini);
  * writes a temp config with an Anthropic provider `fa`, an OpenAI provider `fo` and a Gemini
    provider `fg`, all pointing at the fake, and starts `python ccm.py -c CONFIG serve`;
  * sends a ~30 KB Claude Code request (3 system blocks, 15 tools, tool_use/tool_result turns)
    with a minimal raw asyncio keep-alive client, once straight to the fake and once through
    ccm, for six paths (anthropic json/stream, openai- and gemini-translated json/stream), at
    c=1 (interleaved direct/ccm) and c=16;
  * compares the usage ledger on (`[usage] database` in the temp dir, every path goes through
    this ccm) with a second ccm whose config says `[usage] enabled = false`, on the anthropic
    json path, and after SIGTERM counts the ledger's rows against the requests ccm answered;
  * reports p50/p99 latency, the latency ccm adds, ccm's requests/s at c=16, ccm's CPU per
    request (/proc/PID/stat utime+stime) and ccm's RSS (VmRSS/VmHWM).

Every response is checked (status, model rewrite, text, stream terminator); any mismatch is
reported verbatim and makes the exit status 1.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import os
import platform
import re
import signal
import sqlite3
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
CCM_PY = os.path.join(os.path.dirname(HERE), "ccm.py")
HOST = "127.0.0.1"
PROVIDER_KEY = "sk-bench-key-000000"          # what ccm must send upstream
CLIENT_KEY = "sk-ant-bench-client-key-99999"  # what the client sends ccm (must not reach upstream)
TEXT_PIECES = [
    "I", " looked", " at", " parser.py", " and", " the", " failing", " test", ":", " the",
    " tokenizer", " drops", " the", " trailing", " newline", " before", " the", " last",
    " token,", " so I will fix the loop bound in `tokenize()` and re-run the tests.",
]
USAGE_IN, USAGE_OUT, USAGE_CACHE = 7012, 120, 6500
GEMINI_MODEL = "gemini-bench"
GEMINI_AGENT = "google-genai-sdk/1.30.0 gl-python/3.12.3"   # the direct Gemini client's user-agent
MAX_HEAD = 64 * 1024
REQUEST_TIMEOUT_S = 30.0                      # one request through ccm; longer counts as an error


# ============================================================================================
# Fake upstream (runs in its own process)
# ============================================================================================

_MODEL_RE = re.compile(rb'"model"\s*:\s*"([^"]{0,200})"')
_STREAM_RE = re.compile(rb'"stream"\s*:\s*true')


def _texts_for(model: str) -> list[str]:
    """The text deltas; the first names the model the upstream received (checked by the client)."""
    return [f"[model={model}] " + TEXT_PIECES[0], *TEXT_PIECES[1:]]


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _json_response(obj: Any, status: str = "200 OK") -> list[bytes]:
    body = json.dumps(obj, separators=(",", ":")).encode()
    head = (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\nrequest-id: req_bench01\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode()
    return [head + body]


def _sse_response(events: list[bytes]) -> list[bytes]:
    """Chunked SSE: the head with the first event, then one write per event (as a real
    upstream flushes them), the terminating zero chunk with the last one."""
    head = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
            b"cache-control: no-cache\r\nrequest-id: req_bench01\r\n"
            b"transfer-encoding: chunked\r\n\r\n")
    writes = [_chunk(e) for e in events]
    writes[0] = head + writes[0]
    writes[-1] += b"0\r\n\r\n"
    return writes


def anthropic_answer(model: str, stream: bool) -> list[bytes]:
    texts = _texts_for(model)
    usage = {"input_tokens": USAGE_IN, "output_tokens": USAGE_OUT,
             "cache_creation_input_tokens": 0, "cache_read_input_tokens": USAGE_CACHE}
    if not stream:
        return _json_response({
            "id": "msg_01Bench0000000000000001", "type": "message", "role": "assistant",
            "model": model, "content": [{"type": "text", "text": "".join(texts)}],
            "stop_reason": "end_turn", "stop_sequence": None, "usage": usage})
    start = {"id": "msg_01Bench0000000000000001", "type": "message", "role": "assistant",
             "model": model, "content": [], "stop_reason": None, "stop_sequence": None,
             "usage": dict(usage, output_tokens=1)}
    events = [_sse("message_start", {"type": "message_start", "message": start}),
              _sse("content_block_start", {"type": "content_block_start", "index": 0,
                                           "content_block": {"type": "text", "text": ""}})]
    events += [_sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                            "delta": {"type": "text_delta", "text": t}})
               for t in texts]
    events += [_sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
               _sse("message_delta", {"type": "message_delta",
                                      "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                      "usage": {"output_tokens": USAGE_OUT}}),
               _sse("message_stop", {"type": "message_stop"})]
    return _sse_response(events)


def openai_answer(model: str, stream: bool) -> list[bytes]:
    texts = _texts_for(model)
    usage = {"prompt_tokens": USAGE_IN, "completion_tokens": USAGE_OUT,
             "total_tokens": USAGE_IN + USAGE_OUT,
             "prompt_tokens_details": {"cached_tokens": USAGE_CACHE}}
    base = {"id": "chatcmpl-bench0001", "created": 1760000000, "model": model,
            "system_fingerprint": "fp_bench"}
    if not stream:
        return _json_response(dict(base, object="chat.completion", choices=[{
            "index": 0, "message": {"role": "assistant", "content": "".join(texts),
                                    "refusal": None},
            "logprobs": None, "finish_reason": "stop"}], usage=usage))

    def chunk(choices: list[Any], **kw: Any) -> bytes:
        obj = dict(base, object="chat.completion.chunk", choices=choices, **kw)
        return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
    events = [chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                      "logprobs": None, "finish_reason": None}], usage=None)]
    events += [chunk([{"index": 0, "delta": {"content": t}, "logprobs": None,
                       "finish_reason": None}], usage=None) for t in texts]
    events += [chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}],
                     usage=None),
               chunk([], usage=usage),
               b"data: [DONE]\n\n"]
    return _sse_response(events)


def gemini_answer(model: str, stream: bool) -> list[bytes]:
    """generateContent's GenerateContentResponse, or streamGenerateContent?alt=sse: one
    `data:` event per text piece (CRLF-separated, as Google sends them), the last one with
    finishReason and usageMetadata."""
    texts = _texts_for(model)
    usage = {"promptTokenCount": USAGE_IN, "candidatesTokenCount": USAGE_OUT,
             "totalTokenCount": USAGE_IN + USAGE_OUT, "cachedContentTokenCount": USAGE_CACHE,
             "promptTokensDetails": [{"modality": "TEXT", "tokenCount": USAGE_IN}]}
    base = {"modelVersion": model, "responseId": "bench0000000000000001"}

    def candidate(text: str, last: bool) -> dict[str, Any]:
        c: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}
        if last:
            c["finishReason"] = "STOP"
        return c
    if not stream:
        return _json_response(dict(base, candidates=[candidate("".join(texts), True)],
                                   usageMetadata=usage))
    events = []
    for i, t in enumerate(texts):
        obj: dict[str, Any] = {"candidates": [candidate(t, i == len(texts) - 1)]}
        if i == len(texts) - 1:
            obj["usageMetadata"] = usage
        events.append(b"data: " + json.dumps(dict(obj, **base), separators=(",", ":")).encode()
                      + b"\r\n\r\n")
    return _sse_response(events)


_GEMINI_PATH = re.compile(r"/v1beta/models/([A-Za-z0-9._-]{1,100}):(generateContent|streamGenerateContent)")


class FakeUpstream(asyncio.Protocol):
    """One keep-alive connection of the fake upstream; answers are precomputed per model."""
    cache: dict[tuple[str, str, bool], list[bytes]] = {}
    stats: dict[str, Any] = {"requests": 0, "connections": 0, "by_key": {}, "bad_auth": 0,
                             "last_body_bytes": {}}

    def connection_made(self, transport: Any) -> None:
        self.stats["connections"] += 1
        self.transport = transport
        self.buf = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        for _ in range(1000):                        # bounded: pipelined requests per read
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEAD:
                    self.transport.close()
                return
            lines = bytes(self.buf[:end]).split(b"\r\n")
            try:
                method, target, _ = lines[0].decode("latin-1").split(" ", 2)
            except ValueError:
                self.transport.close()
                return
            headers = {}
            for line in lines[1:]:
                k, _, v = line.partition(b":")
                headers[k.strip().lower().decode("latin-1")] = v.strip().decode("latin-1")
            if "transfer-encoding" in headers:       # the bench never sends chunked bodies
                self.transport.write(b"HTTP/1.1 501 Not Implemented\r\ncontent-length: 0\r\n"
                                     b"connection: close\r\n\r\n")
                self.transport.close()
                return
            n = int(headers.get("content-length") or 0)
            if len(self.buf) < end + 4 + n:
                return
            body = bytes(self.buf[end + 4:end + 4 + n])
            del self.buf[:end + 4 + n]
            for w in self.answer(method, target, headers, body):
                self.transport.write(w)
            if headers.get("connection", "").lower() == "close":
                self.transport.close()
                return

    def answer(self, method: str, target: str, headers: dict[str, str], body: bytes) -> list[bytes]:
        st = self.stats
        path, _, query = target.partition("?")
        if method == "GET" and path == "/__stats":
            return _json_response(st)
        gem = _GEMINI_PATH.fullmatch(path)
        if method != "POST" or not (gem or path in ("/v1/messages", "/v1/chat/completions")):
            return _json_response({"error": {"type": "not_found_error", "message": path}},
                                  "404 Not Found")
        if gem and (gem.group(2) == "streamGenerateContent") != ("alt=sse" in query.split("&")):
            return _json_response({"error": {"code": 400, "status": "INVALID_ARGUMENT",
                                             "message": f"fake upstream: {target} needs alt=sse "
                                                        "exactly when streaming"}},
                                  "400 Bad Request")
        st["requests"] += 1
        if path == "/v1/messages":
            ok = headers.get("x-api-key") == PROVIDER_KEY and "authorization" not in headers
        elif gem:
            ok = (headers.get("x-goog-api-key") == PROVIDER_KEY and "authorization" not in headers
                  and "x-api-key" not in headers and "key=" not in query)
        else:
            ok = headers.get("authorization") == f"Bearer {PROVIDER_KEY}"
        if not ok:
            st["bad_auth"] += 1
            if gem:                                  # a Google API error (google.rpc.Status)
                return _json_response({"error": {"code": 401, "status": "UNAUTHENTICATED",
                                                 "message": "fake upstream: wrong credential "
                                                            f"headers {sorted(headers)}"}},
                                      "401 Unauthorized")
            return _json_response({"type": "error", "error": {
                "type": "authentication_error",
                "message": f"fake upstream: wrong credential headers {sorted(headers)}"}},
                "401 Unauthorized")
        if gem:                                      # Gemini: the model is in the URL
            model, stream = gem.group(1), gem.group(2) == "streamGenerateContent"
        else:
            m = _MODEL_RE.search(body)
            model = m.group(1).decode() if m else "?"
            stream = _STREAM_RE.search(body) is not None
        agent = headers.get("user-agent", "").split("/")[0] or "-"
        key = f"{path} {model} {'stream' if stream else 'json'} {agent}"
        st["by_key"][key] = st["by_key"].get(key, 0) + 1
        st["last_body_bytes"][key] = len(body)
        ck = (path, model, stream)
        out = self.cache.get(ck)
        if out is None:
            out = self.cache[ck] = (gemini_answer if gem else anthropic_answer
                                    if path == "/v1/messages" else openai_answer)(model, stream)
        return out


def run_fake_upstream(port: int) -> int:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(FakeUpstream, HOST, port, backlog=1024,
                                          reuse_address=True)
        print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
        parent = os.getppid()
        for _ in range(3600):                        # bounded life: 30 min, or until orphaned
            await asyncio.sleep(0.5)
            if os.getppid() != parent:
                break
        server.close()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        asyncio.run(main())
    except (KeyboardInterrupt, SystemExit):
        pass
    return 0


# ============================================================================================
# Minimal raw HTTP/1.1 keep-alive client
# ============================================================================================

class HTTPFailure(Exception):
    pass


# POST requests that got a response head, by server port: how many rows ccm's ledger must hold.
ANSWERED: dict[int, int] = {}


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    frames: int = 0           # chunked frames (how many pieces the server wrote the body in)


class Conn:
    """One keep-alive connection; reconnects (and resends once) if the server closed it idle."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.r: asyncio.StreamReader | None = None
        self.w: asyncio.StreamWriter | None = None
        self.used = False
        self.reconnects = 0
        self.expired = False

    async def connect(self) -> None:
        self.close()
        try:
            self.r, self.w = await asyncio.open_connection(HOST, self.port, limit=MAX_HEAD)
        except OSError as exc:
            raise HTTPFailure(f"cannot connect to {HOST}:{self.port} ({exc!r})")
        sock = self.w.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.used = False

    def close(self) -> None:
        if self.w is not None:
            self.w.close()
        self.r = self.w = None

    def _expire(self) -> None:
        self.expired = True
        if self.w is not None:
            self.w.transport.abort()                # wakes the pending read with an error

    async def request(self, data: bytes) -> Reply:
        self.expired = False
        timer = asyncio.get_running_loop().call_later(REQUEST_TIMEOUT_S, self._expire)
        try:
            return await self._request(data)
        finally:
            timer.cancel()
            if self.expired:
                self.close()
                raise HTTPFailure(f"no complete response within {REQUEST_TIMEOUT_S:g} s")

    async def _request(self, data: bytes) -> Reply:
        for attempt in range(2):
            if self.w is None:
                await self.connect()
            reused = self.used
            self.used = True
            self.w.write(data)
            try:
                head = await self.r.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                self.close()
                if reused and attempt == 0 and not self.expired and not getattr(exc, "partial", b""):
                    self.reconnects += 1
                    continue                         # closed while idle: resend once
                raise HTTPFailure(f"connection closed before a response ({exc!r})")
            if data.startswith(b"POST "):
                ANSWERED[self.port] = ANSWERED.get(self.port, 0) + 1
            return await self._read_rest(head)
        raise HTTPFailure("unreachable")

    async def _read_rest(self, head: bytes) -> Reply:
        lines = head[:-4].split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise HTTPFailure(f"bad status line {lines[0][:100]!r}")
        status = int(parts[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            headers[k.strip().lower().decode("latin-1")] = v.strip().decode("latin-1")
        r = self.r
        try:
            if headers.get("transfer-encoding", "").lower() == "chunked":
                body = bytearray()
                frames = 0
                for frames in range(1_000_000):      # bounded: chunks per response
                    size_line = await r.readuntil(b"\r\n")
                    size = int(size_line.split(b";")[0].strip(), 16)
                    if size == 0:
                        for _ in range(100):         # trailer section, up to the empty line
                            if await r.readuntil(b"\r\n") == b"\r\n":
                                break
                        break
                    chunk = await r.readexactly(size + 2)
                    body += chunk[:-2]
                else:
                    raise HTTPFailure("too many chunks")
                body = bytes(body)
                if headers.get("connection", "").lower() == "close":
                    self.close()
                return Reply(status, headers, body, frames)
            elif "content-length" in headers:
                body = await r.readexactly(int(headers["content-length"]))
            else:                                    # read to EOF (SSE without framing)
                body = await r.read(-1)
                self.close()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError) as exc:
            self.close()
            raise HTTPFailure(f"response body broken ({exc!r})")
        if headers.get("connection", "").lower() == "close":
            self.close()
        return Reply(status, headers, body)


def build_request(port: int, path: str, headers: dict[str, str], body: bytes) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"host: {HOST}:{port}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def get_request(port: int, path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nhost: {HOST}:{port}\r\naccept: */*\r\n\r\n".encode()


# ============================================================================================
# The Claude Code request
# ============================================================================================

LOREM = ("When you are working on a software engineering task, read the relevant files before "
         "changing them, prefer editing existing files to creating new ones, keep changes small "
         "and focused, follow the conventions already used in the codebase, and verify your work "
         "by running the project's tests or linters. Never guess at APIs: look them up in the "
         "code. Report what you changed and why, concisely, in GitHub-flavored markdown. ")

TOOLS = [
    ("Task", {"description": "string", "prompt": "string", "subagent_type": "string"}),
    ("Bash", {"command": "string", "timeout": "number", "description": "string",
              "run_in_background": "boolean"}),
    ("Glob", {"pattern": "string", "path": "string"}),
    ("Grep", {"pattern": "string", "path": "string", "glob": "string", "output_mode": "string",
              "-i": "boolean", "head_limit": "number"}),
    ("ExitPlanMode", {"plan": "string"}),
    ("Read", {"file_path": "string", "offset": "number", "limit": "number"}),
    ("Edit", {"file_path": "string", "old_string": "string", "new_string": "string",
              "replace_all": "boolean"}),
    ("MultiEdit", {"file_path": "string", "edits": "array"}),
    ("Write", {"file_path": "string", "content": "string"}),
    ("NotebookEdit", {"notebook_path": "string", "cell_id": "string", "new_source": "string",
                      "edit_mode": "string"}),
    ("WebFetch", {"url": "string", "prompt": "string"}),
    ("TodoWrite", {"todos": "array"}),
    ("WebSearch", {"query": "string", "allowed_domains": "array", "blocked_domains": "array"}),
    ("BashOutput", {"bash_id": "string", "filter": "string"}),
    ("KillShell", {"shell_id": "string"}),
]


def _tool(name: str, props: dict[str, str]) -> dict[str, Any]:
    desc = (f"{name}: performs the {name} operation for the agent. Usage notes: " + LOREM * 3)[:600]
    properties: dict[str, Any] = {}
    for p, typ in props.items():
        properties[p] = {"type": typ, "description": f"The {p.replace('_', ' ')} to use"}
        if typ == "array":
            properties[p]["items"] = {"type": "object", "properties": {
                "content": {"type": "string"}, "status": {"type": "string",
                                                          "enum": ["pending", "in_progress", "completed"]}}}
    return {"name": name, "description": desc, "input_schema": {
        "type": "object", "properties": properties, "required": [next(iter(props))],
        "additionalProperties": False, "$schema": "http://json-schema.org/draft-07/schema#"}}


def claude_code_body(model: str, stream: bool) -> dict[str, Any]:
    prompt = ("You are an interactive CLI tool that helps users with software engineering "
              "tasks. Use the instructions below and the tools available to you to assist "
              "the user.\n\n# Doing tasks\n" + LOREM * 40)[:8192]
    tool_output = "\n".join(f"{i + 1:>6}\t    tokens.append(line[{i}:{i + 7}])  # keep offsets"
                            for i in range(40))[:2048]
    body: dict[str, Any] = {
        "model": model,
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "<system-reminder>\nAs you answer the user's questions, "
                 "you can use the following context:\n# claudeMd\n" + LOREM * 6 +
                 "\n</system-reminder>"},
                {"type": "text", "text": "The test test_tokenize_trailing_newline fails in "
                 "parser.py. Please find out why and fix it."}]},
            {"role": "assistant", "content": [
                {"type": "text", "text": "I'll read parser.py to see how tokenize() handles the "
                 "end of the input."},
                {"type": "tool_use", "id": "toolu_01BenchReadParser00000001", "name": "Read",
                 "input": {"file_path": "/home/dev/project/parser.py", "offset": 1, "limit": 200}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01BenchReadParser00000001",
                 "content": tool_output},
                {"type": "text", "text": "<system-reminder>The TodoWrite tool hasn't been used "
                 "recently.</system-reminder>", "cache_control": {"type": "ephemeral"}}]},
        ],
        "system": [
            {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.197.abc; "
                                     "cc_entrypoint=sdk-cli;"},
            {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude.",
             "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": prompt, "cache_control": {"type": "ephemeral"}},
        ],
        "tools": [_tool(n, p) for n, p in TOOLS],
        "metadata": {"user_id": "user_3f1c0de2b9a84c5e8d7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d"
                                "_account_0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0_session_"
                                "9e8d7c6b-5a49-3827-1605-f4e3d2c1b0a9"},
        "max_tokens": 32000,
    }
    if stream:
        body["stream"] = True
    return body


def claude_code_headers(key: str) -> dict[str, str]:
    return {
        "accept": "application/json",
        "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,"
                          "fine-grained-tool-streaming-2025-05-14",
        "anthropic-dangerous-direct-browser-access": "true",
        "anthropic-version": "2023-06-01",
        "content-type": "application/json",
        "user-agent": "claude-cli/2.1.197 (external, sdk-cli)",
        "x-api-key": key,
        "x-app": "cli",
        "x-stainless-arch": "x64",
        "x-stainless-lang": "js",
        "x-stainless-os": "Linux",
        "x-stainless-package-version": "0.60.0",
        "x-stainless-retry-count": "0",
        "x-stainless-runtime": "node",
        "x-stainless-runtime-version": "v22.17.0",
        "x-stainless-timeout": "600",
        "accept-encoding": "gzip, deflate, br, zstd",
        "connection": "keep-alive",
    }


def openai_equivalent(body: dict[str, Any], model: str) -> dict[str, Any]:
    """The Chat Completions body an OpenAI client would send for the same conversation
    (written here independently of ccm's translator)."""
    system = "\n\n".join(b["text"] for b in body["system"]
                         if not b["text"].startswith("x-anthropic-billing-header:"))
    msgs: list[dict[str, Any]] = [{"role": "system", "content": system}]
    for m in body["messages"]:
        blocks = m["content"]
        if m["role"] == "assistant":
            text = "\n\n".join(b["text"] for b in blocks if b["type"] == "text")
            calls = [{"id": b["id"], "type": "function",
                      "function": {"name": b["name"],
                                   "arguments": json.dumps(b["input"], separators=(",", ":"))}}
                     for b in blocks if b["type"] == "tool_use"]
            msgs.append({"role": "assistant", "content": text or None, "tool_calls": calls})
            continue
        for b in blocks:
            if b["type"] == "tool_result":
                msgs.append({"role": "tool", "tool_call_id": b["tool_use_id"], "content": b["content"]})
        texts = [b["text"] for b in blocks if b["type"] == "text"]
        if texts:
            msgs.append({"role": "user", "content": "\n\n".join(texts)})
    tools = [{"type": "function", "function": {
        "name": t["name"], "description": t["description"],
        "parameters": {k: v for k, v in t["input_schema"].items() if k != "$schema"}}}
        for t in body["tools"]]
    out: dict[str, Any] = {"model": model, "messages": msgs, "tools": tools,
                           "max_tokens": body["max_tokens"], "user": "bench-user-0001"}
    if body.get("stream"):
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return out


def gemini_equivalent(body: dict[str, Any]) -> dict[str, Any]:
    """The generateContent body a Gemini client would send for the same conversation
    (written here independently of ccm's translator; the model is in the URL)."""
    system = "\n\n".join(b["text"] for b in body["system"]
                         if not b["text"].startswith("x-anthropic-billing-header:"))
    names: dict[str, str] = {}
    contents: list[dict[str, Any]] = []
    for m in body["messages"]:
        parts: list[dict[str, Any]] = []
        for b in m["content"]:
            if b["type"] == "text":
                parts.append({"text": b["text"]})
            elif b["type"] == "tool_use":
                names[b["id"]] = b["name"]
                parts.append({"functionCall": {"name": b["name"], "args": b["input"]}})
            elif b["type"] == "tool_result":
                parts.append({"functionResponse": {"name": names.get(b["tool_use_id"], "tool"),
                                                   "response": {"output": b["content"]}}})
        contents.append({"role": "model" if m["role"] == "assistant" else "user", "parts": parts})
    decls = [{"name": t["name"], "description": t["description"],
              "parametersJsonSchema": {k: v for k, v in t["input_schema"].items() if k != "$schema"}}
             for t in body["tools"]]
    return {"contents": contents, "systemInstruction": {"parts": [{"text": system}]},
            "tools": [{"functionDeclarations": decls}],
            "generationConfig": {"maxOutputTokens": body["max_tokens"]}}


# ============================================================================================
# Response checks
# ============================================================================================

def _events(body: bytes) -> list[tuple[str, str]]:
    out = []
    for block in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        if not block.strip():
            continue
        ev, data = "", []
        for line in block.decode().split("\n"):
            if line.startswith("event:"):
                ev = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        out.append((ev, "\n".join(data)))
    return out


def check_reply(kind: str, rep: Reply, want_model: str, via_ccm: bool, want_echo: str) -> str:
    """'' when the reply is right, else a description of what is wrong."""
    text = "".join(_texts_for(want_model))
    if rep.status != 200:
        return f"status {rep.status}: {rep.body[:300]!r}"
    if via_ccm and "x-ccm-route" not in rep.headers:
        return f"no x-ccm-route header (headers: {sorted(rep.headers)})"
    try:
        if kind == "anthropic json" or (kind in ("openai json", "gemini json") and via_ccm):
            msg = json.loads(rep.body)
            got = "".join(b.get("text", "") for b in msg.get("content", []) if b.get("type") == "text")
            if msg.get("type") != "message" or got != text:
                return f"wrong message: {rep.body[:300]!r}"
            if msg.get("model") != want_echo:
                return f"message model {msg.get('model')!r}, expected {want_echo!r}"
            u = msg.get("usage") or {}
            if u.get("output_tokens") != USAGE_OUT:
                return f"usage not relayed: {u}"
        elif kind == "openai json":
            msg = json.loads(rep.body)
            if msg["choices"][0]["message"]["content"] != text:
                return f"wrong completion: {rep.body[:300]!r}"
        elif kind == "gemini json":
            cand = json.loads(rep.body)["candidates"][0]
            got = "".join(p.get("text", "") for p in cand["content"]["parts"])
            if got != text or cand.get("finishReason") != "STOP":
                return f"wrong generateContent answer: {rep.body[:300]!r}"
        elif kind == "gemini stream" and not via_ccm:
            evs = _events(rep.body)
            cands = [json.loads(d)["candidates"][0] for _, d in evs]
            got = "".join(p.get("text", "") for c in cands for p in c["content"]["parts"])
            if got != text or not cands or cands[-1].get("finishReason") != "STOP":
                return f"wrong streamed answer {got!r}: {rep.body[-300:]!r}"
        elif kind == "openai stream" and not via_ccm:
            evs = _events(rep.body)
            if not evs or evs[-1][1] != "[DONE]":
                return f"stream does not end with [DONE]: {rep.body[-200:]!r}"
            got = "".join((json.loads(d)["choices"] or [{}])[0].get("delta", {}).get("content") or ""
                          for _, d in evs[:-1])
            if got != text:
                return f"wrong streamed text {got!r}"
        else:                                        # an Anthropic event stream
            evs = _events(rep.body)
            names = [e for e, _ in evs]
            if not names or names[-1] != "message_stop" or names[0] != "message_start":
                return f"bad event sequence {names}: {rep.body[-300:]!r}"
            if "error" in names:
                return f"error event in stream: {rep.body[-300:]!r}"
            got, model, out_tokens = "", None, None
            for e, d in evs:
                data = json.loads(d)
                if e == "content_block_delta" and data["delta"].get("type") == "text_delta":
                    got += data["delta"]["text"]
                elif e == "message_start":
                    model = data["message"]["model"]
                elif e == "message_delta":
                    out_tokens = (data.get("usage") or {}).get("output_tokens")
            if got != text:
                return f"wrong streamed text {got!r}"
            if model != want_echo:
                return f"message_start model {model!r}, expected {want_echo!r}"
            if out_tokens != USAGE_OUT:
                return f"message_delta output_tokens {out_tokens}, expected {USAGE_OUT}"
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        return f"unparsable reply ({exc!r}): {rep.body[:300]!r}"
    return ""


def quick_ok(kind: str, rep: Reply, via_ccm: bool) -> bool:
    """The cheap per-request check used inside timed loops."""
    if rep.status != 200:
        return False
    if not kind.endswith("stream"):
        return rep.body.endswith(b"}")
    tail = rep.body[-64:]
    if kind == "openai stream" and not via_ccm:
        return tail.endswith(b"data: [DONE]\n\n")
    if kind == "gemini stream" and not via_ccm:
        return rep.body.endswith(b"}\r\n\r\n") and b'"finishReason":"STOP"' in rep.body[-600:]
    return b"message_stop" in tail and b"event: error" not in rep.body


# ============================================================================================
# /proc readings
# ============================================================================================

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def mem_mb(pid: int | str) -> dict[str, float]:
    out = {"VmRSS": float("nan"), "VmHWM": float("nan")}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out[line.split(":")[0]] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


def smaps_mb(pid: int) -> dict[str, float]:
    """Pss and private dirty pages: RSS without the shared, file-backed part."""
    out = {"Pss": float("nan"), "Private_Dirty": float("nan"), "Shared_Clean": float("nan")}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key = line.split(":")[0]
                if key in out:
                    out[key] = int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def bare_python_rss(flags: list[str]) -> float:
    """RSS of an interpreter that imports nothing: the floor under ccm's idle RSS."""
    code = "print(open('/proc/self/status').read())"
    try:
        out = subprocess.run([sys.executable, *flags, "-c", code], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return float("nan")
    m = re.search(r"^VmRSS:\s+(\d+)", out, re.M)
    return int(m.group(1)) / 1024 if m else float("nan")


def module_idle_rss(tmpdir: str) -> float:
    """Idle VmRSS of `python -m ccm serve` run from cached bytecode. `python ccm.py` compiles
    the whole file at every start, and the compiler's memory stays in the heap."""
    port = free_port()
    cfg = os.path.join(tmpdir, "idle.toml")
    with open(cfg, "w") as f:
        f.write(f'[server]\nport = {port}\nlog_level = "warn"\n[router]\ndefault = "m"\n'
                f'[usage]\ndatabase = "{os.path.join(tmpdir, "idle-usage.db")}"\n'
                '[[providers]]\nname = "a"\nprovider_type = "anthropic"\n'
                '[[models]]\nname = "m"\n[[models.mappings]]\nprovider = "a"\n')
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(PYTHONPATH=os.path.dirname(CCM_PY), PYTHONPYCACHEPREFIX=os.path.join(tmpdir, "pyc"))
    rss = float("nan")
    for _ in range(2):                       # the first start writes the bytecode cache
        proc = subprocess.Popen([sys.executable, "-m", "ccm", "-c", cfg, "serve"], env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, cwd=tmpdir, preexec_fn=_die_with_parent)
        try:
            wait_http(port, "/health", proc, 20)
            time.sleep(0.5)
            rss = mem_mb(proc.pid)["VmRSS"]
        except (RuntimeError, OSError, KeyError):
            rss = float("nan")
        finally:
            stop(proc)
    return rss


def pct(sorted_ms: list[float], q: float) -> float:
    if not sorted_ms:
        return float("nan")
    pos = q * (len(sorted_ms) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_ms) - 1)
    return sorted_ms[lo] + (sorted_ms[hi] - sorted_ms[lo]) * (pos - lo)


# ============================================================================================
# Runs
# ============================================================================================

@dataclass
class Target:
    name: str                 # "direct" | "ccm" | "ccm ledger off"
    port: int
    req: bytes
    want_model: str           # model the upstream must have received
    want_echo: str            # model the client must see in the answer
    pid: int = 0              # the ccm process behind port (0: direct to the fake)

    @property
    def via_ccm(self) -> bool:
        return self.name != "direct"


@dataclass
class RunResult:
    lat: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    wall: float = 0.0
    cpu_ccm: float = 0.0
    cpu_fake: float = 0.0
    cpu_client: float = 0.0
    reconnects: int = 0
    upstream_conns: int = 0   # TCP connections the fake upstream accepted during the timed run

    def p(self, q: float) -> float:
        return pct(sorted(self.lat), q)

    def add(self, other: RunResult) -> None:
        """Fold another run of the same target into this one (alternating rounds)."""
        self.lat += other.lat
        self.errors += other.errors
        self.first_error = self.first_error or other.first_error
        self.wall += other.wall
        self.cpu_ccm += other.cpu_ccm
        self.cpu_fake += other.cpu_fake
        self.cpu_client += other.cpu_client
        self.reconnects += other.reconnects
        self.upstream_conns += other.upstream_conns

    @property
    def n(self) -> int:
        return len(self.lat)


class Bench:
    def __init__(self, fake_port: int, ccm_port: int, fake_pid: int, ccm_pid: int) -> None:
        self.fake_port, self.ccm_port = fake_port, ccm_port
        self.fake_pid, self.ccm_pid = fake_pid, ccm_pid
        self.problems: list[str] = []
        self.frames: dict[tuple[str, str], float] = {}
        self.sconn = Conn(fake_port)                 # one kept-open connection for /__stats

    async def call(self, conn: Conn, t: Target, kind: str, res: RunResult) -> None:
        t0 = time.perf_counter()
        try:
            rep = await conn.request(t.req)
        except HTTPFailure as exc:
            res.errors += 1
            res.first_error = res.first_error or f"{t.name}: {exc}"
            return
        res.lat.append((time.perf_counter() - t0) * 1000)
        if not quick_ok(kind, rep, t.via_ccm):
            res.errors += 1
            res.first_error = res.first_error or \
                f"{t.name}: status {rep.status}, body tail {rep.body[-300:]!r}"

    async def warm(self, kind: str, t: Target, n: int) -> None:
        conn = Conn(t.port)
        try:
            for _ in range(n):
                try:
                    rep = await conn.request(t.req)
                except HTTPFailure as exc:
                    self.problems.append(f"{kind} {t.name}: {exc}")
                    return
                why = check_reply(kind, rep, t.want_model, t.via_ccm, t.want_echo)
                if why:
                    self.problems.append(f"{kind} via {t.name}: {why}")
                    return
                self.frames[(kind, t.name)] = rep.frames
        finally:
            conn.close()

    async def _meters(self, pid: int) -> tuple[float, float, float, int]:
        c = os.times()
        conns = (await self.stats())["connections"]
        return (cpu_seconds(pid) if pid else 0.0), cpu_seconds(self.fake_pid), c.user + c.system, conns

    async def _close_meters(self, res: RunResult, pid: int, start: tuple[float, ...], t0: float,
                            settle_s: float = 0.0) -> None:
        """settle_s: wait before reading the CPU meters (not the wall clock) so that work ccm
        does after the last answer (the ledger's commit, at most LEDGER_FLUSH_S later) counts;
        the run waited as long before its first meters, so no earlier commit counts."""
        res.wall = time.perf_counter() - t0
        if settle_s:
            await asyncio.sleep(settle_s)
        end = await self._meters(pid)
        res.cpu_ccm, res.cpu_fake, res.cpu_client, res.upstream_conns = \
            (e - s for e, s in zip(end, start))

    async def c1(self, kind: str, targets: list[Target], n: int,
                 settle_s: float = 0.0) -> list[RunResult]:
        """Concurrency 1, the targets interleaved (every order in turn: ABBA for two) so all see
        the same conditions. CPU and upstream connections are metered for the targets via ccm
        (each ccm process serves only its own target)."""
        conns = [Conn(t.port) for t in targets]
        results = [RunResult() for _ in targets]
        scratch = RunResult()
        orders = list(itertools.permutations(range(len(targets))))
        try:
            for _ in range(2):                       # open every connection untimed
                for conn, t in zip(conns, targets):
                    await self.call(conn, t, kind, scratch)
            await asyncio.sleep(settle_s)            # the untimed calls' ledger rows commit now
            starts = [await self._meters(t.pid) for t in targets]
            t0 = time.perf_counter()
            for i in range(n):
                for j in orders[i % len(orders)]:
                    await self.call(conns[j], targets[j], kind, results[j])
            wall = time.perf_counter() - t0
            for res, t, start in zip(results, targets, starts):
                if t.via_ccm:
                    await self._close_meters(res, t.pid, start, t0, settle_s)
                    settle_s = 0.0                   # one wait covers every process
            for res, conn in zip(results, conns):
                res.reconnects, res.wall = conn.reconnects, wall
        finally:
            for conn in conns:
                conn.close()
        self._setup_errors(kind, 1, scratch)
        return results

    def _setup_errors(self, kind: str, conc: int, scratch: RunResult) -> None:
        if scratch.errors:
            self.problems.append(f"{kind} c={conc}: {scratch.errors} errors while opening "
                                 f"connections (untimed), first: {scratch.first_error}")

    async def cn(self, kind: str, t: Target, n: int, conc: int, settle_s: float = 0.0) -> RunResult:
        conns = [Conn(t.port) for _ in range(conc)]
        res, scratch = RunResult(), RunResult()
        left = [n]

        async def worker(conn: Conn) -> None:
            for _ in range(n):                       # bounded; stops when the shared budget is spent
                if left[0] <= 0:
                    return
                left[0] -= 1
                await self.call(conn, t, kind, res)
        try:
            await asyncio.gather(*(self.call(c, t, kind, scratch) for c in conns))
            await asyncio.gather(*(self.call(c, t, kind, scratch) for c in conns))
            await asyncio.sleep(settle_s)            # the untimed calls' ledger rows commit now
            start = await self._meters(t.pid)
            t0 = time.perf_counter()
            await asyncio.gather(*(worker(c) for c in conns))
            await self._close_meters(res, t.pid, start, t0, settle_s)
            res.reconnects = sum(c.reconnects for c in conns)
        finally:
            for c in conns:
                c.close()
        self._setup_errors(kind, conc, scratch)
        return res

    async def stats(self) -> dict[str, Any]:
        return json.loads((await self.sconn.request(get_request(self.fake_port, "/__stats"))).body)


# ============================================================================================
# Process management
# ============================================================================================

from procs import die_with_parent as _die_with_parent, free_port, stop, wait_http  # noqa: E402


def write_config(path: str, port: int, fake: int, usage_db: str, ledger: bool) -> None:
    with open(path, "w") as f:
        f.write(f"""[server]
host = "127.0.0.1"
port = {port}
log_level = "warn"

[usage]
enabled = {'true' if ledger else 'false'}
database = "{usage_db}"

[router]
default = "m"

[[providers]]
name = "fa"
provider_type = "anthropic"
base_url = "http://127.0.0.1:{fake}"
api_key = "{PROVIDER_KEY}"

[[providers]]
name = "fo"
provider_type = "openai"
base_url = "http://127.0.0.1:{fake}/v1"
api_key = "{PROVIDER_KEY}"

[[providers]]
name = "fg"
provider_type = "gemini"
base_url = "http://127.0.0.1:{fake}"
api_key = "{PROVIDER_KEY}"

[[models]]
name = "m"
[[models.mappings]]
priority = 1
provider = "fa"
actual_model = "bench-model"

[[models]]
name = "o"
[[models.mappings]]
priority = 1
provider = "fo"
actual_model = "gpt-bench"

[[models]]
name = "g"
[[models.mappings]]
priority = 1
provider = "fg"
actual_model = "{GEMINI_MODEL}"
""")


# ============================================================================================
# Main
# ============================================================================================

PATHS = ["anthropic json", "anthropic stream", "openai json", "openai stream", "gemini json",
         "gemini stream"]
LEDGER_PATH = "anthropic json"                # the path the ledger on/off comparison uses
LEDGER_SETTLE_S = 1.2     # > ccm's LEDGER_FLUSH_S (1 s): each metered window holds its own commits
TARGET_ADDED_P50_MS = 1.0
TARGET_CPU_MS = 1.0
TARGET_IDLE_RSS_MB = 30.0


def targets_for(kind: str, fake: int, ccm: int, pid: int,
                name: str = "ccm") -> tuple[Target, Target]:
    stream = kind.endswith("stream")
    if kind.startswith("anthropic"):
        body = json.dumps(claude_code_body("claude-opus-4-8", stream)).encode()
        path = "/v1/messages?beta=true"
        direct = Target("direct", fake, build_request(fake, path, claude_code_headers(PROVIDER_KEY), body),
                        "claude-opus-4-8", "claude-opus-4-8")
        via = Target(name, ccm, build_request(ccm, path, claude_code_headers(CLIENT_KEY), body),
                     "bench-model", "bench-model", pid)
        return direct, via
    if kind.startswith("gemini"):
        ant = claude_code_body("g", stream)
        action = ":streamGenerateContent?alt=sse" if stream else ":generateContent"
        gheaders = {"accept": "*/*", "content-type": "application/json",
                    "x-goog-api-key": PROVIDER_KEY, "user-agent": GEMINI_AGENT,
                    "x-goog-api-client": GEMINI_AGENT, "connection": "keep-alive"}
        direct = Target("direct", fake, build_request(
            fake, f"/v1beta/models/{GEMINI_MODEL}{action}", gheaders,
            json.dumps(gemini_equivalent(ant)).encode()), GEMINI_MODEL, GEMINI_MODEL)
        via = Target(name, ccm, build_request(ccm, "/v1/messages?beta=true",
                                              claude_code_headers(CLIENT_KEY), json.dumps(ant).encode()),
                     GEMINI_MODEL, "g", pid)
        return direct, via
    ant = claude_code_body("o", stream)
    obody = json.dumps(openai_equivalent(ant, "gpt-bench")).encode()
    oheaders = {"accept": "application/json", "content-type": "application/json",
                "authorization": f"Bearer {PROVIDER_KEY}", "user-agent": "OpenAI/Python 1.99.0",
                "connection": "keep-alive"}
    direct = Target("direct", fake, build_request(fake, "/v1/chat/completions", oheaders, obody),
                    "gpt-bench", "gpt-bench")
    via = Target(name, ccm, build_request(ccm, "/v1/messages?beta=true",
                                          claude_code_headers(CLIENT_KEY), json.dumps(ant).encode()),
                 "gpt-bench", "o", pid)
    return direct, via


def ccm_digest() -> str:
    with open(CCM_PY, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:12]


def _direct_key(stats_key: str) -> bool:
    """A fake-upstream counter key of a direct (baseline) request, by its user-agent."""
    return stats_key.endswith((" OpenAI", " " + GEMINI_AGENT.split("/")[0]))


def _ms(r: RunResult, q: float = .5) -> float:
    return r.p(q)


def _cpu_ms(r: RunResult) -> float:
    return r.cpu_ccm * 1000 / r.n if r.n else float("nan")


def report_ledger(lrows: LedgerRows, sent_on: int, rows_on: int, why_on: str, off_db: str,
                  settle_s: float) -> None:
    w = print
    w(f"usage ledger on the request path ({LEDGER_PATH}; the same ccm config with `[usage] "
      f"enabled = false` in a second process;")
    fence = (f"its window fenced by {settle_s:g} s waits for the ledger's commits" if settle_s
             else "no commit fences with --quick: +-1 commit per window")
    w(f"c=1 direct/on/off interleaved, c=16 alternating rounds; CPU includes the ledger's writer "
      f"thread, {fence}):")
    hdr = (f"  {'c':>2} {'ledger':<6} {'direct p50':>10} {'ccm p50':>8} {'added p50':>9} "
           f"{'ccm p99':>8} {'ccm CPU':>8} {'ccm rps':>8} {'errors':>6}")
    w(hdr)
    for c, rd, ron, roff in lrows:
        for name, r in (("on", ron), ("off", roff)):
            rps = f"{r.n / r.wall:.0f}" if c > 1 and r.wall else ""
            w(f"  {c:>2} {name:<6} {_ms(rd):>10.3f} {_ms(r):>8.3f} {_ms(r) - _ms(rd):>9.3f} "
              f"{_ms(r, .99):>8.3f} {_cpu_ms(r):>8.3f} {rps:>8} {rd.errors + r.errors:>6}")
    w("  ledger on minus off: " + "; ".join(
        f"c={c} CPU {_cpu_ms(ron) - _cpu_ms(roff):+.3f} ms/request, p50 {_ms(ron) - _ms(roff):+.3f} ms"
        for c, rd, ron, roff in lrows))
    verdict = "OK" if rows_on == sent_on and not why_on else "MISMATCH"
    w(f"  after SIGTERM: {rows_on} rows in the ledger-on ccm's usage.db for {sent_on} requests "
      f"it answered (every path, warm-ups included) -> {verdict}{' ' + why_on if why_on else ''}; "
      f"the ledger-off ccm's database {'exists (!)' if os.path.exists(off_db) else 'was never created'}")


def body_len(req: bytes) -> int:
    return len(req) - req.index(b"\r\n\r\n") - 4


@dataclass
class CCMProc:
    """One ccm process of the bench: the ledger-on one every path goes through, or the
    ledger-off one of the ledger comparison."""
    name: str
    port: int
    usage_db: str
    proc: subprocess.Popen[Any] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def alive(self) -> int | None:
        """None while running, else the exit status."""
        return self.proc.poll() if self.proc is not None else -1


LedgerRows = list[tuple[int, RunResult, RunResult, RunResult]]   # c, direct, ledger on, ledger off


async def ledger_phase(b: Bench, on: CCMProc, off: CCMProc, n1: int, n16: int, warm: int,
                       rounds: int, settle_s: float) -> LedgerRows:
    """LEDGER_PATH through the ledger-on and the ledger-off ccm: at c=1 interleaved with the
    direct baseline, at c=16 in alternating rounds (direct, on, off, then off, on, direct).
    CPU windows are fenced by settle_s on both sides (0 with --quick: then a window may hold
    one ledger commit too many or too few)."""
    direct, via_on = targets_for(LEDGER_PATH, b.fake_port, on.port, on.pid)
    _, via_off = targets_for(LEDGER_PATH, b.fake_port, off.port, off.pid, "ccm ledger off")
    await b.warm(LEDGER_PATH, via_off, warm)
    out: LedgerRows = [(1, *await b.c1(LEDGER_PATH, [direct, via_on, via_off], n1, settle_s))]
    acc = {t.name: RunResult() for t in (direct, via_on, via_off)}
    for r in range(rounds):
        order = (direct, via_on, via_off) if r % 2 == 0 else (via_off, via_on, direct)
        for t in order:
            acc[t.name].add(await b.cn(LEDGER_PATH, t, n16 // rounds, 16,
                                       settle_s if t.via_ccm else 0.0))
    out.append((16, acc[direct.name], acc[via_on.name], acc[via_off.name]))
    return out


def ledger_rows(db: str) -> tuple[int, str]:
    """(rows in the requests table, '' or why they could not be counted)."""
    if not os.path.exists(db):
        return 0, f"{db} does not exist"
    try:
        con = sqlite3.connect(db, timeout=10)
        try:
            return con.execute("SELECT COUNT(*) FROM requests").fetchone()[0], ""
        finally:
            con.close()
    except sqlite3.Error as exc:
        return 0, f"{db}: {exc!r}"


async def run(args: argparse.Namespace, fake_port: int, fake_pid: int, on: CCMProc,
              off: CCMProc, health: dict[str, Any]) -> int:
    quick = args.quick
    n1, n16, warm = (40, 200, 20) if quick else (400, 2000, 20)
    ccm_pid = on.pid
    b = Bench(fake_port, on.port, fake_pid, ccm_pid)
    mem_idle = mem_mb(ccm_pid)
    smaps_idle = smaps_mb(ccm_pid)
    mem_idle_off = mem_mb(off.pid)
    cpu_idle0 = cpu_seconds(ccm_pid)
    mem_after: dict[str, dict[str, float]] = {}
    rows: list[tuple[str, int, RunResult, RunResult]] = []
    sizes: dict[str, tuple[int, int]] = {}
    upstream_expected: dict[str, int] = {}
    t_start = time.perf_counter()
    for kind in PATHS:
        if on.alive() is not None:
            break                                    # ccm is gone; reported below
        sent0 = ANSWERED.get(on.port, 0)
        direct, via = targets_for(kind, fake_port, on.port, ccm_pid)
        sizes[kind] = (body_len(direct.req), body_len(via.req))
        await b.warm(kind, direct, warm)
        await b.warm(kind, via, warm)
        rd, rc = await b.c1(kind, [direct, via], n1)
        rows.append((kind, 1, rd, rc))
        rd16 = await b.cn(kind, direct, n16, 16)
        rc16 = await b.cn(kind, via, n16, 16)
        rows.append((kind, 16, rd16, rc16))
        mem_after[kind] = mem_mb(ccm_pid)
        upstream_expected[kind] = ANSWERED.get(on.port, 0) - sent0   # via-ccm requests sent
    lrows: LedgerRows = []
    if on.alive() is None and off.alive() is None:
        sent0 = ANSWERED.get(on.port, 0) + ANSWERED.get(off.port, 0)
        lrows = await ledger_phase(b, on, off, n1, n16, warm, *((1, 0.0) if quick
                                                                 else (2, LEDGER_SETTLE_S)))
        upstream_expected[LEDGER_PATH] += ANSWERED.get(on.port, 0) + ANSWERED.get(off.port, 0) - sent0
    elapsed = time.perf_counter() - t_start
    stats = await b.stats()
    mem_end = mem_mb(ccm_pid)
    exit_on, exit_off = on.alive(), off.alive()     # before the stop below
    stop(on.proc)                                    # SIGTERM: ccm flushes its ledger
    sent_on = ANSWERED.get(on.port, 0)
    rows_on, why_on = ledger_rows(on.usage_db)

    # ---------------------------------------------------------------- report
    w = print
    w("")
    w(f"ccm benchmark ({'--quick' if quick else 'full'}): {elapsed:.1f} s of measuring")
    w(f"python {platform.python_version()} ({platform.python_implementation()}) | nproc "
      f"{len(os.sched_getaffinity(0))} (cpu_count {os.cpu_count()}) | {platform.system()} "
      f"{platform.release()} | ccm {health.get('version', '?')} (ccm.py sha256 {ccm_digest()}) | "
      f"/proc tick {1000 / CLK_TCK:g} ms")
    w(f"requests: c=1 {n1} per target, direct/ccm interleaved; c=16 {n16} per target; "
      f"warm-up {warm} per target per path")
    w("bodies (bytes sent): " + "; ".join(
        f"{k}: direct {d:,} / to ccm {c:,}" for k, (d, c) in sizes.items()))
    up_sizes = stats.get("last_body_bytes", {})
    w("bodies ccm sent upstream: " + "; ".join(
        f"{k}: {v:,}" for k, v in sorted(up_sizes.items())
        if any(m in k for m in ("bench-model", "gpt-bench", GEMINI_MODEL)) and not _direct_key(k)))
    w("")
    hdr = (f"{'path':<17} {'c':>2} {'direct p50':>10} {'p99':>7} {'ccm p50':>8} {'p99':>7} "
           f"{'added p50':>9} {'p99':>7} {'direct rps':>10} {'ccm rps':>8} {'ccm CPU':>8} "
           f"{'up-conn':>7} {'errors':>6}")
    w("latency in ms; ccm CPU = ms of ccm utime+stime per request through ccm; up-conn = new TCP")
    w("connections ccm opened to the upstream per request (0 = keep-alive reused)")
    w(hdr)
    w("-" * len(hdr))
    for kind, c, rd, rc in rows:
        drps = rd.n / rd.wall if c > 1 and rd.wall else float("nan")
        crps = rc.n / rc.wall if c > 1 and rc.wall else float("nan")
        cpu = rc.cpu_ccm * 1000 / rc.n if rc.n else float("nan")
        w(f"{kind:<17} {c:>2} {rd.p(.5):>10.3f} {rd.p(.99):>7.3f} {rc.p(.5):>8.3f} "
          f"{rc.p(.99):>7.3f} {rc.p(.5) - rd.p(.5):>9.3f} {rc.p(.99) - rd.p(.99):>7.3f} "
          f"{'' if c == 1 else f'{drps:.0f}':>10} {'' if c == 1 else f'{crps:.0f}':>8} "
          f"{cpu:>8.3f} {rc.upstream_conns / max(rc.n, 1):>7.2f} {rd.errors + rc.errors:>6}")
    w("")
    w("where the CPU went during the c=16 runs through ccm (ms per request):")
    for kind, c, rd, rc in rows:
        if c == 16 and rc.n:
            w(f"  {kind:<17} ccm {rc.cpu_ccm * 1000 / rc.n:6.3f} | fake upstream "
              f"{rc.cpu_fake * 1000 / rc.n:6.3f} | bench client {rc.cpu_client * 1000 / rc.n:6.3f}"
              f" | ccm busy {100 * rc.cpu_ccm / rc.wall:3.0f}% of one core")
    w("chunked frames per stream response (the upstream sends one per SSE event): " + "; ".join(
        f"{k}: upstream {b.frames.get((k, 'direct'), 0)}, relayed by ccm {b.frames.get((k, 'ccm'), 0)}"
        for k in PATHS if k.endswith("stream")))
    w("")
    w(f"ccm memory (MB): idle after start VmRSS {mem_idle['VmRSS']:.1f} (VmHWM "
      f"{mem_idle['VmHWM']:.1f}; Pss {smaps_idle['Pss']:.1f}, private dirty "
      f"{smaps_idle['Private_Dirty']:.1f}, shared clean {smaps_idle['Shared_Clean']:.1f})")
    with tempfile.TemporaryDirectory(prefix="ccm-idle-") as idle_dir:
        rss_module = module_idle_rss(idle_dir)
    w(f"  started as `python -m ccm serve` from cached bytecode: idle VmRSS {rss_module:.1f}")
    w(f"  for scale, a bare `python -c ...` here has VmRSS {bare_python_rss([]):.1f}, with -S "
      f"(no site-packages .pth) {bare_python_rss(['-S']):.1f}")
    for kind, m in mem_after.items():
        w(f"  after {kind:<17} VmRSS {m['VmRSS']:6.1f}  VmHWM {m['VmHWM']:6.1f}")
    w(f"  at the end              VmRSS {mem_end['VmRSS']:6.1f}  VmHWM {mem_end['VmHWM']:6.1f}")
    w(f"  the ledger-off ccm (`[usage] enabled = false`) idle after start: VmRSS "
      f"{mem_idle_off['VmRSS']:.1f} (VmHWM {mem_idle_off['VmHWM']:.1f})")
    w(f"ccm CPU from start to the first request: {cpu_idle0 * 1000:.0f} ms")
    w("")
    w("upstream calls per request through ccm (1.00 = no retries):")
    by_key = stats.get("by_key", {})
    got_a = sum(v for k, v in by_key.items() if k.startswith("/v1/messages bench-model"))
    got_o = sum(v for k, v in by_key.items() if k.startswith("/v1/chat/completions gpt-bench")
                and not _direct_key(k))
    got_g = sum(v for k, v in by_key.items() if k.startswith(f"/v1beta/models/{GEMINI_MODEL}:")
                and not _direct_key(k))
    sent_a = upstream_expected.get("anthropic json", 0) + upstream_expected.get("anthropic stream", 0)
    sent_o = upstream_expected.get("openai json", 0) + upstream_expected.get("openai stream", 0)
    sent_g = upstream_expected.get("gemini json", 0) + upstream_expected.get("gemini stream", 0)
    w(f"  anthropic: {got_a / max(sent_a, 1):.2f} ({got_a} upstream / {sent_a} sent, both ccm "
      f"processes); openai: {got_o / max(sent_o, 1):.2f} ({got_o} upstream / {sent_o} sent); "
      f"gemini: {got_g / max(sent_g, 1):.2f} ({got_g} upstream / {sent_g} sent); "
      f"rejected credentials at the fake: {stats.get('bad_auth')}")
    w("")
    report_ledger(lrows, sent_on, rows_on, why_on, off.usage_db, 0.0 if quick else LEDGER_SETTLE_S)
    w("")
    c1 = {kind: (rd, rc) for kind, c, rd, rc in rows if c == 1}
    added = [rc.p(.5) - rd.p(.5) for rd, rc in c1.values()]
    cpu_all = [rc.cpu_ccm * 1000 / rc.n if rc.n else float("nan") for _, _, _, rc in rows]

    def verdict(values: list[float], limit: float) -> str:
        return "PASS" if values and all(v < limit for v in values) else "FAIL"   # nan fails
    w("targets:")
    w(f"  p50 added latency at c=1 < {TARGET_ADDED_P50_MS:g} ms : " + ", ".join(
        f"{k} {rc.p(.5) - rd.p(.5):.3f}" for k, (rd, rc) in c1.items()) +
      f"  -> {verdict(added, TARGET_ADDED_P50_MS)}")
    w(f"  ccm CPU < {TARGET_CPU_MS:g} ms/request          : " + ", ".join(
        f"{kind} c={c} {v:.2f}" for (kind, c, _, _), v in zip(rows, cpu_all)) +
      f"  -> {verdict(cpu_all, TARGET_CPU_MS)}")
    w(f"  idle RSS < {TARGET_IDLE_RSS_MB:g} MB                 : python ccm.py {mem_idle['VmRSS']:.1f}"
      f"  -> {verdict([mem_idle['VmRSS']], TARGET_IDLE_RSS_MB)}; python -m ccm {rss_module:.1f}"
      f"  -> {verdict([rss_module], TARGET_IDLE_RSS_MB)}")

    notes = []
    for kind, c, rd, rc in rows:
        if rc.n and rc.upstream_conns / rc.n > 0.05:
            notes.append(f"{kind} c={c}: ccm opened {rc.upstream_conns} new upstream connections for "
                         f"{rc.n} requests (keep-alive to the upstream not reused)")
    if notes:
        w("")
        w("NOTES:")
        for note in notes:
            w(f"  {note}")
    problems = list(b.problems)
    for proc, status in ((on, exit_on), (off, exit_off)):
        if status is not None:
            problems.append(f"{proc.name} exited during the run with status {status}")
    named = [(f"{kind} c={c}", (("direct", rd), ("ccm", rc))) for kind, c, rd, rc in rows]
    named += [(f"ledger comparison {LEDGER_PATH} c={c}",
               (("direct", rd), ("ccm", ron), ("ccm ledger off", roff)))
              for c, rd, ron, roff in lrows]
    for where, results in named:
        for name, r in results:
            if r.errors:
                problems.append(f"{where} {name}: {r.errors} errors, first: {r.first_error}")
            if r.reconnects:
                problems.append(f"{where} {name}: {r.reconnects} reconnects (server closed "
                                f"a keep-alive connection)")
    if why_on or rows_on != sent_on:
        problems.append(f"the ledger holds {rows_on} rows for {sent_on} requests answered by the "
                        f"ledger-on ccm {why_on}".rstrip())
    if os.path.exists(off.usage_db):
        problems.append(f"the ledger-off ccm created {off.usage_db}")
    if got_a != sent_a or got_o != sent_o or got_g != sent_g:
        problems.append(f"upstream call counts differ from requests sent: {by_key}")
    if stats.get("bad_auth"):
        problems.append(f"the fake rejected {stats['bad_auth']} requests' credentials")
    if problems:
        w("")
        w("PROBLEMS:")
        for p in problems:
            w(f"  {p}")
    return 1 if problems else 0


def start_ccm(p: CCMProc, tmp: str, fake_port: int, ledger: bool) -> str:
    """Start one ccm process on p.port; '' when it answers /health, else why not."""
    cfg = os.path.join(tmp, f"{p.name.replace(' ', '-')}.toml")
    write_config(cfg, p.port, fake_port, p.usage_db, ledger)
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    log_path = cfg[:-5] + ".stderr"
    with open(log_path, "wb") as log:
        p.proc = subprocess.Popen([sys.executable, CCM_PY, "-c", cfg, "serve"], stdin=subprocess.DEVNULL,
                                  stdout=log, stderr=log, env=env, cwd=tmp,
                                  preexec_fn=_die_with_parent)
    try:
        wait_http(p.port, "/health", p.proc, 20)
    except RuntimeError as exc:
        with open(log_path, errors="replace") as f:
            return f"{p.name} did not come up: {exc}\n{f.read()[-4000:]}"
    return ""


def log_problems(tmp: str, p: CCMProc) -> list[str]:
    with open(os.path.join(tmp, f"{p.name.replace(' ', '-')}.stderr"), errors="replace") as f:
        return [f"{p.name}: {ln.rstrip()}" for ln in f
                if " WARNING " in ln or " ERROR " in ln or "Traceback" in ln]


def main_bench(args: argparse.Namespace) -> int:
    fake = None
    tmp = tempfile.TemporaryDirectory(prefix="ccm-bench-")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    on = CCMProc("ccm", free_port(), os.path.join(tmp.name, "usage.db"))
    off = CCMProc("ccm ledger off", free_port(), os.path.join(tmp.name, "usage-off.db"))
    rc = 1
    try:
        fake_port = free_port()
        fake = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--fake-upstream",
                                 str(fake_port)], stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent)
        wait_http(fake_port, "/__stats", fake, 15)
        for p, ledger in ((on, True), (off, False)):
            why = start_ccm(p, tmp.name, fake_port, ledger)
            if why:
                print(why, file=sys.stderr)
                return 1
        health = wait_http(on.port, "/health", on.proc, 5)
        time.sleep(0.5)                              # let startup settle before the idle reading
        try:
            rc = asyncio.run(asyncio.wait_for(run(args, fake_port, fake.pid, on, off, health),
                                              timeout=600))
        except asyncio.TimeoutError:
            print("bench: gave up after 600 s", file=sys.stderr)
            rc = 1
        stop(off.proc)
        lines = log_problems(tmp.name, on) + log_problems(tmp.name, off)
        print(f"\nccm stderr: {len(lines)} warning/error lines" +
              "".join(f"\n  {ln[:300]}" for ln in lines[:10]))
        if lines:
            rc = 1
    finally:
        stop(on.proc)
        stop(off.proc)
        stop(fake)
        tmp.cleanup()
    return rc


def main() -> int:
    ap = argparse.ArgumentParser(description="Benchmark ccm against a fake upstream on 127.0.0.1.")
    ap.add_argument("--quick", action="store_true", help="10x fewer requests (smoke run)")
    ap.add_argument("--fake-upstream", type=int, metavar="PORT",
                    help="(internal) run the fake upstream on PORT")
    args = ap.parse_args()
    if args.fake_upstream is not None:
        return run_fake_upstream(args.fake_upstream)
    return main_bench(args)


if __name__ == "__main__":
    sys.exit(main())
