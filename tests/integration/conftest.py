"""Fixtures for integration tests."""

from __future__ import annotations

import pytest

from ._util import ExternalBroker


@pytest.fixture
def broker(tmp_path):
    b = ExternalBroker(tmp_path, workers=2)
    try:
        yield b
    finally:
        b.stop()
