"""The version of xrapture, written only here.

``xrapture.__version__`` re-exports it, the adapter writer records it in every
file, and setup.py reads this file as text (without importing the package).
"""

__version__ = "0.1.0"
