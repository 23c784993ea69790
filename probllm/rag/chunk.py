"""Course notes to retrieval chunks: clean markdown, split along headings and paragraphs, pack to a token budget.

Notes written for Jekyll sites (CS231n-style) carry front matter, `<a name=...>` anchors, HTML figure markup
and Liquid directives (`{{ site.baseurl }}`, `{% highlight python %}`). None of that helps an embedder, so it is
cleaned out of the chunk text, while every chunk keeps the character offsets of the ORIGINAL file it came from
(so a reader can open the note at the right place).

Blocks are the units of meaning: a heading, a paragraph (or list), a fenced code block, a `$$ ... $$` math
block. Chunks never cross a heading (each chunk belongs to one section and remembers its heading path) and never
split inside a code or math block unless that block alone exceeds the token budget; then it is cut at line
boundaries. A paragraph that exceeds the budget is cut at sentence boundaries. Consecutive chunks of a section
share up to `overlap` tokens of trailing text, so a passage cut in two is still found whole in one of them.

Tokens are counted with the embedder's own tokenizer (the budget is about what the embedder sees: MiniLM reads
at most 256 word pieces and silently truncates the rest).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable

TokenCounter = Callable[[list[str]], list[int]]

FRONT_MATTER = re.compile(r"\A(?:\ufeff)?---[ \t]*\r?\n.*?\r?\n(?:---|\.\.\.)[ \t]*(?:\r?\n|\Z)", re.S)
FENCE_OPEN = re.compile(r"^[ \t]{0,3}(`{3,}|~{3,})(.*)$")
LIQUID_HIGHLIGHT_OPEN = re.compile(r"^\s*\{%-?\s*highlight\b\s*([\w+-]*)[^%]*-?%\}\s*$")
LIQUID_HIGHLIGHT_CLOSE = re.compile(r"^\s*\{%-?\s*endhighlight\s*-?%\}\s*$")
HEADING = re.compile(r"^[ \t]{0,3}(#{1,6})[ \t]+(.*?)[ \t#]*$")
SETEXT_UNDERLINE = re.compile(r"^[ \t]{0,3}(=+|-+)[ \t]*$")
MATH_FENCE = "$$"
HTML_COMMENT = re.compile(r"<!--.*?-->", re.S)
LIQUID_TAG = re.compile(r"\{%-?.*?-?%\}", re.S)
LIQUID_OUTPUT = re.compile(r"\{\{-?.*?-?\}\}", re.S)
HTML_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9-]*(?:\s+[^<>]*?)?\s*/?>")
HEADING_ATTRS = re.compile(r"\s*\{[#.][^}]*\}\s*$")  # kramdown `## Title {#anchor}`
BLANKS = re.compile(r"[ \t]+")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")


@dataclass
class Block:
    """One unit of a document: kind is heading, text, code or math; offsets are into the original text."""

    kind: str
    start: int
    end: int
    text: str  # cleaned text (what the embedder and the reader see)
    heading: tuple[str, ...] = ()
    level: int = 0  # heading level for headings
    tokens: int = 0


@dataclass
class Chunk:
    text: str
    heading: tuple[str, ...]
    start: int
    end: int
    tokens: int
    position: int = 0
    metadata: dict = field(default_factory=dict)

    @property
    def heading_path(self) -> str:
        return " > ".join(self.heading)

    def embed_text(self) -> str:
        """What is embedded: the heading path gives a passage cut from the middle of a section its topic."""
        path = self.heading_path
        if path and not self.text.startswith(self.heading[-1] if self.heading else ""):
            return f"{path}\n\n{self.text}"
        return self.text

    def content_hash(self) -> str:
        return hashlib.sha256(self.embed_text().encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------------- cleaning


def clean_inline(text: str) -> str:
    """Markup that carries no meaning for a reader of plain text: HTML comments, tags (keeping their inner
    text, e.g. figure captions), Liquid directives and outputs. Markdown emphasis and links stay readable."""
    text = HTML_COMMENT.sub(" ", text)
    text = LIQUID_TAG.sub(" ", text)
    text = LIQUID_OUTPUT.sub("", text)
    text = HTML_TAG.sub(" ", text)
    text = text.replace("&nbsp;", " ").replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    lines = [BLANKS.sub(" ", line).strip() for line in text.splitlines()]
    return "\n".join(line for line in lines if line)


def front_matter_end(text: str) -> int:
    m = FRONT_MATTER.match(text)
    return m.end() if m else 0


# ----------------------------------------------------------------------------------------------------- blocks


def _lines_with_offsets(text: str, start: int) -> list[tuple[int, str]]:
    out = []
    pos = start
    for line in text[start:].splitlines(keepends=True):
        out.append((pos, line))
        pos += len(line)
    return out


def parse_blocks(text: str, markdown: bool = True) -> list[Block]:
    """Split a document into heading, text, code and math blocks with offsets into `text`.

    Plain text (markdown=False) is only split into paragraphs at blank lines."""
    start = front_matter_end(text) if markdown else 0
    lines = _lines_with_offsets(text, start)
    blocks: list[Block] = []
    headings: list[tuple[int, str]] = []  # (level, title) stack
    para: list[tuple[int, str]] = []

    def path() -> tuple[str, ...]:
        return tuple(t for _, t in headings)

    def flush_para() -> None:
        if not para:
            return
        raw = "".join(line for _, line in para)
        cleaned = clean_inline(raw) if markdown else "\n".join(l.strip() for l in raw.splitlines() if l.strip())
        if cleaned:
            blocks.append(Block("text", para[0][0], para[-1][0] + len(para[-1][1].rstrip("\r\n")), cleaned, path()))
        para.clear()

    i = 0
    n = len(lines)
    while i < n:
        pos, line = lines[i]
        stripped = line.strip()
        if not markdown:
            if stripped:
                para.append((pos, line))
            else:
                flush_para()
            i += 1
            continue
        fence = FENCE_OPEN.match(line.rstrip("\r\n"))
        liquid = LIQUID_HIGHLIGHT_OPEN.match(line)
        if fence or liquid:
            flush_para()
            # A fenced block runs to its closing fence (same character, at least as long) or to the end.
            j = i + 1
            if fence:
                mark = fence.group(1)
                closes = lambda s: s.strip().startswith(mark[0] * len(mark)) and set(s.strip()) == {mark[0]}
                lang = fence.group(2).strip()
            else:
                closes = lambda s: bool(LIQUID_HIGHLIGHT_CLOSE.match(s))
                lang = liquid.group(1)
            while j < n and not closes(lines[j][1]):
                j += 1
            body = "".join(l for _, l in lines[i + 1:j]).rstrip("\n")
            end_line = lines[min(j, n - 1)]
            end = end_line[0] + len(end_line[1].rstrip("\r\n"))
            # Code is shown as a markdown fence whatever it was written as (Liquid highlight included).
            blocks.append(Block("code", pos, end, f"```{lang}\n{body}\n```", path()))
            i = j + 1
            continue
        if stripped.startswith(MATH_FENCE):
            flush_para()
            j = i
            # `$$ x $$` on one line, or `$$` ... `$$` over several lines.
            if MATH_FENCE not in stripped[2:]:
                j = i + 1
                while j < n and MATH_FENCE not in lines[j][1]:
                    j += 1
                j = min(j, n - 1)
            raw = "".join(l for _, l in lines[i:j + 1])
            end = lines[j][0] + len(lines[j][1].rstrip("\r\n"))
            blocks.append(Block("math", pos, end, raw.strip(), path()))
            i = j + 1
            continue
        heading = HEADING.match(line.rstrip("\r\n"))
        setext = (para and len(para) == 1 and SETEXT_UNDERLINE.match(line.rstrip("\r\n"))
                  and not para[0][1].strip().startswith(("-", "*", "|", "<")))
        if heading or setext:
            if heading:
                flush_para()
                level, raw_title, hpos = len(heading.group(1)), heading.group(2), pos
            else:
                level = 1 if stripped.startswith("=") else 2
                hpos, raw_title = para[0][0], para[0][1].strip()
                para.clear()
            title = clean_inline(HEADING_ATTRS.sub("", raw_title)).replace("\n", " ").strip()
            while headings and headings[-1][0] >= level:
                headings.pop()
            if title:
                headings.append((level, title))
                blocks.append(Block("heading", hpos, pos + len(line.rstrip("\r\n")), title, path(), level))
            i += 1
            continue
        if not stripped:
            flush_para()
        else:
            para.append((pos, line))
        i += 1
    flush_para()
    return blocks


# ----------------------------------------------------------------------------------------------------- pieces


def _split_raw(text: str, start: int, end: int, pattern: re.Pattern) -> list[tuple[int, int]]:
    """Spans of text[start:end] cut after each match of `pattern` (the match stays with the left span)."""
    spans, pos = [], start
    for m in pattern.finditer(text, start, end):
        if m.start() > pos:
            spans.append((pos, m.start()))
        pos = m.end()
    if pos < end:
        spans.append((pos, end))
    return spans


def _block_text(text: str, kind: str, start: int, end: int, markdown: bool) -> str:
    raw = text[start:end]
    if kind == "text":
        return clean_inline(raw) if markdown else " ".join(raw.split())
    return raw.strip()


def _split_block(text: str, block: Block, budget: int, count: TokenCounter, markdown: bool,
                 overlap: int = 0) -> list[Block]:
    """A block over budget, cut into pieces that each fit: prose at sentences (then words), code and math at
    lines (then words). Only here may a code or math block be split. Prose pieces are grouped to leave room
    for the overlap carried into the next chunk; code pieces leave room for the fences they are re-wrapped in."""
    if block.kind == "code":
        budget -= count(["```\n```"])[0]
    group_budget = budget - overlap if block.kind == "text" else budget
    if block.kind == "text":
        spans = _split_raw(text, block.start, block.end, SENTENCE_END)
    else:
        spans = _split_raw(text, block.start, block.end, re.compile(r"\n"))
    pieces: list[tuple[int, int]] = []
    span_sizes = count([_block_text(text, block.kind, s, e, markdown) for s, e in spans])  # one batched call
    for (s, e), size in zip(spans, span_sizes):
        if size <= budget:
            pieces.append((s, e))
            continue
        words = _split_raw(text, s, e, re.compile(r"\s+"))
        sizes = count([text[a:b] for a, b in words])
        cur, cur_n = None, 0
        for (a, b), k in zip(words, sizes):
            if cur is not None and cur_n + k > budget:
                pieces.append(cur)
                cur, cur_n = None, 0
            cur = (cur[0], b) if cur else (a, b)
            cur_n += k
        if cur:
            pieces.append(cur)
    # Regroup consecutive pieces while they fit, so that a long code block becomes few large pieces.
    texts = [_block_text(text, block.kind, a, b, markdown) for a, b in pieces]
    sizes = count(texts)
    out: list[Block] = []
    cur_span, cur_n = None, 0
    for (a, b), k in zip(pieces, sizes):
        if cur_span is not None and cur_n + k > group_budget:
            out.append(_piece(text, block, cur_span, markdown))
            cur_span, cur_n = None, 0
        cur_span = (cur_span[0], b) if cur_span else (a, b)
        cur_n += k
    if cur_span:
        out.append(_piece(text, block, cur_span, markdown))
    return [p for p in out if p.text]


def _piece(text: str, block: Block, span: tuple[int, int], markdown: bool) -> Block:
    kind = block.kind
    body = _block_text(text, "text" if kind == "text" else kind, span[0], span[1], markdown)
    if kind == "code":
        # A piece of a code block stays a code block for the reader: strip the original fences, re-fence.
        lines = [l for l in body.splitlines() if not FENCE_OPEN.match(l) and not LIQUID_HIGHLIGHT_OPEN.match(l)
                 and not LIQUID_HIGHLIGHT_CLOSE.match(l)]
        body = "```\n" + "\n".join(lines) + "\n```" if any(l.strip() for l in lines) else ""
    return Block(kind, span[0], span[1], body, block.heading, block.level)


# ----------------------------------------------------------------------------------------------------- chunks


def chunk_document(
    text: str,
    count: TokenCounter,
    chunk_tokens: int = 200,
    overlap: int = 40,
    markdown: bool = True,
) -> list[Chunk]:
    """Chunks of one document, in order. `count` maps a list of strings to their token counts (batched, so a
    fast tokenizer does one call per block list)."""
    if chunk_tokens < 8:
        raise ValueError("chunk_tokens must be at least 8")
    overlap = max(0, min(overlap, chunk_tokens // 2))
    blocks = parse_blocks(text, markdown=markdown)
    if not blocks:
        return []
    for b, k in zip(blocks, count([b.text for b in blocks])):
        b.tokens = k
    units: list[Block] = []
    for b in blocks:
        if b.tokens > chunk_tokens:
            pieces = _split_block(text, b, chunk_tokens, count, markdown, overlap)
            for p, k in zip(pieces, count([p.text for p in pieces])):
                p.tokens = k
            units.extend(pieces)
        else:
            units.append(b)

    chunks: list[Chunk] = []
    for section in _sections(units):
        _pack(section, chunk_tokens, overlap, count, text, markdown, chunks)
    for i, c in enumerate(chunks):
        c.position = i
    return chunks


def _sections(units: list[Block]) -> Iterable[list[Block]]:
    """Runs of units under the same heading. A heading with no text of its own before the next heading (a
    title followed by a sub-heading) is carried into the next section rather than made a chunk alone."""
    section: list[Block] = []
    for u in units:
        if u.kind == "heading" and any(s.kind != "heading" for s in section):
            yield section
            section = []
        section.append(u)
    if section and any(s.kind != "heading" for s in section):
        yield section
    elif section and not any(s.kind != "heading" for s in section):
        yield section  # a document that is only headings still yields its titles


def _pack(units: list[Block], budget: int, overlap: int, count: TokenCounter, text: str, markdown: bool,
          out: list[Chunk]) -> None:
    current: list[Block] = []
    used = 0
    fresh = 0  # units in `current` that are not overlap carried from the previous chunk

    def emit() -> None:
        body = "\n\n".join(u.text for u in current)
        heading = next((u.heading for u in reversed(current) if u.heading), ())
        out.append(Chunk(body, heading, current[0].start, current[-1].end, used))

    for u in units:
        if not u.text:
            continue
        if current and fresh and used + u.tokens > budget:
            emit()
            current = _overlap_tail(current, overlap, count, text, markdown)
            used = sum(c.tokens for c in current)
            while current and used + u.tokens > budget:
                used -= current.pop(0).tokens
            fresh = 0
        current.append(u)
        used += u.tokens
        fresh += 1
    if current and fresh:
        emit()


def _overlap_tail(units: list[Block], overlap: int, count: TokenCounter, text: str, markdown: bool) -> list[Block]:
    """The trailing text of a chunk, up to `overlap` tokens, repeated at the start of the next chunk: whole
    units when they fit, else the last sentences of a prose unit. Code and math are never cut for overlap."""
    if overlap <= 0:
        return []
    tail: list[Block] = []
    room = overlap
    for u in reversed(units):
        if u.kind == "heading":
            break
        if u.tokens <= room:
            tail.insert(0, u)
            room -= u.tokens
            continue
        if u.kind == "text":
            sentences = _split_raw(text, u.start, u.end, SENTENCE_END)
            sizes = count([_block_text(text, "text", a, b, markdown) for a, b in sentences])
            start = None
            for (a, b), k in zip(reversed(sentences), reversed(sizes)):
                if k > room:
                    break
                room -= k
                start = a
            body = _block_text(text, "text", start, u.end, markdown) if start is not None else ""
            if body:
                tail.insert(0, Block("text", start, u.end, body, u.heading, 0, overlap - room))
        break
    return tail


def token_counter(tokenizer) -> TokenCounter:
    """A batched counter from a Hugging Face tokenizer (special tokens not counted)."""

    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        # A private copy of the Rust tokenizer without truncation or padding: exact counts for the long
        # paragraphs we measure precisely in order to cut them, no "longer than maximum" warnings, and the
        # embedder's own tokenizer settings untouched.
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(backend.to_str())
        backend.no_truncation()
        backend.no_padding()
    else:
        backend = None

    # Packing and overlap ask for the same sentences' counts again and again: remember them (bounded).
    memo: dict[str, int] = {}
    # BERT-style tokenizers (WordPiece after a whitespace-and-punctuation pre-tokenizer, per-character
    # normalisation: MiniLM, BGE, E5...) are additive over whitespace: a text has exactly the sum of its
    # words' tokens. Then each distinct word is tokenized once, ever (Zipf: few distinct words), which takes
    # the token counting off the indexing profile. Byte-level BPE and SentencePiece are not additive (a word's
    # tokens depend on the space before it): for them whole texts are counted.
    additive = backend is not None and type(backend.pre_tokenizer).__name__ in ("BertPreTokenizer", "Whitespace")

    def count(texts: list[str]) -> list[int]:
        if not texts:
            return []
        if additive:
            words = [t.split() for t in texts]
            distinct = list({w for ws in words for w in ws})
            size = dict(zip(distinct, exact(distinct)))
            return [sum(size[w] for w in ws) for ws in words]
        return exact(texts)

    def exact(texts: list[str]) -> list[int]:
        if not texts:
            return []
        todo = list(dict.fromkeys(t for t in texts if t not in memo))
        if todo:
            if len(memo) > 200_000:
                memo.clear()
            if backend is not None:
                sizes = [len(e.ids) for e in backend.encode_batch(todo, add_special_tokens=False)]
            else:
                sizes = [len(ids) for ids in tokenizer(todo, add_special_tokens=False, truncation=False)["input_ids"]]
            memo.update(zip(todo, sizes))
        return [memo[t] for t in texts]

    return count


def word_counter(texts: list[str]) -> list[int]:
    """Whitespace words: a stand-in counter for tests that are about structure, not about a tokenizer."""
    return [len(t.split()) for t in texts]
