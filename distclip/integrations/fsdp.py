"""FSDP1 (``FullyShardedDataParallel``): its gradient layout as ``distclip.clip_grad_norm_`` takes it.

``distclip.clip_module_grad_norm_`` and ``distclip.GradClipper`` read an FSDP1 model's layout themselves; this is
the same translation for a caller who clips with ``clip_grad_norm_`` directly. The translation is part of the
layout stage (``distclip/_clip/modules.py``), which the functional API needs without importing an integration.
"""

from distclip._clip.modules import fsdp1_parameter_groups as parameter_groups

__all__ = ["parameter_groups"]
