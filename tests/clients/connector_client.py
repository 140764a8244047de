"""Binance's official connectors: binance-connector (spot) and binance-futures-connector
(USD-M), given only the replay's URLs, keeping a local book by Binance's documented
procedure: open the diff stream and buffer it (here: until a diff came), take REST depth,
drop the buffered diffs it holds, the first applied one joins it (spot `U <= id + 1 <= u`,
futures `U <= id <= u`), then each continues the last (spot `U = u + 1`, futures
`pu = u`), or start over from a new snapshot with the diffs still buffered (see
tests/clients/__init__.py)."""
import collections
import json
import queue
import sys
import time


def main(args: dict) -> None:
    spot = args["market"] == "spot"
    if spot:
        from binance.spot import Spot as Rest
        from binance.websocket.spot.websocket_stream import SpotWebsocketStreamClient as Stream
        rest, stream = Rest(base_url=args["spot_rest"]), Stream
        ws_url = args["spot_ws"]
    else:
        from binance.um_futures import UMFutures as Rest
        from binance.websocket.um_futures.websocket_client import UMFuturesWebsocketClient as Stream
        rest, stream = Rest(base_url=args["futures_rest"]), Stream
        ws_url = args["futures_ws"]
    began = time.monotonic()
    events: queue.Queue = queue.Queue()

    def on_message(_, text: str) -> None:
        message = json.loads(text)
        if message.get("e") == "depthUpdate":
            events.put(message)

    client = stream(stream_url=ws_url, on_message=on_message)
    client.diff_book_depth(args["symbol"].lower(), speed=100, id=1)
    bids: dict[str, str] = {}
    asks: dict[str, str] = {}
    last = None  # the book's update id; None: (re)start from a snapshot
    backlog: collections.deque = collections.deque()  # buffered diffs not looked at since the last snapshot
    seen: list[dict] = []                              # diffs looked at since the last snapshot

    def next_diff() -> dict:
        return backlog.popleft() if backlog else events.get(timeout=1)

    try:
        while time.monotonic() - began < args["seconds"]:
            try:
                if last is None:
                    backlog.appendleft(next_diff())  # a diff buffered first, as the procedure says
                    snap = rest.depth(args["symbol"], limit=1000)
                    bids = {p: q for p, q in snap["bids"]}
                    asks = {p: q for p, q in snap["asks"]}
                    last, joined, seen = snap["lastUpdateId"], False, []
                e = next_diff()
            except queue.Empty:
                continue
            seen.append(e)
            if (e["u"] < last) if not spot else (e["u"] <= last):
                continue  # already in the snapshot
            if not joined:
                ok = e["U"] <= last <= e["u"] if not spot else e["U"] <= last + 1 <= e["u"]
            else:
                ok = e["pu"] == last if not spot else e["U"] == last + 1
            if not ok:  # start over, with what is buffered
                backlog.extendleft(reversed(seen))
                last = None
                continue
            joined = True
            for side, levels in ((bids, e["b"]), (asks, e["a"])):
                for p, q in levels:
                    if float(q) == 0:
                        side.pop(p, None)
                    else:
                        side[p] = q
            last = e["u"]
            print(json.dumps({"t": time.monotonic() - began, "u": last,
                              "bids": sorted(([float(p), float(q)] for p, q in bids.items()), reverse=True),
                              "asks": sorted([float(p), float(q)] for p, q in asks.items())}), flush=True)
    finally:
        client.stop()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
