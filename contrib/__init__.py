"""Optional plugins maintained with the gateway but not enabled by default."""
