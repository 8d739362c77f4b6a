"""Every relative link in the README and docs/ names a file that exists, and every anchor into a markdown
page names one of its headings (GitHub's slugs)."""

from __future__ import annotations

import functools
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@functools.cache  # read each page once, not once per link into it
def anchors(page: Path) -> set[str]:
    """GitHub's heading ids of ``page``: lowercased, punctuation dropped, spaces to hyphens, repeats ``-1``, ..."""
    seen: dict[str, int] = {}
    fenced = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if fenced or not (m := re.match(r"#{1,6} (.+)", line)):
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower().replace("`", "")).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        if seen[slug]:
            seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


def test_slugs_follow_github():
    ids = anchors(ROOT / "docs" / "byzantine.md")
    assert "mnist-at-400-rounds-every-attack" in ids  # "## MNIST at 400 rounds, every attack"
    ids = anchors(ROOT / "docs" / "faults.md")
    assert "partial-rounds-min-batch-fraction-round-retries-max-failed-rounds" in ids
    assert "-the-machine-dies-at-round-237-" not in ids  # a comment in a code block is not a heading


def test_relative_links_and_anchors_resolve():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            name, _, anchor = target.partition("#")
            path = (page.parent / name).resolve() if name else page
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)
