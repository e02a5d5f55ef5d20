"""Bounded YAML loading: every hostile or broken file is one GssmDataError line."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from gssm_data.common.yamlfile import load_yaml_file, load_yaml_text
from gssm_data.errors import GssmDataError
from gssm_data.graph import load_graph


def refused(path: str | Path, **limits: int) -> str:
    """The one-line message for a file that must be refused; it names what and where."""
    with pytest.raises(GssmDataError) as caught:
        load_yaml_file(path, what="test config", **limits)
    message = str(caught.value)
    assert "\n" not in message
    assert "test config" in message
    assert str(path) in message
    return message


def test_a_plain_file_loads_like_safe_load(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("a: 1\nb: [x, 2.5, {c: true}]\nwhen: 2024-01-02\n")
    data = load_yaml_file(path, what="test config")
    assert data["a"] == 1
    assert data["b"] == ["x", 2.5, {"c": True}]
    assert str(data["when"]) == "2024-01-02"


def test_an_empty_file_is_none(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_yaml_file(path, what="test config") is None


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    assert "not found" in refused(tmp_path / "absent.yaml")


def test_a_directory_is_refused(tmp_path: Path) -> None:
    assert "is a directory" in refused(tmp_path)


def test_dev_zero_is_refused_without_reading() -> None:
    started = time.monotonic()
    assert "not a regular file" in refused("/dev/zero")
    assert time.monotonic() - started < 1.0


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    outcome: list[str] = []
    # A plain open() of a FIFO with no writer blocks forever: run in a thread
    # so a regression fails the test instead of hanging the suite.
    worker = threading.Thread(target=lambda: outcome.append(refused(fifo)), daemon=True)
    worker.start()
    worker.join(timeout=5)
    assert not worker.is_alive(), "loading a FIFO blocked"
    assert "not a regular file" in outcome[0]


def test_a_file_over_the_size_limit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("a: " + "x" * 200 + "\n")
    assert "larger than the 100-byte limit" in refused(path, max_bytes=100)
    assert load_yaml_file(path, what="test config", max_bytes=204) == {"a": "x" * 200}


def test_a_file_that_grows_after_the_check_is_read_only_up_to_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read itself is bounded, not only the stat: the size check uses what was read."""
    path = tmp_path / "grows.yaml"
    path.write_text("a: " + "x" * 500 + "\n")
    real_stat = os.stat

    def small_stat(target: object, *args: object, **kwargs: object) -> os.stat_result:
        info = real_stat(target, *args, **kwargs)  # type: ignore[arg-type]
        fields = list(info)
        fields[6] = 10  # st_size: pretend the file was small when checked
        return os.stat_result(fields)

    monkeypatch.setattr(os, "stat", small_stat)
    monkeypatch.setattr(os, "fstat", lambda fd: small_stat(f"/proc/self/fd/{fd}"))
    reads: list[int] = []
    real_read = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: reads.append(n) or real_read(fd, n))
    assert "larger than the 100-byte limit" in refused(path, max_bytes=100)
    assert sum(reads) <= 101


def test_non_utf8_text_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    assert "not UTF-8" in refused(path)


def test_a_syntax_error_gives_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("a: 1\nb: c: d\n")
    message = refused(path)
    assert "not valid YAML" in message
    assert "line 2, column 5" in message


def test_deep_nesting_is_refused_before_composing(tmp_path: Path) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text("[" * 5000 + "]" * 5000)
    assert "nests deeper than 64 levels" in refused(path)
    block = "".join("  " * level + "k:\n" for level in range(70)) + "  " * 70 + "v: 1\n"
    path.write_text(block)
    assert "nests deeper than 64 levels" in refused(path)


def test_nesting_up_to_the_limit_loads(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("[" * 64 + "]" * 64)
    assert load_yaml_file(path, what="test config") is not None
    assert "nests deeper than 3" in refused(path, max_depth=3)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("a: .nan\n", "at a"),
        ("a: [1, {b: -.inf}]\n", "at a[1].b"),
        ("a: .Inf\n", "at a"),
        (".inf: 1\n", "non-finite number inf"),
    ],
)
def test_non_finite_numbers_are_refused_anywhere(text: str, where: str) -> None:
    with pytest.raises(GssmDataError, match="non-finite number") as caught:
        load_yaml_text(text, what="inline config")
    assert where in str(caught.value)
    assert str(caught.value).startswith("inline config")


def test_aliases_load_and_self_reference_does_not_loop() -> None:
    data = load_yaml_text("base: &b {x: 1.5}\nother: *b\nloop: &l [*l, 2.0]\n", what="inline")
    assert data["other"] == {"x": 1.5}
    assert data["loop"][0] is data["loop"]


def test_python_tags_never_construct_objects() -> None:
    with pytest.raises(GssmDataError, match="not valid YAML"):
        load_yaml_text("!!python/object/apply:os.system ['true']\n", what="inline")


def test_graph_files_go_through_the_bounded_loader(tmp_path: Path) -> None:
    with pytest.raises(GssmDataError, match="graph file /dev/zero is not a regular file"):
        load_graph("/dev/zero")
    path = tmp_path / "nan.yaml"
    path.write_text("nodes:\n  - {name: X, states: 3, alpha: .nan, observed: true}\n")
    with pytest.raises(GssmDataError, match=r"graph file .*nan\.yaml: non-finite number nan"):
        load_graph(path)
