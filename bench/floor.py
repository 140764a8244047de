"""The floor: a bare websocket-client reader of the same streams, best settings
(skip_utf8_validation=True), recv and discard. Prints frames received and CPU seconds used, then exits.

    python bench/floor.py SECONDS URL [URL ...]
"""
from __future__ import annotations

import os
import sys
import threading
import time

import websocket


def read(url: str, until: float, counts: list, i: int) -> None:
    key = os.environ.get("BINANCE_API_KEY")  # what SBE streams require at the handshake
    ws = websocket.create_connection(url, skip_utf8_validation=True, timeout=5,
                                     header=[f"X-MBX-APIKEY: {key}"] if key else [])
    recv = ws.recv_data
    n = 0
    while time.monotonic() < until:
        recv()
        n += 1
    counts[i] = n
    ws.close()


def main() -> None:
    seconds, urls = float(sys.argv[1]), sys.argv[2:]
    until = time.monotonic() + seconds
    cpu0 = time.process_time()
    counts = [0] * len(urls)
    threads = [threading.Thread(target=read, args=(u, until, counts, i)) for i, u in enumerate(urls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(sum(counts), time.process_time() - cpu0, flush=True)


if __name__ == "__main__":
    main()
