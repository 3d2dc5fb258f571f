"""Numeric arguments are checked while the command line is parsed: every numeric flag of every subcommand,
given 0, a negative value or a non-number, is either accepted (when its range allows it) or refused with one
``error:`` line naming the flag and the allowed range, exit status 2 and no output folder."""

import argparse

import pytest

from workbench.args import Number, NumberList
from workbench.cli import build_parser, main
from workbench.errors import WorkbenchError


def subcommands(parser: argparse.ArgumentParser, path=()):
    """``(path, parser)`` of every leaf subcommand (``sae train`` is ``("sae", "train")``)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for a in subs:
        for name, p in a.choices.items():
            yield from subcommands(p, (*path, name))


def minimal_argv(parser: argparse.ArgumentParser, out: str) -> list[str]:
    """The required arguments of a subcommand, filled with placeholders (nothing is run with them)."""
    argv = []
    for a in parser._actions:
        if not a.option_strings and a.nargs != argparse.PARSER and a.dest != "help":
            argv.append("m")
        elif a.option_strings and a.required:
            argv += [a.option_strings[0], out if a.dest == "out" else "x"]
    return argv


def numeric_flags():
    found = []
    for path, p in subcommands(build_parser()):
        for a in p._actions:
            assert a.type not in (int, float), f"{' '.join(path)} {a.option_strings}: use workbench.args.Number"
            if isinstance(a.type, (Number, NumberList)):
                found.append((path, a.option_strings[0]))
    return found


FLAGS = numeric_flags()


def test_the_walk_finds_every_subcommands_numbers():
    names = {(" ".join(p), f) for p, f in FLAGS}
    for expected in [("trace", "--max-tokens"), ("trace", "--layers"), ("profile", "--checkpoint-every"),
                     ("profile", "--quantile"), ("contrast", "--top"), ("circuit", "--top-edges"),
                     ("circuit", "--threshold"), ("circuit", "--steps"), ("reduce", "--top"), ("ui", "--port"),
                     ("sae train", "--seed"), ("sae train", "--lr"), ("sae features", "--top-tokens")]:
        assert expected in names
    assert len(FLAGS) >= 35, len(FLAGS)


@pytest.mark.parametrize("path, flag", FLAGS, ids=[f"{' '.join(p)} {f}" for p, f in FLAGS])
@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_numeric_flag(path, flag, value, tmp_path, capsys):
    out = tmp_path / "out"
    parser = dict(subcommands(build_parser()))[path]
    action = next(a for a in parser._actions if flag in a.option_strings)
    number = action.type.item if isinstance(action.type, NumberList) else action.type
    argv = [*path, *minimal_argv(parser, str(out)), flag, value]
    allowed = value != "many" and number.allows(number.kind(value))
    if allowed:  # in range (e.g. --checkpoint-every 0 turns checkpoints off): parsed as the number
        args = build_parser().parse_args(argv)
        got = getattr(args, action.dest)
        assert got == ([number.kind(value)] if isinstance(action.type, NumberList) else number.kind(value))
        return
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == WorkbenchError.exit_code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: argument {flag}"), captured.err
    assert number.describe() in lines[0] and repr(value) in lines[0]
    assert not out.exists()


def test_number_ranges():
    assert Number(int, 1).describe() == "an integer >= 1"
    assert Number(float, 0, 100, open_low=True).describe() == "a number in (0, 100]"
    assert Number(int, 2, off=0).describe() == "0 (off) or an integer >= 2"
    refine = Number(int, 2, off=0)
    assert [refine.allows(v) for v in (0, 1, 2, 99)] == [True, False, True, True]
    ratio = Number(float, 0, 1)
    assert [ratio.allows(v) for v in (0.0, 1.0, 1.5, float("nan"), float("inf"))] == [True, True, False, False, False]
    with pytest.raises(argparse.ArgumentTypeError, match=r"must be a number in \[0, 1\], got 'inf'"):
        ratio("inf")


def test_issue_example_and_the_api(tmp_path, capsys):
    """``--max-tokens -5`` was an IndexError deep in the tokeniser; the Python API refuses it too."""
    from workbench.models.specs import load
    from workbench.tracing.runner import tokenize

    with pytest.raises(SystemExit) as e:
        main(["profile", "zoo:qwen3-moe", "--text", "hi", "--max-tokens", "-5", "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("error: argument --max-tokens: must be an integer >= 1, got '-5' "
                                       "(see `workbench profile --help`)\n")
    with pytest.raises(WorkbenchError, match="max_tokens must be an integer >= 1, got -5"):  # as the flag says
        tokenize(load("zoo:qwen3-moe"), ["hi"], max_tokens=-5)
    with pytest.raises(SystemExit):  # other usage errors are one line too
        main(["trace", "zoo:qwen3-moe"])
    assert capsys.readouterr().err == ("error: the following arguments are required: --out "
                                       "(see `workbench trace --help`)\n")


def test_debug_works_after_the_command_too(run, tmp_path):
    """The README says "add `--debug`"; after the command it was an unrecognised argument (exit 2, no traceback)."""
    for argv in (["--debug", "trace", "zoo:nope"], ["trace", "zoo:nope", "--debug"]):
        code, _, err = run(*argv, "--out", tmp_path / "o")
        assert code == 2 and "Traceback (most recent call last)" in err
        assert err.rstrip().splitlines()[-1].startswith("error: unknown zoo model 'nope'")
    code, _, err = run("trace", "zoo:nope", "--out", tmp_path / "o")
    assert code == 2 and "Traceback" not in err


def test_every_flag_and_argument_says_what_it_does():
    """Twenty-five flags (--batch-size, --out, --quiet, --lr, --op ...) showed in --help with no text."""
    bare = [f"{' '.join(path)} {'/'.join(a.option_strings) or a.dest}" for path, p in subcommands(build_parser())
            for a in p._actions if not isinstance(a, argparse._HelpAction) and not a.help]
    assert not bare, bare
