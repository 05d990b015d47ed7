"""Plain English prose from the Python documentation's reStructuredText sources.

The corpus of enigma-tiny: the ``_sources/**/*.rst.txt`` files that Debian's
``python3.11-doc`` package ships (the CPython 3.11 documentation, under the
PSF License Version 2 and the Zero-Clause BSD license for its examples). This
keeps the prose: directives, code and doctest blocks, tables, section
underlines and comments are dropped, inline markup is reduced to its text,
and each paragraph becomes one line.

    python tools/enigma_tiny/corpus.py SOURCES_DIR OUT_DIR
"""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

SECTIONS = ("tutorial", "howto", "faq", "library", "reference", "using", "extending", "glossary", "whatsnew")
ROLE = re.compile(r":[\w:.-]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`")
LINK = re.compile(r"`([^`<]+?)\s*<[^>]*>`__?")
INTERPRETED = re.compile(r"`+([^`]+?)`+_{0,2}")
EMPHASIS = re.compile(r"\*{1,2}([^*\s][^*]*?)\*{1,2}")
UNDERLINE = re.compile(r"^([=\-~^\"'`#*+.:_])\1{2,}\s*$")
TABLE = re.compile(r"^\s*(\+[-=+]+\+|\|.*\||=+(\s+=+)+)\s*$")
DIRECTIVE = re.compile(r"^\s*\.\.\s+[\w:-]+::")
HEADER_DIRECTIVES = ("function", "method", "class", "data", "attribute", "exception", "decorator",
                     "classmethod", "staticmethod", "describe", "opcode", "cmdoption", "envvar", "coroutinefunction",
                     "coroutinemethod", "decoratormethod", "abstractmethod")


def inline(text: str) -> str:
    text = ROLE.sub(lambda m: m.group(1).strip().lstrip("!~"), text)
    text = LINK.sub(lambda m: m.group(1), text)
    text = INTERPRETED.sub(lambda m: m.group(1), text)
    text = EMPHASIS.sub(lambda m: m.group(1), text)
    text = text.replace("\\", "").replace("|", "")
    return re.sub(r"\s+", " ", text).strip()


def indent_of(line: str) -> int:
    return len(line) - len(line.lstrip())


def paragraphs(rst: str) -> list[str]:
    """The prose paragraphs of one reStructuredText document."""
    lines = rst.splitlines()
    out: list[str] = []
    current: list[str] = []
    skip_deeper_than: int | None = None
    literal_next = False

    def flush() -> None:
        nonlocal literal_next
        if current:
            text = " ".join(current)
            literal_next = text.rstrip().endswith("::")
            text = inline(text.rstrip(":") + (":" if text.rstrip().endswith("::") else ""))
            if len(text.split()) >= 4 and not text.startswith(">>>"):
                out.append(text)
            current.clear()

    for line in lines:
        stripped = line.strip()
        if skip_deeper_than is not None:
            if not stripped or indent_of(line) > skip_deeper_than:
                continue
            skip_deeper_than = None
        if not stripped:
            flush()
            continue
        if literal_next and not current:
            literal_next = False
            if indent_of(line) > 0 or stripped.startswith(">>>"):
                skip_deeper_than = -1 if indent_of(line) == 0 else indent_of(line) - 1
                if indent_of(line) == 0:  # an unindented doctest: skip to the blank line
                    skip_deeper_than = None
                    continue
                continue
        if stripped.startswith(">>>") or stripped.startswith("..."):
            flush()
            continue
        if DIRECTIVE.match(line) or stripped.startswith(".. "):
            flush()
            name = stripped[3:].split("::")[0].strip()
            if name.split(":")[-1] in HEADER_DIRECTIVES or name in ("note", "seealso", "versionadded",
                                                                      "versionchanged", "deprecated", "warning",
                                                                      "impl-detail", "tip", "important"):
                continue  # the indented body below is prose; keep it
            skip_deeper_than = indent_of(line)
            continue
        if UNDERLINE.match(stripped) or TABLE.match(line):
            current.clear()  # a heading's text, or a table row
            continue
        if stripped.startswith(":") and stripped.count(":") >= 2 and re.match(r"^:[\w -]+:(\s|$)", stripped):
            flush()
            continue  # field lists (":param x:", ":synopsis:")
        if stripped.startswith(("* ", "- ", "#. ")) or re.match(r"^\d+\. ", stripped):
            flush()
            stripped = stripped.split(" ", 1)[1] if " " in stripped else ""
        current.append(stripped)
    flush()
    return out


def main(sources: Path, out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(p for section in SECTIONS for p in (sources / section).rglob("*.rst.txt"))
    if (sources / "glossary.rst.txt").exists():
        files.append(sources / "glossary.rst.txt")
    if not files:
        print(f"no .rst.txt files under {sources}", file=sys.stderr)
        return 1
    total = 0
    for path in files:
        text = "\n\n".join(paragraphs(path.read_text(encoding="utf-8")))
        if len(text) < 200:
            continue
        name = str(path.relative_to(sources)).replace("/", "__").removesuffix(".rst.txt") + ".txt"
        (out / name).write_text(textwrap.dedent(text) + "\n", encoding="utf-8")
        total += len(text)
    print(f"{len(files)} documents, {total / 1e6:.1f} MB of text -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
