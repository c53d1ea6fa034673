"""On-disk caches for generated artefacts (NVRTC cubins, host shared libraries).

Entries are named by `digest` of everything that determines them (source, flags, compiler version),
so a hit never needs checking; writers go through a temporary file and `os.replace`, so processes
sharing a cache never read half a file.
"""
import hashlib
import os
import pathlib
import threading

from graphconv.errors import BackendError


def cache_dir(kind: str) -> pathlib.Path:
    """`$GRAPHCONV_CACHE/<kind>` or `~/.cache/graphconv/<kind>`, created if missing; BackendError,
    naming the variable and the folder, when it cannot be created or written."""
    env = os.environ.get("GRAPHCONV_CACHE")
    root = env or pathlib.Path.home() / ".cache" / "graphconv"
    path = pathlib.Path(root).expanduser() / kind
    try:
        path.mkdir(parents=True, exist_ok=True)
        why = None if os.access(path, os.W_OK | os.X_OK) else "Permission denied"
    except OSError as e:
        why = e.strerror or type(e).__name__
        if e.filename and os.fsdecode(e.filename) != str(path):
            why += f": {os.fsdecode(e.filename)}"
    if why:
        where = f"GRAPHCONV_CACHE={env}" if env else f"the default cache {root} (GRAPHCONV_CACHE is not set)"
        raise BackendError(f"{where}: cannot create or write the cache folder {path} ({why}); set "
                           f"GRAPHCONV_CACHE to a writable folder")
    return path


def cores() -> int:
    """The cores this process may run on (its affinity mask, which a container or a test worker
    narrows; os.cpu_count() counts the machine's): the compile pools' default width."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def code_of(source: str) -> str:
    """A kernel's source as its compiled code depends on it: every comment-only line blanked (kept as
    an empty line, so line numbers stay). The header comment names the graph's nodes and layers, so
    the same kernel of two graphs (every test's `fc`, a model's copy per stage) was compiled once per
    graph; cache keys built from this compile it once."""
    return "\n".join("" if line.lstrip().startswith("//") else line for line in source.split("\n"))


def digest(*parts) -> str:
    """sha256 (24 hex chars) of the parts; each part is length-prefixed so ("ab","c") != ("a","bc")."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else bytes(part)
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:24]


def temp_path(path: pathlib.Path) -> pathlib.Path:
    """A name beside `path`, unique to this process and thread, to write before `os.replace`."""
    return path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def write_atomic(path: pathlib.Path, data) -> None:
    """Write `data` (str or bytes) to `path` so readers see the old file or the whole new one."""
    tmp = temp_path(path)
    try:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
