"""When and where a plot photo was taken: date and place for reports and Darwin Core.

Three sources, first one that has a value wins, field by field:

1. a plot metadata CSV the user passes (``--plot-metadata``): one row per plot, column
   ``plot_id`` (the photo's file stem) and any of ``eventDate``, ``decimalLatitude``,
   ``decimalLongitude``, ``locality``, ``country``, ``countryCode`` (aliases: ``date``,
   ``latitude``/``lat``, ``longitude``/``lon``/``lng``); other columns (``recordedBy``,
   ``habitat``, ``coordinateUncertaintyInMeters``...) are kept in :attr:`PlotMetadata.extra`;
2. the photo's EXIF: ``DateTimeOriginal`` (else ``DateTime``) and the GPS position;
3. a date in the file name: ``CBN-can-A1-20230705.jpg`` or ``plot_2023-07-05.jpg``
   -> ``2023-07-05``.

:attr:`PlotMetadata.sources` says where each value came from (``csv``, ``exif``,
``filename``). Dates are ISO 8601 (``2023-07-05`` or ``2023-07-05T10:31:02``).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AnnotationError

log = logging.getLogger(__name__)

__all__ = ["PlotMetadata", "date_from_name", "exif_metadata", "photo_metadata",
           "plot_metadata", "read_plot_metadata"]

#: CSV column aliases -> the Darwin Core term they stand for.
ALIASES = {"date": "eventDate", "eventdate": "eventDate", "latitude": "decimalLatitude",
           "lat": "decimalLatitude", "decimallatitude": "decimalLatitude",
           "longitude": "decimalLongitude", "lon": "decimalLongitude",
           "lng": "decimalLongitude", "decimallongitude": "decimalLongitude",
           "locality": "locality", "country": "country", "countrycode": "countryCode",
           "plot": "plot_id", "plot_id": "plot_id", "plotid": "plot_id"}
_CORE = ("eventDate", "decimalLatitude", "decimalLongitude", "locality", "country",
         "countryCode")
_EXIF_IFD, _GPS_IFD = 0x8769, 0x8825
_DATETIME_ORIGINAL, _DATETIME, _OFFSET_ORIGINAL = 36867, 306, 36881
# A date in a file name: 20230705, 2023-07-05, 2023_07_05 (not inside a longer number).
_NAME_DATE = re.compile(r"(?<!\d)((?:19|20)\d\d)[-_.]?(0[1-9]|1[0-2])[-_.]?"
                        r"(0[1-9]|[12]\d|3[01])(?!\d)")
_ISO_DATE = re.compile(r"^\d{4}(-\d\d(-\d\d([T ]\d\d:\d\d(:\d\d(\.\d+)?)?"
                       r"(Z|[+-]\d\d:?\d\d)?)?)?)?$")


@dataclass(frozen=True)
class PlotMetadata:
    """Date and place of one plot photo (empty string / None: not known)."""

    plot_id: str
    eventDate: str = ""  # noqa: N815 - Darwin Core term names, as written in the archive
    decimalLatitude: float | None = None  # noqa: N815
    decimalLongitude: float | None = None  # noqa: N815
    locality: str = ""
    country: str = ""
    countryCode: str = ""  # noqa: N815
    extra: dict[str, str] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Darwin Core term -> value for the known fields (``extra`` included)."""
        out: dict[str, Any] = {k: getattr(self, k) for k in _CORE
                               if getattr(self, k) not in ("", None)}
        if self.decimalLatitude is not None:
            out["geodeticDatum"] = self.extra.get("geodeticDatum", "EPSG:4326")
        return {**self.extra, **out}

    @property
    def date(self) -> str:
        """The day (``YYYY-MM-DD``) of :attr:`eventDate`, or ``""``."""
        return self.eventDate[:10]


def read_plot_metadata(path: str | Path) -> dict[str, dict[str, str]]:
    """Rows of a plot metadata CSV by ``plot_id``, with values checked.

    Column names are matched case-insensitively against :data:`ALIASES`; other columns
    are kept as written. Raises :class:`~taxoclass.errors.AnnotationError` (file, row,
    expected, found, fix) for a missing ``plot_id`` column, a repeated plot id, a date
    that is not ISO 8601 or coordinates out of range.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"Plot metadata {str(path)!r} does not exist. Fix: pass a CSV "
                              "with plot_id, eventDate, decimalLatitude, decimalLongitude, ...")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False, sep=None, engine="python")
    frame.columns = [ALIASES.get(str(c).strip().lower(), str(c).strip()) for c in frame.columns]
    if "plot_id" not in frame.columns:
        raise AnnotationError(f"{path}: expected a 'plot_id' column (the photo's file name "
                              f"without suffix), found columns {list(frame.columns)}. Fix: "
                              "add it or rename the column that names the plot.")
    rows: dict[str, dict[str, str]] = {}
    for i, rec in enumerate(frame.to_dict("records"), start=2):
        rec = {k: str(v).strip() for k, v in rec.items() if str(v).strip()}
        pid = rec.pop("plot_id", "")
        if not pid:
            raise AnnotationError(f"{path} line {i}: empty plot_id. Fix: fill it or drop the row.")
        if pid in rows:
            raise AnnotationError(f"{path} line {i}: plot_id {pid!r} repeats; expected one row "
                                  "per plot. Fix: merge the rows.")
        _check_row(path, i, rec)
        rows[pid] = rec
    return rows


def _check_row(path: Path, line: int, rec: Mapping[str, str]) -> None:
    where = f"{path} line {line}"
    if "eventDate" in rec and not _is_iso_date(rec["eventDate"]):
        raise AnnotationError(f"{where}: eventDate {rec['eventDate']!r} is not an ISO 8601 date "
                              "(expected e.g. 2023-07-05, 2023-07-05T10:31:00 or an interval "
                              "2023-07-05/2023-07-06). Fix: rewrite it.")
    for term, limit in (("decimalLatitude", 90.0), ("decimalLongitude", 180.0)):
        if term not in rec:
            continue
        try:
            value = float(rec[term])
        except ValueError:
            value = float("nan")
        if not -limit <= value <= limit:
            raise AnnotationError(f"{where}: {term} {rec[term]!r} is not a number in "
                                  f"[-{limit:g}, {limit:g}] (decimal degrees, WGS84). Fix: "
                                  "convert it to decimal degrees.")


def _is_iso_date(text: str) -> bool:
    return all(_ISO_DATE.match(p) for p in text.split("/")) and text.count("/") <= 1


def date_from_name(name: str | Path) -> str:
    """``YYYY-MM-DD`` from a date in a file name (``CBN-can-A1-20230705.jpg``), else ``""``."""
    for m in _NAME_DATE.finditer(Path(name).stem):
        try:
            return dt.date(int(m[1]), int(m[2]), int(m[3])).isoformat()
        except ValueError:  # 20230231: not a date
            continue
    return ""


def exif_metadata(photo: str | Path) -> dict[str, Any]:
    """``eventDate`` (DateTimeOriginal, else DateTime) and ``decimalLatitude`` /
    ``decimalLongitude`` (GPS) from a photo's EXIF; ``{}`` when it has none or cannot be
    read (the report reads the pixels through :mod:`taxoclass.io.images` and records a
    broken photo there)."""
    from PIL import Image

    try:
        with Image.open(photo) as img:  # header only: no pixels are decoded
            exif = img.getexif()
            sub = exif.get_ifd(_EXIF_IFD)
            gps = exif.get_ifd(_GPS_IFD)
    except Exception:  # noqa: BLE001 - no or broken EXIF: not an error here
        return {}
    out: dict[str, Any] = {}
    stamp = _exif_date(sub.get(_DATETIME_ORIGINAL) or exif.get(_DATETIME),
                       sub.get(_OFFSET_ORIGINAL))
    if stamp:
        out["eventDate"] = stamp
    position = _gps(gps)
    if position:
        out["decimalLatitude"], out["decimalLongitude"] = position
    return out


def _exif_date(value: Any, offset: Any = None) -> str:
    """``2023:07:05 10:31:02`` -> ``2023-07-05T10:31:02`` (+ the UTC offset when given)."""
    try:
        stamp = dt.datetime.strptime(str(value).strip().rstrip("\x00"), "%Y:%m:%d %H:%M:%S")
    except (TypeError, ValueError):
        return ""
    off = str(offset or "").strip().rstrip("\x00")
    return stamp.isoformat() + (off if re.fullmatch(r"[+-]\d\d:\d\d", off) else "")


def _gps(gps: Mapping[int, Any]) -> tuple[float, float] | None:
    """(latitude, longitude) in decimal degrees from an EXIF GPS IFD, or None."""
    try:
        lat = _degrees(gps[2]) * (-1 if str(gps.get(1, "N")).upper().startswith("S") else 1)
        lon = _degrees(gps[4]) * (-1 if str(gps.get(3, "E")).upper().startswith("W") else 1)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        return None
    return round(lat, 7), round(lon, 7)


def _degrees(dms: Iterable[Any]) -> float:
    d, m, s = (float(x) for x in dms)
    return d + m / 60.0 + s / 3600.0


def photo_metadata(photo: str | Path, *, plot_id: str | None = None,
                   table: Mapping[str, Mapping[str, str]] | None = None) -> PlotMetadata:
    """:class:`PlotMetadata` of one photo: the CSV row (``table[plot_id]``), then EXIF,
    then a date in the file name, field by field. ``plot_id``: default the file stem."""
    photo = Path(photo)
    pid = photo.stem if plot_id is None else plot_id
    row = dict((table or {}).get(pid, {}))
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for term in _CORE:
        if term in row:
            values[term], sources[term] = row.pop(term), "csv"
    if not {"eventDate", "decimalLatitude", "decimalLongitude"} <= set(values):
        for term, value in exif_metadata(photo).items():
            if term not in values:
                values[term], sources[term] = value, "exif"
    if "eventDate" not in values:
        day = date_from_name(photo)
        if day:
            values["eventDate"], sources["eventDate"] = day, "filename"
    for term in ("decimalLatitude", "decimalLongitude"):
        if term in values:
            values[term] = float(values[term])
    if ("decimalLatitude" in values) != ("decimalLongitude" in values):
        log.warning("plot %s: only one of decimalLatitude/decimalLongitude known; both left "
                    "out", pid)
        values.pop("decimalLatitude", None)
        values.pop("decimalLongitude", None)
    return PlotMetadata(pid, **values, extra=row, sources=sources)


def plot_metadata(photos: Mapping[str, str | Path],
                  metadata: str | Path | Mapping[str, Mapping[str, str]] | None = None
                  ) -> dict[str, PlotMetadata]:
    """:class:`PlotMetadata` for every plot (``{plot_id: photo}``); ``metadata``: the plot
    metadata CSV, its rows (:func:`read_plot_metadata`, to check the file before the photos
    are read) or None. Rows naming no plot of this run are warned about."""
    if isinstance(metadata, (str, Path)):
        table = read_plot_metadata(metadata)
    else:
        table = dict(metadata or {})
    unused = sorted(set(table) - set(photos))
    if unused:
        log.warning("%d plot(s) of %s match no photo of this run (plot_id is the photo's file "
                    "name without suffix): %s", len(unused), metadata,
                    ", ".join(unused[:5]) + (", ..." if len(unused) > 5 else ""))
    return {pid: photo_metadata(p, plot_id=pid, table=table) for pid, p in photos.items()}
