"""The documentation (README.md, docs/*.md) stays true to the repository.

* docs/cli.md is exactly what scripts/render_cli.py renders from the argument parser, so a
  change to the command line without re-rendering fails here; every subcommand and option
  appears in it.
* Every relative link of README.md and docs/*.md points to a file of the repository.
* No sentence speaks of the project's history ("so far", issue numbers, ...) or refers to
  a file outside the repository.
* README.md stays short (at most 250 lines), opens with its two commands and links to the
  documentation pages; each generated section lives in exactly one file, the one its
  renderer writes.

The Python blocks of docs/*.md run in tests/test_readme.py, with those of README.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
IDS = [str(p.relative_to(ROOT)) for p in PAGES]


def _render_cli():
    spec = importlib.util.spec_from_file_location("render_cli", ROOT / "scripts" / "render_cli.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def render_cli():
    return _render_cli()


def test_cli_md_is_the_rendering_of_the_parser(render_cli):
    fresh = render_cli.render()
    on_disk = (ROOT / "docs" / "cli.md").read_text()
    assert on_disk == fresh, "docs/cli.md is stale: run python scripts/render_cli.py"


def test_every_subcommand_and_option_is_in_cli_md(render_cli):
    from undiscard.cli import build_parser

    text = (ROOT / "docs" / "cli.md").read_text()
    subs = render_cli.subcommands(build_parser())
    assert len(subs) >= 10, sorted(subs)
    for name, (_, sp) in subs.items():
        head = f"\n## undiscard {name}\n"
        assert head in text, f"docs/cli.md has no section for `undiscard {name}`"
        section = text.split(head, 1)[1].split("\n## ", 1)[0]
        for action in sp._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            for opt in action.option_strings or [render_cli.invocation(action)]:
                assert opt in section, f"docs/cli.md, `undiscard {name}`: {opt} is missing"


def test_the_cli_renderer_reads_the_parser_not_a_copy(render_cli, monkeypatch):
    """A new option shows up in the rendering (so the equality test above would fail)."""
    import undiscard.cli

    def parser_with_extra():
        p = undiscard.cli.build_parser()
        render_cli.subcommands(p)["sites"][1].add_argument("--brand-new-option", help="added by the test")
        return p

    monkeypatch.setattr(render_cli, "build_parser", parser_with_extra)
    assert "`--brand-new-option BRAND_NEW_OPTION` |  | added by the test |" in render_cli.render()


# ------------------------------------------------------------------ links

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _without_code(text: str) -> str:
    """The text with fenced blocks and inline code removed (links inside code are not links)."""
    text = re.sub(r"^\s*```.*?^\s*```\s*$", "", text, flags=re.DOTALL | re.MULTILINE)
    return re.sub(r"`[^`\n]*`", "", text)


def relative_links(text: str) -> list[str]:
    out = []
    for target in LINK.findall(_without_code(text)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
            continue  # http:, https:, mailto:, or an anchor on the same page
        out.append(target)
    return out


def test_relative_links_are_found():
    text = "see [a](docs/a.md), ![p](results/p.png), [b](http://x.org), [c](#here), `[d](e.md)`, [f](g.md#h)"
    assert relative_links(text) == ["docs/a.md", "results/p.png", "g.md#h"]


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_every_relative_link_points_to_a_file_of_the_repository(page):
    broken = []
    for target in relative_links(page.read_text()):
        path = (page.parent / target.split("#", 1)[0]).resolve()
        if not path.is_relative_to(ROOT) or not path.exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: links to missing or outside files: {broken}"


# ------------------------------------------------------------------ wording

#: history wording: the documentation describes the product as it is
HISTORY = [r"\bso far\b", r"\bas of now\b", r"\bfor now\b", r"\bnot yet\b", r"\bthis environment\b",
           r"\bissue\s*#", r"\bissues?\s+\d+", r"\bbrings?\b[^.\n]*\blater\b"]
#: files that are not part of the repository
OUTSIDE = [r"\bSPEC\b", r"\.\./shared", r"\bSTYLE\.md\b", r"paper-summary"]


def offending(text: str) -> list[str]:
    hits = []
    for pat in HISTORY:
        hits += [m.group(0) for m in re.finditer(pat, text, re.IGNORECASE)]
    for pat in OUTSIDE:
        hits += [m.group(0) for m in re.finditer(pat, text)]
    return hits


def test_the_wording_check_finds_history_and_outside_files():
    assert offending("Every state is a full forward here (issue 4 brings the shared-prefix engine).") == ["issue 4"]
    assert offending("So far it works; not yet on GPU; see SPEC §3 and ../shared/x") == [
        "So far", "not yet", "SPEC", "../shared"]
    assert offending("Fixed in issue #12; issue 20 brings it later. Read STYLE.md and paper-summary.md.") == [
        "issue #", "issue 20", "brings it later", "STYLE.md", "paper-summary"]
    assert offending("the rows already computed there; a spec string; the later segments") == []


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_no_history_wording_and_no_files_outside_the_repository(page):
    hits = offending(page.read_text())
    assert not hits, f"{page.relative_to(ROOT)}: {hits}"


# ------------------------------------------------------------------ the README and the generated sections

def test_readme_is_short_and_opens_with_its_two_commands():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines (at most 250)"
    top = "\n".join(lines[:12])
    assert "bash scripts/demo.sh" in top and "bash scripts/test.sh" in top


def test_readme_links_to_the_documentation():
    links = set(relative_links(README.read_text()))
    for page in ("method", "cli", "results", "benchmarks", "limits"):
        assert f"docs/{page}.md" in links, f"README.md does not link to docs/{page}.md"


#: generated section -> (the one file holding it, the script that writes it)
SECTIONS = {
    "headline": ("README.md", "scripts/render_study.py"),
    "results": ("docs/results-128px.md", "scripts/render_results.py"),
    "tta": ("docs/tta.md", "scripts/render_tta.py"),
    "seg": ("docs/segmentation.md", "scripts/render_seg.py"),
    "bench": ("docs/benchmarks.md", "scripts/bench.sh"),
}


@pytest.mark.parametrize("tag", sorted(SECTIONS))
def test_each_generated_section_is_in_the_file_its_renderer_writes(tag):
    where, writer = SECTIONS[tag]
    start = re.compile(rf"^<!-- {tag}:start( [^>]*)? -->$", re.MULTILINE)
    end = re.compile(rf"^<!-- {tag}:end -->$", re.MULTILINE)
    holders = [str(p.relative_to(ROOT)) for p in PAGES if start.search(p.read_text())]
    assert holders == [where], f"<!-- {tag}:start --> is in {holders}, expected only in {where}"
    text = (ROOT / where).read_text()
    assert len(start.findall(text)) == 1 and len(end.findall(text)) == 1
    assert start.search(text).start() < end.search(text).start()
    script = (ROOT / writer).read_text()
    assert (where == "README.md" and '"README.md"' in script) or where in script or Path(where).name in script, (
        f"{writer} does not write {where}")


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", _without_fences(text), re.MULTILINE)}


def _without_fences(text: str) -> str:
    return re.sub(r"^\s*```.*?^\s*```\s*$", "", text, flags=re.DOTALL | re.MULTILINE)


def test_anchors_follow_github():
    assert anchors("# A\n## Choosing on validation: `undiscard fit`\n```\n# not a heading\n```\n### Quick start: x") == {
        "a", "choosing-on-validation-undiscard-fit", "quick-start-x"}


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_every_link_to_a_heading_finds_it(page):
    missing = []
    for target in [*relative_links(page.read_text()),
                   *(t for t in LINK.findall(_without_code(page.read_text())) if t.startswith("#"))]:
        path, _, frag = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if frag and dest.suffix == ".md" and dest.exists() and frag not in anchors(dest.read_text()):
            missing.append(target)
    assert not missing, f"{page.relative_to(ROOT)}: links to headings that do not exist: {missing}"
