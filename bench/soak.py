#!/usr/bin/env python3
"""Bounded fault-injection soak of ccm: failover, retries, clean errors, leaks.

    python bench/soak.py                  # 20000 requests at c=64, then 500 concurrent slow streams
    python bench/soak.py --quick          # 2000 requests at c=32, then 100 streams
    python bench/soak.py --requests N --concurrency C --streams S [--seed X]

What it does (everything on 127.0.0.1; stdlib + httpx; every loop bounded in count and time):
  * starts two fake upstreams in subprocesses (`soak.py --fake faulty|healthy PORT`): raw
    asyncio HTTP/1.1 keep-alive servers answering POST /v1/messages (Anthropic JSON or SSE)
    and POST /v1/chat/completions (OpenAI JSON or chunk SSE ending with [DONE]). The fault is
    chosen by the client and written into the user message text, which ccm forwards on both
    formats: "FAULT:<name>;ID:<id>;N:<deltas>;K:<cut point>". The faulty fake obeys it; the
    healthy fake always answers "ok-<id>-" * N (the slow-stream directive is obeyed by both);
  * starts `python ccm.py -c CONFIG serve` with providers p1a/p1o (faulty fake, anthropic and
    openai format) and p2a/p2o (healthy fake), models ma -> [p1a, p2a], mo -> [p1o, p2o],
    first_byte_timeout_ms = 500, idle_timeout_ms = 2000, retry_after_max_ms = 100;
  * phase 1: sends --requests requests at --concurrency (stream and JSON, both formats, ~5 % of
    streams dropped by the client after the first event) and classifies every answer: OK
    (byte-exact text for its id, valid event order, every data line JSON), CLEAN error (an
    Anthropic JSON error, or a stream ending with a valid `event: error`), or LOST/CORRUPT;
  * phase 2: holds --streams slow streams (a delta every 200 ms for 3-5 s) open at once and
    checks every one byte-exact, sampling ccm's RSS and fds;
  * reports ccm's RSS / fds (from /proc) at start, after the soak (once idle) and peak, and
    its /health counters, which must add up (requests = ok + error + client_aborted,
    in_flight = 0). Exit status 0 on PASS, 1 on FAIL.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import re
import signal
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
CLIENT_TIMEOUT_S = 30.0            # one request through ccm; longer is LOST
FAKE_MAX_LIFE_S = 3600.0           # a fake upstream exits by itself after this
HANG_MAX_S = 60.0                  # a "hang" fault holds its connection at most this long
STALL_S = 6.0                      # a "stall" fault goes silent this long (> idle_timeout 2 s)
TRICKLE_PIECE = 16                 # "trickle": bytes per write ...
TRICKLE_GAP_S = 0.005              # ... and the pause between writes
UPSTREAM_KEEPALIVE_MAX = 64        # ccm's httpx pool keeps at most this many idle connections

# fault name -> weight (per mille) in phase 1; "none" is a healthy answer
FAULTS: dict[str, int] = {
    "none": 700,
    "refuse": 30,        # close the connection right after reading the request
    "hang": 30,          # never answer (ccm's first byte timeout is 500 ms)
    "e429_0": 20,        # 429 retry-after: 0 (always)
    "e429_0once": 20,    # 429 retry-after: 0 the first time this id is seen, then healthy
    "e429_5": 20,        # 429 retry-after: 5 (> retry_after_max_ms: move on)
    "e500": 30,
    "e529": 30,
    "cut": 30,           # stream: K events then half an event, socket closed (chunked, no end);
                         # JSON: half the content-length body, socket closed
    "cuteof": 20,        # close-delimited body (no length, connection: close) ending after K
                         # events plus half an event / half the JSON: a clean EOF, bad content
    "malformed": 30,     # stream: a data line with invalid JSON after K events (then the rest);
                         # JSON: 200 with an invalid JSON body
    "trickle": 30,       # healthy answer written 16 bytes at a time, 5 ms apart
    "stall": 10,         # stream: K events then 6 s of silence, then closed; JSON: half the
                         # body then 6 s of silence, then closed
}
_DIRECTIVE = re.compile(rb"FAULT:([a-z0-9_]+);ID:(\d+);N:(\d+);K:(\d+)(?:;MS:(\d+))?")
_STREAM_TRUE = re.compile(rb'"stream"\s*:\s*true')


def expected_text(rid: int, n: int) -> str:
    return f"ok-{rid}-" * n


# ============================================================================================
# Fake upstream (its own process): `soak.py --fake faulty|healthy PORT`
# ============================================================================================

def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def anthropic_events(rid: int, n: int, model: str) -> list[bytes]:
    piece = f"ok-{rid}-"
    usage = {"input_tokens": 10, "output_tokens": 1, "cache_creation_input_tokens": 0,
             "cache_read_input_tokens": 0}
    start = {"id": f"msg_soak{rid}", "type": "message", "role": "assistant", "model": model,
             "content": [], "stop_reason": None, "stop_sequence": None, "usage": usage}
    ev = [_sse("message_start", {"type": "message_start", "message": start}),
          _sse("content_block_start", {"type": "content_block_start", "index": 0,
                                       "content_block": {"type": "text", "text": ""}})]
    ev += [_sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                        "delta": {"type": "text_delta", "text": piece}})
           for _ in range(n)]
    ev += [_sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
           _sse("message_delta", {"type": "message_delta",
                                  "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                  "usage": {"output_tokens": n}}),
           _sse("message_stop", {"type": "message_stop"})]
    return ev


def anthropic_json(rid: int, n: int, model: str) -> bytes:
    return json.dumps({
        "id": f"msg_soak{rid}", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": expected_text(rid, n)}], "stop_reason": "end_turn",
        "stop_sequence": None, "usage": {"input_tokens": 10, "output_tokens": n}},
        separators=(",", ":")).encode()


def openai_events(rid: int, n: int, model: str) -> list[bytes]:
    base = {"id": f"chatcmpl-soak{rid}", "object": "chat.completion.chunk", "created": 1760000000,
            "model": model}

    def chunk(choices: list[Any], **kw: Any) -> bytes:
        return b"data: " + json.dumps(dict(base, choices=choices, **kw),
                                      separators=(",", ":")).encode() + b"\n\n"
    ev = [chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                  "finish_reason": None}])]
    ev += [chunk([{"index": 0, "delta": {"content": f"ok-{rid}-"}, "finish_reason": None}])
           for _ in range(n)]
    ev += [chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
           chunk([], usage={"prompt_tokens": 10, "completion_tokens": n, "total_tokens": 10 + n}),
           b"data: [DONE]\n\n"]
    return ev


def openai_json(rid: int, n: int, model: str) -> bytes:
    return json.dumps({
        "id": f"chatcmpl-soak{rid}", "object": "chat.completion", "created": 1760000000,
        "model": model, "choices": [{"index": 0, "message": {"role": "assistant",
                                                             "content": expected_text(rid, n)},
                                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": n, "total_tokens": 10 + n}},
        separators=(",", ":")).encode()


def error_json(api: str, status: int) -> bytes:
    if api == "anthropic":
        etype = {429: "rate_limit_error", 529: "overloaded_error"}.get(status, "api_error")
        return json.dumps({"type": "error", "error": {"type": etype,
                                                      "message": f"fake {status}"}}).encode()
    return json.dumps({"error": {"message": f"fake {status}", "type": "server_error",
                                 "code": None}}).encode()


REASONS = {200: "OK", 429: "Too Many Requests", 500: "Internal Server Error",
           529: "Overloaded"}


def _head(status: int, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'X')}"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Fake:
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.stats: collections.Counter[str] = collections.Counter()
        self.once: set[str] = set()
        self.conns = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.conns += 1
        self.stats["connections"] += 1
        try:
            for _ in range(100_000):                    # bounded: requests per connection
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 120)
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                        asyncio.TimeoutError, ConnectionError):
                    return
                lines = head[:-4].decode("latin-1").split("\r\n")
                method, target = lines[0].split(" ")[:2]
                headers = {}
                for line in lines[1:]:
                    k, _, v = line.partition(":")
                    headers[k.strip().lower()] = v.strip()
                n = int(headers.get("content-length") or 0)
                try:
                    body = await asyncio.wait_for(reader.readexactly(n), 60) if n else b""
                except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
                    return
                keep = await self.answer(method, target.partition("?")[0], body, reader, writer)
                if not keep or headers.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, OSError):
            return
        finally:
            self.conns -= 1
            writer.close()

    async def answer(self, method: str, path: str, body: bytes, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> bool:
        """Write one answer; False: the connection must be closed now."""
        if method == "GET" and path == "/__stats":
            data = json.dumps(dict(self.stats, open_connections=self.conns)).encode()
            writer.write(_head(200, [("content-type", "application/json"),
                                     ("content-length", str(len(data)))]) + data)
            await writer.drain()
            return True
        if method != "POST" or path not in ("/v1/messages", "/v1/chat/completions"):
            writer.write(_head(404, [("content-length", "0")]))
            await writer.drain()
            return True
        api = "anthropic" if path == "/v1/messages" else "openai"
        stream = bool(_STREAM_TRUE.search(body))
        m = _DIRECTIVE.search(body)
        if not m:
            self.stats["no_directive"] += 1
            writer.write(_head(400, [("content-length", "0")]))
            await writer.drain()
            return True
        fault = m.group(1).decode()
        rid, n, k = int(m.group(2)), int(m.group(3)), int(m.group(4))
        gap_ms = int(m.group(5) or 0)
        mm = re.search(rb'"model"\s*:\s*"([^"]{0,100})"', body)
        model = mm.group(1).decode() if mm else "?"
        if self.mode == "healthy" and fault != "slow":
            fault = "none"
        if fault not in ("none", "slow", "malformed"):
            gap_ms = 0
        if fault == "e429_0once":
            key = f"{api}:{rid}"
            if key in self.once:
                fault = "none"
            else:
                if len(self.once) > 200_000:
                    self.once.clear()
                self.once.add(key)
                fault = "e429_0"
        self.stats[f"fault.{fault}"] += 1
        self.stats["requests"] += 1

        if fault == "refuse":
            return False
        if fault == "hang":
            deadline = time.monotonic() + HANG_MAX_S
            while time.monotonic() < deadline:          # until the peer closes, bounded
                try:
                    if not await asyncio.wait_for(reader.read(65536), deadline - time.monotonic()):
                        break
                except (asyncio.TimeoutError, ConnectionError):
                    break
            return False
        if fault in ("e429_0", "e429_5", "e500", "e529"):
            status = int(fault[1:4])
            data = error_json(api, status)
            hs = [("content-type", "application/json"), ("content-length", str(len(data)))]
            if status == 429:
                hs.append(("retry-after", "0" if fault == "e429_0" else "5"))
            writer.write(_head(status, hs) + data)
            await writer.drain()
            return True

        if not stream:
            data = anthropic_json(rid, n, model) if api == "anthropic" else openai_json(rid, n, model)
            if fault == "malformed":
                data = data[:-5] + b"}}oops"
            if fault == "cuteof":
                writer.write(_head(200, [("content-type", "application/json"),
                                         ("connection", "close")]) + data[:len(data) // 2])
                await writer.drain()
                return False
            hs = [("content-type", "application/json"), ("content-length", str(len(data)))]
            if fault in ("cut", "stall"):
                writer.write(_head(200, hs) + data[:len(data) // 2])
                await writer.drain()
                if fault == "stall":
                    await asyncio.sleep(STALL_S)
                return False
            out = _head(200, hs) + data
            if fault == "trickle":
                await self.trickle(writer, out)
            else:
                writer.write(out)
                await writer.drain()
            return True

        events = anthropic_events(rid, n, model) if api == "anthropic" else openai_events(rid, n, model)
        sse_head = [("content-type", "text/event-stream; charset=utf-8"),
                    ("cache-control", "no-cache")]
        if fault == "cuteof":
            k = min(k, len(events) - 1)
            out = _head(200, sse_head + [("connection", "close")])
            out += b"".join(events[:k]) + events[k][:len(events[k]) // 2]
            writer.write(out)
            await writer.drain()
            return False
        head = _head(200, sse_head + [("transfer-encoding", "chunked")])
        if fault in ("cut", "stall"):
            k = min(k, len(events) - 1)
            writer.write(head + b"".join(_chunk(e) for e in events[:k]))
            await writer.drain()
            if fault == "stall":
                await asyncio.sleep(STALL_S)
            else:
                half = events[k][:len(events[k]) // 2]
                writer.write(b"%x\r\n" % len(events[k]) + half)
                await writer.drain()
            return False
        if fault == "malformed":
            k = min(k, len(events))
            bad = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
                   b'"delta":{"type":"text_delta","text":"ok-\n\n') if api == "anthropic" else \
                (b'data: {"id":"chatcmpl-bad","choices":[{"index":0,"delta":{"content":"ok-\n\n')
            events = events[:k] + [bad] + events[k:]
        if fault == "trickle":
            await self.trickle(writer, head + b"".join(_chunk(e) for e in events) + b"0\r\n\r\n")
            return True
        writer.write(head)
        for i, e in enumerate(events):
            if gap_ms and i:                           # "slow", and streams the client drops
                await asyncio.sleep(gap_ms / 1000)
            writer.write(_chunk(e))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    @staticmethod
    async def trickle(writer: asyncio.StreamWriter, data: bytes) -> None:
        for i in range(0, len(data), TRICKLE_PIECE):    # bounded by the answer's size
            writer.write(data[i:i + TRICKLE_PIECE])
            await writer.drain()
            await asyncio.sleep(TRICKLE_GAP_S)


async def fake_main(mode: str, port: int) -> None:
    fake = Fake(mode)
    server = await asyncio.start_server(fake.handle, HOST, port, backlog=4096,
                                        limit=4 * 1024 * 1024)
    parent = os.getppid()
    deadline = time.monotonic() + FAKE_MAX_LIFE_S
    async with server:
        while time.monotonic() < deadline and os.getppid() == parent:   # bounded
            await asyncio.sleep(0.5)


# ============================================================================================
# Process helpers
# ============================================================================================

from procs import die_with_parent as _die_with_parent, free_port, stop, wait_http  # noqa: E402


def write_config(path: str, port: int, faulty: int, healthy: int) -> None:
    with open(path, "w") as f:
        f.write(f"""[server]
host = "127.0.0.1"
port = {port}
log_level = "warn"
# the breaker would put p1 last for most of the soak after 3 faults in a row; keep it in
# play (it still opens, briefly, on 8 in a row)
breaker_failures = 8
breaker_cooldown_ms = 500

[server.timeouts]
first_byte_timeout_ms = 500
idle_timeout_ms = 2000
retry_after_max_ms = 100

[router]
default = "ma"

[[providers]]
name = "p1a"
provider_type = "anthropic"
api_key = "sk-soak-p1a"
base_url = "http://127.0.0.1:{faulty}"

[[providers]]
name = "p2a"
provider_type = "anthropic"
api_key = "sk-soak-p2a"
base_url = "http://127.0.0.1:{healthy}"

[[providers]]
name = "p1o"
provider_type = "openai"
api_key = "sk-soak-p1o"
base_url = "http://127.0.0.1:{faulty}/v1"

[[providers]]
name = "p2o"
provider_type = "openai"
api_key = "sk-soak-p2o"
base_url = "http://127.0.0.1:{healthy}/v1"

[[models]]
name = "ma"
[[models.mappings]]
priority = 1
provider = "p1a"
actual_model = "fake-anthropic"
[[models.mappings]]
priority = 2
provider = "p2a"
actual_model = "fake-anthropic"

[[models]]
name = "mo"
[[models.mappings]]
priority = 1
provider = "p1o"
actual_model = "fake-openai"
[[models.mappings]]
priority = 2
provider = "p2o"
actual_model = "fake-openai"
""")


# ============================================================================================
# /proc readings
# ============================================================================================

def proc_mem(pid: int) -> dict[str, float]:
    out = {"VmRSS": float("nan"), "VmHWM": float("nan")}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0]) / 1024
    except OSError:
        pass
    return out


def proc_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def fd_breakdown(pid: int, ccm_port: int, upstream_ports: set[int]) -> dict[str, int]:
    """ccm's fds by kind: inbound client sockets, upstream sockets, listeners, other."""
    inodes: dict[str, str] = {}
    other = 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes[target[8:-1]] = fd
            else:
                other += 1
    except OSError:
        return {}
    kinds: collections.Counter[str] = collections.Counter(other=other)
    seen = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            parts = row.split()
            if len(parts) < 10 or parts[9] not in inodes:
                continue
            seen.add(parts[9])
            lport = int(parts[1].rsplit(":", 1)[1], 16)
            rport = int(parts[2].rsplit(":", 1)[1], 16)
            if parts[3] == "0A":
                kinds["listen"] += 1
            elif lport == ccm_port:
                kinds["client"] += 1
            elif rport in upstream_ports:
                kinds["upstream"] += 1
                kinds[f"upstream_{TCP_STATES.get(parts[3], parts[3])}"] += 1
            else:
                kinds["tcp_other"] += 1
    kinds["socket_other"] = len(inodes) - len(seen)
    return dict(kinds)


TCP_STATES = {"01": "ESTABLISHED", "02": "SYN_SENT", "04": "FIN_WAIT1", "05": "FIN_WAIT2",
              "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT", "09": "LAST_ACK",
              "0B": "CLOSING"}


class Sampler:
    """Samples ccm's RSS and fd count every 0.1 s while running (bounded by its stop())."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_rss = 0.0
        self.peak_fds = 0
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.peak_rss, self.peak_fds = 0.0, 0
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        for _ in range(10_000_000):
            rss = proc_mem(self.pid)["VmRSS"]
            if rss == rss:
                self.peak_rss = max(self.peak_rss, rss)
            self.peak_fds = max(self.peak_fds, proc_fds(self.pid))
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass


# ============================================================================================
# Client and classification
# ============================================================================================

@dataclass
class Plan:
    rid: int
    api: str            # anthropic | openai  (model ma | mo)
    stream: bool
    fault: str
    n: int
    k: int
    abort: bool
    gap_ms: int = 0

    def body(self) -> bytes:
        text = f"FAULT:{self.fault};ID:{self.rid};N:{self.n};K:{self.k}"
        if self.gap_ms:
            text += f";MS:{self.gap_ms}"
        return json.dumps({"model": "ma" if self.api == "anthropic" else "mo",
                           "max_tokens": 256, "stream": self.stream,
                           "messages": [{"role": "user", "content": text}]}).encode()


@dataclass
class Outcome:
    kind: str           # ok | clean | aborted | corrupt
    detail: str = ""
    status: int = 0
    ms: float = 0.0


class Bad(Exception):
    pass


def check_error_json(raw: bytes) -> str:
    try:
        obj = json.loads(raw)
    except ValueError:
        raise Bad(f"error body is not JSON: {raw[:200]!r}")
    if not (isinstance(obj, dict) and obj.get("type") == "error" and isinstance(obj.get("error"), dict)
            and isinstance(obj["error"].get("type"), str)
            and isinstance(obj["error"].get("message"), str)):
        raise Bad(f"error body is not an Anthropic error: {raw[:200]!r}")
    return obj["error"]["type"]


def check_message_json(raw: bytes, want: str) -> None:
    try:
        obj = json.loads(raw)
    except ValueError:
        raise Bad(f"200 body is not JSON ({len(raw)} bytes): {raw[:160]!r}...{raw[-60:]!r}")
    if not isinstance(obj, dict) or obj.get("type") != "message":
        raise Bad(f"200 body is not a message: {raw[:200]!r}")
    content = obj.get("content")
    if not (isinstance(content, list) and len(content) == 1 and isinstance(content[0], dict)
            and content[0].get("type") == "text"):
        raise Bad(f"unexpected content: {str(content)[:200]}")
    if content[0].get("text") != want:
        raise Bad(f"wrong text: {str(content[0].get('text'))[:120]!r} want {want[:60]!r}")
    if not obj.get("stop_reason"):
        raise Bad("no stop_reason")


class SSEChecker:
    """Strict Anthropic event-order and content check over the client's byte stream."""

    def __init__(self, want: str) -> None:
        self.want = want
        self.buf = b""
        self.state = "start"    # start -> msg -> block -> blocks_done -> delta_done -> stopped
        self.blocks = 0
        self.text = ""
        self.events = 0
        self.ended: str | None = None     # "stop" | "error"
        self.error_type = ""

    def feed(self, data: bytes) -> int:
        self.buf += data
        n = 0
        while b"\n\n" in self.buf:
            raw, self.buf = self.buf.split(b"\n\n", 1)
            self._event(raw)
            n += 1
        return n

    def _event(self, raw: bytes) -> None:
        if self.ended:
            raise Bad(f"bytes after {self.ended}: {raw[:120]!r}")
        name, data = None, []
        for line in raw.split(b"\n"):
            if line.startswith(b":"):
                continue
            if line.startswith(b"event: "):
                name = line[7:].decode()
            elif line.startswith(b"data: "):
                data.append(line[6:])
            else:
                raise Bad(f"malformed SSE line: {line[:120]!r}")
        if name is None or not data:
            raise Bad(f"event without name or data: {raw[:160]!r}")
        try:
            obj = json.loads(b"\n".join(data))
        except ValueError:
            raise Bad(f"data is not JSON in event {name}: {raw[:200]!r}")
        if not isinstance(obj, dict) or obj.get("type") != name:
            raise Bad(f"event {name} carries type {obj.get('type') if isinstance(obj, dict) else obj!r}")
        self.events += 1
        st = self.state
        if name == "ping":
            return
        if name == "error":
            e = obj.get("error")
            if not (isinstance(e, dict) and isinstance(e.get("type"), str)
                    and isinstance(e.get("message"), str)):
                raise Bad(f"malformed error event: {raw[:200]!r}")
            if not self.want.startswith(self.text):
                raise Bad(f"text before the error event is wrong: {self.text[:120]!r}")
            self.ended, self.error_type = "error", e["type"]
            return
        if name == "message_start":
            if st != "start":
                raise Bad(f"message_start in state {st}")
            if not isinstance(obj.get("message"), dict):
                raise Bad("message_start without message")
            self.state = "msg"
        elif name == "content_block_start":
            if st != "msg" or obj.get("index") != self.blocks:
                raise Bad(f"content_block_start index {obj.get('index')} in state {st}")
            if (obj.get("content_block") or {}).get("type") != "text":
                raise Bad(f"unexpected block {obj.get('content_block')}")
            self.state = "block"
        elif name == "content_block_delta":
            if st != "block" or obj.get("index") != self.blocks:
                raise Bad(f"content_block_delta index {obj.get('index')} in state {st}")
            d = obj.get("delta") or {}
            if d.get("type") != "text_delta" or not isinstance(d.get("text"), str):
                raise Bad(f"unexpected delta {d}")
            self.text += d["text"]
            if not self.want.startswith(self.text):
                raise Bad(f"wrong text so far: {self.text[:120]!r} want {self.want[:60]!r}")
        elif name == "content_block_stop":
            if st != "block" or obj.get("index") != self.blocks:
                raise Bad(f"content_block_stop index {obj.get('index')} in state {st}")
            self.blocks += 1
            self.state = "msg"
        elif name == "message_delta":
            if st != "msg":
                raise Bad(f"message_delta in state {st}")
            if not (obj.get("delta") or {}).get("stop_reason"):
                raise Bad("message_delta without stop_reason")
            self.state = "delta_done"
        elif name == "message_stop":
            if st != "delta_done":
                raise Bad(f"message_stop in state {st}")
            if self.text != self.want or self.blocks != 1:
                raise Bad(f"complete stream with wrong text {self.text[:120]!r} "
                          f"({self.blocks} blocks) want {self.want[:60]!r}")
            self.ended = "stop"
        else:
            raise Bad(f"unknown event {name}")

    def finish(self) -> str:
        if self.buf.strip():
            raise Bad(f"stream ended inside an event: {self.buf[:200]!r}")
        if not self.ended:
            raise Bad(f"stream ended after {self.events} events without message_stop or error "
                      f"(state {self.state}, text {self.text[:60]!r})")
        return self.ended


async def one_request(client: Any, url: str, plan: Plan) -> Outcome:
    import httpx
    want = expected_text(plan.rid, plan.n)
    t0 = time.monotonic()
    headers = {"content-type": "application/json", "anthropic-version": "2023-06-01",
               "x-api-key": "sk-ant-soak-client"}
    status = 0

    async def go() -> Outcome:
        nonlocal status
        async with client.stream("POST", url, content=plan.body(), headers=headers) as resp:
            status = resp.status_code
            ctype = resp.headers.get("content-type", "")
            if status != 200:
                raw = await resp.aread()
                etype = check_error_json(raw)
                return Outcome("clean", f"{status} {etype}", status)
            if not plan.stream:
                raw = await resp.aread()
                check_message_json(raw, want)
                return Outcome("ok", "", status)
            if "text/event-stream" not in ctype:
                raise Bad(f"stream answered with content-type {ctype!r}")
            chk = SSEChecker(want)
            async for data in resp.aiter_raw():         # to EOF: nothing may follow the end
                got = chk.feed(data)
                if plan.abort and got:
                    return Outcome("aborted", "", status)      # closing the response drops it
            end = chk.finish()
            if end == "error":
                return Outcome("clean", f"event: error {chk.error_type}", status)
            return Outcome("ok", "", status)

    try:
        out = await asyncio.wait_for(go(), CLIENT_TIMEOUT_S)
    except asyncio.TimeoutError:
        out = Outcome("corrupt", f"LOST: no complete answer within {CLIENT_TIMEOUT_S:g} s", status)
    except Bad as exc:
        out = Outcome("corrupt", str(exc), status)
    except httpx.HTTPError as exc:
        out = Outcome("corrupt", f"transport {type(exc).__name__}: {exc}", status)
    except Exception as exc:                             # a client-side surprise: reported too
        out = Outcome("corrupt", f"client exception {type(exc).__name__}: {exc}", status)
    out.status = status
    out.ms = (time.monotonic() - t0) * 1000
    return out


def make_plans(rng: random.Random, count: int, start_id: int,
               abort_rate: float = 0.05) -> list[Plan]:
    names, weights = list(FAULTS), list(FAULTS.values())
    plans = []
    for i in range(count):
        api = rng.choice(("anthropic", "openai"))
        stream = rng.random() < 0.6
        fault = rng.choices(names, weights)[0]
        n = rng.randint(1, 12)
        k = rng.randint(0, n + 5)
        abort = stream and rng.random() < abort_rate
        # a dropped stream's healthy answer is paced (100 ms per event) so the drop lands
        # mid-stream, while ccm is still relaying
        plans.append(Plan(start_id + i, api, stream, fault, n, k, abort, 100 if abort else 0))
    return plans


async def settle(ctl: httpx.AsyncClient, base: str, pid: int) -> dict[str, Any]:
    """Wait up to ~10 s for ccm to go idle (in_flight 0, open fds stable); its last /health."""
    health: dict[str, Any] = {}
    fds_hist: list[int] = []
    for _ in range(40):                              # bounded: 40 x 0.25 s
        await asyncio.sleep(0.25)
        fds_hist.append(proc_fds(pid))
        try:
            health = await get_json(ctl, base + "/health")
        except (httpx.HTTPError, ValueError):
            continue
        if (health.get("counters", {}).get("in_flight", 0) == 0 and len(fds_hist) >= 8
                and len(set(fds_hist[-8:])) == 1):
            break
    return health


async def get_json(client: Any, url: str) -> dict[str, Any]:
    r = await client.get(url, timeout=10, headers={"connection": "close"})   # holds no fd
    return r.json()


def pct(vals: list[float], p: float) -> float:
    if not vals:
        return float("nan")
    vals = sorted(vals)
    return vals[min(len(vals) - 1, int(p / 100 * len(vals)))]


# ============================================================================================
# Main
# ============================================================================================

async def run(args: argparse.Namespace, ccm_port: int, ccm: subprocess.Popen[Any],
              fake_ports: dict[str, int], log_path: str) -> int:
    import httpx
    pid = ccm.pid
    base = f"http://{HOST}:{ccm_port}"
    url = base + "/v1/messages"
    rng = random.Random(args.seed)
    problems: list[str] = []
    w = print

    ctl = httpx.AsyncClient(trust_env=False, timeout=10)
    await asyncio.sleep(0.5)
    mem_start, fds_start = proc_mem(pid), proc_fds(pid)
    up_ports = set(fake_ports.values())
    fdk_start = fd_breakdown(pid, ccm_port, up_ports)
    sampler = Sampler(pid)

    # ---- phase 1: fault soak ------------------------------------------------------------
    plans = make_plans(rng, args.requests, 1, args.abort_rate)
    results: list[tuple[Plan, Outcome]] = []
    limits = httpx.Limits(max_connections=args.concurrency + 8,
                          max_keepalive_connections=args.concurrency + 8)
    client = httpx.AsyncClient(trust_env=False, limits=limits,
                               timeout=httpx.Timeout(CLIENT_TIMEOUT_S))
    queue = iter(plans)

    async def worker() -> None:
        for plan in queue:                           # bounded: the plans
            results.append((plan, await one_request(client, url, plan)))

    sampler.start()
    t0 = time.monotonic()
    phase1_limit = 60 + args.requests * 0.05
    try:
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(args.concurrency))),
                               phase1_limit)
    except asyncio.TimeoutError:
        problems.append(f"phase 1 did not finish within {phase1_limit:g} s "
                        f"({len(results)}/{len(plans)} answered)")
    soak_s = time.monotonic() - t0
    await client.aclose()
    await sampler.stop()
    peak_fds_soak, peak_rss_soak = sampler.peak_fds, sampler.peak_rss

    # settle: wait up to ~10 s for ccm to go idle (in_flight 0, fds stable)
    health_mid = await settle(ctl, base, pid)
    mem_after, fds_after = proc_mem(pid), proc_fds(pid)
    fdk_after = fd_breakdown(pid, ccm_port, up_ports)

    # ---- phase 2: concurrent slow streams ---------------------------------------------------
    nstreams = args.streams
    splans = []
    for i in range(nstreams):
        n = rng.randint(15, 25)                      # 200 ms apart: 3-5 s per stream
        splans.append(Plan(1_000_000 + i, "anthropic" if i % 2 else "openai", True, "slow",
                           n, 0, False, gap_ms=200))
    open_now = 0
    max_open = 0
    slimits = httpx.Limits(max_connections=nstreams + 8, max_keepalive_connections=nstreams + 8)
    sclient = httpx.AsyncClient(trust_env=False, limits=slimits,
                                timeout=httpx.Timeout(CLIENT_TIMEOUT_S))

    async def slow(plan: Plan) -> Outcome:
        nonlocal open_now, max_open
        open_now += 1
        max_open = max(max_open, open_now)
        try:
            return await one_request(sclient, url, plan)
        finally:
            open_now -= 1

    sampler.start()
    t1 = time.monotonic()
    sresults: list[Outcome] = []
    try:
        sresults = await asyncio.wait_for(asyncio.gather(*(slow(p) for p in splans)), 120)
    except asyncio.TimeoutError:
        problems.append("phase 2 did not finish within 120 s")
    streams_s = time.monotonic() - t1
    await sclient.aclose()
    await sampler.stop()
    peak_rss_streams, peak_fds_streams = sampler.peak_rss, sampler.peak_fds
    hwm_after_streams = proc_mem(pid)["VmHWM"]

    health = await settle(ctl, base, pid)
    mem_end, fds_end = proc_mem(pid), proc_fds(pid)
    fdk_end = fd_breakdown(pid, ccm_port, up_ports)
    fake_stats = {}
    for name, port in fake_ports.items():
        with_ctx = await get_json(ctl, f"http://{HOST}:{port}/__stats")
        fake_stats[name] = with_ctx
    await ctl.aclose()

    # ---- report -----------------------------------------------------------------------------
    by_fault: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    by_path: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    corrupt: list[tuple[Plan, Outcome]] = []
    clean_kinds: collections.Counter[str] = collections.Counter()
    ok_ms = []
    for plan, out in results:
        by_fault[plan.fault][out.kind] += 1
        by_fault[plan.fault]["sent"] += 1
        path = f"{plan.api}/{'stream' if plan.stream else 'json'}"
        by_path[path][out.kind] += 1
        by_path[path]["sent"] += 1
        if out.kind == "corrupt":
            corrupt.append((plan, out))
        elif out.kind == "clean":
            clean_kinds[out.detail] += 1
        elif out.kind == "ok":
            ok_ms.append(out.ms)
    tot = collections.Counter(out.kind for _, out in results)
    s_ok = sum(1 for o in sresults if o.kind == "ok")
    s_bad = [(p, o) for p, o in zip(splans, sresults) if o.kind != "ok"]

    w(f"\nphase 1: {len(results)} requests, c={args.concurrency}, {soak_s:.1f} s "
      f"({len(results) / max(soak_s, 1e-9):.0f} req/s); OK latency p50 {pct(ok_ms, 50):.0f} ms, "
      f"p99 {pct(ok_ms, 99):.0f} ms")
    w(f"  {'fault':<12} {'sent':>6} {'ok':>6} {'clean':>6} {'abort':>6} {'corrupt':>7}   "
      f"(upstream saw: faulty fake)")
    fs = fake_stats.get("faulty", {})
    for name in FAULTS:
        c = by_fault.get(name, collections.Counter())
        seen = fs.get(f"fault.{name}", 0)
        if name == "e429_0once":
            seen = f"{seen} (+ first 429s counted as e429_0)"
        w(f"  {name:<12} {c['sent']:>6} {c['ok']:>6} {c['clean']:>6} {c['aborted']:>6} "
          f"{c['corrupt']:>7}   {seen}")
    w(f"  {'path':<18} {'sent':>6} {'ok':>6} {'clean':>6} {'abort':>6} {'corrupt':>7}")
    for path in sorted(by_path):
        c = by_path[path]
        w(f"  {path:<18} {c['sent']:>6} {c['ok']:>6} {c['clean']:>6} {c['aborted']:>6} "
          f"{c['corrupt']:>7}")
    if clean_kinds:
        w("  clean errors: " + ", ".join(f"{k} x{v}" for k, v in clean_kinds.most_common()))
    if corrupt:
        w(f"  LOST/CORRUPT ({len(corrupt)}), by fault/path/reason:")
        groups: dict[tuple[str, str, str], list[tuple[Plan, Outcome]]] = collections.defaultdict(list)
        for plan, out in corrupt:
            reason = re.sub(r"\d+", "#", out.detail)[:70]
            groups[(plan.fault, f"{plan.api}/{'stream' if plan.stream else 'json'}", reason)].append(
                (plan, out))
        for (fault, path, _), items in sorted(groups.items(), key=lambda kv: -len(kv[1]))[:15]:
            plan, out = items[0]
            w(f"    {len(items):>5} x fault={fault} {path} n={plan.n} k={plan.k} "
              f"status={out.status}: {out.detail[:300]}")

    w(f"\nphase 2: {nstreams} slow streams, max open at once {max_open}, "
      f"{s_ok}/{len(splans)} byte-exact, {streams_s:.1f} s")
    for plan, out in s_bad[:10]:
        w(f"    id={plan.rid} {plan.api}: {out.kind} status={out.status} {out.detail[:300]}")

    c = health.get("counters", {})
    reqs, ok, err, ab = (c.get("requests", 0), c.get("responses.ok", 0),
                         c.get("responses.error", 0), c.get("responses.client_aborted", 0))
    infl = c.get("in_flight", 0)
    sent_total = len(results) + len(sresults)
    w("\nccm /health counters:")
    for k in sorted(c):
        if k.split(".")[0] in ("requests", "responses", "failovers", "retries", "in_flight",
                               "failures", "breaker_opened", "status", "errors"):
            w(f"  {k:<34} {c[k]}")
    failovers = sum(v for k, v in c.items() if k.startswith("failovers."))
    retries = sum(v for k, v in c.items() if k.startswith("retries."))

    # checks
    if tot["corrupt"]:
        problems.append(f"{tot['corrupt']} LOST/CORRUPT answers in phase 1")
    if len(results) != len(plans):
        problems.append(f"phase 1 answered {len(results)} of {len(plans)}")
    if s_ok != nstreams:
        problems.append(f"phase 2: {nstreams - s_ok} of {nstreams} slow streams not byte-exact")
    if max_open < nstreams:
        problems.append(f"phase 2: only {max_open} of {nstreams} streams were open at once")
    if reqs != ok + err + ab:
        problems.append(f"/health: requests {reqs} != ok {ok} + error {err} + client_aborted {ab} "
                        f"(= {ok + err + ab}, difference {reqs - ok - err - ab})")
    if infl != 0:
        problems.append(f"/health: in_flight = {infl} at the end (idle)")
    if reqs != sent_total:
        problems.append(f"/health: requests {reqs} != requests sent {sent_total}")
    leak_after = fds_after - fdk_after.get("upstream", 0) - (fds_start - fdk_start.get("upstream", 0))
    leak_end = fds_end - fdk_end.get("upstream", 0) - (fds_start - fdk_start.get("upstream", 0))
    if leak_after > 2 or leak_end > 2:
        problems.append(f"fd leak: beyond idle upstream pool, +{leak_after} after the soak, "
                        f"+{leak_end} at the end (start {fdk_start}, after soak {fdk_after}, "
                        f"end {fdk_end})")
    if fdk_end.get("upstream", 0) > UPSTREAM_KEEPALIVE_MAX + 2:
        problems.append(f"{fdk_end['upstream']} upstream sockets held while idle "
                        f"(pool keeps at most {UPSTREAM_KEEPALIVE_MAX})")
    if ccm.poll() is not None:
        problems.append(f"ccm exited with status {ccm.returncode}")
    with open(log_path, errors="replace") as f:
        log = f.read()
    levels = collections.Counter(m.group(1) for m in re.finditer(
        r"\b(DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL)\b", log))
    if "Traceback" in log or levels.get("ERROR") or levels.get("CRITICAL"):
        problems.append("ccm logged errors/tracebacks (see log excerpt below)")

    pf = lambda v: f"{v:.1f}"                       # noqa: E731
    rows = [
        ("requests (phase 1 / phase 2)", f"{len(results)} / {len(sresults)}"),
        ("ok (byte-exact)", f"{tot['ok']} / {s_ok}"),
        ("clean errors", f"{tot['clean']}"),
        ("client aborts (deliberate)", f"{tot['aborted']} (ccm counted {ab} as client_aborted)"),
        ("LOST/CORRUPT", f"{tot['corrupt']} / {len(s_bad)}"),
        ("ccm requests = ok + error + aborted",
         f"{reqs} = {ok} + {err} + {ab}  (in_flight {infl})"),
        ("failovers / retries (ccm)", f"{failovers} / {retries}"),
        ("RSS MB start / after soak / end", f"{pf(mem_start['VmRSS'])} / "
         f"{pf(mem_after['VmRSS'])} / {pf(mem_end['VmRSS'])}"),
        ("RSS MB peak soak / streams (VmHWM)", f"{pf(peak_rss_soak)} / {pf(peak_rss_streams)} "
         f"({pf(hwm_after_streams)})"),
        ("fds start / after soak / end", f"{fds_start} / {fds_after} / {fds_end}"),
        ("fds peak soak / streams", f"{peak_fds_soak} / {peak_fds_streams}"),
        ("fds by kind start", str(fdk_start)),
        ("fds by kind after soak", str(fdk_after)),
        ("fds by kind end", str(fdk_end)),
        ("duration soak / streams", f"{soak_s:.1f} s / {streams_s:.1f} s"),
        ("ccm log lines by level", str(dict(levels)) or "{}"),
    ]
    w("\n" + "-" * 78)
    for k, v in rows:
        w(f"  {k:<38} {v}")
    w("-" * 78)
    if problems:
        w("PROBLEMS:")
        for p in problems:
            w(f"  - {p}")
        tail = [line for line in log.splitlines() if line.strip()]
        interesting = [line for line in tail if "Traceback" in line or "ERROR" in line
                       or "Error" in line][:10]
        if interesting:
            w("ccm log excerpt:")
            for line in interesting:
                w(f"  | {line[:300]}")
    w(f"RESULT: {'FAIL' if problems else 'PASS'}")
    return 1 if problems else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--streams", type=int, default=500)
    ap.add_argument("--quick", action="store_true", help="2000 requests, c=32, 100 streams")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--faults", default="", metavar="NAME=W,...",
                    help="override fault weights (per mille), e.g. none=900,hang=100 "
                         "(to narrow down a problem)")
    ap.add_argument("--abort-rate", type=float, default=0.05,
                    help="share of streams the client drops after the first event")
    ap.add_argument("--fake", nargs=2, metavar=("MODE", "PORT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.fake:
        mode, port = args.fake
        if mode not in ("faulty", "healthy"):
            ap.error("--fake MODE must be faulty or healthy")
        asyncio.run(fake_main(mode, int(port)))
        return 0
    if args.faults:
        weights = {}
        for item in args.faults.split(","):
            name, _, wt = item.partition("=")
            if name not in FAULTS or not wt.isdigit():
                ap.error(f"--faults: unknown fault or weight {item!r} (known: {', '.join(FAULTS)})")
            weights[name] = int(wt)
        FAULTS.clear()
        FAULTS.update(weights)
    if args.quick:
        args.requests, args.concurrency, args.streams = 2000, 32, 100
    if args.seed is None:
        args.seed = random.randrange(1 << 30)
    args.requests = max(1, min(args.requests, 1_000_000))
    args.concurrency = max(1, min(args.concurrency, 1000))
    args.streams = max(1, min(args.streams, 1900))
    try:
        import httpx  # noqa: F401
    except ImportError:
        print("soak.py needs httpx (pip install httpx)", file=sys.stderr)
        return 2
    print(f"ccm soak: requests={args.requests} concurrency={args.concurrency} "
          f"streams={args.streams} seed={args.seed}", flush=True)

    procs: list[subprocess.Popen[Any]] = []
    tmp = tempfile.TemporaryDirectory(prefix="ccm-soak-")
    log_path = os.path.join(tmp.name, "ccm.log")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env["HOME"] = tmp.name                          # ccm's secret / admin token stay in the temp dir
    rc = 1
    try:
        fake_ports = {"faulty": free_port(), "healthy": free_port()}
        for mode, port in fake_ports.items():
            procs.append(subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--fake", mode, str(port)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env,
                preexec_fn=_die_with_parent))
        for p, port in zip(procs, fake_ports.values()):
            wait_http(port, "/__stats", p, 15)
        ccm_port = free_port()
        cfg = os.path.join(tmp.name, "config.toml")
        write_config(cfg, ccm_port, fake_ports["faulty"], fake_ports["healthy"])
        with open(log_path, "wb") as log:
            ccm = subprocess.Popen([sys.executable, CCM_PY, "-c", cfg, "serve"],
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                   cwd=tmp.name, preexec_fn=_die_with_parent)
        procs.append(ccm)
        try:
            wait_http(ccm_port, "/health", ccm, 20)
        except RuntimeError as exc:
            print(f"ccm did not come up: {exc}", file=sys.stderr)
            with open(log_path, errors="replace") as f:
                sys.stderr.write(f.read()[-4000:])
            return 1
        total_limit = 60 + args.requests * 0.05 + 120 + 60
        try:
            rc = asyncio.run(asyncio.wait_for(run(args, ccm_port, ccm, fake_ports, log_path),
                                              total_limit))
        except asyncio.TimeoutError:
            print(f"soak: gave up after {total_limit:g} s", file=sys.stderr)
            rc = 1
    finally:
        for p in reversed(procs):
            stop(p)
        tmp.cleanup()
    return rc


if __name__ == "__main__":
    sys.exit(main())
