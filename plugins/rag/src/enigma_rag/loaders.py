"""Files to text: one loader per format, each yielding :class:`Section`s as it reads.

A section is a run of text that shares a page (PDF) or a heading path
(Markdown, reStructuredText, DOCX, HTML). Offsets count characters in the
document's whole text, which is the sections' texts joined with blank lines,
so a passage's ``start``/``end`` point into what a reader of the file sees.
Text formats are read line by line: a large file is never held whole.
"""

from __future__ import annotations

import html.parser
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs

from enigma.errors import BadRequestError

SEPARATOR = "\n\n"
"""What joins sections into the document's text (offsets count it)."""

TEXT_SECTION_CHARS = 65536
"""A plain-text file is cut into sections of about this many characters, at paragraph ends."""


class LoaderError(BadRequestError):
    """A file that cannot be read as a document; the message names it and says why."""


@attrs.frozen
class Section:
    text: str
    offset: int
    """Where ``text`` starts in the document's text."""
    page: int | None = None
    """1-based page number (PDF)."""
    heading: tuple[str, ...] = ()
    """The headings above the text, outermost first."""


class _Offsets:
    """Hands out each section's offset in the joined document text."""

    def __init__(self) -> None:
        self.next = 0

    def section(self, text: str, **fields: object) -> Section:
        section = Section(text, self.next, **fields)
        self.next += len(text) + len(SEPARATOR)
        return section


def _text_lines(path: Path) -> Iterator[str]:
    with path.open("rb") as raw:
        head = raw.read(8192)
    if b"\x00" in head:
        raise LoaderError(f"{path} is not a text file (it holds NUL bytes); give .txt/.md files UTF-8 text")
    with path.open(encoding="utf-8-sig", errors="replace", newline=None) as handle:
        yield from handle


def load_text(path: Path) -> Iterator[Section]:
    """Plain text: paragraphs gathered into sections of about :data:`TEXT_SECTION_CHARS`."""
    offsets, lines, size = _Offsets(), [], 0
    for line in _text_lines(path):
        lines.append(line)
        size += len(line)
        if size >= TEXT_SECTION_CHARS and not line.strip():
            text = "".join(lines).strip()
            if text:
                yield offsets.section(text)
            lines, size = [], 0
    text = "".join(lines).strip()
    if text:
        yield offsets.section(text)


_ATX = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)[ \t#]*$")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_RST_ADORNMENT = re.compile(r"^([=\-~^\"'`#*+_.:<>])\1{2,}[ \t]*$")


class _HeadingSections:
    """Collects lines under a heading path and emits a section whenever the path changes."""

    def __init__(self, tidy: Callable[[str], str] | None = None) -> None:
        self.offsets, self.path, self.lines = _Offsets(), (), []
        self.tidy = tidy

    def flush(self) -> Iterator[Section]:
        text = "".join(self.lines).strip()
        if self.tidy is not None:
            text = self.tidy(text)
        self.lines = []
        if text:
            yield self.offsets.section(text, heading=self.path)

    def heading(self, level: int, title: str) -> Iterator[Section]:
        yield from self.flush()
        self.path = (*self.path[: level - 1], title.strip())
        self.lines = [title.strip() + "\n"]


def load_markdown(path: Path) -> Iterator[Section]:
    """Markdown: a section per heading (ATX ``#`` and setext underlines), outside code fences."""
    sections, fence, previous = _HeadingSections(), None, None
    for line in _text_lines(path):
        fenced = _FENCE.match(line)
        if fence is not None:
            if fenced and fenced.group(1)[0] == fence[0] and len(fenced.group(1)) >= len(fence):
                fence = None
            sections.lines.append(line)
            previous = None
            continue
        if fenced:
            fence, previous = fenced.group(1), None
            sections.lines.append(line)
            continue
        if (atx := _ATX.match(line)) is not None:
            yield from sections.heading(len(atx.group(1)), atx.group(2))
            previous = None
            continue
        if previous is not None and previous.strip() and _SETEXT.match(line):
            sections.lines.pop()
            yield from sections.heading(1 if line.strip()[0] == "=" else 2, previous)
            previous = None
            continue
        sections.lines.append(line)
        previous = line
    yield from sections.flush()


_GLOSSARY = re.compile(r"^(\s*)\.\. glossary::")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def load_rst(path: Path) -> Iterator[Section]:
    """reStructuredText: a section per title (underlined, optionally overlined; levels by order of first
    use), and one per term of a ``.. glossary::`` (under the title it is in)."""
    sections, styles, previous = _HeadingSections(), [], None
    glossary: list[int | None] | None = None  # [directive indent, term indent] while inside one
    glossary_depth = 0
    for line in _text_lines(path):
        if glossary is not None and line.strip():
            indent = _indent(line)
            if indent <= glossary[0]:
                glossary = None
                yield from sections.flush()
                sections.path = sections.path[:glossary_depth]
            elif not line.lstrip().startswith(":"):
                if glossary[1] is None:
                    glossary[1] = indent
                if indent == glossary[1]:
                    term = line.strip()
                    if previous is not None and previous.strip() and _indent(previous) == glossary[1]:
                        sections.path = (*sections.path[:-1], f"{sections.path[-1]}, {term}")  # terms sharing one
                        sections.lines.append(line.lstrip())
                    else:
                        yield from sections.heading(glossary_depth + 1, term)
                    previous = line
                    continue
        if (match := _GLOSSARY.match(line)) is not None:
            glossary, glossary_depth = [_indent(match.group(0)), None], len(sections.path)
        adornment = _RST_ADORNMENT.match(line)
        if adornment and previous is not None and previous.strip() and not _RST_ADORNMENT.match(previous) \
                and len(line.rstrip()) >= len(previous.strip()):
            sections.lines.pop()
            overlined = bool(sections.lines) and sections.lines[-1].strip() == line.strip()
            if overlined:
                sections.lines.pop()
            style = (adornment.group(1), overlined)
            if style not in styles:
                styles.append(style)
            yield from sections.heading(styles.index(style) + 1, previous)
            previous = None
            continue
        sections.lines.append(line)
        previous = line
    yield from sections.flush()


def load_pdf(path: Path) -> Iterator[Section]:
    """PDF (pypdf): one section per page with text, numbered from 1."""
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(path)
        if reader.is_encrypted and not reader.decrypt(""):
            raise LoaderError(f"{path} is an encrypted PDF that needs a password; save a copy without one")
        pages = reader.pages
        count = len(pages)
    except LoaderError:
        raise
    except Exception as exc:  # pypdf raises many kinds on a damaged file
        kind = "corrupt or not a PDF" if isinstance(exc, PdfReadError) else "unreadable"
        raise LoaderError(f"{path} is {kind} ({exc}); check that the file is a complete PDF") from exc
    offsets, found = _Offsets(), False
    for number in range(count):
        try:
            text = pages[number].extract_text() or ""
        except Exception as exc:
            raise LoaderError(f"{path}: page {number + 1} cannot be read ({exc})") from exc
        text = text.strip()
        if text:
            found = True
            yield offsets.section(text, page=number + 1)
    if not found:
        raise LoaderError(f"{path} has no text layer ({count} pages of images?); enigma does not do OCR — "
                          "run it through an OCR tool (ocrmypdf) first")


def load_docx(path: Path) -> Iterator[Section]:
    """DOCX (python-docx): paragraphs and tables in document order, a section per heading."""
    import zipfile

    import docx
    from docx.table import Table

    if not zipfile.is_zipfile(path):
        raise LoaderError(f"{path} is corrupt or not a Word document (a .docx is a zip archive; this is not one); "
                          "save it again as .docx")
    try:
        document = docx.Document(str(path))
    except Exception as exc:  # python-docx raises many kinds on a damaged package
        raise LoaderError(f"{path} is corrupt or not a Word document ({type(exc).__name__}: {exc}); "
                          "save it again as .docx") from exc
    sections = _HeadingSections()
    for block in document.iter_inner_content():
        if isinstance(block, Table):
            for row in block.rows:
                cells = [cell.text.strip() for cell in row.cells]
                cells = [text for i, text in enumerate(cells) if text and (i == 0 or text != cells[i - 1])]
                if cells:
                    sections.lines.append(" | ".join(cells) + "\n")
            continue
        text = block.text.strip()
        if not text:
            continue
        level = _heading_level(block.style.name if block.style is not None else "")
        if level:
            yield from sections.heading(level, text)
        else:
            sections.lines.append(text + "\n")
    yield from sections.flush()


def _heading_level(style: str) -> int:
    """Title above Heading 1 above Heading 2...: 1, 2, 3 (a document without a Title just skips 1)."""
    if style == "Title":
        return 1
    match = re.fullmatch(r"Heading (\d)", style)
    return int(match.group(1)) + 1 if match else 0


class _HTMLText(html.parser.HTMLParser):
    BLOCKS = {"p", "div", "li", "tr", "br", "pre", "blockquote", "section", "article", "table", "dd", "dt"}
    SKIP = {"script", "style", "noscript", "template", "head"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.sections = _HeadingSections(tidy=lambda text: re.sub(r"[ \t]*\n\s*", "\n", text))
        self.out: list[Section] = []
        self.skipping = 0
        self.heading_level = 0
        self.heading_text: list[str] = []
        self.cell = False

    def handle_starttag(self, tag: str, attrs: object) -> None:
        if tag in self.SKIP:
            self.skipping += 1
        elif re.fullmatch(r"h[1-6]", tag):
            self.heading_level, self.heading_text = int(tag[1]), []
        elif tag in ("td", "th"):
            if self.cell:
                self.sections.lines.append(" | ")
            self.cell = True
        elif tag in self.BLOCKS:
            self.sections.lines.append("\n")
            self.cell = False

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif self.heading_level and tag == f"h{self.heading_level}":
            title = " ".join("".join(self.heading_text).split())
            level, self.heading_level = self.heading_level, 0
            if title:
                self.out.extend(self.sections.heading(level, title))
        elif tag in self.BLOCKS:
            self.sections.lines.append("\n")

    def handle_data(self, data: str) -> None:
        if self.skipping:
            return
        if self.heading_level:
            self.heading_text.append(data)
        else:
            self.sections.lines.append(data)


def load_html(path: Path) -> Iterator[Section]:
    """HTML: visible text (scripts and styles left out), a section per ``<h1>``–``<h6>``."""
    parser = _HTMLText()
    for line in _text_lines(path):
        parser.feed(line)
        yield from parser.out
        parser.out = []
    parser.close()
    yield from parser.out
    yield from parser.sections.flush()


LOADERS: dict[str, Callable[[Path], Iterator[Section]]] = {
    ".pdf": load_pdf, ".docx": load_docx, ".md": load_markdown, ".markdown": load_markdown,
    ".txt": load_text, ".text": load_text, ".rst": load_rst, ".html": load_html, ".htm": load_html,
}


def loader_for(path: Path) -> Callable[[Path], Iterator[Section]]:
    """The loader of ``path``'s format, by its extension (``.rst.txt`` is reStructuredText)."""
    name = path.name.lower()
    if name.endswith(".rst.txt"):
        return load_rst
    try:
        return LOADERS[path.suffix.lower()]
    except KeyError:
        known = " ".join(sorted(LOADERS))
        raise LoaderError(f"{path} has an extension enigma cannot read ({path.suffix or 'none'}); "
                          f"it reads {known}") from None


def load(path: Path, *, max_bytes: int | None = None) -> Iterator[Section]:
    """The sections of the file at ``path``, read as they are taken. The file is checked first (it
    exists, has a format enigma reads, is not empty, is not over ``max_bytes``): a bad one raises
    :class:`LoaderError` here, before anything is read."""
    loader = loader_for(path)
    if not path.is_file():
        raise LoaderError(f"{path} does not exist or is not a file")
    size = path.stat().st_size
    if size == 0:
        raise LoaderError(f"{path} is empty")
    if max_bytes is not None and size > max_bytes:
        raise LoaderError(f"{path} is {size / 1e6:.0f} MB, over the {max_bytes / 1e6:.0f} MB limit; split it, or "
                          "raise the limit: enigma config set plugins.rag.max_file_mb N")
    return _nonempty(path, loader(path))


def _nonempty(path: Path, sections: Iterator[Section]) -> Iterator[Section]:
    found = False
    for section in sections:
        found = True
        yield section
    if not found:
        raise LoaderError(f"{path} holds no text")
