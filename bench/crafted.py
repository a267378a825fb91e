"""Adversarial images crafted on a surrogate, kept so that runs sharing the surrogate craft them once.

Under a paper protocol the attack differentiates the surrogate, not the defense: its images depend on the
surrogate's weights and mode, the attack (class, source, parameters), the run seed, the test images and
their batches, and the device, and on nothing else of the run. Norm shaping's runs at different inference
ratios share one trained network, hence one surrogate: the ratio grid crafts each paper-protocol cell once
and only scores it again (the verdict is always the run's own defense). A reused cell records the run that
crafted it and that run's crafting time. The files live in OUT/cache/crafted/ (delete it to recompute).
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import logging
from dataclasses import dataclass

import numpy as np
import torch

from bench import state
from bench.contract import Attack, Defended
from bench.data import Split
from bench.errors import BenchError
from bench.readers import read_npz

log = logging.getLogger("bench")
CRAFTED_DIR = "cache/crafted"


@dataclass
class Crafted:
    """A cell's adversarial images as an earlier run crafted them on the same surrogate."""

    x_adv: torch.Tensor  # (n, ...) float32, on the CPU, in the test split's order
    extra: dict  # the attack's own figures (Attack.extra()) from that crafting
    state_changed: bool
    seconds: float  # that run's time for the cell (crafting and scoring)
    run_id: str


def _source_digest(obj: object) -> str:
    try:
        return hashlib.sha256(inspect.getsource(inspect.getmodule(obj)).encode()).hexdigest()[:16]
    except (OSError, TypeError):
        return "unknown"


class CraftedCache:
    """One run's paper-protocol cells: what they share (the surrogate, the test images, the seed...) is
    digested once; `key` adds each attack."""

    def __init__(self, store, target: Defended, protocol: str, seed: int, batch_size: int, test: Split,
                 device: torch.device) -> None:
        self.store = store
        images = hashlib.sha256()
        for t in (test.x, test.y):
            images.update(str(tuple(t.shape)).encode())
            images.update(t.detach().cpu().contiguous().view(torch.uint8).reshape(-1).numpy().tobytes())
        self.shared = {"protocol": protocol, "surrogate": state.digest(target.model),
                       "surrogate_class": f"{type(target.model).__module__}.{type(target.model).__qualname__}",
                       "batch_dependent": bool(target.batch_dependent), "randomized": bool(target.randomized),
                       "seed": seed, "batch_size": batch_size, "test": images.hexdigest(), "device": device.type,
                       "torch": torch.__version__}

    def key(self, label: str, attack: Attack) -> str:
        parts = {**self.shared, "attack": f"{type(attack).__module__}.{type(attack).__qualname__}",
                 "attack_source": _source_digest(type(attack)), "label": label,
                 "params": repr(sorted(attack.params.items()))}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]

    def _relpath(self, key: str) -> str:
        return f"{CRAFTED_DIR}/{key}.npz"

    def load(self, key: str, test: Split) -> Crafted | None:
        """The cell crafted under `key`, or None (absent, or unreadable: then it is crafted again)."""
        # through the store, which wrote it: a run on a Ray worker has its own `out`, the driver's holds the files
        name = self._relpath(key)
        try:
            data = self.store.read_file(name)
            if data is None:
                return None
            # headers checked before allocating, never a pickle: the results folder is the user's, files and all
            f = read_npz(io.BytesIO(data), f"crafted images {name}")
            x_adv = torch.from_numpy(np.array(f["x_adv"], dtype=np.float32))
            extra = json.loads(str(f["extra"]))
            found = Crafted(x_adv, extra if isinstance(extra, dict) else {}, bool(f["state_changed"]),
                            float(f["seconds"]), str(f["run_id"]))
        except (BenchError, OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
            log.warning("crafted images %s unreadable (%s): crafting them again", name, exc)
            return None
        if tuple(found.x_adv.shape) != tuple(test.x.shape):
            log.warning("crafted images %s have shape %s, not the test split's: crafting them again", name,
                        tuple(found.x_adv.shape))
            return None
        return found

    def save(self, key: str, x_adv: torch.Tensor, extra: dict, state_changed: bool, seconds: float,
             run_id: str) -> None:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, x_adv=x_adv.float().cpu().numpy(), extra=np.array(json.dumps(extra, default=str)),
                            state_changed=np.array(bool(state_changed)), seconds=np.array(float(seconds)),
                            run_id=np.array(run_id))
        self.store.write_file(self._relpath(key), buffer.getvalue())
