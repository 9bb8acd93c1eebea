"""Rewards: pure verifier functions of strings, task sources paired with their checkers."""
