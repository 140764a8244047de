"""Helper processes: one way to start a child of the collector (the stamp relays, the
compaction child), so that every helper is found, started and ended alike.

    spawn("handlers.ingest.relay_process", [...])   python -m handlers.ingest.relay_process ..., from the code's folder

- the program is this interpreter running a module of this code (`python -m`), or a
  program built with this code (`spawn_program`), from the code's folder, whatever the
  collector's working directory;
- its own session: a Ctrl-C in a terminal is for the collector, which ends its helpers in
  its stop order (systemd's SIGTERM still reaches every process of the unit: each helper
  says what it does with it);
- stdin from /dev/null, stdout to /dev/null unless asked; stderr is the collector's, so
  the helper's log lines go to the same journal.

A long-lived helper (`Helper`) also says when it is ready, and its supervisor restarts
it with a backoff when it dies (`service.supervisor`).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Protocol, Sequence

CODE = Path(__file__).resolve().parent.parent  # the folder `python -m <module>` runs from


def spawn(module: str, args: Sequence[str], pass_fds: Sequence[int] = (), stdout: int | None = subprocess.DEVNULL
          ) -> subprocess.Popen:
    """Start `python -m module args...` as a helper of the collector (see the module's docstring)."""
    return spawn_program([sys.executable, "-m", module, *args], pass_fds, stdout)


def spawn_program(argv: Sequence[str], pass_fds: Sequence[int] = (), stdout: int | None = subprocess.DEVNULL
                  ) -> subprocess.Popen:
    """Start a helper that is a program of its own (the stamp relay's compiled loop), alike."""
    return subprocess.Popen(list(argv), cwd=CODE, pass_fds=tuple(pass_fds),
                            stdin=subprocess.DEVNULL, stdout=stdout, start_new_session=True)


class Helper(Protocol):
    """A long-lived helper process, as its supervisor sees it."""

    name: str
    restarts: int

    def start(self) -> bool:
        """Start it and wait until it says it is ready; False (logged) if it could not be had."""

    def alive(self) -> bool:
        """Started, ready and still running."""

    def exit_status(self) -> int | None:
        """The status it exited with, if it did (None while running or never started)."""

    def close(self) -> None:
        """End it and reap it."""
