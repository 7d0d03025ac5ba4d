"""Train a ViT with the SSAT / FGCR auxiliary task (or the scratch baseline).

The training loop is not part of this version yet: the method package `ssat/` (model, masking,
objective, optimizer, checkpoints), the converters (`convert/`) and the loaders (`pipelines/`) are
complete and tested; this entry point follows.
"""
import sys


def main() -> int:
    print(
        "train.py: the trainer is not available in this version yet. "
        "The method (ssat/), converters (convert/) and loaders (pipelines/) are ready: see README.md.",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
