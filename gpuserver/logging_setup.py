"""Logging to stdout and logs/unified_server.log, each line tagged with its session."""

from __future__ import annotations

import contextvars
import logging
import logging.handlers
import re
import sys
from pathlib import Path

LOG_FILE = "unified_server.log"
FORMAT = "%(asctime)s %(levelname)-7s %(name)s [%(session)s] %(message)s"

# Set while a WebSocket's session runs; tasks it starts inherit it.
session_context: contextvars.ContextVar[str] = contextvars.ContextVar("session", default="-")


# Secrets clients put in a URL's query (browsers' WebSockets cannot send headers): the
# server token and a session's resume key.
_QUERY_SECRET = re.compile(r"([?&](?:access_token|token|resume_key)=)[^&\s\"']*", re.IGNORECASE)


class _SessionFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.session = session_context.get()
        return True


class _ClientFaultsWithoutTraceback(logging.Filter):
    """uvicorn logs a client's invalid UTF-8 text frame with a traceback: one line is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "uvicorn.error" and str(record.msg).startswith("Invalid UTF-8"):
            record.msg = "a client sent a text frame that is not UTF-8: closed with 1007"
            record.args = ()
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class _RedactTokens(logging.Filter):
    """Blanks `token=` and `resume_key=` values in every line, e.g. uvicorn's
    `"WebSocket /ws?token=…"`."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            return True  # a broken format: the handler reports it
        if "token=" in message.lower() or "resume_key=" in message.lower():
            record.msg, record.args = _QUERY_SECRET.sub(r"\1***", message), None
        return True


def configure_logging(
    level: str = "INFO",
    log_dir: Path | None = Path("logs"),
    *,
    file_name: str = LOG_FILE,
    tag: str | None = None,
) -> None:
    """Idempotent: replaces the handlers a previous call installed.

    `tag` goes on every line (a cluster replica puts its id there); processes sharing a log
    directory need their own `file_name`.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_gpuserver", False)]:
        root.removeHandler(handler)
        handler.close()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(
            logging.handlers.RotatingFileHandler(
                log_dir / file_name, maxBytes=20 * 1024 * 1024, backupCount=5, encoding="utf-8"
            )
        )
    for handler in handlers:
        handler._gpuserver = True  # type: ignore[attr-defined]
        handler.setFormatter(logging.Formatter(FORMAT if tag is None else f"[{tag}] {FORMAT}"))
        handler.addFilter(_SessionFilter())
        handler.addFilter(_ClientFaultsWithoutTraceback())
        handler.addFilter(_RedactTokens())
        root.addHandler(handler)
    root.setLevel(level.upper())
    # aiortc/aioice are chatty at INFO about every packet-level event.
    for noisy in ("aioice", "aiortc", "av"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
