"""The Binance protocol served from this machine: the exchange server that `replay` and the
loopback simulator both use, and the replay of a recorded day."""
