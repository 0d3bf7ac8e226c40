"""User-facing errors: reported as one line on stderr with exit code 2, no traceback."""

from __future__ import annotations

import sys
from typing import NoReturn


class UserError(Exception):
    """Bad input from the user (config, data, checkpoint). Message must name the key or file."""


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


class Interrupted(Exception):
    """A run stopped by SIGTERM/SIGINT after saving its checkpoint. The CLI prints the message as
    the last line and exits 128 + signal (143 for SIGTERM, 130 for SIGINT), as a signalled process
    would, so schedulers and sweeps see a stopped run, not a finished one."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
