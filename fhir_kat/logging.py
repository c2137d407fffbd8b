"""Structured (JSON lines) logging with no PHI.

Owns: the log format, and keeping the WSGI server's own log lines free of what clients sent.
Callers log ids, routes, statuses and issue codes as ``extra`` fields — never names, PHNs, birth
dates, addresses, free text, request bodies or query strings.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                payload[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            # The exception type and where it happened; the message can quote input values.
            exc_type, _, tb = record.exc_info
            frames = []
            while tb is not None:
                frames.append(f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}")
                tb = tb.tb_next
            payload["exc_type"] = exc_type.__name__
            payload["where"] = frames[-3:]
        return json.dumps(payload, default=str)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at emit time (a redirected or captured stderr
    included), like the logging module's own last-resort handler."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


class _ServerLogFilter(logging.Filter):
    """The WSGI server's own log lines, without what a client sent.

    gunicorn's error log quotes a malformed request line or header ("Invalid request from
    ip=…: Invalid HTTP Version: 'HTTP/1.1 <anything>'") and the URI of a request that failed in
    the server; its access log, when an operator turns it on, holds every request line with its
    query string. The service logs every request itself (route pattern only), so access lines
    are dropped and the others keep their first words only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "gunicorn.access":
            return False
        message = record.getMessage()
        for prefix in ("Invalid request from", "Error handling request"):
            if message.startswith(prefix):
                head, _, rest = message.partition(": ")
                kind = rest.split(":", 1)[0].split("'", 1)[0].split('"', 1)[0].strip()
                record.msg = f"{head}: {kind}" if kind and prefix[0] == "I" else prefix
                record.args = ()
        return True


def configure_logging(level: str = "INFO") -> None:
    logger = logging.getLogger("fhir_kat")
    logger.setLevel(level)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(JsonFormatter())
        logger.addHandler(handler)
    logger.propagate = False
    for name in ("gunicorn.error", "gunicorn.access"):
        server_logger = logging.getLogger(name)
        if not any(isinstance(f, _ServerLogFilter) for f in server_logger.filters):
            server_logger.addFilter(_ServerLogFilter())
