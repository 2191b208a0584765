"""mixture.json and likelihoods.npz: atomic writes, validation errors, round trips, exports."""

import json
import os

import numpy as np
import pytest

from taskpgm_ray import exporters as ex
from taskpgm_ray import mixture_file as mf

WEIGHTS = {"alpaca": 0.5, "gsm8k": 0.3, "code": 0.2, "noise": 0.0}
SIZES = {"alpaca": 1000, "gsm8k": 400, "code": 2500, "noise": 50}


def write(path, **over):
    kw = dict(
        weights=WEIGHTS,
        method="taskpgm",
        affinity="pmi",
        hyperparameters={"beta": 1.0, "lam": 0.5},
        energy=-1.25,
        kkt_residual=1e-15,
        sizes=SIZES,
        inputs_hash="ab12",
    )
    kw.update(over)
    mf.write_mixture(str(path), **kw)


def test_mixture_round_trip_and_format(tmp_path):
    p = tmp_path / "mixture.json"
    write(p)
    doc = mf.read_mixture(str(p))
    assert doc["format"] == "taskpgm-mixture/1"
    assert doc["weights"] == WEIGHTS and doc["sizes"] == SIZES
    assert doc["method"] == "taskpgm" and doc["affinity"] == "pmi" and doc["energy"] == -1.25
    assert doc["created"].endswith("+00:00") and "T" in doc["created"]
    assert doc["weight_unit"] == "examples"  # the default
    assert set(json.loads(p.read_text())) == {
        "format",
        "weights",
        "weight_unit",
        "method",
        "affinity",
        "hyperparameters",
        "energy",
        "kkt_residual",
        "sizes",
        "inputs_hash",
        "created",
    }
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp")] == []


def test_write_is_atomic_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "mixture.json"
    write(p)
    before = p.read_text()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write(p, energy=-9.0)
    assert p.read_text() == before  # the old file is intact
    assert os.listdir(tmp_path) == ["mixture.json"]  # no temporary left behind


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: d.update(format="other/2"), r"field 'format' must be 'taskpgm-mixture/1'"),
        (lambda d: d["weights"].update(alpaca=-0.1, gsm8k=0.9), r"weights\['alpaca'\] is negative"),
        (lambda d: d["weights"].update(alpaca=0.6), r"weights sum to 1\.1, not 1"),
        (lambda d: d["weights"].update(code=float("nan")), r"weights\['code'\] must be a finite number"),
        (lambda d: d.pop("weights"), r"missing field 'weights'"),
        (lambda d: d.update(method="magic"), r"field 'method' must be one of"),
        (lambda d: d.update(weight_unit="bytes"), r"field 'weight_unit' must be one of \('examples', 'tokens'\)"),
        (lambda d: d.update(sizes={"alpaca": -1}), r"field 'sizes' must be an object"),
    ],
)
def test_read_mixture_errors_name_file_and_field(tmp_path, edit, match):
    p = tmp_path / "mixture.json"
    write(p)
    doc = json.loads(p.read_text())
    edit(doc)
    p.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=str(p).replace(".", r"\.") + ": " + match):
        mf.read_mixture(str(p))


def test_hand_written_mixture_needs_only_format_and_weights(tmp_path):
    p = tmp_path / "hand.json"
    p.write_text(json.dumps({"format": "taskpgm-mixture/1", "weights": {"a": 0.25, "b": 0.75}}))
    doc = mf.read_mixture(str(p))
    assert doc["weights"] == {"a": 0.25, "b": 0.75} and doc["weight_unit"] == "examples"
    for key in mf.OPTIONAL_FIELDS:
        assert doc[key] is None, key
    p.write_text(json.dumps({"format": "taskpgm-mixture/1", "weights": {"a": 1.25, "b": -0.25}}))
    with pytest.raises(ValueError, match=r"hand\.json: weights\['b'\] is negative \(-0\.25\)"):
        mf.read_mixture(str(p))
    p.write_text(json.dumps({"format": "taskpgm-mixture/1", "weights": {"a": 0.5, "b": 0.5000011}}))
    with pytest.raises(ValueError, match=r"hand\.json: weights sum to 1\.0000011, not 1 \(tolerance 1e-6\)"):
        mf.read_mixture(str(p))


def test_write_mixture_records_weight_unit(tmp_path):
    p = tmp_path / "m.json"
    write(p, weight_unit="tokens")
    assert mf.read_mixture(str(p))["weight_unit"] == "tokens"
    with pytest.raises(ValueError, match=r"weight_unit must be one of \('examples', 'tokens'\), got 'rows'"):
        write(p, weight_unit="rows")


def test_write_mixture_rejects_bad_weights(tmp_path):
    with pytest.raises(ValueError, match=r"weights sum to 0\.9"):
        write(tmp_path / "m.json", weights={"a": 0.9}, sizes={"a": 1})
    assert not (tmp_path / "m.json").exists()


def test_likelihoods_round_trip(tmp_path):
    p = str(tmp_path / "likelihoods.npz")
    tasks = ["a", "b", "c"]
    ll = -np.arange(9.0).reshape(3, 3) - 1
    mf.save_likelihoods(p, tasks, ll, [3, 4, 5], sizes=[10, 20, 30])
    assert sorted(os.listdir(tmp_path)) == ["likelihoods.npz"]  # no "likelihoods.npz.npz", no temporaries
    t, l2, c, s = mf.load_likelihoods(p)
    assert t == tasks and np.array_equal(l2, ll) and c.tolist() == [3, 4, 5] and s.tolist() == [10, 20, 30]
    mf.save_likelihoods(p, tasks, ll, [3, 4, 5])
    assert mf.load_likelihoods(p)[3] is None


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"tasks": ["a", "b"], "count": [1, 1]}, r"missing array 'loglik_sum'"),
        (
            {"tasks": ["a", "b"], "loglik_sum": -np.ones((2, 3)), "count": [1, 1]},
            r"'loglik_sum' must have shape \(2, 2\) for 2 tasks",
        ),
        ({"tasks": ["a", "b"], "loglik_sum": -np.ones((2, 2)), "count": [1, 0]}, r"count for task 'b' is 0"),
        (
            {"tasks": ["a", "b"], "loglik_sum": np.array([[-1, np.nan], [-1, -1]]), "count": [1, 1]},
            r"loglik_sum\[0, 1\] \(proxy 'a' on task 'b'\) is not finite",
        ),
    ],
)
def test_load_likelihoods_errors(tmp_path, arrays, match):
    p = str(tmp_path / "L.npz")
    np.savez(p, **{k: np.asarray(v) for k, v in arrays.items()})
    with pytest.raises(ValueError, match=match):
        mf.load_likelihoods(p)


def test_load_likelihoods_refuses_what_is_not_a_plain_npz(tmp_path):
    """Never numpy's "allow_pickle" hint: each message names the file and says what it should be."""
    import pickle

    not_npz = "not a NumPy .npz archive of plain arrays (as numpy.savez writes)"
    text = tmp_path / "L.txt"
    text.write_text("tasks,loglik\n")
    pickled = tmp_path / "L.pkl"
    pickled.write_bytes(pickle.dumps({"tasks": ["a"]}))
    single = tmp_path / "L.npy"
    np.save(single, np.zeros(3))
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    objects = tmp_path / "objects.npz"
    np.savez(objects, tasks=np.array(["a", None], dtype=object), loglik_sum=-np.ones((2, 2)), count=[1, 1])
    cases = {
        text: f"{text}: {not_npz}",
        pickled: f"{pickled}: {not_npz}",
        empty: f"{empty}: {not_npz}",
        single: f"{single}: {not_npz}; it holds a single .npy array",
        objects: f"{objects}: array 'tasks' holds Python objects (pickled data), which are never loaded; "
                 "save names as strings and numbers as numbers",
    }
    for path, message in cases.items():
        with pytest.raises(ValueError) as e:
            mf.load_likelihoods(str(path))
        assert str(e.value) == message
        assert "allow_pickle" not in str(e.value)


@pytest.mark.parametrize("to", ["hf", "megatron", "json"])
def test_exports_round_trip(to):
    mixture = {"weights": {"a": 0.1234567890123, "b": 0.5, "c": 0.3765432109877, "d": 0.0}, "sizes": SIZES,
               "weight_unit": "tokens" if to == "megatron" else "examples"}  # megatron blends tokens: no conversion
    text = ex.export_mixture(mixture, to)
    back = ex.parse_export(text, to)
    assert "d" not in back  # weight 0: left out
    for task, w in mixture["weights"].items():
        assert back.get(task, 0.0) == pytest.approx(w, abs=1e-15)


def test_llamafactory_export_round_trips_to_whole_examples():
    mixture = {"weights": {"a": 0.1234567890123, "b": 0.5, "c": 0.3765432109877, "d": 0.0}}
    back = ex.parse_export(ex.export_mixture(mixture, "llamafactory", num_samples=100_000), "llamafactory")
    assert "d" not in back
    for task, w in mixture["weights"].items():
        assert back.get(task, 0.0) == pytest.approx(w, abs=0.5 / 100_000)  # rounded to whole examples


def test_export_formats_look_right():
    mixture = {"weights": {"a": 0.25, "b": 0.75}, "weight_unit": "tokens"}
    assert ex.export_mixture(mixture, "megatron").endswith("\n--data-path 0.25 a 0.75 b\n")
    lf = ex.export_mixture({"weights": {"a": 0.25, "b": 0.75}}, "llamafactory", num_samples=4)
    assert "dataset: a,b\n" in lf and "mix_strategy: concat\n" in lf and "interleave_probs" not in lf
    assert "PROBABILITIES = [0.25, 0.75]" in ex.export_mixture({"weights": {"a": 0.25, "b": 0.75}}, "hf")
    with pytest.raises(ValueError, match=r"unknown export format 'fairseq'"):
        ex.export_mixture(mixture, "fairseq")
    with pytest.raises(
        ValueError, match=r"axolotl export needs each task's number of training examples .* no size for task\(s\) a, b"
    ):
        ex.export_mixture({"weights": {"a": 0.25, "b": 0.75}}, "axolotl")


def test_axolotl_export_down_samples_and_round_trips():
    weights = {"alpaca": 0.5, "gsm8k": 0.3, "code": 0.2, "noise": 0.0}
    text = ex.export_mixture({"weights": weights, "sizes": SIZES}, "axolotl")
    assert "no per-dataset weight" in text and "- path: noise" not in text and "Left out (weight 0): noise" in text
    # the largest need (w / N): gsm8k 0.3/400 -> kept whole, and no example repeats
    assert "gsm8k: 400 examples = 1 x all 400; target 400" in text
    back = ex.parse_export(text, "axolotl", sizes=SIZES)
    for task, w in weights.items():
        # disjoint shards hold the kept counts, or (rarely) a few rows fewer: shares within 2e-3
        assert back.get(task, 0.0) == pytest.approx(w, abs=2e-3)
