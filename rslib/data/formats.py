"""The record format and the readers of real data sets, by one name: ``from rslib.data.formats import X``.

Each concept lives in its own module; this one only re-exports their public names:

- :mod:`rslib.data.records`: the record schema (:class:`Record`, :class:`ObjectAnnotation`, the metadata fields and
  their limits, the condition names), the errors (:class:`DataFormatError`, :class:`UsageError`), the file-name
  safety checks, :func:`read_records`, the writer :class:`DatasetWriter` and the data set marker;
- :mod:`rslib.data.captions`: the caption builders (counts, positions, directions, CC-Diff's layout caption);
- :mod:`rslib.data.ccdiff_metadata`: CC-Diff's own ``metadata.jsonl`` written from a split;
- :mod:`rslib.data.converters`: :func:`convert` and :class:`InvalidValues`, with one module per data set
  (``rsicd``, ``fmow``, ``dior`` (DIOR and DIOR-R), ``dior_rsvg``, ``dota``, ``dota_tiling``) and what they share
  (``common``, ``voc``).
"""
from rslib.data.captions import (
    DIOR_SCENE_CLASSES,
    DIRECTIONS,
    GENERIC_SCENE,
    NUMBER_WORDS,
    count_words,
    dior_scene,
    layout_caption,
    layout_sentence,
    obb_direction,
    position_phrase,
)
from rslib.data.ccdiff_metadata import CCDIFF_INSTANCES, write_ccdiff_metadata, write_ccdiff_split
from rslib.data.converters import CONVERT_FORMATS, InvalidValues, convert
from rslib.data.converters.common import IMAGE_EXTENSIONS, MAX_IMAGE_SIDE, SPLITS, image_problem
from rslib.data.converters.dior import DIOR_CLASSES
from rslib.data.converters.dota import DOTA_CLASSES_V10, DOTA_CLASSES_V15
from rslib.data.converters.dota_tiling import DOTA_GAP, DOTA_MIN_VISIBLE, dota_tiles, tile_object, tile_origins
from rslib.data.converters.fmow import FMOW_CLASSES, FMOW_FALSE_DETECTION
from rslib.data.records import (
    CONDITION_NAMES,
    CONTENT,
    DATASET_MARKER,
    MARKER_VERSION,
    METADATA_FIELDS,
    METADATA_LIMITS,
    DataFormatError,
    DatasetWriter,
    ObjectAnnotation,
    Record,
    UsageError,
    check_output_folder,
    dataset_info,
    encode_png,
    iter_split_dirs,
    metadata_problem,
    read_records,
    unsafe_name_reason,
    write_jsonl,
    written_here,
)

__all__ = [
    # records
    "CONDITION_NAMES", "CONTENT", "DATASET_MARKER", "MARKER_VERSION", "METADATA_FIELDS", "METADATA_LIMITS",
    "DataFormatError", "DatasetWriter", "ObjectAnnotation", "Record", "UsageError", "check_output_folder",
    "dataset_info", "encode_png", "iter_split_dirs", "metadata_problem", "read_records", "unsafe_name_reason",
    "write_jsonl", "written_here",
    # captions
    "DIOR_SCENE_CLASSES", "DIRECTIONS", "GENERIC_SCENE", "NUMBER_WORDS", "count_words", "dior_scene",
    "layout_caption", "layout_sentence", "obb_direction", "position_phrase",
    # CC-Diff's metadata
    "CCDIFF_INSTANCES", "write_ccdiff_metadata", "write_ccdiff_split",
    # converters
    "CONVERT_FORMATS", "DIOR_CLASSES", "DOTA_CLASSES_V10", "DOTA_CLASSES_V15", "DOTA_GAP", "DOTA_MIN_VISIBLE",
    "FMOW_CLASSES", "FMOW_FALSE_DETECTION", "IMAGE_EXTENSIONS", "InvalidValues", "MAX_IMAGE_SIDE", "SPLITS",
    "convert", "dota_tiles", "image_problem", "tile_object", "tile_origins",
]
