"""Plain text out of HTML documentation pages (Debian's manuals ship as HTML), with the standard library.

A page may be given whole or in pieces (``html_pieces_to_text``, as a file is read): the text is
the same either way, and a large page is never held whole, nor its text.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Iterator
from html.parser import HTMLParser

# Tags whose content is not prose, and tags that end a paragraph or a line.
SKIPPED = {"script", "style", "head", "nav", "noscript", "template"}
BLOCKS = {"p", "div", "section", "article", "li", "dt", "dd", "tr", "table", "pre", "blockquote",
          "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "dl", "br", "hr", "title", "figcaption"}


class _TextParser(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0
        self.pre = 0
        self.in_text = False  # the last event was text: more text continues its run (a piece boundary)
        self.space_last = False  # the last text kept ended with a (normalised) space

    def handle_starttag(self, tag, attrs):
        self.in_text = False
        if tag in SKIPPED:
            self.skipping += 1
        elif tag == "pre":
            self.pre += 1
        if tag in BLOCKS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        self.in_text = False
        if tag in SKIPPED:
            self.skipping = max(0, self.skipping - 1)
        elif tag == "pre":
            self.pre = max(0, self.pre - 1)
        if tag in BLOCKS:
            self.parts.append("\n\n")

    def handle_data(self, data):
        continued, self.in_text = self.in_text, True
        if self.skipping:
            return
        if not self.pre:
            data = re.sub(r"\s+", " ", data)
            if continued and data.startswith(" ") and self.space_last:
                data = data[1:]  # one whitespace run that a piece boundary cut in two
        if data:
            self.parts.append(data)
            self.space_last = data.endswith(" ")


def html_to_text(markup: str) -> str:
    """The page's prose: tags and scripts dropped, entities decoded, one blank line between
    paragraphs; preformatted blocks (code, shell sessions) keep their lines."""
    return "".join(html_pieces_to_text([markup]))


def html_pieces_to_text(pieces: Iterable[str]) -> Iterator[str]:
    """``html_to_text`` of the page that ``pieces`` make up, given a paragraph at a time."""
    parser, pending, first = _TextParser(), [], True
    for piece in itertools.chain(pieces, [None]):  # read as consumed; None: the end
        if piece is None:
            parser.close()
        else:
            parser.feed(piece)
        new, parser.parts = "".join(parser.parts), []
        if piece is not None and "\n\n" not in (pending[-1][-1:] if pending else "") + new:
            pending.append(new)  # the paragraph goes on: what came before is not scanned again
            continue
        paragraphs = "".join([*pending, new]).split("\n\n")
        pending = [] if piece is None else [paragraphs.pop()]  # may go on in the next piece
        for paragraph in paragraphs:
            if (kept := paragraph.strip(" \t").strip("\n")).strip():
                yield kept if first else "\n\n" + kept
                first = False
    if not first:
        yield "\n"
