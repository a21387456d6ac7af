"""Training helpers used by train.py: config, optimizer and LR schedule, resumable state."""
