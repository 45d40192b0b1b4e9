"""Plot settings: the file ``taxoclass calibrate-plots`` writes, and what a report runs with.

:class:`PlotSettings` is ``plot_settings.json`` (``data_schemas/plot_settings.schema.json``;
plain JSON, no pickle): the chosen rule, every compared rule's thresholds, tile settings
and calibration F1, the learned rule's parameters, grids and overlap.
:func:`resolve_report_settings` turns such a file (or none) and the options given
explicitly into the :class:`ReportSettings` a plot report runs with.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import ConfigError
from ..io.provenance import write_json_output
from .learned import LearnedPlotRule
from .selection import LEARNED, RULES, TileSettings
from .tiling import grid_label

__all__ = [
    "SETTINGS_FILE",
    "TABLE_FILE",
    "PlotSettings",
    "ReportSettings",
    "resolve_report_settings",
]

SETTINGS_FILE = "plot_settings.json"
TABLE_FILE = "plot_calibration.csv"
SCHEMA_NAME = "plot_settings.schema.json"
SETTINGS_FORMAT = "taxoclass-plot-settings"
FORMAT_VERSION = 1


@dataclass
class PlotSettings:
    """Plot-report settings chosen on calibration plots (``plot_settings.json``).

    ``rule``: the chosen rule; ``calibration``: one row per rule compared, with its
    thresholds, tile settings (``tiles``, :class:`TileSettings`), calibration macro F1
    per plot at every rank and how that F1 was measured (``evaluation``: ``"in-sample"``,
    or ``"out-of-fold (k=5)"`` for the learned rule); ``chosen`` marks the winner.
    ``learned``: the fitted learned rule (always kept); ``source``: the file it was read
    from, if any. Files written before tile settings and ``evaluation`` were recorded
    read as the defaults and ``"in-sample"``.
    """

    rule: str
    grids: list[str]
    overlap: float
    calibration: list[dict[str, Any]]
    learned: LearnedPlotRule | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None

    def thresholds_for(self, rule: str) -> dict[str, float] | None:
        """The calibrated thresholds of ``rule`` (None if it was not calibrated)."""
        for row in self.calibration:
            if row["rule"] == rule:
                return dict(row["thresholds"])
        return None

    def tiles_for(self, rule: str) -> TileSettings | None:
        """The calibrated tile settings of ``rule`` (None if it was not calibrated)."""
        for row in self.calibration:
            if row["rule"] == rule:
                return TileSettings.from_dict(row.get("tiles"))
        return None

    @property
    def thresholds(self) -> dict[str, float]:
        return self.thresholds_for(self.rule) or {}

    @property
    def tiles(self) -> TileSettings:
        return self.tiles_for(self.rule) or TileSettings()

    def table(self) -> pd.DataFrame:
        """The per-rule calibration table: F1 per rank, how it was measured, thresholds
        per rank, tile settings, chosen."""
        rows = []
        for row in self.calibration:
            flat: dict[str, Any] = {"rule": row["rule"]}
            ranks = list(row["macro_f1_per_plot"])[::-1]  # lowest rank first
            flat.update({f"{r}_f1": row["macro_f1_per_plot"][r] for r in ranks})
            flat["evaluation"] = row.get("evaluation", "in-sample")
            flat.update({f"{r}_threshold": row["thresholds"][r] for r in ranks})
            flat.update(TileSettings.from_dict(row.get("tiles")).to_dict())
            flat["chosen"] = bool(row["rule"] == self.rule)
            rows.append(flat)
        table = pd.DataFrame(rows)
        if len(table):
            table["top_k"] = table["top_k"].astype("Int64")  # None: every class
        return table

    def to_dict(self) -> dict[str, Any]:
        return {"format": SETTINGS_FORMAT, "format_version": FORMAT_VERSION,
                "rule": self.rule, "thresholds": self.thresholds,
                "tiles": self.tiles.to_dict(), "grids": list(self.grids),
                "overlap": float(self.overlap),
                "calibration": [{**row, "chosen": row["rule"] == self.rule}
                                for row in self.calibration],
                "learned": self.learned.to_dict() if self.learned is not None else None,
                "provenance": dict(self.provenance)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: Path | None = None) -> PlotSettings:
        where = str(source) if source else "plot settings"
        errors = sorted(_validator().iter_errors(data), key=lambda e: list(e.absolute_path))
        if errors:
            e = errors[0]
            path = "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}"
                                 for p in e.absolute_path)
            raise ConfigError(f"{where}: {path}: {e.message}. Expected a plot_settings.json "
                              "written by `taxoclass calibrate-plots` (schema "
                              f"{SCHEMA_NAME}); re-run it.")
        learned = LearnedPlotRule.from_dict(data["learned"]) if data.get("learned") else None
        rows = [{"evaluation": "in-sample", **{k: v for k, v in row.items() if k != "chosen"}}
                for row in data["calibration"]]
        for row in rows:  # files from before tile settings: the defaults
            row["tiles"] = TileSettings.from_dict(row.get("tiles")).to_dict()
        return cls(rule=data["rule"], grids=list(data["grids"]), overlap=float(data["overlap"]),
                   calibration=rows, learned=learned, provenance=dict(data.get("provenance", {})),
                   source=source)

    def save(self, path: str | Path) -> Path:
        """Write ``plot_settings.json`` (``path`` is the file, or a folder to hold it)."""
        path = Path(path)
        if path.suffix.lower() != ".json":
            path = path / SETTINGS_FILE
        return write_json_output(path, self.to_dict(),
                                 model_id=self.provenance.get("model_id"))

    @classmethod
    def load(cls, path: str | Path) -> PlotSettings:
        """Read and validate ``plot_settings.json`` (a file, or the folder holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / SETTINGS_FILE
        if not path.is_file():
            raise ConfigError(f"{path}: no such settings file. Expected the plot_settings.json "
                              "written by `taxoclass calibrate-plots --out DIR`.")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc}). Expected a plot_settings.json "
                              "written by `taxoclass calibrate-plots`.") from exc
        return cls.from_dict(data, source=path)


def _validator():
    import jsonschema

    from ..io.schemas import load_schema

    return jsonschema.Draft202012Validator(load_schema(SCHEMA_NAME))


# ---------------------------------------------------------------------- report settings
@dataclass
class ReportSettings:
    """The settings a plot report runs with, after a settings file and explicit options.

    ``top_k``/``min_tile_prob``/``min_tiles``: the tile settings for
    :func:`~taxoclass.plots.rules.aggregate_plot`; ``source``: the settings file (None without
    one); ``overridden``: options given explicitly that replaced the file's values.
    """

    rule: str
    thresholds: dict[str, float] | None
    grids: list[str]
    overlap: float
    learned: LearnedPlotRule | None = None
    source: str | None = None
    overridden: list[str] = field(default_factory=list)
    top_k: int | None = None
    min_tile_prob: float = 0.0
    min_tiles: int = 1


def resolve_report_settings(settings: PlotSettings | str | Path | None = None, *,
                            grids: Sequence[Any] | None = None, overlap: float | None = None,
                            rule: str | None = None,
                            thresholds: Mapping[str, float] | None = None,
                            top_k: int | None = None, min_tile_prob: float | None = None,
                            min_tiles: int | None = None) -> ReportSettings:
    """Grids, overlap, rule, thresholds and tile settings from ``settings`` (a
    :class:`PlotSettings` or its file), each replaced by the explicit value when one is
    given (thresholds rank by rank; ``top_k=0``: every class, over the file's value).
    The thresholds and tile settings are those calibrated for the rule used. Without
    settings: the plot-report defaults (3x3, no overlap, ``max``, no ``top_k``, no tile
    gate, one supporting tile). The ``learned`` rule needs settings that hold its
    parameters and its grids."""
    if settings is not None and not isinstance(settings, PlotSettings):
        settings = PlotSettings.load(settings)
    if rule is not None and rule not in RULES and rule != LEARNED:
        raise ConfigError(f"Unknown aggregation rule {rule!r}; expected one of "
                          f"{(*RULES, LEARNED)}.")
    if top_k is not None and int(top_k) < 0:
        raise ConfigError(f"top_k must be at least 1, or 0 for every class; got {top_k}.")
    given = [k for k, v in (("grids", grids), ("overlap", overlap), ("rule", rule),
                            ("thresholds", thresholds), ("top_k", top_k),
                            ("min_tile_prob", min_tile_prob), ("min_tiles", min_tiles))
             if v is not None and v != () and v != {}]
    base = TileSettings() if settings is None else \
        (settings.tiles_for(rule or settings.rule) or TileSettings())
    tile = TileSettings(
        top_k=base.top_k if top_k is None else (int(top_k) or None),
        min_tile_prob=base.min_tile_prob if min_tile_prob is None else float(min_tile_prob),
        min_tiles=base.min_tiles if min_tiles is None else int(min_tiles))
    tile_kw = {"top_k": tile.top_k, "min_tile_prob": float(tile.min_tile_prob),
               "min_tiles": int(tile.min_tiles)}
    if settings is None:
        if rule == LEARNED:
            raise ConfigError("Rule 'learned' needs its fitted parameters: pass the "
                              "plot_settings.json written by `taxoclass calibrate-plots` "
                              "(--settings), or choose another rule.")
        return ReportSettings(rule=rule or "max",
                              thresholds=dict(thresholds) if thresholds else None,
                              grids=[grid_label(g) for g in (grids or (3,))],
                              overlap=float(overlap or 0.0), **tile_kw)
    chosen = rule or settings.rule
    th = dict(settings.thresholds_for(chosen) or {})
    th.update({str(k): float(v) for k, v in (thresholds or {}).items()})
    grid_labels = [grid_label(g) for g in grids] if grids else list(settings.grids)
    learned = None
    if chosen == LEARNED:
        learned = settings.learned
        where = settings.source or "the settings"
        if learned is None:
            raise ConfigError(f"{where} holds no learned-rule parameters, so rule 'learned' "
                              "cannot run; re-run `taxoclass calibrate-plots`, or choose "
                              "another rule.")
        if sorted(grid_labels) != sorted(learned.grids):
            raise ConfigError(f"The learned rule in {where} was fitted on the grids "
                              f"{list(learned.grids)}; --grid {grid_labels} cannot be used with "
                              "it. Drop --grid, or choose another rule.")
    return ReportSettings(rule=chosen, thresholds=th or None, grids=grid_labels,
                          overlap=float(settings.overlap if overlap is None else overlap),
                          learned=learned,
                          source=str(settings.source) if settings.source else "(in memory)",
                          overridden=given, **tile_kw)
