"""Darwin Core Archive of plot reports (issue 16): occurrence.txt + meta.xml + eml.xml,
stable occurrenceIDs, date and place from a plot metadata CSV / EXIF / the file name, the
model named by its id; and the PlantCLEF file holds ids, never names.
"""

from __future__ import annotations

import csv
import io
import logging
import re
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from PIL import Image

from taxoclass.errors import AnnotationError, ConfigError
from taxoclass.plots.dwc import (
    TERMS,
    darwin_core_frame,
    identified_by,
    model_id,
    occurrence_id,
    write_dwc_archive,
)
from taxoclass.plots.metadata import (
    date_from_name,
    exif_metadata,
    photo_metadata,
    plot_metadata,
    read_plot_metadata,
)
from taxoclass.plots.plantclef import NAMES_FILE, SUBMISSION_FILE, write_submission
from taxoclass.plots.rules import PlotRecord
from taxoclass.taxonomy.tree import Taxonomy

#: Terms of the official Darwin Core list (https://dwc.tdwg.org/list/, namespace
#: http://rs.tdwg.org/dwc/terms/) that an occurrence core may use, written out here so
#: the test does not trust the module's own list; license/rightsHolder are Dublin Core.
DWC_OFFICIAL = frozenset("""
occurrenceID basisOfRecord occurrenceStatus eventID eventDate eventTime eventRemarks
fieldNumber samplingProtocol samplingEffort sampleSizeValue sampleSizeUnit habitat
decimalLatitude decimalLongitude geodeticDatum coordinateUncertaintyInMeters
georeferenceRemarks locality locationID continent country countryCode stateProvince county
municipality minimumElevationInMeters maximumElevationInMeters scientificName
scientificNameAuthorship taxonRank kingdom phylum class order superfamily family subfamily
tribe subtribe genus subgenus identificationQualifier identifiedBy dateIdentified
identificationVerificationStatus identificationRemarks associatedMedia occurrenceRemarks
recordedBy recordedByID datasetName institutionCode collectionCode
""".split())
DCTERMS_OFFICIAL = frozenset({"license", "rightsHolder"})

#: The official Darwin Core term list and the text guide's meta.xml schema, shipped with
#: their source and licence (tests/fixtures/dwc/README.md): no network is needed, and no
#: GBIF/IPT online validator is run here.
DWC_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "dwc"
#: Dublin Core terms of the Darwin Core list (the first lines of all_dwc_vertical.csv).
DUBLIN_CORE = frozenset({"type", "modified", "language", "license", "rightsHolder",
                         "accessRights", "bibliographicCitation", "references"})
EML = "{eml://ecoinformatics.org/eml-2.1.1}eml"

RANKS = ("family", "genus", "species")
TAX = Taxonomy.from_records([
    {"family": "Cyperaceae", "genus": "Carex", "species": "Carex nigra"},
    {"family": "Cyperaceae", "genus": "Carex", "species": "Carex flacca"},
    {"family": "Poaceae", "genus": "Poa", "species": "Poa annua"}], ranks=RANKS)
NIGRA = ("Cyperaceae", "Carex", "Carex nigra")


def _jpeg(path: Path, colour: str = "green", *, date: str | None = None,
          gps: tuple | None = None) -> Path:
    img = Image.new("RGB", (32, 32), colour)
    exif = Image.Exif()
    if date:
        exif[0x8769] = {36867: date}
    if gps:
        exif[0x8825] = gps
    img.save(path, exif=exif)
    return path


def _records(order: int = 1) -> dict[str, list[PlotRecord]]:
    recs = [PlotRecord("A1-20230705", "species", "Carex nigra", 0.9, 3, "species", NIGRA),
            PlotRecord("A1-20230705", "genus", "Poa sp.", 0.6, 1,
                       "backoff_to_genus:low_confidence", ("Poaceae", "Poa")),
            PlotRecord("A1-20230705", "unknown", "unknown", float("nan"), 2, "unknown:outlier")]
    return {"A1-20230705": recs[::order]}


# ---------------------------------------------------------------------- metadata
def test_dates_from_file_names():
    assert date_from_name("CBN-can-A1-20230705.jpg") == "2023-07-05"
    assert date_from_name("plot_2021-06-30_b.png") == "2021-06-30"
    assert date_from_name("x_20230231_2022_01_02.jpg") == "2022-01-02"  # 31 Feb is no date
    assert date_from_name("IMG_1234567890123.jpg") == ""  # a long number is no date


def test_exif_date_and_gps(tmp_path):
    photo = _jpeg(tmp_path / "plot.jpg", date="2022:06:01 09:15:00",
                  gps={1: "N", 2: (45.0, 30.0, 0.0), 3: "W", 4: (1.0, 15.0, 36.0)})
    assert exif_metadata(photo) == {"eventDate": "2022-06-01T09:15:00",
                                    "decimalLatitude": 45.5, "decimalLongitude": -1.26}
    meta = photo_metadata(photo)
    assert (meta.plot_id, meta.date, meta.sources["eventDate"]) == ("plot", "2022-06-01", "exif")
    assert exif_metadata(tmp_path / "missing.jpg") == {}


def test_csv_wins_over_exif_and_exif_over_the_file_name(tmp_path):
    photo = _jpeg(tmp_path / "A1-20230705.jpg", date="2023:07:06 10:00:00")
    assert photo_metadata(photo).eventDate == "2023-07-06T10:00:00"  # EXIF before the name
    assert photo_metadata(_jpeg(tmp_path / "A2-20230705.jpg")).eventDate == "2023-07-05"
    table = tmp_path / "plots.csv"
    table.write_text("plot_id,date,lat,lon,locality,countryCode,recordedBy,habitat\n"
                     "A1-20230705,2023-07-04,48.85,2.35,Bois de Vincennes,FR,A. Botanist,"
                     "meadow\n")
    meta = plot_metadata({"A1-20230705": photo}, table)["A1-20230705"]
    assert (meta.eventDate, meta.decimalLatitude, meta.decimalLongitude, meta.countryCode) == (
        "2023-07-04", 48.85, 2.35, "FR")
    assert meta.sources == {"eventDate": "csv", "decimalLatitude": "csv",
                            "decimalLongitude": "csv", "locality": "csv", "countryCode": "csv"}
    assert meta.to_dict()["geodeticDatum"] == "EPSG:4326"
    assert meta.extra == {"recordedBy": "A. Botanist", "habitat": "meadow"}


@pytest.mark.parametrize("row, message", [
    ("p1,05/07/2023,,", r"line 2: eventDate '05/07/2023' is not an ISO 8601 date"),
    ("p1,2023-07-05,95,2", r"line 2: decimalLatitude '95' is not a number in \[-90, 90\]"),
    ("p1,,1,east", r"decimalLongitude 'east'"),
])
def test_bad_metadata_rows_name_the_line_and_the_fix(tmp_path, row, message):
    table = tmp_path / "plots.csv"
    table.write_text(f"plot_id,eventDate,decimalLatitude,decimalLongitude\n{row}\n")
    with pytest.raises(AnnotationError, match=message):
        read_plot_metadata(table)
    table.write_text("plot,eventDate\np1,2023\np1,2024\n")
    with pytest.raises(AnnotationError, match="line 3: plot_id 'p1' repeats"):
        read_plot_metadata(table)


# ---------------------------------------------------------------------- occurrences
def test_occurrence_ids_are_stable_and_unique(tmp_path):
    photo = _jpeg(tmp_path / "A1-20230705.jpg")
    photos = {"A1-20230705": photo}
    one = darwin_core_frame(_records(), TAX, photos=photos, identified_by="m")
    two = darwin_core_frame(_records(-1), TAX, photos=photos, identified_by="m")  # other order
    assert len(one) == 2  # the unknown record is no occurrence
    assert dict(zip(one["scientificName"], one["occurrenceID"])) == dict(
        zip(two["scientificName"], two["occurrenceID"]))
    assert one["occurrenceID"].is_unique
    assert all(re.fullmatch(r"urn:uuid:[0-9a-f-]{36}", i) for i in one["occurrenceID"])
    # another photo under the same name is another occurrence
    other = darwin_core_frame(_records(), TAX, identified_by="m",
                              photos={"A1-20230705": _jpeg(tmp_path / "b.jpg", "red")})
    assert not set(other["occurrenceID"]) & set(one["occurrenceID"])
    assert occurrence_id("p", "h", "species", NIGRA) != occurrence_id("p", "h", "genus", NIGRA)


def test_occurrence_terms_and_values(tmp_path):
    photo = _jpeg(tmp_path / "A1-20230705.jpg")
    meta = plot_metadata({"A1-20230705": photo})
    dwc = darwin_core_frame(_records(), TAX, photos={"A1-20230705": photo},
                            identified_by="taxoclass 1 model abc", metadata=meta,
                            date_identified="2026-11-30")
    species = dwc[dwc["taxonRank"] == "species"].iloc[0]
    genus = dwc[dwc["taxonRank"] == "genus"].iloc[0]
    assert (species["scientificName"], species["family"], species["genus"]) == (
        "Carex nigra", "Cyperaceae", "Carex")
    assert (genus["scientificName"], genus["identificationQualifier"], genus["family"]) == (
        "Poa", "sp.", "Poaceae")
    for term, value in {"basisOfRecord": "MachineObservation", "occurrenceStatus": "present",
                        "identificationVerificationStatus": "unverified",
                        "dateIdentified": "2026-11-30", "eventDate": "2023-07-05",
                        "identifiedBy": "taxoclass 1 model abc", "associatedMedia": "",
                        "eventID": "A1-20230705"}.items():
        assert set(dwc[term]) == {value}, term
    assert "photo=A1-20230705.jpg" in species["identificationRemarks"]
    assert str(tmp_path) not in dwc.to_csv()  # no local paths
    # kingdom only when the taxonomy or the plot metadata gives it (never guessed)
    assert "kingdom" not in dwc.columns and "scientificNameAuthorship" not in dwc.columns
    table = tmp_path / "m.csv"
    table.write_text("plot_id,kingdom,notATerm\nA1-20230705,Plantae,x\n")
    dwc = darwin_core_frame(_records(), TAX, photos={"A1-20230705": photo}, identified_by="m",
                            metadata=plot_metadata({"A1-20230705": photo}, table))
    assert set(dwc["kingdom"]) == {"Plantae"} and "notATerm" not in dwc.columns
    assert set(dwc.columns) <= DWC_OFFICIAL | DCTERMS_OFFICIAL


def test_identified_by_names_the_bundle_id():
    bundle = SimpleNamespace(parts={"head.pt": "aa" * 32, "taxonomy.json": "bb" * 32})
    clf = SimpleNamespace(bundle=bundle, describe=lambda: {"kind": "model-bundle"})
    ident = model_id(clf)
    assert re.fullmatch(r"[0-9a-f]{16}", ident)
    assert model_id(SimpleNamespace(bundle=SimpleNamespace(parts=dict(bundle.parts)))) == ident
    changed = SimpleNamespace(bundle=SimpleNamespace(parts={**bundle.parts, "head.pt": "cc"}))
    assert model_id(changed) != ident
    assert identified_by(clf).endswith(f" model {ident}")
    assert model_id(SimpleNamespace(bundle=SimpleNamespace(model_id="own-id"))) == "own-id"


# ---------------------------------------------------------------------- the archive
def _read_zip(path: Path) -> dict[str, str]:
    with zipfile.ZipFile(path) as zf:
        return {n: zf.read(n).decode("utf-8") for n in zf.namelist()}


def test_archive_meta_xml_matches_occurrence_txt(tmp_path):
    photo = _jpeg(tmp_path / "A1-20230705.jpg")
    frame = darwin_core_frame(_records(), TAX, photos={"A1-20230705": photo},
                              identified_by="taxoclass 1 model abc",
                              metadata=plot_metadata({"A1-20230705": photo}))
    frame.loc[0, "identificationRemarks"] += "\twith a tab\nand a line break"
    path = write_dwc_archive(tmp_path / "occurrences_dwca.zip", frame, title="t",
                             identified_by="taxoclass 1 model abc", n_plots=1)
    files = _read_zip(path)
    assert sorted(files) == ["eml.xml", "meta.xml", "occurrence.txt"]
    rows = list(csv.reader(io.StringIO(files["occurrence.txt"]), delimiter="\t",
                           quoting=csv.QUOTE_NONE))
    header, body = rows[0], rows[1:]
    assert header == list(frame.columns) and len(body) == len(frame) == 2
    assert all(len(r) == len(header) for r in body)
    ns = {"t": "http://rs.tdwg.org/dwc/text/"}
    core = ET.fromstring(files["meta.xml"]).find("t:core", ns)
    assert core.get("rowType") == "http://rs.tdwg.org/dwc/terms/Occurrence"
    assert (core.get("fieldsTerminatedBy"), core.get("ignoreHeaderLines")) == ("\\t", "1")
    assert core.find("t:files/t:location", ns).text == "occurrence.txt"
    assert header[int(core.find("t:id", ns).get("index"))] == "occurrenceID"
    fields = {int(f.get("index")): f.get("term") for f in core.findall("t:field", ns)}
    assert sorted(fields) == list(range(len(header)))
    for i, term in fields.items():
        name = header[i]
        expected = ("http://purl.org/dc/terms/" if name in DCTERMS_OFFICIAL
                    else "http://rs.tdwg.org/dwc/terms/") + name
        assert term == expected and name in DWC_OFFICIAL | DCTERMS_OFFICIAL
    assert set(TERMS) <= DWC_OFFICIAL | DCTERMS_OFFICIAL
    eml = ET.fromstring(files["eml.xml"])
    assert eml.tag == "{eml://ecoinformatics.org/eml-2.1.1}eml"
    assert eml.find("dataset/title").text == "t" and "2 machine observations" in \
        eml.find("dataset/abstract/para").text


def test_archive_reads_back_with_python_dwca_reader(tmp_path):
    dwca = pytest.importorskip("dwca.read")
    photo = _jpeg(tmp_path / "A1-20230705.jpg")
    frame = darwin_core_frame(_records(), TAX, photos={"A1-20230705": photo}, identified_by="m")
    path = write_dwc_archive(tmp_path / "a.zip", frame, title="t", identified_by="m",
                             n_plots=1)
    with dwca.DwCAReader(str(path)) as reader:
        rows = list(reader)
        assert reader.descriptor.core.type == "http://rs.tdwg.org/dwc/terms/Occurrence"
        assert reader.metadata is not None  # eml.xml found and parsed
    assert [r.id for r in rows] == list(frame["occurrenceID"])
    assert rows[0].data["http://rs.tdwg.org/dwc/terms/scientificName"] == \
        frame["scientificName"][0]


# ---------------------------------------------------------------------- PlantCLEF
def test_plantclef_file_holds_ids_or_is_a_names_file(tmp_path, caplog):
    recs = {"p": [PlotRecord("p", "species", "Carex nigra", 0.9, 2, "species", NIGRA)]}
    with caplog.at_level(logging.WARNING, logger="taxoclass.plots.plantclef"):
        path = write_submission(tmp_path, recs, TAX, taxon_ids={}, year=2024)
    assert path == tmp_path / NAMES_FILE and not (tmp_path / SUBMISSION_FILE).exists()
    assert path.read_text().splitlines() == ["plot_id;species_ids", "p;[Carex nigra]"]
    assert "no PlantCLEF species ids" in caplog.text and NAMES_FILE in caplog.text
    out = tmp_path / "ids"
    path = write_submission(out, recs, TAX, taxon_ids={NIGRA: "1361281"}, year=2025)
    assert path == out / SUBMISSION_FILE and not (out / NAMES_FILE).exists()
    assert path.read_text().splitlines() == ["quadrat_id,species_ids", 'p,[1361281]']
    with pytest.raises(ConfigError, match="'Carex nigra' has no PlantCLEF species id"):
        write_submission(out, recs, TAX, taxon_ids={("Poaceae", "Poa", "Poa annua"): "7"})
    genus_tax = Taxonomy.from_records([{"family": "Poaceae", "genus": "Poa"}],
                                      ranks=("family", "genus"))
    assert write_submission(tmp_path / "g", {}, genus_tax, taxon_ids={}) is None


# ---------------------------------------------------------------------- end to end
def test_plot_report_writes_the_archive_with_metadata(fixture_model, fixture_set, cli,
                                                      tmp_path):
    plots = sorted(fixture_set["plots"].glob("*.jpg"))[:2]
    table = tmp_path / "plots.csv"
    table.write_text(f"plot_id,eventDate,decimalLatitude,decimalLongitude,country\n"
                     f"{plots[0].stem},2024-05-17,43.6,3.88,France\n")
    runs = []
    for run in ("a", "b"):
        out = tmp_path / run
        output = cli("plot-report", "--model", fixture_model["model"], *plots, "--out", out,
                     "--grid", "2", "--plot-metadata", table)
        runs.append(pd.read_csv(out / "occurrences_dwc.csv", dtype=str, keep_default_na=False))
    assert (out / "occurrences_dwca.zip").is_file()
    assert "plantclef_submission_names.csv" in output and not (out / SUBMISSION_FILE).exists()
    assert (out / NAMES_FILE).is_file()
    a, b = runs
    assert len(a) >= 1 and list(a["occurrenceID"]) == list(b["occurrenceID"])
    archive = pd.read_csv(io.StringIO(_read_zip(out / "occurrences_dwca.zip")["occurrence.txt"]),
                          sep="\t", dtype=str, keep_default_na=False, quoting=csv.QUOTE_NONE)
    pd.testing.assert_frame_equal(archive, b)
    first, second = (a[a["eventID"] == p.stem] for p in plots)
    assert len(first) >= 1 and set(first["eventDate"]) == {"2024-05-17"}
    assert set(first["decimalLatitude"]) == {"43.6"} and set(first["country"]) == {"France"}
    assert set(second["eventDate"]) <= {""}  # no row, no EXIF date, no date in "plot_2"
    assert all(re.fullmatch(r"taxoclass \S+ model [0-9a-f]{16}", v) for v in a["identifiedBy"])
    _check_archive(_read_zip(out / "occurrences_dwca.zip"))  # the archive a real run writes


def test_a_license_column_goes_to_the_records_and_eml(tmp_path):
    photo = _jpeg(tmp_path / "A1-20230705.jpg")
    table = tmp_path / "m.csv"
    cc_by = "http://creativecommons.org/licenses/by/4.0/legalcode"
    table.write_text(f"plot_id,license,recordedBy\nA1-20230705,{cc_by},A. Botanist\n")
    frame = darwin_core_frame(_records(), TAX, photos={"A1-20230705": photo}, identified_by="m",
                              metadata=plot_metadata({"A1-20230705": photo}, table))
    assert set(frame["license"]) == {cc_by} and set(frame["recordedBy"]) == {"A. Botanist"}
    files = _read_zip(write_dwc_archive(tmp_path / "a.zip", frame, title="t",
                                        identified_by="m", n_plots=1))
    assert 'term="http://purl.org/dc/terms/license"' in files["meta.xml"]
    rights = ET.fromstring(files["eml.xml"]).find("dataset/intellectualRights/para").text
    assert rights == f"This work is licensed under {cc_by}"


def test_the_real_quadrat_photo_is_dated_by_its_file_name(shared_data):
    meta = photo_metadata(shared_data / "quadrat" / "CBN-can-A1-20230705.jpg")
    assert (meta.eventDate, meta.sources["eventDate"]) == ("2023-07-05", "filename")


# ---------------------------------------------------------------------- standards, offline
def _official_term_uris() -> set[str]:
    """Every current Darwin Core term as a URI, from the shipped official list."""
    names = (DWC_FIXTURES / "all_dwc_vertical.csv").read_text(encoding="utf-8").split()
    assert len(names) > 200 and "occurrenceID" in names
    return {("http://purl.org/dc/terms/" if n in DUBLIN_CORE else "http://rs.tdwg.org/dwc/terms/")
            + n for n in names}


def _check_archive(files: dict[str, str]) -> None:
    """meta.xml valid against the TDWG text guide XSD, every occurrence.txt column an
    official term URI, eml.xml well-formed with what GBIF asks for (title, creator,
    contact, publication date, abstract)."""
    etree = pytest.importorskip("lxml.etree")
    schema = etree.XMLSchema(etree.parse(str(DWC_FIXTURES / "tdwg_dwc_text.xsd"),
                                         etree.XMLParser(no_network=True)))
    meta = etree.fromstring(files["meta.xml"].encode("utf-8"))
    assert schema.validate(etree.ElementTree(meta)), schema.error_log
    official = _official_term_uris()
    ns = {"t": "http://rs.tdwg.org/dwc/text/"}
    terms = [f.get("term") for f in meta.findall("t:core/t:field", ns)]
    header = files["occurrence.txt"].split("\n", 1)[0].split("\t")
    assert len(terms) == len(header) and set(terms) <= official, set(terms) - official
    eml = ET.fromstring(files["eml.xml"])
    assert eml.tag == EML
    for path in ("dataset/title", "dataset/creator/organizationName",
                 "dataset/contact/organizationName", "dataset/pubDate", "dataset/abstract/para"):
        assert (eml.findtext(path) or "").strip(), path


def test_every_term_the_module_writes_is_official():
    assert set(TERMS.values()) <= _official_term_uris()


def test_archive_validates_against_the_text_guide_schema_and_term_list(tmp_path):
    photo = _jpeg(tmp_path / "A1-20230705.jpg", date="2023:07:05 10:00:00")
    table = tmp_path / "m.csv"
    cc_by = "http://creativecommons.org/licenses/by/4.0/legalcode"
    table.write_text("plot_id,license,recordedBy,habitat,locality,country,decimalLatitude,"
                     f"decimalLongitude\nA1-20230705,{cc_by},A. Botanist,meadow,Causse,France,"
                     "44.1,3.2\n")
    frame = darwin_core_frame(_records(), TAX, photos={"A1-20230705": photo}, identified_by="m",
                              metadata=plot_metadata({"A1-20230705": photo}, table))
    files = _read_zip(write_dwc_archive(tmp_path / "a.zip", frame, title="t",
                                        identified_by="m", n_plots=1))
    _check_archive(files)
    assert ET.fromstring(files["eml.xml"]).findtext("dataset/intellectualRights/para")
    # the schema is not a formality: a descriptor without rowType or fields is refused
    etree = pytest.importorskip("lxml.etree")
    schema = etree.XMLSchema(etree.parse(str(DWC_FIXTURES / "tdwg_dwc_text.xsd"),
                                         etree.XMLParser(no_network=True)))
    bad = files["meta.xml"].replace(' rowType="http://rs.tdwg.org/dwc/terms/Occurrence"', "")
    assert not schema.validate(etree.ElementTree(etree.fromstring(bad.encode("utf-8"))))
