"""tandem.configs."""
