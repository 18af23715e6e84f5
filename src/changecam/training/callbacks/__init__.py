"""Lightning callbacks of changecam (import them from their modules)."""
