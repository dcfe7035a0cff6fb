"""Security plugins: virtual keys, JWT, rate limits, budgets, SSRF guard (see docs/security.md)."""
