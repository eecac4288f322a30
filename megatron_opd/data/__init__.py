"""Data: dataset loading, chat templating with assistant-only loss masks, batching."""
