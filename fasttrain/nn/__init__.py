"""Modules built on fasttrain.ops."""
