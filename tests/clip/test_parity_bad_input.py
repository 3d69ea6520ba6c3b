"""group=None, inputs torch rejects: distclip raises an error of a type compatible with torch's (so handlers
written against torch still catch it) whose message says what was wrong.
"""

import pytest

import distclip
from _tester import simple_spec


class TestBadInput:
    """Inputs torch rejects get an error of a compatible type that says what was wrong."""

    def test_non_tensor_parameter(self):
        params = simple_spec().build() + [3]
        with pytest.raises(TypeError, match=r"parameters\[1\]` is of type int, not a tensor"):
            distclip.clip_grad_norm_(params, 1.0)
        with pytest.raises(AttributeError):  # what torch raises, for handlers written against it
            distclip.clip_grad_value_(params, 1.0)

    def test_non_iterable_parameters(self):
        with pytest.raises(TypeError, match="must be a Tensor or an iterable of Tensors"):
            distclip.clip_grad_norm_(5, 1.0)

    @pytest.mark.parametrize("value, error", [(None, TypeError), ("abc", ValueError), (1j, TypeError)])
    def test_max_norm_not_a_number(self, value, error):
        with pytest.raises(error, match="`max_norm` must be a real number"):
            distclip.clip_grad_norm_(simple_spec().build(), value)
        with pytest.raises(error, match="`clip_value` must be a real number"):
            distclip.clip_grad_value_(simple_spec().build(), value)

    def test_unknown_norm_type_string(self):
        with pytest.raises(ValueError, match="`norm_type` must be a real number.*'fro'"):
            distclip.clip_grad_norm_(simple_spec().build(), 1.0, norm_type="fro")

    def test_group_without_initialized_process_group(self):
        with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
            distclip.clip_grad_norm_(simple_spec().build(), 1.0, group=object())
