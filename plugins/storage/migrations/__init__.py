"""Tortoise migrations of the data model (app label ``models``). Add one with ``llmgateway db makemigrations``."""
