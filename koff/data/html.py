"""Plain text out of HTML documentation pages (Debian's manuals ship as HTML), with the standard library."""

from __future__ import annotations

import re
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

    def handle_starttag(self, tag, attrs):
        if tag in SKIPPED:
            self.skipping += 1
        elif tag == "pre":
            self.pre += 1
        if tag in BLOCKS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if tag in SKIPPED:
            self.skipping = max(0, self.skipping - 1)
        elif tag == "pre":
            self.pre = max(0, self.pre - 1)
        if tag in BLOCKS:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if not self.skipping:
            self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))


def html_to_text(markup: str) -> str:
    """The page's prose: tags and scripts dropped, entities decoded, one blank line between
    paragraphs; preformatted blocks (code, shell sessions) keep their lines."""
    parser = _TextParser()
    parser.feed(markup)
    parser.close()
    paragraphs = (part.strip(" \t") for part in "".join(parser.parts).split("\n\n"))
    return "\n\n".join(p.strip("\n") for p in paragraphs if p.strip()) + "\n"
