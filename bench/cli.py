"""The `bench` command: list, run, leaderboard."""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path

import click

from bench import config as config_mod, registry
from bench.errors import BenchError

log = logging.getLogger("bench")
_argv: list[str] = []  # the arguments of this invocation, stored with each run as its command


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
    """Every registered defense and attack, with a one-line description."""
    for kind, title in (("defense", "Defenses"), ("attack", "Attacks")):
        table = registry.providers(kind)
        click.echo(f"{title}:")
        width = max((len(n) for n in table), default=0)
        for name in sorted(table):
            cls = registry.load(kind, name)
            click.echo(f"  {name:<{width}}  {cls.describe()}")
            if verbose:
                click.echo(f"  {'':<{width}}  provided by {table[name]}")
                for pname, spec in cls.PARAMS.items():
                    click.echo(f"  {'':<{width}}    {pname}: {spec.describe()}")
        click.echo("")


# ----------------------------------------------------------------------------------------------------


@cli.command("run")
@click.option("--defense", help="Defense name (see `bench list`).")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="Defense parameter.")
@click.option("--attacks", help="Comma-separated attack names, or 'all'. [default: pgd10,fgsm]")
@click.option("--attack-param", "attack_params", multiple=True, metavar="ATTACK.KEY=VALUE",
              help="Attack parameter, e.g. fgsm.eps=16/255.")
@click.option("--preset", help=f"Scale: {', '.join(config_mod.PRESETS)}. [default: {config_mod.DEFAULT_PRESET}]")
@click.option("--dataset", help="digits, cifar10 or cifar100 (default: the preset's).")
@click.option("--data-dir", type=str, help="Directory holding cifar-*-python/ (or empty, to download).")
@click.option("--arch", help="Architecture (default: the preset's).")
@click.option("--device", help="cpu, cuda or auto. [default: auto]")
@click.option("--seed", type=str, help="Run seed. [default: 0]")
@click.option("--out", help="Results directory (database and cached models). [default: results]")
@click.option("--config", "config_file", type=str, help="TOML file with any of these settings.")
@click.option("--precision", help="Training precision: auto, bf16 or fp32 (evaluation is fp32). [default: auto]")
@click.option("--protocol", help="adaptive (attack the defended model) or paper (attack its surrogate).")
@click.option("--set", "sets", multiple=True, metavar="FIELD=VALUE", help="Override a preset number.")
@click.option("--base-checkpoint", "base_checkpoints", multiple=True, metavar="[RECIPE=]PATH",
              help="Use this checkpoint as a base model instead of training one (recipe default pgd_at).")
@click.option("--no-checks", is_flag=True, help="Skip the sanity checks.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or progress messages.")
def run_cmd(**opts) -> None:
    """Build a defense and attack it; results go to the results database, cell by cell."""
    from bench import runner

    _setup_logging(opts["quiet"])
    req = request_from(opts)
    prep = runner.prepare(req)
    result = runner.execute(prep, quiet=req.quiet)
    print_summary(result)


def request_from(opts: dict):
    from bench.runner import Request, parse_assignments, parse_attack_params

    req = Request(command="bench " + shlex.join(_argv))
    if opts.get("config_file"):
        path = opts["config_file"]
        conf = config_mod.read_toml(path)
        config_mod.check_toml_keys(conf, path)
        for key in ("defense", "attacks", "preset", "dataset", "data_dir", "arch", "device", "seed", "out",
                    "precision", "protocol", "checks"):
            if key in conf:
                setattr(req, key, conf[key])
        req.params = dict(conf.get("params", {}))
        req.attack_params = {k: dict(v) for k, v in conf.get("attack_params", {}).items()}
        req.sets = dict(conf.get("set", {}))
        bc = conf.get("base_checkpoint", {})
        req.base_checkpoints = {"pgd_at": bc} if isinstance(bc, str) else dict(bc)
    for key in ("defense", "attacks", "preset", "dataset", "data_dir", "arch", "device", "out", "precision",
                "protocol"):
        if opts.get(key) is not None:
            setattr(req, key, opts[key])
    if opts.get("seed") is not None:
        try:
            req.seed = int(opts["seed"])
        except ValueError:
            raise BenchError(f"seed must be an integer, got '{opts['seed']}'") from None
    req.params.update(parse_assignments(opts.get("params"), "--param"))
    for name, values in parse_attack_params(opts.get("attack_params")).items():
        req.attack_params.setdefault(name, {}).update(values)
    req.sets.update(parse_assignments(opts.get("sets"), "--set"))
    for item in opts.get("base_checkpoints") or ():
        recipe, sep, path = item.partition("=")
        if not sep:
            recipe, path = "pgd_at", item
        req.base_checkpoints[recipe.strip()] = path.strip()
    if opts.get("no_checks"):
        req.checks = False
    req.quiet = bool(opts.get("quiet"))
    return req


def print_summary(result: dict) -> None:
    from tabulate import tabulate

    rows = [[r["attack"], r["protocol"], r["threat"], f"{100 * r['accuracy']:.2f}", r["n"],
             "" if r["seconds"] != r["seconds"] else f"{r['seconds']:.1f}"] for r in result["rows"]]
    click.echo(f"defense {result['defense']}  run {result['run_id'][:10]}")
    click.echo(tabulate(rows, headers=["attack", "protocol", "threat", "accuracy %", "n", "seconds"]))


# ----------------------------------------------------------------------------------------------------


@cli.command("leaderboard")
@click.option("--out", default="results", show_default=True, help="Results directory to read.")
@click.option("--dest", default="leaderboards", show_default=True, help="Where the markdown files go.")
def leaderboard_cmd(out: str, dest: str) -> None:
    """Write leaderboards/<dataset>-<arch>-<preset>.md from the results database."""
    from bench import leaderboard
    from bench.runner import code_version
    from bench.store import Store

    store = Store(out, create=False)
    try:
        paths = leaderboard.write(store, dest, out, code_version())
    finally:
        store.close()
    for p in paths:
        click.echo(str(p))


# ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Entry point: user mistakes end with one line on stderr and exit code 2, never a traceback."""
    global _argv
    _argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cli.main(args=_argv, prog_name="bench", standalone_mode=False)
    except BenchError as exc:
        click.echo(f"bench: error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.NoArgsIsHelpError as exc:  # pragma: no cover - depends on click version
        click.echo(exc.ctx.get_help() if exc.ctx else str(exc))
        sys.exit(0)
    except click.ClickException as exc:
        click.echo(f"bench: error: {exc.format_message()}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("bench: aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("bench: interrupted; finished cells are stored, re-run the command to resume", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
