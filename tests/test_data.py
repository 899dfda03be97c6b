import hashlib

import pytest
import torch

from helpers import wikitext_dir
from utils.data.sources import DataError, calibration_windows, load_text, pack_blocks, read_text_file, tokenize_source, wikitext_rows_to_text


def test_wikitext_test_string_is_the_papers_exactly():
    text = read_text_file(wikitext_dir() / "wiki.test.raw")
    assert len(text) == 1_294_336
    assert hashlib.sha256(text.encode()).hexdigest() == \
        "696cca6b65a171b0a358a4be6732cdfdf2dd6164a32e20fd70e3c13fc4dfae83"


def test_rows_join_like_hugging_face():
    # a blank row becomes "" and rows are joined by "\n\n": row, "\n\n", "", "\n\n", row
    assert wikitext_rows_to_text([" = A = \n", " \n", " text\n"]) == " = A = \n" + "\n\n" + "\n\n" + " text\n"


def test_folder_source_picks_the_split_and_explains_a_missing_one(tmp_path):
    (tmp_path / "wiki.test.raw").write_text(" = T = \n \n test line\n", encoding="utf-8")
    (tmp_path / "wiki.valid.raw").write_text(" valid line\n", encoding="utf-8")
    assert "test line" in load_text(str(tmp_path), "test")
    assert load_text(str(tmp_path), "valid") == " valid line\n"
    with pytest.raises(DataError, match="no wiki.train.raw"):
        load_text(str(tmp_path), "train")


def test_several_files_and_latin1_text(tmp_path):
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_bytes(b"caf\xe9 au lait\r\n")  # Latin-1, CRLF, as in the NLTK fallback texts
    second.write_text("second", encoding="utf-8")
    assert load_text(f"{first},{second}") == "café au lait\n\n\nsecond"


def test_unknown_and_missing_sources_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_text(str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="unknown text source"):
        load_text("no-such-thing")


def test_tokens_are_cached_on_disk(tmp_path, tokenizer):
    path = tmp_path / "t.txt"
    path.write_text("hello world " * 50, encoding="utf-8")
    calls = []

    class Counting:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, *args, **kwargs):
            calls.append(args[0])
            return self.inner(*args, **kwargs)

        def __len__(self):
            return len(self.inner)

    counting = Counting(tokenizer)
    first = tokenize_source(str(path), counting, cache_dir=tmp_path / "cache")
    probes = len(calls)
    second = tokenize_source(str(path), counting, cache_dir=tmp_path / "cache")
    assert torch.equal(first.ids, second.ids) and first.num_bytes == 600
    assert "hello world " * 50 not in calls[probes:]  # only the fingerprint probe ran again
    path.write_text("changed text " * 50, encoding="utf-8")
    third = tokenize_source(str(path), counting, cache_dir=tmp_path / "cache")
    assert not torch.equal(third.ids, first.ids)


def test_blocks_and_calibration_windows():
    ids = torch.arange(1000)
    blocks = pack_blocks(ids, 64)
    assert blocks.shape == (15, 64) and torch.equal(blocks[1], torch.arange(64, 128))
    with pytest.raises(DataError, match="fewer than one block"):
        pack_blocks(ids[:10], 64)
    a, b = calibration_windows(ids, 8, 100, seed=0), calibration_windows(ids, 8, 100, seed=0)
    assert torch.equal(a, b) and a.shape == (8, 100)
    assert torch.all(a[:, 1:] - a[:, :-1] == 1)  # contiguous windows of the stream
    assert not torch.equal(a, calibration_windows(ids, 8, 100, seed=1))


def test_hugging_face_dataset_sources_go_through_datasets(tmp_path):
    """The `hf:` path is the real `datasets.load_dataset` call; here on a local folder (no network)."""
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    (folder / "train.csv").write_text("text,label\nfirst row,0\nsecond row,1\n", encoding="utf-8")
    assert load_text(f"hf:{folder}::train:text") == "first row\n\nsecond row"
    with pytest.raises(DataError, match="could not load dataset .* Offline\\?"):
        load_text("hf:no-such-user/no-such-dataset::train:text")


def test_random_bytes_given_as_text_are_warned_about(tmp_path, tokenizer):
    import os as _os

    from utils.data.sources import tokenize_source, warn_if_not_text
    binary = tmp_path / "weights.txt"
    binary.write_bytes(_os.urandom(20000))
    with pytest.warns(UserWarning, match="does not look like text"):
        tokenize_source(str(binary), tokenizer, cache_dir=tmp_path / "cache")
    assert warn_if_not_text("An ordinary sentence.\n\n = Heading = \n", "prose") == 0.0
