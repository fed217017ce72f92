"""Built-in models: the embedded default that ``kernelize optimize`` runs with no arguments."""
