"""Every command the README and the docs show works on the code as it is, and their links resolve.

The pages: ``README.md``, ``docs/*.md`` and ``benchmarks/README.md``. A command is a line of a
shell code block (or an inline code span in the prose) that starts with ``metallm``, ``make``,
``python -m``, ``python FILE.py``, ``docker compose`` or ``export``:

- ``metallm …``: the sub-command exists in the CLI's own parser (built in-process from the
  ``metallm`` entry point of pyproject.toml), every ``--flag`` shown is one of its options, a
  positional with fixed choices (``produce queries``) takes one of them; a concrete command typed
  in a code block (no ``[…]``, ``|``, ``…`` or UPPER-CASE placeholder) must parse as a whole;
- ``make X``: the Makefile has a rule for X, and ``make -n X`` succeeds (it only prints the
  recipes);
- ``python -m M``: ``python -m M --help`` runs and lists every flag shown (a module without
  options: it imports);
- ``python path/to/script.py``: the file exists and every flag shown is declared by its parser
  (read from its source: the benchmarks take seconds to import);
- ``docker compose …``: every service named (``--scale S=N``, ``up S``) is in docker-compose.yml;
- every ``METALLM_*`` name on a page, and every variable an ``export`` line sets, is a real
  setting or a variable the code, docker-compose.yml or the example configs read.

Relative links (``[text](path#anchor)``) must point at an existing file, and an anchor at a
heading of that file; a repository path in inline code (``service/context.py``) must exist.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import yaml

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted(
    [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *(ROOT / "docs").glob("*.md")]
)
#: pages whose repository paths are not checked: architecture.md names the modules of the tree
#: it was drawn from, and is redrawn with the tree (issue 24, item 6)
PATHS_UNCHECKED: set[Path] = set()
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}
COMMANDS = {"metallm", "make", "python", "python3", "docker", "docker-compose", "export"}
COMPOSE_VALUE_OPTIONS = {"--scale", "-f", "--file", "-p", "--project-name", "--profile"}


@dataclass(frozen=True)
class Shown:
    """A command as a page shows it."""

    page: Path
    line: int
    text: str
    #: in a code block, as typed (not a command named in the prose)
    typed: bool = True

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}: {self.text}"


def shown_commands(page: Path) -> Iterator[Shown]:
    """The command lines of a page: in shell code blocks (a trailing ``\\`` or an indented line
    continues the one before) and in inline code spans of the prose."""
    fence: str | None = None
    current: Shown | None = None
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            if current is not None:
                yield current
                current = None
            fence = line.strip()[3:].strip() if fence is None else None
            continue
        if fence is None:
            for span in re.findall(r"`([^`]+)`", line):
                if command_name(span) in COMMANDS and " " in span:
                    yield Shown(page, number, span, typed=False)
            continue
        if fence not in SHELL_FENCES:
            continue
        if current is not None and (current.text.endswith("\\") or line[:1].isspace()):
            current = Shown(page, current.line, current.text.rstrip("\\ ") + " " + line.strip())
            continue
        if current is not None:
            yield current
        text = line.strip().removeprefix("$ ")
        current = Shown(page, number, text) if command_name(text) in COMMANDS else None
    if current is not None:
        yield current


def command_name(text: str) -> str:
    """The program a line runs: its first word after ``VAR=value`` words and ``.venv/bin/``."""
    first = re.sub(r"^([A-Z_][A-Z0-9_]*=\S*\s+)*", "", text).split(" ", 1)[0]
    return first.removeprefix(".venv/bin/")


def all_shown() -> list[Shown]:
    return [shown for page in PAGES for shown in shown_commands(page)]


def words(shown: Shown) -> list[str]:
    """The command's words: comments cut, leading ``VAR=value`` and ``.venv/bin/`` dropped."""
    try:
        tokens = shlex.split(shown.text, comments=True)
    except ValueError as exc:
        pytest.fail(f"{shown}: not a shell line ({exc})")
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", tokens[0]):
        tokens.pop(0)
    if tokens:
        tokens[0] = tokens[0].removeprefix(".venv/bin/")
    return tokens


def is_placeholder(token: str) -> bool:
    return (
        any(mark in token for mark in "[]|…")
        or token == "..."
        or bool(re.fullmatch(r"[A-Z][A-Z0-9_]*(\.\.\.)?", token))
    )


def flags(tokens: list[str]) -> list[str]:
    """The ``--flag`` / ``-f`` words shown, out of synopsis brackets and alternatives."""
    found = []
    for token in tokens:
        for part in re.split(r"[\[\]|]", token):
            part = part.split("=", 1)[0]
            if re.fullmatch(r"--?[a-z][a-z0-9-]*", part):
                found.append(part)
    return found


# ---------------------------------------------------------------- metallm


@cache
def cli_parser() -> argparse.ArgumentParser:
    """The parser of the ``metallm`` console script, from the module its entry point names."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module = importlib.import_module(scripts["metallm"].split(":")[0])
    return module.parser()


def sub_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def check_metallm(shown: Shown, tokens: list[str]) -> None:
    top = cli_parser()
    args = tokens[1:]
    while args and args[0].startswith("-"):  # options of metallm itself
        option = args.pop(0)
        assert option in top._option_string_actions, f"{shown}: metallm has no option {option}"
        if top._option_string_actions[option].nargs != 0:
            args = args[1:]
    if not args:
        return
    subs = sub_parsers(top)
    assert args[0] in subs, f"{shown}: metallm has no sub-command {args[0]!r}"
    sub = subs[args[0]]
    for flag in flags(args[1:]):
        assert flag in sub._option_string_actions or flag in top._option_string_actions, (
            f"{shown}: `metallm {args[0]}` has no option {flag}"
        )
    positionals = [a for a in sub._actions if not a.option_strings]
    bare, skip = [], False
    for token in args[1:]:
        if skip:
            skip = False
        elif token.startswith(("-", "[-")):
            action = sub._option_string_actions.get(flags([token])[0] if flags([token]) else "")
            skip = "=" not in token and action is not None and action.nargs != 0
        else:
            bare.append(token)
    for action, token in zip(positionals, bare, strict=False):
        if action.choices and not is_placeholder(token):
            assert token in action.choices, (
                f"{shown}: `metallm {args[0]}` takes {sorted(action.choices)}, not {token!r}"
            )
    if shown.typed and not any(map(is_placeholder, args)) and "--version" not in args:
        errors = io.StringIO()
        try:
            with contextlib.redirect_stderr(errors):
                top.parse_args(args)
        except SystemExit:
            pytest.fail(f"{shown}: {errors.getvalue().strip().splitlines()[-1]}")


# ---------------------------------------------------------------- python, make, docker compose


@cache
def parser_options(source: Path) -> frozenset[str]:
    """The option strings a script's ``add_argument`` calls declare."""
    options = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            options |= {
                arg.value
                for arg in node.args
                if isinstance(arg, ast.Constant) and str(arg.value).startswith("-")
            }
    return frozenset(options | {"-h", "--help"})


@cache
def module_help(module: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", module, "--help"]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def check_python(shown: Shown, tokens: list[str]) -> None:
    if tokens[1:2] != ["-m"]:
        source = ROOT / tokens[1]
        assert source.is_file(), f"{shown}: no file {tokens[1]}"
        for flag in flags(tokens[2:]):
            assert flag in parser_options(source), f"{shown}: {tokens[1]} has no option {flag}"
        return
    module = tokens[2]
    if module in {"pytest", "pip"}:
        return
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"{shown}: no module {module}"
    if parser_options(Path(spec.origin)) == {"-h", "--help"}:
        importlib.import_module(module)  # takes no options: importable is all it can show
        return
    run = module_help(module)  # run as shown: `python -m M --help`
    assert run.returncode == 0, f"{shown}: `python -m {module} --help` fails: {run.stderr[-300:]}"
    for flag in flags(tokens[3:]):
        assert re.search(rf"{flag}\b", run.stdout), f"{shown}: {module} has no option {flag}"


@cache
def make_dry_run(target: str, variables: tuple[str, ...]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "-n", "-C", str(ROOT), target, *variables],
        capture_output=True,
        text=True,
        timeout=60,
    )


@cache
def make_rules() -> frozenset[str]:
    """The targets the Makefile has rules for (a folder of the same name is not one)."""
    text = (ROOT / "Makefile").read_text()
    heads = re.findall(r"^([^\s#=:][^:=]*?)\s*::?(?!=)", text, flags=re.M)
    return frozenset(name for head in heads for name in head.split())


def check_make(shown: Shown, tokens: list[str]) -> None:
    variables = tuple(t for t in tokens[1:] if "=" in t)
    for target in [t for t in tokens[1:] if "=" not in t and not t.startswith("-")]:
        assert target in make_rules(), f"{shown}: the Makefile has no rule for {target}"
        run = make_dry_run(target, variables)
        assert run.returncode == 0, f"{shown}: `make -n {target}` fails: {run.stderr.strip()}"


@cache
def compose_services() -> frozenset[str]:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return frozenset(compose["services"])


def check_compose(shown: Shown, tokens: list[str]) -> None:
    args = tokens[2:] if tokens[0] == "docker" else tokens[1:]
    named, skip = [], False
    for index, token in enumerate(args[1:], 1):
        if skip:
            skip = False
            continue
        if token == "--scale" or token.startswith("--scale="):
            value = token.split("=", 1)[1] if "=" in token[8:] else args[index + 1]
            named.append(value.split("=")[0])
            skip = "=" not in token[8:]
        elif token in COMPOSE_VALUE_OPTIONS:
            skip = True
        elif not token.startswith("-"):
            named.append(token)
            if args[0] in {"run", "exec"}:
                break  # the rest is the command run in that service
    for service in named:
        assert service in compose_services(), f"{shown}: docker-compose.yml has no {service!r}"


# ---------------------------------------------------------------- environment variables


@cache
def known_variables() -> frozenset[str]:
    """Settings (``METALLM_<FIELD>``, and ``DATABASE_URL``) and the names the code, the compose
    file, the deploy files and the example configs read by name."""
    prefix = Settings.model_config["env_prefix"]
    names = {f"{prefix}{field}".upper() for field in Settings.model_fields} | {"DATABASE_URL"}
    texts = [(ROOT / "docker-compose.yml").read_text()]
    texts += [p.read_text() for p in (ROOT / "config").glob("*.yaml")]
    texts += [p.read_text() for p in (ROOT / "deploy").rglob("*") if p.suffix in {".sh", ".yml"}]
    for folder in ROOT.iterdir():  # the packages, tools and tests; not .venv or .git
        if folder.is_dir() and not folder.is_symlink() and not folder.name.startswith("."):
            texts += [p.read_text() for p in folder.rglob("*.py")]
    for text in texts:
        names |= set(re.findall(r"""["'{$]([A-Z][A-Z0-9_]{2,})\b""", text))
    return frozenset(names)


def check_export(shown: Shown, tokens: list[str]) -> None:
    for token in tokens[1:]:
        name = token.split("=", 1)[0]
        assert name in known_variables(), f"{shown}: nothing reads {name}"


CHECKS = {
    "metallm": check_metallm,
    "make": check_make,
    "python": check_python,
    "python3": check_python,
    "docker": check_compose,
    "docker-compose": check_compose,
    "export": check_export,
}


def test_the_pages_show_commands():
    """The extraction finds what the pages show (so the checks below cannot pass empty)."""
    shown = {words(s)[0] for s in all_shown() if words(s)}
    assert {"metallm", "make", "python", "docker", "export"} <= shown


@pytest.mark.parametrize("kind", sorted(CHECKS))
def test_every_command_shown_runs_on_the_code(kind: str):
    failures = []
    for shown in all_shown():
        tokens = words(shown)
        if not tokens or tokens[0] != kind:
            continue
        if kind == "docker" and tokens[1:2] != ["compose"]:
            continue
        try:
            CHECKS[kind](shown, tokens)
        except AssertionError as exc:
            failures.append(str(exc).split("\n")[0])
        except pytest.fail.Exception as exc:
            failures.append(str(exc))
    assert not failures, "\n".join(failures)


def test_every_metallm_variable_named_is_read():
    unknown = []
    for page in PAGES:
        for number, line in enumerate(page.read_text().splitlines(), 1):
            for name in re.findall(r"\bMETALLM_[A-Z0-9_]*", line):
                known = known_variables()
                ok = any(k.startswith(name) for k in known) if name.endswith("_") else name in known
                if not ok:
                    unknown.append(f"{page.relative_to(ROOT)}:{number}: {name}")
    assert not unknown, "\n".join(unknown)


# ---------------------------------------------------------------- links


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@cache
def anchors(page: Path) -> frozenset[str]:
    found: set[str] = set()
    fenced = False
    for line in page.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"#{1,6} (.*)", line)):
            base = slug(match.group(1))
            name, n = base, 0
            while name in found:
                n += 1
                name = f"{base}-{n}"
            found.add(name)
    return frozenset(found)


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_every_repository_path_named_exists():
    """A path in inline code (``service/context.py``, ``deploy/``) whose first part is a folder
    or file of the repository exists, from the repository's root or from the page's folder."""
    top = {p.name for p in ROOT.iterdir() if not p.name.startswith(".")}
    missing = []
    for page in sorted(set(PAGES) - PATHS_UNCHECKED):
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for span in re.findall(r"`([^`\s]+)`", text):
            path = span.split("#")[0].split("::")[0]
            if "/" not in path or not re.fullmatch(r"[\w.-]+(/[\w.*-]+)+/?", path):
                continue
            if path.split("/")[0] not in top | {p.name for p in page.parent.iterdir()}:
                continue
            if not ((ROOT / path).exists() or (page.parent / path).exists()):
                missing.append(f"{page.relative_to(ROOT)}: {span}")
    assert not missing, "\n".join(missing)
