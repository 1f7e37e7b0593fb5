"""Process helpers shared by bench/bench.py and bench/soak.py: free ports, waiting for a
server to answer, and stopping children, all on 127.0.0.1 with bounded loops."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from typing import Any

HOST = "127.0.0.1"


def die_with_parent() -> None:
    """Child side of Popen: get SIGTERM if the bench itself is killed (Linux prctl)."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_http(port: int, path: str, proc: subprocess.Popen[Any], timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:              # bounded by the deadline
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with status {proc.returncode} before answering")
        try:
            with socket.create_connection((HOST, port), timeout=1) as s:
                s.sendall(f"GET {path} HTTP/1.1\r\nhost: {HOST}\r\nconnection: close\r\n\r\n".encode())
                data = b""
                for _ in range(1000):
                    part = s.recv(65536)
                    if not part:
                        break
                    data += part
            head, _, body = data.partition(b"\r\n\r\n")
            if head.startswith(b"HTTP/1.1 200"):
                return json.loads(body)
            last = head[:100].decode("latin-1")
        except (OSError, ValueError) as exc:
            last = repr(exc)
        time.sleep(0.05)
    raise RuntimeError(f"no 200 from 127.0.0.1:{port}{path} within {timeout_s:g} s (last: {last})")


def stop(proc: subprocess.Popen[Any] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
