"""rslib: the library behind the CRS-Diff and CC-Diff reproduction notebooks."""

__version__ = "0.1.0"
