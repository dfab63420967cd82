"""Shared fixtures: a local site (buffer, holding, endpoint) and a way to run the daemon."""

pytest_plugins = ["tests.sshd_fixture", "tests.pg_fixture"]
