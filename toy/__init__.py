"""The built-in toy: a procedural world of captioned shapes, detectors for it, and a tiny SD1-family model trained on it."""
