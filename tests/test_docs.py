"""The README is a front page (issue 25, part 5): at most 250 lines, linking each page of docs/; every
relative link in the README and in docs/*.md reaches a file that exists, and every `#anchor` a heading of
that file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import ROOT

PAGES = sorted((ROOT / "docs").glob("*.md"))
DOCUMENTS = [ROOT / "README.md", *PAGES]
FENCE = re.compile(r"^```.*?^```[^\n]*$", re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code, where a link is a link."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def anchors(path: Path) -> set[str]:
    """The `#anchor`s GitHub gives the headings of a Markdown file (repeats get -1, -2, ...)."""
    found: set[str] = set()
    counts: dict[str, int] = {}
    for line in FENCE.sub("", path.read_text()).splitlines():
        match = re.match(r"^#{1,6} +(.*?) *#*$", line)
        if match:
            slug = re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-")
            repeat = counts.get(slug, 0)
            counts[slug] = repeat + 1
            found.add(f"{slug}-{repeat}" if repeat else slug)
    return found


def links(path: Path) -> list[str]:
    return [target for target in LINK.findall(prose(path.read_text())) if not re.match(r"^[a-z]+:", target)]


def test_the_readme_is_a_front_page() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail to docs/"


def test_the_readme_links_every_page_and_every_page_links_back() -> None:
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in links(ROOT / "README.md")}
    assert [page.name for page in PAGES if page.resolve() not in linked] == []
    assert [page.name for page in PAGES if "../README.md" not in links(page)] == []


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_reaches_a_file_and_a_heading(document: Path) -> None:
    broken = []
    for target in links(document):
        name, _, anchor = target.partition("#")
        path = (document.parent / name).resolve() if name else document
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (path.suffix != ".md" or anchor not in anchors(path)):
            broken.append(f"{target}: no such heading in {path.name}")
    assert broken == []


def test_anchors_are_made_as_github_makes_them(tmp_path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Precision: `--dtype`\n\n## The `rm-url` protocol\n```\n# no heading\n```\n## Notes\n## Notes\n")
    assert anchors(page) == {"precision---dtype", "the-rm-url-protocol", "notes", "notes-1"}
