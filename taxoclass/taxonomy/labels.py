"""Label encoding: the class index per rank of each labelled image, from the taxonomy."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from .tree import Taxonomy


def encode_labels(taxonomy: Taxonomy, rows: pd.DataFrame) -> tuple[dict[str, np.ndarray],
                                                                   list[tuple]]:
    """Class index per rank for each labelled row (-1 below the label's rank), and the
    taxonomy node of each row.

    ``rows``: one record per image with the rank columns (``family``, ``genus``,
    ``species`` ...), as :meth:`~taxoclass.taxonomy.annotations.Annotations.labelled_images`
    gives them. Returns ``({rank: int64 array [n]}, [node per row])``.
    """
    ranks = taxonomy.ranks
    out = {r: np.full(len(rows), -1, dtype=np.int64) for r in ranks}
    nodes = []
    for i, rec in enumerate(rows.to_dict("records")):
        node = taxonomy.node_for(rec)
        nodes.append(node)
        for r, k in taxonomy.path_indices(node).items():
            out[r][i] = k
    return out, nodes
