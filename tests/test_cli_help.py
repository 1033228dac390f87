"""`--help` for a first user: every command of the serving CLI says what it does, every option has a text, and
refusals are spelled `error: ...` like every other error line of the CLI."""

from __future__ import annotations

import argparse

import pytest

from service.cli import build_parser, main

#: The commands of service/cli.py (finetune, eval and probe bring their own parsers).
COMMANDS = ("predict", "serve", "api", "grpc", "worker", "bench", "export", "models", "segment", "make-tiny")


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: sub.choices[name] for name in COMMANDS}


def test_every_command_has_a_description_and_every_option_a_text() -> None:
    top = build_parser()
    assert top.description and "thin shell" not in top.description and top.epilog
    for name, parser in _commands().items():
        assert parser.description, f"dense-serve {name} --help has no description"
        bare = [a.option_strings or a.dest for a in parser._actions if a.help is None]
        assert not bare, (name, bare)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["predict"], "error: the following arguments are required: IMAGE (see dense-serve predict --help)"),
        (["serve", "--port", "x"], "error: argument --port: invalid int value: 'x' (see dense-serve serve --help)"),
        ([], "error: the following arguments are required: command (see dense-serve --help)"),
    ],
)
def test_usage_errors_end_in_one_error_line(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: dense-serve") and err.splitlines()[-1] == message
    assert [line for line in err.splitlines() if "error" in line] == [message]
