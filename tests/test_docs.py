"""The documentation stays true: the README's front door, links, CLI options and the findings table.

README.md is the front door and docs/ the manual. These tests fail when a page links to a file or
a heading that is gone, when docs/cli.md names a command or an option the CLI does not have
(taken from the click commands themselves, not from --help text), and when the findings table
in docs/findings.md no longer equals the rule catalogue in tiecheck.findings. Example command
lines on every page, and the tests/ and benchmarks/ files named in the text, are checked too.
"""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from tiecheck.cli import main
from tiecheck.findings import RULES

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
CLI_DOC = DOCS / "cli.md"
FINDINGS_DOC = DOCS / "findings.md"
PAGES = [README, *sorted(DOCS.glob("*.md")), ROOT / "benchmarks" / "README.md"]

FIRST_COMMANDS = [
    'pip install torch==2.13.0 && pip install -e ".[test]" && tiecheck inspect gpt-mini',
    "pytest",
]
MAX_README_LINES = 200


# --- reading Markdown ----------------------------------------------------------------------------


def scan(text: str) -> list[tuple[str, bool]]:
    """Each line with whether it lies inside a fenced code block (fence lines count as inside)."""
    out, fence = [], None
    for line in text.splitlines():
        stripped = line.lstrip()
        if fence is None and stripped.startswith(("```", "~~~")):
            fence = stripped[:3]
            out.append((line, True))
        elif fence is not None:
            out.append((line, True))
            if stripped.startswith(fence) and stripped.strip(fence[0]) == "":
                fence = None
        else:
            out.append((line, False))
    return out


def code_blocks(text: str) -> list[list[str]]:
    """The fenced code blocks of a page, each as its lines without the fences."""
    blocks, current = [], None
    for line, in_code in scan(text):
        if in_code and current is None:
            current = []
        elif in_code and line.lstrip().startswith(("```", "~~~")):
            blocks.append(current)
            current = None
        elif in_code:
            current.append(line)
    return blocks


CODE_SPAN = re.compile(r"(`+)(.+?)\1")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def code_spans(line: str) -> list[str]:
    return [m.group(2).strip() for m in CODE_SPAN.finditer(line)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped (not hyphens, spaces or
    underscores), each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a page, numbered -1, -2, ... on repeats as GitHub does."""
    seen: dict[str, int] = {}
    out = set()
    for line, in_code in scan(path.read_text(encoding="utf-8")):
        m = None if in_code else HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s+<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def relative_links(path: Path) -> list[str]:
    """Link targets of a page that are neither URLs nor inside code."""
    out = []
    for line, in_code in scan(path.read_text(encoding="utf-8")):
        if in_code:
            continue
        plain = CODE_SPAN.sub("", line)
        found = LINK.findall(plain)
        ref = REFERENCE.match(plain)
        if ref:
            found.append(ref.group(1))
        out += [t for t in found if not SCHEME.match(t)]
    return out


def table_rows(lines: list[tuple[str, bool]], start: int) -> tuple[list[str], list[list[str]], int]:
    """The table whose header is lines[start]: its header cells, its rows and the line after it."""

    def cells(line: str) -> list[str]:
        parts = re.split(r"(?<!\\)\|", line.strip())
        return [c.strip() for c in parts[1:-1]]

    header = cells(lines[start][0])
    i, rows = start + 2, []
    while i < len(lines) and not lines[i][1] and lines[i][0].lstrip().startswith("|"):
        rows.append(cells(lines[i][0]))
        i += 1
    return header, rows, i


def is_table_start(lines: list[tuple[str, bool]], i: int) -> bool:
    return (not lines[i][1] and lines[i][0].lstrip().startswith("|") and i + 1 < len(lines)
            and re.match(r"^\s*\|(\s*:?-+:?\s*\|)+\s*$", lines[i + 1][0]) is not None)


# --- 1. the front door -----------------------------------------------------------------------------


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; move detail into docs/ (at most {MAX_README_LINES})"


def test_readme_starts_with_the_two_commands():
    text = README.read_text(encoding="utf-8")
    lines = scan(text)
    assert lines[0][0].startswith("# "), "README.md starts with its title"
    first_code = next(i for i, (_, in_code) in enumerate(lines) if in_code)
    first_section = next((i for i, (line, in_code) in enumerate(lines) if not in_code and line.startswith("## ")),
                         len(lines))
    assert first_code < first_section, "the two commands come before the first section"
    assert code_blocks(text)[0] == FIRST_COMMANDS


def test_readme_documentation_section_links_every_page():
    lines = scan(README.read_text(encoding="utf-8"))
    start = next(i for i, (line, in_code) in enumerate(lines) if not in_code and line.strip() == "## Documentation")
    section = []
    for line, in_code in lines[start + 1:]:
        if not in_code and line.startswith("## "):
            break
        section.append(line)
    linked = {(README.parent / t.split("#")[0]).resolve() for t in LINK.findall("\n".join(section))}
    missing = [p.relative_to(ROOT).as_posix() for p in [*DOCS.glob("*.md"), ROOT / "benchmarks" / "README.md"]
               if p.resolve() not in linked]
    assert not missing, f"README.md's Documentation section does not link {missing}"


# --- 2. links --------------------------------------------------------------------------------------


def test_slug_follows_github():
    assert slug("Policy: `[tool.tiecheck]` in pyproject.toml") == "policy-tooltiecheck-in-pyprojecttoml"
    assert slug("`tiecheck check`") == "tiecheck-check"
    assert slug("JSON schema (`schema_version` 1)") == "json-schema-schema_version-1"
    assert slug("What needs an opt-in, and why") == "what-needs-an-opt-in-and-why"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    assert page.exists(), f"{page.relative_to(ROOT)} is missing"
    broken = []
    for target in relative_links(page):
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with the anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"broken links in {page.relative_to(ROOT)}:\n  " + "\n  ".join(broken)


# --- 3. commands and options ----------------------------------------------------------------------


def params_of(name: str | None) -> dict[str, click.Parameter]:
    """Every option string of a command (or of the group, for None), --help included."""
    # make_context applies each command's context_settings (-h beside --help); resilient parsing
    # leaves out the required arguments.
    with main.make_context("tiecheck", [], resilient_parsing=True) as parent:
        cmd = main if name is None else main.commands[name]
        ctx = parent if name is None else cmd.make_context(name, [], parent=parent, resilient_parsing=True)
        out = {}
        for p in cmd.get_params(ctx):
            if isinstance(p, click.Option):
                for opt in [*p.opts, *p.secondary_opts]:
                    out[opt] = p
        return out


OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")


def check_choice(where: str, command: str | None, param: click.Parameter, value: str) -> list[str]:
    """A documented value list (`a|b|c`) must equal the option's choices; one value must be among them."""
    if not isinstance(param.type, click.Choice):
        return []
    values = [v for v in re.split(r"\\?\|", value.strip("[]")) if v]
    choices = set(param.type.choices)
    if "|" in value and set(values) != choices:
        return [f"{where}: {param.opts[0]} of {command or 'tiecheck'} takes {sorted(choices)}, "
                f"the doc says {values}"]
    if "|" not in value and values and values[0] not in choices and not values[0].isupper():
        return [f"{where}: {param.opts[0]} of {command or 'tiecheck'} has no choice {values[0]!r}"]
    return []


def check_command_line(where: str, line: str) -> list[str]:
    """A `tiecheck CMD ...` line: CMD must exist, and every option of it, with its documented values."""
    words = re.split(r"\s+#\s", " " + line)[0].split()
    if len(words) < 2 or words[0] != "tiecheck":
        return []
    command = None if words[1].startswith("-") else words[1]
    if command is not None and command not in main.commands:
        return [f"{where}: `tiecheck {command}`: there is no such command ({sorted(main.commands)})"]
    known, problems = params_of(command), []
    for i, word in enumerate(words[1:] if command is None else words[2:]):
        m = OPTION.match(word.lstrip("["))
        if not m:
            continue
        opt = m.group(1)
        if opt not in known:
            problems.append(f"{where}: `tiecheck {command or ''}` has no option {opt}")
            continue
        rest = words[i + 2 if command is None else i + 3:]
        if rest and not known[opt].is_flag:
            problems += check_choice(where, command, known[opt], rest[0].rstrip("]"))
    return problems


def command_lines(text: str) -> list[tuple[int, str]]:
    """Lines of code blocks that start with `tiecheck`, continuation lines joined, with line numbers."""
    out: list[tuple[int, str]] = []
    lines = scan(text)
    for n, (line, in_code) in enumerate(lines, start=1):
        if not in_code:
            continue
        if line.startswith("tiecheck ") or line.strip() == "tiecheck":
            out.append((n, line))
        elif out and out[-1][0] == n - 1 and line[:1].isspace() and line.strip():
            out[-1] = (n, out[-1][1].rstrip("\\ ") + " " + line.strip())  # a continuation
    return out


def span_commands(text: str) -> list[tuple[int, str]]:
    out = []
    for n, (line, in_code) in enumerate(scan(text), start=1):
        if not in_code:
            out += [(n, s) for s in code_spans(line) if re.match(r"tiecheck(\s|$)", s)]
    return out


def cli_doc_problems(text: str) -> list[str]:
    """Everything in docs/cli.md that names a command or an option the CLI does not have."""
    problems = []
    for n, line in command_lines(text) + span_commands(text):
        problems += check_command_line(f"cli.md:{n}", line)
    lines, current, i = scan(text), None, 0
    while i < len(lines):
        line, in_code = lines[i]
        heading = None if in_code else HEADING.match(line)
        if heading:
            named = re.search(r"tiecheck\s+([a-z][\w-]*)", heading.group(2).replace("`", ""))
            if named:
                current = named.group(1)
                if current not in main.commands:
                    problems.append(f"cli.md:{i + 1}: heading for `tiecheck {current}`, which is no command")
            elif len(heading.group(1)) <= 2:
                current = None
        if is_table_start(lines, i):
            header, rows, after = table_rows(lines, i)
            if header and header[0].lower() == "option":
                if current not in main.commands:
                    problems.append(f"cli.md:{i + 1}: an options table outside any command's section")
                else:
                    known = params_of(current)
                    for r, row in enumerate(rows):
                        where = f"cli.md:{i + 3 + r}"
                        cell = row[0]
                        opts = OPTION.findall(CODE_SPAN.sub(lambda m: " " + m.group(2) + " ", cell))
                        if not opts:
                            problems.append(f"{where}: an options row that names no option: {cell}")
                        for opt in opts:
                            if opt not in known:
                                problems.append(f"{where}: `tiecheck {current}` has no option {opt}")
                        for span in code_spans(cell):
                            words = span.split()
                            if len(words) == 2 and words[0] in known and not known[words[0]].is_flag:
                                problems += check_choice(where, current, known[words[0]], words[1])
            i = after
            continue
        i += 1
    return problems


def test_cli_doc_names_only_real_commands_and_options():
    problems = cli_doc_problems(CLI_DOC.read_text(encoding="utf-8"))
    assert not problems, "docs/cli.md disagrees with the CLI:\n  " + "\n  ".join(problems)


def test_cli_doc_has_a_section_and_an_options_table_per_command():
    text = CLI_DOC.read_text(encoding="utf-8")
    for name in main.commands:
        assert f"## `tiecheck {name}`" in text, f"docs/cli.md has no section for `tiecheck {name}`"
        result = CliRunner().invoke(main, [name, "--help"])
        assert result.exit_code == 0, result.output


def test_cli_doc_check_catches_a_bogus_option():
    text = CLI_DOC.read_text(encoding="utf-8")
    in_table = text.replace("| `--no-flops` |", "| `--no-flops`, `--no-such-option` |", 1)
    assert in_table != text
    assert any("--no-such-option" in p for p in cli_doc_problems(in_table))
    in_code = text.replace("tiecheck check --format github", "tiecheck check --format github --bogus", 1)
    assert in_code != text
    assert any("--bogus" in p for p in cli_doc_problems(in_code))
    wrong_choice = text.replace("`--format text\\|github\\|json`", "`--format text\\|gitlab\\|json`", 1)
    assert wrong_choice != text
    assert any("gitlab" in p for p in cli_doc_problems(wrong_choice))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_command_examples_use_real_commands_and_options(page):
    text = page.read_text(encoding="utf-8")
    problems = []
    for n, line in command_lines(text) + span_commands(text):
        problems += [p.replace("cli.md", page.relative_to(ROOT).as_posix(), 1)
                     for p in check_command_line(f"cli.md:{n}", line)]
    assert not problems, "\n  ".join(problems)


def options_outside_tiecheck() -> set[str]:
    """Options the pages name that belong to other programs: the pytest plugin's, the mutation
    runner's and the benchmark scripts' (read from their own code), torchrun's, and pytest-benchmark's
    namespace."""
    plugin = (ROOT / "tiecheck" / "pytest_plugin" / "plugin.py").read_text(encoding="utf-8")
    scripts = [ROOT / "tests" / "mutation" / "mutants.py", *sorted((ROOT / "benchmarks").glob("*.py"))]
    argparse_options = [o for p in scripts for o in re.findall(r'add_argument\("(--[\w-]+)"', p.read_text("utf-8"))]
    found = re.findall(r'addoption\("(--[\w-]+)"', plugin) + argparse_options
    return set(found) | {"--standalone"}  # torch.distributed.run's single-node rendezvous


def unknown_option_spans(text: str) -> list[str]:
    """Code spans starting with an option that no tiecheck command (nor a program above) has."""
    known = {o for cmd in main.commands.values() for p in cmd.params
             for o in [*getattr(p, "opts", []), *getattr(p, "secondary_opts", [])]} | options_outside_tiecheck()
    return sorted({m for m in re.findall(r"`(--[a-z][a-z0-9-]*)", text)
                   if m not in known and not m.startswith("--benchmark-")})


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_option_a_page_names_exists(page):
    """docs/formats.md once named a `--flops` option that no command has."""
    assert unknown_option_spans(page.read_text(encoding="utf-8")) == []


def test_unknown_option_spans_catches_a_made_up_option():
    assert unknown_option_spans("counted with `--flops`, or `--no-flops` to skip") == ["--flops"]


# --- 4. the findings table -------------------------------------------------------------------------


def findings_table(text: str) -> list[tuple[str, str, str]]:
    lines = scan(text)
    tables = []
    for i in range(len(lines)):
        if is_table_start(lines, i):
            header, rows, _ = table_rows(lines, i)
            if [h.lower() for h in header[:3]] == ["code", "name", "severity"]:
                tables.append([tuple(row[:3]) for row in rows])
    assert len(tables) == 1, f"docs/findings.md should hold one findings table, found {len(tables)}"
    return tables[0]


def test_findings_table_equals_the_rules():
    documented = findings_table(FINDINGS_DOC.read_text(encoding="utf-8"))
    expected = [(r.code, r.name, r.severity) for r in RULES.values()]
    assert documented == expected, (
        "docs/findings.md's findings table differs from tiecheck.findings.RULES:\n"
        f"  only in the doc: {sorted(set(documented) - set(expected))}\n"
        f"  only in RULES:   {sorted(set(expected) - set(documented))}")


# --- 5. files of this repository named in the text -------------------------------------------------

REPO_PATH = re.compile(r"^(tests|benchmarks)/[\w./-]*$")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_repository_paths_in_code_spans_exist(page):
    missing = []
    for n, (line, in_code) in enumerate(scan(page.read_text(encoding="utf-8")), start=1):
        if not in_code:
            missing += [f"{page.relative_to(ROOT)}:{n}: {s}" for s in code_spans(line)
                        if REPO_PATH.match(s) and not (ROOT / s).exists()]
    assert not missing, "files named in the text that the repository does not have:\n  " + "\n  ".join(missing)


def test_every_test_file_is_named_after_a_module_or_command():
    """docs/architecture.md: a test file is ``test_<module or command>[_<aspect>].py``, so the tests of
    a module are found by its name. The names are read from the package and the CLI, not listed here."""
    modules = list((ROOT / "tiecheck").rglob("*.py"))
    names = {p.stem for p in modules} | {p.parent.name for p in modules}
    names |= {p.stem for p in (ROOT / "models").glob("*.py")}
    assert isinstance(main, click.Group)
    names |= set(main.commands) | {"readme", "docs", "zoo"}
    names -= {"__init__", "__main__"}
    misnamed = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        parts = path.stem.removeprefix("test_").split("_")
        if not any("_".join(parts[:i]) in names for i in range(1, len(parts) + 1)):
            misnamed.append(path.name)
    assert not misnamed, f"name these after the module or command they test: {misnamed}"


def test_no_module_is_over_600_lines():
    """docs/architecture.md: one job per module; a module past 600 lines holds more than one and is split."""
    long = {str(p.relative_to(ROOT)): n for p in sorted((ROOT / "tiecheck").rglob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 600}
    assert not long, f"split these by job: {long}"
