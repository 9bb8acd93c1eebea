"""Rollout actors and their engines (vLLM, or transformers where vLLM cannot run)."""
