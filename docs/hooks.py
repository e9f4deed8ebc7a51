"""MkDocs hook (mkdocs.yml, `hooks:`): links in files included from the repository's top folder.

docs/benchmarks.md includes BENCHMARKS.md with pymdownx.snippets (`--8<-- "BENCHMARKS.md"`). That file
lives at the top of the repository and links pictures and pages of this folder as `docs/NAME` (right on
GitHub); inside the site they are at `NAME`. A Markdown preprocessor that runs after snippets' (priority
32) drops the `docs/` in front of such link targets, so that `mkdocs build --strict` finds them.
"""

import re

from markdown import Extension
from markdown.preprocessors import Preprocessor

_DOCS_LINK = re.compile(r"(\]\()docs/")


class _DocsLinks(Preprocessor):
    def run(self, lines: list[str]) -> list[str]:
        return [_DOCS_LINK.sub(r"\1", line) for line in lines]


class _DocsLinksExtension(Extension):
    def extendMarkdown(self, md) -> None:  # Markdown's name
        md.preprocessors.register(_DocsLinks(md), "docs_links", 31)


def on_config(config):
    config.markdown_extensions.append(_DocsLinksExtension())
    return config
