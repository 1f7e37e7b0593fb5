"""Token counting speed and memory: cold and warm counts of Claude Code-like requests.

    python bench/tokens.py

Prints the RSS cost of loading cl100k_base, then for requests of about 10 KB, 100 KB and 1 MB
the time of the first (cold) count and of a repeated (warm) count of a freshly parsed copy of
the same request, as Claude Code resends its system prompt and tools on every turn.
"""
from __future__ import annotations

import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import ccm  # noqa: E402

WORDS = ("the quick brown fox jumps over the lazy dog function return value error config proxy "
         "request stream token model provider route file path line self import class def").split()


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def text(rng: random.Random, n_chars: int) -> str:
    out, size = [], 0
    while size < n_chars:
        w = rng.choice(WORDS)
        out.append(w)
        size += len(w) + 1
    return " ".join(out)


def request(size: int, rng: random.Random) -> dict:
    """About `size` bytes: system 20%, tools 40%, conversation 40%."""
    tools = [{"name": f"Tool{i}", "description": text(rng, 1500),
              "input_schema": {"$schema": "https://json-schema.org/draft/2020-12/schema",
                               "type": "object", "additionalProperties": False,
                               "properties": {f"arg{j}": {"type": "string", "description": text(rng, 150)}
                                              for j in range(5)}}}
             for i in range(max(1, int(size * 0.4) // 2400))]
    turns, convo = [], int(size * 0.4)
    i = 0
    while convo > 0:
        chunk = min(convo, 4000)
        turns.append({"role": "assistant", "content": [
            {"type": "text", "text": text(rng, 200)},
            {"type": "tool_use", "id": f"toolu_{i:04d}", "name": "Read", "input": {"file_path": f"/src/f{i}.py"}}]})
        turns.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": f"toolu_{i:04d}", "content": text(rng, chunk)}]})
        convo -= chunk + 300
        i += 1
    return {"model": "claude-opus-4-8", "max_tokens": 32000,
            "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.197.abc;"},
                       {"type": "text", "text": text(rng, int(size * 0.2))}],
            "tools": tools,
            "messages": [{"role": "user", "content": text(rng, 500)}, *turns]}


def main() -> int:
    before = rss_mb()
    t0 = time.perf_counter()
    ccm.COUNTER.encoding()
    load_ms = (time.perf_counter() - t0) * 1000
    print(f"encoding: {ccm.COUNTER.method}; load {load_ms:.0f} ms; RSS {before:.1f} -> {rss_mb():.1f} MB "
          f"(+{rss_mb() - before:.1f} MB)")
    print(f"{'request':>10} {'tokens':>8} {'cold ms':>9} {'warm ms':>9} {'warm p99 ms':>12}")
    for size in (10_000, 100_000, 1_000_000):
        rng = random.Random(size)
        raw = json.dumps(request(size, rng))
        counter = ccm.TokenCounter(loader=lambda: (ccm.COUNTER._enc, ccm.COUNTER.method))
        body = json.loads(raw)
        t0 = time.perf_counter()
        n, _ = counter.count(body)
        cold = (time.perf_counter() - t0) * 1000
        times = []
        for _ in range(50 if size < 1_000_000 else 10):
            body = json.loads(raw)               # a new request object, as on the wire
            t0 = time.perf_counter()
            counter.count(body)
            times.append((time.perf_counter() - t0) * 1000)
        times.sort()
        print(f"{len(raw) / 1000:>8.0f}KB {n:>8} {cold:>9.2f} {times[len(times) // 2]:>9.3f} "
              f"{times[int(len(times) * 0.99)]:>12.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
