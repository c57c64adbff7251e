"""`python -m effx`: the effx command line (effx.cli)."""

from effx.cli import main

if __name__ == "__main__":
    main()
