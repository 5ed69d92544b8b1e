"""What the model-training stages share: `skeleton` (every one of them), `classifier` (the two classifier stages)."""
