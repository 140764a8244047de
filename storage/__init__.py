"""Parquet side of the collector: schemas, column buffers, part files, compaction."""
