"""A loopback Binance (Spot and USD-M Futures) for tests, benchmarks and demos.

    python -m simulator                  # both markets on 127.0.0.1, prints the URLs

See simulator/server.py for what it speaks and simulator/book.py for how its books move.
"""
from simulator.server import Faults, MarketSim, Simulator

__all__ = ["Faults", "MarketSim", "Simulator"]
