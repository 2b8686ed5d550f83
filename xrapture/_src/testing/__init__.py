"""Test helpers for code that runs on implicit arrays (``xrapture.testing``)."""
