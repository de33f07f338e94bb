"""The user's guide stays true to the code: every CLI flag, Make variable and target-file key is documented,
every link and cited section exists, and the pages speak of the product only."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from exporter import cli, targets
from exporter.quant import SCHEMES

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
TARGETS_PAGE = ROOT / "docs" / "targets-and-quantisation.md"
# Make variables a user sets on the command line; the Makefile may define more (all are checked below).
USER_MAKE_VARIABLES = {"TARGET", "MODEL", "OUTPUT", "ARGS", "DEVICES", "DEVICE", "BASELINE", "BENCH_RUNS",
                       "PYTEST_ARGS", "DIR"}


def _text(paths: list[Path]) -> str:
    return "\n".join(path.read_text() for path in paths)


def _has_token(text: str, token: str) -> bool:
    """``token`` as a whole word: `--device` is not found inside `--devices`, nor `-t` inside `--target`."""
    return re.search(rf"(?<![\w-]){re.escape(token)}(?![\w-])", text) is not None


def _section(text: str, heading: str) -> str:
    """The body of a level-2 section, up to the next level-2 heading."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README.md has no section '## {heading}'"
    return match.group(1)


def _subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser) for the program and every subcommand, nested ones too (`devices check`)."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subcommands(sub, (*path, name))


def _options() -> list[tuple[str, str]]:
    found = []
    for path, parser in _subcommands(cli._parser()):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            found += [(" ".join(("edgeship", *path)), option) for option in action.option_strings]
    return found


def test_every_cli_option_is_documented() -> None:
    options = _options()
    assert ("edgeship export", "--sequential") in options  # the walk reaches subcommands
    assert ("edgeship devices check", "--known-hosts") in options  # and nested ones
    text = _text(PAGES)
    missing = [f"{command} {option}" for command, option in options if not _has_token(text, option)]
    assert not missing, f"options of the CLI that neither README.md nor docs/*.md mention: {missing}"


def test_every_cli_command_is_documented() -> None:
    text = _text(PAGES)
    commands = [" ".join(("edgeship", *path)) for path, parser in _subcommands(cli._parser()) if path]
    commands = [c for c in commands if not any(other.startswith(c + " ") for other in commands)]  # leaves only
    missing = [command for command in commands if command not in text]
    assert not missing, f"commands that neither README.md nor docs/*.md mention: {missing}"


def _make_variables() -> set[str]:
    """Variables the Makefile lets a user set: its `?=` defaults, and those it reads but never assigns (DIR)."""
    makefile = (ROOT / "Makefile").read_text()
    defaults = set(re.findall(r"^([A-Za-z_]\w*)\s*\?=", makefile, re.M))
    assigned = set(re.findall(r"^([A-Za-z_]\w*)\s*(?::=|\?=|\+=|=)", makefile, re.M))
    read = set(re.findall(r"\$\(([A-Z_][A-Z0-9_]*)\)", makefile))
    return defaults | (read - assigned)


def test_every_make_variable_is_in_the_make_reference() -> None:
    variables = _make_variables()
    assert USER_MAKE_VARIABLES <= variables, f"not in the Makefile any more: {USER_MAKE_VARIABLES - variables}"
    reference = _section(README.read_text(), "Make reference")
    missing = sorted(v for v in variables if not re.search(rf"(?<![A-Z_]){v}(?![A-Z_])", reference))
    assert not missing, f"Make variables missing from README.md's Make reference: {missing}"


def test_every_make_target_is_in_the_make_reference() -> None:
    phony = re.search(r"^\.PHONY:(.*)$", (ROOT / "Makefile").read_text(), re.M).group(1).split()
    reference = _section(README.read_text(), "Make reference")
    missing = [name for name in phony if f"`{name}`" not in reference]
    assert not missing, f"make targets missing from README.md's Make reference: {missing}"


def test_every_target_file_key_is_documented() -> None:
    """Each key the loader accepts is shown as TOML (`key = ...`, `[[artifact]]`, `[artifact.parity]`)."""
    page = TARGETS_PAGE.read_text()
    keys = {*targets._TOP_KEYS, *targets._ARTIFACT_KEYS, *targets._PARITY_KEYS}
    assert {"description", "artifact", "quant", "parity", "min_cosine", "embedding_quant"} <= keys
    missing = sorted(key for key in keys
                     if not re.search(rf"^\s*{key}\s*=|^\[\[?(?:artifact\.)?{key}\]", page, re.M))
    assert not missing, f"target-file keys missing from {TARGETS_PAGE.name}: {missing}"
    schemes = sorted(name for name in SCHEMES if f"`{name}`" not in page)
    assert not schemes, f"quantisation schemes missing from {TARGETS_PAGE.name}: {schemes}"


def test_readme_lists_every_target_with_its_description() -> None:
    readme = _section(README.read_text(), "Targets")
    for name in targets.known_targets():
        description = targets.load_target(name).description
        assert f"| `{name}` | {description} |" in readme, f"README.md's Targets table: {name}: {description!r}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_pages_speak_of_the_product_only(page: Path) -> None:
    text = page.read_text()
    for word in ("session", "issue's", "FIELD_NOTES", "../shared"):
        assert word.lower() not in text.lower(), f"{page.name} mentions {word!r}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _headings(page: Path) -> list[str]:
    """Heading texts outside fenced code blocks (a shell comment is no heading), backticks removed."""
    found, fenced = [], False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"#{1,6} (.+)", line)):
            found.append(match.group(1).replace("`", "").strip())
    return found


def _anchors(page: Path) -> set[str]:
    anchors, seen = set(), {}
    for heading in _headings(page):
        slug = _slug(heading)
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_reach_a_file_and_heading_that_exist(page: Path) -> None:
    for link in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+:", link):
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f"{page.name}: link to a missing file: {link}"
        if anchor:
            assert anchor in _anchors(target), f"{page.name}: link to a missing heading: {link}"


CITING_FILES = [*sorted((ROOT / "targets").glob("*.toml")), ROOT / "devices.example.toml"]


@pytest.mark.parametrize("path", CITING_FILES, ids=lambda p: p.name)
def test_comments_cite_sections_that_exist(path: Path) -> None:
    """A target file's comment that points at a page and section points at one that is there."""
    text = re.sub(r"\n#\s*", " ", path.read_text())  # a citation may wrap onto the next comment line
    for page, section in re.findall(r"(docs/[\w-]+\.md|README\.md|README):? \"([^\"]+)\"", text):
        page = "README.md" if page == "README" else page
        assert (ROOT / page).exists(), f"{path.name}: cites a missing page: {page}"
        assert section in _headings(ROOT / page), f"{path.name}: cites a missing section: {page} \"{section}\""
    assert not re.search(r"see README\b(?!\.md \")", text), f"{path.name}: 'see README' names no section"
