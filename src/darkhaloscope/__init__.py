"""darkhaloscope: a reproducible strong-lens finder for DESI Legacy Surveys DR10-like imaging."""

__version__ = "0.1.0"
