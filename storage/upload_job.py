"""The service's periodic upload run (every `every_minutes`), off the recording threads;
boto3 is only imported when uploads are enabled."""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

import config as config_mod

if TYPE_CHECKING:
    from storage import upload
from service.threads import RESTART, PipelineThread

log = logging.getLogger("collector")


def make_uploader(cfg: config_mod.Config, progress: bool = False) -> "upload.Uploader":
    from storage import upload  # boto3 is only imported when uploads are used

    creds = upload.Credentials.from_env()
    client = upload.make_client(creds, cfg.upload)
    return upload.Uploader(client, creds, cfg.upload, cfg.collector.data_dir, upload.config_hash(cfg.path),
                           progress=progress, shard="{}/{}".format(*cfg.collector.shard))


class UploadJob(PipelineThread):
    """The service's periodic upload run (every `every_minutes`), off the main thread."""

    # RESTART: a run that failed is retried at the next one; the day files wait on disk
    on_crash = RESTART

    def __init__(self, cfg: config_mod.Config, stop: threading.Event):
        super().__init__(name="uploader", daemon=True)
        self.cfg, self.stop, self.kick = cfg, stop, threading.Event()
        self.last: dict = {}
        self.totals: dict[str, int] = {}
        self.last_run = 0.0  # wall time (s) the last run ended, whatever its outcome
        self.last_success = 0.0  # ... the last run that uploaded every finished day

    def loop(self) -> None:
        from storage.upload import UploadError

        while not self.stop.is_set():
            if self.kick.wait(1.0):
                self.kick.clear()
                try:
                    self.last = make_uploader(self.cfg).run()
                    for k in ("uploaded", "skipped", "deleted"):
                        self.totals[k] = self.totals.get(k, 0) + self.last[k]
                    if self.last["days_failed"]:
                        log.error("upload: days still not uploaded: %s", ", ".join(self.last["days_failed"]))
                    else:
                        self.last_success = time.time()
                except UploadError as e:
                    log.error("%s", e)
                except Exception:  # boto3 and network errors of every kind: the next run tries again
                    log.error("upload run failed; retried at the next run", exc_info=True)
                self.last_run = time.time()
