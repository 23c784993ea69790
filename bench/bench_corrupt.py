"""Throughput of `corrupt --backend openai` against a local chat-completions server that answers after 200 ms.

The endpoint, not probllm, should be the limit. With a fixed delay d and c requests in flight, a client can at
best complete c/d requests per second; every record needs k = 2 sequential requests (two corruptions, one after
the other), so the records/s bound is c/(k*d). The table gives measured records/s as a share of that bound for
concurrency 1, 8, 32 and 128 (target: at least 90% at 32), and, as the reference, a sequential script that calls
the synchronous `openai` client once per corruption, as the student scripts did.

The server (fake_server, stdlib asyncio) runs in its own process, so it does not share our GIL.
`corrupt_records` runs in this process with a fresh response cache (every answer is committed to SQLite, as in
real runs); input is read from a JSONL file and output written to /dev/null. Run it alone:

    flock /tmp/probllm-heavy.lock .venv/bin/python bench/bench_corrupt.py
    .venv/bin/python bench/bench_corrupt.py --seconds 4 --concurrency 1,32   # quicker
    .venv/bin/python bench/bench_corrupt.py --faults --concurrency 32          # vs a bare client, 5% 429/500
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "corrupt.md"
K = 2


def make_records(path: Path, n: int, tag: str) -> None:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"{tag}-{i}", "question": f"Why does experiment {tag}-{i} work?",
                                "answer": f"Experiment {i} works because the measured force is {i % 97} newtons. "
                                          "The second sentence explains the mechanism in a few more words."}) + "\n")


def start_server(delay: float, fault_rate: float = 0.0) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fake_server.py"), "--delay", str(delay),
                             "--fault-rate", str(fault_rate)],
                            stdout=subprocess.PIPE, text=True, cwd=str(ROOT))
    url = proc.stdout.readline().strip()
    if not url.startswith("http"):
        raise SystemExit("the chat server did not start")
    return proc, url


def run_probllm(url: str, records: Path, concurrency: int, cache: Path) -> tuple[float, int, dict]:
    from probllm.corrupt import CorruptOptions, corrupt_records
    from probllm.io import Stats, read_records, write_records
    from probllm.lm import BackendConfig

    config = BackendConfig(backend="openai", model="bench", base_url=url, concurrency=concurrency, cache=cache,
                           timeout=30)
    stats = Stats(command="bench")
    with open(os.devnull, "w") as sink:
        t0 = time.perf_counter()
        n = write_records(corrupt_records(read_records([str(records)], stats), config, CorruptOptions(k=K), stats),
                          stats, out=sink)
        elapsed = time.perf_counter() - t0
    return elapsed, n, dict(stats.notes)


def run_sequential_script(url: str, records: Path) -> tuple[float, int]:
    """The reference: what a student script does, one synchronous request at a time."""
    from openai import OpenAI

    from probllm.corrupt import messages_for

    client = OpenAI(base_url=url, api_key="none", max_retries=0)
    recs = [json.loads(line) for line in records.read_text().splitlines()]
    t0 = time.perf_counter()
    for r in recs:
        text = r["answer"]
        for op in ("REMOVE", "SUBSTITUTE"):
            resp = client.chat.completions.create(model="bench", messages=messages_for(op, r["question"], text),
                                                  max_tokens=512, temperature=0)
            text = resp.choices[0].message.content
    return time.perf_counter() - t0, len(recs)


def run_bare_client(url: str, records: Path, concurrency: int) -> tuple[float, int]:
    """The reference under faults: the official AsyncOpenAI client with its own retries (2, exponential backoff,
    Retry-After honoured), `concurrency` requests in flight, every record's two corruptions one after the other."""
    import asyncio

    from openai import AsyncOpenAI

    from probllm.corrupt import messages_for

    recs = [json.loads(line) for line in records.read_text().splitlines()]

    async def run() -> int:
        client = AsyncOpenAI(base_url=url, api_key="none", max_retries=4)
        sem = asyncio.Semaphore(concurrency)

        async def one(r: dict) -> None:
            text = r["answer"]
            for op in ("REMOVE", "SUBSTITUTE"):
                async with sem:
                    resp = await client.chat.completions.create(model="bench", max_tokens=512, temperature=0,
                                                                messages=messages_for(op, r["question"], text))
                text = resp.choices[0].message.content

        await asyncio.gather(*(one(r) for r in recs))
        await client.close()
        return len(recs)

    t0 = time.perf_counter()
    n = asyncio.run(run())
    return time.perf_counter() - t0, n


def compare_under_faults(args) -> None:
    """`corrupt` vs the bare async client against the same server, with and without injected 429/500s."""
    levels = [int(c) for c in args.concurrency.split(",")]
    lines = [f"`corrupt` vs a bare AsyncOpenAI client (same concurrency, {K} sequential requests per record), server "
             f"answering after {args.delay * 1000:.0f} ms; faults: 429 (Retry-After: 1) or 500 on a share of "
             f"requests. Machine: {os.cpu_count()} cores.", "",
             "| faults | concurrency | records | bare client records/s | probllm records/s | ratio |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for rate in (0.0, args.fault_rate):
        server, url = start_server(args.delay, rate)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                tmp = Path(tmp)
                make_records(tmp / "warm.jsonl", 4, "warm")
                run_probllm(url, tmp / "warm.jsonl", 4, tmp / "warm.sqlite")
                for c in levels:
                    n = max(8, int(c / (K * args.delay) * args.seconds))
                    make_records(tmp / f"b{c}.jsonl", n, f"f{rate}-{c}")
                    bare_s, _ = run_bare_client(url, tmp / f"b{c}.jsonl", c)
                    ours_s, out, notes = run_probllm(url, tmp / f"b{c}.jsonl", c, tmp / f"c{c}.sqlite")
                    assert out == n, (out, notes)
                    row = (f"| {rate:.0%} | {c} | {n} | {n / bare_s:.1f} | {n / ours_s:.1f} | "
                           f"{bare_s / ours_s:.2f}x |")
                    print(row, file=sys.stderr)
                    lines.append(row)
        finally:
            server.terminate()
            server.wait(5)
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay", type=float, default=0.2, help="server answer delay in seconds")
    parser.add_argument("--concurrency", default="1,8,32,128")
    parser.add_argument("--seconds", type=float, default=8.0, help="target duration of each run at the bound")
    parser.add_argument("--faults", action="store_true", help="compare with a bare AsyncOpenAI client, with and "
                                                               "without injected 429/500s (target: >= 0.9x)")
    parser.add_argument("--fault-rate", type=float, default=0.05)
    args = parser.parse_args()
    if args.faults:
        compare_under_faults(args)
        return
    levels = [int(c) for c in args.concurrency.split(",")]

    server, url = start_server(args.delay)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            # Warm-up: imports, the first connection, SQLite creation (not part of any measurement).
            make_records(tmp / "warm.jsonl", 4, "warm")
            run_probllm(url, tmp / "warm.jsonl", 4, tmp / "warm.sqlite")

            n_seq = max(4, int(args.seconds / (K * args.delay)))
            make_records(tmp / "seq.jsonl", n_seq, "seq")
            elapsed, n = run_sequential_script(url, tmp / "seq.jsonl")
            bound = 1 / (K * args.delay)
            rows.append(("sequential script (sync openai client)", 1, n, elapsed, n / elapsed, bound, None))
            seq_rate = n / elapsed

            for c in levels:
                bound = c / (K * args.delay)
                n = max(8, int(bound * args.seconds))
                make_records(tmp / f"c{c}.jsonl", n, f"c{c}")
                elapsed, out, notes = run_probllm(url, tmp / f"c{c}.jsonl", c, tmp / f"c{c}.sqlite")
                assert out == n and notes["requests"] == K * n, (out, notes)
                rows.append((f"probllm corrupt --concurrency {c}", c, n, elapsed, n / elapsed, bound, seq_rate))
                print(f"concurrency {c}: {n / elapsed:.1f} records/s ({n / elapsed / bound:.1%} of bound)",
                      file=sys.stderr)
    finally:
        server.terminate()
        server.wait(5)

    lines = [
        f"`corrupt` throughput against a local chat-completions server answering after {args.delay * 1000:.0f} ms "
        f"({K} sequential requests per record, so the bound is concurrency / ({K} x {args.delay:g} s) records/s). "
        f"Machine: {os.cpu_count()} cores, Python {platform.python_version()}; server in its own process on "
        "127.0.0.1.",
        "",
        "| client | concurrency | records | seconds | records/s | bound records/s | share of bound | "
        "speed-up vs sequential script |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, c, n, elapsed, rate, bound, ref in rows:
        speedup = f"{rate / ref:.1f}x" if ref else "1.0x"
        lines.append(f"| {name} | {c} | {n} | {elapsed:.2f} | {rate:.1f} | {bound:.1f} | {rate / bound:.1%} | "
                     f"{speedup} |")
    table = "\n".join(lines)
    print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(table + "\n")


if __name__ == "__main__":
    main()
