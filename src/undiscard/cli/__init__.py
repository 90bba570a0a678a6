"""The ``undiscard`` command line (:func:`main`); every subcommand is listed in :mod:`undiscard.cli.app`
and in docs/cli.md."""

from undiscard.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
