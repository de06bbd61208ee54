"""The user docs: README.md stays short, docs/cli.md matches the commands' own help, links resolve, and
no page points at a folder a plain clone does not have."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer

from charrnn import clidoc

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(page: Path) -> str:
    """The page without its fenced code blocks (links there are examples, not links)."""
    return re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for the page's headings: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in prose(page).splitlines():
        m = re.match(r"#+\s+(.*)", line)
        if m:
            out.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return out


def test_cli_reference_is_up_to_date():
    page = (REPO / "docs" / "cli.md").read_text(encoding="utf-8")
    if page != clidoc.render():
        pytest.fail(f"docs/cli.md is out of date: run {clidoc.COMMAND}", pytrace=False)


def test_cli_reference_shows_every_command_and_changes_with_the_help():
    """The mechanism on an app of its own: every command and sub-command gets its section, in order,
    with its options' help, so a changed option cannot leave the page as it was."""
    def build(help_text: str) -> typer.Typer:
        app = typer.Typer(help="A tool.")
        group = typer.Typer(help="A group.")
        app.add_typer(group, name="things")

        @app.command()
        def first(n: int = typer.Option(3, help=help_text)):
            """The first command."""

        @group.command("list")
        def things_list():
            """List the things."""

        return app

    page = clidoc.render(build("How many."), "tool")
    headings = [line for line in page.splitlines() if line.startswith("## ")]
    assert headings == ["## tool", "## tool first", "## tool things", "## tool things list"]
    assert "How many." in page and "[default: 3]" in page and "List the things." in page
    assert clidoc.render(build("How many, at most.")) != clidoc.render(build("How many."))
    # the real app: each of its commands has a section
    real = clidoc.render()
    for name in ["train", "sample", "eval", "gradients", "bench", "checkpoints prune", "corpus get", "neuron find"]:
        assert f"\n## charrnn {name}\n" in real


def test_readme_is_short():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move the detail to a page under docs/"


def test_no_page_points_at_the_shared_folder():
    """A user's clone has no ../shared: corpora come from 'charrnn corpus get NAME'."""
    bad = [p.relative_to(REPO) for p in PAGES if "../shared" in p.read_text(encoding="utf-8")]
    assert not bad, f"{bad} mention ../shared; use 'charrnn corpus get NAME' and corpora/FILE instead"


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in LINK.findall(prose(page)):
            if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken
