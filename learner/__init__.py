"""Learner: the process that owns the policy weights and the optimizer."""
