"""MkDocs hook (``hooks:`` in mkdocs.yml): LaTeX in code spans rendered as math, at build time.

distclip's docstrings write formulas as LaTeX in single backticks (`\\min(1, \\lambda ...)`), which Markdown makes
code spans. This hook adds a Markdown extension, to the pages and to mkdocstrings' docstrings alike (mkdocstrings
renders them with the site's extensions), that turns each code span holding LaTeX (a control word such as
``\\min``, ``\\|``, or a braced sub- or superscript) into MathML with ``latex2mathml``. Browsers render MathML
natively: no JavaScript, no fonts and no network at build or view time. Other code spans stay code.
"""

import html
import re
import xml.etree.ElementTree as etree

from latex2mathml.converter import convert
from markdown import Extension, Markdown
from markdown.treeprocessors import Treeprocessor
from markdown.util import HTML_PLACEHOLDER_RE

# A LaTeX control word (\min, \text, \lambda), \| (a norm's bars), or a braced subscript or superscript (x_{(k)}).
_LATEX = re.compile(r"\\(?:[A-Za-z]{2,}|\|)|[_^]\{")
_TEXT = re.compile(r"\\text\{([^{}]*)\}")


def latex_to_mathml(latex: str) -> str:
    """Inline MathML for ``latex``; ``\\_`` inside ``\\text{}`` is an underscore, as LaTeX prints it."""
    return convert(_TEXT.sub(lambda m: r"\text{" + m[1].replace(r"\_", "_") + "}", latex))


def is_latex(text: str) -> bool:
    return bool(_LATEX.search(text)) and not any(quote in text for quote in "\"'")


class _MathCodeSpans(Treeprocessor):
    def run(self, root: etree.Element) -> None:
        blocks = {code for pre in root.iter("pre") for code in pre.iter("code")}
        for code in root.iter("code"):
            if code in blocks or len(code) or code.attrib:
                continue
            stashed = HTML_PLACEHOLDER_RE.fullmatch(code.text or "")  # pymdownx.inlinehilite stashes the span
            text = html.unescape(self.md.htmlStash.rawHtmlBlocks[int(stashed[1])] if stashed else code.text or "")
            if not is_latex(text):
                continue
            code.tag, code.attrib["class"] = "span", "math"
            if stashed:
                self.md.htmlStash.rawHtmlBlocks[int(stashed[1])] = latex_to_mathml(text)
            else:
                code.text = self.md.htmlStash.store(latex_to_mathml(text))


class MathCodeSpans(Extension):
    """Code spans holding LaTeX become inline MathML."""

    def extendMarkdown(self, md: Markdown) -> None:
        md.treeprocessors.register(_MathCodeSpans(md), "distclip_math_code_spans", 15)  # after "inline"


def on_config(config):
    config.markdown_extensions.append(MathCodeSpans())
    return config
