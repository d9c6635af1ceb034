"""COPE in JAX/Flax: cross-domain product representations for pages, videos and lives."""

__version__ = "0.1.0"  # the version of pyproject.toml
