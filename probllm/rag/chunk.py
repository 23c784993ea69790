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

import functools
import hashlib
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable

TokenCounter = Callable[[list[str]], list[int]]

FENCE_OPEN = re.compile(r"^[ \t]{0,3}(`{3,}|~{3,})(.*)$")
LIQUID_HIGHLIGHT_OPEN = re.compile(r"^\s*\{%-?\s*highlight\b\s*([\w+-]*)[^%]*-?%\}\s*$")
LIQUID_HIGHLIGHT_CLOSE = re.compile(r"^\s*\{%-?\s*endhighlight\s*-?%\}\s*$")
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
    page: int | None = None  # 1-based page (PDF page, slide) for paged formats


@dataclass
class Chunk:
    text: str
    heading: tuple[str, ...]
    start: int
    end: int
    tokens: int
    position: int = 0
    metadata: dict = field(default_factory=dict)
    page: int | None = None  # the page the chunk is on (paged formats: chunks do not cross pages)

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


# ----------------------------------------------------------------------------------------------------- blocks
# Markdown structure is markdown-it-py's (CommonMark), with mdit-py-plugins for YAML front matter and `$$` math,
# plus one small rule of ours for Jekyll's `{% highlight %}` blocks. Only the block level is parsed (no inline
# pass): every block token carries its line range, which gives the offsets into the original text.

CONTAINERS = {"bullet_list_open", "ordered_list_open", "blockquote_open", "table_open"}
VERBATIM = {"fence", "code_block", "liquid_highlight", "math_block", "math_block_label"}
NEWLINE = re.compile(r"\r\n?|\n")  # markdown-it's own line breaks, so its line numbers are ours


def _liquid_highlight(state, start_line: int, end_line: int, silent: bool) -> bool:
    """`{% highlight lang %}` ... `{% endhighlight %}` (Jekyll) as a code block; it may interrupt a paragraph
    and, unclosed, runs to the end of its container, like a fence."""
    if state.sCount[start_line] - state.blkIndent >= 4:
        return False
    first = state.src[state.bMarks[start_line] + state.tShift[start_line]:state.eMarks[start_line]]
    opening = LIQUID_HIGHLIGHT_OPEN.match(first)
    if not opening:
        return False
    if silent:
        return True
    line = start_line + 1
    while line < end_line and not LIQUID_HIGHLIGHT_CLOSE.match(state.src[state.bMarks[line]:state.eMarks[line]]):
        line += 1
    token = state.push("liquid_highlight", "code", 0)
    token.info = opening.group(1)
    token.content = state.getLines(start_line + 1, line, state.sCount[start_line], True)
    token.map = [start_line, min(line + 1, end_line)]
    token.block = True
    state.line = min(line + 1, end_line)
    return True


def _probe_silently(rule):
    """The plugin's math rule pushes its token even when only asked whether it matches (as a paragraph asks
    before each line): ask it for real, then take the token back."""

    def probe(state, start_line: int, end_line: int, silent: bool) -> bool:
        if not silent:
            return rule(state, start_line, end_line, False)
        n_tokens, line = len(state.tokens), state.line
        matched = rule(state, start_line, end_line, False)
        del state.tokens[n_tokens:]
        state.line = line
        return matched

    return probe


@functools.lru_cache(maxsize=1)
def _markdown_parser():
    from markdown_it import MarkdownIt
    from mdit_py_plugins.dollarmath import dollarmath_plugin
    from mdit_py_plugins.dollarmath.index import math_block_dollar
    from mdit_py_plugins.front_matter import front_matter_plugin

    md = MarkdownIt("commonmark").use(front_matter_plugin).use(dollarmath_plugin, allow_blank_lines=True)
    # Notes write `$$ ... $$` right under a line of prose: let a math block (and a Liquid highlight) end a
    # paragraph, as a fence does.
    interrupts = {"alt": ["paragraph", "reference", "blockquote", "list"]}
    md.block.ruler.at("math_block", _probe_silently(math_block_dollar(True, None, True)), interrupts)
    md.block.ruler.before("fence", "liquid_highlight", _liquid_highlight, interrupts)
    md.disable("inline")  # the block structure is all we need; inline markup is cleaned as text
    return md


class _Lines:
    """Character offsets of the lines of a text, as markdown-it numbers them."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.starts = [0] + [m.end() for m in NEWLINE.finditer(text)]
        self.count = len(self.starts) if self.starts[-1] < len(text) else len(self.starts) - 1

    def start(self, line: int) -> int:
        return self.starts[line]

    def end(self, line: int) -> int:
        """End of `line` without its line break."""
        stop = self.starts[line + 1] if line + 1 < len(self.starts) else len(self.text)
        while stop > self.starts[line] and self.text[stop - 1] in "\r\n":
            stop -= 1
        return stop

    def raw(self, first: int, stop: int) -> str:
        return self.text[self.starts[first]:self.end(stop - 1)]

    def last_filled(self, first: int, stop: int) -> int:
        """The last line of [first, stop) that is not blank (container maps may end on blank lines)."""
        stop = min(stop, self.count)
        while stop - 1 > first and not self.raw(stop - 1, stop).strip():
            stop -= 1
        return stop - 1


def _verbatim_block(token, lines: _Lines, heading: tuple[str, ...]) -> Block:
    first, last = token.map[0], lines.last_filled(*token.map)
    if token.type.startswith("math"):
        text = f"$${token.content}$$" if token.type == "math_block" else lines.raw(first, last + 1).strip()
        return Block("math", lines.start(first), lines.end(last), text, heading)
    # Code is shown as a markdown fence whatever it was written as (indented, Liquid highlight included).
    body = token.content.rstrip("\n")
    return Block("code", lines.start(first), lines.end(last), f"```{token.info.strip()}\n{body}\n```", heading)


def _text_block(lines: _Lines, first: int, stop: int, heading: tuple[str, ...]) -> Block | None:
    last = lines.last_filled(first, stop)
    cleaned = clean_inline(lines.raw(first, last + 1))
    return Block("text", lines.start(first), lines.end(last), cleaned, heading) if cleaned else None


def parse_blocks(text: str, markdown: bool = True) -> list[Block]:
    """Split a document into heading, text, code and math blocks with offsets into `text`.

    Plain text (markdown=False) is only split into paragraphs at blank lines."""
    if not markdown:
        return _plain_blocks(text)
    lines = _Lines(text)
    tokens = _markdown_parser().parse(text.replace("\ufeff", " ", 1) if text.startswith("\ufeff") else text)
    blocks: list[Block] = []
    headings: list[tuple[int, str]] = []  # (level, title) stack

    def path() -> tuple[str, ...]:
        return tuple(t for _, t in headings)

    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if token.level != 0 or token.map is None or token.type == "front_matter":
            continue
        first, stop = token.map
        if token.type == "heading_open":
            level = int(token.tag[1])
            title = clean_inline(HEADING_ATTRS.sub("", tokens[i].content)).replace("\n", " ").strip()
            while headings and headings[-1][0] >= level:
                headings.pop()
            if title:
                headings.append((level, title))
                blocks.append(Block("heading", lines.start(first), lines.end(stop - 1), title, path(), level))
        elif token.type in VERBATIM:
            blocks.append(_verbatim_block(token, lines, path()))
        elif token.type in CONTAINERS:
            # A list or quote is prose, except the code and math inside it, which stay whole blocks.
            depth, j = 1, i
            inner = []
            while j < len(tokens) and depth:
                depth += tokens[j].nesting
                if tokens[j].type in VERBATIM and tokens[j].map:
                    inner.append(tokens[j])
                j += 1
            i = j
            for verbatim in inner:
                if verbatim.map[0] > first:
                    part = _text_block(lines, first, verbatim.map[0], path())
                    blocks.extend([part] if part else [])
                blocks.append(_verbatim_block(verbatim, lines, path()))
                first = verbatim.map[1]
            if first < stop:
                part = _text_block(lines, first, stop, path())
                blocks.extend([part] if part else [])
        elif token.type in ("paragraph_open", "html_block"):
            part = _text_block(lines, first, stop, path())
            blocks.extend([part] if part else [])
    return blocks


def _plain_blocks(text: str) -> list[Block]:
    """Paragraphs of plain text: runs of non-blank lines."""
    blocks: list[Block] = []
    for m in re.finditer(r"[^\r\n]*\S[^\r\n]*(?:\r?\n[^\r\n]*\S[^\r\n]*)*", text):
        cleaned = "\n".join(line.strip() for line in m.group(0).splitlines() if line.strip())
        blocks.append(Block("text", m.start(), m.end(), cleaned))
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
    return Block(kind, span[0], span[1], body, block.heading, block.level, page=block.page)


# ----------------------------------------------------------------------------------------------------- chunks


def chunk_document(
    text: str,
    count: TokenCounter,
    chunk_tokens: int = 200,
    overlap: int = 40,
    markdown: bool = True,
    blocks: list[Block] | None = None,
) -> list[Chunk]:
    """Chunks of one document, in order. `count` maps a list of strings to their token counts (batched, so a
    fast tokenizer does one call per block list). `blocks`, when given, are the document's blocks already (an
    extracted PDF or deck: offsets into `text`, pages set); else `text` is parsed."""
    if chunk_tokens < 8:
        raise ValueError("chunk_tokens must be at least 8")
    overlap = max(0, min(overlap, chunk_tokens // 2))
    blocks = parse_blocks(text, markdown=markdown) if blocks is None else [
        Block(b.kind, b.start, b.end, b.text, b.heading, b.level, page=b.page) for b in blocks]
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
    title followed by a sub-heading) is carried into the next section rather than made a chunk alone.
    In a paged document a new page also starts a section, so that every chunk lies on one page and the page
    it cites is where the whole passage is."""
    section: list[Block] = []
    for u in units:
        text_so_far = [s for s in section if s.kind != "heading"]
        if text_so_far and (u.kind == "heading" or u.page != text_so_far[-1].page):
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
        # Its page is that of its text: a heading at the foot of a page belongs to the text on the next.
        page = next((u.page for u in current if u.kind != "heading"), current[0].page)
        out.append(Chunk(body, heading, current[0].start, current[-1].end, used, page=page))

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
                tail.insert(0, Block("text", start, u.end, body, u.heading, 0, overlap - room, u.page))
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
