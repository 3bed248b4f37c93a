"""What glibc's mmap threshold does to a socket read the way asyncio makes it.

``python bench/malloc_reads.py [THRESHOLD_BYTES]``: 200,000 times, 120 bytes sent over a socket
pair and read with ``recv(262144)`` (asyncio reads every socket into a 256 KiB buffer and
shrinks it to what came), then 2,000 buffers of 1 MiB made and dropped; CPU time of each, per
operation. With a threshold, it is fixed first (``mallopt``), as ``gridserver._tune_malloc``
does; without, glibc's default applies. Linux with glibc only.
"""

from __future__ import annotations

import ctypes
import socket
import sys
import time


def main() -> None:
    libc = ctypes.CDLL("libc.so.6")
    threshold = int(sys.argv[1]) if len(sys.argv) > 1 else None
    if threshold is not None:
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, threshold)  # M_TRIM_THRESHOLD
    a, b = socket.socketpair()
    message, n = b"x" * 120, 200_000
    t0 = time.process_time()
    for _ in range(n):
        a.send(message)
        b.recv(262144)
    reads = (time.process_time() - t0) / n
    t0 = time.process_time()
    for _ in range(2000):
        block = b"y" * (1 << 20)
        del block
    big = (time.process_time() - t0) / 2000
    print(f"threshold {threshold if threshold is not None else 'glibc default'}: send + recv(256 KiB) "
          f"{reads * 1e6:.2f} us, a 1 MiB buffer {big * 1e6:.1f} us")


if __name__ == "__main__":
    main()
