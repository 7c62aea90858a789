"""The ``million`` command: argument parsing and exit codes over the library."""

from million.cli.commands import main

__all__ = ["main"]
