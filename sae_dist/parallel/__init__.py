"""Feature- and data-parallel training (DESIGN §3): mesh, sharded SAE, collectives."""
