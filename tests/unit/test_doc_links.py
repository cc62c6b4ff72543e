"""Every document the repository cites exists: a ``*.md`` file or a ``docs/`` path named in any
``*.py``, ``*.md`` or ``*.yaml`` file, a Markdown link's target, and the section a citation
names (``docs/design.md, "The settle rule"`` or ``design.md#the-settle-rule``). A clone holds
what its docstrings send a reader to."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SKIP_DIRS = {".git", ".venv", "node_modules", "__pycache__", ".mypy_cache", ".ruff_cache"}
SKIP_DIRS |= {".pytest_cache", ".hypothesis", "results"}  # bench/results: recorded runs' output
SUFFIXES = {".py", ".md", ".yaml", ".yml"}

#: A path ending in .md (``README.md``, ``docs/design.md``, ``../bench/README.md``), not inside a
#: URL or a longer path word.
MD_PATH = re.compile(r"(?<![\w/.:-])((?:\.\.?/)*[\w-]+(?:/[\w.-]+)*\.md)\b(?!\.)")
#: A path under docs/ of any kind (``docs/tables.md``, ``docs/``-relative names).
DOCS_PATH = re.compile(r"(?<![\w/.:-])(docs/[\w-]+(?:[./][\w-]+)*)")
#: A section cited by name: ``docs/design.md, "The flush"`` or ``design.md section "Holds"``.
SECTION = re.compile(r"([\w./-]+\.md),?\s+(?:section\s+)?\"([^\"\n]+)\"")
#: A Markdown link to a section: ``(docs/design.md#the-settle-rule)``.
ANCHOR = re.compile(r"\]\(([\w./-]+\.md)#([\w-]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def sources() -> Iterator[Path]:
    """The repository's own text files that may cite a document."""
    for path in sorted(ROOT.rglob("*")):
        rel = path.relative_to(ROOT)
        if SKIP_DIRS & set(rel.parts[:-1]) or ".egg-info" in str(rel):
            continue
        if path.suffix in SUFFIXES and path.is_file():
            yield path


def resolve(cited: str, where: Path) -> Path | None:
    """The cited file, relative to the citing file's folder or to the repository's root."""
    for base in (where.parent, ROOT):
        candidate = (base / cited).resolve()
        if candidate.exists():
            return candidate
    return None


def headings(doc: Path) -> list[str]:
    """A Markdown file's headings, as written (numbering and emphasis kept)."""
    return HEADING.findall(doc.read_text(encoding="utf-8"))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.lower().replace("`", ""))
    return text.replace(" ", "-")


def broken_citations(path: Path) -> list[str]:
    """What ``path`` cites that does not exist, one line each (file:line: what)."""
    text = path.read_text(encoding="utf-8")
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    found: list[str] = []

    def line(at: int) -> str:
        return f"{rel}:{text.count(chr(10), 0, at) + 1}"

    paths = {m.start(): m.group(1) for m in (*DOCS_PATH.finditer(text), *MD_PATH.finditer(text))}
    for at, cited in sorted(paths.items()):
        if resolve(cited, path) is None:
            found.append(f"{line(at)}: {cited} does not exist")
    for m in SECTION.finditer(text):
        doc = resolve(m.group(1), path)
        if doc is not None and not any(m.group(2) in h for h in headings(doc)):
            found.append(f'{line(m.start())}: {m.group(1)} has no section "{m.group(2)}"')
    for m in ANCHOR.finditer(text):
        doc = resolve(m.group(1), path)
        if doc is not None and m.group(2) not in {slug(h) for h in headings(doc)}:
            found.append(f"{line(m.start())}: {m.group(1)} has no heading #{m.group(2)}")
    return found


def test_every_cited_document_and_section_exists() -> None:
    """No file of the repository sends a reader to a document or a section it does not hold."""
    here = Path(__file__).resolve()
    broken = [b for path in sources() if path != here for b in broken_citations(path)]
    assert broken == [], "\n".join(broken)


def test_the_check_finds_a_missing_file_and_section(tmp_path: Path) -> None:
    """The check can fail: a missing document, a missing section and a missing anchor are each
    reported, while a present file and section are not."""
    doc = ROOT / "docs" / "design.md"
    cited = tmp_path / "cites.py"
    cited.write_text(
        '"""See NOWHERE.md and docs/nothing-here.md; docs/design.md, "No such section";\n'
        'docs/design.md, "The ledger law"; [x](docs/design.md#no-such-anchor)."""\n'
    )
    found = broken_citations(cited)
    assert doc.exists()
    assert [f.split(": ", 1)[1] for f in found] == [
        "NOWHERE.md does not exist",
        "docs/nothing-here.md does not exist",
        'docs/design.md has no section "No such section"',
        "docs/design.md has no heading #no-such-anchor",
    ]


def test_the_schema_version_the_docs_quote_is_the_migrations_head() -> None:
    """An example of ``accumsync status`` on an unmigrated store names the head migration
    ("expected 0012"), not an older one (a recorded run's output, quoting its own day's head,
    is not an example of today's)."""
    versions = (ROOT / "migrations" / "versions").glob("[0-9][0-9][0-9][0-9]_*.py")
    head = max(p.name[:4] for p in versions)
    example = re.compile(r"schema is at nothing, expected (\d{4})\b")
    quoted = {
        f"{path.relative_to(ROOT)}: {m.group(1)}"
        for path in sources()
        if path.suffix == ".md"
        for m in example.finditer(path.read_text(encoding="utf-8"))
    }
    assert quoted and all(q.endswith(f": {head}") for q in quoted), (head, sorted(quoted))
