"""Pure translations between wire formats (no I/O), shared by provider and ingress plugins."""
