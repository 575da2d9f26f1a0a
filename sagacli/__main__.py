"""``python -m sagacli``: the same as the ``saga`` command."""

from sagacli.cli import main

main()
