import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from factory import write_fake_phase4c  # noqa: E402


@pytest.fixture(scope="session")
def fake_phase4c(tmp_path_factory):
    """A small Phase 4c-contract dataset: 256 train, 128 val, 128 test rows, half positives."""
    root = tmp_path_factory.mktemp("phase4c")
    return write_fake_phase4c(root, {"train": 256, "val": 128, "test": 128})
