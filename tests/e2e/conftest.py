"""Shared fixtures for end-to-end tests: a sandbox of namespaces removed after each test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fabric.tools.sandbox import Sandbox, prerequisites


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    why = prerequisites()
    for item in items:
        if "tests/e2e" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)
            if why:
                item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    sb = Sandbox("fbt")
    try:
        yield sb
    finally:
        sb.close()
