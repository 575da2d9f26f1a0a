"""``python -m sagalog.cli``: the ``saga`` command without relying on the installed script."""

from sagalog.cli import main

if __name__ == "__main__":
    main()
