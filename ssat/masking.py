"""FGCR masking: r disjoint visible sets of k patches per image, and where each token goes back.

One random permutation of the L patches per image; view i keeps the shuffled positions
`[i*k, (i+1)*k)`. SSAT is the case r = 1. All shapes depend only on (r, B, k, L), so the model
stays traceable with static shapes.

The published FGCR decoder (`forward_views_decoder`) puts L - k(r - i) mask tokens before view
i's k visible tokens and then unshuffles every view with the one shared index, which expects
them after i*k: the two agree only where r*k = L (r = 4 at mask ratio 0.75). With fewer views,
every view's visible tokens, the first view's too, are decoded at other patches' positions. Here
each view carries its own slot table (`decoder_slots`), so every decoded token sits at its own
patch position.
"""

from __future__ import annotations

import torch


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """k, the number of visible patches per view (MAE's `int(L * (1 - mask_ratio))`)."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    k = int(num_patches * (1 - mask_ratio))
    if k < 1:
        raise ValueError(f"mask_ratio {mask_ratio} leaves no visible patch out of L={num_patches}")
    if k >= num_patches:  # the reconstruction loss is a mean over the masked patches
        raise ValueError(
            f"mask_ratio {mask_ratio} masks no patch out of L={num_patches}: the decoder "
            f"reconstructs the masked patches, so at least one must be masked"
        )
    return k


def check_views(r: int, k: int, num_patches: int) -> None:
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"mask_views must be a positive int, got {r!r}")
    if r * k > num_patches:
        raise ValueError(
            f"{r} disjoint mask views of k={k} visible patches need r*k={r * k} patches, "
            f"but the image has only L={num_patches} (r={r}, k={k}, L={num_patches}); "
            f"use fewer views or a higher mask ratio"
        )


def visible_ids(noise: torch.Tensor, r: int, k: int) -> torch.Tensor:
    """(B, L) noise -> (r, B, k) patch indices visible in each view, disjoint across views."""
    check_views(r, k, noise.shape[1])
    ids_shuffle = torch.argsort(noise, dim=1)  # (B, L): ascending noise keeps first
    batch = noise.shape[0]
    return ids_shuffle[:, : r * k].reshape(batch, r, k).transpose(0, 1)  # (r, B, k)


def masks_from_ids(ids_vis: torch.Tensor, num_patches: int) -> torch.Tensor:
    """(r, B, k) visible indices -> (r, B, L) bool, True where the patch is masked in that view."""
    r, batch, _ = ids_vis.shape
    visible = torch.zeros(r, batch, num_patches, dtype=torch.bool, device=ids_vis.device)
    visible = visible.scatter(2, ids_vis, True)
    return ~visible


def decoder_slots(ids_vis: torch.Tensor, num_patches: int) -> torch.Tensor:
    """(r, B, k) visible indices -> (r, B, L) int64 slot per patch position.

    Slot j < k means "the j-th visible token of this view"; slot k means "the mask token". The
    decoder input of a view is `gather([visible tokens (k), mask token (1)], slots)`.
    """
    r, batch, k = ids_vis.shape
    order = torch.arange(k, device=ids_vis.device).expand(r, batch, k)
    slots = torch.full((r, batch, num_patches), k, dtype=torch.long, device=ids_vis.device)
    return slots.scatter(2, ids_vis, order)
