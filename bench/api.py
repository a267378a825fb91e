"""The public API of bnbench: everything a plugin (defense, attack or report) needs, and all it may use.

Plugins, the built-in ones too, import only from here. The names below keep their meaning across
versions; anything else in `bench` is internal and may change without notice. README.md's "Writing a
plugin" is the contract in prose.

- The contract: `Defense`, `Attack`, `Defended`, `Surrogate`, `Param`, `threat_params` (an attack's norm and its
  budget following it), `Context` (what a defense sees of its run),
  `ReportContext` (what a report sees of a leaderboard), `BenchError` (a user-facing error).
- Attacking: `pgd`, `project`, `ce_loss`, `cw_loss`, `best_of`, and `finish` for attacks that hand the
  model to a library which re-batches survivors (with `Attack.composed`).
- Model state: `preserved`, `FixedModes`.
- Layers: `bn_modules`, `weight_modules`, `module_at`, `module_kind`, `own_parameters`,
  `batch_statistics`, `interpolate_weights`; `build_model` for a fresh network of the run's architecture.
- Training: `train`, `TrainSpec`, `Schedule`, `Objective`, `Clean`, `PGDAdversarial`, `TRADES`,
  `trades_attack`, `preset_spec`, `finetune_spec`, `accuracy`, `robust_accuracy`, `autocast_factory`, `derived_seed`.
- Reports: `delta_text`, `line_figure`, `bar_figure`, `density_figure`, `embed_figure`; `markdown_text` and
  `markdown_code` (a name, label or parameter value as markdown that shows it as it is: no markup, link or
  table column from it) and `Markdown` (text that is markdown already). `rc.table(columns, rows)` writes a
  table escaping every cell but `Markdown`.
- Datasets: a loader (`bench.datasets` group) takes a `DataRequest` and returns `LoadedData` with its
  `DatasetSpec`.

This module only gathers names: it sits at the top of the core, and no module of `bench` imports it.
"""

from __future__ import annotations

import importlib

from bench.composition import finish
from bench.config import derived_seed
from bench.context import Context
from bench.contract import Attack, Defended, Defense, Surrogate, threat_params
from bench.data import DataRequest, DatasetSpec, LoadedData
from bench.errors import BenchError
from bench.layers import (batch_statistics, bn_modules, interpolate_weights, module_at, module_kind, own_parameters,
                          weight_modules)
from bench.models import build_model
from bench.params import Param
from bench.projected_gradient import best_of, ce_loss, cw_loss, pgd, project
from bench.state import FixedModes, preserved
from bench.train import (TRADES, Clean, Objective, PGDAdversarial, Schedule, TrainSpec, accuracy, autocast_factory,
                         finetune_spec, preset_spec, robust_accuracy, trades_attack, train)

__all__ = [
    # the contract
    "Attack", "BenchError", "Context", "Defended", "Defense", "Param", "ReportContext", "Surrogate", "threat_params",
    # attacking
    "best_of", "ce_loss", "cw_loss", "finish", "pgd", "project",
    # model state
    "FixedModes", "preserved",
    # layers and models
    "batch_statistics", "bn_modules", "build_model", "interpolate_weights", "module_at", "module_kind",
    "own_parameters", "weight_modules",
    # training
    "Clean", "Objective", "PGDAdversarial", "Schedule", "TRADES", "TrainSpec", "accuracy", "autocast_factory",
    "derived_seed", "finetune_spec", "preset_spec", "robust_accuracy", "trades_attack", "train",
    # reports
    "Markdown", "bar_figure", "delta_text", "density_figure", "embed_figure", "line_figure", "markdown_code",
    "markdown_text",
    # datasets
    "DataRequest", "DatasetSpec", "LoadedData",
]

# The report helpers load pandas and matplotlib (the markdown ones: pandas, through bench.markdown_reader):
# imported on first use, so that loading a plugin (every command does) never pays for them.
_ON_FIRST_USE = {
    "ReportContext": ("bench.leaderboard", "ReportContext"), "delta_text": ("bench.leaderboard", "delta_text"),
    "line_figure": ("bench.figures", "lines"), "bar_figure": ("bench.figures", "bars"),
    "density_figure": ("bench.figures", "densities"), "embed_figure": ("bench.figures", "embed"),
    "Markdown": ("bench.report_markdown", "Markdown"), "markdown_text": ("bench.report_markdown", "markdown_text"),
    "markdown_code": ("bench.report_markdown", "markdown_code"),
}


def __getattr__(name: str):
    if name not in _ON_FIRST_USE:
        raise AttributeError(f"module 'bench.api' has no attribute '{name}'")
    module, attr = _ON_FIRST_USE[name]
    value = globals()[name] = getattr(importlib.import_module(module), attr)
    return value
