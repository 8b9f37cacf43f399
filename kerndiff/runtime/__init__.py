"""Runtime state: derivative-field registry and the generated-kernel cache (both per ti.init)."""
