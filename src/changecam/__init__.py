"""changecam."""
