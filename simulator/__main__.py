"""python -m simulator: run the loopback Binance until Ctrl-C.

    python -m simulator [--symbols BTCUSDT,ETHUSDT] [--rate 20] [--spot-port 0] [--futures-port 0]
    python -m simulator --replay tests/data           # replay the real captures
    python -m simulator --load --symbols S0000USDT,...  # benchmark traffic (simulator/load.py)
    python -m simulator --load --profile universe --market-symbols spot=1500,futures=550,delivery=50 \
        --spot-port P --futures-port Q --delivery-port R  # the real universe's shape
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
from pathlib import Path

from simulator.server import MarketSim, load_capture


async def serve(args: argparse.Namespace) -> None:
    sims = []
    counts = dict(kv.split("=") for kv in args.market_symbols.split(",")) if args.market_symbols else {}
    ports = [("spot", args.spot_port), ("futures", args.futures_port)]
    if args.delivery_port is not None or "delivery" in counts:
        ports.append(("delivery", args.delivery_port or 0))
    for market, port in ports:
        if counts and market not in counts:
            continue
        kw: dict = dict(updates_per_s=args.rate, seed=args.seed)
        if args.replay:
            kw.update(capture=load_capture(Path(args.replay), market), replay_speed=args.replay_speed)
        elif market in counts:  # generated names: S0000USDT, ... (COIN-M: S0000USD_PERP, ...)
            suffix = "USD_PERP" if market == "delivery" else "USDT"
            kw.update(symbols=[f"S{i:04d}{suffix}" for i in range(int(counts[market]))], load=args.load,
                      load_profile=args.profile, load_writes=args.writes)
        else:
            kw.update(symbols=[s.strip().upper() for s in args.symbols.split(",") if s.strip()], load=args.load,
                      load_profile=args.profile, load_writes=args.writes)
        sim = MarketSim(market, feed=args.feed, **kw)
        await sim.start(args.host, port)
        sims.append(sim)
        print(f"{market}: ws_url = {sim.ws_url}   rest_url = {sim.rest_url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for sim in sims:
        await sim.stop()
    if args.stats:
        # what was sent, for the benchmark: frames, and the µs time of each write by its E (ms)
        stats = {sim.market.name: {"frames": sim.load.frames if sim.load else sim.frames_sent,
                                   "offered_per_s": sim.load.offered_per_s() if sim.load else 0.0,
                                   "weight_by_minute": sim.weight_by_minute,
                                   "skipped_ticks": sim.load.skipped_ticks if sim.load else 0,
                                   "held_writes": sim.load.held_writes if sim.load else 0,
                                   "writes": sim.load.writes if sim.load else {},
                                   "symbol_conns": {s: sorted(c) for s, c in sim.load.symbol_conns.items()}
                                   if sim.load else {},
                                   "sent_us": sim.load.sent_us if sim.load else {}} for sim in sims}
        Path(args.stats).write_text(json.dumps(stats))


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m simulator", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--spot-port", type=int, default=0)
    p.add_argument("--futures-port", type=int, default=0)
    p.add_argument("--delivery-port", type=int, help="also serve COIN-M (delivery) on this port")
    p.add_argument("--market-symbols", help="market=count,...: generated symbols per market, instead of --symbols")
    p.add_argument("--profile", default="flat", choices=["flat", "universe", "finest"],
                   help="load mode: every stream every 100 ms, shaped like the real exchange, or the finest "
                        "data (spot SBE 20/50 ms with --feed sbe, futures every event)")
    p.add_argument("--writes", default="burst", choices=["burst", "each"],
                   help="load mode: a connection's frames of a 10 ms tick in one write (as the exchange pushes "
                        "its 100 ms streams), or every frame its own write, 1 ms ticks (as every-event streams)")
    p.add_argument("--feed", default="json", choices=["json", "sbe"],
                   help="spot: JSON streams, or SBE binary streams (an X-MBX-APIKEY header required)")
    p.add_argument("--symbols", default="BTCUSDT,ETHUSDT,BNBUSDT,SOLUSDT,XRPUSDT")
    p.add_argument("--rate", type=float, default=20.0, help="engine updates per second per symbol")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--replay", metavar="DIR", help="replay the captures in DIR instead of simulating")
    p.add_argument("--replay-speed", type=float, default=1.0)
    p.add_argument("--load", action="store_true", help="benchmark traffic: pre-rendered frames, batched writes")
    p.add_argument("--stats", metavar="FILE", help="at exit, write frames sent (and, with --load, send times) as JSON")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
