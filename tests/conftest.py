"""Suite-wide fixtures: one real Apache Kafka broker for the whole session.

* `kafka_bootstrap` (session): `$KAFKA_BOOTSTRAP_SERVERS` when set, else the bootstrap
  address of ONE `LocalKafka` (Kafka 4.3.1, KRaft) started lazily in a temp dir the first
  time a test needs it and stopped at the end of the session.
* `kafka_broker`: the `LocalKafka` itself, for tests that restart or kill the broker;
  skipped when an external cluster is used. If a test leaves it stopped, it is started
  again afterwards so later tests still have a broker.

Tests marked `integration` get `KAFKA_BOOTSTRAP_SERVERS` set to the broker (so code that
reads its configuration from the environment finds it) without asking for a fixture; tests
that ask for either fixture are marked `integration` automatically, so
`pytest -m "not integration"` never starts Kafka.
"""

from __future__ import annotations

import os

import pytest

_KAFKA_FIXTURES = {"kafka_bootstrap", "kafka_broker"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _KAFKA_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def _local_kafka():
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield None
        return
    from streamledger.kafka_local import KafkaSetupError, LocalKafka

    broker = LocalKafka()  # temp data dir, free ports; heap via STREAMLEDGER_KAFKA_HEAP
    try:
        broker.start()
    except KafkaSetupError as exc:
        broker.close()
        pytest.fail(f"cannot start the test Kafka broker: {exc}", pytrace=False)
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture(scope="session")
def kafka_bootstrap(_local_kafka) -> str:
    """Bootstrap servers of the Kafka cluster the suite runs against."""
    if _local_kafka is None:
        return os.environ["KAFKA_BOOTSTRAP_SERVERS"]
    return _local_kafka.bootstrap_servers


@pytest.fixture
def kafka_broker(_local_kafka):
    """The suite's `LocalKafka` (supports `restart()`, `kill()`, `stop()`/`start()`)."""
    if _local_kafka is None:
        pytest.skip("needs the suite's own broker; KAFKA_BOOTSTRAP_SERVERS is an external cluster")
    yield _local_kafka
    if not _local_kafka.is_running():
        _local_kafka.start()


@pytest.fixture(autouse=True)
def _integration_kafka_env(request, monkeypatch):
    if request.node.get_closest_marker("integration") is not None:
        monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", request.getfixturevalue("kafka_bootstrap"))
    yield
