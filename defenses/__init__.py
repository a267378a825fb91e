"""Built-in defenses, registered under the `bench.defenses` entry-point group in pyproject.toml."""
