"""Fixtures of the training tests (helpers in training_helpers.py)."""
from training_helpers import base  # noqa: F401  (the saved tiny base, module scope)
