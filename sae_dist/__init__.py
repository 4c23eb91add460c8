"""sae-dist: feature-parallel sparse autoencoders (dictionary learning) on language-model activations."""

import os

# torch's CPU allocator gives allocations of 2 MB and more 2 MB alignment and advises the kernel to back
# them with transparent huge pages when THP_MEM_ALLOC_ENABLE=1. Tensors over glibc's mmap threshold (the
# decoder's gradient, the LM's buffers, the shuffle buffer) are fresh pages every step: with 4 KB pages
# a 128-step CLT job took 12.9 M page faults, with huge pages 1.5 M, and ran 1.06x faster
# (scripts/bench_alloc.py). torch reads the variable once, at its first allocation, so it is set here,
# before this package imports torch; a value already in the environment (0 turns it off) is kept.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
