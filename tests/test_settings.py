"""r1engine.settings: one immutable settings object, changed only for the span of a `with settings.override(...)`
block, in this thread; the models read it (tests/test_decode_step.py and tests/test_models_policy.py check what each
switch does)."""

from __future__ import annotations

import dataclasses
import threading

import pytest

from r1engine import settings


def test_defaults_are_the_fast_paths():
    assert settings.current() == settings.Settings(
        fused_layer_ops=True, fused_decode_step=True, decode_attention_kernel=True, attention_backend="auto"
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.current().fused_layer_ops = False  # type: ignore[misc]


def test_override_nests_and_restores_even_after_an_error():
    with settings.override(fused_layer_ops=False) as outer:
        assert settings.current() is outer and not outer.fused_layer_ops
        with settings.override(attention_backend="sdpa_loop"):
            assert settings.current().attention_backend == "sdpa_loop"
            assert not settings.current().fused_layer_ops  # the outer block's change stays
        assert settings.current() == outer
        with pytest.raises(RuntimeError, match="inside"), settings.override(fused_decode_step=False):
            raise RuntimeError("inside")
        assert settings.current() == outer
    assert settings.current() == settings.Settings()


def test_bad_overrides_name_the_setting():
    with pytest.raises(TypeError, match="unknown setting.* fused_decode; expected some of fused_layer_ops"):
        with settings.override(fused_decode=False):
            pass
    with pytest.raises(TypeError, match="settings.fused_layer_ops: expected a bool, got 0"):
        with settings.override(fused_layer_ops=0):
            pass
    with pytest.raises(TypeError, match="settings.attention_backend: expected a str, got None"):
        settings.Settings(attention_backend=None)  # type: ignore[arg-type]
    assert settings.current() == settings.Settings()


def test_an_override_stays_in_its_thread():
    seen = []
    with settings.override(decode_attention_kernel=False):
        thread = threading.Thread(target=lambda: seen.append(settings.current().decode_attention_kernel))
        thread.start()
        thread.join()
        assert not settings.current().decode_attention_kernel
    assert seen == [True]


def test_no_module_level_switches_are_left():
    """The switches that were module globals (mutated by benchmarks and tests) are gone."""
    from r1engine.models import decode_step, kv_cache, policy

    assert not hasattr(decode_step, "USE_FUSED_DECODE_STEP")
    assert not hasattr(kv_cache, "USE_DECODE_KERNEL")
    assert not hasattr(policy, "_FUSED_LAYER_OPS") and not hasattr(policy, "fused_layer_ops")
