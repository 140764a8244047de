"""Third-party Binance clients pointed at `collector.py replay` (tests/test_clients.py).

Each `<client>.py` runs in the client's own venv (`.clients/<client>/`, from
`<client>.txt`: their pinned dependencies clash with the project's and with one another),
is given only the replay's URLs, a market, a symbol and how long to run, and prints one
JSON line per book the library hands it: `{"t": seconds since it started, "u": the
book's update id (or "E": its event time in ms, where the library keeps no id),
"bids": [[price, size], ...], "asks": [...]}`. The test compares those books with the
recording.
"""
