"""compress: make Transformer models smaller and faster, and prove it."""
__version__ = "0.1.0"
