"""Tandem beside its peers: the same RL workload run by another system on the same GPUs
(`python -m benchmarks.peers.run`; README.md says what is compared and what differs)."""
