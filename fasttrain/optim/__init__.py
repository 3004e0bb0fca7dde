from fasttrain.optim.adamw import Adam, AdamW

__all__ = ["Adam", "AdamW"]
