"""The research API over recorded data: load rows, rebuild books (`book_at`, `books`), and
the code behind `collector.py verify`, `report` and `export` (docs/research.md)."""
