"""Old name of engine/drop.py (kept for eval/ppl.py until it imports `drop`)."""

from .drop import add_mass, apply, enforce, n_new, scores, will_drop  # noqa: F401
