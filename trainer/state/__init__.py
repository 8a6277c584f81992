"""Run state: checkpoints (checkpoints.py: atomic, verified, rotated, and what each is of),
the process's RNG streams (rng.py) and the stop signals (signals.py)."""
