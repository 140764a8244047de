"""Logging set-up shared by the collector and its compaction child: lines for journald
(syslog priorities, no timestamps) or, in a terminal, with a short local time."""
from __future__ import annotations

import logging
import os
import sys


class JournalFormatter(logging.Formatter):
    """`<N>` syslog priority prefixes so that `journalctl -p err` filters; no timestamps
    (journald adds them). In a terminal: a short local time instead."""

    PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def __init__(self, journald: bool):
        fmt = "%(levelname)s %(threadName)s %(name)s: %(message)s"
        super().__init__(fmt if journald else "%(asctime)s " + fmt, datefmt="%H:%M:%S")
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if self.journald:
            prefix = f"<{self.PRIORITY.get(record.levelno, 6)}>"
            text = "\n".join(prefix + line for line in text.splitlines())
        return text


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JournalFormatter(journald="JOURNAL_STREAM" in os.environ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    logging.getLogger("websocket").setLevel(logging.CRITICAL)
