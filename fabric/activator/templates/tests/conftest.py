"""Builds {{name}} once per test session with `fabricd activator build` (the same fixed
flags and pinned zig as the shipped activators) into a temp dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from fabric.activator.project import build_project

PROJECT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def wasm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_project(PROJECT, tmp_path_factory.mktemp("build") / "{{name}}.wasm").path
