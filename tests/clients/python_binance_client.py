"""python-binance's `ThreadedDepthCacheManager` (spot: a book from REST depth and the diff
stream; USD-M: the partial depth stream, as the library does it), with only its base URL
class attributes pointed at the replay (see tests/clients/__init__.py). The library keeps
no update id, so each book is named by its event time `E` (ms)."""
import json
import sys
import threading
import time

from binance import AsyncClient, ThreadedDepthCacheManager
from binance.ws.streams import BinanceSocketManager


def main(args: dict) -> None:
    AsyncClient.API_URL = args["spot_rest"] + "/api"
    AsyncClient.FUTURES_URL = args["futures_rest"] + "/fapi"
    AsyncClient.FUTURES_COIN_URL = args["delivery_rest"] + "/dapi"
    BinanceSocketManager.STREAM_URL = args["spot_ws"] + "/"
    BinanceSocketManager.FSTREAM_URL = args["futures_ws"] + "/"
    BinanceSocketManager.DSTREAM_URL = args["delivery_ws"] + "/"
    began = time.monotonic()
    lock = threading.Lock()

    def on_book(cache) -> None:
        with lock:
            print(json.dumps({"t": time.monotonic() - began, "E": cache.update_time, "bids": cache.get_bids(),
                              "asks": cache.get_asks()}), flush=True)

    manager = ThreadedDepthCacheManager()
    manager.start()
    if args["market"] == "spot":
        manager.start_depth_cache(on_book, symbol=args["symbol"], limit=1000)
    else:
        manager.start_futures_depth_socket(on_book, symbol=args["symbol"])
    time.sleep(args["seconds"])
    manager.stop()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
