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

import io
import re
import stat
import sys
import tomllib
from typing import Any
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


# ============================================================================================
# Config, routing and CLI
# ============================================================================================

# Config, routing and CLI tests for ccm (issue: Rust claude-code-mux compatible config and router).
# Order as in ccm.py: config (pure), routing (pure, table-driven), the server end to end, the CLI.




PROVIDER_KEY = "sk-test-provider-key-0001"
CLIENT_KEY = "sk-ant-client-own-key-9999"


def cfg_of(text: str) -> "ccm.Config":
    return ccm.parse_config(tomllib.loads(text))


def config_errors(text: str) -> list[str]:
    with pytest.raises(ccm.ConfigError) as ei:
        cfg_of(text)
    return ei.value.errors


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """run_cli, but an argparse exit (SystemExit) also counts as the exit code."""
    try:
        return run_cli(capsys, *argv)
    except SystemExit as exc:
        cap = capsys.readouterr()
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        return code, cap.out, cap.err


def write_cfg(tmp_home: Any, text: str) -> str:
    path = os.environ["CCM_CONFIG"]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)
    return path


# ============================================================================================
# 6. Config
# ============================================================================================

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


# ============================================================================================
# 7. Routing (pure, table-driven)
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


def user(*blocks: Any) -> dict[str, Any]:
    if len(blocks) == 1 and isinstance(blocks[0], str):
        return {"role": "user", "content": blocks[0]}
    return {"role": "user", "content": [b if isinstance(b, dict) else {"type": "text", "text": b}
                                        for b in blocks]}


def assistant(text: str = "ok") -> dict[str, Any]:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


IMG = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
WEB = {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}
TOOL = {"name": "Read", "description": "read", "input_schema": {"type": "object"}}
PLAN_ON = "<system-reminder>Plan mode is active. The user indicated that they do not want you to execute yet</system-reminder>"
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


# ============================================================================================
# 15. Server, end to end (routing visible to the client)
# ============================================================================================


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


# ============================================================================================
# 18. CLI
# ============================================================================================

CLI_CFG = ('[server]\napi_key = "ccm-server-secret-123456"\n\n[router]\ndefault = "m"\nthink = "t"\n\n'
           + provider_toml("p1", "anthropic", "http://127.0.0.1:9")
           + provider_toml("p2", "openai", "http://127.0.0.1:9/v1", key="sk-openai-secret-00000000")
           + model_toml("m", ("p1", "real-model"), ("p2", "gpt-real"))
           + model_toml("t", ("p2", "gpt-think")))


def test_cli_no_args_prints_help(capsys: Any) -> None:
    code, out, err = cli(capsys)
    assert code == 0
    assert "usage" in out.lower() and "route" in out and "config" in out


@pytest.mark.parametrize("argv", [("frobnicate",), ("config", "explode"), ("route", "x.json")],
                         ids=["unknown-command", "unknown-config-action", "route-without-dry-run"])
def test_cli_usage_errors_exit_2(capsys: Any, argv: tuple[str, ...]) -> None:
    code, out, err = cli(capsys, *argv)
    assert code == 2
    assert "ccm: error" in err and "Traceback" not in err


def test_cli_serve_first_run_writes_default_config(capsys: Any, tmp_home: Any,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    served: list[Any] = []

    async def fake_serve(cfg: Any) -> int:      # everything up to listening is real
        served.append(cfg)
        return 0
    monkeypatch.setattr(ccm, "_serve", fake_serve)
    monkeypatch.setattr(ccm, "setup_logging", lambda *a, **k: None)
    path = os.environ["CCM_CONFIG"]
    assert not os.path.exists(path)
    code, out, err = cli(capsys, "serve")
    assert code == 0, err
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path in err and "Traceback" not in err
    [cfg] = served
    assert cfg.server.port == 13456 and cfg.router.default


def test_cli_config_path(capsys: Any, tmp_home: Any) -> None:
    code, out, _ = cli(capsys, "config", "path")
    assert code == 0 and out.strip() == os.environ["CCM_CONFIG"]
    other = str(tmp_home / "elsewhere.toml")
    code, out, _ = cli(capsys, "--config", other, "config", "path")
    assert code == 0 and out.strip() == other


def test_cli_config_check_ok(capsys: Any, tmp_home: Any) -> None:
    path = write_cfg(tmp_home, CLI_CFG)
    code, out, err = cli(capsys, "config", "check")
    assert code == 0 and "ok" in out and path in out
    assert "error" not in err


def test_cli_config_check_unknown_key_warns(capsys: Any, tmp_home: Any) -> None:
    write_cfg(tmp_home, CLI_CFG.replace("[router]\n", '[router]\nfancy = 1\n'))
    code, out, err = cli(capsys, "config", "check")
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
    code, out, err = cli(capsys, "config", "check")
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
    code, out, err = cli(capsys, *command)
    assert code == 2 and "router.think_trigger" in err and "Traceback" not in err


def test_cli_config_show_masks_keys(capsys: Any, tmp_home: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZAI_KEY", "zai-secret-from-env-000000")
    text = CLI_CFG + provider_toml("p3", "z.ai", "http://127.0.0.1:9", key="$ZAI_KEY",
                                   extra='api_keys = ["pool-secret-key-aaaaaaaa", "pool-secret-key-bbbbbbbb"]')
    write_cfg(tmp_home, text)
    code, out, err = cli(capsys, "config", "show")
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
    code, out, _ = cli(capsys, "config", "show")
    assert code == 0 and "hdr-secret-token-0000000" not in out


def _req_file(tmp_home: Any, body: Any) -> str:
    path = tmp_home / "req.json"
    path.write_text(json.dumps(body))
    return str(path)


def test_cli_route_dry_run_text(capsys: Any, tmp_home: Any) -> None:
    write_cfg(tmp_home, CLI_CFG)
    code, out, err = cli(capsys, "route", "--dry-run", _req_file(tmp_home, BASIC_REQ))
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
    code, out, err = cli(capsys, "route", "--dry-run", "--json", _req_file(tmp_home, body))
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
    code, out, err = cli(capsys, "route", "--dry-run", "--json", "-")
    assert code == 0, err
    info = json.loads(out)
    assert info["rule"] == "default" and [p["provider"] for p in info["providers"]] == ["p1", "p2"]
    assert [p["request"]["body"]["model"] for p in info["providers"]] == ["real-model", "gpt-real"]


def test_cli_route_dry_run_headers_pin_and_subagent(capsys: Any, tmp_home: Any) -> None:
    write_cfg(tmp_home, CLI_CFG.replace('think = "t"', 'think = "t"\nsubagent = "t"'))
    path = _req_file(tmp_home, BASIC_REQ)
    code, out, err = cli(capsys, "route", "--dry-run", "--json", "-H", "x-claude-code-agent-id: a1", path)
    assert code == 0, err
    assert json.loads(out)["rule"] == "subagent"
    code, out, err = cli(capsys, "route", "--dry-run", "--json", "-H", "X-Provider: p2", path)
    assert code == 0, err
    assert [p["provider"] for p in json.loads(out)["providers"]] == ["p2"]


def test_cli_route_dry_run_masks_passed_through_client_key(capsys: Any, tmp_home: Any) -> None:
    write_cfg(tmp_home, '[router]\ndefault = "m"\n\n'
              + provider_toml("p1", "anthropic", "http://127.0.0.1:9", key=None)
              + model_toml("m", ("p1", "real-model")))
    code, out, err = cli(capsys, "route", "--dry-run", "-H", f"x-api-key: {CLIENT_KEY}",
                         _req_file(tmp_home, BASIC_REQ))
    assert code == 0, err
    assert CLIENT_KEY not in out and ccm.mask_secret(CLIENT_KEY) in out


def test_cli_route_dry_run_unknown_model_fails_cleanly(capsys: Any, tmp_home: Any) -> None:
    write_cfg(tmp_home, CLI_CFG)
    code, out, err = cli(capsys, "route", "--dry-run", _req_file(tmp_home, dict(BASIC_REQ, model="zzz")))
    assert code != 0 and "ccm: error" in err and "zzz" in err and "Traceback" not in err
