"""The ``taxoclass`` command line (click only): each command parses options, calls one
public library function (``taxoclass.__all__``) and writes its result.

``app`` holds the command group and what the commands share; ``commands`` the commands
on images and models; ``plots`` those on plot photos;
``benchmark`` the evaluation protocol.
"""

from __future__ import annotations

from . import benchmark as benchmark  # noqa: F401  (registers the commands on main)
from . import commands as commands  # noqa: F401
from . import discover as discover  # noqa: F401
from . import export as export  # noqa: F401
from . import importing as importing  # noqa: F401
from . import plots as plots  # noqa: F401
from .app import main as main

__all__ = ["main"]
