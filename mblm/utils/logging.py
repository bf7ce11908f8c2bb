"""Loggers writing to a file of a run directory (or stderr), one handler per logger."""

from __future__ import annotations

import logging
from pathlib import Path

_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"
_OWN_HANDLER = "_mblm_handler"


def create_logger(
    name: str,
    *,
    log_dir: str | Path | None = None,
    noop: bool = False,
) -> logging.Logger:
    """The logger ``name``, logging DEBUG and above to ``<log_dir>/<name>.log`` (the directory
    is created), to stderr when ``log_dir`` is None, or nowhere when ``noop``.

    Calling it again for the same name replaces the handler it added before (so a second trainer
    in one process does not also write into the first one's file). Messages do not propagate to
    the root logger.
    """
    logger = logging.getLogger(name)
    for handler in list(logger.handlers):
        if getattr(handler, _OWN_HANDLER, False):
            logger.removeHandler(handler)
            handler.close()
    if noop:
        handler: logging.Handler = logging.NullHandler()
    elif log_dir:
        directory = Path(log_dir)
        directory.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(directory / f"{name}.log", encoding="utf8")
    else:
        handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(_FORMAT))
    setattr(handler, _OWN_HANDLER, True)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    return logger


def shutdown_log_handlers() -> None:
    logging.shutdown()
