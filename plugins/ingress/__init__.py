"""Built-in ingress plugins: request formats other than OpenAI's (``llmgateway_register_ingress``)."""
