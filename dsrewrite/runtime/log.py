# SPDX-License-Identifier: Apache-2.0
"""Progress and diagnostics through :mod:`logging`: the ``dsrewrite`` logger and the CLI's handler.

Library code logs long steps (calibration layer by layer, healing every few steps) at
``INFO`` to ``dsrewrite.<part>`` loggers. As a library nothing is shown unless the user
configures logging (``logging.basicConfig(level=logging.INFO)`` shows it all), or asks a
function for ``progress=True`` (then :func:`say` prints the line to stderr when no handler
of the user's would show it). The command line calls :func:`configure_cli`: progress on a
terminal or with ``-v``, warnings only when piped or with ``-q``, and on a ``torchrun``
process other than rank 0 errors only.

Example:
    >>> log = get_logger("heal")
    >>> log.name
    'dsrewrite.heal'
    >>> configure_cli(verbosity=1); get_logger().level == logging.INFO
    True
    >>> configure_cli(verbosity=-1); get_logger().level == logging.WARNING
    True
    >>> reset_cli()
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Optional

__all__ = ["LOGGER_NAME", "get_logger", "configure_cli", "reset_cli", "say", "shows"]

LOGGER_NAME = "dsrewrite"

logging.getLogger(LOGGER_NAME).addHandler(logging.NullHandler())  # a library's logger stays quiet by default


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time of the record (test runners swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


_cli_handler: Optional[logging.Handler] = None


def get_logger(part: Optional[str] = None) -> logging.Logger:
    """The ``dsrewrite`` logger, or its child ``dsrewrite.<part>``."""
    return logging.getLogger(LOGGER_NAME if not part else f"{LOGGER_NAME}.{part}")


def configure_cli(verbosity: int = 0, *, tty: Optional[bool] = None) -> None:
    """Show the ``dsrewrite`` logs on stderr as the command line wants them.

    ``verbosity`` 1 (``-v``): INFO always (DEBUG at 2); 0: INFO on a terminal, WARNING when piped;
    -1 (``-q``): WARNING. A ``torchrun`` process with ``RANK`` other than 0 shows errors only.
    Calling it again replaces the handler it added before.
    """
    global _cli_handler
    reset_cli()
    tty = sys.stderr.isatty() if tty is None else tty
    if os.environ.get("RANK", "0") not in ("", "0"):
        level = logging.ERROR
    elif verbosity >= 2:
        level = logging.DEBUG
    elif verbosity == 1 or (verbosity == 0 and tty):
        level = logging.INFO
    else:
        level = logging.WARNING
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = get_logger()
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # the CLI owns stderr: no second copy through a root handler
    _cli_handler = handler


def reset_cli() -> None:
    """Remove what :func:`configure_cli` added (the logger is a library's again)."""
    global _cli_handler
    logger = get_logger()
    if _cli_handler is not None:
        logger.removeHandler(_cli_handler)
        logger.setLevel(logging.NOTSET)
        logger.propagate = True
        _cli_handler = None


def shows(logger: logging.Logger, level: int = logging.INFO) -> bool:
    """Whether a record of ``level`` on ``logger`` reaches a handler that writes somewhere."""
    if not logger.isEnabledFor(level):
        return False
    lg: Optional[logging.Logger] = logger
    while lg is not None:
        if any(not isinstance(h, logging.NullHandler) and h.level <= level for h in lg.handlers):
            return True
        lg = lg.parent if lg.propagate else None
    return False


def say(logger: logging.Logger, msg: str, *, echo: bool = False) -> None:
    """Log ``msg`` at INFO; with ``echo`` (a function's ``progress=True``) print it to stderr when no
    handler would show it (so it is shown once, either way)."""
    if echo and not shows(logger):
        print(msg, file=sys.stderr, flush=True)
    else:
        logger.info(msg)
