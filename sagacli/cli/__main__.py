"""``python -m sagacli``: the ``saga`` command without relying on the installed script."""

from sagacli.cli import main

if __name__ == "__main__":
    main()
