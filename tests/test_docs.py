"""The documentation cannot go stale: every fenced command line in README.md, the site's pages
(docs/) and the other Markdown files that runs one of the project's commands is parsed by that
command's own argument parser (nothing runs), so a renamed or misspelled flag fails here with
the file and line. A line meant as an illustration of something else ends with
`# illustration` and is skipped. The site itself is built by `make docs` (mkdocs --strict)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MARKDOWN = sorted(
    [*REPO.glob("*.md"), *(REPO / "docs").rglob("*.md"), *(REPO / "bench").glob("*.md")]
)
SKIP = "# illustration"
# fenced blocks of shell commands (a terminal's session included); not printed text or Python
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}
# what ends a command on a shell line
SHELL_OPERATORS = {"|", "||", "&&", ";", "&", ">", ">>", "2>&1", "<"}
PLACEHOLDER = "..."  # "more flags here"; where a flag's value is due, a value


@dataclass
class Command:
    where: str  # FILE:LINE
    script: str  # the project's script, relative to the repository: train.py, bench/x.py
    argv: list[str]


def _script(word: str, module: bool) -> str | None:
    """The project's script that `word` names (a path, or with -m a module), else None."""
    path = word.replace(".", "/") + ".py" if module else word
    path = path.removeprefix("./").removeprefix("/opt/ssat/")
    if module or "/" in path:
        ok = re.fullmatch(r"(convert|bench|storage)/\w+\.py", path)
    else:
        ok = path in ("train.py", "compare.py", "export.py", "visualize.py")
    return path if ok and (REPO / path).is_file() else None


def commands_in(text: str, name: str) -> list[Command]:
    """Every command line of a fenced shell block (continuation lines joined), and every
    inline code span that starts with python or torchrun, that runs one of the project's
    scripts, with its file and line."""
    found, fence, pending, start = [], None, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = stripped[3:].strip() if fence is None else None
            continue
        if fence is None:  # prose: its inline commands (`python -m bench.loaders`)
            for span in re.findall(r"`([^`]+)`", line):
                if re.match(r"(\S*/)?(python3?|torchrun) ", span):  # named alone: no check
                    found += [c for c in _commands(span, f"{name}:{number}") if c.argv]
            continue
        if fence not in SHELL_FENCES:
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        joined, pending = pending + stripped, ""
        if joined.endswith(SKIP) or joined.startswith("#"):
            continue
        found += _commands(joined.removeprefix("$ "), f"{name}:{start}")
    return found


def _commands(line: str, where: str) -> list[Command]:
    try:
        words = shlex.split(line, comments=True)
    except ValueError as err:  # unbalanced quotes: a line to fix or to mark
        raise AssertionError(f"{where}: cannot read the command line ({err}): {line}") from None
    found = []
    for i, word in enumerate(words):
        module = i > 0 and words[i - 1] == "-m"
        script = _script(word, module)
        if script is None:
            continue
        argv = []
        for rest in words[i + 1 :]:
            if rest in SHELL_OPERATORS:
                break
            argv.append(rest)
        found.append(Command(where, script, argv))
        break
    return found


def _parser(script: str):
    """The script's own parser, taking flags spelled out only: the commands accept an
    unambiguous prefix (`--epoch` for `--epochs`, as argparse does), the docs spell them out."""
    if script == "train.py":
        from ssat.config import build_parser
    else:
        name = script.removesuffix(".py").replace("/", ".")
        build_parser = importlib.import_module(name).build_parser
    parser = build_parser()
    parsers = [parser]
    for action in parser._actions:  # visualize.py's subcommands have parsers of their own
        if isinstance(action, argparse._SubParsersAction):
            parsers += action.choices.values()
    for each in parsers:
        each.allow_abbrev = False
    return parser


def _fill_placeholders(argv: list[str], parser) -> list[str]:
    """`...` after an option that takes a value is that value; elsewhere it stands for more
    flags and is dropped."""
    options = dict(parser._option_string_actions)  # argparse's table of its option strings
    for action in parser._actions:  # and those of visualize.py's subcommands
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                options.update(sub._option_string_actions)
    out = []
    for word in argv:
        if word == PLACEHOLDER:
            before = options.get(out[-1].split("=")[0]) if out else None
            if before is None or before.nargs == 0 or "=" in out[-1]:
                continue
        out.append(word)
    return out


def parse(command: Command) -> None:
    """Parse the command's flags with its own parser; AssertionError with FILE:LINE and the
    parser's message when it refuses them."""
    pieces = [(command.script, command.argv)]
    if command.script == "compare.py" and "--" in command.argv:  # train.py's flags after --
        cut = command.argv.index("--")
        pieces = [("compare.py", command.argv[:cut]), ("train.py", command.argv[cut + 1 :])]
    for script, argv in pieces:
        parser = _parser(script)
        argv = _fill_placeholders(argv, parser)
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                parser.parse_args(argv)
                if script == "compare.py":
                    import compare

                    compare.parse_args(argv)  # its checks across flags too
        except SystemExit as stop:
            if stop.code:
                message = err.getvalue().strip().splitlines()[-1:]
                raise AssertionError(
                    f"{command.where}: {script} refuses {' '.join(argv)!r}: {' '.join(message)}"
                ) from None


def _documented() -> list[Command]:
    found = []
    for path in MARKDOWN:
        found += commands_in(path.read_text(), str(path.relative_to(REPO)))
    return found


DOCUMENTED = _documented()


@pytest.mark.parametrize("command", DOCUMENTED, ids=[c.where for c in DOCUMENTED])
def test_documented_command_parses(command):
    parse(command)


def test_the_documentation_shows_the_commands():
    """The collector finds the commands the pages show (a collector that finds nothing would
    pass every line): each of the main commands, and many lines in all."""
    scripts = {c.script for c in DOCUMENTED}
    for script in ("train.py", "compare.py", "export.py", "visualize.py"):
        assert script in scripts, f"no documented command runs {script}"
    assert any(s.startswith("convert/") for s in scripts)
    assert len(DOCUMENTED) >= 40, len(DOCUMENTED)


def test_a_misspelled_flag_fails_with_its_file_and_line():
    page = """Some text.

```bash
python convert/digits_to_ffcv.py --out_dir data
torchrun --nproc_per_node=2 train.py --data_path c10 --epoch 3 \\
    --output_dir runs/x
python compare.py --seeds 0 1 -- --epochs 2 --warmup 1
python compare.py --seed 0 -- --epochs 2
python train.py --epoch 3  # illustration
```
"""
    found = commands_in(page, "page.md")
    assert [(c.where, c.script) for c in found] == [
        ("page.md:4", "convert/digits_to_ffcv.py"),
        ("page.md:5", "train.py"),
        ("page.md:7", "compare.py"),
        ("page.md:8", "compare.py"),
    ]
    assert found[1].argv == ["--data_path", "c10", "--epoch", "3", "--output_dir", "runs/x"]
    parse(found[0])
    # --epoch is an unambiguous prefix of --epochs, which the command itself would accept
    with pytest.raises(AssertionError, match=r"page\.md:5: train\.py refuses .*--epoch\b"):
        parse(found[1])
    with pytest.raises(AssertionError, match=r"page\.md:7: train\.py refuses .*--warmup\b"):
        parse(found[2])
    with pytest.raises(AssertionError, match=r"page\.md:8: compare\.py refuses .*--seed\b"):
        parse(found[3])


def test_placeholders_stand_for_values_or_for_more_flags():
    from ssat.config import build_parser

    parser = build_parser()
    argv = ["--data_path", "c10", "...", "--output_dir", "...", "--pictures"]
    assert _fill_placeholders(argv, parser) == [
        "--data_path",
        "c10",
        "--output_dir",
        "...",
        "--pictures",
    ]


# every file of the project that runs as a command (tools/ffcv_smoke_test.py travels alone to
# machines without the project, so it names no version)
COMMANDS = sorted(
    str(path.relative_to(REPO))
    for path in [*REPO.glob("*.py"), *REPO.glob("*/*.py")]
    if re.search(r'^if __name__ == "__main__":', path.read_text(), re.MULTILINE)
    and path.parts[-2] not in ("tests", "tools")
)


@pytest.mark.parametrize("script", COMMANDS)
def test_every_command_prints_the_project_version(script, capsys):
    from storage.version import project_version

    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'\nversion = "{project_version()}"\n' in pyproject
    with pytest.raises(SystemExit) as stop:
        _parser(script).parse_args(["--version"])
    assert stop.value.code in (0, None)
    assert capsys.readouterr().out == f"ssat {project_version()}\n"


def test_train_version_with_a_value_still_names_the_run():
    """The published scripts' `--version NAME` files a run under <output_dir>/NAME."""
    from ssat.config import parse_config

    cfg = parse_config(["--version", "r3", "--output_dir", "runs"])
    assert cfg.version == "r3" and cfg.output_dir == str(Path("runs") / "r3")
