"""User-facing errors: reported as one line on stderr with exit code 2, no traceback."""

from __future__ import annotations

import sys
from typing import NoReturn


class UserError(Exception):
    """Bad input from the user (config, data, checkpoint). Message must name the key or file."""


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)
