"""The one atomic writer: ordinary permissions (0666 & ~umask, not mkstemp's 0600), all-or-nothing replacement."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest
from helpers import run

from skipprofiler.atomic import (
    atomic_path,
    current_umask,
    write_bytes_atomic,
    write_text_atomic,
)


@pytest.fixture
def umask():
    """Set the process umask for one test and put the old one back after."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_files_get_the_umask_mode(tmp_path, umask, mask):
    umask(mask)
    assert current_umask() == mask
    write_text_atomic(tmp_path / "a.yaml", "a: 1\n")
    write_bytes_atomic(tmp_path / "b.bin", b"\x00\x01")
    with atomic_path(tmp_path / "c.prof") as tmp:
        tmp.write_bytes(b"c")
    for name in ("a.yaml", "b.bin", "c.prof"):
        assert mode(tmp_path / name) == 0o666 & ~mask, name


def test_umask_read_without_proc_leaves_it_unchanged(monkeypatch, umask):
    """Off Linux the umask is read by setting and restoring it."""
    real_open = open

    def no_proc(file, *args, **kwargs):
        if file == "/proc/self/status":
            raise FileNotFoundError(file)
        return real_open(file, *args, **kwargs)

    umask(0o027)
    monkeypatch.setattr("builtins.open", no_proc)
    assert current_umask() == 0o027 and current_umask() == 0o027


def test_replaces_existing_target_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "p.yaml"
    target.write_text("old\n")
    assert write_text_atomic(target, "new\n") == target
    assert target.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["p.yaml"]


def test_readers_see_old_or_new_never_partial(tmp_path):
    """os.replace swaps the directory entry: a reader racing the writer only ever sees one complete version."""
    target = tmp_path / "p.bin"
    old, new = b"o" * 1_000_000, b"n" * 1_000_000
    write_bytes_atomic(target, old)
    seen, done = set(), threading.Event()

    def read():
        while not done.is_set():
            seen.add(target.read_bytes())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(10):
            write_bytes_atomic(target, new)
            write_bytes_atomic(target, old)
    finally:
        done.set()
        reader.join()
    assert seen <= {old, new}


def test_failing_writer_leaves_target_and_folder_as_they_were(tmp_path):
    target = tmp_path / "p.prof"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk on fire")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["p.prof"]
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C mid-write too
        with atomic_path(tmp_path / "new.prof"):
            raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["p.prof"]


def test_temp_file_keeps_the_suffix_for_format_sniffing_writers(tmp_path):
    with atomic_path(tmp_path / "fig.png") as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".png" and tmp.name.startswith(".fig.")
        tmp.write_bytes(b"png")


def test_missing_folder_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_text_atomic(tmp_path / "nope" / "p.yaml", "x")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------------
# every output file the package writes goes through it


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_profile_plan_eval_json_and_png_are_0644_under_umask_022(tmp_path, capsys, umask):
    from helpers import BASE_CURVE, synthetic_profile

    from skipprofiler._cli.common import write_output
    from skipprofiler.evaluation.report import _atomic_savefig, _plt

    umask(0o022)
    synthetic_profile({"fiction": BASE_CURVE}).save(tmp_path / "s.prof")
    code, _, err = run(["export-plan", tmp_path / "s.prof", "-r", "0.25", "--out", tmp_path / "p.yaml"], capsys)
    assert code == 0, err
    write_output(tmp_path / "eval.json", '{"plans": []}\n')
    fig = _plt().figure(figsize=(1, 1))
    _atomic_savefig(fig, tmp_path / "f.png")
    _plt().close(fig)
    assert (tmp_path / "f.png").read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json", "f.png", "p.yaml", "s.prof"]
    assert {p.name: mode(p) for p in tmp_path.iterdir()} == dict.fromkeys(["eval.json", "f.png", "p.yaml", "s.prof"],
                                                                          0o644)
