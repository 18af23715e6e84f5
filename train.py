"""Thin shim: ``python train.py experiment=quickstart``; see src/changecam/cli/train.py."""

from changecam.cli.train import main

if __name__ == "__main__":
    main()
