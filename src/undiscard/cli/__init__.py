"""The ``undiscard`` command line (:func:`main`); every subcommand is listed in :mod:`undiscard.cli.main`
and in docs/cli.md."""

from undiscard.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
