"""Training: Ray Train worker loop, losses, metrics and hard-sample mining."""
