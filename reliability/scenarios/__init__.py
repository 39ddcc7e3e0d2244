"""The fault scenarios, shared by `python -m reliability.run faults` and the fast tests
(tests/robustness/test_faults.py), one module each: `sigterm` (SIGTERM with streams in flight),
`finetune_kill` (kill -9 of finetune during its export) and `engine_fault` (an engine step raising).
Each returns its figures and its checks, `Check`s: (what must hold, whether it did, detail).
"""

Check = tuple[str, bool, str]
