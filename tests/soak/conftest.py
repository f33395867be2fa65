"""The soak runs only when asked for (`make soak`, which sets FABRICD_SOAK_SECONDS): it
takes ten minutes and the whole machine."""

from __future__ import annotations

import os

import pytest

from fabric.tools.sandbox import prerequisites


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    why = prerequisites()
    for item in items:
        if "tests/soak" in str(item.fspath):
            item.add_marker(pytest.mark.soak)
            if "FABRICD_SOAK_SECONDS" not in os.environ:
                item.add_marker(pytest.mark.skip(reason="the soak runs with `make soak`"))
            elif why:
                item.add_marker(pytest.mark.skip(reason=why))
