"""Active estimation's certainty bound beside the mixture it is for: the report says whose bound it shows, and the
select stage reads the energy a selected mixture was solved with (no Ray: the files are written by hand)."""

from __future__ import annotations

import dataclasses

from taskpgm_ray.config import EnergyConfig
from taskpgm_ray.pipeline import mixture_energy
from taskpgm_ray.report import estimation_markdown

CONFIG = dataclasses.asdict(EnergyConfig())


def progress(declared=0.004):
    return {"tasks": ["a", "b"], "fraction_pairs": 0.75, "fraction_units": 0.6, "fraction_examples": 0.5,
            "active": True, "measured": [[1.0, 0.5], [0.0, 1.0]],
            "certainty": {"tol": 0.01, "level": 0.9, "draws": 64, "declared_l1": declared, "expected_l1": 0.002,
                          "certain": True, "checks_certain_in_a_row": 2, "stopped_by": "certainty",
                          "energy": CONFIG}}


def taskpgm(**energy):
    e = {**CONFIG, **energy}
    return {"format": "taskpgm-mixture/1", "weights": {"a": 0.5, "b": 0.5}, "method": "taskpgm",
            "affinity": e.pop("affinity"), "hyperparameters": {**e, "ratio": e["beta"], "selected_by": "tune"}}


def line(**kw) -> str:
    (found,) = [x for x in estimation_markdown(progress(), **kw) if x.startswith("Stop rule")]
    return found


def test_the_bound_is_the_chosen_mixtures_only_for_its_energy():
    # the selected mixture is the config's energy's: the estimate stage's bound is its bound
    assert ("the chosen mixture (beta=1, lam=1, prior_strength=0.3, kernel clip, unary information) is within "
            "**0.004** L1 of the full-scoring one with probability 0.9.") in line(mixture=taskpgm())
    # a Tune trial with another energy and no bound redone for it: labelled as the config's energy's
    text = line(mixture=taskpgm(beta=3.0, prior_strength=1.0))
    assert ("for the config's energy (beta=1, lam=1, prior_strength=0.3, kernel clip, unary information), the "
            "estimate stage's mixture is within **0.004** L1") in text
    assert text.endswith("It is not a bound on the chosen mixture (taskpgm).")
    # with the bound redone for the trial's energy (select/certainty.json): that one, said of the chosen mixture
    other = {**CONFIG, "beta": 3.0, "prior_strength": 1.0}
    selected = {"tol": 0.01, "level": 0.9, "draws": 64, "declared_l1": 0.02, "energy": other}
    text = line(mixture=taskpgm(beta=3.0, prior_strength=1.0), selected=selected)
    assert ("the chosen mixture (beta=3, lam=1, prior_strength=1, kernel clip, unary information) is within "
            "**0.02** L1 of its full-scoring mixture with probability 0.9") in text
    assert "for the config's energy (beta=1, lam=1, prior_strength=0.3, kernel clip, unary information): 0.004" in text
    # a bound left from an earlier selection is not shown beside another mixture
    assert "not a bound on the chosen mixture (taskpgm)" in line(mixture=taskpgm(beta=5.0), selected=selected)


def test_a_selected_baseline_gets_the_config_energys_bound_labelled_as_such():
    uniform = {"format": "taskpgm-mixture/1", "weights": {"a": 0.5, "b": 0.5}, "method": "uniform",
               "affinity": None, "hyperparameters": {}}
    text = line(mixture=uniform)
    assert "for the config's energy (beta=1, lam=1, prior_strength=0.3" in text
    assert text.endswith("It is not a bound on the chosen mixture (uniform).")
    assert "Stop rule: certainty (tol 0.01, probability 0.9); for the config's energy" in line()  # no mixture given


def test_a_selected_mixtures_energy_is_read_from_its_file():
    base = EnergyConfig()
    trial = mixture_energy(taskpgm(beta=3.0, prior_strength=1.0, kernel="exp", tau=0.5), base)
    assert trial == dataclasses.replace(base, beta=3.0, prior_strength=1.0, kernel="exp", tau=0.5)
    assert mixture_energy(taskpgm(), base) == base
    assert mixture_energy({"method": "size", "weights": {"a": 1.0}}, base) is None
    # a hand-written taskpgm file without hyperparameters: the config's energy for what it leaves out
    assert mixture_energy({"method": "taskpgm", "weights": {"a": 1.0}}, base) == base
