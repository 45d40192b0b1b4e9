"""Entry point kept at the repository root: it only delegates to the package CLI."""

from taxoclass.cli import main

if __name__ == "__main__":
    main()
