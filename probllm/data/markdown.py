"""HTML (Stack Exchange post bodies) to clean markdown, keeping code blocks and LaTeX exactly.

The conversion is `markdownify`'s (a maintained HTML-to-markdown converter on BeautifulSoup); this module only
sets it up for Stack Exchange bodies, where a model must see code and math unchanged:
- `<pre>` blocks become fenced code blocks (language from a `lang-xxx`/`language-xxx` class when present, the
  fence made longer than any backtick run inside); the text inside is not reflowed and HTML entities are decoded
  once (`&lt;` -> `<`). Inline `<code>` becomes `` `code` ``.
- LaTeX: Stack Exchange keeps MathJax source as plain text (`$x^2$`, `$$...$$`, `\\(...\\)`), sometimes inside
  `<span class="math-container">`; older pages use `<script type="math/tex">`. Text is never markdown-escaped,
  so `a_1 * b_2` and backslashes survive; `math/tex` scripts become `$...$` (`$$...$$` for `mode=display`).
It works on one body at a time (a post is a few KB), so converting a 22 GB dataset stays flat in memory.
"""

from __future__ import annotations

import re

from markdownify import ATX, MarkdownConverter

_LANGUAGE = re.compile(r"(?:lang|language)-([\w+#.-]+)")
_BACKTICKS = re.compile(r"`{3,}")


def _code_language(pre) -> str:
    """`<pre class="lang-py">` (Stack Exchange) or `<pre><code class="language-py">` (CommonMark renderers)."""
    classes = " ".join(pre.get("class") or [])
    code = pre.find("code")
    if code is not None:
        classes += " " + " ".join(code.get("class") or [])
    m = _LANGUAGE.search(classes)
    return m.group(1) if m else ""


class _StackExchangeConverter(MarkdownConverter):
    def convert_pre(self, el, text, parent_tags):
        code = text.strip("\n")
        if not code:
            return ""
        # A fence longer than any backtick run in the code, so that code quoting markdown stays one block.
        fence = "`" * max([3] + [len(run) + 1 for run in _BACKTICKS.findall(code)])
        return f"\n\n{fence}{_code_language(el)}\n{code}\n{fence}\n\n"

    def convert_br(self, el, text, parent_tags):
        return "\n"  # a plain line break, as the old converter wrote it (no trailing spaces or backslash)

    def convert_script(self, el, text, parent_tags):
        kind = el.get("type") or ""
        if "math/tex" not in kind:
            return ""  # page scripts carry no content
        body = el.get_text().strip()
        return f"$${body}$$" if "mode=display" in kind else f"${body}$"


_CONVERTER = _StackExchangeConverter(
    heading_style=ATX,
    bullets="-",
    escape_asterisks=False,  # `a_1 * b_2` is LaTeX or code far more often than emphasis
    escape_underscores=False,
    escape_misc=False,
    strip_pre=None,  # convert_pre trims the fence's blank lines itself, keeping indentation
    autolinks=False,  # [url](url) as written: the link text is what the author wrote
)


def html_to_markdown(html: str) -> str:
    """Convert one HTML fragment to markdown (code and LaTeX kept verbatim)."""
    if "<" not in html and "&" not in html:
        return html.strip()
    return _CONVERTER.convert(html).strip()
