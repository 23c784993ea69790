"""A real chat-completions HTTP server on 127.0.0.1 for tests, benchmarks and offline demos.

It speaks enough of the OpenAI protocol (`POST .../chat/completions`, JSON in and out, HTTP/1.1 keep-alive) for
the `openai` client to talk to it, answers deterministically, and can inject the faults a real endpoint shows:
429 with `Retry-After`, 500s, hangs past the client's timeout, malformed JSON, responses without choices and
dropped connections. It counts requests per body hash, so tests can prove that a resumed run re-sent nothing
that had already succeeded.

Built on asyncio streams from the standard library (no extra dependency) so one process serves hundreds of
concurrent connections. Run it alone with `python tests/fake_server.py --delay 0.2` (prints its URL).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import threading
import time
from collections import Counter
from typing import Callable

Responder = Callable[[dict], str]
# A fault plan gets the request body and how many times this exact body has been seen (1 = first time) and
# returns None (answer normally) or one of: "429", "429:SECONDS", any other status code ("500", "401"...),
# "timeout", "malformed", "nochoices", "drop".
FaultPlan = Callable[[dict, int], "str | None"]


def body_hash(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def last_user_text(body: dict) -> str:
    for m in reversed(body.get("messages", [])):
        if m.get("role") == "user":
            return str(m.get("content", ""))
    return ""


def _between(text: str, start: str, end: str) -> str:
    i = text.find(start)
    j = text.find(end, i + len(start))
    return text[i + len(start): j].strip() if i >= 0 and j >= 0 else ""


def echo_responder(body: dict) -> str:
    """Deterministic answers that depend on the content.

    A pairwise judge prompt gets a verdict for the longer answer ([[C]] when equally long), so it is consistent
    under swapping; a grading prompt gets a rating growing with the answer's length; anything else (corrupt)
    gets a changed version of the answer it was given, never equal to it."""
    text = last_user_text(body)
    system = " ".join(str(m.get("content", "")) for m in body.get("messages", []) if m.get("role") == "system")
    if '"[[A]]"' in system:
        a = _between(text, "[The Start of Assistant A's Answer]", "[The End of Assistant A's Answer]")
        b = _between(text, "[The Start of Assistant B's Answer]", "[The End of Assistant B's Answer]")
        verdict = "A" if len(a) > len(b) else "B" if len(b) > len(a) else "C"
        return f"The {'first' if verdict == 'A' else 'second' if verdict == 'B' else 'two'} answer(s) " \
               f"cover more. [[{verdict}]]"
    if "[[rating]]" in system:
        answer = _between(text, "[The Start of Assistant's Answer]", "[The End of Assistant's Answer]")
        return f"Length-based rating. Rating: [[{min(10, 1 + len(answer.split()) // 5)}]]"
    answer = _between(text + "\n\nCorrupted answer:", "Correct answer:", "Corrupted answer:") or text
    digest = hashlib.sha256(answer.encode()).hexdigest()[:8]
    words = answer.split()
    return " ".join(words[: max(1, len(words) // 2)]) + f" (version {digest})"


class ChatServer:
    """Start with `with ChatServer(...) as server:`; `server.base_url` is what `--base-url` takes."""

    def __init__(self, responder: Responder | None = None, faults: FaultPlan | None = None,
                 delay: "float | Callable[[dict], float]" = 0.0,
                 hang: float = 30.0, host: str = "127.0.0.1", port: int = 0):
        self.responder = responder or echo_responder
        self.faults = faults
        self.delay = delay
        self.hang = hang
        self.host = host
        self.port = port
        self.seen: Counter = Counter()        # body hash -> requests received
        self.succeeded: Counter = Counter()   # body hash -> 200 answers with a valid completion sent
        self.bodies: dict[str, dict] = {}
        self.statuses: Counter = Counter()
        self.times: dict[str, list[float]] = {}  # body hash -> arrival times (monotonic), to check backoff waits
        self.authorizations: set[str] = set()
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._ready = threading.Event()
        self._writers: set = set()
        self._closing: asyncio.Event | None = None

    # --------------------------------------------------------------------------------------------- lifecycle

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> "ChatServer":
        self._thread = threading.Thread(target=self._run, name="chat-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("chat server did not start")
        return self

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        self._closing = asyncio.Event()
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, self.host, self.port, backlog=1024))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    def reset_counts(self) -> None:
        with self._lock:
            self.seen.clear()
            self.succeeded.clear()
            self.bodies.clear()
            self.statuses.clear()
            self.times.clear()
            self.max_in_flight = 0

    def stop(self) -> None:
        if self._loop is None:
            return

        async def _close():
            # Wake hung requests and close every connection so handlers end on their own (cancelling them
            # makes asyncio's stream callback log spurious errors).
            self._closing.set()
            self._server.close()
            for w in list(self._writers):
                w.close()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            if others:
                await asyncio.wait(others, timeout=2)

        asyncio.run_coroutine_threadsafe(_close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop = None

    def __enter__(self) -> "ChatServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    async def serve_forever(self) -> None:
        """Serve on the current loop (used by `python -m fake_server`)."""
        self._closing = asyncio.Event()
        self._server = await asyncio.start_server(self._handle, self.host, self.port, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        print(self.base_url, flush=True)
        async with self._server:
            await self._server.serve_forever()

    # ------------------------------------------------------------------------------------------------- HTTP

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                request_line = await reader.readline()
                if not request_line:
                    return
                method, path, _ = request_line.decode("latin-1").split(" ", 2)
                headers = {}
                while True:
                    line = await reader.readline()
                    if line in (b"\r\n", b"\n", b""):
                        break
                    name, _, value = line.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                body_bytes = await reader.readexactly(int(headers.get("content-length", "0") or 0))
                if "authorization" in headers:
                    self.authorizations.add(headers["authorization"])
                keep = await self._respond(method, path, body_bytes, writer)
                if not keep:
                    return
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            return
        except asyncio.CancelledError:
            raise
        finally:
            self._writers.discard(writer)
            try:
                writer.close()
            except Exception:
                pass

    @staticmethod
    async def _send(writer, status: int, payload: bytes, extra: dict | None = None) -> None:
        reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 429: "Too Many Requests",
                  500: "Internal Server Error", 503: "Service Unavailable"}.get(status, "Status")
        head = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json",
                f"Content-Length: {len(payload)}", "Connection: keep-alive"]
        head += [f"{k}: {v}" for k, v in (extra or {}).items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
        await writer.drain()

    async def _respond(self, method: str, path: str, raw: bytes, writer) -> bool:
        if method != "POST" or not path.rstrip("/").endswith("/chat/completions"):
            await self._send(writer, 404, b'{"error": {"message": "not found"}}')
            return True
        try:
            body = json.loads(raw)
        except json.JSONDecodeError:
            await self._send(writer, 400, b'{"error": {"message": "invalid JSON body"}}')
            return True
        h = body_hash(body)
        with self._lock:
            self.seen[h] += 1
            n = self.seen[h]
            self.times.setdefault(h, []).append(time.monotonic())
            self.bodies[h] = body
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            fault = self.faults(body, n) if self.faults else None
            delay = self.delay(body) if callable(self.delay) else self.delay
            if delay:
                await asyncio.sleep(delay)
            if fault is None:
                text = self.responder(body)
                payload = json.dumps(completion(body, text)).encode()
                with self._lock:
                    self.succeeded[h] += 1
                    self.statuses[200] += 1
                await self._send(writer, 200, payload)
                return True
            with self._lock:
                self.statuses[fault] += 1
            kind, _, arg = fault.partition(":")
            if kind == "429":
                await self._send(writer, 429, b'{"error": {"message": "rate limited", "type": "rate_limit"}}',
                                 {"Retry-After": arg or "1"})
            elif kind.isdigit():  # any other status, e.g. "500", "503", "400", "401"
                await self._send(writer, int(kind), b'{"error": {"message": "injected error %s"}}' % kind.encode())
            elif kind == "timeout":
                try:  # hang past the client's timeout, but end at once when the server stops
                    await asyncio.wait_for(self._closing.wait(), self.hang)
                except asyncio.TimeoutError:
                    pass
                return False
            elif kind == "malformed":
                await self._send(writer, 200, b'{"id": "x", "choices": [{"message": {"content": "trunc')
            elif kind == "nochoices":
                await self._send(writer, 200, b'{"id": "x", "object": "chat.completion", "choices": []}')
            elif kind == "drop":
                return False
            else:
                raise ValueError(f"unknown fault {fault!r}")
            return True
        finally:
            with self._lock:
                self.in_flight -= 1


def random_faults(rate: float) -> FaultPlan:
    """429 or 500 for a share `rate` of requests, decided by a hash of the body and its attempt number: the same
    for every client, so two clients benchmarked against it meet the same faults."""

    def plan(body: dict, n: int) -> "str | None":
        draw = int(hashlib.sha256(f"{body_hash(body)}:{n}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        if draw >= rate:
            return None
        return "429:1" if draw < rate / 2 else "500"

    return plan


def completion(body: dict, text: str) -> dict:
    prompt_words = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
    return {
        "id": "chatcmpl-" + body_hash(body)[:12],
        "object": "chat.completion",
        "created": 0,
        "model": body.get("model", "fake"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_words, "completion_tokens": len(text.split()),
                  "total_tokens": prompt_words + len(text.split())},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--fault-rate", type=float, default=0.0,
                        help="share of requests answered 429 (Retry-After: 1) or 500, half each, at random")
    args = parser.parse_args(argv)
    server = ChatServer(delay=args.delay, port=args.port,
                        faults=random_faults(args.fault_rate) if args.fault_rate else None)
    try:
        asyncio.run(server.serve_forever())
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
