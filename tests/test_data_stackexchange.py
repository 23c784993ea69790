"""pair-stackexchange: pm_score, the pair rule, sites, HTML->markdown, and the Posts.xml streaming path."""

import random
from pathlib import Path

import pytest

from probllm.data.markdown import html_to_markdown
from probllm.data.stackexchange import PairRule, pair_from_hf, pairs_from_posts_xml, parse_sites, pm_score, site_of, \
    site_matches
from probllm.io import RecordError, Skip, Stats

ROOT = Path(__file__).resolve().parents[1]


def test_pm_score_is_the_datasets_formula():
    assert pm_score(0, False) == 0
    assert pm_score(1, False) == 1  # log2(2)
    assert pm_score(2, False) == 2  # log2(3) = 1.58 -> 2
    assert pm_score(15, False) == 4
    assert pm_score(1023, True) == 11
    assert pm_score(-3, False) == -1
    assert pm_score(-3, True) == 0


def hf(answers, site="https://stackoverflow.com"):
    return {"qid": 9, "question": "<p>Q <code>x</code></p>", "date": "2020/01/01",
            "answers": [{"answer_id": i, "text": f"<p>a{i}</p>", "pm_score": s} for i, s in enumerate(answers)],
            "metadata": [f"{site}/questions/9", site, f"{site}/users/1"]}


def test_rule_best_scored_at_least_10_and_rejected_in_3_to_5():
    pair = pair_from_hf(hf([2, 12, 4, 11, 6]), PairRule(), random.Random(0))
    assert pair["chosen"] == "a1" and pair["rejected"] == "a2"
    assert (pair["chosen_score"], pair["rejected_score"], pair["site"]) == (12, 4, "stackoverflow.com")
    assert pair["prompt"] == "Q `x`" and pair["qid"] == 9 and "answers" not in pair


def test_rule_skips_questions_without_both():
    with pytest.raises(Skip, match="below 10"):
        pair_from_hf(hf([9, 4]), PairRule(), random.Random(0))
    with pytest.raises(Skip, match="3..5"):
        pair_from_hf(hf([15, 6, 2]), PairRule(), random.Random(0))
    # thresholds are flags
    pair = pair_from_hf(hf([9, 2]), PairRule(chosen_min=9, rejected_min=1, rejected_max=2), random.Random(0))
    assert pair["chosen"] == "a0"


def test_rejected_pick_is_seeded_and_covers_the_band():
    rec = hf([12, 3, 4, 5, 5])
    picks = [pair_from_hf(rec, PairRule(), random.Random(s))["rejected"] for s in range(40)]
    assert set(picks) == {"a1", "a2", "a3", "a4"}
    assert picks == [pair_from_hf(rec, PairRule(), random.Random(s))["rejected"] for s in range(40)]


def test_sites_from_metadata_urls():
    assert site_of(["https://math.stackexchange.com/questions/1", "https://math.stackexchange.com"]) == \
        "math.stackexchange.com"
    wanted = parse_sites("stackoverflow, math")
    assert site_matches("stackoverflow.com", wanted) and site_matches("math.stackexchange.com", wanted)
    assert not site_matches("cooking.stackexchange.com", wanted) and not site_matches("mathoverflow.net", wanted)
    with pytest.raises(Skip, match="site"):
        pair_from_hf(hf([12, 4], site="https://cooking.stackexchange.com"), PairRule(sites=wanted),
                     random.Random(0))


def test_bad_hf_records_name_the_field():
    rec = hf([12, 4])
    rec["answers"][1]["pm_score"] = "4"
    with pytest.raises(RecordError) as e:
        pair_from_hf(rec, PairRule(), random.Random(0))
    assert e.value.field == "pm_score"
    with pytest.raises(RecordError) as e:
        pair_from_hf({"answers": []}, PairRule(), random.Random(0))
    assert e.value.field == "question"


def test_markdown_keeps_code_blocks_inline_code_and_latex():
    html = ('<p>Let $a_1 * b_2 = \\frac{1}{2}$ and use <code>x &lt; y</code>.</p>'
            '<pre class="lang-py prettyprint"><code>if a &lt; b:\n    print("`x`")\n</code></pre>'
            '<p>$$\\int_0^1 x\\,dx$$</p><script type="math/tex; mode=display">E=mc^2</script>'
            '<ul><li>one</li><li><a href="https://x.org">two</a></li></ul><blockquote>quoted</blockquote>')
    md = html_to_markdown(html)
    assert "Let $a_1 * b_2 = \\frac{1}{2}$ and use `x < y`." in md
    assert '```py\nif a < b:\n    print("`x`")\n```' in md
    assert "$$\\int_0^1 x\\,dx$$" in md and "$$E=mc^2$$" in md
    assert "- one\n- [two](https://x.org)" in md and "> quoted" in md
    assert "<" not in md.replace("x < y", "").replace("a < b", "")


def test_markdown_headings_breaks_inline_math_scripts_and_code_languages():
    html = ('<h2>Setup</h2><p>a<br>b\\(x_1\\) &amp;amp;</p><p>so <script type="math/tex">x^2</script> holds</p>'
            '<pre><code class="language-rust">fn main() {\n\n    let x = 1;\n}\n</code></pre><pre></pre>'
            '<script>alert(1)</script>')
    md = html_to_markdown(html)
    assert md == ("## Setup\n\na\nb\\(x_1\\) &amp;\n\nso $x^2$ holds\n\n"
                  "```rust\nfn main() {\n\n    let x = 1;\n}\n```")


def test_posts_xml_pairs_group_answers_that_come_later(tmp_path):
    stats = Stats()
    pairs = list(pairs_from_posts_xml(str(ROOT / "examples" / "Posts.xml"), PairRule(), random.Random(0), stats,
                                      site="math.stackexchange.com"))
    assert [p["qid"] for p in pairs] == [1, 4]
    first = pairs[0]
    # answer 3 (700 votes, accepted) is chosen; answers to question 1 arrive after question 4 in the file
    assert first["chosen_answer_id"] == 3 and first["chosen_score"] == 10
    assert first["rejected_answer_id"] in (6, 10) and 3 <= first["rejected_score"] <= 5
    assert first["prompt"].startswith("Expected value of a fair die\n\nWhat is $E[X]$")
    assert "```\nsum(range(1, 7)) / 6  # 3.5\n```" in first["chosen"]
    assert stats.read == 4 and stats.skipped["no answers"] == 1


def test_posts_xml_errors_name_file_line_and_attribute(tmp_path):
    bad = tmp_path / "Posts.xml"
    bad.write_text('<posts>\n<row Id="1" PostTypeId="1" />\n<row Id="2" PostTypeId="2" Score="x" ParentId="1"/>\n'
                   '</posts>\n')
    with pytest.raises(RecordError) as e:
        list(pairs_from_posts_xml(str(bad), PairRule(), random.Random(0), Stats()))
    assert (e.value.line, e.value.field) == (3, "Score")
    truncated = tmp_path / "t" / "Posts.xml"
    truncated.parent.mkdir()
    truncated.write_text('<posts>\n<row Id="1" PostTypeId="1" />\n<row Id="2" Post')
    with pytest.raises(RecordError, match="invalid XML") as e:
        list(pairs_from_posts_xml(str(truncated), PairRule(), random.Random(0), Stats()))
    assert e.value.line == 3


def test_posts_xml_gz_and_site_from_folder_name(tmp_path):
    import gzip

    folder = tmp_path / "physics.stackexchange.com"
    folder.mkdir()
    with gzip.open(folder / "Posts.xml.gz", "wb") as fh:
        fh.write((ROOT / "examples" / "Posts.xml").read_bytes())
    pairs = list(pairs_from_posts_xml(str(folder / "Posts.xml.gz"), PairRule(), random.Random(0), Stats()))
    assert [p["qid"] for p in pairs] == [1, 4] and {p["site"] for p in pairs} == {"physics.stackexchange.com"}
    skipped = list(pairs_from_posts_xml(str(folder / "Posts.xml.gz"), PairRule(sites=parse_sites("math")),
                                        random.Random(0), Stats()))
    assert skipped == []
