"""Every code block of the README and the site runs, each once (a block several pages share, such
as the quickstart, is one block). How each kind runs, and what stands in for what a test cannot
do:

* ``python``: in a fresh namespace, after a prelude that supplies the names a snippet leaves to
  the reader (``model``, ``loader``, ``optimizer``) and turns every Trainer into one that runs 3
  steps on one CPU process: a block written for 4 GPUs or 2 nodes runs on the CPU this suite has,
  with the same strategy, callbacks and plugins. All these blocks run one after the other in one
  subprocess (a fresh interpreter per block would cost seconds each), each in its own working
  folder, the process group torn down in between.
* ``python`` marked ``<!-- test: torchrun -->``: a script for several processes, run as written
  with ``torchrun --standalone --nproc_per_node=2`` on gloo (CPU).
* ``yaml``: a LightningCLI config, added to the digits example's and trained for 3 steps.
* ``bash``: each command, by the rule in ``COMMANDS`` that matches it; a command no rule matches
  fails the test. Commands that train run, shortened; ``make demo`` runs in full in
  ``test_figures.py`` (its output is quoted on a page). What is not run, and why: ``make test``
  (the suite itself: dry-run), ``pip install`` (minutes and a network: the extras it names must
  exist), the benchmarks (hours: the script must exist and accept every option the command
  names; their ``--smoke`` runs are in ``tests/benchmarks``), ``sbatch`` (no SLURM cluster: the
  CLI arguments of the job must parse).
* ``text``: not code. A shown output is marked ``<!-- output: ... -->`` and compared with what
  the code prints (``test_figures.py``); the rest are diagrams and file trees.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import tomllib

from lightning_kfac.testing.distributed import free_port
from tests.conftest import ROOT, script_env
from tests.docs import pages

PRELUDE = """
import warnings
import pytorch_lightning
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

warnings.filterwarnings("ignore")
torch.manual_seed(0)
_data = TensorDataset(torch.randn(256, 64), torch.randint(0, 10, (256,)))
loader = DataLoader(_data, batch_size=64, shuffle=True)


class _Model(pytorch_lightning.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.5)

    def train_dataloader(self):
        return loader


model = _Model()
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
"""

# runs every in-process block; writes {index: {"ok", "error", "stdout"}} as JSON
RUNNER = r'''
import contextlib, io, json, os, sys, traceback, warnings
warnings.filterwarnings("ignore")
import torch.distributed as dist
import pytorch_lightning
try:
    import lightning.pytorch as lightning_pytorch
except ImportError:
    lightning_pytorch = None


def quick(trainer_class):
    """A Trainer that stops after 3 steps on one CPU process, whatever the block asks for."""

    class QuickTrainer(trainer_class):
        def __init__(self, *args, **kwargs):
            kwargs.update(accelerator="cpu", devices=1, num_nodes=1, max_steps=3, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False)
            kwargs.setdefault("logger", False)
            super().__init__(*args, **kwargs)

    return QuickTrainer


ORIGINAL = pytorch_lightning.Trainer
pytorch_lightning.Trainer = quick(ORIGINAL)
if lightning_pytorch is not None:
    lightning_pytorch.Trainer = quick(lightning_pytorch.Trainer)

spec = json.load(open(sys.argv[1]))
results = {}
for index, code in spec["blocks"].items():
    folder = os.path.join(spec["workdir"], f"block{index}")
    os.makedirs(folder)
    os.chdir(folder)
    namespace = {"__name__": "__main__"}
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(spec["prelude"], "<prelude>", "exec"), namespace)
            exec(compile(code, f"<block {index}>", "exec"), namespace)
        trainers = [v for v in namespace.values() if isinstance(v, ORIGINAL)]
        steps = [t.global_step for t in trainers if t.state.finished and t.state.fn == "fit"]
        assert all(s == 3 or s == 0 for s in steps), f"a Trainer stopped at global_step {steps}"
        results[index] = {"ok": True, "error": "", "stdout": out.getvalue()}
    except BaseException:
        results[index] = {"ok": False, "error": traceback.format_exc(), "stdout": out.getvalue()}
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
json.dump(results, open(spec["results"], "w"))
'''


def _in_process_blocks() -> list[pages.Block]:
    return pages.blocks("python", note="")


def _torchrun_blocks() -> list[pages.Block]:
    return pages.blocks("python", note="test: torchrun")


@pytest.fixture(scope="module")
def in_process_results(tmp_path_factory) -> dict[str, dict]:
    """Every in-process python block, run once, one after the other, in one subprocess."""
    folder = tmp_path_factory.mktemp("blocks")
    blocks = _in_process_blocks()
    spec = {
        "prelude": PRELUDE,
        "blocks": {str(i): b.body for i, b in enumerate(blocks)},
        "workdir": str(folder / "work"),
        "results": str(folder / "results.json"),
    }
    (folder / "spec.json").write_text(json.dumps(spec))
    (folder / "runner.py").write_text(RUNNER)
    proc = subprocess.run(
        [sys.executable, str(folder / "runner.py"), str(folder / "spec.json")],
        cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((folder / "results.json").read_text())
    return {blocks[int(i)].id: r for i, r in results.items()}


def test_every_block_has_a_way_to_run():
    """No block is silently left out: every language and note here has a runner above."""
    known = {("python", ""), ("python", "test: torchrun"), ("yaml", ""), ("bash", ""), ("text", "")}
    for block in pages.all_blocks():
        kind = (block.lang, "" if block.note.startswith("output:") else block.note)
        assert kind in known, f"{block.id} ({block.pages}): no runner for a {block.lang!r} block noted {block.note!r}"
    assert len(_in_process_blocks()) >= 10 and _torchrun_blocks() and pages.blocks("yaml")


@pytest.mark.parametrize("block", _in_process_blocks(), ids=lambda b: b.id)
def test_python_block_runs(block, in_process_results):
    result = in_process_results[block.id]
    assert result["ok"], f"{block.id} (on {', '.join(block.pages)}):\n{block.body}\n{result['error'][-4000:]}"


def _torchrun_rank(body: str, rank: int, world_size: int, port: int, folder: str) -> None:
    """One rank of a torchrun script: the environment torchrun gives it, then the script."""
    import traceback

    import torch

    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    os.chdir(folder)
    try:
        exec(compile(body, "<torchrun block>", "exec"), {"__name__": "__main__"})
    except BaseException:
        with open(os.path.join(folder, f"rank{rank}.error"), "w") as f:
            f.write(traceback.format_exc())
        os._exit(1)
    os._exit(0)


@pytest.mark.parametrize("block", _torchrun_blocks(), ids=lambda b: b.id)
def test_torchrun_block_runs_on_two_processes(block, tmp_path, clean_process_group):
    """The script as written, in 2 processes with the environment `torchrun --nproc_per_node=2`
    gives them (forked from this process: a fresh interpreter per rank costs seconds)."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    port = free_port()
    ranks = [context.Process(target=_torchrun_rank, args=(block.body, r, 2, port, str(tmp_path))) for r in range(2)]
    for rank in ranks:
        rank.start()
    for rank in ranks:
        rank.join(timeout=300)
        if rank.is_alive():
            rank.kill()
    errors = "\n".join(p.read_text() for p in sorted(tmp_path.glob("rank*.error")))
    assert [r.exitcode for r in ranks] == [0, 0], f"{block.id}:\n{errors[-4000:]}"


def _cli_in_process(args: list[str], monkeypatch) -> int | str | None:
    """`lightning-kfac <args>` in this process (as tests/lightning/test_cli.py runs it); the exit
    code of a command that exits (--help, --print_config), or None."""
    from lightning_kfac.cli import main

    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(ROOT)
    try:
        main(args)
    except SystemExit as exit:
        return exit.code
    return None


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
@pytest.mark.parametrize("block", pages.blocks("yaml"), ids=lambda b: b.id)
def test_yaml_block_is_a_config_the_cli_trains_with(block, tmp_path, monkeypatch, clean_process_group):
    config = tmp_path / "block.yaml"
    config.write_text(block.body)
    args = [
        "fit", "--config", "examples/configs/digits_mlp.yaml", "--config", str(config), "--trainer.devices=1",
        *QUICK_CLI, f"--trainer.default_root_dir={tmp_path}",
    ]  # fmt: skip
    assert _cli_in_process(args, monkeypatch) is None, block.body
    assert glob.glob(str(tmp_path / "**" / "*.ckpt"), recursive=True) == [], "checkpointing was meant to be off"


# --- bash commands --------------------------------------------------------------------------------
QUICK_CLI = [
    "--trainer.accelerator=cpu", "--trainer.max_steps=3", "--trainer.limit_val_batches=2",
    "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
]  # fmt: skip


def commands_of(body: str) -> list[str]:
    """The commands of a bash block: comments dropped, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", body)
    commands = []
    for line in joined.splitlines():
        line = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        if line:
            commands.append(line)
    return commands


def _run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=timeout)


@dataclass
class Context:
    """What a command check may use."""

    tmp_path: Any
    monkeypatch: Any
    capsys: Any
    benchmark_help: dict[str, str]


def check_make(words: list[str], context: Context) -> None:
    """`make <target>`: the target exists and its recipe is what the page says (dry run). The
    demo's output is checked in full in test_figures.py, the docs build by test_site.py;
    `make test` would run this suite inside itself."""
    proc = _run(["make", "-n", *words[1:]])
    assert proc.returncode == 0, proc.stderr
    recipe = {"demo": "digits_demo.py", "test": "pytest", "lint": "ruff", "docs": "mkdocs build --strict"}
    for target in words[1:]:
        if target in recipe:
            assert recipe[target] in proc.stdout, f"make {target}: {proc.stdout}"


def check_pip_install(words: list[str], context: Context) -> None:
    """`pip install -e <path>[extras]`: the path is this project and every extra exists (an
    install takes minutes and a network)."""
    spec = words[-1]
    match = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", spec)
    assert match, f"pip install of {spec!r}: only this project is documented"
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    for extra in (match.group(1) or "").split(","):
        assert not extra or extra in extras, f"no extra {extra!r} in pyproject.toml"


def check_cli(words: list[str], context: Context) -> None:
    """`lightning-kfac fit --config X`: the config parses and validates (--print_config; training
    with it on 2 processes is tests/lightning/test_cli.py's). A `--...help` command runs as
    written and lists K-FAC's options."""
    if any(w.endswith(".help") or w == "--help" for w in words):
        assert _cli_in_process(words[1:], context.monkeypatch) == 0
        shown = context.capsys.readouterr().out
        assert "inverse_method" in shown and "grad_worker_fraction" in shown, shown[-3000:]
        return
    assert _cli_in_process([*words[1:], "--print_config"], context.monkeypatch) in (0, None)


def check_torchrun_recipe(words: list[str], context: Context) -> None:
    """`NNODES=2 NODE_RANK=r ... examples/torchrun.sh [args]`: the script is valid shell, reads
    every variable the command sets, hands the node layout to Lightning, and the CLI command it
    builds parses. Training across nodes under torchrun is tests/lightning/test_multinode.py's
    (2 nodes on 127.0.0.1; this machine has no second one)."""
    script = next(w for w in words if w.endswith(".sh"))
    path = os.path.join(ROOT, script)
    assert _run(["bash", "-n", path]).returncode == 0
    with open(path) as f:
        text = f.read()
    variables = [w.split("=", 1)[0] for w in words[: words.index(script)]]
    for variable in variables:
        assert re.search(rf"\$\{{{variable}:-", text), f"{script} does not read {variable}"
    assert "--trainer.num_nodes=" in text and "--trainer.devices=" in text
    config = re.search(r"CONFIG=\$\{CONFIG:-(\S+)\}", text).group(1)  # type: ignore[union-attr]
    layout = dict(w.split("=", 1) for w in words[: words.index(script)])
    nodes, processes = layout.get("NNODES", "1"), layout.get("NPROC_PER_NODE", "1")
    args = ["fit", "--config", config, f"--trainer.num_nodes={nodes}", f"--trainer.devices={processes}",
            *words[words.index(script) + 1 :], "--print_config"]  # fmt: skip
    assert _cli_in_process(args, context.monkeypatch) == 0


def check_sbatch(words: list[str], context: Context) -> None:
    """`sbatch examples/slurm.sbatch <args>`: no SLURM cluster here; the job's `srun` command
    line, with the allocation the #SBATCH lines ask for and the extra arguments, must parse."""
    script = os.path.join(ROOT, words[1])
    with open(script) as f:
        text = f.read()
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, re.M))
    config = re.search(r"CONFIG=\$\{CONFIG:-(\S+)\}", text).group(1)  # type: ignore[union-attr]
    assert "srun lightning-kfac fit" in text
    args = ["fit", "--config", config, "--trainer.accelerator=gpu", f"--trainer.num_nodes={sbatch['nodes']}",
            f"--trainer.devices={sbatch['ntasks-per-node']}", *words[2:], "--print_config"]  # fmt: skip
    assert _cli_in_process(args, context.monkeypatch) == 0


def check_benchmark(words: list[str], context: Context) -> None:
    """`python benchmarks/<script>.py [options]`: hours of compute. The script exists, and its
    --help (run once per script, every script at once) lists every option the command names."""
    assert os.path.isfile(os.path.join(ROOT, words[1])), words[1]
    shown = context.benchmark_help[words[1]]
    for word in words[2:]:
        if word.startswith("--"):
            option = word.split("=")[0]
            assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", shown), f"{words[1]}: no {option}\n{shown}"


@dataclass
class Rule:
    pattern: str
    check: Callable[[list[str], Context], None]


COMMANDS = [
    Rule(r"make( [\w-]+)+", check_make),
    Rule(r"pip install -e \S+", check_pip_install),
    Rule(r"lightning-kfac .*", check_cli),
    Rule(r"(\w+=\S+ )*examples/torchrun\.sh.*", check_torchrun_recipe),
    Rule(r"sbatch examples/slurm\.sbatch.*", check_sbatch),
    Rule(r"python benchmarks/\w+\.py.*", check_benchmark),
]


def _commands() -> list[tuple[str, str]]:
    found = []
    for block in pages.blocks("bash"):
        for command in commands_of(block.body):
            if (block.id, command) not in found:
                found.append((block.id, command))
    return found


def _rule(command: str) -> Rule | None:
    return next((r for r in COMMANDS if re.fullmatch(r.pattern, command)), None)


def _grouped() -> list[tuple[str, list[str]]]:
    """Commands one check runs together: the lines of a multi-node recipe start together."""
    groups: list[tuple[str, list[str]]] = []
    for block_id, command in _commands():
        if _rule(command) is not None and _rule(command).check is check_torchrun_recipe:  # type: ignore[union-attr]
            words = shlex.split(command)
            key = " ".join(w for w in words if not w.startswith("NODE_RANK="))
            if any(g[0] == f"{block_id}: {key}" for g in groups):
                continue
            groups.append((f"{block_id}: {key}", [command]))
        else:
            groups.append((f"{block_id}: {command}", [command]))
    return groups


def test_every_command_has_a_check():
    for block_id, command in _commands():
        assert _rule(command), f"{block_id}: no rule in COMMANDS checks `{command}`"


# prints {script: its --help} for the scripts in sys.argv, each run as `python <script> --help`
# would run it, in one interpreter (torch and Lightning are imported once, not once per script)
HELP_RUNNER = r"""
import contextlib, io, json, os, runpy, sys
shown = {}
for script in sys.argv[1:]:
    sys.argv, sys.path[0] = [script, "--help"], os.path.dirname(os.path.abspath(script))
    out = io.StringIO()
    code = None
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as exit:
            code = exit.code
    shown[script] = {"code": code, "text": out.getvalue()}
print(json.dumps(shown))
"""


@pytest.fixture(scope="module")
def benchmark_help() -> dict[str, str]:
    """`--help` of every benchmark script a page names."""
    scripts = sorted({shlex.split(c)[1] for _, c in _commands() if _rule(c) and _rule(c).check is check_benchmark})  # type: ignore[union-attr]
    proc = _run([sys.executable, "-c", HELP_RUNNER, *scripts])
    assert proc.returncode == 0, proc.stderr[-3000:]
    shown = json.loads(proc.stdout.strip().splitlines()[-1])
    for script, result in shown.items():
        assert result["code"] in (0, None) and "usage" in result["text"], f"{script} --help:\n{result}"
    return {script: result["text"] for script, result in shown.items()}


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
@pytest.mark.parametrize("name,commands", _grouped(), ids=[g[0] for g in _grouped()])
def test_command_works(name, commands, tmp_path, monkeypatch, capsys, clean_process_group, request):
    needs_help = any(_rule(c) and _rule(c).check is check_benchmark for c in commands)  # type: ignore[union-attr]
    context = Context(tmp_path, monkeypatch, capsys, request.getfixturevalue("benchmark_help") if needs_help else {})
    for command in commands:
        rule = _rule(command)
        assert rule, command
        rule.check(shlex.split(command), context)


def test_what_is_logged_is_what_the_table_lists(in_process_results):
    """The monitoring page's example prints the `kfac/` keys a run logged; they are the keys its
    table lists (the hyperparameters go to the loggers' hyperparameters instead, and
    `kfac/time_step_ms` needs exact_timings=True: the text says both)."""
    block = next(b for b in pages.blocks_on("monitoring.md") if "logged_metrics" in b.body)
    printed = in_process_results[block.id]["stdout"].strip().splitlines()[-1]
    logged = set(re.findall(r"'(kfac/[\w/.]+)'", printed))
    table = pages.table_rows(pages.expanded("monitoring.md"), "key | meaning")
    listed = {key for cells in table for key in re.findall(r"`(kfac/\w+)`", cells[0])}
    assert listed and listed <= logged, f"listed but not logged: {listed - logged}"
    per_layer = {key.rsplit("/", 1)[1] for key in logged if key.count("/") == 2}
    assert {"trace_A", "trace_G", "cond"} <= per_layer, per_layer  # diagnostics=True, as the text says
