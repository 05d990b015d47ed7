"""enigma-core's own plugins, declared as entry points like any other."""
