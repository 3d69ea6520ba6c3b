"""``python -m distclip``: the command line (see `distclip._tools.cli`)."""

# Spawned ranks import this module again under another name: only the real entry point imports the command line
# and runs it.
if __name__ == "__main__":
    from distclip._tools.cli import main

    raise SystemExit(main())
