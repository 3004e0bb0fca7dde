"""Functional ops with autograd and torch.library registration."""
