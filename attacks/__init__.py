"""Built-in attacks, registered under the `bench.attacks` entry-point group in pyproject.toml."""
