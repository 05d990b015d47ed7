"""Plain English prose from the Python documentation's reStructuredText sources.

The corpus of enigma-tiny: the ``_sources/**/*.rst.txt`` files that Debian's
``python3.11-doc`` package ships (the CPython 3.11 documentation, under the
PSF License Version 2 and the Zero-Clause BSD license for its examples). This
keeps the prose: directives, code and doctest blocks, tables, section
underlines and comments are dropped, inline markup is reduced to its text,
and each paragraph becomes one line.

It also writes ``chat.jsonl``: question/answer conversations drawn from the
same text — each documented function, class or method ("What does
os.path.join do?" answered by the first paragraph of its entry) and each
glossary term — so that the model also learns to answer through its chat
template (trained on the answers only).

    python tools/enigma_tiny/corpus.py SOURCES_DIR OUT_DIR
"""

from __future__ import annotations

import json
import random
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


QUESTIONS = {
    "api": ("What does {name} do?", "Explain {name}.", "What is {name} for?", "Describe {name}.",
            "How does {name} work?", "Tell me about {name}."),
    "term": ("What is {article} {name}?", "What does {name} mean?", "Define {name}.", "Explain {name}.",
             "What is meant by {name} in Python?"),
}
SIGNATURE = re.compile(r"^(\s*)\.\.\s+(?:py:)?(function|method|class|exception|decorator|classmethod|staticmethod|"
                       r"coroutinefunction|coroutinemethod|abstractmethod)::\s+([\w.]+)")
MODULE = re.compile(r"^\.\.\s+(?:module|currentmodule)::\s+([\w.]+)")


def first_paragraph(lines: list[str], start: int, indent: int) -> str:
    """The first prose paragraph of the directive body after line ``start``."""
    body: list[str] = []
    for line in lines[start + 1:]:
        if line.strip() and indent_of(line) <= indent:
            break
        if not line.strip():
            if body:
                break
            continue
        if line.strip().startswith((".. ", ":")) and not body:
            continue
        body.append(line.strip())
    text = inline(" ".join(body))
    return text if len(text.split()) >= 5 and not text.endswith("::") else ""


def api_answers(rst: str) -> list[tuple[str, str]]:
    """(qualified name, first paragraph) of every function, class and method documented in a file."""
    lines = rst.splitlines()
    module, enclosing = "", ""
    found = []
    for index, line in enumerate(lines):
        if match := MODULE.match(line):
            module = match.group(1)
            continue
        match = SIGNATURE.match(line)
        if not match:
            continue
        indent, kind, name = len(match.group(1)), match.group(2), match.group(3)
        if kind in ("class", "exception") and indent == 0:
            enclosing = name
        if indent > 0 and enclosing and "." not in name:
            name = f"{enclosing}.{name}"
        if module and not name.startswith(module + ".") and kind in ("function", "class", "exception", "decorator"):
            name = f"{module}.{name}" if module != "builtins" else name
        answer = first_paragraph(lines, index, indent)
        if answer:
            found.append((name, answer))
    return found


def glossary_answers(rst: str) -> list[tuple[str, str]]:
    lines = rst.splitlines()
    found = []
    for index, line in enumerate(lines):
        if indent_of(line) == 3 and line.strip() and not line.strip().startswith(".."):
            term = inline(line.strip())
            answer = first_paragraph(lines, index, 3)
            if answer and term and not term.startswith((">>>", "...")):
                found.append((term, answer))
    return found


def conversations(sources: Path, rng: random.Random) -> list[dict]:
    pairs = [("api", name, answer) for path in sorted((sources / "library").rglob("*.rst.txt"))
             for name, answer in api_answers(path.read_text(encoding="utf-8"))]
    glossary = sources / "glossary.rst.txt"
    if glossary.exists():
        pairs += [("term", term, answer) for term, answer in glossary_answers(glossary.read_text(encoding="utf-8"))]
    records = []
    for kind, name, answer in pairs:
        article = "an" if name[:1].lower() in "aeiou" else "a"
        question = rng.choice(QUESTIONS[kind]).format(name=name, article=article)
        records.append({"messages": [{"role": "user", "content": question},
                                     {"role": "assistant", "content": answer}]})
    return records


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
    chats = conversations(sources, random.Random(0))
    with (out / "chat.jsonl").open("w", encoding="utf-8") as handle:
        for record in chats:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"{len(files)} documents, {total / 1e6:.1f} MB of text, {len(chats)} conversations -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
