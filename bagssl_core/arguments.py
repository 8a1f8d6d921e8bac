"""The command lines' argument parser: a usage mistake is one line, like every other bad input.

argparse prints its whole usage block before the error; the commands' rule is one `error: ...` line on
stderr and exit 2, with `--help` one flag away.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line: `error: PROG: MESSAGE; see PROG --help`."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message}; see {self.prog} --help\n")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            sys.stderr.write(message)
        sys.exit(status)
