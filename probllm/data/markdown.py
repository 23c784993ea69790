"""HTML (Stack Exchange post bodies) to clean markdown, keeping code blocks and LaTeX exactly.

Built on the standard library's `html.parser`. It works on one body at a time (a post is a few KB), so converting
a 22 GB dataset stays flat in memory. Not a library, although issue 13 asked for one (numbers in docs/data.md):
`markdownify` keeps these rules but made `pair-stackexchange` 4.4x slower (BeautifulSoup builds a tree of every
body), and `html-to-markdown` 3.19 writes `\\\\(x\\\\)` for the text `\\(x\\)`, `\\\\,` for `\\,` (it always escapes
a backslash before punctuation, which corrupts LaTeX) and drops `<script type="math/tex">`, with no option for
either. tests/test_data_stackexchange.py pins the behaviours below.

What is kept verbatim, because a model must see it unchanged:
- `<pre>` blocks become fenced code blocks (language from a `lang-xxx`/`language-xxx` class on the `<pre>`, as
  Stack Exchange writes it, or on its `<code>`, as CommonMark renderers do);
  the text inside is not reflowed and HTML entities are decoded once (`&lt;` -> `<`).
- inline `<code>` becomes `` `code` `` (with a longer fence when the code holds backticks).
- LaTeX: Stack Exchange keeps MathJax source as plain text (`$x^2$`, `$$...$$`, `\\(...\\)`), sometimes inside
  `<span class="math-container">`; older pages use `<script type="math/tex">`. Text is never markdown-escaped,
  so `a_1 * b_2` and backslashes survive; `math/tex` scripts become `$...$` (`$$...$$` for `mode=display`).
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

_BLOCK = {"p", "div", "section", "article", "table", "tr", "dl", "dt", "dd", "figure", "details", "summary"}
_HEADINGS = {"h1": 1, "h2": 2, "h3": 3, "h4": 4, "h5": 5, "h6": 6}
_SPACE = re.compile(r"[ \t\r\n\f]+")
_ITEM = "\x00"  # marks a block made of list items, removed in the result
_LANGUAGE = re.compile(r"(?:lang|language)-([\w+#.-]+)")


def _language(attrs: dict[str, str | None]) -> str:
    m = _LANGUAGE.search(attrs.get("class") or "")
    return m.group(1) if m else ""


def _fence(code: str, fence: str) -> str:
    """A code fence longer than any backtick run inside `code`, so code quoting markdown stays one block."""
    while fence in code:
        fence += "`"
    return fence


class _Converter(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[str] = []  # finished paragraphs
        self.line: list[str] = []  # inline pieces of the paragraph being built
        self.lists: list[list] = []  # stack of [kind, counter]
        self.quote = 0
        self.pre: list[str] | None = None  # text of the <pre> being read
        self.pre_lang = ""
        self.code_inline: list[str] | None = None
        self.link_href: list[str | None] = []
        self.math: list[str] | None = None
        self.math_display = False
        self.skip = 0  # inside <style> or a non-math <script>

    # --------------------------------------------------------------------------------------------- helpers
    def _flush(self) -> None:
        text = "".join(self.line).strip()
        self.line = []
        if not text:
            return
        text = re.sub(r" *\n *", "\n", text)
        if self.quote:
            text = "\n".join("> " * self.quote + ln for ln in text.split("\n"))
        if self.lists and self.blocks and self.blocks[-1].startswith(_ITEM):
            # items of one list stay on consecutive lines (a tight list)
            self.blocks[-1] += "\n" + text
        else:
            self.blocks.append(_ITEM + text if self.lists else text)

    def _emit(self, text: str) -> None:
        if self.skip:
            return
        if self.math is not None:
            self.math.append(text)
        elif self.pre is not None:
            self.pre.append(text)
        elif self.code_inline is not None:
            self.code_inline.append(text)
        else:
            text = _SPACE.sub(" ", text)
            if text.startswith(" ") and (not self.line or self.line[-1].endswith((" ", "\n"))):
                text = text[1:]  # HTML collapses runs of whitespace across tags
            self.line.append(text)

    def _list_prefix(self) -> str:
        kind = self.lists[-1]
        indent = "   " * (len(self.lists) - 1)
        if kind[0] == "ol":
            kind[1] += 1
            return f"{indent}{kind[1]}. "
        return f"{indent}- "

    # -------------------------------------------------------------------------------------------- handlers
    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag in ("style",) or (tag == "script" and "math/tex" not in (a.get("type") or "")):
            self.skip += 1
            return
        if tag == "script":  # MathJax source of older pages
            self.math = []
            self.math_display = "mode=display" in (a.get("type") or "")
            return
        if self.pre is not None:
            # tags inside <pre> add no markup; a CommonMark renderer's <code class="language-py"> names the language
            if tag == "code" and not self.pre_lang:
                self.pre_lang = _language(a)
            return
        if tag == "pre":
            self._flush()
            self.pre = []
            self.pre_lang = _language(a)
        elif tag == "code":
            self.code_inline = []
        elif tag in _HEADINGS:
            self._flush()
            self.line.append("#" * _HEADINGS[tag] + " ")
        elif tag in _BLOCK:
            self._flush()
        elif tag == "br":
            self.line.append("\n")
        elif tag == "hr":
            self._flush()
            self.blocks.append("---")
        elif tag in ("ul", "ol"):
            self._flush()
            self.lists.append([tag, 0])
        elif tag == "li":
            self._flush()
            self.line.append(self._list_prefix() if self.lists else "- ")
        elif tag == "blockquote":
            self._flush()
            self.quote += 1
        elif tag in ("strong", "b"):
            self.line.append("**")
        elif tag in ("em", "i"):
            self.line.append("*")
        elif tag == "a":
            self.link_href.append(a.get("href"))
            self.line.append("[")
        elif tag == "img":
            self.line.append(f"![{a.get('alt') or ''}]({a.get('src') or ''})")
        elif tag in ("td", "th"):
            self.line.append(" | ")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in ("br", "hr", "img"):
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if self.skip:
            if tag in ("style", "script"):
                self.skip -= 1
            return
        if tag == "script" and self.math is not None:
            body = "".join(self.math).strip()
            self.line.append(f"$${body}$$" if self.math_display else f"${body}$")
            self.math = None
            return
        if self.pre is not None:
            if tag != "pre":
                return
            code = "".join(self.pre).strip("\n")
            self.pre = None
            if not code:
                return  # an empty <pre> would only add an empty fenced block
            fence = _fence(code, "```")
            self.blocks.append(f"{fence}{self.pre_lang}\n{code}\n{fence}")
            return
        if tag == "code" and self.code_inline is not None:
            code = "".join(self.code_inline)
            fence = _fence(code, "`")
            pad = " " if code.startswith("`") or code.endswith("`") else ""
            self.line.append(f"{fence}{pad}{code}{pad}{fence}")
            self.code_inline = None
        elif tag in _HEADINGS or tag in _BLOCK or tag == "li":
            self._flush()
        elif tag in ("ul", "ol"):
            self._flush()
            if self.lists:
                self.lists.pop()
        elif tag == "blockquote":
            self._flush()
            self.quote = max(0, self.quote - 1)
        elif tag in ("strong", "b"):
            self.line.append("**")
        elif tag in ("em", "i"):
            self.line.append("*")
        elif tag == "a":
            href = self.link_href.pop() if self.link_href else None
            self.line.append(f"]({href})" if href else "]")

    def handle_data(self, data: str) -> None:
        self._emit(data)

    def result(self) -> str:
        if self.pre is not None:  # unclosed <pre>: keep what was read
            code = "".join(self.pre).strip("\n")
            fence = _fence(code, "```")
            self.blocks.append(f"{fence}\n{code}\n{fence}")
            self.pre = None
        if self.code_inline is not None:
            self.line.append("`" + "".join(self.code_inline) + "`")
            self.code_inline = None
        self._flush()
        return "\n\n".join(b.removeprefix(_ITEM) for b in self.blocks)


def html_to_markdown(html: str) -> str:
    """Convert one HTML fragment to markdown (code and LaTeX kept verbatim)."""
    if "<" not in html and "&" not in html:
        return html.strip()
    conv = _Converter()
    conv.feed(html)
    conv.close()
    return conv.result()
