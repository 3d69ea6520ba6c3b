"""The command-line tools (``distclip demo``, ``distclip bench``): not imported by ``import distclip``."""
