"""Thin shim: ``python eval.py ckpt_path=<best.ckpt> data=synthetic``; see src/changecam/evaluate.py."""

from changecam.evaluate import main

if __name__ == "__main__":
    main()
