"""The documentation holds together: every relative link in README.md, docs/*.md and benchmarks/README.md points at
a file that exists and, with an #anchor, at a heading of the target (the ids GitHub gives headings); README.md stays
a short front page that indexes every page of docs/."""

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)
INLINE_LINK = re.compile(r"""
    !?\[ (?:[^\[\]] | \[[^\[\]]*\])* \]        # [text] or ![alt], one level of nested brackets
    \( \s* (<[^>]*> | [^)\s]*)                   # (target or (<target>
    (?: \s+ (?:"[^"]*" | '[^']*' | \([^)]*\)) )?  # an optional title
    \s* \)""", re.VERBOSE)
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
IGNORED_SCHEMES = ("http://", "https://", "mailto:")


def prose_lines(text: str):
    """(line number, line) of every line outside fenced code blocks."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        opening = FENCE.match(line)
        if fence is None:
            if opening:
                fence = opening.group(1)
            else:
                yield number, line
        elif opening and opening.group(1)[0] == fence[0] and len(opening.group(1)) >= len(fence) \
                and not line.strip()[len(opening.group(1)):].strip():
            fence = None


def github_slug(heading: str) -> str:
    """The id GitHub gives a heading: its rendered text lower-cased, every character that is not a letter, digit,
    underscore, hyphen or space removed, and each space turned into a hyphen."""
    text = re.sub(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\([^)]*\)", r"\1", heading)  # a link's text stays
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The heading ids of a Markdown file; a repeated id gets -1, -2, ... as on GitHub."""
    taken: dict[str, int] = {}
    ids = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug = github_slug(match.group(2))
        while slug in taken:
            taken[base] += 1
            slug = f"{base}-{taken[base]}"
        taken[slug] = 0
        ids.add(slug)
    return ids


def paragraphs(text: str):
    """(first line number, text) of each run of prose lines, so that a link whose text wraps is still seen."""
    block: list[str] = []
    first = previous = 0
    for number, line in prose_lines(text):
        if block and (number != previous + 1 or not line.strip()):
            yield first, "\n".join(block)
            block = []
        if line.strip():
            first = number if not block else first
            block.append(line)
        previous = number
    if block:
        yield first, "\n".join(block)


def links(text: str):
    """(line number, target) of every link and image outside code blocks and code spans."""
    for first, block in paragraphs(text):
        block = CODE_SPAN.sub(lambda span: "\n" * span.group(0).count("\n"), block)  # keeps the line count
        for offset, line in enumerate(block.split("\n")):
            definition = REFERENCE_DEFINITION.match(line)
            if definition:
                yield first + offset, definition.group(1).strip("<>")
        for match in INLINE_LINK.finditer(block):
            yield first + block.count("\n", 0, match.start()), match.group(1).strip("<>")


def broken_links(path: Path) -> list[str]:
    """One line per relative link of `path` whose file does not exist or whose #anchor names no heading there."""
    problems = []
    for number, target in links(path.read_text(encoding="utf-8")):
        if not target or target.lower().startswith(IGNORED_SCHEMES):
            continue
        file_part, _, anchor = target.partition("#")
        destination = (path.parent / unquote(file_part)) if file_part else path
        where = f"{path.name}:{number}: {target}"
        if not destination.exists():
            problems.append(f"{where}: no such file {file_part}")
        elif anchor:
            if destination.suffix != ".md" or not destination.is_file():
                problems.append(f"{where}: an anchor into {file_part}, which is not a Markdown file")
            elif unquote(anchor) not in anchors(destination):
                problems.append(f"{where}: {destination.name} has no heading with the id #{anchor}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_resolves(page):
    assert page.is_file(), page
    assert broken_links(page) == []


def test_the_checker_finds_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Usage: `--flag`\n\n## Usage: `--flag`\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n"
        "## Set-up & install\n\n"
        "Fine: [self](#set-up--install), [other](other.md), [heading](other.md#usage---flag),\n"
        "[repeated heading](other.md#usage---flag-1), [web](https://example.com/x.md#nope),\n"
        "[mail](mailto:someone@example.com), `[in a code span](missing.md)`.\n\n"
        "```markdown\n[in a code block](missing.md)\n```\n\n"
        "Broken: [no file](missing.md), [no heading](other.md#install), [no heading here](#usage), [a link whose\n"
        "text wraps](gone.md).\n\n"
        "[ref]: gone/away.md\n")
    problems = broken_links(page)
    assert problems == [
        "page.md:13: missing.md: no such file missing.md",
        "page.md:13: other.md#install: other.md has no heading with the id #install",
        "page.md:13: #usage: page.md has no heading with the id #usage",
        "page.md:13: gone.md: no such file gone.md",
        "page.md:16: gone/away.md: no such file gone/away.md",
    ]


def test_github_slugs():
    assert github_slug("Outputs in `--output-dir`") == "outputs-in---output-dir"
    assert github_slug("LoRA: the recipe on one GPU") == "lora-the-recipe-on-one-gpu"
    assert github_slug("The phi-2-dpo recipe") == "the-phi-2-dpo-recipe"
    assert github_slug("`dpo_loss` and [links](x.md)") == "dpo_loss-and-links"


def test_readme_is_a_short_front_page_that_indexes_the_docs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) < 250, "README.md is the front page: move detail into docs/"
    linked = {target.partition("#")[0] for _, target in links(readme)}
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{page.name}" in linked, f"README.md does not link docs/{page.name}"


def test_the_layout_page_names_every_module():
    """docs/layout.md's module table has a row for every module of the package and every top-level script."""
    page = (ROOT / "docs" / "layout.md").read_text()
    modules = [f"dpo/{p.name}" for p in (ROOT / "dpo").glob("*.py") if p.name != "__init__.py"]
    missing = [m for m in modules + ["train.py", "generate.py"] if f"`{m}`" not in page]
    assert not missing, f"docs/layout.md does not describe {missing}"
