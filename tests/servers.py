"""Real servers for tests: `probllm serve` (and `transformers serve`) as subprocesses on 127.0.0.1."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def probllm_serve(*args: str, env: dict | None = None, timeout: float = 180):
    """Start `probllm serve --port 0 ARGS`, yield (base_url, process, stderr lines); SIGTERM at the end."""
    proc = subprocess.Popen([sys.executable, "-m", "probllm", "serve", "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT),
                            env={**os.environ, **(env or {})})
    lines: list[str] = []
    url = None
    deadline = time.monotonic() + timeout
    while url is None:
        line = proc.stderr.readline()
        if not line:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("probllm serve did not start:\n" + "".join(lines))
            continue
        lines.append(line)
        m = re.search(r"at (http://\S+/v1)", line)
        if m:
            url = m.group(1)
    # Keep draining stderr so the server never blocks on a full pipe.
    drain = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    drain.start()
    try:
        yield url, proc, lines
    finally:
        stop(proc)
        drain.join(5)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, as Ctrl-C or a service manager would stop a server; killed if it has not ended in 20 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def transformers_serve(model_dir: str, timeout: float = 240, port: int | None = None):
    """transformers' own OpenAI-compatible server (`transformers serve MODEL`) on 127.0.0.1; yields base_url.
    The model name requests must carry is the folder's path. `port`: to come back on the same address."""
    import httpx2 as httpx

    port = port or free_port()
    exe = Path(sys.executable).with_name("transformers")
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"transformers-serve-{port}.log", "w+")
    proc = subprocess.Popen([str(exe), "serve", model_dir, "--host", "127.0.0.1", "--port", str(port),
                             "--device", "cpu", "--log-level", "warning"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT),
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError("transformers serve did not start:\n" + log.read()[-3000:])
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield url + "/v1"
    finally:
        stop(proc)
        log.close()


@contextmanager
def app_server(app):
    """An ASGI app (built in this process) on a real uvicorn server on 127.0.0.1 in a thread; yields its root
    URL. For apps around engines made in the test, where a subprocess would add nothing."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False,
                                            timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the in-process server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
