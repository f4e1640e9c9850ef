"""Test-model code: builds artefacts for tests and smoke runs (never used by a real build or training)."""
