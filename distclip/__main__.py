"""``python -m distclip``: the command line (see `distclip._tools.cli`)."""

from distclip._tools.cli import main

# Spawned ranks import this module again under another name: only the real entry point runs the command.
if __name__ == "__main__":
    raise SystemExit(main())
