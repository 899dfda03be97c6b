"""Text: sources to token ids (cached), the training text and its blocks, text sampled from the dense model."""
