"""Shared fixtures: the loopback sshd and PostgreSQL servers, and daemon clean-up."""

from collections.abc import Iterator

import pytest

from tests.site import kill_leftovers

pytest_plugins = ["tests.sshd_fixture", "tests.pg_fixture"]


@pytest.fixture(autouse=True)
def _no_daemon_outlives_its_test() -> Iterator[None]:
    """A test that fails before stopping its daemon must not leave it running."""
    yield
    kill_leftovers()
