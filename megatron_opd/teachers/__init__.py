"""Teacher scoring: backends (SGLang / embedded, OpenAI-compatible), replica pools, routing."""
