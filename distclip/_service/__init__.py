"""The clipping service of a training loop (`GradClipper`, its report, policies, AGC and AMP handling), over the
clip's stages in ``distclip/_clip/``."""
