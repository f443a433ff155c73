"""Limits of the bit-plane arithmetic, torch-free so that config validation (and the workflow's parse) can use them."""

MAX_BITS = 16  # float32 holds the integers of the binary expansion exactly far beyond this
