"""Every `jaxdistill ...` command the README's code blocks and the `--help` epilogues show is
real: its subcommand exists, it parses, every `--flag` it names is one of that subcommand's own
(exactly, not an abbreviation), every `--set` key is a config key, and every file it names
exists in the repository or is made by an earlier documented step."""

import argparse
import re
import shlex
from pathlib import Path

import pytest

from jaxdistill import cli

REPO = Path(__file__).resolve().parents[1]

# Paths documented commands create (so they need not exist in a fresh clone):
# run directories (`train`/`distill`), exports, reports, and the example data that
# `python scripts/make_example_data.py` + the documented `data prepare` write.
OUTPUTS = ("runs/", "exports/", "reports/", "data/examples/")
# Flags whose value is a file or directory the command writes.
OUTPUT_FLAGS = frozenset({"--out", "--run-dir", "--workdir"})
PATH_LIKE = re.compile(r"^[\w.\-]+(/[\w.\-]*)+$|^[\w.\-]+\.(ya?ml|jsonl|json|parquet|csv|md|py)$")


def _commands(text: str) -> list[str]:
    """`jaxdistill ...` and `python ...` lines (backslash continuations joined)."""
    out, pending = [], None
    for raw in text.splitlines():
        line = raw.strip().removeprefix("$ ")
        if pending is not None:
            line = pending + " " + line
            pending = None
        elif not line.startswith(("jaxdistill ", "python ")):
            continue
        if line.endswith("\\"):
            pending = line[:-1].strip()
            continue
        out.append(line.split("  #")[0].split(" # ")[0].strip())
    return out


def readme_commands() -> list[str]:
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", (REPO / "README.md").read_text(),
                        flags=re.S | re.M)
    return [c for block in blocks for c in _commands(block)]


def epilog_commands() -> list[str]:
    return [c for epilog in cli._EPILOGS.values() for c in _commands(epilog)]


def _subparser(parser: argparse.ArgumentParser, tokens: list[str]):
    """The innermost subcommand parser `tokens` select, and the tokens after its name."""
    while True:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions or not tokens or tokens[0] not in actions[0].choices:
            return parser, tokens
        parser, tokens = actions[0].choices[tokens[0]], tokens[1:]


def check_command(command: str) -> tuple[int, int]:
    """Asserts the command is real; returns (flags checked, paths checked)."""
    tokens = shlex.split(command)
    if tokens[0] == "python":
        if tokens[1] == "-c":
            return 0, 0
        assert (REPO / tokens[1]).is_file(), f"{command!r}: {tokens[1]} is not in the repo"
        return 0, 1
    args = tokens[1:]
    parser, rest = _subparser(cli.build_parser(), args)
    assert parser.prog != "jaxdistill" or not args, f"{command!r}: no such subcommand"
    try:
        parsed = cli.build_parser().parse_args(args)
    except SystemExit as error:
        raise AssertionError(f"{command!r} does not parse (exit {error.code})") from None
    options = {s for a in parser._actions for s in a.option_strings}
    flags = paths = 0
    previous = None
    for token in rest:
        if token.startswith("--"):
            flag = token.split("=", 1)[0]
            assert flag in options, f"{command!r}: {flag} is not an option of `{parser.prog}`"
            flags += 1
        elif PATH_LIKE.match(token) and previous not in OUTPUT_FLAGS and previous != "--set":
            for path in token.split("=")[-1:]:
                assert (REPO / path).exists() or path.startswith(OUTPUTS), (
                    f"{command!r}: {path} is neither in the repo nor made by a documented "
                    f"step (outputs: {OUTPUTS})")
                paths += 1
        previous = token
    config = getattr(parsed, "config", None)
    if config and config.startswith("configs/examples/"):
        from jaxdistill.config import load_config

        load_config(REPO / config, parsed.set)  # every --set key is a config key
    return flags, paths


def test_readme_and_epilog_commands_are_real(capsys):
    commands = readme_commands() + epilog_commands()
    assert len(readme_commands()) >= 10 and len(epilog_commands()) >= 20
    flags = paths = 0
    for command in commands:
        f, p = check_command(command)
        flags, paths = flags + f, paths + p
    with capsys.disabled():
        print(f"\nREADME + epilogues: {len(commands)} commands, {flags} flags, {paths} paths "
              "checked")


@pytest.mark.parametrize("command", [
    "jaxdistill pipeline configs/job_search/pipeline.yaml --preset small --bogus",
    "jaxdistill train configs/examples/relevance_teacher.yaml --set trainer.stepz=3",
    "jaxdistill predict runs/student --data no_such_file.jsonl --out scores.jsonl",
    "jaxdistill evaluate runs/student",
    "jaxdistill data prepare --kind text --out data/x --max 3",
])
def test_the_checker_catches_false_commands(command):
    with pytest.raises((AssertionError, ValueError)):
        check_command(command)
