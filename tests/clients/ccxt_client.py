"""ccxt pro's `watch_order_book` on `binance` (spot) or `binanceusdm` (USD-M), with only
`exchange.urls` pointed at the replay (see tests/clients/__init__.py)."""
import asyncio
import json
import sys
import time

import ccxt.pro as ccxtpro


async def main(args: dict) -> None:
    exchange = ccxtpro.binance() if args["market"] == "spot" else ccxtpro.binanceusdm()
    api = exchange.urls["api"]
    hosts = {"api.binance.com": args["spot_rest"], "fapi.binance.com": args["futures_rest"],
             "dapi.binance.com": args["delivery_rest"]}
    for key, url in list(api.items()):  # every REST base of the three markets ccxt loads
        if isinstance(url, str) and url.split("/")[2] in hosts:
            api[key] = hosts[url.split("/")[2]] + "/" + url.split("/", 3)[3]
    api["ws"]["spot"] = args["spot_ws"] + "/stream"  # ccxt tells spot by "/stream" in the URL
    api["ws"]["linear"] = args["futures_ws"] + "/ws"
    api["ws"]["inverse"] = args["delivery_ws"] + "/ws"
    symbol = args["symbol"][:-4] + "/USDT" + ("" if args["market"] == "spot" else ":USDT")
    began = time.monotonic()
    try:
        while time.monotonic() - began < args["seconds"]:
            try:
                book = await asyncio.wait_for(exchange.watch_order_book(symbol), args["seconds"])
            except asyncio.TimeoutError:
                break
            print(json.dumps({"t": time.monotonic() - began, "u": book["nonce"], "bids": book["bids"],
                              "asks": book["asks"]}), flush=True)
    finally:
        await exchange.close()


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
