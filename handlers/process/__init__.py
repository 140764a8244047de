"""From frames to rows: the processor, continuity, parsing, journal recovery."""
