"""Chunking of tricky markdown: front matter, Liquid, HTML, fenced code, $$ math $$, budgets and offsets."""

from __future__ import annotations

import pytest

from probllm.rag.chunk import chunk_document, clean_inline, parse_blocks, word_counter

TRICKY = """---
layout: page
title: Tricky
permalink: /tricky/
---

<a name='top'></a>

# Sorting {#sorting}

Intro paragraph with a [link]({{ site.baseurl }}/x/) and <b>bold</b> HTML.
{% include toc.html %}

## Code

```python
def f(x):

    # a blank line inside the fence must not end the block
    return x * 2
```

{% highlight python %}
print("liquid highlight block")

print("still code")
{% endhighlight %}

## Math

$$
a^2 + b^2

= c^2
$$

Inline $x$ math stays.
$$ E = m c^2 $$

Setext title
------------

Last words here.
"""


def test_front_matter_liquid_and_html_are_cleaned():
    chunks = chunk_document(TRICKY, word_counter, chunk_tokens=200, overlap=0)
    text = "\n".join(c.text for c in chunks)
    assert "layout:" not in text and "permalink" not in text
    assert "{{" not in text and "{%" not in text and "<a name" not in text and "<b>" not in text
    assert "bold HTML" in text  # tags go, their text stays
    assert "Intro paragraph with a [link](/x/)" in text


def test_code_and_math_blocks_stay_whole_and_headings_are_tracked():
    blocks = parse_blocks(TRICKY)
    kinds = [(b.kind, b.heading) for b in blocks]
    code = [b for b in blocks if b.kind == "code"]
    assert len(code) == 2
    assert "a blank line inside the fence" in code[0].text and "return x * 2" in code[0].text
    assert code[1].text.startswith("```python\n") and 'print("still code")' in code[1].text
    math = [b for b in blocks if b.kind == "math"]
    assert [m.text for m in math] == ["$$\na^2 + b^2\n\n= c^2\n$$", "$$ E = m c^2 $$"]
    assert ("heading", ("Sorting",)) in kinds  # kramdown {#id} dropped
    assert ("code", ("Sorting", "Code")) in kinds
    assert ("math", ("Sorting", "Math")) in kinds
    setext = [b for b in blocks if b.kind == "heading" and b.text == "Setext title"]
    assert setext and setext[0].level == 2


def test_small_budget_never_splits_code_or_math_that_fit():
    # Budget 30 words: each code/math block fits alone, so every fence in a chunk is closed in that chunk.
    chunks = chunk_document(TRICKY, word_counter, chunk_tokens=30, overlap=5)
    for c in chunks:
        assert c.text.count("```") % 2 == 0, c.text
        assert c.text.count("$$") % 2 == 0, c.text
        assert c.tokens <= 30
    assert any("a blank line inside the fence" in c.text and "return x * 2" in c.text for c in chunks)


def test_offsets_point_into_the_original_text():
    chunks = chunk_document(TRICKY, word_counter, chunk_tokens=25, overlap=0)
    for c in chunks:
        original = TRICKY[c.start:c.end]
        # The first and last words of the cleaned chunk are found in the raw span it came from.
        words = c.text.split()
        assert words[0].strip("`#") in original or words[0] in c.heading_path
        assert words[-1].strip("`") in original


def test_oversized_block_is_split_at_lines_and_paragraphs_at_sentences():
    code = "```\n" + "\n".join(f"x{i} = {i} + {i}" for i in range(60)) + "\n```\n"
    prose = " ".join(f"Sentence number {i} is here." for i in range(40))
    doc = f"# Big\n\n{code}\n{prose}\n"
    chunks = chunk_document(doc, word_counter, chunk_tokens=40, overlap=8)
    assert all(c.tokens <= 40 for c in chunks)
    code_chunks = [c for c in chunks if "x0 = 0" in c.text or "x59 = 59" in c.text]
    assert code_chunks and all(c.text.count("```") % 2 == 0 for c in chunks)
    # Lines are never cut in the middle.
    for c in chunks:
        for line in c.text.splitlines():
            if line.startswith("x"):
                assert line.count("=") == 1 and line.count("+") == 1
    # Prose pieces end at sentence boundaries, and consecutive prose chunks overlap.
    prose_chunks = [c for c in chunks if "Sentence number" in c.text]
    assert len(prose_chunks) >= 3
    for a, b in zip(prose_chunks, prose_chunks[1:]):
        assert a.text.rstrip().endswith(".")
        assert b.start < a.end  # overlap: the next chunk starts before the previous one ends


def test_chunks_never_cross_headings_and_heading_only_sections_merge_forward():
    doc = "# Title\n\n## Part one\n\nAlpha text.\n\n## Part two\n\nBeta text.\n"
    chunks = chunk_document(doc, word_counter, chunk_tokens=100, overlap=10)
    assert [c.heading for c in chunks] == [("Title", "Part one"), ("Title", "Part two")]
    assert "Alpha" in chunks[0].text and "Beta" not in chunks[0].text
    assert chunks[0].text.startswith("Title")  # the bare title is carried into the first section


def test_plain_text_is_split_at_blank_lines_only():
    text = "# not a heading in plain text\n\nsecond paragraph {{ kept }}\n"
    chunks = chunk_document(text, word_counter, chunk_tokens=8, overlap=0, markdown=False)
    assert chunks[0].text == "# not a heading in plain text" and chunks[0].heading == ()
    assert "{{ kept }}" in chunks[1].text


def test_clean_inline_keeps_caption_text():
    html = '<div class="fig"><img src="{{site.baseurl}}/a.png">\n<div class="caption">A caption.</div></div>'
    assert clean_inline(html) == "A caption."


def test_real_tokenizer_budget_is_respected():
    from transformers import AutoTokenizer

    from probllm.models import resolve_embedder
    from probllm.rag.chunk import token_counter

    # The embedder's own tokenizer, loaded alone (the model weights are not needed to count tokens).
    count = token_counter(AutoTokenizer.from_pretrained(resolve_embedder(None)))
    chunks = chunk_document(TRICKY * 3, count, chunk_tokens=40, overlap=10)
    assert chunks and all(count([c.text])[0] <= 40 + 2 for c in chunks)  # +2: the "\n\n" joins


@pytest.mark.parametrize("bad", [0, 5])
def test_budget_too_small_is_refused(bad):
    with pytest.raises(ValueError):
        chunk_document("text", word_counter, chunk_tokens=bad)


def test_word_additive_counting_equals_whole_text_counting():
    """MiniLM's tokenizer is counted word by word (cached); that must give exactly the whole-text count."""
    from transformers import AutoTokenizer

    from probllm.models import resolve_embedder
    from probllm.rag.chunk import parse_blocks, token_counter

    tok = AutoTokenizer.from_pretrained(resolve_embedder(None))
    count = token_counter(tok)
    texts = [b.text for b in parse_blocks(TRICKY)] + ["Naïve café: x_i \\in R^D, O(n log n)!", "e.g. 3.14-th"]
    whole = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert count(texts) == whole


def test_code_inside_a_list_stays_one_block_and_indented_code_is_code():
    doc = ("# Steps\n\n- first step\n- second step:\n\n  ```python\n  x = 1\n\n  y = 2\n  ```\n- third step\n\n"
           "Intro:\n\n    indented = True\n")
    blocks = parse_blocks(doc)
    assert [b.kind for b in blocks] == ["heading", "text", "code", "text", "text", "code"]
    assert blocks[2].text == "```python\nx = 1\n\ny = 2\n```"
    assert blocks[5].text == "```\nindented = True\n```"
    for b in blocks[1:]:
        assert doc[b.start:b.end].strip() and b.heading == ("Steps",)
