"""The documentation stays true to the code and to the repository: the README's configuration table lists
exactly `service.config.VARIABLES` (names in order, defaults as parsed), no document points outside the
repository, and every relative link in README.md and docs/ leads to a file (and heading) that exists."""

import re
from pathlib import Path

import pytest

from service.config import VARIABLES

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
# Generated or third-party trees, and the model store (model cards are hashed artifacts, not documents).
SKIPPED_DIRS = {".venv", ".git", "models", "build", "dist", ".pytest_cache", "node_modules"}
FORBIDDEN = ("../shared", "/work/")
NO_DEFAULT = "(none)"  # how the table writes an empty default

FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def markdown_files() -> list[Path]:
    return sorted(
        p
        for p in REPO.rglob("*.md")
        if not SKIPPED_DIRS.intersection(p.relative_to(REPO).parts[:-1])
        and not any(part.endswith(".egg-info") for part in p.relative_to(REPO).parts)
    )


def config_table(text: str) -> list[tuple[str, str]]:
    """(name, default) of each row of the table under the README's "## Configuration" heading."""
    section = re.search(r"^## Configuration\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert section, "README.md has no '## Configuration' section"
    rows = []
    for line in section.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 3 or set(cells[0]) <= set("-: "):
            continue
        if cells[0] == "variable":  # the header row
            continue
        name, default = cells[0].strip("`"), cells[1]
        rows.append((name, "" if default == NO_DEFAULT else default.strip("`")))
    return rows


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(h) for h in HEADING.findall(FENCE.sub("", path.read_text()))}


def relative_links(path: Path) -> list[str]:
    text = CODE_SPAN.sub("code", FENCE.sub("", path.read_text()))
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.IGNORECASE)]


def linked_documents() -> list[Path]:
    return [README, *sorted((REPO / "docs").glob("*.md"))]


def test_configuration_table_lists_every_variable_in_order_with_its_default():
    table = config_table(README.read_text())
    assert [name for name, _ in table] == [v.name for v in VARIABLES]
    assert dict(table) == {v.name: v.default for v in VARIABLES}


def test_configuration_table_parser_sees_a_changed_default():
    text = README.read_text().replace("| `PORT` | `8000` |", "| `PORT` | `8001` |")
    assert dict(config_table(text))["PORT"] == "8001"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_document_points_outside_the_repository(path):
    text = path.read_text()
    for needle in FORBIDDEN:
        assert needle not in text, f"{path.relative_to(REPO)} mentions {needle!r}"


def test_the_documents_are_found():
    found = {str(p.relative_to(REPO)) for p in markdown_files()}
    assert {"README.md", "docs/README.md", "reliability/README.md"} <= found


@pytest.mark.parametrize("path", linked_documents(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path):
    broken = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(target)
    assert not broken, f"{path.relative_to(REPO)}: broken links {broken}"
