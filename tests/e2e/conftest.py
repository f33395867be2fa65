"""End-to-end tests are marked and skipped where namespaces cannot be made (the sandbox
fixture, shared with the soak, is in tests/conftest.py)."""

from __future__ import annotations

import pytest

from fabric.tools.sandbox import prerequisites


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    why = prerequisites()
    for item in items:
        if "tests/e2e" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)
            if why:
                item.add_marker(pytest.mark.skip(reason=why))
