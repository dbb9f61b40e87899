"""One small module per attack; every attack returns float32 adversarial images within eps of x and in [0, 1]."""
