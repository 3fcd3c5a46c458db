import pytest

from compress.kinds import TORCH_FP32, Kind


def test_traits_combine_and_round_trip_through_json():
    kind = TORCH_FP32.evolve(per_layer_shapes=True, weights="fake-quant", sparsity="masks")
    assert Kind.from_json(kind.to_json()) == kind
    assert kind.describe() == "torch fake-quant with per-layer shapes sparse (masks)"
    assert not kind.is_float and TORCH_FP32.is_float


def test_precision_labels():
    assert Kind("onnx", "int8-dynamic").precision == "int8"
    assert Kind("onnx", "int4-matmulnbits").precision == "int4"
    assert Kind("torch", "bf16").precision == "bf16"


@pytest.mark.parametrize(("traits", "message"), [
    ({"format": "tflite"}, "unknown format 'tflite'"),
    ({"format": "torch", "weights": "int8-qdq"}, "torch weights cannot be 'int8-qdq'"),
    ({"format": "onnx", "weights": "fake-quant"}, "onnx weights cannot be 'fake-quant'"),
    ({"sparsity": "holes"}, "unknown sparsity 'holes'"),
])
def test_impossible_kinds_are_refused(traits, message):
    with pytest.raises(ValueError, match=message):
        Kind(**traits)
