"""docker-compose.yml cannot run here (no Docker engine); check what it declares."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import yaml

from streams import settings as settings_module

ROOT = Path(__file__).resolve().parents[1]


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _known_variables() -> set[str]:
    source = Path(settings_module.__file__).read_text()
    return set(re.findall(r'_env\(\s*"([A-Z_]+)"', source))


def test_declares_kafka_worker_and_gateway():
    services = _compose()["services"]
    assert set(services) == {"kafka", "worker", "gateway"}
    assert services["kafka"]["image"].startswith("apache/kafka:4.")
    assert services["worker"]["command"] == ["worker"]
    assert services["gateway"]["command"] == ["gateway"]
    assert "3068:3068" in services["gateway"]["ports"]


def test_kafka_is_configured_for_one_kraft_node_with_transactions():
    env = _compose()["services"]["kafka"]["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == "1"
    assert env["KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"] == "1"
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"


def test_services_use_only_variables_the_settings_read():
    """A typo in a variable name would silently fall back to a default."""
    known = _known_variables()
    assert "KAFKA_BOOTSTRAP_SERVERS" in known and "STREAMLEDGER_WORKER_URL" in known
    for name in ("worker", "gateway"):
        env = _compose()["services"][name]["environment"]
        unknown = set(env) - known
        assert not unknown, f"{name} sets variables no setting reads: {unknown}"
        assert env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"


def test_every_setting_has_a_default():
    defaults = dataclasses.asdict(settings_module.Settings())
    assert all(value not in (None, "") for value in defaults.values())
