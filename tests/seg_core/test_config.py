"""Config dataclasses: validation at the boundary and a lossless dict round trip."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from seg_core.config import MaskSpec, ModelConfig, Preprocessing, from_dict, to_dict


def test_round_trip_through_plain_dict():
    spec = MaskSpec(num_classes=2, mask_values=(0, 255), class_names=("membrane", "cell"))
    again = from_dict(MaskSpec, to_dict(spec))
    assert again == spec
    assert to_dict(spec)["mask_values"] == [0, 255]


def test_nested_dataclasses_are_rebuilt():
    @dataclass(frozen=True)
    class Outer:
        model: ModelConfig = field(default_factory=ModelConfig)
        pre: Preprocessing | None = None

    outer = from_dict(Outer, {"model": {"depth": 2}, "pre": {"channels": 1, "mean": [0.5], "std": [0.2]}})
    assert outer.model == ModelConfig(depth=2)
    assert outer.pre == Preprocessing(channels=1, mean=(0.5,), std=(0.2,))


def test_mappings_are_checked_key_by_key():
    @dataclass(frozen=True)
    class Placement:
        resources: dict[str, float] | None = None

    assert from_dict(Placement, {"resources": {"gpu_node": 1}}).resources == {"gpu_node": 1.0}
    assert from_dict(Placement, {"resources": None}).resources is None
    with pytest.raises(ValueError, match="resources: expected a mapping, got \\[1\\]"):
        from_dict(Placement, {"resources": [1]})
    with pytest.raises(ValueError, match="resources.gpu_node: expected a number, got 'x'"):
        from_dict(Placement, {"resources": {"gpu_node": "x"}})


def test_unknown_key_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown key.*'depht'.*depth"):
        from_dict(ModelConfig, {"depht": 3})


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: MaskSpec(num_classes=2, mask_values=(0, 128, 255)), "3 entries but num_classes=2"),
        (lambda: MaskSpec(num_classes=3, ignore_index=1), "collides with a class id"),
        (lambda: ModelConfig(norm="layer"), "norm must be"),
        (lambda: Preprocessing(channels=1), "mean/std need 1 entries"),
    ],
)
def test_bad_values_say_what_was_expected(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_default_class_names():
    assert MaskSpec(num_classes=3).names == ("class_0", "class_1", "class_2")
