"""How much memory the machine can give, and the check that refuses work that would not fit,
before NumPy tries to allocate it (a MemoryError deep inside a reference is no message)."""
from __future__ import annotations

import os

from .errors import ResourceError


def available_bytes() -> int:
    """Memory available to this process now: MemAvailable from /proc/meminfo where it exists,
    else the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not a POSIX system
        return 1 << 62


def fmt_bytes(n) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024


def check_fits(nbytes, what, advice="", available=None):
    """Raise ResourceError when `nbytes` exceeds the memory available now."""
    available = available_bytes() if available is None else available
    if nbytes > available:
        hint = f"; {advice}" if advice else ""
        raise ResourceError(f"{what}: about {fmt_bytes(nbytes)} of memory needed, only {fmt_bytes(available)} "
                            f"available{hint}")


def smaller(nbytes, batch, available=None) -> str:
    """The advice for work of `nbytes` at `batch` examples that does not fit: a smaller batch, or,
    where one example alone would not fit (huge --dim sizes), smaller input sizes."""
    available = available_bytes() if available is None else available
    batch = max(int(batch or 1), 1)
    if nbytes / batch <= available:
        return "use a smaller batch"
    return (f"one example alone needs about {fmt_bytes(nbytes / batch)}: use smaller input sizes (--dim, or the "
            f"graph's input shape)")
