"""Bad-input audit: what a new user might feed the CLI, each case a subprocess in a temporary folder of its own.

    python benchmarks/input_audit.py            # a few minutes; writes benchmarks/results/input_audit.txt
    python benchmarks/input_audit.py -k spec    # only cases whose family or name contains "spec" (no file written)

No Ray: an import hook makes ``import ray`` fail ("import of ray halted"), so a command that accepts its input and
goes on to start Ray stops there. A case is a command line, the files it starts from and the word its error line
must contain (the file, field, task or flag at fault).

Verdicts: traceback (on stdout or stderr) | damaged (a file there before changed or deleted, an artefact written by
a refused command, a temporary left in the case's folder or TMPDIR) | accepted (bad input, but exit 0 or it reached
Ray) | unclear (the error line lacks the culprit, or the exit code is not the expected one: 2 for bad input and flag
errors, 128 + the signal for an interrupt). Error line: the first stderr line starting 'taskpgm:' or 'Error:'.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

RESULT = Path(__file__).resolve().parent / "results" / "input_audit.txt"
SHIM = ("import importlib.abc as a, importlib.machinery as m, sys\n"
        "class NoRay(a.MetaPathFinder, a.Loader):\n"
        "    find_spec = lambda self, name, *_: m.ModuleSpec(name, self) if name.split('.')[0] == 'ray' else None\n"
        "    create_module = lambda self, spec: None\n"
        "    def exec_module(self, module): raise ImportError('audit: import of ray halted')\n"
        "sys.meta_path.insert(0, NoRay())\nfrom taskpgm_ray.cli import main\nsys.exit(main())")
TEMP = (".tmp", ".incomplete-", ".replaced-")  # in the name of a temporary file or folder


@dataclass
class Case:
    family: str
    name: str
    argv: list[str]
    culprit: str  # the error line must contain this (case-insensitive)
    files: dict[str, Any] = field(default_factory=dict)  # path -> text, bytes or a writer(path); "" -> setup(root)
    bad: bool = True  # False: valid input that must succeed (or, interrupted, must lose nothing)
    absent: tuple[str, ...] = ()  # must not exist afterwards (an artefact of a refused command)
    check: Callable[[Path], str | None] | None = None  # after exit 0: a damage description, or None
    may_change: tuple[str, ...] = ()  # files the command may rewrite (what `check` looks at)
    interrupt: tuple[int, str] | None = None  # (signal, glob): sent once the glob matches a non-empty folder
    expect: int = 2


CASES: list[Case] = []
add = lambda *a, **k: CASES.append(Case(*a, **k))  # noqa: E731

# ------------------------------------------------------------------------------------------------ configs
DATA = "".join(json.dumps({"prompt": f"p{i}", "response": f"r{i}"}) + "\n" for i in range(20))
BASE = "output_dir: run\ntasks:\n  - {name: a, source: jsonl, path: a.jsonl}\n"
TASK = "output_dir: run\ntasks:\n  - {name: a, source: jsonl, path: %s}\n"


def cfg(name: str, culprit: str, text: Any = None, sets: tuple = (), cmd: str = "show", files: dict | None = None):
    argv = ["config", "show", "c.yaml"] if cmd == "show" else ["tasks", "list", "c.yaml"]
    add("config", name, argv + [a for s in sets for a in ("--set", s)], culprit,
        {"a.jsonl": DATA, "c.yaml": BASE if text is None else text, **(files or {})}, absent=("run/tasks.json",))


for name, culprit, text in (
    ("empty file", "tasks", ""),
    ("non-UTF-8", "c.yaml", b"tasks:\n  - {name: caf\xe9, source: jsonl, path: a.jsonl}\n"),
    ("list at top level", "expected a mapping", "- a\n- b\n"), ("scalar at top level", "expected a mapping", "hi\n"),
    ("invalid YAML", "line", "tasks: [\n"), ("unknown top-level key", "trian", BASE + "trian: {steps: 5}\n"),
    ("unknown section key", "train.stepz", BASE + "train: {stepz: 5}\n"),
    ("duplicate YAML key", "train", BASE + "train: {steps: 5}\ntrain: {steps: 6}\n"),
    ("string for an int", "train.steps", BASE + "train: {steps: ten}\n"),
    ("list for a section", "train", BASE + "train: [1, 2]\n"),
    ("mapping for the task list", "tasks", "tasks: {name: a, source: jsonl, path: a.jsonl}\n"),
    ("string for a task", "tasks[0]", "tasks: [a.jsonl]\n"),
    ("unknown source", "tasks[0].source", "tasks:\n  - {name: a, source: s3, path: a.jsonl}\n"),
    ("duplicate task names", "duplicate task name", BASE + "  - {name: a, source: jsonl, path: a.jsonl}\n"),
    ("evaluation shares a task's name", "duplicate task name",
     BASE + "evaluation:\n  - {name: a, source: jsonl, path: a.jsonl}\n"),
    *((f"task name {label}", "tasks[0].name", f"tasks:\n  - {{name: {n}, source: jsonl, path: a.jsonl}}\n")
      for label, n in (("..", "'..'"), ("a/b", "a/b"), ("newline", '"a\\nb"'), ("NUL", '"a\\0b"'), ("empty", "''"),
                       ("number", "123"))),
    ("missing data file", "tasks[0].path", TASK % "nope.jsonl"),
    ("hub task while offline", "hub", "tasks:\n  - {name: a, source: hub, path: org/data}\n"),
    ("utility NaN", "tasks[0].utility", "tasks:\n  - {name: a, source: jsonl, path: a.jsonl, utility: .nan}\n"),
    ("template unbalanced brace", "prompt_template", TASK % "a.jsonl, prompt_template: '{prompt'"),
    ("template positional field", "response_template", TASK % "a.jsonl, response_template: 'A: {0}'"),
    ("synthetic spec not found", "synthetic.spec", BASE + "synthetic: {spec: nope.yaml}\n"),
    ("synthetic seed a string", "synthetic.seed", BASE + "synthetic: {seed: x}\n"),
    ("tracking.wandb bad value", "tracking.wandb", BASE + "tracking: {wandb: on}\n"),
):
    cfg(name, culprit, text)
for name, culprit, text, files in (  # `tasks list`: the data files are read
    ("template names a missing column", "question", TASK % "a.jsonl, prompt_template: 'Q: {question}'", {}),
    ("data file lacks the prompt column", "prompt", TASK % "q.jsonl", {"q.jsonl": '{"q": 1, "response": 2}\n' * 5}),
    ("data file not JSON lines", "bad.jsonl", TASK % "bad.jsonl", {"bad.jsonl": "this is not json\n"}),
    ("data path is a folder", "/d", TASK % "d", {"d/a.jsonl": DATA}),
    ("too few rows for the splits", "'a'", TASK % "one.jsonl", {"one.jsonl": '{"prompt": "p", "response": "r"}\n'}),
    ("synthetic include unknown", "nope", "output_dir: run\nsynthetic: {include: [nope]}\n", {}),
):
    cfg(name, culprit, text, cmd="list", files=files)
# every numeric field of every section: out of range, zero where it must be positive, NaN and inf
NUMERIC = """splits.probe_fraction=0 splits.probe_fraction=.nan splits.eval_fraction=1.5 splits.max_probe=0
splits.min_probe=100 splits.max_eval=0 model.max_length=0 model.tiny.hidden_size=0 model.tiny.num_layers=0
model.tiny.num_heads=0 model.tiny.intermediate_size=-1 proxy_model.tiny.num_heads=3 probes.steps=0
probes.batch_size=0 probes.lr=0 probes.lora_rank=0 probes.lora_alpha=-16 probes.num_gpus=-1 probes.num_cpus=-1
probes.max_retries=-1 estimation.num_actors=0 estimation.num_gpus_per_actor=-1 estimation.num_cpus_per_actor=-1
estimation.shard_size=0 estimation.batch_size=0 estimation.jsd_top_k=0 estimation.stop_when_stable.tol=-1
estimation.stop_when_stable.patience=0 estimation.stop_when_stable.min_fraction=2 estimation.active_tol=0
estimation.info_prompts=1 estimation.max_actor_restarts=-1 estimation.bootstrap=-1 energy.tau=0 energy.eps=-1
energy.beta=-1 energy.lam=.inf energy.prior_temperature=0 energy.prior_strength=-1 energy.floor=2 energy.budget=0
energy.min_weight=-0.1 energy.max_weight=0 train.num_workers=0 train.cpus_per_worker=-1 train.zero_stage=4
train.steps=0 train.micro_batch_size=0 train.grad_accum=0 train.lr=0 train.lr=.nan train.warmup_steps=-1
train.weight_decay=-0.1 train.repetition_cap=0 train.eval_every=-1 train.checkpoint_every=-1 train.max_failures=-2
tune.num_samples=-1 tune.ratio_range=[1] tune.ratio_range=[0,1] tune.taus=[-1] tune.prior_strengths=[-1]
tune.budgets=[0] tune.trial_steps=0 tune.trial_workers=0 tune.trial_evals=0 tune.trial_cpus_per_worker=-1
tune.asha_grace=0 tune.temperatures=[0] tune.temperature_range=[8,1] tune.max_concurrent=0 synthetic.scale=0
tasks.0.max_examples=0""".split()
for item in NUMERIC:
    cfg(f"--set {item}", item.split("=")[0].replace(".0.", "[0]."), sets=(item,))
for item, culprit in (("train.steps", "--set"), ("=5", "--set"), ("train.nosuch=1", "train.nosuch"),
                      ("tasks.5.name=x", "tasks.5.name"), ("train.steps.x=1", "train.steps"),
                      ("train.steps=[", "--set"), ("tasks.x.name=a", "tasks.x.name"),
                      ("train..steps=1", "train..steps")):
    cfg(f"--set {item}", culprit, sets=(item,))

# ------------------------------------------------------------------------------------------------ suite specs
ROWS = [{"name": "rev", "skill": "reverse", "template": "reverse: {x} =", "size": 40},
        {"name": "cp", "skill": "copy", "template": "copy: {x} =", "size": 40}]
SPEC = {"format": "taskpgm-suite-spec/1", "eval_size": 8, "tasks": ROWS}
for name, culprit, patch in (  # "t.KEY" patches the first task, "args" the command line, any other key the spec
    ("unknown skill", "tasks[0].skill", {"t.skill": "revrse"}), ("size 0", "tasks[0].size", {"t.size": 0}),
    ("size negative", "tasks[0].size", {"t.size": -5}), ("size a string", "tasks[0].size", {"t.size": "big"}),
    ("size beyond the skill's inputs", "distinct inputs", {"t.size": 10**9}),
    ("alphabet of 3 letters", "alphabet", {"alphabet": "abc"}), ("alphabet uppercase", "alphabet", {"alphabet": "AB"}),
    ("alphabet with repeats", "alphabet", {"alphabet": "aabbcc"}), ("alphabet a number", "alphabet", {"alphabet": 1}),
    ("eval_only noise", "eval_only", {"t.eval_only": True, "t.role": "noise"}),
    ("eval_only not a bool", "eval_only", {"t.eval_only": "yes"}),
    ("eval_only beyond the skill's inputs", "eval_size", {"eval_size": 10**7, "t.eval_only": True}),
    ("template without {x}", "template", {"t.template": "reverse ="}),
    ("template with {y}", "template", {"t.template": "reverse {y} ="}),
    ("template with two {x}", "template", {"t.template": "{x} {x}"}),
    ("names differ only in case", "duplicate", {"t.name": "CP"}),
    ("task name ../evil", "tasks[0].name", {"t.name": "../evil"}),
    ("task name with a space", "tasks[0].name", {"t.name": "a b"}), ("format missing", "format", {"format": None}),
    ("unknown top key", "skils", {"skils": []}), ("unknown task key", "tasks[0].sise", {"t.sise": 3}),
    ("role unknown", "tasks[0].role", {"t.role": "boss"}), ("score not a bool", "tasks[0].score", {"t.score": "yes"}),
    ("seed a string", "seed", {"seed": "x"}), ("eval_size 0", "eval_size", {"eval_size": 0}),
    ("no tasks", "tasks", {"tasks": []}), ("--scale 0", "--scale", {"args": ("--scale", "0")}),
    ("--scale nan", "--scale", {"args": ("--scale", "nan")}),
    ("--scale too large for the skill", "distinct inputs", {"args": ("--scale", "1e6")}),
    ("--seed not a number", "--seed", {"args": ("--seed", "x")}),
    ("--spec and --random-world", "--random-world", {"args": ("--random-world", "3")}),
):
    row = {**ROWS[0], **{k[2:]: v for k, v in patch.items() if k.startswith("t.")}}
    doc = {**SPEC, "tasks": [row, ROWS[1]], **{k: v for k, v in patch.items() if k[:2] != "t." and k != "args"}}
    add("spec", name, ["tasks", "synth", "--spec", "s.yaml", "--out", "out", *patch.get("args", ())], culprit,
        {"s.yaml": json.dumps({k: v for k, v in doc.items() if v is not None})}, absent=("out",))
SYNTH = "tasks synth --spec s.yaml --out out"
for name, argv, culprit, files in (
    ("empty file", SYNTH, "s.yaml", {"s.yaml": ""}), ("a list", SYNTH, "s.yaml", {"s.yaml": "- a\n"}),
    ("invalid YAML", SYNTH, "s.yaml", {"s.yaml": "tasks: [\n"}),
    ("non-UTF-8", SYNTH, "s.yaml", {"s.yaml": b"format: taskpgm-suite-spec/1\nalphabet: caf\xe9\n"}),
    ("duplicate key", SYNTH, "s.yaml", {"s.yaml": json.dumps(SPEC)[:-1] + ', "eval_size": 4}'}),
    ("--spec is a folder", "tasks synth --spec d --out out", "d", {"d/x": "x"}),
    ("--out is a file", "tasks synth --out f", "f", {"f": "mine"}),
    ("--out holds user files", "tasks synth --out d", "d", {"d/notes.txt": "mine"}),
    ("tasks world not a number", "tasks world x", "SEED", {}), ("tasks world 1.5", "tasks world 1.5", "SEED", {}),
):
    add("spec", name, argv.split(), culprit, files, absent=("out",))

def small_suite(root: Path, extra: str | None = None) -> None:
    """A suite `tasks synth` wrote at root/suite (``extra``: a user's file in it)."""
    from taskpgm_ray.tasks.synthetic import spec_from_dict, write_suite

    write_suite(root / "suite", 1, spec=spec_from_dict(SPEC, source="small"))
    if extra:
        (root / "suite" / extra).write_text("mine")


add("spec", "--out is a suite plus a user file", ["tasks", "synth", "--out", "suite"], "notes.txt",
    {"": lambda root: small_suite(root, "notes.txt")})

# ------------------------------------------------------------------------------------------------ interrupts
for sig, word in ((signal.SIGINT, "aborted"), (signal.SIGTERM, "terminated")):
    for out, files in (("new", {}), ("suite", {"": small_suite})):
        add("interrupt", f"{sig.name} during synth, --out {'a suite' if files else 'new'}",
            ["tasks", "synth", "--out", out, "--scale", "4"], word, files, bad=False, absent=() if files else (out,),
            interrupt=(sig, f".{out}.incomplete-*/*"), expect=128 + sig)

# ------------------------------------------------------------------------------------------------ likelihoods
SOLVE = ["--unary", "representativeness", "--prior", "none"]
GOOD = {"tasks": np.array(["a", "b"]), "loglik_sum": -np.array([[10.0, 20.0], [20.0, 10.0]]),
        "count": np.array([10, 10]), "sizes": np.array([100, 200])}


npz = lambda **a: lambda p: np.savez(p, **{k: np.asarray(v) for k, v in {**GOOD, **a}.items() if v is not None})  # noqa
jsd = lambda s=((0, 1), (1, 0)), tasks=("a", "b"): lambda p: np.savez(  # noqa: E731
    p, tasks=np.array(tasks), jsd_sum=np.asarray(s), token_count=np.int64(100))
NPY = lambda p: os.replace(np.save(p + ".npy", -np.ones((2, 2))) or p + ".npy", p)  # noqa: E731
OBJECT = lambda p: np.savez(p, tasks=np.array(["a", None], dtype=object), loglik_sum=-np.ones((2, 2)),  # noqa: E731
                            count=[1, 1])
for name, culprit, lik, args in (
    ("missing loglik_sum", "loglik_sum", npz(loglik_sum=None), ()), ("missing tasks", "tasks", npz(tasks=None), ()),
    ("missing count", "count", npz(count=None), ()),
    ("loglik_sum 2x3", "loglik_sum", npz(loglik_sum=-np.ones((2, 3))), ()),
    ("loglik_sum NaN", "loglik_sum[0, 1]", npz(loglik_sum=[[-1.0, np.nan], [-1.0, -1.0]]), ()),
    ("loglik_sum -inf", "loglik_sum[1, 0]", npz(loglik_sum=[[-1.0, -1.0], [-np.inf, -1.0]]), ()),
    ("loglik_sum positive", "loglik_sum[0, 1]", npz(loglik_sum=[[-1.0, 3.0], [-1.0, -1.0]]), ()),
    ("loglik_sum strings", "loglik_sum", npz(loglik_sum=[["-1", "-2"], ["-3", "-4"]]), ()),
    ("0-d arrays", "tasks", npz(tasks=np.array("a"), loglik_sum=np.array(-1.0), count=np.array(1)), ()),
    ("count 0", "count", npz(count=[0, 10]), ()), ("sizes negative", "sizes", npz(sizes=[-1, 10]), ()),
    ("duplicate task names", "duplicate", npz(tasks=["a", "a"]), ()),
    ("task name ../x", "../x", npz(tasks=["a", "../x"]), ()),
    ("object array", "python objects", OBJECT, ()), ("a text file", "L.npz", "not an npz\n", ()),
    ("an empty file", "L.npz", "", ()), ("a .npy array", "L.npz", NPY, ()),
    ("--budget 0", "budget", npz(), ("--budget", "0")),
    ("--budget beyond the tasks", "--budget", npz(), ("--budget", "5")),
    ("--min-weight infeasible", "min_weight", npz(), ("--min-weight", "0.9")),
    ("--max-weight infeasible", "max_weight", npz(), ("--max-weight", "0.1")),
    ("--tau 0", "tau", npz(), ("--kernel", "exp", "--tau", "0")), ("--floor 2", "floor", npz(), ("--floor", "2")),
    ("--beta -1", "--beta", npz(), ("--beta", "-1")), ("--lam nan", "lam", npz(), ("--lam", "nan")),
    ("--prior size without sizes", "sizes", npz(sizes=None), ("--prior", "size")),
    ("--unary information without signal", "information", npz(), ("--unary", "information")),
):
    add("likelihoods", name, ["solve", "--likelihoods", "L.npz", "--out", "m.json", *SOLVE, *args], culprit,
        {"L.npz": lik}, absent=("m.json",))
for label, writer in (("missing", None), ("2x3", jsd(np.ones((2, 3)))), ("NaN", jsd([[0, np.nan], [0.1, 0]])),
                      ("negative", jsd([[0, -1], [0.1, 0]])), ("other tasks", jsd(tasks=("a", "c")))):
    add("likelihoods", f"jsd.npz {label}", ["solve", "--likelihoods", "L.npz", "--out", "m.json", *SOLVE, "--affinity",
        "jsd"], "jsd.npz", {"L.npz": npz(), **({"jsd.npz": writer} if writer else {})}, absent=("m.json",))
for name, out in (("--out is the input", "L.npz"), ("--out is the jsd input", "jsd.npz")):
    add("likelihoods", name, ["solve", "--likelihoods", "L.npz", "--out", out, *SOLVE, "--affinity", "jsd"], "--out",
        {"L.npz": npz(), "jsd.npz": jsd()})

# ------------------------------------------------------------------------------------------------ mixtures
M = {"format": "taskpgm-mixture/1", "weights": {"a": 0.5, "b": 0.5}}
JSON_OUT, LF = ("--to", "json", "--out", "out.json"), ("--to", "llamafactory", "--num-samples", "100", "--out", "lf")
USER_INFO = {"mine": {"file_name": "mine.json"}}


def merged(root: Path) -> str | None:  # the user's entry kept, ours added
    info = json.loads((root / "lf" / "dataset_info.json").read_text())
    return None if info.get("mine") == USER_INFO["mine"] and {"a", "b"} <= set(info) else f"merged: {sorted(info)}"


def mix(name: str, culprit: str, doc: Any, args: tuple = JSON_OUT, files: dict | None = None, **kw) -> None:
    text = doc if isinstance(doc, (str, bytes)) else json.dumps(doc)
    add("mixture", name, ["export", "m.json", *args], culprit, {"m.json": text, **(files or {})},
        **{"absent": ("out.json",) if args == JSON_OUT else (), **kw})


W = '{"format": "taskpgm-mixture/1", "weights": {"a": %s, "b": %s}}'
for name, culprit, doc in (
    ("weights sum to 0.9", "sum", W % (0.5, 0.4)), ("negative weight", "'b'", W % (1.5, -0.5)),
    ("NaN weight", "'b'", W % (1, "NaN")), ("Infinity weight", "'a'", W % ("Infinity", 0)),
    ("string weight", "'a'", W % ('"0.5"', 0.5)), ("bool weight", "'a'", W % ("true", 0)),
    ("weights a list", "weights", {**M, "weights": [0.5, 0.5]}), ("weights empty", "weights", {**M, "weights": {}}),
    ("weights missing", "weights", {"format": "taskpgm-mixture/1"}), ("format missing", "format", {"weights": {}}),
    ("format wrong", "format", {**M, "format": "other/1"}), ("top-level list", "m.json", [M]),
    ("invalid JSON", "m.json", "{oops"), ("empty file", "m.json", ""),
    ("non-UTF-8", "m.json", b'{"format": "taskpgm-mixture/1", "weights": {"caf\xe9": 1}}'),
    ("unsafe task name", "../x", {**M, "weights": {"../x": 0.5, "b": 0.5}}),
    ("sizes negative", "sizes", {**M, "sizes": {"a": -1, "b": 3}}),
    ("weight_unit unknown", "weight_unit", {**M, "weight_unit": "bytes"}),
    ("method unknown", "method", {**M, "method": "best"}),
):
    mix(name, culprit, doc)
mix("--out is the input", "--out", M, ("--to", "json", "--out", "m.json"))
mix("--num-samples 0", "num-samples", M, ("--to", "llamafactory", "--num-samples", "0", "--out", "lf"), absent=("lf",))
MEGATRON = ("--to", "megatron", "--mean-tokens", "t.yaml", "--out", "out.json")
mix("--mean-tokens 0", "'a'", M, MEGATRON, {"t.yaml": "a: 0\nb: 3\n"}, absent=("out.json",))
mix("--mean-tokens NaN", "'a'", M, MEGATRON, {"t.yaml": "a: .nan\nb: 3\n"}, absent=("out.json",))
mix("--names not a mapping", "n.yaml", M, ("--to", "hf", "--names", "n.yaml", "--out", "out.json"),
    {"n.yaml": "- a\n- b\n"}, absent=("out.json",))
mix("llamafactory --out is a file", "lf", M, LF, {"lf": "mine"})
mix("llamafactory: user's dataset_info.json not JSON", "dataset_info.json", M, LF, {"lf/dataset_info.json": "{mine"})
mix("llamafactory merges the user's dataset_info.json", "", M, LF, {"lf/dataset_info.json": json.dumps(USER_INFO),
    "lf/notes.txt": "mine"}, bad=False, expect=0, check=merged, may_change=("lf/dataset_info.json",))
mix("json into a folder of user files", "", M, ("--to", "json", "--out", "d"), {"d/x": "mine"}, bad=False, expect=0)
TRAIN = ["train", "--test-mode", "--output-dir", "run", "--mixture", "m.json"]
for name, weights, culprit in (("sum 2", {"a": 1, "b": 1}, "sum"), ("unknown task", {"zzz": 1.0}, "zzz"),
                               ("missing task", {"copy": 1.0}, "reverse_a")):
    add("mixture", f"train --mixture {name}", TRAIN, culprit, {"m.json": json.dumps({**M, "weights": weights})})
add("mixture", "train --mixture missing file", TRAIN, "m.json")

# ------------------------------------------------------------------------------------------------ flags
for name, argv, culprit in (  # argv split on spaces
    ("unknown command", "nosuch", "nosuch"), ("unknown option", "solve --bogus", "--bogus"),
    ("run without CONFIG", "run", "CONFIG"), ("CONFIG and --test-mode", "run c.yaml --test-mode", "--test-mode"),
    ("config not found", "tasks list nope.yaml", "nope.yaml"), ("config is a folder", "config show d", "d"),
    ("train without --mixture", "train --test-mode", "--mixture"),
    ("solve without --out", "solve --likelihoods L.npz", "--out"),
    ("solve --budget x", "solve --likelihoods L.npz --out m.json --budget x", "--budget"),
    ("solve --likelihoods missing", "solve --likelihoods nope.npz --out m.json", "nope.npz"),
    ("solve --out a folder", "solve --likelihoods L.npz --out d", "d"), ("export without --to", "export m.json", "to"),
    ("export --to nope", "export m.json --to nope", "--to"), ("export a folder", "export d --to json", "d"),
    ("synth without --out", "tasks synth", "--out"), ("report a missing folder", "report nope", "nope"),
    ("-v and -q together", "-v -q run --test-mode --output-dir run", "-q"),
    ("--output-dir is a file", "config show --test-mode --output-dir c.yaml", "c.yaml"),
    ("--set before the command", "--set train.steps=x config show --test-mode", "train.steps"),
):
    add("flags", name, argv.split(), culprit, {"c.yaml": BASE, "a.jsonl": DATA, "d/x": "x", "L.npz": npz(),
                                               "m.json": json.dumps(M)}, absent=("run",))


# ------------------------------------------------------------------------------------------------ running
def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run(case: Case, work: Path, env: dict[str, str]) -> dict:
    root, tmp = work / "case", work / "tmp"
    for d in (root, tmp):
        d.mkdir(parents=True)
    for rel, value in case.files.items():  # "": a setup function of the folder
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        if callable(value):
            value(root if rel == "" else str(root / rel))
        else:
            (root / rel).write_bytes(value if isinstance(value, bytes) else value.encode())
    before = snapshot(root)
    proc = subprocess.Popen(["nice", "-n", "19", sys.executable, "-c", SHIM, *case.argv], cwd=root, text=True,
                            env={**env, "TMPDIR": str(tmp)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if case.interrupt:  # once the suite's hidden folder holds a task, i.e. in the middle of the writing
        deadline = time.time() + 120
        while proc.poll() is None and not list(root.glob(case.interrupt[1])) and time.time() < deadline:
            time.sleep(0.01)
        proc.send_signal(case.interrupt[0])
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        err += "\naudit: timed out after 300 s"
    rc, after = proc.returncode, snapshot(root)
    damage = [f"deleted {p}" for p in before if p not in after]
    damage += [f"changed {p}" for p in before if p in after and after[p] != before[p] and p not in case.may_change]
    damage += [f"left {p.relative_to(work)}" for p in sorted([*root.rglob("*"), *tmp.rglob("*")])
               if any(t in p.name for t in TEMP) or p.parent == tmp]
    damage += [f"wrote {p}" for p in case.absent if (root / p).exists()]
    if case.check and rc == 0 and (problem := case.check(root)):
        damage.append(problem)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    error = next((ln for ln in lines if ln.startswith(("taskpgm:", "Error:"))), lines[0] if lines else "")
    accepted = case.bad and (rc == 0 or "import of ray halted" in err)
    named = case.culprit.lower() in (error if rc else "").lower()
    return {"rc": rc, "error": error, "damage": damage, "traceback": "Traceback (most recent call" in out + err,
            "damaged": bool(damage), "accepted": accepted, "unclear": not accepted and (rc != case.expect or not named)}


def main() -> None:
    k = sys.argv[sys.argv.index("-k") + 1] if "-k" in sys.argv else None  # only these cases, and no file written
    cases = [c for c in CASES if k is None or k in f"{c.family} {c.name}"]
    rows, t0 = [], time.time()
    with tempfile.TemporaryDirectory(prefix="taskpgm-audit-") as top:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
               "HF_HOME": f"{top}/hf", "HF_DATASETS_CACHE": f"{top}/hf/datasets", "PYTHONWARNINGS": "ignore"}
        env.pop("TASKPGM_DEBUG", None)
        for i, case in enumerate(cases):
            r = run(case, Path(top) / f"{i:03d}", env)
            rows.append((case, r, [v for v in ("traceback", "damaged", "accepted", "unclear") if r[v]]))
            print(f"{case.family:<11} {case.name[:48]:<48} {r['rc']:>4} {','.join(rows[-1][2]) or 'ok':<16} "
                  f"{r['error'][:100]}" + (f"  [{'; '.join(r['damage'])}]" if r["damage"] else ""), flush=True)
    text = report(rows, time.time() - t0)
    if k is None:
        RESULT.write_text(text)
        print(f"wrote {RESULT}")


def report(rows: list, seconds: float) -> str:
    head = f"taskpgm bad-input audit: {len(rows)} cases, {seconds:.0f} s (python benchmarks/input_audit.py)\n" \
        + __doc__.split("\n\n")[3] + "\n"
    table = [f"{'case':<48} {'family':<11} {'exit':>4} {'tb':<3} {'dmg':<3} {'verdict':<10} error line"]
    for case, r, bad in rows:
        table.append(f"{case.name[:48]:<48} {case.family:<11} {r['rc']:>4} {'yes' if r['traceback'] else 'no':<3} "
                     f"{'yes' if r['damaged'] else 'no':<3} {','.join(bad) or 'ok':<10} {r['error'][:160]}"
                     + (f"  [{'; '.join(r['damage'])[:300]}]" if r["damage"] else ""))
    summary = ["", "family       cases   ok traceback damaged accepted unclear"]
    for fam in [*dict.fromkeys(c.family for c, _, _ in rows), "all"]:
        sel = [b for c, _, b in rows if fam in ("all", c.family)]
        n = Counter(v for b in sel for v in b)
        summary.append(f"{fam:<12} {len(sel):>5} {sum(1 for b in sel if not b):>4} {n['traceback']:>9} "
                       f"{n['damaged']:>7} {n['accepted']:>8} {n['unclear']:>7}")
    print("\n".join(summary))
    return head + "\n".join(table + summary) + "\n"


if __name__ == "__main__":
    main()
