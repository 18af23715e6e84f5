"""Thin shim: ``python train.py experiment=quickstart``; see src/changecam/cli/train.py."""

from changecam.cli.launch import hydra_main

main = hydra_main("train", "changecam.cli.train:train_and_score")

if __name__ == "__main__":
    main()
