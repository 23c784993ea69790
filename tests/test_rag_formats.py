"""Course material in other formats than markdown: PDFs written with fpdf2, a deck written with python-pptx, a
notebook written with nbformat, LaTeX and HTML, read by the real extractors (pypdfium2, python-pptx, nbformat)
into the same chunker and index; pages, headings and text of the chunks; scans, corrupt and encrypted PDFs;
an index that read nothing; an index built before pages were recorded."""

from __future__ import annotations

import io
import os
import sqlite3
from pathlib import Path

import pytest

from probllm.io import RecordError, Stats, UsageError
from probllm.rag.chunk import chunk_document, word_counter
from probllm.rag.extract import EXTRACTORS, read_pdf, tex_to_markdown
from probllm.rag.index import Embedder, RagIndex, build_index, read_manifest

RUNNING_HEADER = "Thermodynamics 101 - Lecture 3"


def dejavu() -> str:
    """A Unicode TrueType font that every install has: matplotlib ships DejaVu Sans."""
    import matplotlib

    return str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf")


def write_lecture_pdf(path: Path, encrypt: bool = False) -> Path:
    """Four pages as a typeset lecture has them: a running header and a page-number footer on every page, headings
    in a larger font, a ligature, a word hyphenated at a line break, an image-only page (a scan), a letter-spaced
    heading."""
    from fpdf import FPDF
    from PIL import Image

    pdf = FPDF(format="A4")
    pdf.add_font("DejaVu", fname=dejavu())
    pdf.set_auto_page_break(False)

    def page(number: int) -> None:
        pdf.add_page()
        pdf.set_font("DejaVu", size=8)
        pdf.set_xy(10, 8)
        pdf.cell(0, 5, RUNNING_HEADER)
        pdf.set_xy(10, 285)
        pdf.cell(0, 5, f"Page {number} of 4")
        pdf.set_xy(10, 25)

    def heading(text: str, size: int) -> None:
        pdf.set_font("DejaVu", size=size)
        pdf.cell(0, size * 0.6, text, new_x="LMARGIN", new_y="NEXT")
        pdf.ln(3)

    def lines(*texts: str) -> None:
        pdf.set_font("DejaVu", size=11)
        for t in texts:
            pdf.cell(0, 6, t, new_x="LMARGIN", new_y="NEXT")
        pdf.ln(3)

    page(1)
    heading("Heat engines", 20)
    lines("A heat engine turns a flow of heat from a hot reservoir to a cold one", "into mechanical work.")
    heading("The first law", 15)
    lines("Energy is conserved: the work done equals the heat taken in minus the heat given out.")
    page(2)
    heading("Carnot cycle", 20)
    lines("The e\ufb03ciency of a Carnot engine depends only on the two reservoir tempera-",
          "tures, and no engine between them does better.")
    page(3)
    image = Image.new("RGB", (60, 40), (120, 30, 30))
    pdf.image(image, x=20, y=40, w=120)
    page(4)
    heading("A DVA N C E D  TO P I C S", 20)
    lines("Entropy is a state function; its change is the reversible heat divided by temperature.")
    if encrypt:
        pdf.set_encryption(owner_password="teacher", user_password="student")
    pdf.output(str(path))
    return path


def write_scan_pdf(path: Path) -> Path:
    from fpdf import FPDF
    from PIL import Image

    pdf = FPDF()
    pdf.add_page()
    pdf.image(Image.new("L", (50, 70), 200), x=10, y=10, w=150)
    pdf.output(str(path))
    return path


@pytest.fixture(scope="module")
def lecture_pdf(tmp_path_factory) -> Path:
    return write_lecture_pdf(tmp_path_factory.mktemp("pdf") / "lecture3.pdf")


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(None)


def test_pdf_pages_headings_and_cleanup(lecture_pdf):
    got = read_pdf(str(lecture_pdf))
    assert got.pages == 4 and got.scanned == [3]
    headings = [(b.page, b.heading) for b in got.blocks if b.kind == "heading"]
    assert headings == [(1, ("Heat engines",)), (1, ("Heat engines", "The first law")), (2, ("Carnot cycle",)),
                        (4, ("ADVANCED TOPICS",))]
    text = got.text
    assert RUNNING_HEADER not in text and "Page 2 of 4" not in text  # running header and page numbers go
    assert "efficiency" in text and "\ufb03" not in text  # the ligature, normalised
    assert "temperatures, and no engine" in text  # the hyphenated line break, joined
    chunks = chunk_document(got.text, word_counter, chunk_tokens=30, overlap=0, markdown=False, blocks=got.blocks)
    by_page = {c.page: c for c in chunks}
    assert sorted(by_page) == [1, 2, 4]
    assert by_page[2].heading == ("Carnot cycle",) and "Carnot engine" in by_page[2].text
    assert by_page[4].heading == ("ADVANCED TOPICS",) and "Entropy is a state function" in by_page[4].text


def write_deck(path: Path) -> Path:
    from PIL import Image
    from pptx import Presentation
    from pptx.util import Inches

    deck = Presentation()
    slide = deck.slides.add_slide(deck.slide_layouts[1])  # title and content
    slide.shapes.title.text = "Newton's laws"
    slide.placeholders[1].text_frame.text = "A body stays at rest unless a net force acts on it."
    slide.notes_slide.notes_text_frame.text = "Ask who has pushed a stalled car."
    slide = deck.slides.add_slide(deck.slide_layouts[5])  # title only
    slide.shapes.title.text = "Units"
    table = slide.shapes.add_table(2, 2, Inches(1), Inches(2), Inches(6), Inches(1)).table
    for (r, c), text in {(0, 0): "quantity", (0, 1): "unit", (1, 0): "force", (1, 1): "newton"}.items():
        table.cell(r, c).text = text
    slide = deck.slides.add_slide(deck.slide_layouts[6])  # a photo of the blackboard: nothing to read
    picture = io.BytesIO()
    Image.new("RGB", (40, 30), (20, 90, 20)).save(picture, format="PNG")
    slide.shapes.add_picture(picture, Inches(1), Inches(1))
    deck.save(str(path))
    return path


def write_notebook(path: Path) -> Path:
    import nbformat

    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "language": "python",
                                                           "display_name": "Python 3"}})
    nb.cells = [nbformat.v4.new_markdown_cell("# Numerical integration\n\nThe trapezoidal rule averages both ends."),
                nbformat.v4.new_code_cell("import numpy as np\nnp.trapezoid([1, 2, 3])"),
                nbformat.v4.new_markdown_cell("## Error\n\nThe error shrinks with the square of the step.")]
    nb.cells[1].outputs = [nbformat.v4.new_output("execute_result", {"text/plain": "OUTPUT-NOT-INDEXED"},
                                                  execution_count=1)]
    nbformat.write(nb, str(path))
    return path


TEX = r"""\documentclass{article}
\usepackage{amsmath}
\begin{document}
\section{Harmonic oscillator}
A mass on a spring obeys Hooke's law, $F = -kx$. % a comment that is not course text
\begin{equation}
  \omega = \sqrt{k/m} \label{eq:omega}
\end{equation}
\subsection{Energy}
The energy is \emph{conserved}:
\[ E = \tfrac12 m v^2 + \tfrac12 k x^2 \]
\begin{itemize}
\item kinetic energy peaks at the centre
\item potential energy peaks at the turning points
\end{itemize}
\end{document}
"""

HTML = """<!doctype html><html><head><title>Site title</title><style>p {color: red}</style></head><body>
<nav><a href="/">Home</a> | <a href="/courses">Courses</a></nav>
<h1>Optics</h1><p>Light bends when it enters <b>glass</b>: Snell's law, $n_1 \\sin\\theta_1 = n_2 \\sin\\theta_2$.</p>
<h2>Lenses</h2><ul><li>converging lenses focus parallel rays</li><li>diverging lenses spread them</li></ul>
<footer>Copyright the department</footer></body></html>"""


def test_every_format_is_one_index_with_pages_and_headings(tmp_path, lecture_pdf, embedder, capsys):
    notes = tmp_path / "course"
    notes.mkdir()
    (notes / "lecture3.pdf").write_bytes(lecture_pdf.read_bytes())
    write_deck(notes / "mechanics.pptx")
    write_notebook(notes / "integration.ipynb")
    (notes / "oscillator.tex").write_text(TEX)
    (notes / "optics.html").write_text(HTML)
    stats = Stats(command="probllm index")
    build_index([str(notes)], str(tmp_path / "c.idx"), stats=stats, embedder=embedder, chunk_tokens=64, overlap=0)
    assert stats.read == 5 and stats.notes["documents"] == 5 and stats.notes["scanned pages"] == 2
    err = capsys.readouterr().err
    assert f"probllm index: scanned or image-only (no text to index): {notes / 'lecture3.pdf'} p. 3\n" in err
    assert f"scanned or image-only (no text to index): {notes / 'mechanics.pptx'} p. 3\n" in err
    index = RagIndex(tmp_path / "c.idx")
    try:
        rows = index.db.execute("SELECT d.source, c.heading, c.page, c.text FROM chunks c "
                                "JOIN documents d ON d.key = c.doc_key ORDER BY d.source, c.position").fetchall()
    finally:
        index.close()
    by_file: dict[str, list] = {}
    for source, heading, page, text in rows:
        by_file.setdefault(Path(source).name, []).append((heading, page, text))

    deck = by_file["mechanics.pptx"]
    assert [(h, p) for h, p, _ in deck] == [("Newton's laws", 1), ("Units", 2)]
    assert "net force" in deck[0][2] and "Notes: Ask who has pushed" in deck[0][2]
    assert "force | newton" in deck[1][2]

    nb = by_file["integration.ipynb"]
    assert [(h, p) for h, p, _ in nb] == [("Numerical integration", None), ("Numerical integration > Error", None)]
    assert "```python\nimport numpy as np" in nb[0][2] and "OUTPUT-NOT-INDEXED" not in "".join(t for *_, t in nb)

    tex = by_file["oscillator.tex"]
    assert [h for h, _, _ in tex] == ["Harmonic oscillator", "Harmonic oscillator > Energy"]
    assert r"\omega = \sqrt{k/m}" in tex[0][2] and "$F = -kx$" in tex[0][2]  # math stays LaTeX
    assert r"E = \tfrac12 m v^2" in tex[1][2] and "- kinetic energy peaks" in tex[1][2]
    assert "comment" not in tex[0][2] and "\\label" not in tex[0][2] and "conserved" in tex[1][2]

    html = by_file["optics.html"]
    assert [h for h, _, _ in html] == ["Optics", "Optics > Lenses"]
    assert r"$n_1 \sin\theta_1 = n_2 \sin\theta_2$" in html[0][2] and "glass" in html[0][2]
    assert not any(w in t for *_, t in html for w in ("Home", "Site title", "Copyright"))

    pdf = by_file["lecture3.pdf"]
    assert sorted({p for _, p, _ in pdf}) == [1, 2, 4]

    from probllm.rag.retrieve import Retriever, retrieve_text

    retriever = Retriever(str(tmp_path / "c.idx"))
    try:
        hit = retrieve_text(retriever, "What does the efficiency of a Carnot engine depend on?", k=1)[0]
    finally:
        retriever.close()
    assert hit["source"].endswith("lecture3.pdf") and hit["page"] == 2 and hit["heading"] == "Carnot cycle"


def test_tex_headings_use_the_highest_level_present():
    md = tex_to_markdown(r"\chapter{Waves}Text.\section*{Sound}More text.")
    assert md.startswith("# Waves") and "\n## Sound\n" in md


def test_corrupt_and_encrypted_pdfs_are_one_line_errors(tmp_path, lecture_pdf, embedder):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "good.md").write_text("# Gas laws\n\nPressure times volume is constant at fixed temperature.\n")
    corrupt = notes / "broken.pdf"
    corrupt.write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntruncated garbage")
    encrypted = write_lecture_pdf(notes / "locked.pdf", encrypt=True)
    out = tmp_path / "n.idx"
    with pytest.raises(RecordError) as err:
        build_index([str(notes)], str(out), embedder=embedder)
    assert str(err.value).startswith(f"{corrupt}: not a readable PDF")
    assert not out.exists()  # a failed first build leaves nothing behind
    with pytest.raises(RecordError) as err:
        build_index([str(encrypted)], str(out), embedder=embedder)
    assert str(err.value) == f"{encrypted}: encrypted PDF (it needs a password; save an unencrypted copy)"

    stats = Stats(command="probllm index")
    build_index([str(notes)], str(out), stats=stats, embedder=embedder, skip_invalid=True)
    assert stats.invalid == {"not a readable PDF": 1, "encrypted PDF": 1} and stats.notes["documents"] == 1
    with pytest.raises(RecordError):  # an update that meets the bad files stops, and changes nothing
        build_index([str(notes)], str(out), embedder=embedder)
    index = RagIndex(out)  # the index is there and answers
    try:
        assert index.search(embedder.embed(["pressure and volume"]), k=1)[0][0]["source"].endswith("good.md")
    finally:
        index.close()


def test_index_of_nothing_fails_and_leaves_no_index(tmp_path, embedder):
    from typer.testing import CliRunner

    from probllm.cli.app import app

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "broken.pdf").write_bytes(b"not a pdf at all")
    (notes / "figure.png").write_bytes(b"\x89PNG")
    out = tmp_path / "empty.idx"
    stats = Stats(command="probllm index")
    with pytest.raises(UsageError) as err:
        build_index([str(notes)], str(out), stats=stats, embedder=embedder, skip_invalid=True)
    message = str(err.value)
    assert "no document was read" in message and "not a readable PDF: 1" in message
    assert "unsupported file type .png: 1" in message and not out.exists()

    scan = write_scan_pdf(notes / "scan.pdf")
    with pytest.raises(UsageError) as err:  # read, but nothing in it to index
        build_index([str(scan)], str(out), embedder=embedder)
    assert "hold no text to index (1 scanned or image-only pages)" in str(err.value) and not out.exists()

    result = CliRunner().invoke(app, ["index", str(notes / "broken.pdf"), "-o", str(out)])
    assert result.exit_code == 65 and "Traceback" not in result.output
    assert f"{notes / 'broken.pdf'}: not a readable PDF" in result.output and not out.exists()


def test_empty_index_is_refused_where_it_is_opened(tmp_path, embedder):
    """An index with no passages (an old one, or one whose documents were all removed) would run an assistant
    that has no material: ask, chat and serve open it through Retriever, which says so."""
    notes = tmp_path / "n"
    notes.mkdir()
    (notes / "a.md").write_text("# A\n\nSome text.\n")
    out = tmp_path / "e.idx"
    build_index([str(notes)], str(out), embedder=embedder)
    manifest = read_manifest(out)
    db = sqlite3.connect(out / manifest["files"]["chunks"])
    with db:
        db.execute("DELETE FROM chunks")
        db.execute("DELETE FROM documents")
    db.close()
    (out / "manifest.json").write_text((out / "manifest.json").read_text().replace('"chunks": 1', '"chunks": 0'))
    from probllm.rag.retrieve import Retriever

    with pytest.raises(UsageError) as err:
        Retriever(str(out))
    assert "holds no passages" in str(err.value) and f"probllm index NOTES -o {out}" in str(err.value)


def test_index_from_before_pages_loads_answers_and_updates(tmp_path, embedder):
    notes = tmp_path / "n"
    notes.mkdir()
    (notes / "a.md").write_text("# Optics\n\nA converging lens focuses parallel rays at its focal point.\n")
    out = tmp_path / "old.idx"
    build_index([str(notes)], str(out), embedder=embedder)
    # The sidecar as it was before this change: no page column.
    db_path = out / read_manifest(out)["files"]["chunks"]
    db = sqlite3.connect(db_path)
    db.execute("ALTER TABLE chunks DROP COLUMN page")
    db.commit()
    db.close()
    index = RagIndex(out)
    try:
        hit = index.search(embedder.embed(["where does a lens focus rays?"]), k=1)[0][0]
    finally:
        index.close()
    assert hit["source"].endswith("a.md") and hit["page"] is None
    from probllm.rag.retrieve import Retriever, retrieve_text

    retriever = Retriever(str(out))
    try:
        assert retrieve_text(retriever, "focal point", k=1)[0]["page"] is None
    finally:
        retriever.close()

    (notes / "b.md").write_text("# Waves\n\nSound is a longitudinal wave.\n")
    report = build_index([str(notes)], str(out), embedder=embedder)  # the update upgrades the new generation
    assert report.added == 1 and report.unchanged == 1
    index = RagIndex(out)
    try:
        assert [h["source"][-4:] for h in index.search(embedder.embed(["longitudinal wave"]), k=2)[0]] == \
            ["b.md", "a.md"]
    finally:
        index.close()


def test_registry_names_every_extracted_suffix():
    assert set(EXTRACTORS) == {".pdf", ".pptx", ".ipynb", ".tex", ".html", ".htm", ".cnxml"}
    assert [s for s, e in EXTRACTORS.items() if e.paged] == [".pdf", ".pptx"]
    assert os.path.basename(dejavu()) == "DejaVuSans.ttf"


def test_chunks_do_not_cross_pages():
    from probllm.rag.chunk import Block
    from probllm.rag.extract import _layout

    w = ("Waves",)
    got = _layout([Block("heading", 0, 0, "Waves", w, 1, page=1), Block("text", 0, 0, "Sound is a wave.", w, page=1),
                   Block("text", 0, 0, "Light is one too.", w, page=2),
                   Block("heading", 0, 0, "Optics", ("Optics",), 1, page=2),  # at the foot of page 2
                   Block("text", 0, 0, "Lenses bend light.", ("Optics",), page=3)])
    chunks = chunk_document(got.text, word_counter, 200, 20, markdown=False, blocks=got.blocks)
    assert [(c.page, c.heading, c.text) for c in chunks] == [
        (1, w, "Waves\n\nSound is a wave."), (2, w, "Light is one too."),
        (3, ("Optics",), "Optics\n\nLenses bend light.")]


# An OpenStax CNXML module as the books' repositories hold them (written here, in their structure): a title,
# metadata, a section with paragraphs (sub/superscripts, inline MathML, a link), a list, a table with a footnote,
# a glossary definition, a figure that is only media.
CNXML = """<document xmlns="http://cnx.rice.edu/cnxml" xmlns:m="http://www.w3.org/1998/Math/MathML">
<title>Kepler's Laws</title>
<metadata xmlns:md="http://cnx.rice.edu/mdml"><md:content-id>m00001</md:content-id>
  <md:title>Kepler's Laws</md:title></metadata>
<content>
<para id="p1">Planets move on ellipses with the Sun at one focus; a gas cloud of 10<sup>19</sup> atoms of
  H<sub>2</sub> is another matter.</para>
<section id="s1"><title>The third law</title>
  <para id="p2">The square of the period grows as the cube of the axis:
    <m:math><m:mrow><m:msup><m:mi>P</m:mi><m:mn>2</m:mn></m:msup><m:mo>=</m:mo><m:msup><m:mi>a</m:mi>
    <m:mn>3</m:mn></m:msup></m:mrow></m:math>, see <link target-id="t1"/>.</para>
  <list id="l1"><item>Mercury: 0.24 years</item><item>Earth: 1 year</item></list>
  <table id="t1" summary="periods"><tgroup cols="2"><colspec colnum="1"/>
    <thead><row><entry>Planet<footnote id="f1">Ordered by distance</footnote></entry><entry>Period</entry></row></thead>
    <tbody><row><entry>Mars</entry><entry>1.88 years</entry></row></tbody></tgroup></table>
  <figure id="fig1"><media id="m1" alt="orbit"><image mime-type="image/jpeg" src="orbit.jpg"/></media></figure>
</section>
</content>
<glossary><definition id="d1"><term>semimajor axis</term><meaning>half the longest diameter of an ellipse</meaning>
</definition></glossary>
</document>
"""


def test_openstax_cnxml_is_read_with_its_sections_lists_tables_and_glossary(tmp_path, embedder):
    notes = tmp_path / "astronomy" / "modules" / "m00001"
    notes.mkdir(parents=True)
    (notes / "index.cnxml").write_text(CNXML)
    (tmp_path / "astronomy" / "bad.cnxml").write_text("<document><para>unclosed</document>")
    md = EXTRACTORS[".cnxml"].read(str(notes / "index.cnxml")).text
    assert md.startswith("# Kepler's Laws\n\nPlanets move on ellipses") and "10^19 atoms of H_2" in md
    assert "\n## The third law\n" in md and "P2=a3" in md.replace(" ", "")
    assert "- Mercury: 0.24 years\n- Earth: 1 year" in md
    assert "| Planet Ordered by distance | Period |\n| --- | --- |\n| Mars | 1.88 years |" in md
    assert "**semimajor axis**: half the longest diameter of an ellipse" in md
    assert "m00001" not in md and "orbit" not in md  # metadata and media are not course text
    stats = Stats(command="probllm index")
    with pytest.raises(RecordError, match="not well-formed CNXML: mismatched tag"):
        build_index([str(tmp_path / "astronomy")], str(tmp_path / "a.idx"), stats=stats, embedder=embedder)
    (tmp_path / "astronomy" / "bad.cnxml").unlink()
    build_index([str(tmp_path / "astronomy")], str(tmp_path / "a.idx"), stats=Stats(command="probllm index"),
                embedder=embedder, chunk_tokens=64, overlap=0)
    from probllm.rag.retrieve import Retriever, retrieve_text

    retriever = Retriever(str(tmp_path / "a.idx"))
    try:
        hit = retrieve_text(retriever, "How does the orbital period relate to the semimajor axis?", k=1)[0]
    finally:
        retriever.close()
    assert hit["source"].endswith("index.cnxml") and hit["heading"].startswith("Kepler's Laws")
