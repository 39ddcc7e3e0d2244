"""Reliability and security tooling: the long suites (`python -m reliability.run`), the schema fuzzer
(`python -m reliability.fuzz`), the dependency audit, and what they share with the test suite: tiny random
GPT-2 stores, the server process, the load generator, the figures and the fault scenarios (see
reliability/README.md). Nothing here is imported by the service."""
