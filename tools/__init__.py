"""Tools over recorded data: load it, rebuild books, verify a day (collector.py verify)."""
