from bench.api import Defense


class Impostor(Defense):
    """A defense whose name clashes with a built-in."""
