"""The README and docs/ hold together: every relative link reaches a file (and a heading, for
a #fragment), and the README stays a page a newcomer reads (at most 25 KB; the rest lives in docs/)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors: a heading lower-cased, punctuation dropped, spaces to hyphens."""
    return {re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    broken = []
    for link in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if link.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, fragment = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(link)
        elif fragment and target.suffix == ".md" and fragment not in heading_anchors(target.read_text()):
            broken.append(link)
    assert not broken, broken


def test_the_readme_is_short_and_points_to_every_doc():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 25 * 1024
    for doc in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{doc.name}" in readme, doc.name
    assert "make demo" in readme and "make test" in readme  # the two commands (.ci/run calls the second)
