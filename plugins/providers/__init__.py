"""Built-in provider plugins (entry-point group ``llmgateway.providers``)."""
