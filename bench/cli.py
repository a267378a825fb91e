"""The `bench` command: list, run, leaderboard."""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path

import click

from bench import config as config_mod, registry
from bench.errors import BenchError, one_line, os_reason

log = logging.getLogger("bench")
_argv: list[str] = []  # the arguments of this invocation, stored with each run as its command
# set once this command starts computing cells, so an error or interruption says so only when it may be true
_computing = False


def _start_computing() -> None:
    global _computing
    _computing = True


def _setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """bnbench: benchmark adversarial-robustness defenses against a standard attack suite."""


# ----------------------------------------------------------------------------------------------------


@cli.command("list")
@click.option("--verbose", "-v", is_flag=True, help="Also show every parameter and its default.")
def list_cmd(verbose: bool) -> None:
    """Every registered defense, attack, model and dataset, with a one-line description."""
    for kind, title in (("defense", "Defenses"), ("attack", "Attacks"), ("model", "Models"), ("dataset", "Datasets")):
        table = registry.providers(kind)
        loaded, broken = registry.load_all(kind)
        click.echo(f"{title}:")
        width = max((len(n) for n in table), default=0)
        for name in sorted(table):
            if name in broken:  # listed, not fatal: one broken package must not hide the others
                click.echo(f"  {name:<{width}}  BROKEN ({table[name]}): {broken[name].reason}")
                continue
            cls = loaded[name]
            default = " [default]" if kind == "attack" and cls.in_default else ""  # run without --attacks
            click.echo(f"  {name:<{width}}  {_describe(cls)}{default}")
            if verbose:
                click.echo(f"  {'':<{width}}  provided by {table[name]}")
                # a dataset loader declares `options` (name[key=value;...]), a plugin class PARAMS
                for pname, spec in (getattr(cls, "PARAMS", None) or getattr(cls, "options", None) or {}).items():
                    click.echo(f"  {'':<{width}}    {pname}: {spec.describe()}")
            for i, (sname, text) in enumerate(getattr(cls, "SURROGATES", {}).items()):
                protocol = "paper" if i == 0 else f"paper:{sname}"  # what --protocol attacks it with
                click.echo(f"  {'':<{width}}    surrogate {sname} (--protocol {protocol}): {text}")
        if kind == "model":
            click.echo("  (or your own: --model pkg.module:function, see README 'Evaluate your own model')")
        click.echo("")


def _describe(obj) -> str:
    """A plugin class's description, or the first line of a (model factory) function's docstring."""
    if hasattr(obj, "describe"):
        return obj.describe()
    doc = (getattr(obj, "__doc__", None) or "").strip().splitlines()
    return doc[0].strip() if doc else ""


# ----------------------------------------------------------------------------------------------------


def _apply(options: list, f):
    for option in reversed(options):
        f = option(f)
    return f


def setting_options(commands: tuple[str, ...]) -> list:
    """The click options of the run settings (config.SETTINGS) taken by exactly `commands`, in table order."""
    options = []
    for s in config_mod.SETTINGS:
        if s.commands != commands or not s.flags:
            continue
        if s.switch:
            options.append(click.option(*s.flags, s.name, is_flag=True, help=s.help_text))
        else:
            options.append(click.option(*s.flags, s.name, type=str, multiple=s.multiple, metavar=s.metavar,
                                        help=s.help_text))
    return options


def run_options(f):
    """Options shared by `bench run` and `bench check`: what is built, on which data, where."""
    return _apply(setting_options(config_mod.RUN_AND_CHECK) + [
        click.option("--config", "config_file", type=str, help="TOML file with any of these settings.")], f)


def run_only_options(f):
    """Options of `bench run` alone: repeats over seeds, the attacks and how they are run."""
    return _apply([click.option("--seeds", type=str, help="Repeat the whole run for each of these seeds, e.g. 0,1,2.")]
                  + setting_options(config_mod.RUN_ONLY), f)


@cli.command("run")
@run_options
@run_only_options
def run_cmd(**opts) -> None:
    """Build a defense and attack it; results go to the results database, cell by cell."""
    from bench import runner

    _setup_logging(opts["quiet"])
    seeds = _seeds(opts)
    results = []
    for seed in seeds:
        req = request_from(opts)
        if seed is not None:
            req.seed = seed
        prep = runner.prepare(req)
        _start_computing()
        results.append(runner.execute(prep, quiet=req.quiet))
        print_summary(results[-1], seed if len(seeds) > 1 else None)
    if len(results) > 1:
        print_seed_summary(results)
    exit_on_failures([f for r in results for f in r["failures"]], req.out)


def exit_on_failures(failures: list, out: str) -> None:
    """One line per plugin that failed (its traceback is in the results directory), then exit code 1."""
    if not failures:
        return
    from bench.runner import FAILURE_LOG

    for f in failures:
        click.echo(f.line(), err=True)
    click.echo(one_line(f"bench: {len(failures)} failed (tracebacks in {Path(out) / FAILURE_LOG}); the other "
                        f"cells are stored, and re-running the command retries the failed ones"), err=True)
    sys.exit(1)


def _seeds(opts: dict) -> list[int | None]:
    if opts.get("seeds") is None:
        return [None]
    if opts.get("seed") is not None:
        raise BenchError("give --seed or --seeds, not both")
    try:
        seeds = [int(s) for s in opts["seeds"].split(",") if s.strip()]
    except ValueError:
        raise BenchError(f"--seeds expects comma-separated integers, got '{opts['seeds']}'") from None
    if not seeds:
        raise BenchError(f"--seeds expects comma-separated integers, got '{opts['seeds']}'")
    return list(dict.fromkeys(config_mod.validate_seed(s, "each of --seeds") for s in seeds))


def request_from(opts: dict):
    """The Request of `bench run` / `bench check`: the settings of `--config FILE`, then the options given
    (an option wins; a table option such as --param updates the file's table)."""
    from bench.runner import Request

    req = Request(command="bench " + shlex.join(_argv))
    if opts.get("config_file") is not None:
        if not opts["config_file"].strip():
            raise BenchError("--config must not be empty")
        path = opts["config_file"]
        conf = config_mod.read_toml(path)
        config_mod.validate_toml_keys(conf, path)
        for name, value in config_mod.toml_settings(conf).items():
            setattr(req, name, value)
    for s in config_mod.SETTINGS:
        given, value = s.option_value(opts.get(s.name))
        if given:
            setattr(req, s.name, config_mod.merge_setting(getattr(req, s.name), value))
    config_mod.validate_seed(req.seed)
    return req


def print_summary(result: dict, seed: int | None = None) -> None:
    from tabulate import tabulate

    from bench.stats import wilson

    rows = []
    for r in result["rows"]:
        if r["n"]:
            low, high = wilson(round(r["accuracy"] * r["n"]), r["n"])
            acc, ci = f"{100 * r['accuracy']:.2f}", f"[{100 * low:.1f}, {100 * high:.1f}]"
        else:  # a requested cell that is not stored
            acc, ci = "—", r.get("status", "")
        if r.get("incomplete"):  # a worst case without some requested cells overstates robustness
            ci = (ci + "  " if ci else "") + f"‡ incomplete: {', '.join(r['incomplete'])}"
        rows.append([r["attack"], r["protocol"], r["threat"], acc, ci, r["n"],
                     "" if r["seconds"] != r["seconds"] else f"{r['seconds']:.1f}"])
    click.echo(f"defense {result['defense']}  run {result['run_id'][:10]}" + (f"  seed {seed}" if seed is not None else ""))
    if result.get("build_failure"):
        click.echo(f"build failed: {result['build_failure']['error']}")
    if rows:
        click.echo(tabulate(rows, headers=["attack", "protocol", "threat", "accuracy %", "95% CI", "n", "seconds"]))
    for c in result.get("checks", []):
        if c["status"] in ("warn", "fail"):
            click.echo(f"check {c['name']}: {c['status']}: {c['detail']}")


def print_seed_summary(results: list[dict]) -> None:
    from tabulate import tabulate

    from bench.stats import mean_std

    keys = []
    for res in results:
        for r in res["rows"]:
            if (r["attack"], r["protocol"], r["threat"]) not in keys:
                keys.append((r["attack"], r["protocol"], r["threat"]))
    rows = []
    for key in keys:
        accs = [r["accuracy"] for res in results for r in res["rows"] if (r["attack"], r["protocol"], r["threat"]) == key]
        mean, std = mean_std(accs)
        rows.append([*key, f"{100 * mean:.2f} ± {100 * std:.2f}", len(accs)])
    click.echo(f"\nmean ± std over {len(results)} seeds")
    click.echo(tabulate(rows, headers=["attack", "protocol", "threat", "accuracy %", "seeds"]))


# ----------------------------------------------------------------------------------------------------


@cli.command("check")
@run_options
@click.option("--n", "n", type=int, default=None, help="Test images checked (default: one evaluation batch).")
def check_cmd(**opts) -> None:
    """Checks 3-8 alone (determinism, batch dependence, gradients, large eps, budget monotonicity,
    black-box vs white-box) on the first test images; exit code 1 if any check fails."""
    from tabulate import tabulate

    from bench import runner

    _setup_logging(opts["quiet"])
    if opts["n"] is not None and opts["n"] < 1:
        raise BenchError(f"--n must be >= 1, got {opts['n']}")
    opts["attacks"] = ",".join(runner.check_attacks())
    req = request_from(opts)
    prep = runner.prepare(req)
    n = opts["n"] if opts["n"] is not None else prep.config.preset.eval_batch_size
    try:
        results = runner.check(prep, n, quiet=req.quiet)
    except runner.PluginFailed as exc:
        click.echo(exc.failure.line(), err=True)
        sys.exit(1)
    click.echo(f"checks of {prep.config.defense} on the first {min(n, len(prep.data.test))} test images")
    click.echo(tabulate([[r.name, r.status, r.detail] for r in results], headers=["check", "status", "detail"],
                        maxcolwidths=[None, None, 90]))
    if any(r.status == "fail" for r in results):
        sys.exit(1)


@cli.command("sweep")
@click.argument("file", type=str)
@click.option("--out", help="Results directory (default: the file's `out`, else results).")
@click.option("--dry-run", is_flag=True, help="Validate and list the runs without running them.")
@click.option("--status", "show_status", is_flag=True,
              help="Show each job's state in the results database (done, partial, failed, not started); run nothing.")
@click.option("--executor", default="local", show_default=True,
              help="local (one job after another in this process) or ray (each job a Ray task, on this machine "
                   "or the cluster of --address).")
@click.option("--address", help="The Ray cluster to join (auto, or HOST:PORT of its head); without it, Ray "
                                "starts on this machine. Only with --executor ray.")
@click.option("--cpus-per-job", default=1.0, show_default=True, type=float,
              help="CPUs each Ray task asks for.")
@click.option("--gpus-per-job", default=1.0, show_default=True, type=float,
              help="GPUs each Ray task of a GPU sweep (device cuda) asks for: a fraction such as 0.25 lets four "
                   "small jobs share one GPU.")
@click.option("--shard", metavar="I/N", help="Run only the I-th of N slices of the grid (1-based, e.g. a Slurm "
                                            "array task); merge the slices' databases with `bench merge`.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def sweep_cmd(file: str, out: str | None, dry_run: bool, show_status: bool, executor: str, address: str | None,
              cpus_per_job: float, gpus_per_job: float, shard: str | None, quiet: bool) -> None:
    """Run a grid of (defense, params, seed) cells from a TOML file, resuming finished cells."""
    from tabulate import tabulate

    from bench import sweep

    _setup_logging(True)
    if show_status:
        rows = sweep.status(file, out=out, shard=shard)
        click.echo(tabulate([[one_line(r["label"]), r["run_id"][:10], r["state"],
                              f"{r['cells']}/{r['wanted'] or '?'}"] for r in rows],
                            headers=["run", "config", "state", "cells"]))
        counts = {state: sum(r["state"] == state for r in rows) for state in ("done", "partial", "failed", "not started")}
        click.echo(f"{len(rows)} jobs: " + ", ".join(f"{n} {state}" for state, n in counts.items()))
        return
    results = sweep.run(file, out=out, quiet=quiet, dry_run=dry_run, executor=executor, address=address,
                        shard=shard, cpus_per_job=cpus_per_job, gpus_per_job=gpus_per_job, on_start=_start_computing)
    if dry_run:
        click.echo(tabulate([[one_line(r["label"]), r["run_id"][:10], one_line(r["command"])] for r in results],
                            headers=["run", "config", "command"]))
        return
    rows = []
    for r in results:
        by = {row["attack"]: row for row in r["summary"]["rows"] if row["protocol"] in ("-", "adaptive", "paper")}
        worst = [row for row in r["summary"]["rows"] if row["attack"] == "worst case"]
        lacking = list(dict.fromkeys(a for w in worst for a in w.get("incomplete", [])))
        status = "build failed" if r["summary"].get("build_failure") else \
            f"‡ incomplete: {', '.join(lacking)}" if lacking else ""
        clean = f"{100 * by['clean']['accuracy']:.2f}" if by.get("clean", {}).get("n") else ""
        rows.append([one_line(r["label"]), r["run_id"][:10], clean,
                     " ".join("—" if w["accuracy"] != w["accuracy"] else f"{100 * w['accuracy']:.2f}" for w in worst),
                     status])
    click.echo(tabulate(rows, headers=["run", "config", "clean %", "worst case %", "status"]))
    if executor == "ray":
        nodes = sorted({n for r in results for n in r.get("nodes", [])})
        click.echo("jobs per node: " + ", ".join(
            f"{n[:8]} {sum(n in r.get('nodes', []) for r in results)}" for n in nodes) if nodes else
            "jobs per node: none ran (every job was finished)")
        concurrency = results[0].get("concurrency") if results else None
        if concurrency:
            click.echo(f"jobs at once: at most {concurrency['most_running']} "
                       f"(the cluster's slots: {concurrency['slots']})")
        traffic = results[0].get("cache_traffic") if results else None
        if traffic:  # the evidence that no model was trained twice anywhere in the cluster
            click.echo(f"cache: {traffic['computed']} file(s) computed on workers ({traffic['distinct']} distinct), "
                       f"{traffic['fetched']} fetched from the driver by other jobs")
        for r in results:  # a job started more than once: Ray re-ran it after its worker or node was lost
            if len(r.get("nodes", [])) > 1:
                click.echo(f"retried: {r['label']} (started on {' then '.join(n[:8] for n in r['nodes'])}); "
                           f"its finished cells were kept, the rest computed again")
    exit_on_failures([f for r in results for f in r["summary"]["failures"]], results[0]["out"] if results else ".")


@cli.command("merge")
@click.argument("sources", nargs=-1, required=True)
@click.option("--out", default="results", show_default=True, help="Results directory to merge into.")
def merge_cmd(sources: tuple[str, ...], out: str) -> None:
    """Merge results databases (folders or their results.sqlite) into --out; conflicting cells are refused."""
    from bench import merge

    counts = merge.merge(list(sources), out)
    click.echo(f"merged {counts['sources']} database(s) into {Path(out)}: {counts['runs']} run(s) and "
               f"{counts['cells']} cell(s) added")


@cli.command("leaderboard")
@click.option("--out", default="results", show_default=True, help="Results directory to read.")
@click.option("--dest", default="leaderboards", show_default=True, help="Where the files go.")
@click.option("--format", "fmt", default="md", show_default=True,
              help="md (tables and figures), html (one self-contained page: sortable, filterable), latex "
                   "(booktabs tables), csv or json (one record per run and cell; json adds RobustBench's "
                   "model_info fields per configuration).")
def leaderboard_cmd(out: str, dest: str, fmt: str) -> None:
    """Write leaderboards/<dataset>-<arch>-<preset>.{md,html,tex,csv,json} from the results database."""
    from bench import leaderboard
    from bench.runner import code_version
    from bench.store import Store

    store = Store(out, create=False)
    try:
        paths = leaderboard.write(store, dest, out, code_version(), fmt)
        for line in leaderboard.unplaced_failures(store):  # runs that failed before they had a row
            click.echo(one_line(f"bench: warning: {line}"), err=True)
    finally:
        store.close()
    for p in paths:
        click.echo(str(p))


# ----------------------------------------------------------------------------------------------------


def _error(message: str) -> None:
    """The one line of a refused command, whatever the message quotes (a value holding a newline stays on
    it, escaped), and exit code 2."""
    click.echo(one_line(f"bench: error: {message}"), err=True)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user mistakes end with one line on stderr and exit code 2, never a traceback."""
    global _argv, _computing
    _argv = list(sys.argv[1:] if argv is None else argv)
    _computing = False
    try:
        cli.main(args=_argv, prog_name="bench", standalone_mode=False)
    except BenchError as exc:
        _error(str(exc))
    except click.exceptions.NoArgsIsHelpError as exc:  # pragma: no cover - depends on click version
        click.echo(exc.ctx.get_help() if exc.ctx else str(exc))
        sys.exit(0)
    except click.ClickException as exc:
        _error(exc.format_message())
    except OSError as exc:  # the machine's fault (a full disk while caching a model), or a path no check caught
        where = f" ({exc.filename})" if exc.filename else ""
        _error(f"{os_reason(exc)}{where}" + ("; finished cells are stored, fix it and re-run the command to resume"
                                             if _computing else ""))
    except (click.exceptions.Abort, KeyboardInterrupt):  # click turns Ctrl-C into Abort
        click.echo("bench: interrupted" + ("; finished cells are stored, re-run the command to resume"
                                           if _computing else ""), err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
