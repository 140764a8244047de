"""The collector's memory settings, measured (BENCHMARKS.md): the cyclic GC, glibc's malloc
arenas and thresholds, and Arrow's allocator (chosen through the environment in
collector.py, before pyarrow loads)."""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os

log = logging.getLogger("collector")

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # mallopt parameters (malloc.h)


def tune_gc() -> None:
    """The processor holds up to a second of parsed frames (many small lists) between
    builds; with the default thresholds the cyclic GC rescans them hundreds of times a
    second, which measured as half the decode cost. Nothing on the hot path makes cycles,
    so: freeze what start-up made, and collect the young generation less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)


def tune_memory() -> None:
    """Measured (BENCHMARKS.md): glibc limited to 2 malloc arenas (it would make one per
    thread, and there is a thread per connection) cut peak RSS by a sixth and CPU per
    message by a quarter at 10,000 msgs/s. Must run before the threads start. Arrow's
    buffers have their own allocator: see the top of this file and `check_arrow_pool`."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_ARENA_MAX, 2)
        # Buffers up to 16 MiB come from the heap, and up to 16 MiB free at its top stay
        # there: Arrow's ZSTD makes (and frees) a compression workspace of several MiB for
        # every page it compresses; mapped and unmapped each time (or trimmed off the
        # heap and taken back), its pages faulted in again on every page: ZSTD-9 part
        # files cost 7.4 µs a message instead of 4.3 (BENCHMARKS.md, Memory).
        libc.mallopt(_M_MMAP_THRESHOLD, 16 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 16 << 20)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def check_arrow_pool() -> str:
    """The allocator of Arrow's C++ side, logged at start-up. A pyarrow build without
    jemalloc falls back to mimalloc, which held 30-70 MiB more than glibc at 2,000 symbols
    (BENCHMARKS.md, Memory): then at least the arrays Python builds come from
    glibc, and the log says so."""
    import pyarrow as pa

    name = pa.default_memory_pool().backend_name
    wanted = os.environ["ARROW_DEFAULT_MEMORY_POOL"]
    if name != wanted:
        pa.set_memory_pool(pa.system_memory_pool())
        log.warning("this pyarrow has no %s allocator: Arrow's C++ side uses %s, Python's arrays the system "
                    "allocator; expect a higher RSS", wanted, name)
    else:
        conf = os.environ.get("JE_ARROW_MALLOC_CONF", "") if name == "jemalloc" else ""
        log.info("arrow memory pool: %s%s", name, f" ({conf})" if conf else "")
    return name
