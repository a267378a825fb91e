"""bnbench. From Python: `bench.evaluate(model, data, ...)` returns a `bench.Report` (see bench/evaluation.py);
plugins import from `bench.api`. Loaded on first use, so `import bench` (the CLI's first step) stays cheap."""

__all__ = ["evaluate", "Report", "Accuracy"]


def __getattr__(name: str):
    if name in __all__:
        from bench import evaluation

        return getattr(evaluation, name)
    raise AttributeError(f"module 'bench' has no attribute {name!r}")
