"""tandem.paged_cache."""
