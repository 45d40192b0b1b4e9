"""``python -m taxoclass.cli``: the ``taxoclass`` command line."""

from . import main

main()
