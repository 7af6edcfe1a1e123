"""Thin adapters from training frameworks (Hugging Face Trainer, Accelerate, Lightning) to memwatch's Monitor."""
