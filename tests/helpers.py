"""Shared test helpers: run the real collector as a subprocess, read what it wrote."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds

ROOT = Path(__file__).resolve().parent.parent
# Real Binance captures (from cryptofeed's sample data), kept in the repo so
# that CI on a fresh machine has them.
SHARED_DATA = ROOT / "tests" / "data"


def data_dir_for(tmp_path: Path) -> Path:
    return tmp_path / "data"


def market_section(name: str, sim, symbols, **extra) -> str:
    keys = dict(symbols=", ".join(symbols), ws_url=sim.ws_url, rest_url=sim.rest_url, **extra)
    return f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())


def write_config(tmp_path: Path, sections: list[str], **collector) -> Path:
    keys = {"data_dir": "data", "flush_interval": "0.5", "status_interval": "2", "metrics_listen": "127.0.0.1:0",
            **collector}
    text = "[collector]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()) + "\n".join(sections)
    path = tmp_path / "config.ini"
    path.write_text(text)
    return path


class CollectorProcess:
    """The real collector.py in a subprocess; stderr is captured to a file."""

    def __init__(self, config: Path | None, *args: str, env: dict[str, str] | None = None, folder: Path | None = None):
        """`config` None: a command that reads none (replay), run in `folder`."""
        folder = config.parent if config is not None else folder
        assert folder is not None
        self.log_path = folder / "collector.log"
        self.log_file = open(self.log_path, "wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        env.pop("JOURNAL_STREAM", None)
        config_args = ["--config", str(config)] if config is not None else []
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "collector.py"), *args, *config_args],
                                     stdout=subprocess.PIPE, stderr=self.log_file, env=env, cwd=folder)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log:
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"collector exited {self.proc.returncode} before {text!r}:\n{self.log}")
            time.sleep(0.1)
        raise AssertionError(f"{text!r} not logged within {timeout}s:\n{self.log}")

    def stop(self, sig=signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self.log_file.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log_file.close()


def run_to_exit(config: Path, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "collector.py"), *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=timeout, cwd=config.parent)


def read_kind(data_dir: Path, market: str, kind: str) -> pa.Table:
    folder = data_dir / market / kind
    files = sorted(folder.rglob("*.parquet"))
    if not files:
        return pa.table({})
    return ds.dataset(files, format="parquet").to_table()


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError("condition not met in time")
