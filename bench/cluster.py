"""`bench sweep --executor ray`: the jobs of a sweep as Ray tasks, on one machine or a cluster of them.

One source of truth: the driver's results database, written by one process only. A `Coordinator` actor
runs on the driver's node and owns the database and the cache folder beside it; a worker sends each
finished cell to it the moment the cell is done (`RemoteStore`), so a worker that dies loses only the
cell in progress, and the job's retry (Ray re-runs the task of a dead worker elsewhere) skips every cell
the database already holds. No SQLite file is ever written by two machines or over a network file system.

Trained models and memos reach other machines through the coordinator too (`ClusterCache`): a worker
asks it before training; the first to ask trains (a claim, kept alive by a heartbeat), the others wait for
it and then fetch the file, checked against the sha256 it was sent with. So no base model is trained twice
anywhere in the cluster, and the driver's cache ends up holding every model, as a local sweep's does.

Ray is an optional extra (`pip install -e ".[ray]"`); nothing else in bnbench imports it.
"""

from __future__ import annotations

import _thread
import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path

from bench import checkpoints
from bench.errors import BenchError
from bench.registry import one_line
from bench.store import Store

log = logging.getLogger("bench")

# a claim whose holder has not been heard of for this long is taken to be dead (its machine was lost)
CLAIM_STALE_SECONDS = 30.0
HEARTBEAT_SECONDS = 5.0
POLL_SECONDS = 1.0
# what a worker may ask of the driver's database (everything runner.execute uses)
STORE_METHODS = frozenset({"put_run", "put_meta", "put_cell", "put_requests", "put_failure", "clear_failure",
                           "put_checks", "write_file", "has_file", "read_file", "append_text", "finished", "runs",
                           "cells", "requests", "failures", "checks"})


# --address: how long a head may take to accept a TCP connection, and ray.init to join what accepted it (the
# bound takes effect when Ray's retry loop is next back in Python: within about 40 s more)
CONNECT_SECONDS = 5.0
JOIN_SECONDS = 60.0
_HOST = r"\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?"
_ADDRESS = re.compile(rf"(?P<client>ray://)?(?P<host>{_HOST}):(?P<port>[0-9]{{1,5}})")
_KEYWORDS = ("auto", "local")


def parse_address(address: str) -> tuple[str, int] | None:
    """The (host, port) of `--address` HOST:PORT or ray://HOST:PORT; None for `auto` (the cluster this
    machine joined) and `local` (Ray started here). Anything else is one line naming the forms."""
    if address in _KEYWORDS:
        return None
    found = _ADDRESS.fullmatch(address)
    if found is None or not 1 <= int(found["port"]) <= 65535:
        raise BenchError(f"--address {address!r} is not a Ray address: give HOST:PORT of the cluster's head (e.g. "
                         f"10.0.0.5:6379), ray://HOST:PORT (Ray Client), auto (the cluster this machine joined) or "
                         f"local (Ray started here, as without --address)")
    return found["host"].strip("[]"), int(found["port"])


def _target(address: str) -> tuple[str, int]:
    """Where Ray will connect for `address`: `auto` read from Ray's record of the cluster this machine
    joined, and a local host name as Ray rewrites it (to this node's address)."""
    if address.startswith("ray://"):  # Ray Client: the address as given
        return parse_address(address)
    try:
        from ray._private.services import canonicalize_bootstrap_address  # how ray.init reads it
    except ImportError:  # pragma: no cover - another Ray version: the address as given
        canonicalize_bootstrap_address = None
    if canonicalize_bootstrap_address is not None:
        try:
            resolved = canonicalize_bootstrap_address(address)
        except ConnectionError as exc:  # `auto`, and no cluster recorded or running here
            raise BenchError(f"--address {address}: no Ray cluster found to join ({one_line(exc)})") from None
        except Exception as exc:
            raise BenchError(f"--address {address}: {one_line(exc)}") from None
        if resolved is not None:
            host, _, port = resolved.rpartition(":")
            return host.strip("[]"), int(port)
    parsed = parse_address(address)
    if parsed is None:
        raise BenchError(f"--address {address}: this Ray cannot tell which cluster that is; give HOST:PORT")
    return parsed


def require_reachable(address: str) -> None:
    """Fail in seconds, with the address named, when nothing accepts a connection where Ray would connect
    for `address`: Ray itself retries for many minutes, printing warnings."""
    if address == "local":
        return
    require_ray()
    host, port = _target(address)
    where = f"{host}:{port}" + ("" if f"{host}:{port}" in address else f", where Ray looks for it")
    try:
        socket.create_connection((host, port), timeout=CONNECT_SECONDS).close()
    except socket.timeout:
        reason = f"no answer within {CONNECT_SECONDS:g} s"
    except socket.gaierror:
        reason = f"host {host} not found"
    except OSError as exc:
        reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
    else:
        return
    raise BenchError(f"--address {address}: no Ray cluster can be reached at {where} ({reason}); start one there "
                     f"(ray start --head) or give its head's HOST:PORT")


def join(ray, address: str, **options) -> None:
    """ray.init(address) for a sweep's cluster; whatever keeps it from joining is one line naming the address.
    Bounded (from the main thread, which the bound interrupts): something that accepts connections but is no
    Ray head would keep ray.init retrying for many minutes."""
    lock, expired, joined = threading.Lock(), threading.Event(), False

    def expire() -> None:
        with lock:
            if not joined:
                expired.set()
                _thread.interrupt_main()

    timer = threading.Timer(JOIN_SECONDS, expire) if threading.current_thread() is threading.main_thread() else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        ray.init(address=address, **options)
        with lock:
            joined = True
    except KeyboardInterrupt:
        if not expired.is_set():  # the user's Ctrl-C
            raise
        ray.shutdown()
        raise BenchError(f"--address {address}: no Ray cluster answered within {JOIN_SECONDS:g} s (something "
                         f"accepts connections there, but not as a Ray head)") from None
    except Exception as exc:  # ConnectionError (an OSError: it would read as a local file's fault), ...
        ray.shutdown()
        raise BenchError(f"--address {address}: Ray could not join the cluster there ({one_line(exc)})") from None
    finally:
        if timer is not None:
            timer.cancel()


def require_ray():
    try:
        import ray
    except ImportError:
        raise BenchError("--executor ray needs Ray: pip install -e \".[ray]\" (or use --executor local, or "
                         "--shard i/n with `bench merge`)") from None
    return ray


class Coordinator:
    """The driver's side (a Ray actor pinned to the driver's node; its calls run one at a time): the results
    database, the cache folder, claims on cache files being computed, and which jobs are running where."""

    def __init__(self, out: str) -> None:
        self.store = Store(out)
        self.cache_root = Path(out) / "cache"
        self.claims: dict[str, tuple[str, float]] = {}  # cache file -> (holder, last heard of)
        self.running: dict[str, str] = {}  # job label -> node id
        self.most_running = 0  # the most jobs that ran at once
        self.placed: list[tuple[str, str]] = []  # (job label, node id) of every start, retries included
        self.published: list[str] = []  # every cache file a worker computed and sent, in order
        self.fetches = 0

    def store_call(self, name: str, args: tuple, kwargs: dict):
        if name not in STORE_METHODS:
            raise BenchError(f"a worker asked the results database for '{name}'")
        return getattr(self.store, name)(*args, **kwargs)

    def _path(self, rel: str) -> Path:
        path = (self.cache_root / rel).resolve()
        if not path.is_relative_to(self.cache_root.resolve()):
            raise BenchError(f"cache file {rel!r} is outside the cache folder")
        return path

    def fetch(self, rel: str) -> tuple[bytes, str] | None:
        path = self._path(rel)
        if not path.is_file():
            return None
        self.fetches += 1
        return checkpoints.transfer_bytes(path)

    def claim(self, rel: str, holder: str) -> str:
        """'cached' (fetch it), 'granted' (compute it, then publish) or 'busy' (someone else computes it)."""
        if self._path(rel).is_file():
            return "cached"
        now = time.time()
        current = self.claims.get(rel)
        if current is None or current[0] == holder or now - current[1] > CLAIM_STALE_SECONDS:
            self.claims[rel] = (holder, now)
            return "granted"
        return "busy"

    def heartbeat(self, rel: str, holder: str) -> None:
        if self.claims.get(rel, ("",))[0] == holder:
            self.claims[rel] = (holder, time.time())

    def publish(self, rel: str, holder: str, data: bytes, digest: str) -> None:
        path = self._path(rel)
        self.published.append(rel)
        if not path.is_file():
            checkpoints.install_bytes(path, data, digest)
        self.release(rel, holder)

    def release(self, rel: str, holder: str) -> None:
        if self.claims.get(rel, ("",))[0] == holder:
            del self.claims[rel]

    def job_started(self, label: str, node: str) -> None:
        self.running[label] = node
        self.placed.append((label, node))
        self.most_running = max(self.most_running, len(self.running))

    def job_ended(self, label: str) -> None:
        self.running.pop(label, None)

    def state(self) -> tuple[int, list[tuple[str, str]], int]:
        return len(self.running), list(self.placed), self.most_running

    def cache_traffic(self) -> tuple[list[str], int]:
        return list(self.published), self.fetches

    def close(self) -> None:
        self.store.close()


class RemoteStore:
    """The store a worker's runner.execute writes to: every call goes to the driver's database."""

    def __init__(self, coordinator) -> None:
        self._coordinator = coordinator

    def __getattr__(self, name: str):
        if name not in STORE_METHODS:
            raise AttributeError(name)
        ray = require_ray()
        return lambda *args, **kwargs: ray.get(self._coordinator.store_call.remote(name, args, kwargs))

    def close(self) -> None:  # the driver's database stays open for the other jobs
        pass


class ClusterCache(checkpoints.LocalCache):
    """A worker's cache: its local folder, filled from and published to the driver's (see the module doc)."""

    def __init__(self, coordinator, root: Path) -> None:
        self.coordinator = coordinator
        self.root = Path(root)
        self.holder = uuid.uuid4().hex  # this attempt of this job: a retry is a new holder

    def _rel(self, path: Path) -> str | None:
        path = Path(path)
        return str(path.relative_to(self.root)) if path.is_relative_to(self.root) else None

    def fetch(self, path: Path) -> bool:
        rel = self._rel(path)
        if rel is None:
            return False
        ray = require_ray()
        got = ray.get(self.coordinator.fetch.remote(rel))
        if got is None:
            return False
        checkpoints.install_bytes(Path(path), *got)
        return True

    @contextlib.contextmanager
    def producing(self, path: Path, log, what: str):
        rel = self._rel(path)
        if rel is None:
            yield
            return
        ray = require_ray()
        said = False
        while True:
            answer = ray.get(self.coordinator.claim.remote(rel, self.holder))
            if answer == "cached":
                self.fetch(path)
                yield
                return
            if answer == "granted":
                break
            if not said:
                log.info("%s: waiting for another machine computing %s", what, Path(path).name)
                said = True
            time.sleep(POLL_SECONDS)
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(HEARTBEAT_SECONDS):
                ray.get(self.coordinator.heartbeat.remote(rel, self.holder))

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            yield
        except BaseException:
            stop.set()
            ray.get(self.coordinator.release.remote(rel, self.holder))
            raise
        stop.set()
        if Path(path).is_file():
            data, digest = checkpoints.transfer_bytes(Path(path))
            ray.get(self.coordinator.publish.remote(rel, self.holder, data, digest))
        else:
            ray.get(self.coordinator.release.remote(rel, self.holder))


def _worker_dir(out: str) -> Path:
    """A worker's own folder for one driver's results directory (its cache copies, kept between jobs)."""
    key = hashlib.sha256(str(Path(out).resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / "bnbench-ray" / key


def run_job(request, key: str, coordinator, driver_out: str, env: dict) -> dict:
    """One job on a worker: validate it here, build, evaluate; every cell goes to the driver's database."""
    ray = require_ray()
    from bench import runner

    # (set here, not as a Ray runtime_env: workers of another env are not reused, each job would start one)
    os.environ.update(env)

    node = ray.get_runtime_context().get_node_id()
    if not log.handlers:  # the worker's log file (Ray's logs folder on its machine) tells what the job did
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s bench: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    ray.get(coordinator.job_started.remote(key, node))
    try:
        local = _worker_dir(driver_out) / node[:12]  # (two nodes may share a machine, as in the tests)
        # Ray shows a task the GPU it was given, as cuda:0; a task given none stays off the GPUs
        device = "cuda" if ray.get_gpu_ids() else "cpu" if request.device == "auto" else request.device
        request = dataclasses.replace(request, out=str(local), quiet=True, device=device)
        prep = runner.prepare(request)
        checkpoints.use_shared_cache(ClusterCache(coordinator, local / "cache"))
        try:
            summary = runner.execute(prep, quiet=True, store=RemoteStore(coordinator))
        finally:
            checkpoints.use_shared_cache(checkpoints.LocalCache())
        return {"summary": summary, "node": node}
    finally:
        ray.get(coordinator.job_ended.remote(key))


def _portable(request):
    """The request as a worker elsewhere reads it: a relative data folder made absolute here (a worker's
    current directory is Ray's, not the driver's; the folder must exist at that path on every node)."""
    if request.data_dir is not None and not Path(request.data_dir).is_absolute():
        request = dataclasses.replace(request, data_dir=str(Path(request.data_dir).resolve()))
    return request


def run(todo: list, prepared: list, out: str, *, address: str | None, cpus_per_job: float, quiet: bool,
        gpus_per_job: float = 1) -> list[dict]:
    """Run the jobs on Ray; returns one result per job in sweep order, as the local executor does. Jobs on a
    GPU ask for `gpus_per_job` of one (a fraction lets small jobs share it). `address`: checked by the caller
    (parse_address, require_reachable) before any job was prepared."""
    ray = require_ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    from tqdm.auto import tqdm

    from bench import runner

    results: dict[int, dict] = {}
    pending_jobs = []
    store = Store(out)
    try:  # finished jobs are summarised here, without a task
        for i, (job, prep) in enumerate(zip(todo, prepared)):
            wanted, done, _ = runner.job_state(prep, store)
            if done == wanted:
                results[i] = {"summary": runner.execute(prep, quiet=True, store=store)}
            else:
                pending_jobs.append(i)
    finally:
        store.close()

    env = {k: os.environ[k] for k in ("BENCH_DATA_DIR",) if k in os.environ}
    # Ray on this machine only, for this sweep: no dashboard to pay for, and "local" so that Ray does not join
    # the cluster recorded in its current-cluster file (another program's, or a dead one's: it would hang)
    started_here = address in (None, "local")
    if started_here:
        ray.init(address="local", log_to_driver=False, configure_logging=False, include_dashboard=False)
    else:
        join(ray, address, log_to_driver=False, configure_logging=False)
    try:
        asks = {todo[i].request.device for i in pending_jobs}
        gpus = gpus_per_job if any(d.startswith("cuda") for d in asks) or (
            "auto" in asks and ray.cluster_resources().get("GPU", 0) > 0) else 0
        driver_node, driver_out = ray.get_runtime_context().get_node_id(), str(Path(out).resolve())
        coordinator = ray.remote(Coordinator).options(
            num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=driver_node, soft=False)
        ).remote(driver_out)
        task = ray.remote(run_job).options(num_cpus=cpus_per_job, num_gpus=gpus, max_retries=3)
        refs: dict = {}
        unsubmitted = list(pending_jobs)
        failed, shown, most_slots = 0, "", 0
        bar = tqdm(total=len(todo), initial=len(todo) - len(unsubmitted), desc="sweep", disable=quiet,
                   dynamic_ncols=True)
        waiting: list = []
        while waiting or unsubmitted:
            # Only as many jobs in Ray's hands as the cluster has slots for: a task blocked in ray.get (each
            # cell it stores) lends its CPU back to Ray, which would start a queued job on it, and both then
            # run: the jobs at once would grow past the CPUs (and their memory) as the sweep goes on.
            slots = _slots(ray.cluster_resources(), cpus_per_job, gpus) if unsubmitted else 0
            most_slots = max(most_slots, slots)
            while unsubmitted and len(waiting) < slots:
                i = unsubmitted.pop(0)
                ref = task.remote(_portable(todo[i].request), str(i), coordinator, driver_out, env)
                refs[ref] = i
                waiting.append(ref)
            ready, waiting = ray.wait(waiting, num_returns=1, timeout=1.0)
            for ref in ready:
                i = refs[ref]
                try:
                    results[i] = ray.get(ref)
                except ray.exceptions.RayError as exc:  # the job raised (a user's mistake) or ran out of retries
                    cause = getattr(exc, "cause", None) or exc
                    failed += 1
                    # a BenchError is already the one line a user reads; anything else gets its type named
                    plain = isinstance(cause, BenchError) or not isinstance(cause, Exception)
                    results[i] = {"error": str(cause) if plain else one_line(cause)}
                else:
                    failed += bool(results[i]["summary"]["failures"])
                bar.update(1)
            running, _, _ = ray.get(coordinator.state.remote())
            postfix = f"running {running}, failed {failed}"
            if postfix != shown:
                bar.set_postfix_str(postfix)
                shown = postfix
        bar.close()
        _, placed, most_running = ray.get(coordinator.state.remote())
        published, fetches = ray.get(coordinator.cache_traffic.remote())
        ray.get(coordinator.close.remote())
    finally:
        ray.shutdown()

    nodes: dict[int, list[str]] = {}
    for key, node in placed:
        nodes.setdefault(int(key), []).append(node)
    out_list = []
    store = Store(out)
    try:
        for i, (job, prep) in enumerate(zip(todo, prepared)):
            r = results[i]
            if "error" in r:  # the job's own cells and failures as stored, and the job's error
                run = next((x for x in store.runs() if x["run_id"] == prep.config.run_id), None)
                attacks, _, _ = runner.cells_wanted(prep, run)  # (as execute's summary: substituted attacks)
                summary = runner.summary(store, prep.config.run_id, [spec.label for spec, _ in attacks], prep.config)
                summary["failures"] = [runner.Failure(f"sweep job '{job.label}'", runner.BUILD, runner.NO_PROTOCOL,
                                                      r["error"])]
            else:
                summary = r["summary"]
            out_list.append({"label": job.label, "run_id": prep.config.run_id, "summary": summary, "out": out,
                             "nodes": nodes.get(i, [])})
    finally:
        store.close()
    if out_list:
        out_list[0]["cache_traffic"] = {"computed": len(published), "distinct": len(set(published)),
                                        "fetched": fetches}
        out_list[0]["concurrency"] = {"most_running": most_running, "slots": most_slots}
    return out_list


def _slots(resources: dict, cpus_per_job: float, gpus: float) -> int:
    """How many jobs the cluster's CPUs (and GPUs, when jobs ask for one) can run at once; at least one."""
    slots = int(resources.get("CPU", 0) // cpus_per_job)
    if gpus:
        slots = min(slots, int(resources.get("GPU", 0) // gpus))
    return max(1, slots)
