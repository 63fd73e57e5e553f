"""A Ray-controlled training orchestrator for decoder-only language models."""
