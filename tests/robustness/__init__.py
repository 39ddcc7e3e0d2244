"""Robustness: hostile inputs, security checks, schema fuzzing, the dependency audit and fast fault suites."""
