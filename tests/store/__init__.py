"""Model store tests: publishing, the registry and CLI, importing, evaluation and the default model."""
