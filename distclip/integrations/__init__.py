"""Integrations: each module translates one framework's gradient layout into distclip's and clips through
distclip's stages. None re-implements the math, and none is imported by ``import distclip``, so a framework
that is not installed costs nothing."""
