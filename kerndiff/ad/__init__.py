"""Automatic differentiation as IR -> IR transforms (forward.py, reverse.py) over one rule table."""
