"""`decontaminate`: drop (or flag) training records that share a word n-gram with a benchmark item.

The method is lm-evaluation-harness's (its `Janitor`) and GPT-3's: text is lower-cased (ASCII letters),
ASCII punctuation is deleted (`don't` -> `dont`, `x-ray` -> `xray`), words are what whitespace separates, and a
training record is contaminated when one of its word 13-grams (`--ngram`) is also a 13-gram of a benchmark
item's question followed by its options. A record's fields are checked one by one (no n-gram spans two fields).

Speed: the benchmark side is a sorted array of 64-bit n-gram hashes (12 bytes per n-gram with its owner: the
test sets of MMLU, ARC, GSM8K and MATH, about a million n-grams, take 12 MB) behind a table of one-byte slots that
rejects almost every miss with one memory read. The training side is hashed a batch at a time with numpy and no
Python loop per word: the texts of about a thousand records are joined and normalised in one call, word
boundaries are found on the bytes, a word is hashed from its length and its first and last 8 bytes, an n-gram
is a polynomial of its word hashes from prefix sums. A hash hit is confirmed on the words themselves before a
record is dropped, so a hash collision can never drop a clean record.
"""

from __future__ import annotations

import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from probllm.io import Record, Stats, UsageError, log

NGRAM = 13
# Where the text of a pair or QA record lives; message lists (TRL conversational, ShareGPT) are read too.
TEXT_FIELDS = ("prompt", "question", "chosen", "rejected", "answer", "conversations", "messages")
FLAG_FIELD = "contamination"
MAX_MATCHES = 10  # benchmark items named per record (a boilerplate n-gram can be in hundreds)
BATCH_BYTES = 1 << 20  # training text hashed per numpy pass: large enough that numpy's per-call cost vanishes

# ASCII capitals to lower case; control characters (NUL included) to spaces, so that the bytes at or below
# b" " are exactly the ones bytes.split() splits on, and NUL is free to separate the texts of a batch.
_CONTROLS = bytes(range(32))
_LOWER = bytes.maketrans(string.ascii_uppercase.encode() + _CONTROLS,
                         string.ascii_lowercase.encode() + b" " * len(_CONTROLS))
# The same, keeping NUL: for a batch of texts joined by NUL and normalised in one call.
_LOWER_KEEP_NUL = bytes.maketrans(string.ascii_uppercase.encode() + _CONTROLS[1:],
                                  string.ascii_lowercase.encode() + b" " * (len(_CONTROLS) - 1))
_PUNCT = string.punctuation.encode()
_SEP = b"\x00"  # joins the texts of a batch: a boundary that no n-gram crosses
_Q = 0x9E3779B97F4A7C15  # odd: invertible modulo 2**64
_ZERO = np.zeros(1, dtype=np.uint64)  # (a Python 0 would turn a uint64 concatenation into floats)
# Masks keeping the first k bytes of a little-endian 8-byte load (k = 0..8).
_KEEP = np.array([(1 << (8 * k)) - 1 for k in range(8)] + [(1 << 64) - 1], dtype=np.uint64)


def normalize(text: str) -> bytes:
    """lm-eval's normalisation: ASCII lower case, ASCII punctuation deleted (on UTF-8 bytes: fast, same result)."""
    return text.encode("utf-8", "replace").translate(_LOWER, _PUNCT)


def ngrams(text: str, n: int = NGRAM) -> list[str]:
    """The word n-grams of a text after normalisation, as strings (for people, tests and confirmation)."""
    words = normalize(text).split()
    return [b" ".join(words[i:i + n]).decode("utf-8", "replace") for i in range(len(words) - n + 1)]


class _Powers:
    """base**i and base**-i modulo 2**64 for i < size, grown on demand."""

    def __init__(self, base: int):
        self.base, self.inverse = base, pow(base, -1, 1 << 64)
        self.up = self.down = np.ones(0, dtype=np.uint64)

    def get(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self.up) < size:
            size = max(size, 2 * len(self.up), 1024)
            with np.errstate(over="ignore"):
                self.up = np.cumprod(np.full(size, self.base, dtype=np.uint64)) * np.uint64(self.inverse)
                self.down = np.cumprod(np.full(size, self.inverse, dtype=np.uint64)) * np.uint64(self.base)
        return self.up[:size], self.down[:size]


class NgramHasher:
    """64-bit hashes of every word n-gram of many normalised texts at once, with no Python loop per word.

    A word's hash combines its length with its first and last 8 bytes (two unaligned 8-byte loads from the
    joined buffer): words that differ only in the middle of a long word collide, and the confirmation on the
    words themselves sorts that out. An n-gram's hash is a polynomial in its word hashes, from prefix sums, so
    it does not depend on where the n-gram stands; its high bits (the bitmap's) mix every word's bits."""

    def __init__(self, n: int = NGRAM):
        self.n = n
        self._powers = _Powers(_Q)

    def hash_strings(self, texts: list[str]) -> "HashedTexts":
        """`hash_texts` of the texts' normalisations, normalised in one call on the joined batch."""
        joined = "\x00".join(texts).encode("utf-8", "replace")
        if joined.count(b"\x00") != len(texts) - 1:  # a NUL inside a text: normalise text by text
            return self.hash_texts([normalize(t) for t in texts])
        return self._hash_joined(joined.translate(_LOWER_KEEP_NUL, _PUNCT), len(texts))

    def hash_texts(self, texts: list[bytes]) -> "HashedTexts":
        """See `_hash_joined`; `texts` are normalised (so hold no NUL)."""
        return self._hash_joined(_SEP.join(texts), len(texts))

    def _hash_joined(self, body: bytes, n_texts: int) -> "HashedTexts":
        """The n-gram hashes of the normalised `texts`, one per word position of the batch: the n words that
        start there. Near the end of a text they run on into the next one; `HashedTexts.within_texts` says
        which do not (a training-side hit on one fails confirmation anyway: it is not n words of one text)."""
        raw = _SEP + body + _SEP + b" " * 8  # a boundary at each end; room for the last 8-byte load
        buf = np.frombuffer(raw, dtype=np.uint8)[:len(raw) - 8]
        in_word = buf > 32
        edges = np.flatnonzero(in_word[1:] != in_word[:-1]) + 1  # word starts and ends, alternating
        starts, ends = edges[0::2], edges[1::2]
        # The first word of text k is the first word after the k-th separator.
        first_word = np.searchsorted(starts, np.flatnonzero(buf == 0)[:n_texts])
        count = len(starts) - self.n + 1
        if count < 1:
            return HashedTexts(np.zeros(0, dtype=np.uint64), first_word, self.n)
        loads = np.ndarray((len(buf),), dtype="<u8", buffer=raw, strides=(1,))
        length = ends - starts
        keep = _KEEP[np.minimum(length, 8)]
        with np.errstate(over="ignore"):
            words = (loads[starts] & keep) * np.uint64(0xFF51AFD7ED558CCD) + \
                (loads[np.maximum(ends - 8, starts)] & keep) * np.uint64(0xC4CEB9FE1A85EC53) + \
                length.astype(np.uint64)
            up, down = self._powers.get(len(words) + 1)
            prefix = np.concatenate((_ZERO, np.cumsum(words * up[:len(words)], dtype=np.uint64)))
            grams = (prefix[self.n:] - prefix[:count]) * down[:count]
        return HashedTexts(grams, first_word, self.n)


@dataclass
class HashedTexts:
    grams: np.ndarray  # the hash of the n words from each word position of the batch on
    first_word: np.ndarray  # word position where each text starts
    n: int

    def within_texts(self) -> np.ndarray:
        """The word positions whose n-gram lies inside one text."""
        ok = np.ones(len(self.grams), dtype=bool)
        # An n-gram that starts fewer than n words before a text's first word spans two texts.
        crossing = (self.first_word[self.first_word > 0][:, None] - np.arange(1, self.n)[None, :]).ravel()
        ok[crossing[(crossing >= 0) & (crossing < len(ok))]] = False
        return ok

    def locate(self, k: int) -> tuple[int, int]:
        """(text, word position in that text) of the n-gram at batch word position k."""
        text = int(np.searchsorted(self.first_word, k, "right")) - 1
        return text, k - int(self.first_word[text])

    def located(self) -> Iterator[tuple[int, int, int]]:
        """(hash, text, position) of every n-gram inside one text (for tests and people)."""
        for k in np.flatnonzero(self.within_texts()).tolist():
            yield (int(self.grams[k]), *self.locate(k))


@dataclass
class BenchmarkItem:
    benchmark: str  # the --against argument it came from
    id: str
    text: str  # question and options, as checked


@dataclass
class BenchmarkIndex:
    """Every n-gram of every benchmark item: sorted hashes, the item that owns each, and a bitmap in front."""

    n: int = NGRAM
    items: list[BenchmarkItem] = field(default_factory=list)
    items_per_benchmark: Counter = field(default_factory=Counter)

    def build(self, hasher: NgramHasher) -> None:
        hashes, owners = [], []
        for start in range(0, len(self.items), 4096):
            chunk = self.items[start:start + 4096]
            hashed = hasher.hash_texts([normalize(it.text) for it in chunk])
            at = np.flatnonzero(hashed.within_texts())
            hashes.append(hashed.grams[at])
            owners.append(np.searchsorted(hashed.first_word, at, "right") - 1 + start)
        h = np.concatenate(hashes) if hashes else np.zeros(0, dtype=np.uint64)
        o = np.concatenate(owners) if owners else np.zeros(0, dtype=np.int64)
        order = np.argsort(h, kind="stable")
        # Equal hashes stay, each with its item: an n-gram in several items, or (rarely) two n-grams whose hashes
        # collide; a hit is confirmed against every item that owns the hash.
        self.hashes, self.owners = h[order], o[order].astype(np.int32)
        # 16 to 32 one-byte slots per n-gram (16 MB for a million): a miss passes with probability under 1/16.
        self.bits = max(16, int(len(self.hashes) * 16).bit_length())
        self.bitmap = np.zeros(1 << self.bits, dtype=bool)
        self.bitmap[self.hashes >> np.uint64(64 - self.bits)] = True
        self._grams: dict[int, set[str]] = {}

    @property
    def size(self) -> int:
        return len(self.hashes)

    def lookup(self, hashes: np.ndarray) -> Iterator[tuple[int, list[int]]]:
        """(index into `hashes`, the items that own that hash) for every hash that hits."""
        maybe = np.flatnonzero(self.bitmap[hashes >> np.uint64(64 - self.bits)])
        if not len(maybe) or not self.size:
            return
        wanted = hashes[maybe]
        left = np.searchsorted(self.hashes, wanted).clip(max=self.size - 1)
        for k in np.flatnonzero(self.hashes[left] == wanted).tolist():
            first = last = int(left[k])
            while last + 1 < self.size and self.hashes[last + 1] == self.hashes[first]:
                last += 1
            yield int(maybe[k]), self.owners[first:last + 1].tolist()

    def item_grams(self, owner: int) -> set[str]:
        grams = self._grams.get(owner)
        if grams is None:
            grams = self._grams[owner] = set(ngrams(self.items[owner].text, self.n))
        return grams


# ------------------------------------------------------------------------------------------------ benchmarks


def _choice_texts(value: Any) -> list[str]:
    if isinstance(value, dict) and isinstance(value.get("text"), list):  # Hugging Face ARC: {text: [], label: []}
        value = value["text"]
    if not isinstance(value, list):
        return []
    out = []
    for c in value:
        if isinstance(c, dict):  # original ARC: [{text, label}]
            c = c.get("text")
        if isinstance(c, (str, int, float)) and not isinstance(c, bool):
            out.append(str(c))
    return out


def benchmark_text(rec: dict) -> str | None:
    """A benchmark item's question followed by its options: MCQ records (mcqify), original ARC
    (`question.stem`, `question.choices`), Hugging Face ARC, MMLU CSV rows (A-D), GSM8K `question`, MATH
    `problem`."""
    question, choices = rec.get("question"), _choice_texts(rec.get("choices"))
    if isinstance(question, dict):  # original ARC
        choices = choices or _choice_texts(question.get("choices"))
        question = question.get("stem")
    if not isinstance(question, str):
        question = rec.get("problem")
    if not isinstance(question, str) or not question.strip():
        return None
    if not choices and all(isinstance(rec.get(k), str) for k in "ABCD"):  # MMLU CSV row
        choices = [rec[k] for k in "ABCD"]
    return " ".join([question, *choices])


def load_benchmarks(paths: list[str], n: int = NGRAM, skip_invalid: bool = False) -> BenchmarkIndex:
    """Every item of every `--against` file (MCQ records, or raw benchmark files `mcqify` reads: JSONL, JSON,
    folders, header-less MMLU CSVs), indexed by n-gram."""
    from probllm.data.load import read_inputs

    index = BenchmarkIndex(n=n)
    for path in paths:
        stats = Stats(command="probllm decontaminate --against")
        before = len(index.items)
        for rec in read_inputs([path], stats, skip_invalid):
            text = benchmark_text(rec)
            if text is None:
                where = f"{getattr(rec, 'source', path)}:{getattr(rec, 'line', 0)}"
                raise UsageError(f"--against {path}: {where}: not a benchmark item (no question or problem "
                                 "text)")
            item_id = rec.get("id")
            if item_id is None:
                item_id = f"{getattr(rec, 'source', path)}:{getattr(rec, 'line', 0)}"
            index.items.append(BenchmarkItem(path, str(item_id), text))
        index.items_per_benchmark[path] = len(index.items) - before
        if len(index.items) == before:
            raise UsageError(f"--against {path}: no benchmark items")
    index.build(NgramHasher(n))
    return index


# --------------------------------------------------------------------------------------------- training side


def _texts(value: Any) -> Iterator[str]:
    """The strings of a field: a string, a message list ({role, content} or ShareGPT {from, value}), a message."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key in ("content", "value", "text"):
            if isinstance(value.get(key), str):
                yield value[key]
                return
    elif isinstance(value, list):
        for v in value:
            yield from _texts(v)


@dataclass
class Decontaminator:
    index: BenchmarkIndex
    fields: tuple[str, ...] = TEXT_FIELDS
    flag: bool = False
    overlaps: Counter = field(default_factory=Counter)  # benchmark -> records that share an n-gram with it
    contaminated: int = 0  # records that share an n-gram with any benchmark
    without_text: int = 0

    def __post_init__(self) -> None:
        self.hasher = NgramHasher(self.index.n)

    def run(self, records: Iterable[Record], stats: Stats) -> Iterator[dict]:
        batch: list[Record] = []
        texts: list[str] = []
        owners: list[tuple[int, str]] = []  # (record in batch, field) of each text
        size = 0
        fields = self.fields
        for rec in records:
            found = False
            for name in fields:
                value = rec.get(name)
                if value is None:
                    continue
                if type(value) is str:  # the common case, without the generator
                    texts.append(value)
                    owners.append((len(batch), name))
                    size += len(value)
                    found = True
                    continue
                for text in _texts(value):
                    texts.append(text)
                    owners.append((len(batch), name))
                    size += len(text)
                    found = True
            if not found:
                self.without_text += 1
            batch.append(rec)
            if size >= BATCH_BYTES:
                yield from self._flush(batch, texts, owners, stats)
                batch, texts, owners, size = [], [], [], 0
        yield from self._flush(batch, texts, owners, stats)

    def _flush(self, batch: list[Record], texts: list[str], owners: list[tuple[int, str]],
               stats: Stats) -> Iterator[dict]:
        found: dict[int, list[dict]] = {}
        if texts and self.index.size:
            hashed = self.hasher.hash_strings(texts)
            for k, items in self.index.lookup(hashed.grams):
                t, position = hashed.locate(k)
                rec_no, name = owners[t]
                for item in items:
                    self._confirm(found.setdefault(rec_no, []), name, texts[t], position, item)
        if not found:
            yield from batch
            return
        for i, rec in enumerate(batch):
            matches = found.get(i)
            if not matches:
                yield rec
                continue
            for bench in dict.fromkeys(m["benchmark"] for m in matches):
                self.overlaps[bench] += 1
            self.contaminated += 1
            if self.flag:
                yield {**rec, FLAG_FIELD: matches}
            else:
                stats.skip(f"shares a {self.index.n}-gram with {matches[0]['benchmark']}")

    def _confirm(self, matches: list[dict], name: str, text: str, position: int, owner: int) -> None:
        """Record the match if the words really are the item's (not a hash collision), once per item."""
        item = self.index.items[owner]
        if len(matches) >= MAX_MATCHES or any(m["id"] == item.id and m["benchmark"] == item.benchmark
                                              for m in matches):
            return
        words = normalize(text).split()[position:position + self.index.n]
        gram = b" ".join(words).decode("utf-8", "replace")
        if gram in self.index.item_grams(owner):
            matches.append({"benchmark": item.benchmark, "id": item.id, "field": name, "ngram": gram})


def run_decontaminate(files: list[str] | None, stats: Stats, *, against: list[str], ngram: int = NGRAM,
                      fields: list[str] | None = None, flag: bool = False, skip_invalid: bool = False,
                      limit: int | None = None) -> None:
    """The `decontaminate` command: index the benchmarks, stream the records, drop or flag overlaps."""
    from probllm.io import read_records, write_records

    if not against:
        raise UsageError("--against: name at least one benchmark file (MCQ records or a raw benchmark file)")
    if ngram < 1:
        raise UsageError("--ngram must be at least 1")
    for path in against:
        if not Path(path).expanduser().exists():
            raise UsageError(f"--against {path}: no such file or folder")
    index = load_benchmarks(against, ngram, skip_invalid)
    log(f"probllm decontaminate: {len(index.items)} benchmark items, {index.size} {ngram}-grams "
        f"(" + ", ".join(f"{b}: {k}" for b, k in index.items_per_benchmark.items()) + ")")
    worker = Decontaminator(index, tuple(fields or TEXT_FIELDS), flag)
    try:
        write_records(worker.run(read_records(files, stats, skip_invalid, limit=limit), stats), stats)
    finally:  # also after Ctrl-C or a bad record: what was found so far
        overlaps = ", ".join(f"{b}: {worker.overlaps.get(b, 0)}" for b in index.items_per_benchmark)
        log(f"probllm decontaminate: records sharing a {ngram}-gram, per benchmark: {overlaps}"
            + (" (flagged, kept)" if flag else " (dropped)"))
        if worker.without_text:
            log(f"probllm decontaminate: note: {worker.without_text} records had none of the fields "
                f"{', '.join(worker.fields)} (kept: nothing to check)")
        if flag:
            stats.notes["flagged"] = worker.contaminated
        stats.figures.update({"ngram": ngram, "mode": "flag" if flag else "drop",
                              "benchmark_items": dict(index.items_per_benchmark), "benchmark_ngrams": index.size,
                              "overlaps": {b: worker.overlaps.get(b, 0) for b in index.items_per_benchmark},
                              "records_without_text": worker.without_text})
