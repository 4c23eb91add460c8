"""sae-dist: feature-parallel sparse autoencoders (dictionary learning) on language-model activations."""

__version__ = "0.1.0"
