"""Python AST -> kerndiff IR: name resolution, static evaluation, inlining, scalarization."""
