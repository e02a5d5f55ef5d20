"""scaling: recipes of entropy regimes x train sizes, materialised as prefix-sharing stores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from gssm_data import scaling as scaling_module
from gssm_data.cli import app
from gssm_data.errors import GssmDataError
from gssm_data.presets import load_preset
from gssm_data.scaling import Recipe, load_recipe, materialise, regime_graph
from gssm_data.store import open_store

REPO = Path(__file__).resolve().parents[3]
SHIPPED_RECIPE = REPO / "datasets" / "scaling.yaml"

TINY_RECIPE = {
    "description": "tiny recipe for tests",
    "seed": 1,
    "seq_len": 9,
    "regimes": [
        {"name": "debug-calibrated", "preset": "debug", "target_bits": 2.0},
        {"name": "debug-alpha", "preset": "debug", "alpha": 0.5, "target": "observed"},
        {"name": "file-dead", "graph": "graphs/tiny.yaml", "mode": "dead"},
    ],
    "scales": {
        "small": {"train_sizes": [30, "1e2"], "n_test": 40},
        "subset": {"train_sizes": [10], "n_test": 10, "regimes": ["debug-alpha"]},
    },
}


def _write_recipe(folder: Path, recipe: dict) -> Path:
    (folder / "graphs").mkdir(parents=True, exist_ok=True)
    debug = load_preset("debug").model_dump(mode="json")
    (folder / "graphs" / "tiny.yaml").write_text(yaml.safe_dump(debug))
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_the_shipped_recipe_is_valid_and_every_regime_resolves() -> None:
    recipe = load_recipe(SHIPPED_RECIPE)
    assert {"small", "full"} <= recipe.scales.keys()
    names = {regime.name for regime in recipe.regimes}
    for level in ("low", "medium", "high"):
        assert {f"hmm-{level}", f"base-{level}"} <= names
    assert any(regime.mode == "slow" for regime in recipe.regimes)
    assert any(regime.mode == "dead" for regime in recipe.regimes)
    for regime in recipe.regimes:
        regime_graph(regime, SHIPPED_RECIPE.parent)
    for scale in recipe.scales.values():
        assert scale.train_sizes == sorted(scale.train_sizes)
    assert recipe.scales["small"].n_train < recipe.scales["full"].n_train


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"scales": {"small": {"train_sizes": [1], "n_test": 1, "regimes": ["nope"]}}}, "nope"),
        ({"regimes": [{"name": "a", "preset": "debug"}, {"name": "a", "preset": "hmm"}]}, "dupl"),
        ({"regimes": [{"name": "a", "preset": "debug", "graph": "g.yaml"}]}, "exactly one"),
        ({"regimes": [{"name": "a", "preset": "debug", "alpha": 1, "target_bits": 1}]}, "not both"),
        ({"scales": {"small": {"train_sizes": ["lots"], "n_test": 1}}}, "not a count"),
        ({"unknown_key": 1}, "unknown_key"),
        ({"tolerance_bits": float("nan")}, "non-finite number nan at tolerance_bits"),
        ({"regimes": [{"name": "a", "preset": "debug", "alpha": float("inf")}]}, "non-finite"),
    ],
)
def test_bad_recipes_are_one_line_user_errors(tmp_path: Path, change: dict, message: str) -> None:
    path = _write_recipe(tmp_path, TINY_RECIPE | change)
    with pytest.raises(GssmDataError, match=message) as error:
        load_recipe(path)
    assert "\n" not in str(error.value)


@pytest.fixture(scope="module")
def materialised(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list]:
    """The tiny recipe's `small` scale, materialised once: (recipe, out dir, results)."""
    folder = tmp_path_factory.mktemp("scaling")
    recipe_path = _write_recipe(folder, TINY_RECIPE)
    out = folder / "out"
    return recipe_path, out, materialise(recipe_path, scale="small", out_dir=out)


@pytest.mark.integration
def test_materialise_writes_one_store_per_regime_with_the_largest_train_size(
    materialised: tuple[Path, Path, list],
) -> None:
    _, out, results = materialised
    assert [r.regime.name for r in results] == ["debug-calibrated", "debug-alpha", "file-dead"]
    for result in results:
        store = open_store(result.path)
        assert result.path.parent == out / "recipe"
        assert store.manifest.splits["train"].n == 100
        assert store.manifest.splits["test"].n == 40
        assert store.manifest.seed == 1 and store.manifest.seq_len == 9
        assert store.entropy("test") == result.entropy
    calibrated, explicit, dead = (open_store(r.path).graph for r in results)
    assert abs(results[0].calibrated_bits - 2.0) <= 0.05
    assert calibrated.latents[0].alpha == results[0].alpha
    assert explicit.observed.alpha == 0.5 and results[1].calibrated_bits is None
    assert all(node.mode == "dead" for node in dead.latents)
    index = json.loads((out / "recipe" / "index-small.json").read_text())
    assert index["train_sizes"] == [30, 100] and index["n_test"] == 40
    assert [item["store"] for item in index["regimes"]] == [str(r.path) for r in results]
    assert index["regimes"][0]["test_entropy"]["bits_per_token"] == (
        results[0].entropy.bits_per_token
    )


@pytest.mark.integration
def test_a_second_run_reuses_calibrations_and_complete_stores(
    materialised: tuple[Path, Path, list], monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe_path, out, first = materialised
    tokens = np.asarray(open_store(first[0].path).tokens("train")[...])

    def no_calibration(*args: object, **kwargs: object) -> None:
        raise AssertionError("calibrated again")

    monkeypatch.setattr(scaling_module, "calibrate", no_calibration)
    second = materialise(recipe_path, scale="small", out_dir=out)
    assert [r.path for r in second] == [r.path for r in first]
    assert [r.alpha for r in second] == [r.alpha for r in first]
    np.testing.assert_array_equal(open_store(second[0].path).tokens("train")[...], tokens)


def test_scaling_command_materialises_a_subset_and_prints_the_regime_table(
    tmp_path: Path,
) -> None:
    recipe_path = _write_recipe(tmp_path, TINY_RECIPE)
    args = ["scaling", str(recipe_path), "--scale", "subset", "--out-dir", str(tmp_path), "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for text in ("debug-alpha", "entropy", "unigram", "zstd", "gzip"):
        assert text in result.output
    assert "debug-calibrated" not in result.output
    index = json.loads((tmp_path / "recipe" / "index-subset.json").read_text())
    assert [item["name"] for item in index["regimes"]] == ["debug-alpha"]


def test_scaling_command_unknown_scale_is_a_one_line_error(tmp_path: Path) -> None:
    recipe_path = _write_recipe(tmp_path, TINY_RECIPE)
    result = CliRunner().invoke(app, ["scaling", str(recipe_path), "--scale", "huge"])
    assert result.exit_code == 1
    assert "scales: small, subset" in result.output


def test_non_finite_recipe_numbers_are_refused_from_python_too() -> None:
    with pytest.raises(ValueError, match="finite"):
        Recipe.model_validate(TINY_RECIPE | {"tolerance_bits": float("inf")})


def test_regimes_of_one_graph_share_calibration_evaluations_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gssm_data import calibrate as calibrate_module

    recipe = TINY_RECIPE | {
        "regimes": [
            {"name": "two-bits", "preset": "debug", "target_bits": 2.0},
            {"name": "two-and-a-bit", "preset": "debug", "target_bits": 2.2},
        ],
        "scales": {"small": {"train_sizes": [10], "n_test": 10}},
    }
    path = _write_recipe(tmp_path, recipe)
    computed: list[float] = []
    real = calibrate_module.entropy_bits

    def counting(graph, **kwargs):  # type: ignore[no-untyped-def]
        computed.append(graph.latents[0].alpha)
        return real(graph, **kwargs)

    monkeypatch.setattr(calibrate_module, "entropy_bits", counting)
    first = materialise(path, scale="small", out_dir=tmp_path / "out")
    assert len(computed) == len(set(computed))  # the second regime reused the first's scan
    evaluations = tmp_path / "out" / "recipe" / scaling_module.EVALUATIONS_FILE
    assert evaluations.exists()
    # Calibrating again from scratch (no recorded alphas) evaluates nothing and agrees.
    (tmp_path / "out" / "recipe" / scaling_module.CALIBRATIONS_FILE).unlink()
    computed.clear()
    again = list(scaling_module.plan_stores(path, scale="small", out_dir=tmp_path / "out"))
    assert computed == []
    assert [p.alpha for p in again] == [r.alpha for r in first]


def test_named_regimes_are_built_alone_and_the_index_keeps_the_others(tmp_path: Path) -> None:
    path = _write_recipe(tmp_path, TINY_RECIPE)
    out = tmp_path / "out"
    lines: list[str] = []
    first = materialise(path, out_dir=out, regimes=["file-dead"], log=lines.append)
    assert [r.regime.name for r in first] == ["file-dead"]
    assert "building 1 of 1 store(s) (file-dead)" in lines[0] and "about" in lines[0]
    assert len(list((out / "recipe").glob("*.zarr"))) == 1
    second = materialise(path, out_dir=out, regimes=["debug-alpha"])
    assert [r.regime.name for r in second] == ["debug-alpha"]
    index = json.loads((out / "recipe" / "index-small.json").read_text())
    assert [item["name"] for item in index["regimes"]] == ["debug-alpha", "file-dead"]
    lines.clear()
    materialise(path, out_dir=out, regimes=["file-dead", "debug-alpha"], log=lines.append)
    assert "building 0 of 2" in lines[0] and "already built: debug-alpha, file-dead" in lines[0]


def test_unknown_named_regimes_are_a_one_line_error(tmp_path: Path) -> None:
    path = _write_recipe(tmp_path, TINY_RECIPE)
    with pytest.raises(GssmDataError, match=r"nope not in scale 'subset'.*it has debug-alpha"):
        materialise(path, scale="subset", out_dir=tmp_path, regimes=["nope"])
    result = CliRunner().invoke(
        app, ["scaling", str(path), "--out-dir", str(tmp_path), "--regimes", "x,y", "-q"]
    )
    assert result.exit_code == 1 and "x, y not in scale" in result.output
    assert not (tmp_path / "recipe").exists()


def test_regimes_from_a_study_file_build_only_the_regimes_it_names(tmp_path: Path) -> None:
    path = _write_recipe(tmp_path, TINY_RECIPE)
    study = tmp_path / "study.yaml"
    study.write_text(
        "base: x.yaml\nregimes: [file-dead, {name: mine, store: elsewhere.zarr}]\nmodels: []\n"
    )
    assert scaling_module.regimes_named_in(study) == ["file-dead"]
    result = CliRunner().invoke(
        app, ["scaling", str(path), "--out-dir", str(tmp_path), "--regimes-from", str(study)]
    )
    assert result.exit_code == 0, result.output
    assert "building 1 of 1 store(s) (file-dead)" in result.output
    index = json.loads((tmp_path / "recipe" / "index-small.json").read_text())
    assert [item["name"] for item in index["regimes"]] == ["file-dead"]


def test_the_shipped_small_study_names_regimes_of_the_small_scale() -> None:
    study = REPO / "packages" / "llama-train" / "configs" / "studies" / "small.yaml"
    names = scaling_module.regimes_named_in(study)
    assert names == ["hmm-low", "hmm-high"]
    chosen = scaling_module.chosen_regimes(
        load_recipe(SHIPPED_RECIPE), SHIPPED_RECIPE, "small", names
    )
    assert [regime.name for regime in chosen] == names
