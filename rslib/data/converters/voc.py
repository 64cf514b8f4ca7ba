"""Pascal VOC XML annotation files (DIOR, DIOR-R, DIOR-RSVG), parsed with the line of each element for the
error messages."""
from __future__ import annotations

import codecs
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable
from xml.parsers import expat

import numpy as np

from rslib.data.converters.common import MAX_IMAGE_SIDE, InvalidValues, class_key, image_size, read_text
from rslib.data.records import DataFormatError

_XML_TRUNCATED = (expat.errors.XML_ERROR_NO_ELEMENTS, expat.errors.XML_ERROR_UNCLOSED_TOKEN,
                  expat.errors.XML_ERROR_PARTIAL_CHAR, expat.errors.XML_ERROR_UNCLOSED_CDATA_SECTION)


class VocXml:
    """A parsed XML file that remembers each element's line, for error messages."""

    def __init__(self, path: Path):
        self.path = path
        builder = ET.TreeBuilder()
        self._lines: dict[int, int] = {}
        parser = expat.ParserCreate()

        def start(tag: str, attrs: dict[str, str]) -> None:
            self._lines[id(builder.start(tag, attrs))] = parser.CurrentLineNumber

        parser.StartElementHandler = start
        parser.EndElementHandler = builder.end
        parser.CharacterDataHandler = builder.data
        data = path.read_bytes()
        try:
            parser.Parse(data, True)
        except expat.ExpatError as e:
            if not re.match(rb"\s*<\?xml[^>]*encoding", data.lstrip(codecs.BOM_UTF8)):  # UTF-8 unless declared
                read_text(path)  # names the line of a byte that is not UTF-8
            message = expat.ErrorString(e.code)
            raise DataFormatError(path, f"XML does not parse ({message}, column {e.offset + 1})", e.lineno,
                                  "the file ends early, it may be truncated: extract it again"
                                  if message in _XML_TRUNCATED else "correct the XML at this line") from None
        self.root = builder.close()

    def line(self, el: ET.Element) -> int | None:
        """The line ``el`` starts on."""
        return self._lines.get(id(el))

    def reporter(self, el: ET.Element, invalid: InvalidValues) -> Callable[[str, str], None]:
        """``report(reason, value)`` for :func:`norm_object`: an invalid value of ``el``, at its line."""
        return lambda reason, value: invalid.found(self.path, self.line(el), reason, value)

    def fail(self, el: ET.Element, message: str, fix: str = "") -> DataFormatError:
        """A :class:`DataFormatError` about ``el``, at its line."""
        return DataFormatError(self.path, message, self.line(el), fix)

    def number(self, el: ET.Element, tag: str, finite: bool = True) -> float:
        """The number in ``el``'s child ``tag`` (``finite=False`` lets inf and nan through, for a box checker)."""
        child = el.find(tag)
        if child is None:
            raise self.fail(el, f"<{el.tag}> has no <{tag}>")
        try:
            value = float((child.text or "").strip())
        except ValueError:
            raise self.fail(child, f"<{tag}> is not a number: {child.text!r}") from None
        if finite and not np.isfinite(value):
            raise self.fail(child, f"<{tag}> is not finite: {child.text!r}")
        return value

    def label(self, obj: ET.Element, lookup: dict[str, str]) -> str:
        """The canonical class of an <object>'s <name> (``lookup`` by :func:`class_key`)."""
        name = obj.find("name")
        if name is None or not (name.text or "").strip():
            raise self.fail(obj, "<object> has no <name>")
        canonical = lookup.get(class_key(name.text or ""))
        if canonical is None:
            raise self.fail(name, f"unknown class {name.text.strip()!r}",
                            f"known classes: {', '.join(sorted(set(lookup.values())))}")
        return canonical

    def size(self, image: Path) -> tuple[float, float]:
        """(width, height) from <size>, or from the image header when absent or zero."""
        size = self.root.find("size")
        if size is not None and size.find("width") is not None and size.find("height") is not None:
            w, h = self.number(size, "width"), self.number(size, "height")
            if max(w, h) > MAX_IMAGE_SIDE:
                raise self.fail(size, f"<size> {w:g} x {h:g} is not the size of an image")
            if w > 0 and h > 0:
                return w, h
        return image_size(image, self.path)


def object_boxes(xml: VocXml, lookup: dict[str, str], box_tag: str,
                 fields: tuple[str, ...]) -> list[tuple[str, list[float], ET.Element]]:
    """(label, the numbers ``fields`` of its <``box_tag``>, element) of each <object>; an object without that
    box element is an error naming it."""
    out = []
    for obj in xml.root.iter("object"):
        label = xml.label(obj, lookup)
        box = obj.find(box_tag)
        if box is None:
            raise xml.fail(obj, f"<object> has no <{box_tag}>")
        out.append((label, [xml.number(box, t, finite=False) for t in fields], obj))
    return out


def voc_boxes(xml: VocXml, lookup: dict[str, str]) -> list[tuple[str, list[float], ET.Element]]:
    """(label, [xmin, ymin, xmax, ymax] in pixels, element) of each <object> with a <bndbox>."""
    return object_boxes(xml, lookup, "bndbox", ("xmin", "ymin", "xmax", "ymax"))
