"""The `flashfuse` logger (standard `logging`). FLASHFUSE_LOG=info|debug switches it on:
info lists every fusion and near-miss as graphs are compiled; debug also dumps each graph after
normalization and after every pass that rewrote it.

    FLASHFUSE_LOG=debug python train.py
    flashfuse.log.configure("info")          # the same from code
    logging.getLogger("flashfuse")            # or configure it like any other logger
"""
from __future__ import annotations

import logging
import os
import warnings

logger = logging.getLogger("flashfuse")

LEVELS = ("debug", "info", "warning", "error")
_OFF = ("", "0", "off", "none", "false")
_ON = ("1", "on", "true", "yes")  # plain "switch it on" means info
_handler: logging.Handler | None = None


def configure(level: str | int | None) -> None:
    """Set the flashfuse logger's level and give it a stderr handler (once). None or "off" silences
    flashfuse's own handler and resets the level, leaving any handlers the application added."""
    global _handler
    if level is None or (isinstance(level, str) and level.strip().lower() in _OFF):
        logger.setLevel(logging.NOTSET)
        if _handler is not None:
            logger.removeHandler(_handler)
            _handler = None
        return
    if isinstance(level, str):
        name = level.strip().lower()
        name = "info" if name in _ON else name
        if name not in LEVELS:
            raise ValueError(f"flashfuse: unknown log level {level!r}; expected one of {list(LEVELS)}")
        level = getattr(logging, name.upper())
    logger.setLevel(level)
    if _handler is None:
        _handler = logging.StreamHandler()
        _handler.setFormatter(logging.Formatter("[flashfuse %(levelname)s] %(message)s"))
        logger.addHandler(_handler)


def configure_from_env() -> None:
    """Apply FLASHFUSE_LOG. A bad value warns instead of raising: a typo in an environment variable
    must not stop `import flashfuse` (and with it every torch.compile in the program)."""
    value = os.environ.get("FLASHFUSE_LOG", "")
    try:
        configure(value)
    except ValueError:
        warnings.warn(f"FLASHFUSE_LOG={value!r} ignored: expected one of {list(LEVELS)}, 1 (info) or 0 (off)",
                      stacklevel=2)


configure_from_env()
