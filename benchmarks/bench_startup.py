"""Start-up time of the ``cnnbal`` command against ``python -c "import numpy"``.

    .venv/bin/python benchmarks/bench_startup.py [--repeats 30]

Every command is a fresh subprocess; the commands are run interleaved (one of
each per round, ``--repeats`` rounds, after one warm-up round) and each is
reported as its median wall time and the ratio of that median to the median
of ``python -c "import numpy"`` measured in the same rounds. Target: ``cnnbal
--help`` and ``cnnbal info H.npz`` at most 1.5x.

Reference rows show where the floor is: the bare interpreter, ``import
typer``, a one-command typer app that parses one path argument (typer >=
0.29 converts every non-flag parameter through a pydantic ``TypeAdapter``, so
pydantic is imported by any typer command that takes an argument), and the
same app reading every array of the artifact with numpy: what ``cnnbal info``
cannot avoid.

Children write bytecode to a private cache (``PYTHONPYCACHEPREFIX``): this
environment sets ``PYTHONDONTWRITEBYTECODE=1``, which would otherwise
recompile cnnbal (an editable install) on every run, something an installed
package never does.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PYTHON = sys.executable
CNNBAL = str(Path(PYTHON).with_name("cnnbal"))
REPO = Path(__file__).resolve().parents[1]

#: The smallest typer program that parses a path argument: the floor of any
#: typer command that takes one.
TYPER_ONE_ARG = """
import sys
from pathlib import Path
import typer
app = typer.Typer()
@app.command()
def info(path: Path) -> None:
    pass
sys.argv = ["x", "H.npz"]
app()
"""
#: The same app reading the artifact with numpy: the floor of ``cnnbal info H.npz``.
TYPER_INFO_FLOOR = """
import sys
from pathlib import Path
import typer
app = typer.Typer()
@app.command()
def info(path: Path) -> None:
    import numpy as np
    with np.load(path, allow_pickle=False) as archive:
        {key: archive[key] for key in archive.files}
app()
"""


def child_env(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(cache)
    return env


#: ``cnnbal ARGS`` run from whichever checkout is first on PYTHONPATH.
RUN_CLI = "import sys; from cnnbal.cli import main; sys.argv[0] = 'cnnbal'; main()"


def run_once(cmd: list[str], env: dict[str, str], cwd: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=cwd)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.decode()[-500:]}")
    return elapsed


def interleaved(
    commands: dict[str, list[str]], repeats: int, envs: dict[str, dict[str, str]], cwd: Path
) -> dict[str, list[float]]:
    """Wall times of each command, one run of each per round (warm-up round dropped).

    ``cwd`` is a directory without a ``cnnbal`` package: ``python -c`` puts the
    current directory first on ``sys.path``, which would shadow ``--checkout``.
    """
    for name, cmd in commands.items():
        run_once(cmd, envs[name], cwd)
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, cmd in commands.items():
            times[name].append(run_once(cmd, envs[name], cwd))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument(
        "--checkout",
        type=Path,
        help="Also time `cnnbal --help` and `cnnbal info` from this checkout of cnnbal (e.g. "
        "a `git worktree` of an older commit), put first on PYTHONPATH.",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        env = child_env(tmp_path / "pycache")
        artifact = tmp_path / "H.npz"
        subprocess.run(
            [CNNBAL, "fit", str(REPO / "sample_data" / "val.parquet"), "-o", str(artifact)],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        baseline = 'python -c "import numpy"'
        commands = {
            baseline: [PYTHON, "-c", "import numpy"],
            'python -c "pass"': [PYTHON, "-c", "pass"],
            'python -c "import typer"': [PYTHON, "-c", "import typer"],
            "typer app, one path argument": [PYTHON, "-c", TYPER_ONE_ARG],
            "  + np.load(H.npz) (info floor)": [PYTHON, "-c", TYPER_INFO_FLOOR, str(artifact)],
            "cnnbal --help": [CNNBAL, "--help"],
            "cnnbal fit --help": [CNNBAL, "fit", "--help"],
            "cnnbal info H.npz": [CNNBAL, "info", str(artifact)],
            "cnnbal info H.npz --json": [CNNBAL, "info", str(artifact), "--json"],
        }
        envs = {name: env for name in commands}
        if args.checkout is not None:
            other = {**env, "PYTHONPATH": str(args.checkout.resolve())}
            for label, cli_args in (("--help", []), ("info H.npz", ["info", str(artifact)])):
                name = f"[checkout] cnnbal {label}"
                commands[name] = [PYTHON, "-c", RUN_CLI, *(cli_args or ["--help"])]
                envs[name] = other
        times = interleaved(commands, args.repeats, envs, cwd=tmp_path)

    base = statistics.median(times[baseline])
    print(f"start-up, {args.repeats} interleaved rounds, medians (python {sys.version.split()[0]})")
    print(f"{'command':<32} {'median ms':>10} {'q1-q3 ms':>14} {'vs numpy':>9}")
    for name, values in times.items():
        q1, _, q3 = statistics.quantiles(values, n=4)
        med = statistics.median(values)
        quartiles = f"{1000 * q1:.0f}-{1000 * q3:.0f}"
        print(f"{name:<32} {1000 * med:>10.0f} {quartiles:>14} {med / base:>8.2f}x")
    print("target: cnnbal --help and cnnbal info H.npz <= 1.50x")


if __name__ == "__main__":
    main()
