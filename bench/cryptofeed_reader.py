"""cryptofeed reading the same diff streams once (one connection a market), for the benchmark's
comparison: its order books kept with cryptofeed's own code, every update counted.

Runs in an interpreter that has cryptofeed (its own virtual environment: `bench/run.py
--cryptofeed` makes it, once, and starts this); it imports nothing of the project.

    python bench/cryptofeed_reader.py SECONDS WARMUP SPOT_PORT FUTURES_PORT SYMBOL [SYMBOL ...]

cryptofeed connects to Binance's addresses; here its endpoint tables point at the
simulator on 127.0.0.1 instead (it accepts only wss:// addresses: the one it opens is
turned back into the simulator's ws:// at the connect, so neither side pays for TLS, as
neither does for the collector). It subscribes `<symbol>@depth@100ms` (its L2_BOOK), takes
a REST snapshot of each symbol (100 levels: at 1,000, the default, a few hundred symbols'
snapshots pass the exchange's weight limit and most books never sync) and applies every
diff. After WARMUP seconds it counts the messages its feeds handle and its CPU for
SECONDS, prints `<messages> <cpu seconds>` and exits.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from typing import Any

import cryptofeed.connection
from cryptofeed import FeedHandler
from cryptofeed.connection import RestEndpoint, Routes, WebsocketEndpoint
from cryptofeed.defines import L2_BOOK
from cryptofeed.exchanges import Binance, BinanceFutures


def point_at(feed: Any, port: int, prefix: str) -> None:
    """The feed class's endpoints, with the simulator's address in place of Binance's."""
    rest = feed.rest_endpoints[0]
    feed.websocket_endpoints = [WebsocketEndpoint(f"wss://127.0.0.1:{port}", options={"compression": None})]
    feed.rest_endpoints = [RestEndpoint(f"http://127.0.0.1:{port}", routes=Routes(
        rest.routes.instruments, l2book=f"/{prefix}/depth?symbol={{}}&limit={{}}"))]


def main() -> None:
    seconds, warmup = float(sys.argv[1]), float(sys.argv[2])
    spot_port, futures_port, symbols = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:]
    logging.disable(logging.CRITICAL)
    connect = cryptofeed.connection.connect
    cryptofeed.connection.connect = lambda address, **kw: connect(address.replace("wss://", "ws://", 1), **kw)
    point_at(Binance, spot_port, "api/v3")
    point_at(BinanceFutures, futures_port, "fapi/v1")
    counted = {"n": 0, "on": False}

    async def book(_book: Any, _receipt_timestamp: float) -> None:
        pass

    def counting(feed: Any) -> Any:
        """The feed, its every message counted (cryptofeed's own handler does the work)."""
        handle = feed.message_handler

        async def message_handler(msg: str, conn: Any, timestamp: float) -> None:
            if counted["on"]:
                counted["n"] += 1
            await handle(msg, conn, timestamp)

        feed.message_handler = message_handler
        return feed

    async def window() -> None:
        await asyncio.sleep(warmup)
        cpu0 = time.process_time()
        counted["on"] = True
        await asyncio.sleep(seconds)
        counted["on"] = False
        print(counted["n"], time.process_time() - cpu0, flush=True)
        os._exit(0)  # cryptofeed's own shutdown waits on its connections

    fh = FeedHandler(config={"log": {"disabled": True}, "uvloop": False})
    spot = [f"{s[:-4]}-USDT" for s in symbols]
    fh.add_feed(counting(Binance(symbols=spot, channels=[L2_BOOK], callbacks={L2_BOOK: book}, max_depth=100)))
    fh.add_feed(counting(BinanceFutures(symbols=[f"{s}-PERP" for s in spot], channels=[L2_BOOK],
                                        callbacks={L2_BOOK: book}, max_depth=100)))
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    loop.create_task(window())
    fh.run(start_loop=True, install_signal_handlers=False)


if __name__ == "__main__":
    main()
