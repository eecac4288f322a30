"""Embedded HTTP servers that speak SGLang's wire format (rollout now; teachers later)."""
