from llmgateway.core.cli import main

main()
