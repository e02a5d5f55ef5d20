"""generate never loses data, never races, and refuses what it cannot finish.

Race tests run two writers as threads of this process with a controlled
interleaving: the first is held at a known point (inside the store lock) by an
event, the second starts, and only then is the first released. flock locks
belong to open file descriptions, so two threads conflict like two processes.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gssm_data import generate as generate_module
from gssm_data import preflight
from gssm_data.cli import app
from gssm_data.errors import GssmDataError
from gssm_data.generate import GenerateOptions, GenerateResult, generate
from gssm_data.graph import parse_graph
from gssm_data.presets import load_preset
from gssm_data.store import open_store, partial_path, verify_store
from gssm_data.storelock import lock_path

BLOCK = 64
runner = CliRunner()


@pytest.fixture(autouse=True)
def few_entropy_sequences(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(generate_module, "TRAIN_ENTROPY_SEQUENCES", 64)


def options(out: Path, **changes: object) -> GenerateOptions:
    fields: dict[str, object] = {
        "graph": load_preset("debug"),
        "name": "debug",
        "out": out,
        "n_train": 3 * BLOCK,
        "n_test": BLOCK,
        "seq_len": 9,
        "seed": 3,
        "workers": 1,
        "block_size": BLOCK,
    }
    fields.update(changes)
    return GenerateOptions.model_validate(fields)


def one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


class HeldWriter:
    """A generate running in a thread, held inside the store lock until released."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, run: GenerateOptions) -> None:
        self.inside, self.release = threading.Event(), threading.Event()
        self.result: GenerateResult | None = None
        self.error: BaseException | None = None
        real = generate_module._run_blocks

        def held_run_blocks(*args, **kwargs):
            if threading.current_thread() is self.thread:
                self.inside.set()
                assert self.release.wait(30), "the test never released the writer"
            return real(*args, **kwargs)

        monkeypatch.setattr(generate_module, "_run_blocks", held_run_blocks)
        self.thread = threading.Thread(target=self._run, args=(run,), daemon=True)
        self.thread.start()
        assert self.inside.wait(30), "the held writer never reached its blocks"

    def _run(self, run: GenerateOptions) -> None:
        try:
            self.result = generate(run)
        except BaseException as error:  # handed to the test
            self.error = error

    def finish(self) -> GenerateResult:
        self.release.set()
        self.thread.join(60)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def assert_complete_and_verified(path: Path) -> None:
    assert path.is_dir()
    assert verify_store(open_store(path)) == []


def test_force_while_another_writer_works_is_refused_and_keeps_its_partial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "s.zarr"
    first = HeldWriter(monkeypatch, options(out))
    before = sorted(p.name for p in partial_path(out).iterdir())
    with pytest.raises(GssmDataError, match=r"another gssm-data generate is writing .*--force"):
        generate(options(out, force=True))
    assert sorted(p.name for p in partial_path(out).iterdir()) == before  # untouched
    result = first.finish()
    assert result.status == "complete"
    assert_complete_and_verified(out)


def test_two_racing_writers_both_print_a_complete_verified_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "s.zarr"
    first = HeldWriter(monkeypatch, options(out))
    waiting = threading.Event()
    second: dict[str, GenerateResult] = {}

    def run_second() -> None:
        log = lambda message: waiting.set() if message.startswith("waiting") else None  # noqa: E731
        second["result"] = generate(options(out), log=log)

    thread = threading.Thread(target=run_second, daemon=True)
    thread.start()
    assert waiting.wait(30), "the second writer did not wait for the lock"
    assert not out.exists() and "result" not in second  # it waits, touching nothing
    results = [first.finish()]
    thread.join(60)
    results.append(second["result"])
    assert [r.status for r in results] == ["complete", "already-complete"]
    for result in results:
        assert result.path == out
        assert_complete_and_verified(result.path)
    assert not lock_path(out).exists()  # the last exclusive holder removed it


def test_publishing_never_moves_a_store_it_did_not_write(tmp_path: Path) -> None:
    """Where another task published first, or where flock does not hold (some network
    file systems), the store in place is kept: the same store wins, another one stops
    the run with its own copy kept."""
    out = tmp_path / "s.zarr"
    planned = generate_module.build_manifest(options(out))
    generate(options(out))
    theirs = (out / "zarr.json").stat().st_ino
    generate(options(tmp_path / "mine.zarr"))
    (tmp_path / "mine.zarr").rename(partial_path(out))
    publish = generate_module._publish
    assert publish(partial_path(out), out, planned, replacing=None, log=print) == (
        "already-complete"
    )
    assert (out / "zarr.json").stat().st_ino == theirs and not partial_path(out).exists()
    # The partial already gone (another shard task renamed it): nothing to do.
    assert publish(partial_path(out), out, planned, replacing=None, log=print) == (
        "already-complete"
    )

    generate(options(tmp_path / "other.zarr", seed=4))
    (tmp_path / "other.zarr").rename(partial_path(out))
    other = generate_module.build_manifest(options(out, seed=4))
    with pytest.raises(GssmDataError, match="appeared while this run was writing"):
        publish(partial_path(out), out, other, replacing=None, log=print)
    assert (out / "zarr.json").stat().st_ino == theirs and partial_path(out).is_dir()


@pytest.mark.parametrize("kind", ["folder", "file", "partial-folder"])
def test_force_never_replaces_what_is_not_a_store_of_ours(tmp_path: Path, kind: str) -> None:
    out = tmp_path / "thesis.zarr"
    target = partial_path(out) if kind == "partial-folder" else out
    if kind == "file":
        target.write_text("my only copy")
    else:
        target.mkdir()
        (target / "notes.txt").write_text("my only copy")
    for force in (False, True):
        with pytest.raises(GssmDataError, match=r"not a gssm-data store.*even with --force"):
            generate(options(out, force=force))
    kept = target if kind == "file" else target / "notes.txt"
    assert kept.read_text() == "my only copy"


def test_force_on_a_user_folder_is_one_line_from_the_cli(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "data.csv").write_text("1,2\n")
    args = ["generate", "--preset", "debug", "--n", "64", "--n-test", "0", "--seq-len", "9"]
    result = runner.invoke(app, [*args, "--out", str(out), "--force", "--quiet"])
    one_line_error(result, "not a gssm-data store")
    assert (out / "data.csv").read_text() == "1,2\n"


def test_force_still_replaces_a_store_of_ours(tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    generate(options(out))
    assert generate(options(out, n_train=BLOCK, force=True)).status == "complete"
    assert open_store(out).manifest.splits["train"].n == BLOCK


def test_a_vocabulary_of_one_finishes(tmp_path: Path) -> None:
    """Every chunk is all zeros; reopened arrays must still write them."""
    graph = parse_graph(
        {
            "nodes": [
                {"name": "Z", "states": 1, "alpha": 0.5},
                {"name": "X", "states": 1, "alpha": 0.5, "parents": ["Z"], "observed": True},
            ]
        }
    )
    out = tmp_path / "one.zarr"
    result = generate(options(out, graph=graph, with_latents=True))
    assert result.status == "complete"
    assert_complete_and_verified(out)
    assert (out / "train" / "tokens" / "c" / "0" / "0").is_file()


def test_an_observed_parent_of_a_latent_is_refused_before_writing(tmp_path: Path) -> None:
    graph = tmp_path / "g.yaml"
    graph.write_text(
        "nodes:\n  - {name: Z, states: 2, alpha: 0.5, parents: [X]}\n"
        "  - {name: X, states: 3, alpha: 0.5, observed: true}\n"
    )
    result = runner.invoke(app, ["generate", "--graph", str(graph), "--out", str(tmp_path / "o")])
    one_line_error(result, "observed node 'X' is a parent of Z")
    assert not (tmp_path / "o").exists() and not partial_path(tmp_path / "o").exists()


def test_graphs_whose_entropy_cannot_be_measured_are_refused_before_writing(
    tmp_path: Path,
) -> None:
    many = [{"name": f"Z{i}", "states": 1, "alpha": 1.0} for i in range(26)]
    many.append({"name": "X", "states": 2, "alpha": 1.0, "parents": ["Z0"], "observed": True})
    with pytest.raises(GssmDataError, match="26 latent nodes"):
        generate(options(tmp_path / "a.zarr", graph=parse_graph({"nodes": many})))
    wide = [{"name": f"Z{i}", "states": 512, "alpha": 1.0} for i in range(3)]
    wide.append({"name": "X", "states": 2, "alpha": 1.0, "parents": ["Z0"], "observed": True})
    with pytest.raises(GssmDataError, match="joint latent space has 134,217,728 states"):
        generate(options(tmp_path / "b.zarr", graph=parse_graph({"nodes": wide})))
    assert not list(tmp_path.iterdir())


def test_preflight_limits_match_the_entropy_module() -> None:
    from gssm_data import entropy

    assert preflight.MAX_JOINT_STATES == entropy.MAX_JOINT_STATES


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--n", "1e15"], "more than the limit of 4,194,304"),
        (["--n", "1e12"], "244,140,628 blocks"),
        (["--seq-len", "1e9"], "--seq-len 1,000,000,000 is more than the limit of 1,048,576"),
        (["--n-test", "1e13"], "blocks of 4,096 sequences"),
        (["--target-bits", "nan"], "--target-bits nan: give a finite number"),
        (["--target-bits", "inf"], "--target-bits inf: give a finite number"),
        (["--n", "nan"], "--n 'nan' is not a whole number"),
        (["--seq-len", "inf"], "--seq-len 'inf' is not a whole number"),
    ],
)
def test_huge_or_non_finite_requests_are_one_line_and_allocate_nothing(
    args: list[str], fragment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    started = time.monotonic()
    result = runner.invoke(app, ["generate", "--preset", "debug", "--quiet", *args])
    one_line_error(result, fragment)
    assert time.monotonic() - started < 5
    assert not (tmp_path / "datasets").exists()


def test_memory_beyond_the_machine_is_refused_with_the_estimate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(preflight, "available_memory_bytes", lambda: 100 << 20)
    out = tmp_path / "s.zarr"
    with pytest.raises(GssmDataError) as caught:
        generate(options(out, seq_len=100_000, block_size=4096, workers=2))
    message = str(caught.value)
    # 4096 x 100,000 cells x (8 bytes x 2 nodes + 2 x (1 + 1)) = 8.2 GB per block, two writers.
    assert "writing needs about 16.4 GB" in message and "8.2 GB per block" in message
    assert "more than the 83.9 MB available" in message
    assert not out.exists() and not partial_path(out).exists()


def test_the_disk_is_checked_before_the_layout_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        generate_module.shutil, "disk_usage", lambda path: type("U", (), {"free": 10**6})()
    )
    out = tmp_path / "s.zarr"
    with pytest.raises(GssmDataError, match=r"not enough free disk .* GB needed, 0.00 GB free"):
        generate(options(out, n_train=10**7, block_size=4096))
    assert not out.exists() and not partial_path(out).exists()


@pytest.mark.parametrize(
    ("graph", "fragment"),
    [
        ("/dev/zero", "graph file /dev/zero is not a regular file"),
        ("deep.yaml", "nests deeper than 64 levels"),
        ("big.yaml", "larger than the 1,048,576-byte limit"),
        ("nan.yaml", "non-finite number nan at nodes[0].alpha"),
        ("folder", "is a directory"),
    ],
)
def test_hostile_graph_files_are_one_line_and_quick(
    graph: str, fragment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("deep.yaml").write_text("nodes: " + "[" * 5000 + "]" * 5000)
    Path("big.yaml").write_text("# padding\n" * 120_000)
    Path("nan.yaml").write_text("nodes:\n  - {name: X, states: 2, alpha: .nan, observed: true}\n")
    Path("folder").mkdir()
    started = time.monotonic()
    one_line_error(runner.invoke(app, ["generate", "--graph", graph, "-q"]), fragment)
    assert time.monotonic() - started < 5
    assert not Path("datasets").exists()


def test_a_format_1_store_still_reads_and_is_not_taken_for_a_format_2_one(tmp_path: Path) -> None:
    out = tmp_path / "old.zarr"
    generate(options(out))
    group = json.loads((out / "zarr.json").read_text())
    manifest = group["attributes"]["manifest"]
    manifest["format_version"] = 1
    del manifest["kernel_draw"]  # format 1 manifests do not have it
    manifest["fingerprint"] = "0123456789abcdef"
    (out / "zarr.json").write_text(json.dumps(group))
    store = open_store(out)
    assert store.manifest.kernel_draw == "numpy-dirichlet"
    assert verify_store(store) == []
    with pytest.raises(GssmDataError, match=r"already exists with other settings.*fingerprint"):
        generate(options(out))
