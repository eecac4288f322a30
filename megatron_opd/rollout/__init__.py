"""Rollout engines: generate completions (token ids + sampler log-probs) from prompts."""
