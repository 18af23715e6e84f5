"""Thin shim: ``python predict.py ckpt_path=<best.ckpt> input.dir=<folder>``; see src/changecam/cli/predict.py."""

from changecam.cli.predict import main

if __name__ == "__main__":
    main()
