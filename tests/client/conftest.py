"""The client's tests run against the shared production-shaped stack (`prod_stack` in tests/conftest.py)."""

from __future__ import annotations

import pytest

from tests.conftest import Stack


@pytest.fixture(scope="package")
def api_key(prod_stack: Stack) -> str:
    """A key made as an operator makes one (`dopsd keys create`)."""
    return prod_stack.create_key("client-tests")
