"""The nine CNN characteristics of pupyl, selectable by enum, name or value.

Only descriptions live here (no TensorFlow import), so producers and the API
can validate a characteristic without loading a network.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

KERAS_BASE = "https://storage.googleapis.com/tensorflow/keras-applications/"


@dataclass(frozen=True)
class Network:
    """How to build one characteristic's Keras network and where Keras gets its weights."""

    application: str  # attribute of keras.applications
    preprocess_module: str  # keras.applications.<module>.preprocess_input
    input_size: int
    feature_size: int
    weights_file: str  # the file name Keras caches under $KERAS_HOME/models
    weights_url: str
    # Built channels-first on PyTorch (twice as fast there: Keras copies each conv's input to
    # channels-first and back otherwise) where the vectors stay the same (tests/torch_layouts.py).
    # Not DenseNet: Keras refuses to build it channels-first.
    channels_first: bool = True


class Characteristic(enum.IntEnum):
    MINIMUMWEIGHT_FAST_SMALL_PRECISION = 1
    LIGHTWEIGHT_FAST_SMALL_PRECISION = 2
    LIGHTWEIGHT_FAST_SHORT_PRECISION = 3
    LIGHTWEIGHT_QUICK_SHORT_PRECISION = 4
    MEDIUMWEIGHT_QUICK_GOOD_PRECISION = 5
    MIDDLEWEIGHT_QUICK_GOOD_PRECISION = 6
    MIDDLEWEIGHT_SLOW_GOOD_PRECISION = 7
    HEAVYWEIGHT_SLOW_GOOD_PRECISION = 8
    HEAVYWEIGHT_SLOW_HUGE_PRECISION = 9

    @classmethod
    def parse(cls, value: Characteristic | int | str) -> Characteristic:
        """Accept the enum, its value (1..9, also as text) or its name (any case)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, bool):
            raise ValueError(f"unknown characteristic {value!r}")
        if isinstance(value, int):
            try:
                return cls(value)
            except ValueError:
                pass
        elif isinstance(value, str):
            text = value.strip()
            if text.isdigit():
                return cls.parse(int(text))
            text = text.upper().removeprefix("CHARACTERISTIC.")
            if text in cls.__members__:
                return cls[text]
        names = ", ".join(f"{c.value}={c.name}" for c in cls)
        raise ValueError(f"unknown characteristic {value!r}; choose one of {names}")

    @property
    def network(self) -> Network:
        return NETWORKS[self]


def _keras(
    app: str, module: str, size: int, dim: int, file: str, folder: str, channels_first: bool = True
) -> Network:
    return Network(app, module, size, dim, file, f"{KERAS_BASE}{folder}/{file}", channels_first)


_NOTOP = "_weights_tf_dim_ordering_tf_kernels_notop.h5"
NETWORKS: dict[Characteristic, Network] = {
    Characteristic(1): _keras(
        "MobileNet", "mobilenet", 224, 1024, "mobilenet_1_0_224_tf_no_top.h5", "mobilenet"
    ),
    Characteristic(2): _keras("ResNet50V2", "resnet_v2", 224, 2048, "resnet50v2" + _NOTOP, "resnet"),
    Characteristic(3): _keras("ResNet101V2", "resnet_v2", 224, 2048, "resnet101v2" + _NOTOP, "resnet"),
    Characteristic(4): _keras(
        "DenseNet169", "densenet", 224, 1664, "densenet169" + _NOTOP, "densenet", channels_first=False
    ),
    Characteristic(5): _keras(
        "DenseNet201", "densenet", 224, 1920, "densenet201" + _NOTOP, "densenet", channels_first=False
    ),
    Characteristic(6): _keras(
        "InceptionV3", "inception_v3", 299, 2048, "inception_v3" + _NOTOP, "inception_v3"
    ),
    Characteristic(7): _keras("Xception", "xception", 299, 2048, "xception" + _NOTOP, "xception"),
    Characteristic(8): _keras(
        "EfficientNetV2M", "efficientnet_v2", 480, 1280, "efficientnetv2-m_notop.h5", "efficientnet_v2"
    ),
    Characteristic(9): _keras(
        "EfficientNetV2L", "efficientnet_v2", 480, 1280, "efficientnetv2-l_notop.h5", "efficientnet_v2"
    ),
}
