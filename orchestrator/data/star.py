"""RELION STAR files as ingest reads them: tables with their line numbers, key-value blocks,
and the RELION 3.0–5 / Warp conventions that decide what a particle row means.

Why not `starfile` (teamtomo) for reading: measured on particle files, it turns a short row into
silently padded NaN/empty values, fails a whole file on one long row (naming neither file nor
line), converts numeric-looking tomogram names ("001" → 1), and keeps no line numbers; ingest
must reject one bad row, name it, and keep the rest. `starfile` writes the exported predictions
(orchestrator/campaign/export.py), where none of that applies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

PIPELINE_FILE = "default_pipeline.star"  # marks a RELION project folder
TWO_D_FLAG = "rlnTomoSubTomosAre2DStacks"
DIMENSIONALITY = "rlnImageDimensionality"


class StarError(ValueError):
    """A STAR file that cannot be used at all; the message names the file (and line)."""


@dataclass
class StarTable:
    """One loop of a STAR file: column names without the leading underscore, and the rows with
    their 1-based line numbers."""

    block: str
    columns: list[str]
    rows: list[tuple[int, list[str]]]


@dataclass
class StarFile:
    path: Path
    tables: list[StarTable] = field(default_factory=list)
    pairs: dict[str, dict[str, str]] = field(default_factory=dict)  # block → key → value

    def value(self, block: str, key: str) -> str | None:
        """A block's key-value pair, or the first row of a one-row loop (RELION writes
        data_general both ways)."""
        if key in self.pairs.get(block, {}):
            return self.pairs[block][key]
        for table in self.tables:
            if table.block == block and key in table.columns and table.rows:
                values = table.rows[0][1]
                column = table.columns.index(key)
                return values[column] if column < len(values) else None
        return None

    def table(self, block: str) -> StarTable | None:
        return next((t for t in self.tables if t.block == block), None)


_STAR_TOKEN = re.compile(r"""'([^']*)'|"([^"]*)"|(\S+)""")


def _star_tokens(line: str) -> list[str]:
    tokens = []
    for match in _STAR_TOKEN.finditer(line):
        single, double, bare = match.groups()
        if bare is not None and bare.startswith("#"):
            break  # a comment runs to the end of the line
        tokens.append(bare if bare is not None else single if single is not None else double)
    return tokens


def read_star(path: str | Path) -> StarFile:
    """Every loop_ and every key-value pair of a STAR file."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise StarError(f"{path}: cannot read STAR file ({err})") from err
    star = StarFile(path)
    block = ""
    current: StarTable | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        tokens = _star_tokens(line)
        if not tokens:
            continue
        head = tokens[0]
        if head.startswith("data_"):
            block, current = head[len("data_"):], None
        elif head == "loop_":
            current = StarTable(block, [], [])
            star.tables.append(current)
        elif head.startswith("_"):
            if current is not None and not current.rows:
                current.columns.append(head[1:])
            else:
                current = None  # a key-value pair after a loop ends the loop
                if len(tokens) > 1:
                    star.pairs.setdefault(block, {})[head[1:]] = tokens[1]
        elif head == "stop_":
            current = None
        elif current is not None:
            current.rows.append((number, tokens))
        else:
            raise StarError(f"{path} line {number}: a value outside any loop_ ({line.strip()[:60]!r})")
    return star


def parse_star(path: str | Path) -> list[StarTable]:
    """Every loop_ in a STAR file."""
    return read_star(path).tables


def particle_table(star: StarFile) -> StarTable:
    """The table of images: data_particles in RELION ≥ 3.1, the only loop in RELION 3.0."""
    tables = [t for t in star.tables if t.columns]
    if not tables:
        raise StarError(f"{star.path}: no loop_ table found (is this a RELION STAR file?)")
    with_images = [t for t in tables if "rlnImageName" in t.columns]
    if not with_images:
        raise StarError(
            f"{star.path}: no table has an rlnImageName column (blocks: {sorted({t.block for t in tables})})"
            + (": it lists coordinates, not extracted subtomograms; extract them first"
               if any("rlnCoordinateX" in t.columns for t in tables) else "")
        )
    particles = [t for t in with_images if t.block == "particles"]
    table = (particles or with_images)[0]
    if not table.rows:
        raise StarError(f"{star.path}: the particle table (data_{table.block}) has no rows: nothing to ingest")
    return table


def two_d_groups(star: StarFile) -> set[str] | None:
    """Which particles are 2-D tilt-image stacks (RELION 5 / Warp pseudo-subtomograms):
    None = every particle (data_general says so), else the optics groups whose
    rlnImageDimensionality is 2 (empty: none)."""
    flag = star.value("general", TWO_D_FLAG)
    if flag is not None and flag.strip() not in ("0", "0.0"):
        return None
    optics = star.table("optics")
    if optics is None or DIMENSIONALITY not in optics.columns or "rlnOpticsGroup" not in optics.columns:
        return set()
    group, dims = optics.columns.index("rlnOpticsGroup"), optics.columns.index(DIMENSIONALITY)
    return {values[group] for _, values in optics.rows
            if len(values) == len(optics.columns) and values[dims].strip() == "2"}


TWO_D_HELP = (
    "2-D tilt-image stacks (RELION 5 / Warp pseudo-subtomograms), not 3-D subtomograms. "
    "Extract 3-D subtomograms instead: RELION 5 Extract subtomos with 'Write output as 2D "
    "stacks?' set to No (relion_tomo_subtomo without --stack2d), or WarpTools "
    "ts_export_particles --3d; then ingest that job's particles.star"
)


def find_project_dir(star_path: Path) -> Path | None:
    """The RELION project folder: the nearest folder at or above the STAR file's that holds
    default_pipeline.star (RELION writes every path relative to it)."""
    here = star_path.resolve().parent
    for folder in (here, *here.parents):
        if (folder / PIPELINE_FILE).is_file():
            return folder
    return None
