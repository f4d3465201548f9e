"""The package version, in a module of its own so that submodules (the benchmark's machine record) can read it
without importing the package `__init__`, which registers the model classes. Keep it equal to pyproject.toml's."""

__version__ = "0.1.0"
