"""Real Binance captures (tests/data, from cryptofeed's sample data) as a replay source.

`*.ws.1.0`: first line is the URL opened, then `RECEIVE_TIME: {"stream":..,"data":..}`.
`*.http.0.0`: `URL -> RECEIVE_TIME: BODY`, one REST call per line.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import orjson


@dataclass
class Capture:
    frames: list[tuple[float, str, bytes]]   # (receive time s, stream, data payload)
    snapshots: dict[str, bytes]              # SYMBOL -> REST depth body
    snapshot_limits: dict[str, int]
    symbols: list[str]

    @property
    def depth_streams(self) -> set[str]:
        return {name for _, name, _ in self.frames if "@depth" in name}

    @classmethod
    def load(cls, ws_file: Path, http_file: Path) -> "Capture":
        frames = []
        with open(ws_file, encoding="utf-8") as f:
            next(f)  # the URL line
            for line in f:
                if not line.strip():
                    continue
                stamp, _, body = line.partition(": ")
                msg = orjson.loads(body)
                frames.append((float(stamp), msg["stream"], orjson.dumps(msg["data"])))
        snapshots: dict[str, bytes] = {}
        limits: dict[str, int] = {}
        with open(http_file, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                url, _, rest = line.partition(" -> ")
                _, _, body = rest.partition(": ")
                q = parse_qs(urlsplit(url).query)
                symbol = q["symbol"][0].upper()
                snapshots.setdefault(symbol, body.strip().encode())
                limits.setdefault(symbol, int(q.get("limit", ["100"])[0]))
        return cls(frames, snapshots, limits, sorted(snapshots))
