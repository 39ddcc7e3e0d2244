"""Unit tests of small pieces: detokenizer, manifest, references, sampler, scheduler."""
