"""Batched generation from token-id prompts (evaluation, pilot, chat, benchmarks)."""
