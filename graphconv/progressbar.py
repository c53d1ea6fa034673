"""The progress bar of the long-running commands (train, demo): tqdm on stderr where it is installed."""
import sys


def progress(items, desc, mode):
    """A tqdm progress bar on stderr when tqdm is installed and stderr is a terminal (or forced)."""
    if mode == "off":
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, leave=False, disable=None if mode == "auto" else False, file=sys.stderr)
