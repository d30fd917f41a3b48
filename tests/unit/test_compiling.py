"""Where inductor's cache goes (engine.diffusion.compiling): under the models folder by default, an absolute
models.compile_cache as it is, and a models volume mounted read-only (a common way to hand out
weights) falls back to the temporary folder, says so, and the audit's facts name the one used."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from engine import Settings

from engine.diffusion import compiling
from tests.harness.faults import set_read_only, tmpfs, unmount_all


def settings_for(root: Path, **models) -> Settings:
    return Settings.from_table({"paths": {"models": str(root / "models")}, "models": models}, root=root)


@pytest.fixture(autouse=True)
def restore_cache_env(monkeypatch):
    monkeypatch.delenv(compiling.CACHE_ENV, raising=False)  # cache_dir sets it: put it back after each test


def test_the_cache_is_on_the_models_volume_by_default_and_an_absolute_one_is_used_as_it_is(tmp_path):
    default = settings_for(tmp_path, compile=True)
    assert compiling.configured_cache(default) == tmp_path / "models" / ".inductor-cache"
    assert compiling.cache_dir(default) == tmp_path / "models" / ".inductor-cache"
    assert (tmp_path / "models" / ".inductor-cache").is_dir()
    elsewhere = settings_for(tmp_path, compile=True, compile_cache=str(tmp_path / "kernels"))
    assert compiling.cache_dir(elsewhere) == tmp_path / "kernels"
    import os

    assert os.environ[compiling.CACHE_ENV] == str(tmp_path / "kernels")  # what inductor reads
    assert compiling.facts(elsewhere) == {"enabled": True, "cache_dir": str(tmp_path / "kernels"),
                                         "configured_cache_dir": str(tmp_path / "kernels"), "training": "eager"}
    assert compiling.facts(settings_for(tmp_path)) == {"enabled": False}


def test_a_read_only_models_volume_puts_the_cache_in_the_temporary_folder_and_says_so(tmp_path):
    models = tmpfs(tmp_path / "models", "4m")
    try:
        set_read_only(models, True)
        settings = settings_for(tmp_path, compile=True)
        with capture_logs() as logs:
            used = compiling.cache_dir(settings)
        assert used == Path(tempfile.gettempdir()) / compiling.FALLBACK_CACHE and used.is_dir()
        warning = next(e for e in logs if e["event"] == "compile_cache_unwritable")
        assert warning["configured"] == str(models / ".inductor-cache") and warning["using"] == str(used)
        facts = compiling.facts(settings)
        assert facts["cache_dir"] == str(used) and facts["configured_cache_dir"] == str(models / ".inductor-cache")
    finally:
        unmount_all(tmp_path)


def test_a_cache_path_through_a_file_falls_back_too(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "plain-file").write_bytes(b"")
    settings = settings_for(tmp_path, compile=True, compile_cache="plain-file/cache")
    assert compiling.cache_dir(settings) == Path(tempfile.gettempdir()) / compiling.FALLBACK_CACHE


def test_compile_settings_are_checked_with_their_key_names(tmp_path):
    from engine.errors import ConfigError

    with pytest.raises(ConfigError, match="models.compile"):
        settings_for(tmp_path, compile="yes")
    with pytest.raises(ConfigError, match="models.compile_cache"):
        settings_for(tmp_path, compile_cache="")


def test_compile_without_a_c_compiler_is_refused_at_start_naming_the_key(tmp_path, monkeypatch):
    from engine.errors import ConfigError

    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("CC", raising=False)
    with pytest.raises(ConfigError, match="models.compile = true needs a C compiler") as refused:
        compiling.check(settings_for(tmp_path, compile=True))
    assert refused.value.code == "compile_unavailable"
    monkeypatch.setenv("CC", "no-such-cc")
    with pytest.raises(ConfigError, match="CC=no-such-cc is not on PATH"):
        compiling.check(settings_for(tmp_path, compile=True))
    compiling.check(settings_for(tmp_path))  # off: nothing asked of the machine
