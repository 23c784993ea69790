"""Throughput and peak memory of the data commands on generated inputs of 10x different sizes.

Each measurement runs the real CLI (`python -m probllm ...`, stdout to /dev/null) in its own process and reads
that process's peak resident memory (VmHWM of /proc/self/status, written at exit), so the numbers include the
interpreter and are not mixed between runs. (Not ru_maxrss from wait4: Linux carries the parent's high-water
mark across fork+exec into it, so a bench that grew while generating inputs would inflate every child.) If memory
stays flat while the input grows 100x, the command streams.

Measured:
- `pair-stackexchange` on HuggingFaceH4-format JSONL (HTML -> markdown on every kept pair),
- `pair-stackexchange` on a Posts.xml dump (two passes with on-disk state; answers of some questions come far
  after them, as in real dumps),
- `mcqify --source gsm8k`,
- a reference: a plain Python loop that parses and re-serialises each JSONL line (`json.loads`/`json.dumps`), the
  floor any JSONL command pays, so the ratio says what the command's own work costs.

- `decontaminate` of generated preference pairs (prompt 40 words, chosen and rejected 60 each; 1% quote a
  benchmark question and its options inside other words) against the four benchmarks' example files in
  ../shared/examples (ARC Easy + Challenge dev and test slices, MMLU test + dev, GSM8K, MATH), converted by
  `mcqify` first (not timed), with the same json loads+dumps reference on the pairs file.
- `index` on generated markdown notes (headings, prose, fenced code, `$$` math, Liquid, front matter; one note
  per 100 records): cleaning, markdown parsing, chunking, embedding with the default embedder, hnswlib, SQLite.

Old against new code in one run: `--baseline-ref REF` extracts commit REF (`git archive`, no worktree is
touched) and runs every command with that code too (PYTHONPATH and working folder pointed at it), alternating
old and new run by run and keeping the fastest of `--repeats`, then prints the new/old time ratio per case.

    python bench/bench_data.py                      # 2k / 20k / 200k records
    python bench/bench_data.py --sizes 1000,10000   # quicker
    python bench/bench_data.py --baseline-ref c7b2861 --only "pair-stackexchange,index" --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from xml.sax.saxutils import quoteattr

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "data.md"

WORDS = ("gradient entropy momentum tensor kernel lattice photon vector matrix proof lemma integral series "
         "theorem stack heap queue graph tree node edge energy force field charge spin").split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def body(rng: random.Random) -> str:
    """An HTML post body with a paragraph, inline code, LaTeX and a code block (about 500 bytes)."""
    return (f"<p>{sentence(rng, 25)} <code>x[{rng.randint(0, 9)}]</code> and $a_{rng.randint(1, 9)}^2 = "
            f"\\frac{{{rng.randint(1, 9)}}}{{2}}$.</p><pre><code>for i in range({rng.randint(2, 99)}):\n"
            f"    total += i &lt;&lt; 1\n</code></pre><p>{sentence(rng, 20)}</p>")


SITES = ("stackoverflow.com", "math.stackexchange.com", "physics.stackexchange.com", "cooking.stackexchange.com")


def gen_hf(path: Path, n: int, rng: random.Random) -> None:
    with open(path, "w") as f:
        for q in range(n):
            site = SITES[q % len(SITES)]
            answers = [{"answer_id": q * 10 + i, "text": body(rng), "pm_score": rng.choice((1, 3, 4, 5, 8, 10, 12)),
                        "selected": i == 0, "author": "u", "author_id": "1", "author_profile": ""}
                       for i in range(rng.randint(2, 5))]
            f.write(json.dumps({"qid": q, "question": body(rng), "answers": answers, "date": "2020/01/01",
                                "metadata": [f"https://{site}/questions/{q}", f"https://{site}",
                                             f"https://{site}/users/1"]}) + "\n")


def gen_posts_xml(path: Path, n: int, rng: random.Random) -> None:
    """n questions with 2-5 answers each; answers follow their question after a random delay of up to 50
    questions, and 5% are held back to the very end (an old question answered years later)."""
    pending: list[tuple[int, str]] = []  # (release at question index, row)
    late: list[str] = []
    next_id = 1

    def row(**attrs) -> str:
        return "  <row " + " ".join(f"{k}={quoteattr(str(v))}" for k, v in attrs.items()) + " />\n"

    with open(path, "w") as f:
        f.write('<?xml version="1.0" encoding="utf-8"?>\n<posts>\n')
        for q in range(n):
            qid = next_id
            next_id += 1
            k = rng.randint(2, 5)
            answer_ids = list(range(next_id + 10 * n, next_id + 10 * n + k))  # ids only need to be unique
            next_id += 1
            f.write(row(Id=qid, PostTypeId=1, AcceptedAnswerId=answer_ids[0], Score=rng.randint(0, 50),
                        Title=sentence(rng, 8), Tags="<t>", CreationDate="2015-01-01T00:00:00.000",
                        Body=body(rng)))
            for aid in answer_ids:
                score = rng.choice((-1, 3, 8, 10, 20, 40, 1100))
                r = row(Id=aid, PostTypeId=2, ParentId=qid, Score=score, CreationDate="2015-01-02T00:00:00.000",
                        Body=body(rng))
                if rng.random() < 0.05:
                    late.append(r)
                else:
                    pending.append((q + rng.randint(0, 50), r))
            ready = [r for when, r in pending if when <= q]
            pending = [(when, r) for when, r in pending if when > q]
            f.writelines(ready)
        f.writelines(r for _, r in pending)
        f.writelines(late)
        f.write("</posts>\n")


SHARED_EXAMPLES = ROOT.parent / "shared" / "examples"
# The four benchmarks' example files, each converted to MCQ records by mcqify (the --against files).
BENCHMARKS = {
    "arc": ["arc/ARC-Easy-Dev.jsonl", "arc/ARC-Challenge-Dev.jsonl", "arc/ARC-Challenge-test-hf-first20.jsonl"],
    "mmlu": ["mmlu/test", "mmlu/dev"],
    "gsm8k": ["gsm8k/test-first25.jsonl"],
    "math": ["math/test"],
}


def convert_benchmarks(examples: Path, tmp: Path, py: str) -> list[Path]:
    """mcqify each benchmark's example files into one MCQ file per benchmark (once, not timed)."""
    out = []
    for name, parts in BENCHMARKS.items():
        path = tmp / f"{name}-mcq.jsonl"
        with open(path, "w") as fh:
            for part in parts:
                subprocess.run([py, "-m", "probllm", "mcqify", "--source", name, str(examples / part)], cwd=ROOT,
                               stdout=fh, stderr=subprocess.DEVNULL, check=True, env={**os.environ,
                                                                                      "PYTHONPATH": str(ROOT)})
        out.append(path)
    return out


def gen_pairs(path: Path, n: int, rng: random.Random, benchmarks: list[Path]) -> None:
    """Preference pairs; every 100th prompt quotes a benchmark item (question + options) inside other words."""
    items = [json.loads(line) for b in benchmarks for line in b.read_text().splitlines()]
    with open(path, "w") as f:
        for i in range(n):
            prompt = sentence(rng, 40) + "?"
            if i % 100 == 0:
                item = items[rng.randrange(len(items))]
                prompt = f"{sentence(rng, 10)}: {item['question']} {' '.join(item['choices'])} {sentence(rng, 10)}"
            f.write(json.dumps({"id": i, "prompt": prompt, "chosen": sentence(rng, 60) + ".",
                                "rejected": sentence(rng, 60) + "."}) + "\n")


def gen_gsm8k(path: Path, n: int, rng: random.Random) -> None:
    with open(path, "w") as f:
        for i in range(n):
            a, b = rng.randint(2, 999), rng.randint(2, 99)
            f.write(json.dumps({"question": f"{sentence(rng, 30)} {a} times {b}? (#{i})",
                                "answer": f"{sentence(rng, 20)} {a}*{b}=<<{a}*{b}={a * b}>>{a * b}.\n#### {a * b}"})
                    + "\n")


# Runs a module or a code string in this process and, at exit, writes its own peak RSS (kB) to a file.
HWM_WRAPPER = (
    "import atexit, runpy, sys\n"
    "out = sys.argv.pop(1)\n"
    "def hwm():\n"
    "    line = next(l for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
    "    open(out, 'w').write(line.split()[1])\n"
    "atexit.register(hwm)\n"
    "if sys.argv[1] == '-m':\n"
    "    sys.argv = sys.argv[2:]\n"
    "    runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
    "else:\n"
    "    code = sys.argv.pop(2)\n"
    "    sys.argv = sys.argv[1:]\n"
    "    exec(compile(code, '<reference>', 'exec'), {'__name__': '__main__'})\n"
)

REFERENCE = ("import json,sys\n"
             "for line in open(sys.argv[1], encoding='utf-8'):\n"
             "    sys.stdout.write(json.dumps(json.loads(line), ensure_ascii=False) + '\\n')\n")


def gen_notes(folder: Path, n: int, rng: random.Random) -> None:
    """n markdown notes of about 4 KB, in the style of course notes written for Jekyll sites."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        parts = [f"---\nlayout: page\ntitle: Note {i}\n---\n", f"# {sentence(rng, 4).title()}\n"]
        for s in range(4):
            parts.append(f"## {sentence(rng, 3).title()} {{#s{s}}}\n")
            parts.append(f"{sentence(rng, 40)}. See [this]({{{{ site.baseurl }}}}/n{i}/) and $x_{s}$.\n"
                         f"{sentence(rng, 30)}.\n")
            parts.append(f"```python\nfor i in range({s + 2}):\n\n    total += i * {s}\n```\n")
            parts.append(f"$$\n\\sum_{{i=1}}^{{{s + 3}}} x_i^2\n$$\n")
            parts.append(f"- {sentence(rng, 12)}\n- {sentence(rng, 12)}\n")
            parts.append(f"{{% highlight python %}}\nprint({s})\n{{% endhighlight %}}\n{sentence(rng, 25)}.\n")
        (folder / f"note-{i:04d}.md").write_text("\n".join(parts))


def extract_ref(ref: str, dest: Path) -> str:
    """The tree of commit `ref` in `dest` (git archive: no worktree or branch is created); its short id."""
    sha = subprocess.run(["git", "rev-parse", "--short", ref], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    dest.mkdir(parents=True)
    archive = subprocess.Popen(["git", "archive", ref], cwd=ROOT, stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        sys.exit(f"git archive {ref} failed")
    return sha


def measure(cmd: list[str], tmp: Path, code: Path = ROOT) -> tuple[float, float, float]:
    """(seconds, peak RSS in MB, CPU seconds) of one command (`python -m ...` or `python -c CODE ...`) in its own
    process, running the probllm found in `code` (this checkout, or a baseline extracted by --baseline-ref).
    CPU seconds (user + system, from the rusage of waited-for children) say what one core does even when other
    jobs share the machine and stretch the wall time."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(code)}
    hwm_file = tmp / "hwm"
    hwm_file.unlink(missing_ok=True)
    wrapped = [cmd[0], "-c", HWM_WRAPPER, str(hwm_file), *cmd[1:]]
    with open(os.devnull, "wb") as devnull:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        proc = subprocess.run(wrapped, stdout=devnull, stderr=subprocess.PIPE, cwd=code, env=env)
        elapsed = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0 or not hwm_file.exists():
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr.decode()[-2000:]}")
    return elapsed, int(hwm_file.read_text()) / 1024, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="2000,20000,200000", help="records per input, comma-separated")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--only", default="", help="run only the cases whose name contains one of these "
                                               "comma-separated texts")
    ap.add_argument("--baseline-ref", default=None, help="also run the code of this commit (e.g. c7b2861) and "
                                                          "print new/old time ratios")
    ap.add_argument("--repeats", type=int, default=1, help="runs per case and code; the fastest is kept")
    ap.add_argument("--examples", default=str(SHARED_EXAMPLES), help="the shared benchmark examples (for the "
                                                                     "decontaminate case)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    wanted = [w for w in args.only.split(",") if w]
    py = sys.executable
    rows = []
    with tempfile.TemporaryDirectory(prefix="probllm-bench-") as tmp:
        tmp = Path(tmp)
        codes = [("new", ROOT)]
        if args.baseline_ref:
            sha = extract_ref(args.baseline_ref, tmp / "baseline")
            codes = [(f"old {sha}", tmp / "baseline"), ("new", ROOT)]
        def runs(name: str) -> bool:
            return not wanted or any(w in name for w in wanted)

        benchmarks = convert_benchmarks(Path(args.examples), tmp, py) if runs("decontaminate (pairs)") else []
        against = [a for b in benchmarks for a in ("--against", str(b))]
        for n in sizes:
            rng = random.Random(args.seed)
            hf, xml, gsm = tmp / f"se-{n}.jsonl", tmp / f"Posts-{n}.xml", tmp / f"gsm8k-{n}.jsonl"
            pairs = tmp / f"pairs-{n}.jsonl"
            notes = tmp / f"notes-{n}"
            cases = [
                ("pair-stackexchange (HF jsonl)", hf, ["-m", "probllm", "pair-stackexchange", str(hf)]),
                ("reference: json loads+dumps (HF jsonl)", hf, ["-c", REFERENCE, str(hf)]),
                ("pair-stackexchange (Posts.xml)", xml, ["-m", "probllm", "pair-stackexchange", "--site",
                                                         "math.stackexchange.com", str(xml)]),
                ("mcqify --source gsm8k", gsm, ["-m", "probllm", "mcqify", "--source", "gsm8k", str(gsm)]),
                ("reference: json loads+dumps (gsm8k)", gsm, ["-c", REFERENCE, str(gsm)]),
                ("decontaminate (pairs)", pairs, ["-m", "probllm", "decontaminate", *against, str(pairs)]),
                ("reference: json loads+dumps (pairs)", pairs, ["-c", REFERENCE, str(pairs)]),
                # probllm.io's read + write with no work (split keeping everything): the JSONL contract's floor
                ("reference: probllm io pass-through (pairs)", pairs, ["-m", "probllm", "split", "--part", "train",
                                                                      "--test-fraction", "0", str(pairs)]),
                ("index (markdown notes)", notes, ["-m", "probllm", "index", str(notes), "--out", "{index}"]),
            ]
            cases = [c for c in cases if runs(c[0])]
            # Only the inputs of the cases that run are generated (Posts.xml at 200k is 570 MB).
            inputs = {c[1] for c in cases}
            if hf in inputs:
                gen_hf(hf, n, rng)
            if xml in inputs:
                gen_posts_xml(xml, n, rng)
            if gsm in inputs:
                gen_gsm8k(gsm, n, rng)
            if pairs in inputs:
                gen_pairs(pairs, n, rng, benchmarks)
            if notes in inputs:
                gen_notes(notes, max(1, n // 100), rng)
            for name, path, argv in cases:
                sides = codes[-1:] if name.startswith("reference") else codes
                best: dict[str, tuple[float, float, float]] = {}
                for rep in range(args.repeats):
                    for label, code in sides:  # alternate old and new, so a busy moment hits both alike
                        index_dir = tmp / f"index-{n}-{rep}-{label.split()[0]}"  # fresh: no incremental reuse
                        cmd = [py] + [a.replace("{index}", str(index_dir)) for a in argv]
                        seconds, rss, cpu = measure(cmd, tmp, code)
                        shutil.rmtree(index_dir, ignore_errors=True)
                        if label not in best or seconds < best[label][0]:
                            best[label] = (seconds, rss, cpu)
                mb = input_mb(path)
                for label, _ in sides:
                    seconds, rss, cpu = best[label]
                    rows.append((name, label, n, mb, seconds, n / seconds, mb / seconds, rss, cpu))
                    print(f"{name:38s} {label:12s} {n:>8d} records {mb:8.1f} MB {seconds:7.2f} s {rss:7.1f} MB peak "
                          f"{cpu:7.2f} CPU s", file=sys.stderr, flush=True)
            for p in (hf, xml, gsm, pairs):
                p.unlink(missing_ok=True)
            shutil.rmtree(notes, ignore_errors=True)
    table = render(rows, args.seed, bool(args.baseline_ref))
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table)


def input_mb(path: Path) -> float:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6
    return path.stat().st_size / 1e6


def render(rows: list[tuple], seed: int, compare: bool) -> str:
    ref = {(name.split("(")[-1].rstrip(")"), n): rps for name, label, n, _, _, rps, _, _, _ in rows
           if name.startswith("reference: json")}
    lines = [
        f"Generated inputs, seed {seed}; one process per measurement (CLI start-up included); "
        f"{os.cpu_count()} CPUs; Python {sys.version.split()[0]}.",
        "",
        "| command | code | records | input MB | seconds | records/s | MB/s | peak RSS MB | CPU s | "
        "vs json loads+dumps |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, label, n, mb, seconds, rps, mbps, rss, cpu in rows:
        kind = "gsm8k" if "gsm8k" in name else "pairs" if "pairs" in name else "HF jsonl"
        skip_ratio = name.startswith(("ref", "index")) or "xml" in name or (kind, n) not in ref
        ratio = "" if skip_ratio else f"{ref[(kind, n)] / rps:.1f}x slower"
        lines.append(f"| {name} | {label} | {n:,} | {mb:.2f} | {seconds:.2f} | {rps:,.0f} | {mbps:.1f} | {rss:.0f} "
                     f"| {cpu:.2f} | {ratio} |")
    # Start-up (interpreter, imports, for decontaminate the benchmark index) is paid once per run: the rate
    # between the smallest and the largest input is what a large input sees.
    spans: dict[tuple[str, str], list[tuple[int, float, float]]] = {}
    for name, label, n, _, seconds, _, _, _, cpu in rows:
        spans.setdefault((name, label), []).append((n, seconds, cpu))
    steady = [(name, label, min(v), max(v)) for (name, label), v in spans.items() if len(v) > 1]
    if steady:
        lines += ["", "Beyond start-up: records/s between the smallest and the largest input "
                      "((n_max - n_min) / (t_max - t_min)), by the clock and per CPU-second of the process:", "",
                  "| command | code | start-up s (extrapolated) | records/s | records per CPU-second |",
                  "| --- | --- | ---: | ---: | ---: |"]
        for name, label, (n0, t0, c0), (n1, t1, c1) in steady:
            rate = (n1 - n0) / (t1 - t0) if t1 > t0 else float("inf")
            per_cpu = (n1 - n0) / (c1 - c0) if c1 > c0 else float("inf")
            lines.append(f"| {name} | {label} | {t0 - n0 / rate:.2f} | {rate:,.0f} | {per_cpu:,.0f} |")
    if compare:
        times = {(name, label.split()[0], n): seconds for name, label, n, _, seconds, _, _, _, _ in rows}
        lines += ["", "New code against the baseline (fastest run of each; below 1.00 the new code is faster):", "",
                  "| command | records | old s | new s | new / old |", "| --- | ---: | ---: | ---: | ---: |"]
        for (name, side, n), new in times.items():
            old = times.get((name, "old", n))
            if side == "new" and old:
                lines.append(f"| {name} | {n:,} | {old:.2f} | {new:.2f} | {new / old:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
