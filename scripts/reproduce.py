"""Every training run a table of the paper needs, as commands; `--launch` runs the ones not done.

    python scripts/reproduce.py cnn                       # commands, which runs are done, time left
    python scripts/reproduce.py cnn --launch --launcher slurm
    python scripts/reproduce.py digits --launch --limit-train 64 --epochs 1    # smoke test of the grid
    python scripts/reproduce.py --docs                    # docs/tables.md's cost table of every table

The tables are conf/table/*.yaml. Each run has a fixed directory, runs/<table>/<dataset>/<model>/
<aug>/<method>/seed<seed>, so running the same command again resumes interrupted runs and skips
finished ones. Time estimates come from finished seeds of the same cell, else from the throughput
measured in results/benchmarks/ (a model without a measurement is "unknown").
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter

from gnp import io, tables
from gnp.paths import CONF_DIR, DOCS_DIR, ROOT
from gnp.rundir import Status

LAUNCHERS = ("basic", "parallel", "slurm")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    parser = tables.ArgumentParser(prog="reproduce.py", description=__doc__.split("\n")[0])
    parser.add_argument("table", nargs="?", choices=tables.table_names(), help="a table of conf/table/")
    parser.add_argument("--docs", action="store_true",
                        help="only rewrite docs/tables.md's cost table (every table's runs and hours) from the "
                             "estimates")
    parser.add_argument("--launch", action="store_true", help="run the runs not done (Hydra multirun, seeds grouped)")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="basic",
                        help="Hydra launcher of --launch: basic (one after another), parallel, slurm")
    tables.add_selection_arguments(parser)
    args = parser.parse_args(argv)
    if args.docs:
        return write_cost_table()
    if args.table is None:
        parser.error("the following arguments are required: table (or --docs)")
    launcher_file = CONF_DIR / "hydra" / "launcher" / f"{args.launcher}.yaml"
    if args.launch and args.launcher != "basic" and not launcher_file.exists():
        tables.fail(f"--launcher {args.launcher}: conf/hydra/launcher/{args.launcher}.yaml does not exist in this "
                    f"checkout; choose one of: basic")
    try:
        table = tables.load_table(args.table)
        plans = tables.make_plans(table, **tables.selection(args))
        throughputs = tables.read_throughput()
    except tables.TableError as e:
        tables.fail(str(e))

    todo, left_undone = report(table, plans, throughputs)
    if not args.launch:
        if todo:
            command = tables.reproduce_command(args.table, **tables.selection(args))
            print(f"\nRun them: {command} --launch [--launcher {'|'.join(LAUNCHERS)}]")
        return 0
    code = launch(todo, args.launcher)
    if left_undone and code == 0:
        print(f"\n{left_undone} runs were not launched: their folders hold other runs or damaged files (see above)",
              file=sys.stderr)
        return 1
    return code


Todo = list[tuple[tables.Plan, list[int]]]  # the cells to launch, each with its seeds left


def report(table: tables.Table, plans: list[tables.Plan], throughputs) -> tuple[Todo, int]:
    """Print every command with the state of its run; return the (plan, seeds) to launch and the
    number of runs left undone because their folder holds another run or a damaged file."""
    states, todo, cost = Counter(), [], tables.Cost()
    runs = sum(len(p.seeds) for p in plans)
    print(f"{table.name}: {table.title}\n{len(plans)} cells (one per method), {runs} runs, in "
          f"{tables.display_path(plans[0].directory.parents[3]) if plans else '-'}/")
    for plan in plans:
        seen = {seed: tables.run_state(plan, seed) for seed in plan.seeds}
        finished = [run for state, run, _ in seen.values() if state == Status.FINISHED]
        left = [seed for seed, (state, _, _) in seen.items() if state in tables.LAUNCH]
        c = plan.cell
        line = f"\n# {c.dataset} / {c.row} / {c.column} / {c.method}"
        if left:
            guess = tables.estimate(plan, throughputs, finished)
            cost.add(guess, sum(_fraction_left(plan, seen[s][1]) for s in left), len(left))
            if guess.seconds is None:
                line += f": time unknown ({guess.how.removeprefix('unknown: ')})"
            else:
                line += f": {tables.duration(guess.seconds)} per run on {guess.device} ({guess.how})"
        print(line)
        for seed, (state, _, detail) in seen.items():
            states[state] += 1
            print(f"  [{state:^12}] {plan.command(seed)}" + (f"   # {detail}" if detail else ""))
        if left:
            todo.append((plan, left))

    print("\n" + ", ".join(f"{n} {state}" for state, n in sorted(states.items())) + f" (of {runs} runs)")
    for line in cost.lines():
        print(line)
    if states["conflict"]:
        print(f"{states['conflict']} runs conflict: their folders hold runs with other settings. Move those "
              f"folders, or give these runs another --root")
    if states["unreadable"]:
        print(f"{states['unreadable']} runs are unreadable: a file of theirs is damaged (named above). Restore or "
              f"remove it, then run this again")
    return todo, states["conflict"] + states["unreadable"]


def launch(todo: Todo, launcher: str) -> int:
    """One Hydra multirun per cell over its seeds left; each job lands in its own run directory. A
    signal at any moment stops the whole launch (see Foreground)."""
    failed = []
    with Foreground() as foreground:
        for i, (plan, seeds) in enumerate(todo, 1):
            if foreground.signum is not None:  # came after the previous launch ended
                print(f"\nstopped by {foreground.name} before launch {i}/{len(todo)}; the same command launches "
                      f"the rest", file=sys.stderr)
                return 128 + foreground.signum
            args = plan.multirun_args(seeds, launcher)
            print(f"\n== launch {i}/{len(todo)}: python {shlex.join(args)}", flush=True)
            code = foreground.run([sys.executable, *args])
            if foreground.signum is not None:  # whatever the launch made of it, nothing more starts
                how = " at once, without a checkpoint at its step" if foreground.at_once else ""
                print(f"\nlaunch {i}/{len(todo)} stopped by {foreground.name}{how}; the same command resumes it "
                      f"and launches the rest", file=sys.stderr)
                return 128 + foreground.signum
            if code != 0:
                failed.append(f"{plan.cell.dataset}/{plan.cell.row}/{plan.cell.column}/{plan.cell.method}")
    if failed:
        print(f"\n{len(failed)} of {len(todo)} launches failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"\n{len(todo)} launches done.")
    return 0


class Foreground:
    """Runs launches one at a time, each in a session of its own, while catching Ctrl-C and SIGTERM
    here. The first signal reaches the running launch once, from here, so that its runs finish their
    step and checkpoint (a launch still starting up just ends), and no launch starts after it. A
    second signal stops the running launch at once: SIGINT, which the training loop and the
    parallel launcher take as "stop now", then SIGKILL to its whole session if it is still there
    STOP_AT_ONCE_S later. The handler only records; the waiting loop acts, so that no signal is lost
    or passed on twice whenever it lands (while a launch starts, during training, between launches)."""

    POLL_S = 0.05
    STOP_AT_ONCE_S = 10.0

    def __init__(self):
        self.signum: int | None = None   # the first signal
        self.signals = 0
        self.at_once = False
        self._previous: dict = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    def __enter__(self) -> Foreground:
        self._previous = {s: signal.signal(s, self._record) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _record(self, signum: int, frame) -> None:
        self.signals += 1
        if self.signum is None:
            self.signum = signum

    def run(self, command: list[str]) -> int:
        """Run `command` to its end (or to its stop) and return its exit status."""
        child = subprocess.Popen(command, cwd=ROOT, start_new_session=True)
        passed_on, kill_at = False, None
        while (code := child.poll()) is None:
            if self.signum is not None and not passed_on:
                child.send_signal(self.signum)
                passed_on = True
            if self.signals > 1 and not self.at_once:
                self.at_once = True
                child.send_signal(signal.SIGINT)
                kill_at = time.monotonic() + self.STOP_AT_ONCE_S
            if kill_at is not None and time.monotonic() > kill_at:
                try:
                    os.killpg(child.pid, signal.SIGKILL)  # its session: the launcher and every job it started
                except ProcessLookupError:  # it ended just now
                    pass
                kill_at = None
            time.sleep(self.POLL_S)
        return code


COST_PAGE = DOCS_DIR / "tables.md"
COST_BEGIN = ("<!-- cost of the tables: generated by `python scripts/reproduce.py --docs` from conf/table/ and "
              "results/benchmarks/; do not edit -->")
COST_END = "<!-- end of the generated cost table -->"


def cost_table() -> str:
    """The cost table of docs/tables.md: every table's runs with the estimates this script prints for them, from
    the measurements in results/benchmarks/ alone (no local runs)."""
    throughputs, costs = tables.read_throughput(), []
    for name in tables.table_names():
        plans, cost = tables.make_plans(tables.load_table(name)), tables.Cost()
        for plan in plans:
            cost.add(tables.estimate(plan, throughputs, []), len(plan.seeds), len(plan.seeds))
        costs.append((name, sum(len(p.seeds) for p in plans), cost))
    return tables.cost_markdown(costs)


def write_cost_table() -> int:
    try:
        changed = tables.rewrite_marked(COST_PAGE, COST_BEGIN, COST_END, cost_table())
    except (tables.TableError, io.OutputError) as e:
        tables.fail(str(e))
    print(f"{COST_PAGE}: cost table {'rewritten' if changed else 'already current'}")
    return 0


def _fraction_left(plan: tables.Plan, run) -> float:
    if run is None or not plan.config:
        return 1.0
    return max(0.0, 1 - len(run.metrics()) / plan.config["train.epochs"])


if __name__ == "__main__":
    sys.exit(main())
