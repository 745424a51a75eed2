"""The package version, apart from the package root so that any module can name it without importing the
public facade that imports them."""

__version__ = "0.1.0"
