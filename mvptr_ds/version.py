"""The version of mvptr_ds: its one home (``setup.py`` reads it; ``mvptr_ds.__version__`` re-exports it).

A leaf module, so any module can read the version without importing the package root, whose functions
(``encode``, ``from_pretrained``) import the evaluation side.
"""
__version__ = "0.1.0"
