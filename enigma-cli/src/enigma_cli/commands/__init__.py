"""The CLI's own subcommands (plugins add theirs through ``enigma_commands``)."""
