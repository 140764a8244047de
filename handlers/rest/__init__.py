"""The exchange's REST side: snapshots, listings, the clock sample, exchangeInfo."""
