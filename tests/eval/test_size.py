from __future__ import annotations

import zlib

import numpy as np

from compress.eval.size import CHUNK, deployed_files, disk_size


def test_deployed_files_are_what_the_runtime_ships(tmp_path):
    for name in ("compress.json", "stage.json", "model.safetensors", "pytorch_model.bin", "model.onnx",
                 "model.onnx_data", "tokenizer.json", "config.json", "extra/merges.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(name)
    shared = ["config.json", "extra/merges.txt", "tokenizer.json"]
    onnx = [path.relative_to(tmp_path).as_posix() for path in deployed_files(tmp_path, "onnx")]
    torch = [path.relative_to(tmp_path).as_posix() for path in deployed_files(tmp_path, "torch")]
    assert onnx == sorted([*shared, "model.onnx", "model.onnx_data"])
    assert torch == sorted([*shared, "model.safetensors", "pytorch_model.bin"])


def test_disk_size_counts_bytes_and_deflates_each_file_in_chunks(tmp_path):
    rng = np.random.default_rng(0)
    contents = {"weights": rng.bytes(CHUNK + 12345) + bytes(CHUNK), "vocab": b"token\n" * 5000, "empty": b""}
    files = []
    for name, data in contents.items():
        files.append(tmp_path / name)
        files[-1].write_bytes(data)
    size = disk_size(files)
    assert size["size_bytes"] == sum(len(data) for data in contents.values())
    assert size["size_zipped_bytes"] == sum(len(zlib.compress(data, 1)) for data in contents.values())
    assert size["size_zipped_bytes"] < size["size_bytes"] - CHUNK  # the zeros and the repeated lines deflate
