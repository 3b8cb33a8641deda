"""Every script's command line, recorded: its --help and each option's parsed default, type,
choices and requiredness, compared with tests/golden/cli.json. A move of modules must leave them
as they are; a deliberate change of a command line rewrites the file (UPDATE_GOLDEN=1) and shows
in its diff.

The parser is caught where the script calls parse_args, so no script runs any further."""

import argparse
import json
import os
from pathlib import Path


from launch import ROOT, run_in_process

GOLDEN = Path(__file__).parent / "golden" / "cli.json"
SCRIPTS = sorted(p.name for p in (ROOT / "scripts").glob("*.py"))


def action_record(action):
    return {
        "flags": action.option_strings or [action.dest],
        "dest": action.dest,
        "default": repr(action.default),
        "type": getattr(action.type, "__name__", repr(action.type)),
        "choices": None if action.choices is None or isinstance(action, argparse._SubParsersAction)
        else list(map(str, action.choices)),
        "required": action.required,
        "nargs": repr(action.nargs),
        "action": type(action).__name__,
    }


def parser_record(parser):
    """{'help': the --help text, 'options': [...]} of a parser, its sub-commands' under 'commands'."""
    record = {"help": parser.format_help(), "options": [action_record(a) for a in parser._actions]}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            record["commands"] = {name: parser_record(sub) for name, sub in action.choices.items()}
    return record


def caught_parser(name, monkeypatch):
    """The parser scripts/NAME builds, caught at its parse_args."""
    parsers, parse_known_args = [], argparse.ArgumentParser.parse_known_args

    def catch(self, *args, **kwargs):
        if not self.add_help:  # a pre-parser that reads one option first (evaluate.py's --ckpt)
            return parse_known_args(self, *args, **kwargs)
        parsers.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", catch)
    result = run_in_process(f"scripts/{name}")
    monkeypatch.undo()
    assert parsers, f"scripts/{name} built no parser: {result.stderr[-2000:]}"
    return parsers[0]


def current_records(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps help text to the terminal's width
    records = {}
    for name in SCRIPTS:
        monkeypatch.setenv("COLUMNS", "100")
        records[name] = parser_record(caught_parser(name, monkeypatch))
    return records


def test_every_scripts_command_line_is_the_recorded_one(monkeypatch):
    records = json.loads(json.dumps(current_records(monkeypatch)))
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert sorted(records) == sorted(golden), "scripts added or removed: UPDATE_GOLDEN=1 records them"
    for name in golden:
        assert records[name] == golden[name], f"scripts/{name}'s command line changed (UPDATE_GOLDEN=1 records it)"


def parsers_of(parser):
    """A parser and its sub-commands' parsers."""
    subs = [sub for action in parser._actions if isinstance(action, argparse._SubParsersAction)
            for sub in action.choices.values()]
    return [parser, *(nested for sub in subs for nested in parsers_of(sub))]


def test_every_option_of_every_script_has_help(monkeypatch):
    """--help explains every option and argument (a sub-command's too)."""
    missing = [f"{name} {parser.prog}: {'/'.join(action.option_strings) or action.dest}"
               for name in SCRIPTS for parser in parsers_of(caught_parser(name, monkeypatch))
               for action in parser._actions
               if not isinstance(action, argparse._SubParsersAction) and not (action.help or "").strip()]
    assert missing == []
