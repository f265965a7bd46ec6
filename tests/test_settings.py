from pathlib import Path

import pytest

from pupyl_queue.characteristics import NETWORKS, Characteristic
from pupyl_queue.settings import Settings, SettingsError


def test_reads_environment() -> None:
    env = {
        "PUPYL_REDIS_URL": "redis://r:6379/3",
        "PUPYL_STORE": "s3://bucket/prefix",
        "PUPYL_S3_ENDPOINT": "minio:9000",
        "PUPYL_S3_SECURE": "false",
        "PUPYL_CHARACTERISTIC": "lightweight_fast_small_precision",
        "PUPYL_BATCH_SIZE": "8",
        "PUPYL_DATA_DIR": "/tmp/pq",
    }
    s = Settings.from_env(env)
    assert s.broker_url == "redis://r:6379/3"
    assert s.store_url == "s3://bucket/prefix"
    assert s.s3_secure is False
    assert s.characteristic is Characteristic.LIGHTWEIGHT_FAST_SMALL_PRECISION
    assert s.batch_size == 8
    assert s.data_dir == Path("/tmp/pq")


def test_defaults_to_embedded_local_store(tmp_path: Path) -> None:
    s = Settings.from_env({}, data_dir=tmp_path)
    assert s.store_url == (tmp_path / "store").resolve().as_uri()
    assert s.characteristic == 1


def test_round_trips_through_environment(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path, s3_secret_key="x", characteristic=7, s3_secure=False)
    assert Settings.from_env(s.to_env()) == s
    assert set(s.to_env()) == set(Settings.names())


@pytest.mark.parametrize(
    "env, message",
    [
        ({"PUPYL_BATCH_SIZE": "many"}, "PUPYL_BATCH_SIZE must be a int"),
        ({"PUPYL_S3_SECURE": "perhaps"}, "PUPYL_S3_SECURE must be a bool"),
        ({"PUPYL_STORE": "ftp://x"}, "PUPYL_STORE must be"),
        ({"PUPYL_CHARACTERISTIC": "12"}, "unknown characteristic"),
    ],
)
def test_bad_values_are_clear_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(env)


def test_secrets_stay_out_of_repr() -> None:
    s = Settings(s3_access_key="AKIDSECRET", s3_secret_key="supersecret")
    assert "supersecret" not in repr(s) and "AKIDSECRET" not in repr(s)


@pytest.mark.parametrize(
    "given",
    [Characteristic(3), 3, "3", "LIGHTWEIGHT_FAST_SHORT_PRECISION", "lightweight_fast_short_precision"],
)
def test_characteristic_by_enum_value_or_name(given: object) -> None:
    assert Characteristic.parse(given) is Characteristic.LIGHTWEIGHT_FAST_SHORT_PRECISION


@pytest.mark.parametrize("bad", [0, 10, "MobileNet", True, None, 2.5])
def test_unknown_characteristic(bad: object) -> None:
    with pytest.raises(ValueError, match="unknown characteristic"):
        Characteristic.parse(bad)  # type: ignore[arg-type]


def test_table_of_nine() -> None:
    table = {
        c.value: (NETWORKS[c].application, NETWORKS[c].input_size, NETWORKS[c].feature_size)
        for c in Characteristic
    }
    assert table == {
        1: ("MobileNet", 224, 1024),
        2: ("ResNet50V2", 224, 2048),
        3: ("ResNet101V2", 224, 2048),
        4: ("DenseNet169", 224, 1664),
        5: ("DenseNet201", 224, 1920),
        6: ("InceptionV3", 299, 2048),
        7: ("Xception", 299, 2048),
        8: ("EfficientNetV2M", 480, 1280),
        9: ("EfficientNetV2L", 480, 1280),
    }
