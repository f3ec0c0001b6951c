"""The distributed tests need TorchRec (the optional extra). Where it is missing they are
skipped, except under CI (CI=true), which installs it and must run them."""

from __future__ import annotations

import os

import pytest

from hmoe.distributed import INSTALL, available


def pytest_collection_modifyitems(config, items):
    if available():
        return
    if os.environ.get("CI", "").lower() in ("1", "true"):
        raise pytest.UsageError(f"CI must run the distributed tests, but TorchRec is missing: "
                                f"{INSTALL}")
    skip = pytest.mark.skip(reason=f"TorchRec is not installed: {INSTALL}")
    for item in items:
        if "tests/distributed" in str(item.fspath):
            item.add_marker(skip)
