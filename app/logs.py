"""Structured JSON logs: one object per line."""

from __future__ import annotations

import json
import logging
import time


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        out.update(getattr(record, "fields", {}))
        if record.exc_info and record.exc_info[1] is not None:
            # the exception in fields of its own: its type and message, and the traceback as one string
            out["exc_type"] = type(record.exc_info[1]).__name__
            out["exc_message"] = str(record.exc_info[1])[:2000]
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


# Loggers of libraries that would otherwise print plain text between the JSON lines: diffusers' own handler, and
# warnings.warn (captured into the logger py.warnings).
LIBRARY_LOGGERS = ("diffusers", "py.warnings")


def route_library_logs() -> None:
    """Library messages go through our handlers instead of being printed beside them."""
    from diffusers.utils import logging as diffusers_logging

    logging.captureWarnings(True)
    diffusers_logging.disable_default_handler()
    diffusers_logging.enable_propagation()


def setup(json_lines: bool = True, level: int = logging.INFO) -> None:
    """One handler on the root logger (JSON lines, or plain lines for the CLI); libraries' messages go through it."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    route_library_logs()


def setup_request_log() -> None:
    """JSON lines for ddim's own loggers and the libraries' even when the server was started by plain uvicorn."""
    route_library_logs()
    for name in ("ddim", "app", *LIBRARY_LOGGERS):
        logger = logging.getLogger(name)
        if not any(isinstance(h.formatter, JsonFormatter) for h in logger.handlers + logging.getLogger().handlers):
            handler = logging.StreamHandler()
            handler.setFormatter(JsonFormatter())
            logger.addHandler(handler)
            if name in ("ddim", "app"):
                logger.setLevel(logging.INFO)
            logger.propagate = False
