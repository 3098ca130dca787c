"""jest_operator: the Kopf operator, its API models, pure builders and the jestctl CLI."""
