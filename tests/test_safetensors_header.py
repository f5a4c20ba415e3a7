"""files.py's safetensors header reader and writer against safetensors' own save_file."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from kolors_story.files import NotSafetensors, read_safetensors_header, safetensors_header_bytes


def test_reads_what_save_file_wrote_and_writes_its_bytes(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.ones(3), "b": torch.zeros(2, 2, dtype=torch.float16)}, path, metadata={"名": "值"})
    raw = path.read_bytes()
    for source in (path, raw):
        header = read_safetensors_header(source)
        assert header.metadata == {"名": "值"}
        assert header.data_end() == len(raw)
        assert header.fields["b"] == {"dtype": "F16", "shape": [2, 2], "data_offsets": [12, 20]}
        assert safetensors_header_bytes(header.fields) == raw[:header.data_start]  # one metadata key: no order


@pytest.mark.parametrize("raw,words", [
    (b"\x05\x00", "2-byte file"),
    ((100).to_bytes(8, "little") + b"{}", "header of 100 bytes in a 10-byte file"),
    ((2).to_bytes(8, "little") + b"{x", "JSONDecodeError"),
    ((2).to_bytes(8, "little") + b"[]", "a JSON list, not an object"),
])
def test_refuses_what_is_not_a_header(tmp_path, raw, words):
    (tmp_path / "bad").write_bytes(raw)
    for source in (tmp_path / "bad", raw):
        with pytest.raises(NotSafetensors, match=words):
            read_safetensors_header(source)
