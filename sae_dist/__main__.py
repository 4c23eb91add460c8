"""`python -m sae_dist ...` is `sae-dist ...` (and what torchrun launches)."""

from sae_dist.cli import main

main()
