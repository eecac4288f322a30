"""Megatron trainer: the only layer that drives megatron-core training (SFT, OPD/MOPD, GRPO)."""
