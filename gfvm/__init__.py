"""gfvm: process migration with Global File Virtual Memory."""

__version__ = "0.1.0"
