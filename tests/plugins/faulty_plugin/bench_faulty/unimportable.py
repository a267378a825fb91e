"""A plugin module that cannot be imported (its dependency is not installed)."""

import bench_faulty_missing_dependency  # noqa: F401


class Never:
    pass
