"""Darwin Core occurrences of plot reports, and the Darwin Core Archive that carries them.

One occurrence per taxon record of a plot (unknown tiles are not occurrences). Written as
``occurrences_dwca.zip`` (``occurrence.txt``, tab-separated, + ``meta.xml`` + ``eml.xml``;
what GBIF/IPT take) and, for spreadsheets, ``occurrences_dwc.csv`` (the same table).

Choices:

- ``occurrenceID``: ``urn:uuid:`` + a UUID5 of the plot id, the photo's sha256 and the
  taxon's rank and path: the same photo and taxon give the same ID in every run, whatever
  the order or score of the finds.
- ``eventDate`` and place (``decimalLatitude``, ``decimalLongitude``, ``geodeticDatum``,
  ``locality``, ``country``, ``countryCode``) from :mod:`taxoclass.plots.metadata` (plot
  metadata CSV, EXIF, date in the file name). Other columns of the plot metadata CSV that
  are Darwin Core terms (:data:`TERMS`: ``recordedBy``, ``habitat``, ``kingdom``,
  ``associatedMedia``...) go to every occurrence of that plot; other columns are ignored
  with a warning.
- ``kingdom`` and the other higher ranks come from the model's rank list only (a model of
  plant data is not assumed to be Plantae); a ``kingdom`` column in the plot metadata CSV
  fills it when the taxonomy has no kingdom rank.
- ``identifiedBy`` names the model: ``taxoclass <version> model <id>``; the id is the
  bundle's (a hash of the sha256 of its parts, recorded in bundle.json) or, for a model
  without one, a hash of its description. ``dateIdentified`` is the run date.
- ``associatedMedia`` is left empty unless the plot metadata CSV gives it (e.g. a URL): the
  photo is not in the archive, so a local path would mean nothing to its reader; the
  photo's file name is in ``identificationRemarks``.
- ``scientificNameAuthorship`` is written only when the taxonomy carries authors
  (``taxonomy.authorship``: name -> authors); none of today's importers keep them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging
import uuid
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from xml.sax.saxutils import escape, quoteattr

import pandas as pd

from .._version import __version__
from ..io.files import atomic_write
from ..io.provenance import model_id_for
from ..vocab import UNKNOWN

if TYPE_CHECKING:
    from .metadata import PlotMetadata
    from .rules import PlotRecord

log = logging.getLogger(__name__)

__all__ = ["DWC", "TERMS", "darwin_core_frame", "dwc_columns", "eml_xml", "identified_by",
           "meta_xml", "model_id", "occurrence_id", "write_dwc_archive"]

DWC = "http://rs.tdwg.org/dwc/terms/"
DCTERMS = "http://purl.org/dc/terms/"
DWC_TEXT = "http://rs.tdwg.org/dwc/text/"
OCCURRENCE = DWC + "Occurrence"
#: Darwin Core terms for taxa above species, top down (a rank of the model named like one
#: of them gets that column, filled from each record's path).
DWC_HIGHER_TAXA = ("kingdom", "phylum", "class", "order", "superfamily", "family",
                   "subfamily", "tribe", "subtribe", "genus", "subgenus")
#: Terms a plot metadata CSV may add (to every occurrence of its plot).
METADATA_TERMS = ("recordedBy", "recordedByID", "eventTime", "eventRemarks", "fieldNumber",
                  "samplingProtocol", "samplingEffort", "sampleSizeValue", "sampleSizeUnit",
                  "habitat", "locationID", "continent", "stateProvince", "county",
                  "municipality", "minimumElevationInMeters", "maximumElevationInMeters",
                  "coordinateUncertaintyInMeters", "georeferenceRemarks", "associatedMedia",
                  "occurrenceRemarks", "datasetName", "institutionCode", "collectionCode",
                  "license", "rightsHolder")
#: The occurrence columns in order; higher taxa and metadata terms are added in place.
DWC_COLUMNS = ["occurrenceID", "basisOfRecord", "occurrenceStatus", "eventID", "eventDate",
               "decimalLatitude", "decimalLongitude", "geodeticDatum", "locality", "country",
               "countryCode", "scientificName", "scientificNameAuthorship", "taxonRank",
               "identificationQualifier", "identifiedBy", "dateIdentified",
               "identificationVerificationStatus", "identificationRemarks", "associatedMedia"]
_DCTERMS = {"license", "rightsHolder"}
#: Every term this module may write, with its IRI (the official Darwin Core term list:
#: https://dwc.tdwg.org/terms/; ``license``/``rightsHolder`` are Dublin Core terms).
TERMS = {t: (DCTERMS if t in _DCTERMS else DWC) + t
         for t in dict.fromkeys([*DWC_COLUMNS, *DWC_HIGHER_TAXA, *METADATA_TERMS])}
_OCC_NAMESPACE = uuid.UUID("6b1f0b7e-6d55-5a3c-9d0e-7a1f3c2b9e41")  # taxoclass occurrences


def dwc_columns(ranks: Sequence[str], *, extra: Sequence[str] = (),
                authorship: bool = False) -> list[str]:
    """The occurrence columns: :data:`DWC_COLUMNS` with the higher-taxon terms the rank list
    has (or ``extra`` names) after ``taxonRank``, ``extra`` metadata terms at the end, and
    ``scientificNameAuthorship`` only with ``authorship``."""
    have = {str(r).lower() for r in ranks} | set(extra)
    higher = [t for t in DWC_HIGHER_TAXA if t in have]
    cols = [c for c in DWC_COLUMNS if authorship or c != "scientificNameAuthorship"]
    at = cols.index("taxonRank") + 1
    tail = [t for t in extra if t in TERMS and t not in cols and t not in DWC_HIGHER_TAXA]
    return [*cols[:at], *higher, *cols[at:], *tail]


def occurrence_id(plot_id: str, photo_hash: str, rank: str, node: Sequence[str]) -> str:
    """Stable ``urn:uuid:`` of the occurrence of taxon ``node`` at ``rank`` in a plot photo."""
    key = json.dumps([plot_id, photo_hash, str(rank).lower(), list(node)], ensure_ascii=False)
    return f"urn:uuid:{uuid.uuid5(_OCC_NAMESPACE, key)}"


def _photo_hash(photo: str | Path | None) -> str:
    """sha256 of the photo's bytes ("" when it cannot be read: the ID then rests on the plot)."""
    if not photo:
        return ""
    digest = hashlib.sha256()
    try:
        with open(photo, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return ""
    return digest.hexdigest()


def model_id(classifier: Any) -> str:
    """The model's id (:func:`taxoclass.io.provenance.model_id_for`): the bundle's
    ``model_id`` if it has one, else a hash of the sha256 of its parts (bundle.json), else
    of its description (PlantCLEF checkpoint, legacy bundle)."""
    return model_id_for(classifier)


def identified_by(classifier: Any) -> str:
    """``identifiedBy`` of a model's occurrences: ``taxoclass <version> model <id>``."""
    return f"taxoclass {__version__} model {model_id(classifier)}"


def _authorship(taxonomy: Any) -> Mapping[str, str]:
    return dict(getattr(taxonomy, "authorship", None) or {})


def darwin_core_frame(records: Mapping[str, Sequence[PlotRecord]], taxonomy: Any, *,
                      photos: Mapping[str, str | Path], identified_by: str,
                      metadata: Mapping[str, PlotMetadata] | None = None,
                      date_identified: str | None = None) -> pd.DataFrame:
    """Darwin Core occurrences, one per taxon record (columns :func:`dwc_columns`).

    ``scientificName`` is the taxon at the rank of the answer, ``taxonRank`` that rank
    (lower case); the higher-taxon terms the rank list has come from the record's path,
    empty below the answer. ``metadata``: :func:`~taxoclass.plots.metadata.plot_metadata`.
    """
    metadata = metadata or {}
    ranks = taxonomy.ranks
    authors = _authorship(taxonomy)
    extra = _metadata_terms(metadata)
    columns = dwc_columns(ranks, extra=extra, authorship=bool(authors))
    when = date_identified or dt.date.today().isoformat()
    rows = []
    for plot_id, recs in records.items():
        photo = photos.get(plot_id)
        digest = _photo_hash(photo)
        place = metadata[plot_id].to_dict() if plot_id in metadata else {}
        for r in recs:
            if r.taxon_rank == UNKNOWN or not r.node:
                continue
            path = {str(k).lower(): v for k, v in zip(ranks, r.node)}
            row = {t: v for t, v in place.items() if t in columns}
            row.update({
                "occurrenceID": occurrence_id(plot_id, digest, r.taxon_rank, r.node),
                "basisOfRecord": "MachineObservation", "occurrenceStatus": "present",
                "eventID": plot_id, "scientificName": r.node[-1],
                "taxonRank": str(r.taxon_rank).lower(),
                # "sp.": the taxonomy labels this answer above the lowest rank "<name> sp."
                "identificationQualifier": "sp." if r.taxon.endswith(" sp.") else "",
                "identifiedBy": identified_by, "dateIdentified": when,
                "identificationVerificationStatus": "unverified",
                "identificationRemarks": _remarks(r, photo),
            })
            if authors:
                row["scientificNameAuthorship"] = authors.get(r.node[-1], "")
            row.update({t: path[t] for t in DWC_HIGHER_TAXA if t in path})
            rows.append(row)
    frame = pd.DataFrame(rows, columns=columns, dtype=object).fillna("")
    _check_unique(frame)
    return frame


def _remarks(record: PlotRecord, photo: str | Path | None) -> str:
    score = float(record.score)
    text = (f"score={score:.4f}; " if score == score else "") + \
        f"n_tiles={record.n_tiles}; reason={record.reason}"
    rule = getattr(record, "rule", "")
    text += f"; rule={rule}" if rule else ""
    return text + (f"; photo={Path(photo).name}" if photo else "")


def _metadata_terms(metadata: Mapping[str, PlotMetadata]) -> list[str]:
    """Darwin Core terms the plot metadata adds; other columns are warned about once."""
    names = dict.fromkeys(k for m in metadata.values() for k in m.to_dict())
    unknown = [k for k in names if k not in TERMS]
    if unknown:
        log.warning("plot metadata columns that are not Darwin Core terms are left out of the "
                    "occurrences: %s (known: see taxoclass.plots.dwc.TERMS)", ", ".join(unknown))
    return [k for k in names if k in TERMS]


def _check_unique(frame: pd.DataFrame) -> None:
    dup = frame["occurrenceID"][frame["occurrenceID"].duplicated()]
    if len(dup):  # one taxon twice in a plot at one rank: a bug upstream, not a user error
        raise ValueError(f"occurrenceID {dup.iloc[0]} repeats: a plot lists one taxon twice.")


# ---------------------------------------------------------------------- archive
def meta_xml(columns: Sequence[str], *, location: str = "occurrence.txt") -> str:
    """The archive descriptor: occurrence core, tab-separated, one header line."""
    fields = "\n".join(f'    <field index="{i}" term="{TERMS[c]}"/>'
                       for i, c in enumerate(columns))
    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<archive xmlns="{DWC_TEXT}" metadata="eml.xml">\n'
            '  <core encoding="UTF-8" fieldsTerminatedBy="\\t" linesTerminatedBy="\\n" '
            f'fieldsEnclosedBy="" ignoreHeaderLines="1" rowType="{OCCURRENCE}">\n'
            f"    <files>\n      <location>{escape(location)}</location>\n    </files>\n"
            f'    <id index="{list(columns).index("occurrenceID")}"/>\n'
            f"{fields}\n  </core>\n</archive>\n")


def eml_xml(*, title: str, identified_by: str, n_occurrences: int, n_plots: int,
            pub_date: str | None = None, license: str = "") -> str:
    """Minimal EML 2.1.1 dataset metadata (GBIF profile): title, creator, date, abstract,
    and the licence when the records carry one (a ``license`` column of the plot metadata
    CSV, e.g. ``http://creativecommons.org/licenses/by/4.0/legalcode``); otherwise the
    publisher chooses it in the IPT. It says who made the records and that no person
    verified them.
    """
    date = pub_date or dt.date.today().isoformat()
    package = uuid.uuid5(_OCC_NAMESPACE, f"{title}|{date}|{identified_by}")
    abstract = (f"{n_occurrences} machine observations in {n_plots} plot photos, identified "
                f"by {identified_by} (taxoclass plot-report); not verified by a person "
                "(identificationVerificationStatus = unverified).")
    org = "<organizationName>taxoclass plot-report</organizationName>"
    rights = (f"    <intellectualRights><para>This work is licensed under {escape(license)}"
              "</para></intellectualRights>\n" if license else "")
    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            '<eml:eml xmlns:eml="eml://ecoinformatics.org/eml-2.1.1" '
            'xmlns:dc="http://purl.org/dc/terms/" '
            'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
            'xsi:schemaLocation="eml://ecoinformatics.org/eml-2.1.1 '
            'http://rs.gbif.org/schema/eml-gbif-profile/1.1/eml.xsd" '
            f'packageId={quoteattr(str(package))} system="http://taxoclass" scope="system" '
            'xml:lang="eng">\n'
            "  <dataset>\n"
            f"    <title xml:lang=\"eng\">{escape(title)}</title>\n"
            f"    <creator>{org}</creator>\n"
            f"    <metadataProvider>{org}</metadataProvider>\n"
            f"    <pubDate>{date}</pubDate>\n"
            "    <language>eng</language>\n"
            f"    <abstract><para>{escape(abstract)}</para></abstract>\n"
            f"{rights}    <contact>{org}</contact>\n"
            "  </dataset>\n</eml:eml>\n")


def _tsv(frame: pd.DataFrame) -> str:
    """occurrence.txt: tabs and line breaks inside values become spaces (no quoting)."""
    clean = frame.astype(str).replace({r"[\t\r\n]+": " "}, regex=True)
    lines = ["\t".join(clean.columns), *("\t".join(row) for row in clean.itertuples(
        index=False, name=None))]
    return "\n".join(lines) + "\n"


def _one_license(frame: pd.DataFrame) -> str:
    """The records' licence when they all carry the same one (else "")."""
    values = set(frame["license"]) - {""} if "license" in frame.columns else set()
    return values.pop() if len(values) == 1 else ""


def write_dwc_archive(path: str | Path, frame: pd.DataFrame, *, title: str,
                      identified_by: str, n_plots: int) -> Path:
    """Write ``frame`` (:func:`darwin_core_frame`) as a Darwin Core Archive zip at ``path``."""
    unknown = [c for c in frame.columns if c not in TERMS]
    if unknown:
        raise ValueError(f"columns {unknown} are not Darwin Core terms of taxoclass.plots.dwc.")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("occurrence.txt", _tsv(frame))
        zf.writestr("meta.xml", meta_xml(list(frame.columns)))
        zf.writestr("eml.xml", eml_xml(title=title, identified_by=identified_by,
                                       n_occurrences=len(frame), n_plots=n_plots,
                                       license=_one_license(frame)))
    return atomic_write(path, lambda fh: fh.write(buf.getvalue()), mode="wb")
