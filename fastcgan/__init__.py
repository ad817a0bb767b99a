"""fastcgan: performance-first CycleGAN."""
__version__ = "0.1.0"
