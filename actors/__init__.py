"""Rollout actors, their engines and the sample records they produce."""
