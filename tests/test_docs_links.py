"""README.md and docs/*.md hold together: every relative link and image resolves to a file of the repository, every
link's #anchor names a heading of its target page (GitHub's heading ids), every docs page is linked from README,
and README stays a front door of at most 250 lines."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")  # [text](target) and ![alt](target)
HTML_SRC = re.compile(r"<(?:img|a)\b[^>]*\b(?:src|href)=\"([^\"]+)\"", re.I)
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def prose(page: Path) -> str:
    """The page without fenced code blocks and inline code, where brackets are code, not links."""
    return INLINE_CODE.sub("", FENCE.sub("", page.read_text(encoding="utf-8")))


def links(page: Path) -> list[str]:
    text = prose(page)
    return LINK.findall(text) + HTML_SRC.findall(text)


def is_external(target: str) -> bool:
    return re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) is not None  # http:, https:, mailto:, …


def heading_ids(page: Path) -> set[str]:
    """GitHub's ids for a page's headings: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    ids, seen = set(), {}
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose(page), re.M):
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a linked heading's id is its text's
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        ids.add(slug if count == 0 else f"{slug}-{count}")
    return ids


def broken_links(page: Path, root: Path = REPO) -> list[str]:
    """Each relative link of ``page`` whose file does not exist or lies outside ``root``, or whose #anchor is not a
    heading there."""
    problems = []
    for target in links(page):
        if is_external(target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        where = f"{page.relative_to(root)}: ({target})"
        if not resolved.exists():
            problems.append(f"{where} names a missing file")
        elif anchor and resolved.suffix == ".md" and anchor not in heading_ids(resolved):
            problems.append(f"{where}: {resolved.name} has no heading with the id #{anchor}")
        elif root not in resolved.parents:
            problems.append(f"{where} points outside the repository")
    return problems


def test_every_relative_link_and_image_resolves():
    assert len(pages()) >= 2, "docs/ has no pages"
    assert sum(len(links(page)) for page in pages()) >= 20, "found almost no links: is the link pattern right?"
    problems = [problem for page in pages() for problem in broken_links(page)]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_a_broken_link_is_reported(tmp_path):
    """The checker itself fails on a missing file, a missing anchor and a missing image."""
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## A section, with words\n\n[ok](#a-section-with-words) [ok](page.md#title)\n"
                    "[gone](missing.md) [bad anchor](#no-such-heading) ![img](assets/none.png)\n"
                    "```\n[in code](not-a-link.md)\n```\n", encoding="utf-8")
    problems = broken_links(page, root=tmp_path)
    assert len(problems) == 3, problems
    assert any("missing.md" in p for p in problems) and any("no-such-heading" in p for p in problems)
    assert any("none.png" in p for p in problems)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(REPO / target.partition("#")[0]).resolve() for target in links(REPO / "README.md")
              if not is_external(target)}
    missing = [page.name for page in sorted((REPO / "docs").glob("*.md")) if page.resolve() not in linked]
    assert not missing, f"README.md does not link docs/{missing}"


def test_readme_is_at_most_250_lines():
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move details into docs/ (limit {README_MAX_LINES})"
