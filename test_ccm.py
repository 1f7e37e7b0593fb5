"""Tests for ccm, in the order of ccm.py's sections: pure sections first, then sockets, then the CLI.

Fake upstreams are in-process asyncio servers written independently of ccm's own HTTP server,
so a bug in ccm's server cannot hide itself. Every network peer is on 127.0.0.1.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import os
import socket
import threading
import time
from typing import Any, Callable, Iterator

import httpx
import pytest

import ccm

os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")

# ============================================================================================
# Fixtures and fakes
# ============================================================================================


@pytest.fixture(autouse=True)
def tmp_home(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """No test ever touches the real ~/.claude-code-mux."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CCM_CONFIG", str(tmp_path / ".claude-code-mux" / "config.toml"))
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
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
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


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
    done: bool = True                    # OpenAI streams: end with data: [DONE]


@dataclasses.dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


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


class FakeUpstream:
    """A scripted Anthropic- or OpenAI-format server on 127.0.0.1 that records every request."""

    def __init__(self, lt: LoopThread, kind: str) -> None:
        self.lt = lt
        self.kind = kind
        self.replies: collections.deque[Reply] = collections.deque()
        self.seen: list[Seen] = []
        self.open_connections = 0
        self.aborted = threading.Event()     # a client closed while we were still writing
        self.server: asyncio.AbstractServer = lt.run(self._start())
        self.port = self.server.sockets[0].getsockname()[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}" + ("/v1" if self.kind == "openai" else "")

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
                self.seen.append(Seen(method, target, headers, body))
                reply = self.replies.popleft() if self.replies else self._default(target, body)
                if not await self._answer(writer, reply, target, body):
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

    def _default(self, target: str, body: bytes) -> Reply:
        if target.startswith("/v1/messages/count_tokens"):
            return Reply(json={"input_tokens": 42})
        data = json.loads(body or b"{}")
        if self.kind == "openai":
            return Reply(events=openai_chunks()) if data.get("stream") else Reply(json=openai_completion())
        model = data.get("model", "m")
        return Reply(events=anthropic_events(model=model)) if data.get("stream") else \
            Reply(json=anthropic_message(model=model))

    def _encode_events(self, reply: Reply) -> list[bytes]:
        out = []
        for ev in reply.events or []:
            if isinstance(ev, bytes):
                out.append(ev)
            elif isinstance(ev, tuple):
                out.append(f"event: {ev[0]}\ndata: {json.dumps(ev[1])}\n\n".encode())
            else:
                out.append(f"data: {json.dumps(ev)}\n\n".encode())
        if self.kind == "openai" and reply.done and reply.events is not None:
            out.append(b"data: [DONE]\n\n")
        return out

    async def _answer(self, writer: asyncio.StreamWriter, reply: Reply, target: str,
                      body: bytes) -> bool:
        if reply.hang:
            await asyncio.sleep(3600)
        if reply.first_byte_delay:
            await asyncio.sleep(reply.first_byte_delay)
        headers = dict(reply.headers)
        if reply.events is not None:
            headers.setdefault("content-type", "text/event-stream")
            pieces = self._encode_events(reply)
        else:
            headers.setdefault("content-type", "application/json")
            pieces = [reply.raw if reply.raw is not None else json.dumps(reply.json).encode()]
        payload = b"".join(pieces)
        head = f"HTTP/1.1 {reply.status} X\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write((head + "transfer-encoding: chunked\r\n\r\n").encode())
        segments = self._segments(reply, pieces, payload)
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

    def _segments(self, reply: Reply, pieces: list[bytes], payload: bytes) -> list[bytes]:
        if reply.split_at:
            cuts = [0, *sorted(reply.split_at), len(payload)]
            return [payload[a:b] for a, b in zip(cuts, cuts[1:])]
        return pieces

    def close(self) -> None:
        self.server.close()


@pytest.fixture(scope="module")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.stop()


@pytest.fixture
def fake_upstream(loop_thread: LoopThread) -> Iterator[Callable[[str], FakeUpstream]]:
    made: list[FakeUpstream] = []

    def make(kind: str = "anthropic") -> FakeUpstream:
        f = FakeUpstream(loop_thread, kind)
        made.append(f)
        return f
    yield make
    for f in made:
        f.close()


class CCM:
    """ccm's real server on 127.0.0.1:0 in its own loop thread."""

    def __init__(self, cfg_text: str, path: str) -> None:
        with open(path, "w") as f:
            f.write(cfg_text)
        os.chmod(path, 0o600)
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


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = ccm.main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


BASIC_REQ = {"model": "claude-opus-4-8", "max_tokens": 100,
             "messages": [{"role": "user", "content": "hi"}]}


def simple_cfg(up: FakeUpstream, kind: str = "anthropic", extra_server: str = "") -> str:
    return (f'[server]\n{extra_server}\n[router]\ndefault = "m"\n\n'
            + provider_toml("p1", kind, up.base_url) + model_toml("m", ("p1", "real-model")))
