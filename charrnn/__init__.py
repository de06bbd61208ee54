"""charrnn: train character-level recurrent language models, sample from them, and steer them."""

__version__ = "0.1.0"
