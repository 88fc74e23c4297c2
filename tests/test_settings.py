"""Settings: YAML + environment, validated once, frozen, unknown keys rejected."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.errors import ConfigError, CpaError, ValidationFailed
from actors.settings import Settings, hash_api_key, load_settings


def test_defaults_load_from_repo_config() -> None:
    s = load_settings()
    assert s.profile == "dev"
    assert s.runtime.ray_gcs_port != 6379
    assert {k.tenant for k in s.http.api_keys} == {"acme", "globex"}


def test_dev_keys_map_to_tenants_by_hash() -> None:
    s = load_settings()
    acme = s.tenant_for_key("acme-dev-key")
    assert acme is not None and acme.tenant == "acme"
    globex = s.tenant_for_key("globex-dev-key")
    assert globex is not None and globex.tenant == "globex"
    assert s.tenant_for_key("nope") is None
    assert all(k.key_sha256 != "acme-dev-key" for k in s.http.api_keys)
    assert hash_api_key("acme-dev-key") == acme.key_sha256


def test_frozen() -> None:
    s = load_settings()
    with pytest.raises(Exception, match="frozen"):
        s.profile = "prod"  # type: ignore[misc]
    with pytest.raises(Exception, match="frozen"):
        s.redis.url = "redis://x"  # type: ignore[misc]


def test_env_overrides_nested(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CPA_REDIS__URL", "redis://127.0.0.1:6390/2")
    monkeypatch.setenv("CPA_QUEUE__MAX_ATTEMPTS", "7")
    s = load_settings()
    assert s.redis.url == "redis://127.0.0.1:6390/2"
    assert s.queue.max_attempts == 7


def test_unknown_key_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "cpa.yaml"
    cfg.write_text("redis:\n  url: redis://127.0.0.1:6379/0\n  colour: red\n")
    monkeypatch.setenv("CPA_CONFIG_FILE", str(cfg))
    with pytest.raises(ConfigError, match=r"redis\.colour"):
        load_settings()


def test_bad_value_names_field_and_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "cpa.yaml"
    cfg.write_text("runtime:\n  ray_gcs_port: 6379\n")
    monkeypatch.setenv("CPA_CONFIG_FILE", str(cfg))
    with pytest.raises(ConfigError, match="6379"):
        load_settings()


def test_heartbeat_must_be_inside_lease() -> None:
    with pytest.raises(ConfigError, match="heartbeat_interval_s"):
        load_settings(queue={"visibility_timeout_s": 1.0, "heartbeat_interval_s": 2.0})


def test_every_field_documented() -> None:
    from pydantic import BaseModel

    def walk(model: type[BaseModel], path: str) -> list[str]:
        missing = []
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                missing += walk(ann, f"{path}{name}.")
            elif not field.description and name not in ("profile", "tenant", "key_sha256",
                                                          "roles"):
                missing.append(path + name)
        return missing

    assert walk(Settings, "") == []


def test_one_error_root() -> None:
    err = ValidationFailed("todos[1].action", "sned_mail", "action must be one of ...")
    assert isinstance(err, CpaError)
    assert err.status_code == 422
    assert err.to_dict()["field"] == "todos[1].action"
    assert "'sned_mail'" in str(err)
