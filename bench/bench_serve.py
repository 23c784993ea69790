"""`probllm serve` under load: concurrent streaming chat clients against one server process.

One `probllm serve` process (the offline SmolLM2 by default, or --model) on 127.0.0.1; for each client count
(1, 8, 32 by default) every client sends streaming chat requests one after the other (official AsyncOpenAI
client, `stream=True`, greedy, --max-tokens each) for --requests requests. Reported per client count: requests
answered / errors, time to first token p50/p99, aggregate tokens/s (content chunks) and its ratio to one client
alone; the server's RSS after each round. The whole set runs twice (--rounds) to show the memory is flat.

Targets (issue 10): every request answered, no error, RSS flat across rounds, aggregate tokens/s at 8 clients
>= 3x one client (concurrent requests share batched generate calls).

    flock /tmp/probllm-heavy.lock .venv/bin/python bench/bench_serve.py
    .venv/bin/python bench/bench_serve.py --clients 1,4 --requests 2 --max-tokens 8 --rounds 1   # a smoke run

With --upstream (issue 20): the assistant layer (`serve --backend openai`) in front of an upstream `probllm serve`,
32 and 64 clients through the layer and as many straight to the upstream, at the same time (so both share the
upstream's batches and the comparison is the layer's cost, not the upstream's variance between runs), one
request of 16 tokens per client; targets: every request answered, layer tokens/s >= 0.9x direct, added TTFT p50
< 30 ms, layer RSS flat.

The clients start in twins (client c of both groups at t0 + c x --stagger-ms, 5 ms by default), so a layer
request sits next to its direct twin in the upstream's batch, and streams are read as vLLM's serving benchmark
reads them (aiohttp, the first token timed at the first chunk with content; --client openai for the official
client). Both matter, because the quantity is a few milliseconds inside a 10-20 s time to first token:
- Started all at once (--stagger-ms 0), every direct request reaches the upstream before the layer's (the layer
  takes a few ms to forward each) and gets its first token emitted first: --control (a second group straight to
  the upstream, no layer) then reads +2 to +23 ms with nothing in between.
- The official client builds pydantic objects for each chunk; 128 streams of it make this process the slowest
  part of a burst, and a layer chunk arriving 2 ms after its twin waits for every chunk that was already ready
  to be parsed (+6 to +74 ms in one run with twins, control 0).
--pin-layer gives the layer the last core alone (the upstream and the clients share the others).

    flock /tmp/probllm-heavy.lock .venv/bin/python bench/bench_serve.py --upstream
    flock /tmp/probllm-heavy.lock .venv/bin/python bench/bench_serve.py --upstream --layer-workers 2
    flock /tmp/probllm-heavy.lock .venv/bin/python bench/bench_serve.py --upstream --control
    flock /tmp/probllm-heavy.lock .venv/bin/python bench/bench_serve.py --upstream --control --stagger-ms 0 --client openai

`--layer-workers N` runs the layer as `serve --workers N` (its RSS is then that of all its processes).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
RESULTS = ROOT / "bench" / "results" / "serve.md"

QUESTIONS = ["What is the time complexity of heapsort?", "Why does ice float on water?",
             "What is Newton's second law?", "Explain gradient descent in one paragraph.",
             "What is a hash table?", "Why is the sky blue?", "What is an eigenvector?", "What does DNA encode?"]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def tree_rss_mb(pid: int) -> float:
    """RSS of a process and all its descendants (`serve --workers N`: uvicorn's supervisor and its workers)."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += rss_mb(p)
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # a worker that just exited
            continue
    return total


def provenance() -> str:
    """When and at which commit a run was made (a table without them cannot be compared with anything)."""
    import datetime
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    dirty = " with uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else ""
    now = datetime.datetime.now(datetime.timezone.utc)
    return f"Run on {now:%Y-%m-%d %H:%M} UTC at {git('rev-parse', '--short', 'HEAD') or 'an unknown commit'}{dirty}."


async def drive(clients: int, requests: int, stagger: float, t0: float | None, ask) -> dict:
    """`clients` clients, each sending `requests` streaming requests one after the other; with `stagger`, client c
    sends its first request at t0 + c * stagger (students do not click in the same millisecond). `ask(question)`
    is an async iterator of the answer's content pieces; the time to first token is taken at the first piece."""
    ttfts: list[float] = []
    tokens = answered = 0
    errors: list[str] = []

    async def one_client(c: int) -> None:
        nonlocal tokens, answered
        if stagger:
            await asyncio.sleep(max(0.0, start + c * stagger - time.perf_counter()))
        for r in range(requests):
            sent = time.perf_counter()
            first = None
            try:
                async for _ in ask(QUESTIONS[(c * requests + r) % len(QUESTIONS)]):
                    if first is None:
                        first = time.perf_counter() - sent
                    tokens += 1
                answered += 1
                if first is not None:
                    ttfts.append(first)
            except Exception as e:  # counted and shown: the bench must see every failure
                errors.append(f"{e.__class__.__name__}: {e}")

    start = time.perf_counter() if t0 is None else t0
    await asyncio.gather(*(one_client(c) for c in range(clients)))
    elapsed = time.perf_counter() - start
    ttfts.sort()
    return {"clients": clients, "requests": clients * requests, "answered": answered, "errors": errors,
            "seconds": elapsed, "tokens": tokens, "tokens_per_s": tokens / elapsed,
            "ttft_p50": statistics.median(ttfts) if ttfts else float("nan"),
            "ttft_p99": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))] if ttfts else float("nan")}


async def load(url: str, model: str, clients: int, requests: int, max_tokens: int, stagger: float = 0.0,
               t0: float | None = None) -> dict:
    """`drive` with the official AsyncOpenAI client (`stream=True`, greedy)."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)

    async def ask(question: str):
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0,
            stream=True)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                yield chunk.choices[0].delta.content

    try:
        return await drive(clients, requests, stagger, t0, ask)
    finally:
        await client.close()


async def stream_load(url: str, model: str, clients: int, requests: int, max_tokens: int, stagger: float = 0.0,
                      t0: float | None = None) -> dict:
    """`drive`, reading streams the way vLLM's serving benchmark does (benchmarks/backend_request_func.py):
    aiohttp, each `data:` line parsed as it arrives, the time to first token taken at the first chunk with
    content. The official client builds pydantic objects for every chunk; 128 streams of it in one process
    make this process the slowest part of a burst's first token, and a stream whose first token arrives a
    millisecond after another's then waits for all of the other's to be parsed, which is not what any
    student sees (each has a client of their own)."""
    import json

    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=600)) as session:
        async def ask(question: str):
            body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
                    "temperature": 0, "stream": True}
            async with session.post(f"{url}/chat/completions", json=body) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
                async for raw in resp.content:
                    line = raw.decode().strip()
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    doc = json.loads(data)
                    if doc.get("error"):
                        raise RuntimeError(f"error in the stream: {doc['error']}")
                    if doc.get("choices") and doc["choices"][0]["delta"].get("content"):
                        yield doc["choices"][0]["delta"]["content"]

        return await drive(clients, requests, stagger, t0, ask)


def say(label: str, res: dict, ttft: str) -> None:
    """One round's line on stderr, with its first errors (the bench must show every failure)."""
    print(f"{label}: {res['answered']}/{res['requests']} answered, {len(res['errors'])} errors, "
          f"{res['tokens_per_s']:.1f} tokens/s, TTFT p50 {ttft}", file=sys.stderr)
    for e in res["errors"][:3]:
        print(f"  error: {e}", file=sys.stderr)


def retrieval_ms(index: str, k: int = 4) -> tuple[float, float]:
    """p50 and p99 of one search of the notes (what the layer adds per request with --index), in-process."""
    from probllm.rag.retrieve import Retriever

    retriever = Retriever(index)
    retriever.search([QUESTIONS[0]], k)  # warm
    times = []
    for _ in range(5):
        for q in QUESTIONS:
            t0 = time.perf_counter()
            retriever.search([q], k)
            times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return statistics.median(times), times[int(0.99 * (len(times) - 1))]


UPSTREAM_WINDOW_MS = 500  # the upstream's batching window in the --upstream bench (see upstream_main)
GENERATED_END = "<!-- end of the generated run; notes below are kept when the bench rewrites it -->"


def twins(read, first: str, second: str, clients: int, requests: int, max_tokens: int, stagger: float) -> tuple:
    """`clients` clients to each of two servers, in twins: client c of both groups starts at the same moment,
    t0 + c * stagger. Twins then sit next to each other in the upstream's batch, so neither group is emitted by
    the upstream, or read by this process, after the whole other group."""
    async def both():
        t0 = time.perf_counter() + 0.05
        return await asyncio.gather(read(first, "bench", clients, requests, max_tokens, stagger, t0),
                                    read(second, "bench", clients, requests, max_tokens, stagger, t0))

    return asyncio.run(both())


def upstream_main(args, levels: list[int]) -> None:
    """The assistant layer (`serve --backend openai`) in front of an upstream `probllm serve`, against the same
    clients straight to the upstream: same questions, same tokens, both at once."""
    import tempfile

    from probllm.rag.index import build_index
    from servers import probllm_serve

    # The upstream's batch holds both groups, and waits long enough for the layer's requests (which come after
    # the direct ones) to join: with static batches, arriving second would otherwise mean waiting for a whole
    # batch, which measures the arrival order, not the layer (vLLM's continuous batching has no such edge). On 2
    # cores shared by upstream, layer and 128 clients, the layer forwards 64 requests in more than 100 ms (about
    # 3 ms each, mostly FastAPI's request handling), so a 100 ms window split the burst in 2 of 3 rounds.
    batch = max(args.batch_size, 2 * max(levels))
    serve_args = ["--batch-size", str(batch), "--max-wait-ms", str(UPSTREAM_WINDOW_MS), "--served-model-name",
                  "bench"]
    if args.model:
        serve_args += ["--model", args.model]
    stagger = args.stagger_ms / 1000
    read = load if args.client == "openai" else stream_load
    index = str(Path(tempfile.mkdtemp(prefix="bench-serve-")) / "notes.idx")
    build_index([str(ROOT / "examples" / "notes")], index)
    r50, r99 = retrieval_ms(index)
    rows, rss = [], []
    cpus = sorted(os.sched_getaffinity(0))
    if args.pin_layer:
        if len(cpus) < 2:
            sys.exit("--pin-layer needs at least 2 cores")
        # Children inherit the affinity they are started with: the upstream and this process's clients get all
        # cores but the last, the layer the last alone (as on a course server in front of a GPU machine).
        layer_cpus, others = {cpus[-1]}, set(cpus[:-1])
        os.sched_setaffinity(0, others)
    with probllm_serve(*serve_args) as (up, up_proc, _):
        layer_args = ["--backend", "openai", "--base-url", up, "--model", "bench"]
        if args.layer_workers > 1:
            layer_args += ["--workers", str(args.layer_workers)]
        if args.pin_layer:
            os.sched_setaffinity(0, layer_cpus)
        with probllm_serve(*layer_args) as (layer, proc, _):
            if args.pin_layer:
                os.sched_setaffinity(0, others)
            asyncio.run(load(up, "bench", 1, 1, 4))
            asyncio.run(load(layer, "bench", 1, 1, 4))
            # Warm-up: one burst of the largest size both ways, not counted. It opens the layer's kept-alive
            # connections to the upstream (a server pays that once in its life: the first burst after a start
            # took +0.1 to +0.6 s more through the layer than direct on this machine); the rounds then measure
            # a running server.
            warm_direct, warm_layer = twins(read, up, layer, max(levels), 1, 4, stagger)
            first_burst = (warm_layer["ttft_p50"] - warm_direct["ttft_p50"]) * 1000
            print(f"warm-up burst of {max(levels)}: added TTFT p50 {first_burst:+.0f} ms (not counted)",
                  file=sys.stderr)
            rss.append(("after warm-up", tree_rss_mb(proc.pid)))
            arms = [("layer", layer)] + ([("control", up)] if args.control else [])
            for rnd in range(1, args.rounds + 1):
                for c in levels:
                    for arm, second in arms:
                        # Both groups at once, on the same upstream batches: what differs is the second group's
                        # path alone (run one after the other, the upstream's own variance between runs is
                        # larger than the layer's cost). The control sends the second group straight to the
                        # upstream too: what the design measures when there is no layer.
                        for via, res in zip(("direct", arm), twins(read, up, second, c, args.requests, args.max_tokens,
                                                                  stagger)):
                            res.update(round=rnd, via=via, arm=arm)
                            rows.append(res)
                            say(f"round {rnd}, {c} clients, {arm} arm, {via}", res,
                                f"{res['ttft_p50'] * 1000:.0f} ms")
                time.sleep(1.0)
                rss.append((f"after round {rnd}", tree_rss_mb(proc.pid)))

    workers = f" --workers {args.layer_workers}" if args.layer_workers > 1 else ""
    pinned = (f" The layer pinned to core {cpus[-1]}, the upstream and the clients to the other{'s' * (len(cpus) > 2)} "
              f"(--pin-layer)." if args.pin_layer else "")
    clients_read = ("streams read with the official openai client" if args.client == "openai" else
                    "streams read as vLLM's serving benchmark reads them (aiohttp)")
    starts = (f"client c of each group starts at t0 + c x {args.stagger_ms:g} ms, twins together" if stagger else
              "all clients start at once")
    lines = [f"The assistant layer (`probllm serve --backend openai{workers}`) in front of an upstream `probllm serve` "
             f"({args.model or 'SmolLM2-135M-Instruct'}, --batch-size {batch} --max-wait-ms {UPSTREAM_WINDOW_MS}), "
             f"against the same number of streaming clients straight to the upstream at the same time (N direct + N "
             f"through the layer, sharing the upstream's batches; {starts}; {clients_read}): {args.requests} requests "
             f"per client, {args.max_tokens} tokens each, greedy. Machine: {os.cpu_count()} cores, Python "
             f"{platform.python_version()}; upstream, layer and clients on the same machine.{pinned} {provenance()}", ""]

    def table(arm: str, name: str) -> tuple[list[str], bool]:
        out = [f"| round | clients | answered ({name}) | errors | tokens/s direct | tokens/s {name} | {name} / direct "
               f"| TTFT p50 direct ms | TTFT p50 {name} ms | added TTFT p50 ms |",
               "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        ok = True
        for r in (x for x in rows if x["via"] == arm):
            d = next(x for x in rows if x["via"] == "direct" and x["arm"] == arm and x["round"] == r["round"]
                     and x["clients"] == r["clients"])
            ratio = r["tokens_per_s"] / d["tokens_per_s"]
            added = (r["ttft_p50"] - d["ttft_p50"]) * 1000
            ok = ok and ratio >= 0.9 and added < 30
            out.append(f"| {r['round']} | {r['clients']} | {r['answered']}/{r['requests']} | "
                       f"{len(r['errors']) + len(d['errors'])} | {d['tokens_per_s']:.1f} | {r['tokens_per_s']:.1f} | "
                       f"{ratio:.2f}x | {d['ttft_p50'] * 1000:.0f} | {r['ttft_p50'] * 1000:.0f} | {added:+.0f} |")
        return out, ok

    layer_rows, ok = table("layer", "layer")
    lines += layer_rows
    if args.control:
        control_rows, _ = table("control", "control")
        lines += ["", "Control, in the same rounds: the second group straight to the upstream as well (no layer); "
                      "its added TTFT is what this design reads when there is nothing in between:", ""] + control_rows
    lines += ["", f"Warm-up (not in the table): one burst of {max(levels)} clients both ways, which opens the layer's "
                  f"kept-alive connections to the upstream; its added TTFT p50 was {first_burst:+.0f} ms."]
    lines += ["", f"Retrieval (with --index, not in the runs above: the same prompt must reach the upstream both "
                  f"ways): one search of examples/notes p50 {r50:.1f} ms, p99 {r99:.1f} ms, in-process.",
              "", "Layer RSS (all its processes): " + ", ".join(f"{name} {mb:.0f} MB" for name, mb in rss),
              "", "Targets (issue 20): every request answered, layer tokens/s >= 0.9x direct, added TTFT p50 "
                  f"< 30 ms, layer RSS flat: {'met' if ok else 'NOT met'} in this run."]
    report = "\n".join(lines)
    print(report)
    # The section's generated part is replaced; notes written under its end marker stay.
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    text = RESULTS.read_text() if RESULTS.exists() else ""
    marker = "\n## Through the assistant layer (--upstream)\n"
    head, _, section = text.partition(marker)
    notes = section.partition(GENERATED_END)[2] if GENERATED_END in section else ""
    RESULTS.write_text(head.rstrip("\n") + "\n" + marker + "\n" + report + "\n\n" + GENERATED_END
                       + (notes if notes.strip() else "\n"))
    if any(r["errors"] or r["answered"] != r["requests"] for r in rows):
        sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the offline SmolLM2-135M-Instruct")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per client, one after the other (default 4; 1 with --upstream)")
    parser.add_argument("--max-tokens", type=int, default=None, help="default 32; 16 with --upstream")
    parser.add_argument("--batch-size", type=int, default=32, help="the server's --batch-size")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--upstream", action="store_true", help="the assistant layer (serve --backend openai) in "
                        "front of an upstream probllm serve, against the same clients straight to the upstream "
                        "(default clients 32,64)")
    parser.add_argument("--layer-workers", type=int, default=1, help="with --upstream: the layer's --workers")
    parser.add_argument("--stagger-ms", type=float, default=5.0,
                        help="with --upstream: client c of each group starts at t0 + c x this (0: all at once)")
    parser.add_argument("--client", choices=["aiohttp", "openai"], default="aiohttp",
                        help="with --upstream: how the clients read streams: as vLLM's serving benchmark does "
                             "(aiohttp) or with the official openai client")
    parser.add_argument("--pin-layer", action="store_true", help="with --upstream: the layer on the last core alone, "
                        "the upstream and the clients on the others")
    parser.add_argument("--control", action="store_true", help="with --upstream: also run, in each round, a second "
                        "group straight to the upstream (no layer), to show what the design reads with nothing between")
    args = parser.parse_args()
    if args.requests is None:
        args.requests = 1 if args.upstream else 4
    if args.max_tokens is None:
        args.max_tokens = 16 if args.upstream else 32
    if args.upstream:
        upstream_main(args, [int(c) for c in (args.clients if args.clients != "1,8,32" else "32,64").split(",")])
        return
    levels = [int(c) for c in args.clients.split(",")]

    from servers import probllm_serve

    serve_args = ["--batch-size", str(args.batch_size), "--served-model-name", "bench"]
    if args.model:
        serve_args += ["--model", args.model]
    rows, rss = [], []
    with probllm_serve(*serve_args) as (url, proc, _):
        asyncio.run(load(url, "bench", 1, 1, 4))  # warm-up: first batch, tokenizer caches
        rss.append(("after warm-up", rss_mb(proc.pid)))
        for rnd in range(1, args.rounds + 1):
            for c in levels:
                res = asyncio.run(load(url, "bench", c, args.requests, args.max_tokens))
                res["round"] = rnd
                rows.append(res)
                say(f"round {rnd}, {c} clients", res, f"{res['ttft_p50']:.2f} s")
            time.sleep(1.0)  # the server gives freed memory back after half a second idle
            rss.append((f"after round {rnd}", rss_mb(proc.pid)))

    lines = [f"`probllm serve` ({args.model or 'SmolLM2-135M-Instruct'}, --batch-size {args.batch_size}) under "
             f"concurrent streaming chat clients: {args.requests} requests per client, {args.max_tokens} tokens "
             f"each, greedy. Machine: {os.cpu_count()} cores, Python {platform.python_version()}; server and "
             f"clients on the same machine. {provenance()}", "",
             "| round | clients | answered | errors | TTFT p50 s | TTFT p99 s | tokens/s | vs 1 client |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        solo = next((x for x in rows if x["round"] == r["round"] and x["clients"] == 1), None)
        ratio = f"{r['tokens_per_s'] / solo['tokens_per_s']:.2f}x" if solo else "-"
        lines.append(f"| {r['round']} | {r['clients']} | {r['answered']}/{r['requests']} | {len(r['errors'])} | "
                     f"{r['ttft_p50']:.2f} | {r['ttft_p99']:.2f} | {r['tokens_per_s']:.1f} | {ratio} |")
    lines += ["", "Server RSS: " + ", ".join(f"{name} {mb:.0f} MB" for name, mb in rss)]
    table = "\n".join(lines)
    print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    text = RESULTS.read_text() if RESULTS.exists() else ""
    marker = "\n## Through the assistant layer (--upstream)\n"
    RESULTS.write_text(table + "\n" + (marker + text.split(marker, 1)[1] if marker in text else ""))
    if any(r["errors"] or r["answered"] != r["requests"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
