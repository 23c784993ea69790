"""Course material that is not markdown, turned into what the chunker reads: PDF, PowerPoint, notebooks, LaTeX, HTML,
OpenStax CNXML.

One registry, `EXTRACTORS` (file suffix -> extractor), is the list of formats `probllm index` reads besides
markdown, text and JSONL. Each extractor gives an `Extracted`: either markdown text (notebooks, LaTeX, HTML, CNXML become
markdown and then follow exactly the markdown path: same block parser, heading paths, chunker) or, for a paged
format (PDF, slides), the blocks themselves, each with the 1-based page it is on, laid out one after another in
`text` (the chunks' offsets point into that text). Either way the same chunker packs them, so chunks never cross a
heading or a page, and every chunk of a paged format carries its page.

PDF is read with pypdfium2 (PDFium, BSD/Apache; not PyMuPDF, which is AGPL). On the course PDFs of the bench it
extracted 13x faster than pypdf with the same text, and it marks the hyphens that the typesetter added at line
ends (U+FFFE), so they are dropped without guessing (docs/rag.md has the comparison). Headings are recognised by
font size (a line clearly larger than the body text, level by size), which works for LaTeX notes and for slides
exported to PDF alike; running headers and footers (a line that comes back at the top or bottom of most pages,
digits aside) and page numbers are dropped; ligatures are normalised (NFKC of the ligature code points only, so
math symbols such as superscripts stay as they are); letter-spaced headings (`A DVA N C E D`) are joined.
A page without any text is not silently lost: pages that hold images but no text are listed as scans.
"""

from __future__ import annotations

import json
import re
import statistics
import unicodedata
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from probllm.rag.chunk import Block

# Bumped when an extractor's output changes, so that `index` re-extracts documents it would otherwise keep.
EXTRACTION_VERSION = "1"


class ExtractError(Exception):
    """A file of a supported type that cannot be read (corrupt, encrypted): the reason, without the path."""


@dataclass
class Extracted:
    text: str  # what is indexed; for `blocks`, their texts laid out one after another
    markdown: bool = True  # parse `text` as markdown (when there are no blocks)
    blocks: list[Block] | None = None  # a paged format's blocks, offsets into `text`, each with its page
    pages: int = 0
    scanned: list[int] = field(default_factory=list)  # pages with images but no text (scans)
    blank: list[int] = field(default_factory=list)  # pages with nothing on them


@dataclass(frozen=True)
class Extractor:
    label: str  # what a user calls the format, in messages
    read: Callable[[str], Extracted]
    paged: bool = False  # chunks carry a page


def _layout(blocks: list[Block]) -> Extracted:
    """Lay blocks out as one text (blank lines between them) and point their offsets into it."""
    parts, pos = [], 0
    for b in blocks:
        b.start, b.end = pos, pos + len(b.text)
        parts.append(b.text)
        pos = b.end + 2
    return Extracted("\n\n".join(parts), markdown=False, blocks=blocks)


# -------------------------------------------------------------------------------------------------------- PDF

LIGATURES = {chr(c): unicodedata.normalize("NFKC", chr(c)) for c in range(0xFB00, 0xFB07)}
LIGATURE_TABLE = str.maketrans(LIGATURES)
# PDFium writes U+FFFE for a hyphen the typesetter added at a line break (and joins the word); U+00AD is the
# soft hyphen; U+0002 is what some producers leave for the same.
HYPHEN_MARKS = str.maketrans({"\ufffe": None, "\u00ad": None, "\x02": None})
PAGE_NUMBER = re.compile(r"^\W*(?:page|p\.|seite|slide)?\s*\d{1,4}(?:\s*(?:/|of|von)\s*\d{1,4})?\W*$", re.I)
BULLET = re.compile(r"^\s*(?:[•●○◦▪▫■□►▸‣⁃∗*–—-]|\(?\d{1,2}[.)]|\(?[a-z][.)])\s")
HEADING_RATIO = 1.15  # a heading's font is at least this much larger than the body's
MAX_HEADING_CHARS = 120
MAX_HEADING_LEVELS = 4


@dataclass
class _Line:
    text: str
    size: float  # font size (median of its letters)
    page: int
    hyphen_mark: bool = False  # ended with a typesetter's hyphen
    letter_spaced: bool = False  # a letter-spaced heading, its words joined in `text`


def _is_letter_spaced(text: str) -> bool:
    """`A DVA N C E D  TO P I C S`: a line of capitals cut into pieces of one or two letters by spaces (what a
    letter-spaced heading becomes when the extractor sees the wide gaps between its letters as spaces)."""
    tokens = text.split()
    return (len(tokens) >= 4 and all(t.isalpha() and t.isupper() for t in tokens)
            and sum(len(t) <= 2 for t in tokens) >= 0.7 * len(tokens))


def _join_letter_spaced(textpage, text: str, start: int) -> str:
    """The words of a letter-spaced line: where the gap between two letters is clearly wider than the line's
    usual gap (measured on the page, since the extracted text has one space for either)."""
    import pypdfium2.raw as raw

    letters = [(i, ch) for i, ch in enumerate(text) if not ch.isspace()]
    boxes = []
    for i, _ in letters:
        box = raw.FS_RECTF()
        raw.FPDFText_GetLooseCharBox(textpage.raw, start + i, box)
        boxes.append((box.left, box.right))
    gaps = [b[0] - a[1] for a, b in zip(boxes, boxes[1:])]
    usual = statistics.median(gaps) if gaps else 0
    words, word = [], letters[0][1] if letters else ""
    for (_, ch), gap in zip(letters[1:], gaps):
        if gap > usual + 0.25 * (boxes[0][1] - boxes[0][0]) + 0.5:
            words.append(word)
            word = ""
        word += ch
    words.append(word)
    return " ".join(w for w in words if w)


def _page_lines(textpage, page_no: int) -> list[_Line]:
    import pypdfium2.raw as raw

    text = textpage.get_text_range()
    lines: list[_Line] = []
    pos = 0
    for raw_line in re.split(r"\r\n|\r|\n", text):
        start, pos = pos, pos + len(raw_line)
        pos += 2 if text.startswith("\r\n", pos) else 1
        # A sample of its letters is enough for a line's font size (one C call per letter would be most of the
        # extraction time).
        step = max(1, len(raw_line) // 9)
        letters = [start + i for i in range(0, len(raw_line), step) if raw_line[i].isalnum()]
        if not letters:
            letters = [start + i for i, ch in enumerate(raw_line) if ch.isalnum()][:3]
        size = statistics.median([raw.FPDFText_GetFontSize(textpage.raw, i) for i in letters]) if letters else 0.0
        mark = raw_line.rstrip().endswith(("\ufffe", "\u00ad", "\x02"))
        clean = raw_line.translate(HYPHEN_MARKS).translate(LIGATURE_TABLE)
        clean = re.sub(r"[ \t\u00a0]+$", "", clean)
        if clean.strip():
            spaced = _is_letter_spaced(clean)
            if spaced:
                clean = _join_letter_spaced(textpage, raw_line, start)
            lines.append(_Line(clean, round(size * 2) / 2, page_no, mark, spaced))
    return lines


def _has_images(page) -> bool:
    import pypdfium2.raw as raw

    return any(obj.type == raw.FPDF_PAGEOBJ_IMAGE for obj in page.get_objects(max_depth=3))


def _running_lines(pages: list[list[_Line]]) -> set[str]:
    """Lines that come back at the top or bottom (two lines each) of most pages, digits aside: running headers
    and footers ("Lecture 3 - Modules", "J. Doe, 2018, p. 4")."""
    n = sum(1 for p in pages if p)
    if n < 3:
        return set()
    seen: Counter = Counter()
    for lines in pages:
        edge = {_edge_key(l.text) for l in lines[:2] + lines[-2:]}
        seen.update(edge)
    return {k for k, c in seen.items() if c >= max(3, 0.6 * n)}


def _edge_key(text: str) -> str:
    return re.sub(r"\d+", "#", " ".join(text.lower().split()))


def read_pdf(path: str) -> Extracted:
    import pypdfium2 as pdfium

    try:
        doc = pdfium.PdfDocument(path)
    except pdfium.PdfiumError as e:
        if "password" in str(e).lower():
            raise ExtractError("encrypted PDF (it needs a password; save an unencrypted copy)") from None
        raise ExtractError(f"not a readable PDF ({str(e).rstrip('.')})") from None
    pages: list[list[_Line]] = []
    images: set[int] = set()  # pages with images among those with little text (scan candidates)
    try:
        for i in range(len(doc)):
            page = doc[i]
            textpage = page.get_textpage()
            lines = _page_lines(textpage, i + 1)
            if len(lines) <= 4 and _has_images(page):
                images.add(i + 1)
            textpage.close()
            page.close()
            pages.append(lines)
    except pdfium.PdfiumError as e:
        raise ExtractError(f"not a readable PDF (page {len(pages) + 1}: {str(e).rstrip('.')})") from None
    finally:
        doc.close()
    blocks = _pdf_blocks(pages)
    out = _layout(blocks)
    # A scan may still carry a running header or a page number added later: what counts is what is left.
    with_text = {b.page for b in blocks}
    out.pages = len(pages)
    out.scanned = [n for n in range(1, len(pages) + 1) if n not in with_text and n in images]
    out.blank = [n for n in range(1, len(pages) + 1) if n not in with_text and n not in images]
    return out


def _pdf_blocks(pages: list[list[_Line]]) -> list[Block]:
    running = _running_lines(pages)
    kept: list[list[_Line]] = []
    for lines in pages:
        lines = [l for l in lines if _edge_key(l.text) not in running]
        # A page number stands alone on the first or last line.
        while lines and PAGE_NUMBER.match(lines[-1].text):
            lines.pop()
        while lines and PAGE_NUMBER.match(lines[0].text):
            lines.pop(0)
        kept.append(lines)

    # The body size is the most used one, on the page (slides shrink their text to fit, page by page) and in the
    # document (a page that is mostly one big title has no body of its own).
    doc_sizes: Counter = Counter()
    page_body: list[float] = []
    for lines in kept:
        sizes: Counter = Counter()
        for l in lines:
            sizes[l.size] += len(l.text)
        doc_sizes.update(sizes)
        page_body.append(sizes.most_common(1)[0][0] if sizes else 0.0)
    if not doc_sizes:
        return []
    doc_body = doc_sizes.most_common(1)[0][0]
    body_of = [max(b, doc_body) for b in page_body]
    pages_of: dict[float, set[int]] = {}
    for lines, body in zip(kept, body_of):
        for l in lines:
            if _is_heading(l, body):
                pages_of.setdefault(l.size, set()).add(l.page)
    # Sizes used on the first page only, larger than any heading after it, are the document's title (and
    # subtitle): text, not the root of every heading path in the document.
    later = [s for s, p in pages_of.items() if p != {1}]
    if len(kept) > 1 and later:
        pages_of = {s: p for s, p in pages_of.items() if p != {1} or s < max(later)}
    heading_sizes = sorted(pages_of, reverse=True)
    level_of = {s: min(i + 1, MAX_HEADING_LEVELS) for i, s in enumerate(heading_sizes)}

    blocks: list[Block] = []
    stack: list[tuple[int, str]] = []
    for lines, body in zip(kept, body_of):
        para: list[_Line] = []

        def flush() -> None:
            if para:
                blocks.append(Block("text", 0, 0, _join(para), tuple(t for _, t in stack), page=para[0].page))
                para.clear()

        i = 0
        while i < len(lines):
            line = lines[i]
            spaced = line.letter_spaced
            if (_is_heading(line, body) and line.size in pages_of) or spaced:
                flush()
                title_lines = [line.text.strip()]
                # A title wrapped onto the next line(s) in the same font is one heading.
                while (i + 1 < len(lines) and lines[i + 1].size == line.size and not spaced
                       and _is_heading(lines[i + 1], body) and len(title_lines) < 2):
                    i += 1
                    title_lines.append(lines[i].text.strip())
                title = " ".join(title_lines)
                level = level_of.get(line.size, len(heading_sizes) + 1 if spaced else MAX_HEADING_LEVELS)
                while stack and stack[-1][0] >= level:
                    stack.pop()
                stack.append((level, title))
                blocks.append(Block("heading", 0, 0, title, tuple(t for _, t in stack), level, page=line.page))
            else:
                if para and _starts_paragraph(line, para[-1]):
                    flush()
                para.append(line)
            i += 1
        flush()
    return blocks


def _is_heading(line: _Line, body: float) -> bool:
    text = line.text.strip()
    return (line.size >= body * HEADING_RATIO and len(text) <= MAX_HEADING_CHARS
            and sum(ch.isalpha() for ch in text) >= 2 and not BULLET.match(text))


def _starts_paragraph(line: _Line, previous: _Line) -> bool:
    """A bullet starts a block of its own; so does a line after one that ended a sentence short of the margin."""
    if BULLET.match(line.text):
        return True
    return previous.text.rstrip().endswith((".", "!", "?", ":")) and len(previous.text) < 60


def _join(lines: list[_Line]) -> str:
    """Lines of one paragraph: a word hyphenated at a line break is joined; other line breaks stay."""
    out = lines[0].text.strip()
    for prev, line in zip(lines, lines[1:]):
        nxt = line.text.strip()
        if prev.hyphen_mark:
            out += nxt
        elif out.endswith("-") and out[-2:-1].islower() and nxt[:1].islower():
            out = out[:-1] + nxt
        else:
            out += "\n" + nxt
    return out


# ----------------------------------------------------------------------------------------------- PowerPoint


def read_pptx(path: str) -> Extracted:
    """Slides: the title is the heading (`Slide N` for an untitled slide, so that each slide is a section of its
    own), then the text of its shapes top to bottom (tables row by row, groups opened), then the speaker notes.
    The page is the slide number."""
    from pptx import Presentation
    from pptx.exc import PackageNotFoundError

    try:
        deck = Presentation(path)
    except (PackageNotFoundError, zipfile.BadZipFile, KeyError, ValueError) as e:
        raise ExtractError(f"not a readable .pptx ({e})") from None
    from pptx.enum.shapes import MSO_SHAPE_TYPE

    blocks: list[Block] = []
    scanned, blank = [], []
    for n, slide in enumerate(deck.slides, 1):
        title_shape = slide.shapes.title
        title = " ".join(title_shape.text_frame.text.split()) if title_shape is not None else ""
        heading = (title or f"Slide {n}",)
        texts = []
        for shape in _shapes_in_reading_order(slide.shapes):
            if title_shape is not None and shape.shape_id == title_shape.shape_id:
                continue
            texts.extend(_shape_texts(shape))
        if slide.has_notes_slide:
            notes = slide.notes_slide.notes_text_frame.text.strip() if slide.notes_slide.notes_text_frame else ""
            if notes:
                texts.append(f"Notes: {notes}")
        if title or texts:
            blocks.append(Block("heading", 0, 0, heading[0], heading, 1, page=n))
        for t in texts:
            blocks.append(Block("text", 0, 0, t, heading, page=n))
        if not title and not texts:
            pictures = any(s.shape_type == MSO_SHAPE_TYPE.PICTURE for s in slide.shapes)
            (scanned if pictures else blank).append(n)
    out = _layout(blocks)
    out.pages, out.scanned, out.blank = len(deck.slides), scanned, blank
    return out


def _shapes_in_reading_order(shapes) -> list:
    return sorted(shapes, key=lambda s: ((s.top or 0), (s.left or 0)))


def _shape_texts(shape) -> list[str]:
    from pptx.enum.shapes import MSO_SHAPE_TYPE

    if shape.shape_type == MSO_SHAPE_TYPE.GROUP:
        return [t for s in _shapes_in_reading_order(shape.shapes) for t in _shape_texts(s)]
    if getattr(shape, "has_table", False) and shape.has_table:
        rows = [" | ".join(" ".join(c.text.split()) for c in row.cells) for row in shape.table.rows]
        return ["\n".join(r for r in rows if r.strip(" |"))]
    if not shape.has_text_frame:
        return []
    lines = []
    for p in shape.text_frame.paragraphs:
        text = " ".join(p.text.replace("\v", " ").split())
        if text:
            lines.append("  " * p.level + text)
    return ["\n".join(lines)] if lines else []


# ------------------------------------------------------------------------------------------------- notebooks


def read_ipynb(path: str) -> Extracted:
    """Markdown cells as they are and code cells as fenced code, in order; outputs are left out (they are results
    of one run, often long, and rarely what a student asks about)."""
    import nbformat

    try:
        nb = nbformat.read(path, as_version=4)
    except (nbformat.reader.NotJSONError, json.JSONDecodeError, UnicodeDecodeError, KeyError, AttributeError,
            ValueError) as e:
        raise ExtractError(f"not a readable notebook ({str(e).splitlines()[0][:120]})") from None
    language = (nb.metadata.get("kernelspec", {}).get("language")
                or nb.metadata.get("language_info", {}).get("name") or "")
    parts = []
    for cell in nb.cells:
        source = cell.get("source", "")
        if not source.strip():
            continue
        if cell.cell_type == "markdown":
            parts.append(source.strip("\n"))
        elif cell.cell_type == "code":
            longest = max((len(m) for m in re.findall(r"`+", source)), default=0)
            fence = "`" * max(3, longest + 1)
            parts.append(f"{fence}{language}\n{source.rstrip()}\n{fence}")
    return Extracted("\n\n".join(parts) + "\n", markdown=True)


# ----------------------------------------------------------------------------------------------------- LaTeX

SECTIONING = ("part", "chapter", "section", "subsection", "subsubsection", "paragraph")
MATH_ENVS = ("equation", "align", "gather", "multline", "eqnarray", "displaymath", "math", "flalign", "alignat")
CODE_ENVS = ("verbatim", "lstlisting", "minted", "Verbatim")
DROP_ENVS = ("figure", "tikzpicture", "thebibliography")  # their captions are kept, the drawing is not
INLINE_DROP = re.compile(r"\\(?:label|index|vspace|hspace|includegraphics|bibliographystyle|bibliography|"
                         r"usepackage|documentclass|newpage|clearpage|maketitle|tableofcontents|centering|"
                         r"noindent|medskip|bigskip|smallskip)\*?(?:\[[^\]]*\])?(?:\{[^{}]*\})?")
INLINE_UNWRAP = re.compile(r"\\(?:textbf|textit|emph|texttt|underline|textsc|textrm|textsf|mbox|text)\{([^{}]*)\}")


def _braced(text: str, pos: int) -> tuple[str, int]:
    """The argument in braces starting at text[pos] == "{" (nested braces kept), and the position after it."""
    depth, i = 0, pos
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[pos + 1:i], i + 1
        i += 1
    return text[pos + 1:], len(text)


def _strip_comments(tex: str) -> str:
    return "\n".join(re.sub(r"(?<!\\)%.*$", "", line) for line in tex.splitlines())


def read_tex(path: str) -> Extracted:
    with open(path, encoding="utf-8", errors="strict") as fh:
        tex = fh.read()
    return Extracted(tex_to_markdown(tex), markdown=True)


def tex_to_markdown(tex: str) -> str:
    """LaTeX source as markdown: sectioning commands become headings (the highest level used is `#`), display
    math stays LaTeX inside `$$` blocks (never split by the chunker), inline math stays as written, lists become
    markdown lists, verbatim becomes code; formatting commands keep their text, and layout commands go."""
    tex = _strip_comments(tex)
    body = re.search(r"\\begin\{document\}(.*?)(?:\\end\{document\}|$)", tex, re.S)
    tex = body.group(1) if body else tex
    used = [name for name in SECTIONING if re.search(rf"\\{name}\*?\s*[\[{{]", tex)]
    depth = {name: i + 1 for i, name in enumerate(used)}
    out: list[str] = []
    pos = 0
    pattern = re.compile(r"\\(" + "|".join(SECTIONING) + r")\*?\s*(?:\[[^\]]*\])?\s*(?=\{)"
                         r"|\\begin\{(\w+\*?)\}(?:\[([^\]]*)\])?|\\\[|\$\$|\\item\b(?:\[([^\]]*)\])?")
    while True:
        m = pattern.search(tex, pos)
        if not m:
            out.append(_inline(tex[pos:]))
            break
        out.append(_inline(tex[pos:m.start()]))
        if m.group(1):
            title, pos = _braced(tex, m.end())
            out.append(f"\n\n{'#' * min(depth[m.group(1)], 6)} {_inline(title).strip()}\n\n")
        elif m.group(2):
            env = m.group(2)
            base = env.rstrip("*")
            end = tex.find(f"\\end{{{env}}}", m.end())
            end = len(tex) if end < 0 else end
            inner, pos = tex[m.end():end], min(len(tex), end + len(f"\\end{{{env}}}"))
            if base in MATH_ENVS:
                inner = re.sub(r"\s*\\label\{[^{}]*\}", "", inner)  # a cross-reference target, not math
                out.append(f"\n\n$$\n\\begin{{{env}}}{inner}\\end{{{env}}}\n$$\n\n")
            elif base in CODE_ENVS:
                code = re.sub(r"^\{[^}]*\}", "", inner) if base == "minted" else inner
                out.append(f"\n\n```\n{code.strip(chr(10))}\n```\n\n")
            elif base in DROP_ENVS:
                captions = [_braced(inner, c.end() - 1)[0] for c in re.finditer(r"\\caption\{", inner)]
                out.extend(f"\n\n{_inline(c).strip()}\n\n" for c in captions)
            elif base in ("itemize", "enumerate", "description"):
                out.append("\n\n" + tex_to_markdown(inner).strip("\n") + "\n\n")
            else:  # theorem, definition, proof, example, center...: the text, named when it is a statement
                name = "" if base in ("center", "document", "abstract", "quote", "minipage", "tabular") \
                    else base.capitalize() + (f" ({m.group(3)})" if m.group(3) else "") + ". "
                inner_md = tex_to_markdown(inner).strip("\n")
                out.append(f"\n\n{name}{inner_md}\n\n")
        elif m.group(0) in ("\\[", "$$"):
            close = "\\]" if m.group(0) == "\\[" else "$$"
            end = tex.find(close, m.end())
            end = len(tex) if end < 0 else end
            out.append(f"\n\n$$\n{tex[m.end():end].strip()}\n$$\n\n")
            pos = end + len(close)
        else:  # \item
            label = f"{m.group(4)}: " if m.group(4) else ""
            out.append(f"\n- {label}")
            pos = m.end()
    text = "".join(out)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n"


def _inline(text: str) -> str:
    text = INLINE_DROP.sub("", text)
    for _ in range(3):  # nested \textbf{\emph{x}}
        text = INLINE_UNWRAP.sub(r"\1", text)
    text = re.sub(r"\\\\(?:\[[^\]]*\])?", "\n", text)
    text = re.sub(r"(?<!\\)~", " ", text)
    text = re.sub(r"\\(?:begin|end)\{\w+\*?\}", "", text)
    # A line indented by four spaces would be a markdown code block: LaTeX indentation means nothing.
    return "\n".join(line.strip() for line in text.split("\n"))


# ------------------------------------------------------------------------------------------------------ HTML

HTML_NOISE = re.compile(r"<(head|nav|footer|script|style|noscript)\b.*?</\1\s*>", re.S | re.I)


def read_html(path: str) -> Extracted:
    """A web page through the project's HTML-to-markdown converter (headings, lists, code and LaTeX kept);
    the page's head, navigation and footer are not course text."""
    from probllm.data.markdown import html_to_markdown

    with open(path, encoding="utf-8-sig", errors="replace") as fh:
        html = fh.read()
    return Extracted(html_to_markdown(HTML_NOISE.sub(" ", html)) + "\n", markdown=True)


# OpenStax CNXML (the source of every OpenStax textbook: <document><title>, <content>, nested <section>s of
# <para>, <list>, <table>, <definition>, <note>, <figure>, <exercise>; equations in MathML). Containers recurse;
# these become blocks of their own; anything else with text becomes a paragraph.
CNXML_SKIPPED = {"metadata", "media", "image", "label", "colspec", "newline", "space"}
CNXML_SPACED = {"footnote", "para", "item", "list", "note", "caption", "term", "meaning", "entry", "equation", "title"}
CNXML_HEADED = {"document": 1, "section": 2}  # heading level of a container's <title> (sections nest deeper)


def _local(tag: object) -> str:
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def _flat(el) -> str:
    """An element's words on one line; <sup>/<sub> marked the way plain text writes them (10^19, H_2O)."""
    parts = []

    def walk(e) -> None:
        name = _local(e.tag)
        if name in CNXML_SKIPPED:
            parts.append(e.tail or "")
            return
        mark = {"sup": "^", "sub": "_"}.get(name, " " if name in CNXML_SPACED else "")
        parts.append(mark + (e.text or ""))
        for child in e:
            walk(child)
        parts.append(e.tail or "")

    parts.append(el.text or "")
    for child in el:
        walk(child)
    return " ".join("".join(parts).split())


def cnxml_to_markdown(root) -> str:
    out: list[str] = []

    def walk(el, depth: int) -> None:
        name = _local(el.tag)
        if name in CNXML_SKIPPED or name == "title":
            return
        if name in ("document", "section"):
            title = next((c for c in el if _local(c.tag) == "title"), None)
            level = CNXML_HEADED["document"] if name == "document" else min(6, depth + 1)
            if title is not None and _flat(title):
                out.append("#" * level + " " + _flat(title))
            for child in el:
                walk(child, level if name == "section" else 1)
        elif name == "list":
            items = [_flat(c) for c in el if _local(c.tag) == "item"]
            out.append("\n".join(f"- {t}" for t in items if t))
        elif name == "table":
            rows = [[_flat(e) for e in r if _local(e.tag) == "entry"] for r in el.iter() if _local(r.tag) == "row"]
            rows = [r for r in rows if any(r)]
            if rows:
                width = max(len(r) for r in rows)
                lines = ["| " + " | ".join(r + [""] * (width - len(r))) + " |" for r in rows]
                lines.insert(1, "|" + " --- |" * width)
                out.append("\n".join(lines))
        elif name == "definition":
            term = " ".join(_flat(c) for c in el if _local(c.tag) == "term")
            meaning = " ".join(_flat(c) for c in el if _local(c.tag) == "meaning")
            out.append(f"**{term}**: {meaning}" if term else meaning)
        elif name in ("content", "note", "figure", "exercise", "problem", "solution", "example", "glossary",
                      "div") or any(_local(c.tag) in ("para", "list", "table", "section") for c in el):
            for child in el:
                walk(child, depth)
        else:
            text = _flat(el)
            if text:
                out.append(text)

    walk(root, 0)
    return "\n\n".join(b for b in out if b) + "\n"


def read_cnxml(path: str) -> Extracted:
    """An OpenStax CNXML module as markdown: its title and sections become headings (what a citation names), its
    paragraphs, lists, tables and glossary become blocks. Parsed with defusedxml: a course file is not trusted."""
    from xml.etree.ElementTree import ParseError

    from defusedxml import DefusedXmlException
    from defusedxml.ElementTree import parse

    try:
        root = parse(path).getroot()
    except (ParseError, DefusedXmlException) as e:
        raise ExtractError(f"not well-formed CNXML: {e}") from None
    return Extracted(cnxml_to_markdown(root), markdown=True)


EXTRACTORS: dict[str, Extractor] = {
    ".pdf": Extractor("PDF", read_pdf, paged=True),
    ".pptx": Extractor("PowerPoint", read_pptx, paged=True),
    ".ipynb": Extractor("Jupyter notebook", read_ipynb),
    ".tex": Extractor("LaTeX", read_tex),
    ".html": Extractor("HTML", read_html),
    ".htm": Extractor("HTML", read_html),
    ".cnxml": Extractor("OpenStax CNXML", read_cnxml),
}


def extractor_for(path: str) -> Extractor | None:
    low = path.lower()
    return next((e for suffix, e in EXTRACTORS.items() if low.endswith(suffix)), None)


def main(argv: list[str] | None = None) -> None:
    """`python -m probllm.rag.extract FILE...`: the blocks a file becomes, one JSON line each (for checking what
    the index will see of a document)."""
    import sys

    for path in argv if argv is not None else sys.argv[1:]:
        ext = extractor_for(path)
        if ext is None:
            raise SystemExit(f"{path}: not one of {', '.join(EXTRACTORS)}")
        got = ext.read(path)
        if got.blocks is None:
            from probllm.rag.chunk import parse_blocks

            blocks = parse_blocks(got.text, markdown=got.markdown)
        else:
            blocks = got.blocks
        for b in blocks:
            print(json.dumps({"source": path, "page": b.page, "kind": b.kind, "heading": " > ".join(b.heading),
                              "text": b.text}, ensure_ascii=False))
        if got.scanned:
            print(f"{path}: scanned or image-only: p. {', '.join(map(str, got.scanned))}", file=sys.stderr)


if __name__ == "__main__":
    main()
