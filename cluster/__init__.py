"""The driver, config, placement, weight sync and logging."""
