"""The SSAT / FGCR objective: L = lam * L_cls + (1 - lam) * L_rec + (1 - lam) * beta * L_fgc.

`lam` weighs the supervised task against the self-supervised one (0.1 in the papers); `beta`
scales FGCR's consistency term (0.001). A scratch model (no decoder) is trained on L_cls alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy

_soft_target_ce = SoftTargetCrossEntropy()


def classification_loss(
    logits: torch.Tensor, targets: torch.Tensor, smoothing: float = 0.1
) -> torch.Tensor:
    """Cross-entropy against int64 labels (B,) with label smoothing, or against soft targets
    (B, C) as made by mixup/cutmix (which already carry their smoothing, as timm's Mixup does)."""
    logits = logits.float()
    if targets.dtype == torch.long:
        return F.cross_entropy(logits, targets, label_smoothing=smoothing)
    if targets.shape != logits.shape:
        raise ValueError(
            f"soft targets must have the logits' shape {tuple(logits.shape)}, "
            f"got {tuple(targets.shape)}"
        )
    return _soft_target_ce(logits, targets)


def ssat_objective(
    out: dict[str, torch.Tensor],
    targets: torch.Tensor,
    *,
    lam: float = 0.1,
    beta: float = 0.001,
    smoothing: float = 0.1,
) -> dict[str, torch.Tensor]:
    """Weigh the model's named outputs into `{'loss', 'cls', 'rec', 'fgc'}` (scalars; `loss` is
    what to backpropagate). Without `rec` in `out` (scratch model) the loss is L_cls."""
    cls = classification_loss(out["logits"], targets, smoothing)
    if "rec" not in out:
        zero = cls.new_zeros(())
        return {"loss": cls, "cls": cls, "rec": zero, "fgc": zero}
    rec, fgc = out["rec"], out["fgc"]
    loss = lam * cls + (1.0 - lam) * rec + (1.0 - lam) * beta * fgc
    return {"loss": loss, "cls": cls, "rec": rec, "fgc": fgc}
