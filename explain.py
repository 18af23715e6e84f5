"""Thin shim: ``python explain.py ckpt_path=<best.ckpt> input.dir=<folder>``; see src/changecam/cli/explain.py."""

from changecam.cli.explain import main

if __name__ == "__main__":
    main()
