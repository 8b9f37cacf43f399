"""IR -> Taichi source -> compiled Taichi kernel."""
