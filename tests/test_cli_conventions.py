"""The command line's conventions across commands: one name per notion, -o, --debug
anywhere, --version, every default in the help, help that cites only what ships."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

import serq_ao
from serq_ao.cli.main import build_parser


def _parsers(parser=None, name="serq"):
    """(command name, parser) for serq and every (sub)command."""
    parser = parser or build_parser()
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, subparser in action.choices.items():
                yield from _parsers(subparser, f"{name} {sub}")


def _options(parser) -> dict[str, argparse.Action]:
    return {o: a for a in parser._actions for o in a.option_strings}


def test_version():
    result = subprocess.run([sys.executable, "-m", "serq_ao.cli.main", "--version"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == f"serq {serq_ao.__version__}"


@pytest.mark.parametrize("command", [["quantize", "m"], ["export", "m"]])
def test_dash_o_is_out(command):
    assert build_parser().parse_args([*command, "-o", "x"]).out == "x"


@pytest.mark.parametrize(("argv", "debug"), [
    (["--debug", "eval", "ppl", "m"], True),
    (["eval", "ppl", "m", "--debug"], True),
    (["quantize", "m", "-o", "x", "--debug"], True),
    (["quantize", "m", "-o", "x"], False),
])
def test_debug_before_or_after_the_command(argv, debug):
    assert build_parser().parse_args(argv).debug is debug


def test_one_name_for_the_batch_size():
    for name, parser in _parsers():
        options = _options(parser)
        assert "--batch" not in options, name
    with_batch = {name for name, parser in _parsers() if "--batch-size" in _options(parser)}
    assert with_batch == {"serq export", "serq bench", "serq eval ppl", "serq eval tasks"}


def test_every_default_is_in_the_help():
    for name, parser in _parsers():
        text = parser.format_help()
        for action in parser._actions:
            if action.default in (None, False, [], argparse.SUPPRESS) or isinstance(action, argparse._HelpAction):
                continue
            assert action.help and "default" in parser._get_formatter()._get_help_string(action), \
                f"{name} {action.option_strings or action.dest}: default {action.default!r} not in its help"
        assert "../shared" not in text, f"{name}'s help cites a file that does not ship"
