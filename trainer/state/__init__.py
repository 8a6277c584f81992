"""Run state: checkpoints (checkpoints.py: atomic, verified, rotated, and what each is of),
the process's RNG streams (rng.py), the stop signals (signals.py) and the output directory's
lock (run_lock.py: one run at a time)."""
