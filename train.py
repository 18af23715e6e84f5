"""Thin shim: ``python train.py experiment=quickstart``; see src/changecam/train.py."""

from changecam.train import main

if __name__ == "__main__":
    main()
