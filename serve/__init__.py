"""tandem.serve."""
