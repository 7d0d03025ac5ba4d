"""Train a ViT with the SSAT / FGCR auxiliary task (or the scratch baseline).

The training loop is not part of this version yet: the method package `ssat/` (model, masking,
objective, optimizer, checkpoints) is complete and tested; the data converters, loaders and this
entry point follow.
"""
import sys


def main() -> int:
    print(
        "train.py: the trainer is not available in this version yet. "
        "The method package (ssat/) is ready: see README.md and `make test`.",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
