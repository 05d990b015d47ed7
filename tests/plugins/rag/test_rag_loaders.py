"""Each loader on real files made here: text, page numbers, headings and offsets come out right."""

from __future__ import annotations

import tracemalloc

import pytest
from enigma_rag.loaders import SEPARATOR, LoaderError, load
from rag_files import write_docx, write_pdf


def sections(path, **options):
    return list(load(path, **options))


def document_text(found):
    return SEPARATOR.join(section.text for section in found)


def test_pdf_pages_keep_their_numbers(tmp_path):
    path = write_pdf(tmp_path / "manual.pdf", [["Chapter one: installing the widget."],
                                               [],  # a page with no text is skipped, numbering is not
                                               ["Chapter three: the widget's network port is 8080."]])
    found = sections(path)
    assert [section.page for section in found] == [1, 3]
    assert "installing the widget" in found[0].text and "port is 8080" in found[1].text
    assert document_text(found)[found[1].offset:].startswith(found[1].text)


def test_encrypted_pdf_needs_its_password(tmp_path):
    from pypdf import PdfReader, PdfWriter

    plain = write_pdf(tmp_path / "plain.pdf", [["secret plans"]])
    writer = PdfWriter(clone_from=PdfReader(plain))
    writer.encrypt(user_password="hunter2", owner_password="owner")
    locked = tmp_path / "locked.pdf"
    with locked.open("wb") as handle:
        writer.write(handle)
    with pytest.raises(LoaderError, match=r"locked\.pdf is an encrypted PDF that needs a password"):
        sections(locked)
    # a PDF encrypted with an empty user password opens, as in any PDF reader
    writer = PdfWriter(clone_from=PdfReader(plain))
    writer.encrypt(user_password="", owner_password="owner")
    opened = tmp_path / "owner-only.pdf"
    with opened.open("wb") as handle:
        writer.write(handle)
    assert "secret plans" in sections(opened)[0].text


@pytest.mark.parametrize("content", [b"%PDF-1.7\n" + b"\x00garbage" * 50, b"not a pdf at all, just words"])
def test_corrupt_pdf_is_a_clear_error(tmp_path, content):
    path = tmp_path / "broken.pdf"
    path.write_bytes(content)
    with pytest.raises(LoaderError, match=r"broken\.pdf is corrupt or not a PDF \(.*\); check that the file is a"):
        sections(path)


def test_pdf_without_text_says_so(tmp_path):
    path = write_pdf(tmp_path / "scan.pdf", [[], []])
    with pytest.raises(LoaderError, match=r"scan\.pdf has no text layer \(2 pages.*OCR"):
        sections(path)


def test_docx_headings_paragraphs_and_tables(tmp_path):
    found = sections(write_docx(tmp_path / "ops.docx"))
    by_heading = {section.heading: section.text for section in found}
    assert by_heading[("Operations Manual", "Installation")].endswith("run the installer.")
    ports = by_heading[("Operations Manual", "Installation", "Ports")]
    assert "http | 8080" in ports and "metrics | 9090" in ports
    assert by_heading[("Operations Manual", "Backups")].startswith("Backups\nNightly backups")


def test_corrupt_docx_is_a_clear_error(tmp_path):
    path = tmp_path / "report.docx"
    path.write_bytes(b"PK\x03\x04 this is not really a zip file")
    with pytest.raises(LoaderError, match=r"report\.docx is corrupt or not a Word document"):
        sections(path)


def test_markdown_heading_paths(tmp_path):
    path = tmp_path / "guide.md"
    path.write_text("Intro line.\n\n# Guide\n\nWelcome.\n\n## Setup\n\nRun it.\n\n```sh\n# not a heading\n```\n\n"
                    "Config\n------\n\nEdit the file.\n\n### Keys ###\n\nport = 1\n\n# Other\n\nDone.\n")
    found = sections(path)
    assert [section.heading for section in found] == [
        (), ("Guide",), ("Guide", "Setup"), ("Guide", "Config"), ("Guide", "Config", "Keys"), ("Other",)]
    assert "# not a heading" in found[2].text
    text = path.read_text()
    assert all(section.text in text or section.text.startswith(section.heading[-1]) for section in found)
    joined = document_text(found)
    assert all(joined[s.offset:s.offset + len(s.text)] == s.text for s in found)


def test_restructuredtext_titles(tmp_path):
    path = tmp_path / "tutorial.rst.txt"
    path.write_text("********\nThe Tour\n********\n\nA tour.\n\nNumbers\n=======\n\nUse ints.\n\nFloats\n------\n\n"
                    "Use floats.\n\nStrings\n=======\n\nUse str.\n")
    assert [(s.heading, s.text.splitlines()[-1]) for s in sections(path)] == [
        (("The Tour",), "A tour."), (("The Tour", "Numbers"), "Use ints."),
        (("The Tour", "Numbers", "Floats"), "Use floats."), (("The Tour", "Strings"), "Use str.")]


def test_html_visible_text_under_headings(tmp_path):
    path = tmp_path / "page.html"
    path.write_text("<html><head><title>t</title><style>p {color: red}</style></head><body>"
                    "<h1>Widget</h1><p>The widget &amp; its parts.</p><script>var x = 1;</script>"
                    "<h2>Parts</h2><ul><li>gear</li><li>spring</li></ul></body></html>")
    found = sections(path)
    assert [s.heading for s in found] == [("Widget",), ("Widget", "Parts")]
    assert found[0].text == "Widget\nThe widget & its parts." and "var x" not in document_text(found)
    assert "gear" in found[1].text and "spring" in found[1].text


def test_text_is_streamed_not_loaded_whole(tmp_path):
    path = tmp_path / "big.txt"
    paragraph = "The quick brown fox jumps over the lazy dog. " * 20 + "\n\n"
    with path.open("w") as handle:
        for _ in range(40_000):  # about 36 MB
            handle.write(paragraph)
    tracemalloc.start()
    stream = load(path)
    for _ in range(3):
        next(stream)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2_000_000, f"reading the first sections of a 36 MB file took {peak} bytes"


def test_empty_unknown_missing_and_too_large_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(LoaderError, match=r"empty\.txt is empty"):
        load(empty)
    blank = tmp_path / "blank.md"
    blank.write_text("\n\n   \n")
    with pytest.raises(LoaderError, match=r"blank\.md holds no text"):
        sections(blank)
    unknown = tmp_path / "data.xlsx"
    unknown.write_bytes(b"PK")
    with pytest.raises(LoaderError, match=r"data\.xlsx has an extension enigma cannot read \(\.xlsx\); it reads"):
        load(unknown)
    with pytest.raises(LoaderError, match=r"nothing\.txt does not exist"):
        load(tmp_path / "nothing.txt")
    huge = tmp_path / "huge.txt"
    with huge.open("wb") as handle:  # 200 MB, sparse: the check must not read it
        handle.truncate(200_000_000)
    with pytest.raises(LoaderError, match=r"huge\.txt is 200 MB, over the 100 MB limit.*max_file_mb"):
        load(huge, max_bytes=100_000_000)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    with pytest.raises(LoaderError, match=r"binary\.txt is not a text file"):
        sections(binary)


def test_restructuredtext_glossary_terms_are_sections(tmp_path):
    path = tmp_path / "glossary.rst"
    path.write_text("Glossary\n========\n\n.. glossary::\n   :sorted:\n\n   mutable\n      Can change.\n\n"
                    "   immutable\n   frozen\n      Cannot change.\n\n      Tuples are.\n\nAfter the list.\n")
    assert [(s.heading, s.text) for s in sections(path)] == [
        (("Glossary",), "Glossary\n\n.. glossary::\n   :sorted:"),
        (("Glossary", "mutable"), "mutable\n      Can change."),
        (("Glossary", "immutable, frozen"), "immutable\nfrozen\n      Cannot change.\n\n      Tuples are."),
        (("Glossary",), "After the list.")]
