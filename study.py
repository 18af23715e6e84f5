"""Thin shim: ``python study.py study.train_zoo=true``; see src/changecam/cli/study.py."""

from changecam.cli.launch import hydra_main

main = hydra_main("study", "changecam.cli.study:study")

if __name__ == "__main__":
    main()
