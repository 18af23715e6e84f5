"""Thin shim: ``python explain.py ckpt_path=<best.ckpt> input.dir=<folder>``; see src/changecam/cli/explain.py."""

from changecam.cli.launch import hydra_main

main = hydra_main("explain", "changecam.cli.explain:explain")

if __name__ == "__main__":
    main()
