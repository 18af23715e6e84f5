"""Thin shim: ``python predict.py ckpt_path=<best.ckpt> input.dir=<folder>``; see src/changecam/cli/predict.py."""

from changecam.cli.launch import hydra_main

main = hydra_main("predict", "changecam.cli.predict:predict")

if __name__ == "__main__":
    main()
