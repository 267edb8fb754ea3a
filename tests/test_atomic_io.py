"""atomic_io: a folder appears whole or not at all, and nothing temporary is left behind."""

import os

import pytest

from efficientps_d2.atomic_io import (
    atomic_directory,
    blocking_file,
    check_writable_file,
    check_writable_folder,
)


def _write(folder, text):
    os.makedirs(folder)
    with open(os.path.join(folder, "a.txt"), "w") as f:
        f.write(text)


def _read(folder):
    with open(os.path.join(folder, "a.txt")) as f:
        return f.read()


def test_folder_is_placed_replaced_or_refused(tmp_path):
    target = str(tmp_path / "out")
    with atomic_directory(target) as new:
        assert not os.path.exists(target)
        _write(new, "one")
    assert _read(target) == "one"
    with pytest.raises(FileExistsError, match="out"):
        with atomic_directory(target) as new:
            _write(new, "two")
    with atomic_directory(target, overwrite=True) as new:
        _write(new, "three")
    assert _read(target) == "three" and os.listdir(tmp_path) == ["out"]


def test_failure_in_the_block_or_in_then_keeps_the_old_folder(tmp_path):
    target = str(tmp_path / "out")
    _write(target, "old")
    with pytest.raises(RuntimeError, match="block"):
        with atomic_directory(target, overwrite=True) as new:
            _write(new, "new")
            raise RuntimeError("block")
    assert _read(target) == "old" and os.listdir(tmp_path) == ["out"]

    def then():
        assert _read(target) == "new"  # called with the new folder in place
        raise RuntimeError("then")

    with pytest.raises(RuntimeError, match="then"):
        with atomic_directory(target, overwrite=True, then=then) as new:
            _write(new, "new")
    assert _read(target) == "old" and os.listdir(tmp_path) == ["out"]


def test_blocking_file_names_what_stops_makedirs(tmp_path):
    a_file, link = tmp_path / "a_file", tmp_path / "link"
    a_file.write_text("x")
    link.symlink_to(tmp_path / "gone")  # broken
    assert blocking_file(tmp_path / "new" / "deeper") is None
    assert blocking_file(tmp_path) is None
    assert blocking_file(a_file) == str(a_file)
    assert blocking_file(a_file / "a" / "b") == str(a_file)
    assert blocking_file(link / "run") == str(link)
    with pytest.raises(OSError):  # "No such file or directory": the makedirs it prevents
        os.makedirs(link / "run")


def test_check_writable_file_names_the_file_and_the_fault(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "a_file").write_text("x")
    check_writable_file(str(tmp_path / "new" / "out.json"), "output json")  # makedirs will do
    with pytest.raises(ValueError, match=r"The output json '.*folder' is a folder, not a file"):
        check_writable_file(str(tmp_path / "folder"), "output json")
    with pytest.raises(RuntimeError, match=r"report '.*a_file/r.json': '.*a_file' is not a folder"):
        check_writable_file(str(tmp_path / "a_file" / "r.json"), "report", RuntimeError)


def test_check_writable_folder_names_the_folder_and_the_fault(tmp_path):
    (tmp_path / "folder").mkdir()
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone")
    check_writable_folder(str(tmp_path / "folder"), "--output")
    check_writable_folder(str(tmp_path / "new" / "deeper"), "--output")  # makedirs will do
    with pytest.raises(ValueError) as error:
        check_writable_folder(str(a_file), "--output")
    assert str(error.value) == f"The --output '{a_file}' is a file, not a folder."
    with pytest.raises(ValueError, match=f"The --output '{link}' is a broken symbolic link, not"):
        check_writable_folder(str(link), "--output")
    with pytest.raises(RuntimeError) as error:
        check_writable_folder(str(a_file / "run"), "OUTPUT_DIR", RuntimeError, hint="Set it.")
    assert str(error.value) == (
        f"Cannot make the OUTPUT_DIR '{a_file / 'run'}': '{a_file}' is not a folder. Set it."
    )
    # A folder that its writer replaces whole may be a file now; the path above it may not.
    check_writable_folder(str(a_file), "PNG folder", replaced=True)
    check_writable_folder(str(link), "PNG folder", replaced=True)
    with pytest.raises(ValueError, match=f"PNG folder '{a_file / 'png'}': '{a_file}' is not a"):
        check_writable_folder(str(a_file / "png"), "PNG folder", replaced=True)


def test_an_unwritable_folder_is_refused_naming_it(tmp_path, read_only_folder):
    # Writers failed after the work with a bare "Permission denied" naming a temporary file,
    # and the demo blamed the image it was writing the drawing of.
    ro = read_only_folder
    denied = f"'{ro}' is not writable (its permissions, or a read-only file system)."
    for path in (ro, ro / "new" / "deeper"):
        with pytest.raises(ValueError) as error:
            check_writable_folder(str(path), "--output")
        assert str(error.value) == f"Cannot write the --output '{path}': {denied}"
    with pytest.raises(ValueError, match=f"json '{ro / 'r.json'}': '{ro}' is not writable"):
        check_writable_file(str(ro / "r.json"), "output json")
    # A folder replaced whole is moved: the folder above it must be writable, and it too.
    with pytest.raises(ValueError, match=f"folder '{ro / 'png'}': '{ro}' is not writable"):
        check_writable_folder(str(ro / "png"), "PNG folder", replaced=True)
    with pytest.raises(ValueError, match=f"folder '{ro}': '{ro}' is not writable"):
        check_writable_folder(str(ro), "PNG folder", replaced=True)
    check_writable_folder(str(tmp_path / "png"), "PNG folder", replaced=True)
    check_writable_file(str(tmp_path / "r.json"), "output json")
