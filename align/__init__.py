"""tandem.align."""
