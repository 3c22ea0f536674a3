"""The package version, in one place: ``pyproject.toml`` reads it from here (setuptools'
``attr:``), and every module that records it (manifests, reports, the baseline cache key,
``tuckerize --version``) imports it from here, never from the package ``__init__``."""

__version__ = "0.1.0"
