"""Gradient aggregators; importing this package registers them."""
