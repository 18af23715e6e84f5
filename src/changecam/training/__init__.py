"""Training: the LightningModule, its checkpoints and its callbacks (import from the modules)."""
