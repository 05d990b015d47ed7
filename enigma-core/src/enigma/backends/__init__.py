"""Backend implementations shipped with enigma-core."""
