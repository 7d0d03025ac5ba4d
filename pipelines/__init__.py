"""Loaders that turn a stored dataset (`.beton` + metadata) into batches of views on the device.

Contract (DESIGN.md section 4): `create_loader(kind, path, *, train, batch_size, img_size,
aug_views=1, device, rank=0, world_size=1, seed=0, ...)` yields dicts with `views`
(V, B, 3, H, W), `labels` (B,) and `indices` (B,).
"""
