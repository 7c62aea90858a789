"""The ``million`` command: argument parsing and exit codes over the library.

``parser`` holds the flags, ``commands`` turns them into configs and hands those to the
library, ``display`` holds what is printed.
"""

from million.cli.commands import main

__all__ = ["main"]
