"""Engine tests: continuous batching, sampling and scoring on a tiny random GPT-2, against its HF twin."""
