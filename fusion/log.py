"""The `flashfuse` logger. FLASHFUSE_LOG=info|debug switches it on (debug dumps graphs)."""
from __future__ import annotations

import logging
import os

logger = logging.getLogger("flashfuse")


def _configure_from_env() -> None:
    level = os.environ.get("FLASHFUSE_LOG", "").strip().upper()
    if not level:
        return
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(f"FLASHFUSE_LOG={level.lower()!r}: expected one of debug, info, warning, error")
    logger.setLevel(level)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[flashfuse %(levelname)s] %(message)s"))
        logger.addHandler(handler)


_configure_from_env()
