"""BagSSL: self-supervised learning of fixed-scale patch embeddings; an image is the bag of its patches.

This package is the trainer. It imports torch, torchvision, numpy, pydantic and PyYAML only: never ray,
never mlflow (those live in `sweeps`).
"""

__version__ = "0.1.0"
