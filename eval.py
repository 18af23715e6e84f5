"""Thin shim: ``python eval.py ckpt_path=<best.ckpt> data=synthetic``; see src/changecam/cli/evaluate.py."""

from changecam.cli.evaluate import main

if __name__ == "__main__":
    main()
