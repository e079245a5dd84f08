"""Continual-update methods."""
