"""SSAT / FGCR: Vision Transformers trained with a masked-autoencoder auxiliary task.

The method lives here: `models` (ViT + MAE decoder, FGCR masking), `objective` (how the loss parts
are weighed), `optim` (AdamW groups and schedule), `training` (one training step and the training
state) and `checkpoint` (atomic saves, safe loads).
"""

from ssat.models import create_model, list_models

__all__ = ["create_model", "list_models"]
