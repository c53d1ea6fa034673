"""Golden files: LeNet-5's text and JSON dumps at every stage, byte for byte. A deliberate change to a
printer or a pass rewrites them with `python tests/test_golden.py` (then review the diff)."""
import pathlib

import pytest

from graphconv.models import lenet5
from graphconv.pipeline import STAGES, build
from graphconv.printer import FORMATS

GOLDEN = pathlib.Path(__file__).parent / "golden"
CASES = [(stage, fmt) for stage in STAGES for fmt in ("text", "json")]


def dump(stage, fmt) -> str:
    return FORMATS[fmt](build(lenet5(), stage))


def path_of(stage, fmt):
    return GOLDEN / f"lenet5.{stage}.{'txt' if fmt == 'text' else 'json'}"


@pytest.mark.parametrize("stage,fmt", CASES)
def test_lenet5_dumps_match_their_golden_files(stage, fmt):
    assert dump(stage, fmt) == path_of(stage, fmt).read_text(), \
        f"{path_of(stage, fmt).name} differs: if the change is meant, run `python tests/test_golden.py` and review"


if __name__ == "__main__":
    GOLDEN.mkdir(exist_ok=True)
    for stage, fmt in CASES:
        path_of(stage, fmt).write_text(dump(stage, fmt))
        print("wrote", path_of(stage, fmt))
