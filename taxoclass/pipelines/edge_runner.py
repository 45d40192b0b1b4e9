#!/usr/bin/env python3
"""Run a model exported by ``taxoclass export --format onnx`` with onnxruntime, numpy and
Pillow only (no torch, no taxoclass): on a Raspberry Pi, a Jetson or any computer.

    pip install onnxruntime numpy pillow
    python taxoclass_onnx_predict.py --model model.onnx photos/ --out predictions.csv

``model.json`` (beside ``model.onnx``) holds the taxonomy, the preprocessing, the back-off
thresholds and the confidence calibration. Each image is read and preprocessed as
taxoclass does (EXIF orientation, 16-bit scaling, the backbone's resize / letterbox /
crop and normalisation), the graph gives per-rank logits, coherent probabilities and the
outlier score, then the best path is backed off to the lowest rank whose evidence passes
its threshold. The rows have the columns of ``taxoclass predict`` (image, taxon_rank,
taxon, confidence, score, reason, outlier, outlier_score, <rank>, <rank>_prob,
<rank>_top5; an unreadable file gets reason ``failed`` and an ``error``).

This file is written by ``taxoclass export`` (source: ``taxoclass/pipelines/edge_runner.py``);
it imports nothing from taxoclass.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

META_FORMAT = "taxoclass-onnx"
META_VERSION = 1
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif")
MIN_SIDE = 8
_ORIENTATION = 0x0112
_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
             "box": Image.BOX, "hamming": Image.HAMMING, "lanczos": Image.LANCZOS}


class ExportedModelError(Exception):
    """The exported files are missing, damaged or do not belong together."""


# ---------------------------------------------------------------------- images
def open_image(path: str | Path) -> Image.Image:
    """Decode ``path`` as an upright ``"L"`` or ``"RGB"`` image with 8 bits per channel."""
    path = Path(path)
    if not path.is_file():
        raise OSError(f"Image {str(path)!r} does not exist or is not a file.")
    with Image.open(path) as img:
        w, h = img.size
        if Image.MAX_IMAGE_PIXELS is not None and w * h > Image.MAX_IMAGE_PIXELS:
            raise OSError(f"Image {str(path)!r} is too large: {w}x{h} pixels.")
        if min(w, h) < MIN_SIDE:
            raise OSError(f"Image {str(path)!r} is {w}x{h} px; at least {MIN_SIDE} px needed.")
        img.load()
        out = _to_rgb(_upright(img))
        return img.copy() if out is img else out


def _upright(img: Image.Image) -> Image.Image:
    try:
        orientation = img.getexif().get(_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - broken EXIF: the pixels are still usable
        return img
    return ImageOps.exif_transpose(img) if orientation in (2, 3, 4, 5, 6, 7, 8) else img


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("L", "RGB"):
        return img
    if img.mode in _HIGH_BIT_MODES:
        return Image.fromarray(_to_8bit(np.asarray(img), img.mode), mode="L")
    return img.convert("RGB")


def _to_8bit(arr: np.ndarray, mode: str) -> np.ndarray:
    x = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if mode.startswith("I;16"):
        top, lo = 65535.0, 0.0
    elif mode == "F" and lo >= 0.0 and hi <= 1.0:
        top, lo = 1.0, 0.0
    elif lo >= 0.0 and hi <= 255.0:
        top, lo = 255.0, 0.0
    elif lo >= 0.0 and hi <= 65535.0:
        top, lo = 65535.0, 0.0
    else:
        top = hi if hi > lo else lo + 1.0
    return np.clip(np.rint((x - lo) * (255.0 / (top - lo))), 0, 255).astype(np.uint8)


def preprocess(img: Image.Image, steps: list[dict]) -> np.ndarray:
    """The backbone's input ``[3, H, W]`` float32 for ``img`` (the exported steps of its
    timm transform; a grey image is resized in one channel, as taxoclass does)."""
    pads = [s["fill"] for s in steps if s["op"] == "center_crop_or_pad"]
    if img.mode != "L" or any(len(set(f)) != 1 for f in pads):
        img = img.convert("RGB")
    arr = None
    for step in steps:
        op = step["op"]
        if op in ("resize", "resize_keep_ratio"):
            size = _resized_size(img.size, step)
            if tuple(size) != (img.size[1], img.size[0]):
                img = img.resize((size[1], size[0]), _RESAMPLE[step["interpolation"]])
        elif op == "center_crop_or_pad":
            img = _center_crop_or_pad(img, step["size"], step["fill"])
        elif op == "to_tensor":
            arr = np.asarray(img)
            arr = arr[:, :, None] if arr.ndim == 2 else arr
            arr = arr.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
            if arr.shape[0] == 1:
                arr = np.repeat(arr, 3, axis=0)
        elif op == "normalize":
            mean = np.asarray(step["mean"], dtype=np.float32)[:, None, None]
            std = np.asarray(step["std"], dtype=np.float32)[:, None, None]
            arr = (arr - mean) / std
        else:
            raise ExportedModelError(f"model.json: unknown preprocessing step {op!r}; "
                                     f"this runner is older than the export.")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _resized_size(wh: tuple[int, int], step: dict) -> list[int]:
    """[h, w] as timm's ResizeKeepRatio / torchvision's Resize compute it."""
    w, h = wh
    if step["op"] == "resize_keep_ratio":
        th, tw = step["size"]
        rh, rw = h / th, w / tw
        ratio = max(rh, rw) * step["longest"] + min(rh, rw) * (1.0 - step["longest"])
        return [round(h / ratio), round(w / ratio)]
    size = step["size"]
    if isinstance(size, int) or len(size) == 1:
        req = size if isinstance(size, int) else size[0]
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = req, int(req * long / short)
        max_size = step.get("max_size")
        if max_size is not None and new_long > max_size:
            new_short, new_long = int(max_size * new_short / new_long), max_size
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        return [new_h, new_w]
    return [size[0], size[1]]


def _center_crop_or_pad(img: Image.Image, size: list[int], fill: list[int]) -> Image.Image:
    ch, cw = size
    w, h = img.size
    if cw > w or ch > h:
        left, top = ((cw - w) // 2 if cw > w else 0), ((ch - h) // 2 if ch > h else 0)
        right, bottom = ((cw - w + 1) // 2 if cw > w else 0), ((ch - h + 1) // 2 if ch > h else 0)
        colour = fill[0] if img.mode == "L" else tuple(fill)
        canvas = Image.new(img.mode, (w + left + right, h + top + bottom), colour)
        canvas.paste(img, (left, top))
        img, (w, h) = canvas, canvas.size
        if (w, h) == (cw, ch):
            return img
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    return img.crop((left, top, left + cw, top + ch))


def collect_images(inputs: list[str]) -> list[Path]:
    """Files as given, folders as their images (sorted, recursively)."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out.extend(q for q in sorted(p.rglob("*")) if q.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(p)
    return out


# ---------------------------------------------------------------------- the model
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_meta(model: str | Path) -> dict:
    """``model.json`` beside ``model`` (``model.onnx``), checked to belong to it."""
    model = Path(model)
    meta_path = model.with_suffix(".json")
    if not meta_path.is_file():
        raise ExportedModelError(f"{meta_path}: missing; copy it with {model.name} (both are "
                                 f"written by taxoclass export).")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format") != META_FORMAT or meta.get("format_version") != META_VERSION:
        raise ExportedModelError(f"{meta_path}: not a taxoclass ONNX export of format "
                                 f"{META_VERSION} (found {meta.get('format')!r} "
                                 f"{meta.get('format_version')!r}).")
    if _sha256(model) != meta["files"]["onnx_sha256"]:
        raise ExportedModelError(f"{model} does not belong to {meta_path.name}: its sha256 "
                                 f"differs (changed, damaged or from another export). Fix: "
                                 f"copy both files of one export again.")
    return meta


class EdgeModel:
    """An exported model: ``predict(paths)`` gives one row (dict) per image."""

    def __init__(self, model: str | Path, *, threads: int = 0) -> None:
        import onnxruntime as ort

        self.path = Path(model)
        self.meta = load_meta(self.path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(self.path), opts,
                                            providers=["CPUExecutionProvider"])
        self.ranks = list(self.meta["taxonomy"]["ranks"])

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """The graph's outputs by name for a preprocessed batch ``[n, 3, H, W]``."""
        values = self.session.run(None, {"image": np.ascontiguousarray(batch, np.float32)})
        return dict(zip(self.meta["outputs"], values))

    def load(self, path: str | Path) -> np.ndarray:
        return preprocess(open_image(path), self.meta["preprocessing"]["steps"])

    def predict(self, paths: list, *, batch_size: int = 8, top_k: int = 5) -> list[dict]:
        rows: list[dict] = []
        for i in range(0, len(paths), max(1, batch_size)):
            chunk, arrays, failed = paths[i:i + batch_size], [], {}
            for k, p in enumerate(chunk):
                try:
                    arrays.append(self.load(p))
                except Exception as exc:  # noqa: BLE001 - one bad file, the batch goes on
                    failed[k] = f"{type(exc).__name__}: {exc}"
            done = iter(self.decide(self.run(np.stack(arrays)), top_k) if arrays else [])
            for k, p in enumerate(chunk):
                row = ({"reason": self.meta["reasons"]["failed"], "outlier": False,
                        "error": failed[k]} if k in failed else next(done))
                rows.append({"image": str(p), **row})
        return rows

    def decide(self, out: dict[str, np.ndarray], top_k: int = 5) -> list[dict]:
        """Best path, back-off and confidence for the graph outputs ``out`` (one batch)."""
        tax, ranks = self.meta["taxonomy"], self.ranks
        probs = {r: out[f"probs_{r}"] for r in ranks}
        n = len(probs[ranks[-1]])
        rows = np.arange(n)
        leaf = probs[ranks[-1]].argmax(axis=1)
        path = {r: np.asarray(tax["leaf_ancestor"][r])[leaf] for r in ranks}
        path_prob = {r: probs[r][rows, path[r]].astype(np.float64) for r in ranks}
        path_logit = {r: out[f"logits_{r}"][rows, path[r]].astype(np.float64) for r in ranks}
        z = out.get("outlier_score")
        ev, flags, thr = evidence(self.meta["openset"], path_prob, path_logit, z, ranks)
        frame = back_off(tax, self.meta["reasons"], path, ev, flags, thr)
        conf = confidence(self.meta["confidence"], frame["taxon_rank"], path_prob, ranks)
        result = []
        for j in range(n):
            row = {"taxon_rank": frame["taxon_rank"][j], "taxon": frame["taxon"][j],
                   "confidence": conf[j], "score": frame["score"][j],
                   "reason": frame["reason"][j], "outlier": bool(frame["outlier"][j])}
            if z is not None:
                row["outlier_score"] = float(z[j])
            for r in ranks:
                row[r] = tax["names"][r][path[r][j]]
                row[f"{r}_prob"] = float(probs[r][j, path[r][j]])
            for r in ranks:
                order = np.argsort(-probs[r][j], kind="stable")[:top_k]
                row[f"{r}_top{top_k}"] = ";".join(
                    f"{tax['names'][r][i]}:{probs[r][j, i]:.4f}" for i in order)
            result.append(row)
        return result


# ---------------------------------------------------------------------- back-off
def _logit(p: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    return np.log(p) - np.log1p(-p)


def _ecdf(reference, values) -> np.ndarray:
    ref = np.asarray(reference, dtype=np.float64)
    return np.searchsorted(ref, values, side="right") / max(len(ref), 1)


def combine(comb: dict, conf: dict, z, gated_value: float) -> dict[str, np.ndarray]:
    """Evidence per rank (taxoclass's EvidenceCombiner.score) from the confidence in the
    path's taxon and the outlier z-score."""
    out = {}
    for rank in comb["ranks"]:
        p, par = np.asarray(conf[rank], dtype=np.float64), comb["params"][rank]
        use_z = rank in comb["outlier_ranks"]
        if comb["method"] in ("rank_mean", "gate"):
            e = _ecdf(par["p_ref"], p)
            if use_z and comb["method"] == "rank_mean":
                e = np.mean([e, _ecdf(par["z_ref"], -np.asarray(z, np.float64))], axis=0)
            elif use_z:
                e = np.where(np.asarray(z, np.float64) <= par["z_cut"], e, gated_value)
            out[rank] = e
            continue
        cols = [p if comb["confidence"] == "path_logit" else _logit(p)]
        if use_z:
            cols.append(np.asarray(z, dtype=np.float64))
        f = (np.stack(cols, axis=1) - np.asarray(par["mean"])) / np.asarray(par["scale"])
        out[rank] = 1.0 / (1.0 + np.exp(-(f @ np.asarray(par["coef"]) + par["intercept"])))
    return out


def evidence(openset: dict | None, path_prob: dict, path_logit: dict, z, ranks: list[str]):
    """(evidence, gate flags, thresholds) per rank; without an open-set part every rank
    passes on its path probability (taxoclass's behaviour without a scorer)."""
    if openset is None:
        return path_prob, {}, {r: 0.0 for r in ranks}
    comb, thr = openset["combiner"], openset["thresholds"]
    conf = path_logit if comb["confidence"] == "path_logit" else path_prob
    ev = combine(comb, conf, z, openset["gated_evidence"])
    flags = {}
    for rank in comb["outlier_ranks"]:  # the distance gate rejected the rank
        typical = np.full(len(z), openset["typical_outlier_score"][rank])
        would = combine(comb, conf, typical, openset["gated_evidence"])[rank]
        t = float(thr[rank])
        flags[rank] = ~(ev[rank] >= t) & (would >= t)
    return ev, flags, thr


def back_off(tax: dict, words: dict, path: dict, ev: dict, flags: dict, thr: dict) -> dict:
    """The lowest rank whose evidence passes its threshold, per row (taxoclass's
    back_off_batch): taxon_rank, taxon, score, reason, outlier."""
    ranks = tax["ranks"]
    lowest = ranks[-1]
    n = len(path[lowest])
    ev = {r: np.asarray(ev[r], dtype=np.float64) for r in ranks}
    accept = np.stack([ev[r] >= float(thr[r]) for r in ranks], axis=1)
    for j, r in enumerate(ranks):  # placeholder chains up to the root never count
        empty = np.array([v is None for v in tax["reported"][r]["rank"]], dtype=bool)
        accept[:, j] &= ~empty[path[r]]
    any_ok = accept.any(axis=1)
    j_ok = len(ranks) - 1 - accept[:, ::-1].argmax(axis=1)
    low_flag = np.asarray(flags.get(lowest, np.zeros(n, bool)), bool) & ~accept[:, -1]
    taxon_rank = [words["unknown_label"]] * n
    taxon = [words["unknown_label"]] * n
    score = [math.nan] * n
    reason = [words["unknown"]["outlier" if low_flag[i] else "low_confidence"]
              for i in range(n)]
    for i in np.flatnonzero(any_ok):
        r = ranks[j_ok[i]]
        c = int(path[r][i])
        taxon[i] = tax["reported"][r]["label"][c]
        taxon_rank[i] = tax["reported"][r]["rank"][c]
        score[i] = float(ev[r][i])
        why = "outlier" if low_flag[i] else "low_confidence"
        reason[i] = words["accepted"] if r == lowest else words["backoff"][r][why]
    return {"taxon_rank": taxon_rank, "taxon": taxon, "score": score, "reason": reason,
            "outlier": [str(x).endswith(":outlier") for x in reason]}


def confidence(calibration: dict | None, taxon_rank: list, path_prob: dict,
               ranks: list[str]) -> list[float]:
    """Calibrated probability that the answer at its rank is right (NaN for unknown)."""
    out = []
    for i, r in enumerate(taxon_rank):
        if r not in ranks:
            out.append(math.nan)
            continue
        p = float(path_prob[r][i])
        if calibration and r in calibration:
            a, b = calibration[r]["slope"], calibration[r]["bias"]
            p = float(0.5 * (1.0 + np.tanh(0.5 * (a * _logit(np.array([p]))[0] + b))))
        out.append(p)
    return out


# ---------------------------------------------------------------------- command line
def columns(meta: dict, top_k: int) -> list[str]:
    ranks = meta["taxonomy"]["ranks"]
    cols = ["image", "taxon_rank", "taxon", "confidence", "score", "reason", "outlier"]
    if "outlier_score" in meta["outputs"]:
        cols.append("outlier_score")
    for r in ranks:
        cols += [r, f"{r}_prob"]
    return cols + [f"{r}_top{top_k}" for r in ranks]


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return repr(float(value)) if isinstance(value, (float, np.floating)) else str(value)


def write_csv(path: str | Path, rows: list[dict], cols: list[str]) -> None:
    if any("error" in r for r in rows):
        cols = cols + ["error"]
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(cols)
        for r in rows:
            writer.writerow([_cell(r.get(c)) for c in cols])
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Name organisms in images with a taxoclass "
                                             "model exported to ONNX (onnxruntime only).")
    ap.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    ap.add_argument("--model", required=True, help="model.onnx (model.json beside it)")
    ap.add_argument("--out", default=None, help="CSV file to write (the columns of "
                                                "taxoclass predict)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: all)")
    args = ap.parse_args(argv)
    try:
        model = EdgeModel(args.model, threads=args.threads)
    except (ExportedModelError, OSError, ValueError, KeyError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    rows = model.predict(collect_images(args.images), batch_size=args.batch_size,
                         top_k=args.top_k)
    cols = columns(model.meta, args.top_k)
    if args.out:
        write_csv(args.out, rows, cols)
    lowest = model.ranks[-1]
    for r in rows:
        print("\t".join([Path(r["image"]).name, _cell(r.get("taxon_rank")),
                         _cell(r.get("taxon")), _cell(r.get("confidence")),
                         r["reason"], _cell(r.get(lowest))]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
