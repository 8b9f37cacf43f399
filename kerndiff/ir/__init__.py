"""kerndiff's intermediate representation: scalar, typed, structured (see nodes.py)."""
