"""Every relative link in the user docs leads somewhere.

The README is a short index of pages under `docs/`; a page moved or a heading renamed
would leave a reader at a dead link or an image that does not show. This test reads the
README, the package READMEs and every page under `docs/`, and checks that each relative
link names an existing file and, where it has a `#fragment`, a heading of that file
(anchors as GitHub derives them from headings).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted(
    [ROOT / "README.md", *ROOT.glob("packages/*/README.md"), *(ROOT / "docs").glob("*.md")]
)
# [text](target) and ![alt](target); the target ends at whitespace or the closing bracket.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks, where `#` starts a comment, not a heading."""
    lines, in_code = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            in_code = not in_code
        elif not in_code:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor of a Markdown file, with GitHub's -1, -2 suffixes for repeated headings."""
    seen: dict[str, int] = {}
    found = set()
    for line in prose_lines(path.read_text(encoding="utf-8")):
        match = re.match(r"^#{1,6}\s+(.*)$", line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def relative_links(path: Path) -> list[str]:
    """The links of a file that point inside the repository (no scheme, no mailto)."""
    targets = []
    for line in prose_lines(path.read_text(encoding="utf-8")):
        for target in LINK.findall(line):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):
                targets.append(target)
    return targets


def test_slug_matches_github_for_this_repositorys_headings() -> None:
    assert slug("Weights & Biases") == "weights--biases"
    assert slug("Demo (`make demo`)") == "demo-make-demo"
    assert slug("Progress in logs, versions, shell completion, JSON") == (
        "progress-in-logs-versions-shell-completion-json"
    )


def test_the_checker_sees_a_dead_link(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [dead](missing.md)\n```\n# not a heading\n```\n")
    assert relative_links(page) == ["#title", "missing.md"]
    assert anchors(page) == {"title"}


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path: Path) -> None:
    dead = []
    for target in relative_links(path):
        file_part, _, fragment = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            dead.append(f"{target}: no such file")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            dead.append(f"{target}: no heading #{fragment}")
    assert not dead, f"{path.relative_to(ROOT)}: " + "; ".join(dead)


def test_the_readme_stays_an_index() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) < 400
    for page in (ROOT / "docs").glob("*.md"):
        assert f"](docs/{page.name})" in readme, f"README does not link docs/{page.name}"


@pytest.mark.parametrize(
    ("package", "source"),
    [
        ("llama_train", ROOT / "packages/llama-train/src/llama_train"),
        ("gssm_data", ROOT / "packages/gssm-data/src/gssm_data"),
    ],
)
def test_the_design_gives_every_module_a_row(package, source):
    """docs/design.md, section Modules, names each module (a package by its folder)."""
    design = (ROOT / "docs/design.md").read_text()
    section = design[design.index(f"### {package}") :]
    section = re.split(r"\n##+ ", section[4:], maxsplit=1)[0]
    rows = set(re.findall(r"^\| `([^`]+)` \|", section, flags=re.MULTILINE))
    modules = set()
    for path in source.rglob("*.py"):
        relative = path.relative_to(source)
        if relative.name == "__init__.py" and len(relative.parts) > 1:
            modules.add("/".join(relative.parts[:-1]) + "/")
        else:
            modules.add(relative.as_posix())
    assert sorted(modules - rows) == [], "modules without a row in docs/design.md"
    assert sorted(rows - modules) == [], "rows in docs/design.md for modules that do not exist"
