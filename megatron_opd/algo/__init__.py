"""Advantages and losses for OPD / MOPD / GRPO: pure tensor functions, no I/O, no distributed state."""
