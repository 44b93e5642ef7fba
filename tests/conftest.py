"""Shared pytest configuration. Fixtures for real services live in tests/support/."""
