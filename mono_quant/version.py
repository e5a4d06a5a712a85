"""The package version: a leaf module, so any layer can record it (file metadata) without
importing the package's public API."""

__version__ = "0.1.0"
