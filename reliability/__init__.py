"""Reliability and security tooling run outside the test suite (see reliability/README.md)."""
