"""The test suite: one package per area, shared helpers in tests.support, fixtures in the conftest files."""
