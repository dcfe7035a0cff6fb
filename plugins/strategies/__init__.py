"""Built-in routing strategy plugins (entry-point group ``llmgateway.strategies``)."""
