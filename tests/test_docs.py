"""Documentation consistency: method.md citations resolve, and relative markdown links point at real files.

- Every citation of the method reference in the code ("method.md section N", "method.md sections N and M",
  "method.md N.M", wrapped over lines or not) under src/, tests/, benchmarks/ and examples/ must name a section
  that docs/method.md has a heading for ("## N." or "### N.M ...").
- Every relative link in README.md, docs/*.md, benchmarks/README.md and lab/*.md (inline ``[text](target)``, images,
  reference definitions) must point at a file or folder of the repository. http(s)/mailto links and anchor-only
  links are not checked, and a "#anchor" suffix is ignored. Links inside fenced code blocks are not links.
- Every repository path that the code and the docs cite by name (``docs/...``, ``benchmarks/...``, ``lab/...``,
  ``tests/...``, ``src/onestep/...``, ``assets/...`` ending in a file suffix) exists: a moved or renamed file leaves
  no stale citation behind. Paths with placeholders (``<row>``, ``*``, ``{json,md}``) name families of files and are
  checked up to the placeholder.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "method.md"
CITING_DIRS = ("src", "tests", "benchmarks", "lab")
CITING_SUFFIXES = {".py", ".md", ".txt", ".toml", ".cfg", ".sh"}

SECTION_NUMBER = r"\d+(?:\.\d+)*"
# "method.md section 1", "method.md sections 1 and 2.1", "method.md 2.3", "method.md section 3, ..." (a number
# right after "method.md" needs no "section"; "method.md, 1-based k" is not a citation).
CITATION = re.compile(
    rf"method\.md\s+(?:sections?\s+)?({SECTION_NUMBER}(?:\s*(?:,|and|&)\s*{SECTION_NUMBER})*)(?![\w-])",
    re.IGNORECASE)
HEADING = re.compile(rf"^#{{1,6}}\s+({SECTION_NUMBER})\.?(?:\s|$)", re.MULTILINE)

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'(][^)]*)?\)")
REFERENCE_DEF = re.compile(r"^[ \t]{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def _citing_files() -> list[Path]:
    files = []
    for d in CITING_DIRS:
        base = ROOT / d
        if base.is_dir():
            files += [p for p in sorted(base.rglob("*")) if p.is_file() and p.suffix in CITING_SUFFIXES
                      and "__pycache__" not in p.parts]
    return files


def cited_sections() -> dict[str, list[str]]:
    """{section number: ["path:line", ...]} over every citation of method.md."""
    cited: dict[str, list[str]] = {}
    for path in _citing_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for m in CITATION.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            for number in re.findall(SECTION_NUMBER, m.group(1)):
                cited.setdefault(number, []).append(f"{path.relative_to(ROOT)}:{line}")
    return cited


def method_sections() -> set[str]:
    return set(HEADING.findall(FENCE.sub("", METHOD.read_text(encoding="utf-8"))))


def relative_links(md: Path) -> list[tuple[int, str]]:
    """(line, target without #anchor) of every relative link in a markdown file."""
    text = md.read_text(encoding="utf-8")
    # blank out fenced code blocks but keep their newlines, so line numbers stay right
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    out = []
    for pattern in (INLINE_LINK, REFERENCE_DEF):
        for m in pattern.finditer(text):
            target = m.group(1)
            if EXTERNAL.match(target) or target.startswith("#"):
                continue
            target = target.split("#", 1)[0].split("?", 1)[0]
            if target:
                out.append((text.count("\n", 0, m.start()) + 1, target))
    return out


def _markdown_pages() -> list[Path]:
    return ([ROOT / "README.md", ROOT / "benchmarks" / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
            + sorted((ROOT / "lab").glob("*.md")))


# a repository path cited in prose or code: a known top folder, then path characters, ending in a file suffix
CITED_PATH = re.compile(r"(?<![\w./-])((?:docs|benchmarks|lab|tests|src/onestep|assets)/[\w./-]*?\.(?:md|py|json|png))"
                        r"(?![\w])")


def cited_paths() -> dict[str, list[str]]:
    """{path: ["file:line", ...]} of the repository paths named in src/, tests/, benchmarks/*.py, lab/*.py and the
    markdown pages (results files and run records, which quote the commands of their own time, are not read)."""
    files = [p for d in ("src", "tests") for p in sorted((ROOT / d).rglob("*.py"))]
    files += sorted((ROOT / "benchmarks").glob("*.py")) + sorted((ROOT / "lab").rglob("*.py")) + _markdown_pages()
    out: dict[str, list[str]] = {}
    for path in files:
        if "__pycache__" in path.parts or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for m in CITED_PATH.finditer(text):
            out.setdefault(m.group(1), []).append(f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}")
    return out


def test_cited_repository_paths_exist():
    paths = cited_paths()
    assert len(paths) >= 20, f"expected many cited paths, found {len(paths)}"
    missing = {p: s for p, s in paths.items() if not (ROOT / p).exists()}
    assert not missing, "cited paths that do not exist: " + "; ".join(
        f"{p} ({', '.join(s[:2])})" for p, s in sorted(missing.items()))


CITED_TEST = re.compile(r"(tests/test_\w+\.py)::(test_\w+)")


def test_every_test_the_docs_name_exists():
    """A test named in the docs as ``tests/<file>.py::NAME`` (the fault table of runs-and-checkpoints.md) is a test
    function of that file."""
    cited = {(m.group(1), m.group(2)) for page in _markdown_pages() if page.is_file()
             for m in CITED_TEST.finditer(page.read_text(encoding="utf-8"))}
    assert len(cited) >= 40, sorted(cited)
    missing = [f"{f}::{name}" for f, name in sorted(cited)
               if not (ROOT / f).is_file() or not re.search(rf"^def {name}\(", (ROOT / f).read_text(), re.MULTILINE)]
    assert not missing, f"the docs name tests that do not exist: {missing}"


def test_citation_pattern_reads_every_form():
    text = ("(method.md section 1; ...) method.md sections 1 and 2.1 (method.md 2.3) "
            "method.md section 3, \"Stages\" 4 (method.md, 1-based k) method.md\n    section 2.5")
    found = [re.findall(SECTION_NUMBER, m.group(1)) for m in CITATION.finditer(text)]
    assert found == [["1"], ["1", "2.1"], ["2.3"], ["3"], ["2.5"]]


def test_method_md_exists():
    assert METHOD.is_file(), "docs/method.md (the method reference the code cites) is missing"


def test_every_cited_method_section_has_a_heading():
    cited = cited_sections()
    assert len(cited) >= 5, f"expected the code to cite several method.md sections, found {sorted(cited)}"
    headings = method_sections()
    missing = {n: sites for n, sites in cited.items() if n not in headings}
    assert not missing, ("docs/method.md has no heading for cited sections: "
                         + "; ".join(f"{n} (cited at {', '.join(s[:3])}{', ...' if len(s) > 3 else ''})"
                                     for n, s in sorted(missing.items())))


@pytest.mark.parametrize("page", _markdown_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_markdown_links_resolve(page):
    if not page.is_file():
        pytest.skip(f"{page.relative_to(ROOT)} does not exist")
    broken = [f"line {line}: {target}" for line, target in relative_links(page)
              if not (page.parent / target).resolve().exists()]
    assert not broken, f"{page.relative_to(ROOT)} links to missing files: " + "; ".join(broken)
