"""``python -m tensorpar`` (and ``torchrun -m tensorpar``) runs the CLI."""

from tensorpar.cli.main import main

if __name__ == "__main__":
    main()
