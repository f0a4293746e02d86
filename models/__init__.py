"""Where voices and model files come from."""
