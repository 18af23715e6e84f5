"""Thin shim: ``python eval.py ckpt_path=<best.ckpt> data=synthetic``; see src/changecam/cli/evaluate.py."""

from changecam.cli.launch import hydra_main

main = hydra_main("eval", "changecam.cli.evaluate:evaluate")

if __name__ == "__main__":
    main()
