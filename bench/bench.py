#!/usr/bin/env python3
"""Benchmark ccm: the latency, CPU and memory it adds between a client and an upstream,
against a bare httpx relay (the naive floor) on the same exchange.

    python bench/bench.py            # full run (~3 min on 2 cores)
    python bench/bench.py --quick    # smoke run (~40 s)

What it does (everything on 127.0.0.1):
  * starts a fast fake upstream in a subprocess (`bench.py --fake-upstream PORT`): a raw asyncio
    HTTP/1.1 keep-alive server answering POST /v1/messages (Anthropic JSON or SSE),
    POST /v1/chat/completions (OpenAI JSON or chunk stream ending with `data: [DONE]`) and
    POST /v1beta/models/M:generateContent / :streamGenerateContent?alt=sse (Gemini); a stream
    for the model `bench-hold` stops after content_block_start until GET /__release (25 s at
    most);
  * starts a bare relay (`bench.py --bare-relay PORT UPSTREAM_PORT`): a stdlib asyncio server
    and one shared httpx.AsyncClient that forwards method, path, headers and body unchanged
    and relays status, headers and body (SSE streamed through chunk by chunk);
  * writes a temp config with an Anthropic provider `fa`, an OpenAI provider `fo` and a Gemini
    provider `fg`, all pointing at the fake, and starts `python ccm.py -c CONFIG serve`;
  * sends a ~30 KB Claude Code request (3 system blocks, 16 tools with nested schemas,
    tool_use/tool_result turns) with a minimal raw asyncio keep-alive client straight to the
    fake, through the bare relay (the direct baseline body) and through ccm, for six paths
    (anthropic json/stream, openai- and gemini-translated json/stream), at c=1 (interleaved)
    and c=16; TTFB (first body byte) of the stream paths at c=1;
  * compares the usage ledger on and off (a second ccm, `[usage] enabled = false`) on the
    anthropic json path, and after SIGTERM counts the ledger's rows against the requests;
  * compares `serve --workers 2` with one worker at c=64 (skipped when ccm has no --workers);
  * starts a fresh ccm for memory: idle, after 1,000 openai json requests (no count_tokens),
    with 500 concurrent open streams and after they end;
  * reports p50/p99 latency, the latency ccm and the relay add, requests/s, CPU per request
    (/proc/PID/stat utime+stime), RSS (VmRSS/VmHWM), and the targets as PASS/FAIL.

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
HOLD_MODEL = "bench-hold"     # the fake sends message_start and content_block_start, then holds
                              # the stream until released (ccm sends nothing to the client before
                              # the first content_block_start: until then it can still fail over)
HOLD_MAX = 2000               # streams the fake holds at once at most
HOLD_MAX_S = 25.0             # a held stream is released after this long (< REQUEST_TIMEOUT_S)


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
                             "last_body_bytes": {}, "held": 0, "held_max": 0, "released": 0}
    held: dict[int, tuple[Any, list[bytes]]] = {}    # held streams: id -> (transport, rest)
    hold_ids = itertools.count()

    def hold(self, rest: list[bytes]) -> None:
        """Keep the rest of a stream until GET /__release, or HOLD_MAX_S at most."""
        hid = next(self.hold_ids)
        self.held[hid] = (self.transport, rest)
        self.stats["held"] = len(self.held)
        self.stats["held_max"] = max(self.stats["held_max"], len(self.held))
        asyncio.get_running_loop().call_later(HOLD_MAX_S, self.release, [hid])

    @classmethod
    def release(cls, ids: list[int]) -> int:
        n = 0
        for hid in ids:
            transport, rest = cls.held.pop(hid, (None, []))
            if transport is not None and not transport.is_closing():
                transport.write(b"".join(rest))
                n += 1
        cls.stats["held"] = len(cls.held)
        cls.stats["released"] += n
        return n

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
        if method == "GET" and path == "/__release":
            return _json_response({"released": self.release(list(self.held))})
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
        if model == HOLD_MODEL and stream and len(self.held) < HOLD_MAX:
            self.hold(out[2:])                       # head, message_start, content_block_start go
            return out[:2]
        return out


async def _serve_until_orphaned(server: Any) -> None:
    """Say READY with the port, then serve until the bench (the parent) is gone; bounded."""
    print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
    parent = os.getppid()
    for _ in range(3600):                            # bounded life: 30 min, or until orphaned
        await asyncio.sleep(0.5)
        if os.getppid() != parent:
            break
    server.close()


def run_fake_upstream(port: int) -> int:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(FakeUpstream, HOST, port, backlog=1024,
                                          reuse_address=True)
        await _serve_until_orphaned(server)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        asyncio.run(main())
    except (KeyboardInterrupt, SystemExit):
        pass
    return 0


# ============================================================================================
# Bare httpx relay (runs in its own process): the naive floor ccm is compared with
# ============================================================================================

# Hop-by-hop and framing headers the relay does not copy (RFC 9110 7.6.1); it frames the
# response itself. Everything else goes through unchanged, both ways.
_RELAY_SKIP = {b"host", b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
               b"transfer-encoding", b"upgrade", b"content-length"}


async def _relay_one(client: Any, upstream: str, head: bytes, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> bool:
    """Forward one request and relay its response; False when the connection must close."""
    lines = head[:-4].split(b"\r\n")
    method, target, _ = lines[0].decode("latin-1").split(" ", 2)
    headers, n, close = [], 0, False
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        k, v = k.strip().lower(), v.strip()
        if k == b"content-length":
            n = int(v)
        elif k == b"connection":
            close = v.lower() == b"close"
        elif k not in _RELAY_SKIP:
            headers.append((k, v))
    body = await reader.readexactly(n) if n else b""
    req = client.build_request(method, upstream + target, headers=headers, content=body)
    resp = await client.send(req, stream=True)
    try:
        out = [b"HTTP/1.1 %d %s\r\n" % (resp.status_code, resp.reason_phrase.encode())]
        out += [k + b": " + v + b"\r\n" for k, v in resp.headers.raw if k.lower() not in _RELAY_SKIP]
        if resp.headers.get("content-type", "").startswith("text/event-stream"):
            writer.write(b"".join(out) + b"transfer-encoding: chunked\r\n\r\n")
            async for piece in resp.aiter_raw():      # each piece as it arrives
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
        else:
            data = await resp.aread()
            writer.write(b"".join(out) + b"content-length: %d\r\n\r\n" % len(data) + data)
    finally:
        await resp.aclose()
    await writer.drain()
    return not close


def run_bare_relay(port: int, upstream_port: int) -> int:
    import httpx

    async def main() -> None:
        upstream = f"http://{HOST}:{upstream_port}"
        client = httpx.AsyncClient(timeout=httpx.Timeout(REQUEST_TIMEOUT_S), trust_env=False,
                                   limits=httpx.Limits(max_connections=None,
                                                       max_keepalive_connections=64))

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                for _ in range(10_000_000):          # bounded: requests per connection
                    try:
                        head = await reader.readuntil(b"\r\n\r\n")
                    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                        return
                    try:
                        if not await _relay_one(client, upstream, head, reader, writer):
                            return
                    except httpx.HTTPError as exc:
                        msg = f"bare relay: {exc!r}".encode()
                        writer.write(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: %d\r\n"
                                     b"connection: close\r\n\r\n%s" % (len(msg), msg))
                        return
            except (ConnectionError, asyncio.IncompleteReadError, ValueError):
                return
            finally:
                writer.close()
        server = await asyncio.start_server(handle, HOST, port, backlog=1024, limit=MAX_HEAD,
                                            reuse_address=True)
        await _serve_until_orphaned(server)
        await client.aclose()
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
    t_first: float = 0.0      # perf_counter when the first chunk (the first SSE event) arrived


class Conn:
    """One keep-alive connection; reconnects (and resends once) if the server closed it idle."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.r: asyncio.StreamReader | None = None
        self.w: asyncio.StreamWriter | None = None
        self.used = False
        self.reconnects = 0
        self.expired = False
        self.on_first: Any = None   # called when a chunked body's first chunk arrives

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
                t_first = 0.0
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
                    if not frames:
                        t_first = time.perf_counter()
                        if self.on_first is not None:
                            self.on_first()
                else:
                    raise HTTPFailure("too many chunks")
                body = bytes(body)
                if headers.get("connection", "").lower() == "close":
                    self.close()
                return Reply(status, headers, body, frames, t_first)
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

def _arr(items: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return {"type": "array", "items": items, **kw}


def _obj(props: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": required,
            "additionalProperties": False}


_STR, _NUM, _BOOL = {"type": "string"}, {"type": "number"}, {"type": "boolean"}

# Claude Code's 16 tools; a property is a JSON-schema type name or a whole (nested) schema:
# MultiEdit and TodoWrite take arrays of objects, AskUserQuestion an array of objects that
# hold an array of objects, WebSearch arrays of strings, several enums.
TOOLS: list[tuple[str, dict[str, Any]]] = [
    ("Task", {"description": "string", "prompt": "string", "subagent_type": "string"}),
    ("Bash", {"command": "string", "timeout": "number", "description": "string",
              "run_in_background": "boolean"}),
    ("Glob", {"pattern": "string", "path": "string"}),
    ("Grep", {"pattern": "string", "path": "string", "glob": "string",
              "output_mode": {"type": "string", "enum": ["content", "files_with_matches", "count"]},
              "-i": "boolean", "head_limit": "number"}),
    ("ExitPlanMode", {"plan": "string"}),
    ("Read", {"file_path": "string", "offset": "number", "limit": "number"}),
    ("Edit", {"file_path": "string", "old_string": "string", "new_string": "string",
              "replace_all": "boolean"}),
    ("MultiEdit", {"file_path": "string", "edits": _arr(_obj(
        {"old_string": _STR, "new_string": _STR, "replace_all": dict(_BOOL, default=False)},
        ["old_string", "new_string"]), minItems=1)}),
    ("Write", {"file_path": "string", "content": "string"}),
    ("NotebookEdit", {"notebook_path": "string", "cell_id": "string", "new_source": "string",
                      "cell_type": {"type": "string", "enum": ["code", "markdown"]},
                      "edit_mode": {"type": "string", "enum": ["replace", "insert", "delete"]}}),
    ("WebFetch", {"url": {"type": "string", "format": "uri"}, "prompt": "string"}),
    ("TodoWrite", {"todos": _arr(_obj(
        {"content": dict(_STR, minLength=1),
         "status": {"type": "string", "enum": ["pending", "in_progress", "completed"]},
         "activeForm": dict(_STR, minLength=1)}, ["content", "status", "activeForm"]))}),
    ("WebSearch", {"query": dict(_STR, minLength=2), "allowed_domains": _arr(_STR),
                   "blocked_domains": _arr(_STR)}),
    ("BashOutput", {"bash_id": "string", "filter": "string"}),
    ("KillShell", {"shell_id": "string"}),
    ("AskUserQuestion", {"questions": _arr(_obj(
        {"question": _STR, "header": _STR,
         "options": _arr(_obj({"label": _STR, "description": _STR}, ["label", "description"]),
                         minItems=2, maxItems=4),
         "multiSelect": _BOOL}, ["question", "header", "options", "multiSelect"]),
        minItems=1, maxItems=4)}),
]


def _tool(name: str, props: dict[str, Any]) -> dict[str, Any]:
    desc = (f"{name}: performs the {name} operation for the agent. Usage notes: " + LOREM * 3)[:600]
    properties: dict[str, Any] = {}
    for p, typ in props.items():
        schema = {"type": typ} if isinstance(typ, str) else json.loads(json.dumps(typ))
        schema["description"] = f"The {p.replace('_', ' ')} to use"
        properties[p] = schema
    return {"name": name, "description": desc, "input_schema": {
        "type": "object", "properties": properties, "required": [next(iter(props))],
        "additionalProperties": False, "$schema": "http://json-schema.org/draft-07/schema#"}}


def claude_code_body(model: str, stream: bool) -> dict[str, Any]:
    prompt = ("You are an interactive CLI tool that helps users with software engineering "
              "tasks. Use the instructions below and the tools available to you to assist "
              "the user.\n\n# Doing tasks\n" + LOREM * 40)[:6656]
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


TREE_PIDS: set[int] = set()   # processes metered with all their descendants (ccm --workers)


def proc_tree(pid: int) -> list[int]:
    """pid and its descendants, found by scanning /proc for PPid (this kernel may lack
    /proc/PID/task/TID/children)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [pid]
    for _ in range(10_000):                          # bounded walk
        if not todo:
            break
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def cpu_of(pid: int) -> float:
    """CPU seconds of pid, summed over its descendants when it is a supervisor."""
    if pid in TREE_PIDS:
        return sum(cpu_seconds(p) for p in proc_tree(pid))
    return cpu_seconds(pid)


def machine_cpu() -> tuple[float, float, float]:
    """(busy CPU-seconds of the whole machine, of which stolen by the hypervisor, CPU-seconds of
    this bench and every process it started, exited ones included) since boot."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    busy = (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / CLK_TCK   # user nice system irq softirq steal
    t = os.times()
    ours = sum(cpu_seconds(p) for p in proc_tree(os.getpid()) if p != os.getpid())
    return busy, v[7] / CLK_TCK, ours + t.user + t.system + t.children_user + t.children_system


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def maps_mention(pid: int, word: str) -> bool:
    """Whether a file mapped into pid names word (e.g. tiktoken's extension module)."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return any(word in line for line in f)
    except OSError:
        return False


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
    name: str                 # "direct" | "bare relay" | "ccm" | "ccm ledger off" | "ccm ..."
    port: int
    req: bytes
    want_model: str           # model the upstream must have received
    want_echo: str            # model the client must see in the answer
    pid: int = 0              # the relay or ccm process behind port (0: direct to the fake)

    @property
    def via_ccm(self) -> bool:
        """ccm answers in Anthropic's format; direct and the bare relay in the upstream's."""
        return self.name.startswith("ccm")


@dataclass
class RunResult:
    lat: list[float] = field(default_factory=list)
    ttfb: list[float] = field(default_factory=list)   # ms to the first chunk, streams only
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
        self.ttfb += other.ttfb
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
        if rep.t_first:
            res.ttfb.append((rep.t_first - t0) * 1000)
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
        return (cpu_of(pid) if pid else 0.0), cpu_seconds(self.fake_pid), c.user + c.system, conns

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
        the same conditions. CPU and upstream connections are metered for the targets with a
        process (the relay, ccm: each serves only its own target; upstream connections are
        counted at the fake, so at c=1 each window holds every relay's)."""
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
                if t.pid:
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

    async def release(self) -> int:
        """Let the fake finish every stream it holds."""
        rep = await self.sconn.request(get_request(self.fake_port, "/__release"))
        return json.loads(rep.body)["released"]


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

[[models]]
name = "h"
[[models.mappings]]
priority = 1
provider = "fa"
actual_model = "{HOLD_MODEL}"
""")


# ============================================================================================
# Main
# ============================================================================================

PATHS = ["anthropic json", "anthropic stream", "openai json", "openai stream", "gemini json",
         "gemini stream"]
TRANSLATED = [k for k in PATHS if not k.startswith("anthropic")]
STREAMS = [k for k in PATHS if k.endswith("stream")]
LEDGER_PATH = "anthropic json"                # the path the ledger on/off comparison uses
LEDGER_SETTLE_S = 1.2     # > ccm's LEDGER_FLUSH_S (1 s): each metered window holds its own commits
WORKERS_PATH = "anthropic json"               # the path of the --workers comparison
WORKERS_C = 64
RSS_PATH = "openai json"                      # the translated requests of the memory phase
TARGET_CPU_RATIO = 0.8         # ccm CPU per translated request / the bare relay's, c=1 and c=16
TARGET_TTFB_MS = 0.5           # added TTFB at c=1: ccm's minus the bare relay's
TARGET_RSS_GROWTH_MB = 10.0    # VmRSS after 1,000 translated requests minus idle
TARGET_IDLE_MODULE_MB = 30.0   # idle VmRSS as `python -m ccm serve`
TARGET_IDLE_SCRIPT_MB = 40.0   # idle VmRSS as `python ccm.py serve`
TARGET_WORKERS_RATIO = 1.7     # --workers 2 rps / one worker's at c=64


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


def bare_target(direct: Target, port: int, pid: int) -> Target:
    """The direct request (the upstream's own body, headers and credential), sent to the bare
    relay, which forwards it unchanged: the same upstream exchange ccm makes, minus ccm."""
    return Target("bare relay", port, direct.req, direct.want_model, direct.want_echo, pid)


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


def _rps(r: RunResult) -> float:
    return r.n / r.wall if r.wall else float("nan")


def _ttfb(r: RunResult, q: float = .5) -> float:
    return pct(sorted(r.ttfb), q)


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
    """One ccm process of the bench: the ledger-on one every path goes through, the ledger-off
    one of the ledger comparison, the `--workers 2` one, or the fresh one of the memory phase."""
    name: str
    port: int
    usage_db: str
    proc: subprocess.Popen[Any] | None = None
    extra: list[str] = field(default_factory=list)    # after `serve`, e.g. --workers 2

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def alive(self) -> int | None:
        """None while running, else the exit status."""
        return self.proc.poll() if self.proc is not None else -1


@dataclass
class Ctx:
    """The processes and directory of one bench run."""
    tmp: str
    fake_port: int
    fake_pid: int
    relay_port: int
    relay_pid: int
    on: CCMProc
    off: CCMProc
    health: dict[str, Any]
    extra_procs: list[CCMProc] = field(default_factory=list)   # started during run()


LedgerRows = list[tuple[int, RunResult, RunResult, RunResult]]   # c, direct, ledger on, ledger off
Row = tuple[str, int, RunResult, RunResult, RunResult]            # path, c, direct, bare, ccm


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


@dataclass
class PathsOut:
    rows: list[Row] = field(default_factory=list)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    mem_after: dict[str, dict[str, float]] = field(default_factory=dict)
    upstream_expected: dict[str, int] = field(default_factory=dict)   # via-ccm requests by path


async def paths_phase(b: Bench, ctx: Ctx, n1: int, n16: int, warm: int, out: PathsOut) -> None:
    """Each path: direct, bare relay and ccm at c=1 interleaved (every order in turn), then
    each at c=16."""
    on = ctx.on
    for kind in PATHS:
        if on.alive() is not None:
            break                                    # ccm is gone; reported below
        sent0 = ANSWERED.get(on.port, 0)
        direct, via = targets_for(kind, ctx.fake_port, on.port, on.pid)
        bare = bare_target(direct, ctx.relay_port, ctx.relay_pid)
        out.sizes[kind] = (body_len(direct.req), body_len(via.req))
        for t in (direct, bare, via):
            await b.warm(kind, t, warm)
        out.rows.append((kind, 1, *await b.c1(kind, [direct, bare, via], n1)))
        r16 = [await b.cn(kind, t, n16, 16) for t in (direct, bare, via)]
        out.rows.append((kind, 16, *r16))
        out.mem_after[kind] = mem_mb(on.pid)
        out.upstream_expected[kind] = ANSWERED.get(on.port, 0) - sent0


# ----------------------------------------------------------------------------- --workers 2

def workers_supported() -> bool:
    try:
        out = subprocess.run([sys.executable, CCM_PY, "serve", "--help"], capture_output=True,
                             text=True, timeout=30, stdin=subprocess.DEVNULL).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "--workers" in out


@dataclass
class WorkersOut:
    note: str = ""                     # why the comparison did not run ('' when it did)
    one: RunResult = field(default_factory=RunResult)
    two: RunResult = field(default_factory=RunResult)
    pids: list[int] = field(default_factory=list)           # supervisor first
    cpu_by_pid: dict[int, float] = field(default_factory=dict)
    rss_by_pid: dict[int, float] = field(default_factory=dict)
    answered: int = 0                  # POSTs to the multi-worker ccm and the one-worker ccm


async def start_workers(ctx: Ctx) -> tuple[CCMProc | None, str]:
    """`serve --workers 2` on its own port; waits (10 s at most) until the supervisor has two
    children besides itself."""
    if not workers_supported():
        return None, "workers: not supported by this ccm (`serve --help` lists no --workers)"
    p = CCMProc("ccm workers 2", free_port(), os.path.join(ctx.tmp, "usage-workers.db"),
                extra=["--workers", "2"])
    ctx.extra_procs.append(p)
    why = await asyncio.to_thread(start_ccm, p, ctx.tmp, ctx.fake_port, True)
    if why:
        return None, why
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(proc_tree(p.pid)) < 3:   # bounded by the deadline
        await asyncio.sleep(0.1)
    TREE_PIDS.add(p.pid)
    return p, ""


async def workers_phase(b: Bench, ctx: Ctx, n: int, rounds: int, warm: int) -> WorkersOut:
    """WORKERS_PATH at c=64 through the one-worker ccm and the `--workers 2` one, in
    alternating rounds (1, 2, then 2, 1)."""
    out = WorkersOut()
    if ctx.on.alive() is not None:
        out.note = "workers: skipped (the one-worker ccm is gone)"
        return out
    two, out.note = await start_workers(ctx)
    if two is None:
        return out
    sent0 = ANSWERED.get(ctx.on.port, 0)
    _, t1 = targets_for(WORKERS_PATH, ctx.fake_port, ctx.on.port, ctx.on.pid)
    _, t2 = targets_for(WORKERS_PATH, ctx.fake_port, two.port, two.pid, two.name)
    await b.warm(WORKERS_PATH, t2, warm)
    for r in range(rounds):
        for t in ((t1, t2) if r % 2 == 0 else (t2, t1)):
            (out.one if t is t1 else out.two).add(await b.cn(WORKERS_PATH, t, n // rounds, WORKERS_C))
    out.pids = proc_tree(two.pid)
    out.cpu_by_pid = {p: cpu_seconds(p) for p in out.pids}
    out.rss_by_pid = {p: mem_mb(p)["VmRSS"] for p in out.pids}
    out.answered = ANSWERED.get(ctx.on.port, 0) - sent0 + ANSWERED.get(two.port, 0)
    return out


def pid_running(pid: int) -> bool:
    """Running or sleeping, not gone and not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def stop_tree(p: CCMProc, problems: list[str]) -> None:
    """SIGTERM the supervisor; its workers must be gone 5 s later (else they are killed, by
    pid, and reported)."""
    pids = proc_tree(p.pid) if p.alive() is None else []
    stop(p.proc)
    deadline = time.monotonic() + 5
    left = pids[1:]
    while left and time.monotonic() < deadline:     # bounded by the deadline
        left = [q for q in left if pid_running(q)]
        time.sleep(0.05)
    for q in left:
        problems.append(f"{p.name}: worker pid {q} still running 5 s after SIGTERM to the supervisor")
        try:
            os.kill(q, signal.SIGKILL)
        except OSError:
            pass


# ----------------------------------------------------------------------------- memory

@dataclass
class RssOut:
    n_req: int = 0
    n_streams: int = 0
    idle: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)        # after n_req RSS_PATH requests
    streams: dict[str, float] = field(default_factory=dict)      # with n_streams open
    after_streams: dict[str, float] = field(default_factory=dict)
    fds: tuple[int, int, int] = (-1, -1, -1)                     # idle, after, with streams
    tiktoken: bool = False             # tiktoken mapped after the translated requests
    done: int = 0                      # RSS_PATH requests answered and right
    first_event: int = 0               # streams whose first event reached the client
    held: int = 0                      # streams the fake held when RSS was read
    ok_streams: int = 0                # streams complete and right after the release
    hold_answered: int = 0             # stream requests that got a response head
    openai_answered: int = 0


async def hold_streams(b: Bench, p: CCMProc, n: int, out: RssOut) -> None:
    """n concurrent streams through p, held open by the fake after message_start; RSS is read
    when all n are open (or after 20 s), then the fake releases them and each is checked."""
    req = build_request(p.port, "/v1/messages?beta=true", claude_code_headers(CLIENT_KEY),
                        json.dumps(claude_code_body("h", True)).encode())
    firsts = [0]

    def first() -> None:
        firsts[0] += 1

    async def one(conn: Conn) -> Reply | str:
        try:
            return await conn.request(req)
        except HTTPFailure as exc:
            return str(exc)
    conns = [Conn(p.port) for _ in range(n)]
    for c in conns:
        c.on_first = first
    tasks: list[asyncio.Task[Reply | str]] = []
    try:
        for i in range(0, n, 50):                    # connect in batches: no SYN-queue overflow
            tasks += [asyncio.create_task(one(c)) for c in conns[i:i + 50]]
            await asyncio.sleep(0.02)
        deadline = time.monotonic() + 20             # for the fake to hold all n
        while time.monotonic() < deadline:           # bounded by the deadline
            out.held = (await b.stats()).get("held", 0)
            if out.held >= n:
                break
            await asyncio.sleep(0.1)
        deadline = time.monotonic() + 5              # then for ccm to relay their first events
        while firsts[0] < n and time.monotonic() < deadline:   # bounded by the deadline
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        out.first_event = firsts[0]
        out.streams = mem_mb(p.pid)
        out.fds = (*out.fds[:2], fd_count(p.pid))
        await b.release()
        reps = await asyncio.gather(*tasks)
    finally:
        for c in conns:
            c.close()
    whys = [rep if isinstance(rep, str) else check_reply("anthropic stream", rep, HOLD_MODEL,
                                                         True, HOLD_MODEL) for rep in reps]
    out.ok_streams = whys.count("")
    bad = [why for why in whys if why]
    if bad:
        b.problems.append(f"held streams via {p.name}: {len(bad)} of {n} not right, first: "
                          f"{bad[0]}")


async def rss_phase(b: Bench, ctx: Ctx, n_req: int, n_streams: int, settle_s: float) -> RssOut:
    """A fresh ccm: idle RSS, then n_req RSS_PATH requests at c=1 (no count_tokens call),
    every reply checked, then n_streams concurrent held streams."""
    out = RssOut(n_req=n_req, n_streams=n_streams)
    p = CCMProc("ccm memory", free_port(), os.path.join(ctx.tmp, "usage-memory.db"))
    ctx.extra_procs.append(p)
    why = await asyncio.to_thread(start_ccm, p, ctx.tmp, ctx.fake_port, True)
    if why:
        b.problems.append(why)
        return out
    await asyncio.sleep(0.5)                         # let startup settle before the idle reading
    out.idle, fd_idle = mem_mb(p.pid), fd_count(p.pid)
    _, via = targets_for(RSS_PATH, ctx.fake_port, p.port, p.pid, p.name)
    conn = Conn(p.port)
    try:
        for _ in range(n_req):
            try:
                rep = await conn.request(via.req)
            except HTTPFailure as exc:
                b.problems.append(f"memory phase {RSS_PATH} via {p.name}: {exc}")
                break
            why = check_reply(RSS_PATH, rep, via.want_model, True, via.want_echo)
            if why:
                b.problems.append(f"memory phase {RSS_PATH} via {p.name}: {why}")
                break
            out.done += 1
    finally:
        conn.close()
    out.openai_answered = ANSWERED.get(p.port, 0)
    await asyncio.sleep(settle_s)                    # the ledger's last commit lands first
    out.after, out.tiktoken = mem_mb(p.pid), maps_mention(p.pid, "tiktoken")
    out.fds = (fd_idle, fd_count(p.pid), -1)
    if p.alive() is None:
        await hold_streams(b, p, n_streams, out)
        await asyncio.sleep(settle_s)
        out.after_streams = mem_mb(p.pid)
    out.hold_answered = ANSWERED.get(p.port, 0) - out.openai_answered
    return out


# ----------------------------------------------------------------------------- reports

def _ratio(a: float, b: float) -> float:
    return a / b if b and b == b else float("nan")


def report_paths(rows: list[Row], frames: dict[tuple[str, str], float]) -> None:
    w = print
    hdr = (f"{'path':<17} {'c':>2} {'direct p50':>10} {'p99':>7} | {'bare +p50':>9} {'+p99':>7} | "
           f"{'ccm +p50':>8} {'+p99':>7} | {'rps direct':>10} {'bare':>5} {'ccm':>5} | "
           f"{'CPU bare':>8} {'ccm':>6} {'ccm/bare':>8} | {'up-conn':>7} {'errors':>6}")
    w("latency in ms; +p50/+p99 = the relay's or ccm's percentile minus direct's (the latency it")
    w("adds); rps at c=16; CPU = ms of the process's utime+stime per request it relayed; up-conn")
    w("= new TCP connections to the upstream per ccm request (0 = keep-alive reused)")
    w(hdr)
    w("-" * len(hdr))
    for kind, c, rd, rb, rc in rows:
        rps = (f"{_rps(rd):>10.0f} {_rps(rb):>5.0f} {_rps(rc):>5.0f}" if c > 1
               else f"{'':>10} {'':>5} {'':>5}")
        w(f"{kind:<17} {c:>2} {rd.p(.5):>10.3f} {rd.p(.99):>7.3f} | {rb.p(.5) - rd.p(.5):>9.3f} "
          f"{rb.p(.99) - rd.p(.99):>7.3f} | {rc.p(.5) - rd.p(.5):>8.3f} {rc.p(.99) - rd.p(.99):>7.3f} | "
          f"{rps} | {_cpu_ms(rb):>8.3f} {_cpu_ms(rc):>6.3f} {_ratio(_cpu_ms(rc), _cpu_ms(rb)):>7.2f}x | "
          f"{rc.upstream_conns / max(rc.n, 1):>7.2f} {rd.errors + rb.errors + rc.errors:>6}")
    w("")
    w("where the CPU went during the c=16 runs (ms per request):")
    for kind, c, rd, rb, rc in rows:
        if c == 16 and rc.n and rb.n:
            w(f"  {kind:<17} via ccm: ccm {_cpu_ms(rc):6.3f}, fake {rc.cpu_fake * 1000 / rc.n:5.3f}, "
              f"client {rc.cpu_client * 1000 / rc.n:5.3f}, ccm busy {100 * rc.cpu_ccm / rc.wall:3.0f}% "
              f"| via bare: relay {_cpu_ms(rb):6.3f}, fake {rb.cpu_fake * 1000 / rb.n:5.3f}, client "
              f"{rb.cpu_client * 1000 / rb.n:5.3f}, relay busy {100 * rb.cpu_ccm / rb.wall:3.0f}%")
    w("chunked frames per stream response (upstream / bare relay / ccm): " + "; ".join(
        f"{k} {frames.get((k, 'direct'), 0)}/{frames.get((k, 'bare relay'), 0)}/"
        f"{frames.get((k, 'ccm'), 0)}" for k in STREAMS))


def report_ttfb(rows: list[Row]) -> None:
    w = print
    w("TTFB at c=1 (ms from sending the request to the first body chunk, the first SSE event;")
    w("added = minus direct):")
    hdr = (f"  {'path':<17} {'direct p50':>10} {'bare p50':>8} {'ccm p50':>8} {'bare added':>10} "
           f"{'ccm added':>9} {'ccm-bare':>8} | {'p99 direct':>10} {'bare':>7} {'ccm':>7}")
    w(hdr)
    for kind, c, rd, rb, rc in rows:
        if c == 1 and kind in STREAMS:
            w(f"  {kind:<17} {_ttfb(rd):>10.3f} {_ttfb(rb):>8.3f} {_ttfb(rc):>8.3f} "
              f"{_ttfb(rb) - _ttfb(rd):>10.3f} {_ttfb(rc) - _ttfb(rd):>9.3f} "
              f"{_ttfb(rc) - _ttfb(rb):>8.3f} | {_ttfb(rd, .99):>10.3f} {_ttfb(rb, .99):>7.3f} "
              f"{_ttfb(rc, .99):>7.3f}")


def report_workers(wo: WorkersOut, nproc: int) -> None:
    w = print
    if wo.note:
        w(wo.note)
        return
    r1, r2 = wo.one, wo.two
    w(f"--workers 2 vs one worker ({WORKERS_PATH}, c={WORKERS_C}, alternating rounds; CPU summed "
      f"over the supervisor and its workers):")
    for name, r in (("1 worker", r1), ("2 workers", r2)):
        w(f"  {name:<9} {_rps(r):6.0f} rps  p50 {r.p(.5):7.2f} ms  p99 {r.p(.99):7.2f} ms  ccm CPU "
          f"{_cpu_ms(r):6.3f} ms/request  fake {r.cpu_fake * 1000 / max(r.n, 1):5.3f}  client "
          f"{r.cpu_client * 1000 / max(r.n, 1):5.3f}  errors {r.errors}")
    w(f"  ratio {_ratio(_rps(r2), _rps(r1)):.2f}x; processes (supervisor first): " + ", ".join(
        f"pid {p} CPU {wo.cpu_by_pid.get(p, 0):.1f} s RSS {wo.rss_by_pid.get(p, 0):.1f} MB"
        for p in wo.pids))
    w(f"  this machine has {nproc} cores{' (2 cores: the fake upstream and the bench client share them with both workers, so the ratio is a floor)' if nproc <= 2 else ''}")


def report_memory(mem_idle: dict[str, float], smaps_idle: dict[str, float], rss_module: float,
                  po: PathsOut, mem_end: dict[str, float], mem_idle_off: dict[str, float],
                  ro: RssOut) -> None:
    w = print
    w(f"ccm memory (MB): idle after start VmRSS {mem_idle['VmRSS']:.1f} (VmHWM "
      f"{mem_idle['VmHWM']:.1f}; Pss {smaps_idle['Pss']:.1f}, private dirty "
      f"{smaps_idle['Private_Dirty']:.1f}, shared clean {smaps_idle['Shared_Clean']:.1f})")
    w(f"  started as `python -m ccm serve` from cached bytecode: idle VmRSS {rss_module:.1f}")
    w(f"  for scale, a bare `python -c ...` here has VmRSS {bare_python_rss([]):.1f}, with -S "
      f"(no site-packages .pth) {bare_python_rss(['-S']):.1f}")
    for kind, m in po.mem_after.items():
        w(f"  after {kind:<17} VmRSS {m['VmRSS']:6.1f}  VmHWM {m['VmHWM']:6.1f}")
    w(f"  at the end              VmRSS {mem_end['VmRSS']:6.1f}  VmHWM {mem_end['VmHWM']:6.1f}")
    w(f"  the ledger-off ccm (`[usage] enabled = false`) idle after start: VmRSS "
      f"{mem_idle_off['VmRSS']:.1f} (VmHWM {mem_idle_off['VmHWM']:.1f})")
    nan = float("nan")
    g = lambda m, k="VmRSS": m.get(k, nan)               # noqa: E731
    w(f"a fresh ccm (`python ccm.py serve`, ledger on) for memory alone: idle VmRSS {g(ro.idle):.1f}"
      f" ({ro.fds[0]} fds)")
    w(f"  after {ro.done} {RSS_PATH} requests at c=1 (no count_tokens; tiktoken "
      f"{'LOADED' if ro.tiktoken else 'not loaded'}): VmRSS {g(ro.after):.1f} "
      f"(+{g(ro.after) - g(ro.idle):.1f}), VmHWM {g(ro.after, 'VmHWM'):.1f}, {ro.fds[1]} fds")
    w(f"  with {ro.n_streams} concurrent streams open ({ro.first_event} had their first event, the "
      f"fake held {ro.held}): VmRSS {g(ro.streams):.1f} (+{g(ro.streams) - g(ro.after):.1f} over the "
      f"previous line, {(g(ro.streams) - g(ro.after)) * 1024 / max(ro.n_streams, 1):.0f} KB per "
      f"stream), {ro.fds[2]} fds")
    w(f"  after they ended ({ro.ok_streams} complete and right): VmRSS {g(ro.after_streams):.1f}, "
      f"VmHWM {g(ro.after_streams, 'VmHWM'):.1f}")


def report_targets(rows: list[Row], mem_idle: dict[str, float], rss_module: float, ro: RssOut,
                   wo: WorkersOut, nproc: int) -> None:
    w = print

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"               # comparisons with nan are False: FAIL
    by = {(kind, c): (rd, rb, rc) for kind, c, rd, rb, rc in rows}
    w("targets:")
    cells, oks = [], []
    for kind in TRANSLATED:
        for c in (1, 16):
            if (kind, c) in by:
                _, rb, rc = by[(kind, c)]
                r = _ratio(_cpu_ms(rc), _cpu_ms(rb))
                oks.append(r <= TARGET_CPU_RATIO)
                cells.append(f"{kind} c={c} {_cpu_ms(rc):.2f}/{_cpu_ms(rb):.2f}={r:.2f}x")
    w(f"  ccm CPU per translated request <= {TARGET_CPU_RATIO:g}x the bare relay's (ccm/bare ms): "
      + ", ".join(cells) + f"  -> {verdict(bool(oks) and all(oks))}")
    w("    (not a target: anthropic pass-through " + ", ".join(
        f"{kind} c={c} {_cpu_ms(by[(kind, c)][2]):.2f}/{_cpu_ms(by[(kind, c)][1]):.2f}="
        f"{_ratio(_cpu_ms(by[(kind, c)][2]), _cpu_ms(by[(kind, c)][1])):.2f}x"
        for kind in PATHS if kind.startswith("anthropic") for c in (1, 16) if (kind, c) in by) + ")")
    cells, oks = [], []
    for kind in STREAMS:
        if (kind, 1) in by:
            rd, rb, rc = by[(kind, 1)]
            ca, ba = _ttfb(rc) - _ttfb(rd), _ttfb(rb) - _ttfb(rd)
            oks.append(ca - ba <= TARGET_TTFB_MS)
            cells.append(f"{kind} ccm {ca:+.3f} vs bare {ba:+.3f} ({ca - ba:+.3f})")
    w(f"  added TTFB p50 at c=1 within {TARGET_TTFB_MS:g} ms of the bare relay's: " + ", ".join(cells)
      + f"  -> {verdict(bool(oks) and all(oks))}")
    grow = ro.after.get("VmRSS", float("nan")) - ro.idle.get("VmRSS", float("nan"))
    ok = grow <= TARGET_RSS_GROWTH_MB and ro.done == ro.n_req
    w(f"  RSS after {ro.done:,} translated requests ({RSS_PATH}, no count_tokens) within "
      f"{TARGET_RSS_GROWTH_MB:g} MB of idle: idle {ro.idle.get('VmRSS', float('nan')):.1f}, after "
      f"{ro.after.get('VmRSS', float('nan')):.1f} ({grow:+.1f}; tiktoken "
      f"{'loaded' if ro.tiktoken else 'not loaded'})  -> {verdict(ok)}")
    w(f"  idle RSS <= {TARGET_IDLE_MODULE_MB:g} MB as `python -m ccm`: {rss_module:.1f}  -> "
      f"{verdict(rss_module <= TARGET_IDLE_MODULE_MB)}; <= {TARGET_IDLE_SCRIPT_MB:g} MB as "
      f"`python ccm.py`: {mem_idle['VmRSS']:.1f}  -> {verdict(mem_idle['VmRSS'] <= TARGET_IDLE_SCRIPT_MB)}")
    if wo.note:
        w(f"  --workers 2 >= {TARGET_WORKERS_RATIO:g}x one worker's rps at c={WORKERS_C}: "
          f"{wo.note.removeprefix('workers: ')}  -> SKIP")
    else:
        r = _ratio(_rps(wo.two), _rps(wo.one))
        w(f"  --workers 2 >= {TARGET_WORKERS_RATIO:g}x one worker's rps at c={WORKERS_C} "
          f"({WORKERS_PATH}): {_rps(wo.one):.0f} -> {_rps(wo.two):.0f} rps = {r:.2f}x  -> "
          f"{verdict(r >= TARGET_WORKERS_RATIO)}" + (f" (nproc {nproc}: the fake upstream and the "
                                                     "bench client share the same 2 cores, so this "
                                                     "is a floor)" if nproc <= 2 else ""))


def upstream_counts(stats: dict[str, Any], po: PathsOut, wo: WorkersOut,
                    ro: RssOut) -> tuple[list[tuple[str, int, int]], str]:
    """(family, upstream calls the fake counted, requests sent through ccm) for every family,
    and a line for the report. Bare-relay and direct calls have other models or user-agents."""
    by_key = stats.get("by_key", {})
    ue = po.upstream_expected

    def got(prefix: str) -> int:
        return sum(v for k, v in by_key.items() if k.startswith(prefix) and not _direct_key(k))
    fams = [("anthropic", got("/v1/messages bench-model"),
             ue.get("anthropic json", 0) + ue.get("anthropic stream", 0) + wo.answered),
            ("openai", got("/v1/chat/completions gpt-bench"),
             ue.get("openai json", 0) + ue.get("openai stream", 0) + ro.openai_answered),
            ("gemini", got(f"/v1beta/models/{GEMINI_MODEL}:"),
             ue.get("gemini json", 0) + ue.get("gemini stream", 0)),
            ("held streams", got(f"/v1/messages {HOLD_MODEL}"), ro.hold_answered)]
    line = "; ".join(f"{f}: {g / max(s, 1):.2f} ({g} upstream / {s} sent)" for f, g, s in fams)
    return fams, line + f"; rejected credentials at the fake: {stats.get('bad_auth')}"


async def run(args: argparse.Namespace, ctx: Ctx) -> int:
    quick = args.quick
    n1, n16, warm = (40, 200, 10) if quick else (400, 1200, 20)
    n_workers, workers_rounds = (256, 1) if quick else (1600, 2)   # per target, over the rounds
    n_rss, n_streams = (200, 100) if quick else (1000, 500)
    on, off = ctx.on, ctx.off
    nproc = len(os.sched_getaffinity(0))
    b = Bench(ctx.fake_port, on.port, ctx.fake_pid, on.pid)
    mem_idle, smaps_idle, mem_idle_off = mem_mb(on.pid), smaps_mb(on.pid), mem_mb(off.pid)
    cpu_idle0 = cpu_seconds(on.pid)
    machine0 = machine_cpu()
    t_start = time.perf_counter()
    po = PathsOut()
    await paths_phase(b, ctx, n1, n16, warm, po)
    lrows: LedgerRows = []
    if on.alive() is None and off.alive() is None:
        sent0 = ANSWERED.get(on.port, 0) + ANSWERED.get(off.port, 0)
        lrows = await ledger_phase(b, on, off, n1, n16, warm, *((1, 0.0) if quick
                                                                 else (2, LEDGER_SETTLE_S)))
        po.upstream_expected[LEDGER_PATH] = (po.upstream_expected.get(LEDGER_PATH, 0) +
                                             ANSWERED.get(on.port, 0) + ANSWERED.get(off.port, 0)
                                             - sent0)
    wo = await workers_phase(b, ctx, n_workers, workers_rounds, warm)
    exits = {p.name: p.alive() for p in ctx.extra_procs}   # before the stop below
    for p in ctx.extra_procs:
        stop_tree(p, b.problems)                     # its workers must go with it
    ro = await rss_phase(b, ctx, n_rss, n_streams, 0.3 if quick else LEDGER_SETTLE_S)
    elapsed = time.perf_counter() - t_start
    busy, steal, ours = (e - s0 for e, s0 in zip(machine_cpu(), machine0))
    stats = await b.stats()
    mem_end = mem_mb(on.pid)
    exits.update({p.name: p.alive() for p in (on, off, *ctx.extra_procs[len(exits):])})
    for p in (on, *ctx.extra_procs):
        stop_tree(p, b.problems)                     # SIGTERM: ccm flushes its ledger
    rows_on, why_on = ledger_rows(on.usage_db)

    w = print
    w("")
    w(f"ccm benchmark ({'--quick' if quick else 'full'}): {elapsed:.1f} s of measuring")
    w(f"python {platform.python_version()} ({platform.python_implementation()}) | nproc "
      f"{nproc} (cpu_count {os.cpu_count()}) | {platform.system()} {platform.release()} | ccm "
      f"{ctx.health.get('version', '?')} (ccm.py sha256 {ccm_digest()}) | /proc tick "
      f"{1000 / CLK_TCK:g} ms")
    w(f"machine load during the run: other processes used {busy - ours:.0f} CPU-s "
      f"({100 * (busy - ours) / max(elapsed * nproc, 1e-9):.0f}% of the {nproc} cores; "
      f"hypervisor steal {steal:.0f} s), the bench and its processes {ours:.0f} CPU-s; "
      f"load average now {os.getloadavg()[0]:.2f}")
    w(f"targets compared: direct (to the fake), bare relay (`bench.py --bare-relay`: asyncio "
      f"streams + one httpx.AsyncClient, the direct body forwarded unchanged), ccm")
    w(f"requests: c=1 {n1} per target, direct/bare/ccm interleaved; c=16 {n16} per target; "
      f"warm-up {warm} per target per path")
    w("bodies (bytes sent): " + "; ".join(
        f"{k}: direct and bare {d:,} / to ccm {c:,}" for k, (d, c) in po.sizes.items()))
    w("bodies ccm sent upstream: " + "; ".join(
        f"{k}: {v:,}" for k, v in sorted(stats.get("last_body_bytes", {}).items())
        if any(m in k for m in ("bench-model", "gpt-bench", GEMINI_MODEL)) and not _direct_key(k)))
    w("")
    report_paths(po.rows, b.frames)
    w("")
    report_ttfb(po.rows)
    w("")
    with tempfile.TemporaryDirectory(prefix="ccm-idle-") as idle_dir:
        rss_module = module_idle_rss(idle_dir)
    report_memory(mem_idle, smaps_idle, rss_module, po, mem_end, mem_idle_off, ro)
    w(f"ccm CPU from start to the first request: {cpu_idle0 * 1000:.0f} ms")
    w("")
    fams, line = upstream_counts(stats, po, wo, ro)
    w("upstream calls per request through ccm (1.00 = no retries): " + line)
    w("")
    report_ledger(lrows, ANSWERED.get(on.port, 0), rows_on, why_on, off.usage_db,
                  0.0 if quick else LEDGER_SETTLE_S)
    w("")
    report_workers(wo, nproc)
    w("")
    report_targets(po.rows, mem_idle, rss_module, ro, wo, nproc)
    problems = collect_problems(b, ctx, po, lrows, wo, exits, fams, stats, rows_on, why_on)
    notes = [f"{kind} c={c}: ccm opened {rc.upstream_conns} new upstream connections for {rc.n} "
             f"requests (keep-alive to the upstream not reused)"
             for kind, c, rd, rb, rc in po.rows if rc.n and rc.upstream_conns / rc.n > 0.05]
    for title, lines in (("NOTES", notes), ("PROBLEMS", problems)):
        if lines:
            w("")
            w(f"{title}:")
            for ln in lines:
                w(f"  {ln}")
    return 1 if problems else 0


def collect_problems(b: Bench, ctx: Ctx, po: PathsOut, lrows: LedgerRows, wo: WorkersOut,
                     exits: dict[str, int | None], fams: list[tuple[str, int, int]],
                     stats: dict[str, Any], rows_on: int, why_on: str) -> list[str]:
    problems = list(b.problems)
    problems += [f"{name} exited during the run with status {st}" for name, st in exits.items()
                 if st is not None]
    named = [(f"{kind} c={c}", (("direct", rd), ("bare relay", rb), ("ccm", rc)))
             for kind, c, rd, rb, rc in po.rows]
    named += [(f"ledger comparison {LEDGER_PATH} c={c}",
               (("direct", rd), ("ccm", ron), ("ccm ledger off", roff)))
              for c, rd, ron, roff in lrows]
    if not wo.note:
        named.append((f"workers {WORKERS_PATH} c={WORKERS_C}", (("ccm", wo.one),
                                                                ("ccm workers 2", wo.two))))
    for where, results in named:
        for name, r in results:
            if r.errors:
                problems.append(f"{where} {name}: {r.errors} errors, first: {r.first_error}")
            if r.reconnects:
                problems.append(f"{where} {name}: {r.reconnects} reconnects (server closed "
                                f"a keep-alive connection)")
    sent_on = ANSWERED.get(ctx.on.port, 0)
    if why_on or rows_on != sent_on:
        problems.append(f"the ledger holds {rows_on} rows for {sent_on} requests answered by the "
                        f"ledger-on ccm {why_on}".rstrip())
    for p in ctx.extra_procs:                        # each has its own ledger
        rows, why = ledger_rows(p.usage_db)
        if p.pid and (why or rows != ANSWERED.get(p.port, 0)):
            problems.append(f"{p.name}: its ledger holds {rows} rows for "
                            f"{ANSWERED.get(p.port, 0)} requests answered {why}".rstrip())
    if os.path.exists(ctx.off.usage_db):
        problems.append(f"the ledger-off ccm created {ctx.off.usage_db}")
    if any(g != s for _, g, s in fams):
        problems.append(f"upstream call counts differ from requests sent: {stats.get('by_key')}")
    if stats.get("bad_auth"):
        problems.append(f"the fake rejected {stats['bad_auth']} requests' credentials")
    return problems


def start_ccm(p: CCMProc, tmp: str, fake_port: int, ledger: bool) -> str:
    """Start one ccm process on p.port; '' when it answers /health, else why not."""
    cfg = os.path.join(tmp, f"{p.name.replace(' ', '-')}.toml")
    write_config(cfg, p.port, fake_port, p.usage_db, ledger)
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    log_path = cfg[:-5] + ".stderr"
    with open(log_path, "wb") as log:
        p.proc = subprocess.Popen([sys.executable, CCM_PY, "-c", cfg, "serve", *p.extra],
                                  stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                  cwd=tmp, preexec_fn=_die_with_parent)
    try:
        wait_http(p.port, "/health", p.proc, 20)
    except RuntimeError as exc:
        with open(log_path, errors="replace") as f:
            return f"{p.name} did not come up: {exc}\n{f.read()[-4000:]}"
    return ""


def log_problems(tmp: str, p: CCMProc) -> list[str]:
    try:
        with open(os.path.join(tmp, f"{p.name.replace(' ', '-')}.stderr"), errors="replace") as f:
            return [f"{p.name}: {ln.rstrip()}" for ln in f
                    if " WARNING " in ln or " ERROR " in ln or "Traceback" in ln]
    except OSError:
        return []


def raise_fd_limit(want: int = 8192) -> None:
    """500 held streams need ~1,000 descriptors in ccm (client and upstream side); children
    inherit the limit."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, new), hard))


def spawn_helper(flag: str, *ports: int) -> subprocess.Popen[Any]:
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), flag, *map(str, ports)],
                            stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                            preexec_fn=_die_with_parent)


def main_bench(args: argparse.Namespace) -> int:
    fake = relay = None
    raise_fd_limit()
    tmp = tempfile.TemporaryDirectory(prefix="ccm-bench-")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    on = CCMProc("ccm", free_port(), os.path.join(tmp.name, "usage.db"))
    off = CCMProc("ccm ledger off", free_port(), os.path.join(tmp.name, "usage-off.db"))
    ctx: Ctx | None = None
    rc = 1
    try:
        fake_port, relay_port = free_port(), free_port()
        fake = spawn_helper("--fake-upstream", fake_port)
        wait_http(fake_port, "/__stats", fake, 15)
        relay = spawn_helper("--bare-relay", relay_port, fake_port)
        wait_http(relay_port, "/__stats", relay, 15)   # forwarded to the fake
        for p, ledger in ((on, True), (off, False)):
            why = start_ccm(p, tmp.name, fake_port, ledger)
            if why:
                print(why, file=sys.stderr)
                return 1
        health = wait_http(on.port, "/health", on.proc, 5)
        time.sleep(0.5)                              # let startup settle before the idle reading
        ctx = Ctx(tmp.name, fake_port, fake.pid, relay_port, relay.pid, on, off, health)
        try:
            rc = asyncio.run(asyncio.wait_for(run(args, ctx), timeout=900))
        except asyncio.TimeoutError:
            print("bench: gave up after 900 s", file=sys.stderr)
            rc = 1
        stop(off.proc)
        lines = [ln for p in (on, off, *ctx.extra_procs) for ln in log_problems(tmp.name, p)]
        print(f"\nccm stderr: {len(lines)} warning/error lines" +
              "".join(f"\n  {ln[:300]}" for ln in lines[:10]))
        if lines:
            rc = 1
    finally:
        for p in (on, off, *(ctx.extra_procs if ctx else [])):
            stop_tree(p, [])
        stop(relay)
        stop(fake)
        tmp.cleanup()
    return rc


def main() -> int:
    ap = argparse.ArgumentParser(description="Benchmark ccm against a fake upstream on 127.0.0.1.")
    ap.add_argument("--quick", action="store_true", help="about 10x fewer requests (smoke run)")
    ap.add_argument("--fake-upstream", type=int, metavar="PORT",
                    help="(internal) run the fake upstream on PORT")
    ap.add_argument("--bare-relay", type=int, nargs=2, metavar=("PORT", "UPSTREAM_PORT"),
                    help="(internal) run the bare httpx relay on PORT, forwarding to UPSTREAM_PORT")
    args = ap.parse_args()
    if args.fake_upstream is not None:
        return run_fake_upstream(args.fake_upstream)
    if args.bare_relay is not None:
        return run_bare_relay(*args.bare_relay)
    return main_bench(args)


if __name__ == "__main__":
    sys.exit(main())
