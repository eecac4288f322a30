"""megatron-opd: on-policy distillation of LLMs with a megatron-core student."""

__version__ = "0.2.0"  # CHANGELOG.md
