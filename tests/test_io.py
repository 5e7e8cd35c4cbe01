import os

import pytest

from recbole_diff.io import atomic_write, read_yaml


def test_atomic_write_replaces_the_file_from_a_temporary_file_beside_it(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old")
    with atomic_write(str(target)) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and tmp != str(target)
        with open(tmp, "w") as f:
            f.write("new")
        assert target.read_text() == "old"  # a reader sees the old file until the block ends
    assert target.read_text() == "new"
    assert os.listdir(tmp_path) == ["result.json"]


def test_atomic_write_keeps_the_old_file_and_removes_the_temporary_one_on_an_error(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_write(str(target)) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["result.json"]


def test_two_writes_of_one_file_get_different_temporary_files(tmp_path):
    target = str(tmp_path / "results.md")
    with atomic_write(target) as first, atomic_write(target) as second:
        assert first != second
        for path, text in ((first, "a"), (second, "b")):
            with open(path, "w") as f:
                f.write(text)
    assert open(target).read() == "a"  # the outer block ends last


def test_read_yaml_names_the_file_and_what_it_was_for(tmp_path):
    bad = tmp_path / "space.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ValueError, match=r"Search space file '.*space\.yaml' is not valid yaml"):
        read_yaml(str(bad), "Search space file")
    with pytest.raises(FileNotFoundError, match=r"Search space file '.*missing\.yaml' does not exist"):
        read_yaml(str(tmp_path / "missing.yaml"), "Search space file")
