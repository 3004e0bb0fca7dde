"""Glue for third-party trainers (transformers, peft, Lightning).

Each submodule imports its library itself; fasttrain never imports them.
"""
