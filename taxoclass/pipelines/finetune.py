"""The fine-tuning job: a config (or images and targets) in, a model bundle on disk out.

:func:`taxoclass.model.finetune.finetune` trains; this module writes what it trained as a
bundle (``backbone.pth``, the fine-tuned backbone as a plain timm state dict, which
:func:`~taxoclass.features.backbones.create_backbone` reads with
``torch.load(weights_only=True)``, named as the recipe's ``checkpoint``; the head through
:meth:`ModelBundle.save`) and runs ``taxoclass train --finetune``
(:func:`finetune_from_config`): split, LP-FT probe heads, fine-tuning, validation metrics
and the open-set scorer on embeddings of the fine-tuned backbone.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..bundle import ModelBundle
from ..config import FinetuneSettings, complete_config, openset_calibration
from ..errors import ConfigError
from ..io.files import (
    atomic_write_csv,
    check_output_folder,
    output_folder,
    recover_output_folder,
)
from ..model import distributed as dist
from ..model.checkpoint import atomic_torch_save, state_to_cpu
from ..model.finetune import STATE_DIR, FinetuneResult, finetune
from ..model.heads import MultiRankHead
from ..model.image_data import LabelledImages, embed_image_files
from ..taxonomy.tree import Taxonomy
from ..vocab import Calibration
from .data import (
    config_embeddings,
    embedding_cache,
    known_rows,
    require_training_settings,
    validation_mask,
    view_embeddings,
    with_views,
)

__all__ = ["BACKBONE_FILE", "finetune_from_config", "finetune_to_bundle",
           "write_finetuned_bundle"]

Progress = Callable[[int, int], None]

BACKBONE_FILE = "backbone.pth"


# --------------------------------------------------------------------------- the bundle
def write_finetuned_bundle(result: FinetuneResult, out: str | Path, taxonomy: Taxonomy, *,
                           decode_method: str = "path",
                           extra: Mapping[str, Any] | None = None) -> Path:
    """Write a completed fine-tuning ``result`` as a model bundle in ``out`` (plus
    ``history.csv``) as one unit (a staged folder swapped in; the run's checkpoints in
    ``out/finetune_state`` are carried over), set ``result.bundle_dir`` /
    ``backbone_checkpoint``, and drop the run's checkpoints unless ``keep_checkpoints``."""
    out = Path(out)
    with output_folder(out, keep=(STATE_DIR,)) as stage:
        _write_bundle_files(result, stage, taxonomy, decode_method=decode_method, extra=extra)
    return _finish(result, out)


def _write_bundle_files(result: FinetuneResult, folder: Path, taxonomy: Taxonomy, *,
                        decode_method: str, extra: Mapping[str, Any] | None) -> None:
    """The bundle (``backbone.pth`` + head parts) and ``history.csv`` into ``folder``."""
    if not result.completed:
        raise ValueError(f"write_finetuned_bundle: the run was paused after {result.steps} "
                         f"steps (max_steps); resume it before writing a bundle.")
    bb, clf = result.backbone, result.model
    atomic_torch_save(state_to_cpu(clf.backbone.state_dict()), folder / BACKBONE_FILE)
    head = copy.deepcopy(clf.head).cpu().eval()
    recipe = {"name": bb.name, "checkpoint": BACKBONE_FILE, "pretrained": False,
              "class_mapping": None, "model_kwargs": dict(bb.model_kwargs or {}),
              "data_overrides": dict(bb.data_overrides or {}), "finetuned": True,
              "base_checkpoint": bb.checkpoint,
              "base_weights_source": bb.weights_source, "base_description": bb.describe()}
    info = {"settings": asdict(result.settings), "views": result.views,
            "best_epoch": result.best_epoch, "steps": result.steps,
            "stopped_early": result.stopped_early, "lr_groups": result.lr_groups,
            "frozen": result.frozen}
    bundle = ModelBundle(head=head, taxonomy=taxonomy, backbone=recipe,
                         normalize=clf.normalize, decode_method=decode_method,
                         extra={**dict(extra or {}), "finetune": info,
                                "best_epoch": result.best_epoch})
    bundle.write(folder)
    atomic_write_csv(folder / "history.csv", result.history)


def _finish(result: FinetuneResult, out: Path) -> Path:
    """After the bundle folder is in place: record it and drop the run's checkpoints."""
    result.bundle_dir = out
    result.backbone_checkpoint = out / BACKBONE_FILE
    result.discard_state()
    return out


def finetune_to_bundle(train: LabelledImages, val: LabelledImages | None,
                       taxonomy: Taxonomy, *, out_dir: str | Path,
                       decode_method: str = "path", extra: Mapping[str, Any] | None = None,
                       **kwargs: Any) -> FinetuneResult:
    """:func:`~taxoclass.model.finetune.finetune` (same arguments), then, when the run
    completed (not paused by ``max_steps``), :func:`write_finetuned_bundle` in ``out_dir``
    (by process 0 alone when the caller initialised a process group)."""
    result = finetune(train, val, taxonomy, out_dir=out_dir, **kwargs)
    if result.completed and dist.current().is_main:
        write_finetuned_bundle(result, out_dir, taxonomy, decode_method=decode_method,
                               extra=extra)
    return result


# --------------------------------------------------------------------------- config job
def _probe_head(cfg: Mapping[str, Any], rows: pd.DataFrame, y: Mapping[str, np.ndarray],
                train: np.ndarray, taxonomy: Taxonomy,
                embed_progress: Progress | None = None) -> MultiRankHead:
    """Heads trained on the frozen backbone's embeddings of the ``train`` rows (and their
    tile-like views when ``augment.views_per_image > 0``) with the config's ``train``
    settings: the linear-probe start of LP-FT, from the same caches `taxoclass train`
    uses. Rows without an embedding (unreadable images) are left out."""
    from ..model.training import train_head

    x, found, _ = config_embeddings(dict(cfg), rows, progress=embed_progress)
    tr = train & found
    tr_idx = np.flatnonzero(tr)
    xv, src = view_embeddings(dict(cfg), rows.iloc[tr_idx].reset_index(drop=True),
                              progress=embed_progress)
    x_tr, y_tr = with_views(x, dict(y), tr, (xv, tr_idx[src]))
    return train_head(x_tr, y_tr, None, None, taxonomy, model=cfg["model"], loss=cfg["loss"],
                      train=cfg["train"],
                      normalize_inputs=bool(cfg["model"]["normalize"])).head


def _view_section(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The config's ``augment`` section as view settings (``dir`` is where the cheap path
    writes its view files; fine-tuning draws fresh views in memory instead)."""
    return {k: v for k, v in dict(cfg.get("augment") or {}).items() if k != "dir"}


def _detector_views(cfg: Mapping[str, Any], rows: pd.DataFrame, settings: FinetuneSettings
                    ) -> tuple[pd.DataFrame, np.ndarray] | None:
    """Tile-like view files of the training ``rows`` for the outlier detector of a model
    trained for plots (``augment.views_per_image`` views each, or ``tile_views`` when only
    those are set; the same files the probe heads use), as (frame of view files, index
    into ``rows`` of each view's source); None when the config makes no views."""
    from ..features.views import ViewSettings, write_views

    section = _view_section(cfg)
    n = int(section["views_per_image"] or 0) or int(settings.tile_views)
    if n == 0 or not len(rows):
        return None
    folder = (cfg["augment"]["dir"]
              or f"{embedding_cache(dict(cfg))}-views")
    ids = [str(i) for i in rows["image_id"]]
    frame = write_views(list(zip(ids, rows["path"].tolist())), folder,
                        ViewSettings.from_mapping({**section, "views_per_image": n}))
    index = {i: k for k, i in enumerate(ids)}
    return frame, np.array([index[str(i)] for i in frame["source_id"]], dtype=int)


@dataclass
class _Job:
    """What the config job prepared: the rows, their targets and the split."""

    cfg: dict[str, Any]
    data: dict[str, Any]
    settings: FinetuneSettings
    taxonomy: Taxonomy
    rows: pd.DataFrame
    y: dict[str, np.ndarray]
    ids: list[str]
    is_val: np.ndarray
    paths: np.ndarray
    device: str

    def part(self, mask: np.ndarray) -> LabelledImages:
        return LabelledImages(list(self.paths[mask]), {r: v[mask] for r, v in self.y.items()})


def _prepare(cfg: Mapping[str, Any], device: str | None) -> _Job:
    """Check the config and read the annotations, the labels and the validation split."""
    from ..model.splits import group_codes
    from ..taxonomy.annotations import load_annotations
    from ..taxonomy.labels import encode_labels

    cfg = dict(cfg)
    data = require_training_settings(cfg)
    if openset_calibration(cfg.get("openset"))[0] == Calibration.CROSSFIT:
        raise ConfigError("openset.calibration: crossfit is not supported with `train "
                          "--finetune` (it would fine-tune the backbone once per fold). Fix: "
                          "--set openset.calibration=holdout.")
    settings = FinetuneSettings.from_mapping(cfg.get("finetune"))
    root = Path(data.get("images_root") or Path(data["annotations"]).parent)
    ann = load_annotations(data["annotations"], allow_outside_root=data.get("allow_outside_root"))
    group_by = data.get("group_by")
    tax, rows = known_rows(ann, ann.labelled_images(root, group_by=group_by), data)
    y, nodes = encode_labels(tax, rows)
    ids = [str(i) for i in rows["image_id"]]
    groups = group_codes(rows["group"], group_by) if group_by else None
    return _Job(cfg=cfg, data=data, settings=settings, taxonomy=tax, rows=rows, y=y, ids=ids,
                is_val=validation_mask(ids, nodes, data, groups=groups),
                paths=np.asarray(rows["path"].tolist(), dtype=object),
                device=str(dist.resolve_device(device)))


def _embed(job: _Job, result: FinetuneResult, paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of ``paths`` by the fine-tuned backbone (and an ok mask)."""
    s = job.settings
    return embed_image_files(result.model, paths, result.backbone.transform,
                             batch_size=s.batch_size, num_workers=s.num_workers,
                             device=job.device)


def _select(job: _Job, x_tr: np.ndarray, ok_tr: np.ndarray, x_val: np.ndarray,
            ok_val: np.ndarray):
    """The open-set recipe (``openset.recipe``) chosen on the fine-tuned embeddings of the
    training and validation images (:func:`~taxoclass.openset.selection.select_recipe`:
    its round heads are linear heads on these embeddings, a proxy for the fine-tuned
    model's own head, which is linear on the same features)."""
    from ..model.splits import group_codes
    from ..openset.selection import select_recipe

    is_val = job.is_val
    idx = np.concatenate([np.flatnonzero(~is_val)[ok_tr], np.flatnonzero(is_val)[ok_val]])
    x = np.concatenate([x_tr[ok_tr], x_val[ok_val]])
    rows = job.rows.iloc[idx].reset_index(drop=True)
    group_by = job.data.get("group_by")
    groups = group_codes(rows["group"], group_by) if group_by else None
    return select_recipe(x, {r: v[idx] for r, v in job.y.items()}, rows, job.taxonomy,
                         job.cfg, seed=int(job.data.get("split_seed") or 0), groups=groups)


def _fit_scorer(job: _Job, result: FinetuneResult, bundle: ModelBundle, x_val: np.ndarray,
                ok_val: np.ndarray, ocfg: Mapping[str, Any]) -> dict[str, Any]:
    """The outlier detector on the fine-tuned embeddings of the training images (and,
    for a plot model, of tile-like views of them), the recipe chosen on the training and
    validation images (``openset.recipe``), the thresholds on the validation set or, for a
    chosen recipe, on the selection rounds. Returns the selection record (empty: none)."""
    from ..openset.scorer import group_rank_of
    from .openset_fit import apply_selection, fit_openset_scorer

    tax, is_val, y = job.taxonomy, job.is_val, job.y
    x_tr, ok_tr = _embed(job, result, list(job.paths[~is_val]))
    selection = _select(job, x_tr, ok_tr, x_val, ok_val)
    ocfg = selection.openset_config(ocfg)
    x_det = x_tr[ok_tr]
    y_det = {r: v[~is_val][ok_tr] for r, v in y.items()}
    # A model for plot tiles: the detector also learns what tile-like views of the
    # training images look like, or every tile of a plot would be "unknown".
    views = _detector_views(job.cfg, job.rows[~is_val].reset_index(drop=True), job.settings)
    if views is not None:
        frame, src = views
        xv, okv = _embed(job, result, frame["path"].tolist())
        keep = okv & ok_tr[src]
        x_det = np.concatenate([x_det, xv[keep]])
        y_det = {r: np.concatenate([y_det[r], v[~is_val][src[keep]]]) for r, v in y.items()}
    bundle.scorer = fit_openset_scorer(
        bundle, x_det, y_det[group_rank_of(tax.ranks)], x_val[ok_val],
        job.rows[is_val].reset_index(drop=True)[ok_val], dict(ocfg),
        species_train=y_det[tax.ranks[-1]])
    calibration: dict[str, Any] = {"calibration": "holdout"}
    apply_selection(bundle, selection, calibration,
                    (x_val[ok_val], job.rows[is_val].reset_index(drop=True)[ok_val]))
    return {"openset_selection": selection.record, "openset_calibration": calibration}


def _validation_metrics(job: _Job, result: FinetuneResult, out: Path) -> dict[str, Any]:
    """Metrics of the written bundle on the validation images (embedded by the fine-tuned
    backbone) and, with ``openset.enabled``, the open-set scorer fitted and saved."""
    from ..model.metrics import evaluate_predictions

    is_val = job.is_val
    if not is_val.any():
        return {}
    bundle = ModelBundle.load(out)
    x_val, ok = _embed(job, result, list(job.paths[is_val]))
    decoded = bundle.predict_embeddings(x_val[ok], top_k=int(
        job.cfg["decode"]["top_k"]))
    metrics = evaluate_predictions(decoded.path, {r: v[is_val][ok] for r, v in job.y.items()},
                                   job.taxonomy, topk_index=decoded.topk_index,
                                   head_argmax=decoded.head_argmax)
    ocfg = job.cfg.get("openset") or {}
    if ocfg["enabled"]:
        chosen = _fit_scorer(job, result, bundle, x_val, ok, ocfg)
        bundle.extra.update(chosen)
        bundle.write(out)
        metrics["openset_thresholds"] = bundle.scorer.thresholds.to_dict()
        metrics.update(chosen)
    return metrics


def finetune_from_config(cfg: Mapping[str, Any], *, progress: Progress | None = None,
                         device: str | None = None,
                         embed_progress: Progress | None = None) -> Path | None:
    """``taxoclass train --finetune``: fine-tune as configured and write the bundle.

    Uses the ``data``, ``backbone``, ``model``, ``loss``, ``decode`` and ``out`` sections
    like :func:`~taxoclass.pipelines.train.train_from_config` (same split rules) plus the
    ``finetune`` section. Writes ``split.csv``, ``metrics_val.json``, ``failures.csv``
    (unreadable images, if any) and ``provenance.json`` beside the bundle; the
    validation metrics come from the written bundle on embeddings of the fine-tuned
    backbone. As for heads on cached embeddings, ``data.holdout_species`` are left out
    and (``openset.enabled``) the outlier detector and the back-off thresholds are
    fitted, on embeddings of the training and validation images by the fine-tuned
    backbone. A run paused by ``finetune.max_steps`` returns before any of that.

    Launched by ``torchrun`` (``RANK``/``WORLD_SIZE`` set), every process runs this: the
    process group (NCCL on CUDA, gloo on the CPU; ``cuda`` means ``cuda:LOCAL_RANK``) lives
    for the call, process 0 alone computes the probe heads (DDP hands its weights to the
    others), reports progress and writes every file; the other processes return None
    once training is done (``docs/distributed.md``).
    """
    with dist.process_group(device) as info:
        return _finetune_job(complete_config(cfg), info, progress, device, embed_progress)


def _finetune_job(cfg: dict[str, Any], info: dist.DistInfo, progress: Progress | None,
                  device: str | None, embed_progress: Progress | None) -> Path | None:
    """:func:`finetune_from_config` in this process (one of ``info.world_size``)."""
    from ..features.backbones import backbone_from_spec, backbone_spec

    out = Path(cfg["out"])
    if info.is_main:
        check_output_folder(out)  # before any work: an unusable --out fails at once
        recover_output_folder(out, keep=(STATE_DIR,))
    else:
        progress = embed_progress = None
    job = _prepare(cfg, device)
    cfg, s, is_val = job.cfg, job.settings, job.is_val
    with dist.main_first():  # weights downloaded (and cached) once
        bb = backbone_from_spec(backbone_spec(cfg["backbone"]))
    head_init = (_probe_head(cfg, job.rows, job.y, ~is_val, job.taxonomy, embed_progress)
                 if s.probe_head and info.is_main else None)
    result = finetune(
        job.part(~is_val), job.part(is_val), job.taxonomy, backbone=bb, out_dir=out,
        settings=s, model=cfg.get("model"), loss=cfg.get("loss"), device=job.device,
        progress=progress, views=_view_section(cfg), head_init=head_init)
    if not info.is_main:
        return None  # process 0 writes the bundle and the records
    if not result.completed:
        return out  # paused (max_steps): only the checkpoints in out/finetune_state
    with output_folder(out, keep=(STATE_DIR,)) as stage:
        _write_bundle_files(result, stage, job.taxonomy, decode_method=cfg["decode"]["method"],
                            extra={"annotations": str(Path(job.data["annotations"]).resolve())})
        _write_records(job, result, stage, bb)
    _finish(result, out)
    return out


def _write_records(job: _Job, result: FinetuneResult, stage: Path, bb) -> None:
    """split, failures, validation metrics (and the open-set scorer), provenance."""
    from ..io.provenance import model_id_of, write_json_output, write_provenance

    cfg, is_val = job.cfg, job.is_val
    split = pd.DataFrame({"image_id": job.ids, "split": np.where(is_val, "val", "train")})
    if job.data.get("group_by"):
        split["group"] = job.rows["group"].to_numpy()  # data.group_by value (empty: none)
    atomic_write_csv(stage / "split.csv", split)
    if result.failures:
        atomic_write_csv(stage / "failures.csv", pd.DataFrame(result.failures,
                                                              columns=["path", "error"]))
    metrics = _validation_metrics(job, result, stage)
    metrics["best_epoch"] = result.best_epoch
    parts = json.loads((stage / "bundle.json").read_text(encoding="utf-8")).get("parts")
    write_json_output(stage / "metrics_val.json", metrics,  # the one output header first
                      model_id=model_id_of(parts) if parts else None)
    write_provenance(stage, config=cfg, backbone=bb.describe(), extra={
        "finetune": {"best_epoch": result.best_epoch, "steps": result.steps,
                     "stopped_early": result.stopped_early, "seconds": result.seconds,
                     "images_per_second": result.images_per_second,
                     "n_train": int((~is_val).sum()), "n_val": int(is_val.sum())}})
