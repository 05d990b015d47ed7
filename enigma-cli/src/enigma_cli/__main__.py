"""``python -m enigma_cli``: the ``enigma`` command (what ``torchrun -m enigma_cli train ...`` starts per rank)."""

from enigma_cli.main import main

if __name__ == "__main__":
    main()
