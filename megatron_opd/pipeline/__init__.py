"""Multi-stage recipes (cascades) and run reports: the top layer above train and eval."""
