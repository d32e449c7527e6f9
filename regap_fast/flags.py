"""The command-line flags several subcommands share, and how ``--help`` shows them.

An action may carry ``hidden_aliases`` (other spellings, e.g. ``--output_dir`` for ``--out``): they
parse, and the help names them once in the text instead of widening the flag column.
"""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; every option's default in its help; aliases out of the flag column."""

    def _format_action_invocation(self, action):
        hidden = getattr(action, "hidden_aliases", ())
        if not hidden:
            return super()._format_action_invocation(action)
        shown = [s for s in action.option_strings if s not in hidden and s.replace("--no-", "--") not in hidden]
        return super()._format_action_invocation(_with_options(action, shown))

    def _get_help_string(self, action):
        text = action.help or ""
        switch = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        if (action.option_strings and action.default is not None and action.default is not argparse.SUPPRESS
                and not switch and "%(default)" not in text and "default" not in text):
            text += " (default: %(default)s)"
        hidden = getattr(action, "hidden_aliases", ())
        if hidden:
            text += f" (also: {', '.join(hidden)})"
        return text


def _with_options(action, option_strings):
    clone = argparse.Action.__new__(type(action))
    clone.__dict__.update(action.__dict__, option_strings=option_strings)
    return clone


def add_aliases(action: argparse.Action, *aliases: str) -> argparse.Action:
    """Mark the option strings ``aliases`` of ``action`` as other spellings (see HelpFormatter)."""
    action.hidden_aliases = tuple(aliases)
    return action


def add_progress_argument(parser: argparse.ArgumentParser) -> None:
    """``--progress/--no-progress``, the same in every command: bars on a terminal, none in a piped log."""
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="show progress bars when stderr is a terminal (never in a piped log)")
