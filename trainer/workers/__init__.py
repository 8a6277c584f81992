"""The megatron-core roles (actor, critic, reference): model building (model.py), the passes
through megatron's schedules (passes.py), the losses applied per role (actor.py, critic.py),
log-probs from vocab-parallel logits (logprobs.py), the optimizer (optimizer.py) and a role's
own checkpoint state (checkpoint.py)."""
