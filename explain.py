"""Thin shim: ``python explain.py ckpt_path=<best.ckpt> input.dir=<folder>``; see src/changecam/explain/main.py."""

from changecam.explain.main import main

if __name__ == "__main__":
    main()
