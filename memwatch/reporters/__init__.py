"""Reporters: write evaluation records to TensorBoard and the console."""
