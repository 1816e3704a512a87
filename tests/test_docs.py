"""Every pointer to the method document leads somewhere that exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHOD = REPO / "docs" / "method.md"
#: The team's old name for the document, which is not in the repository.
OLD_NAME = "METHOD" + ".md"


def tracked_text_files() -> list[Path]:
    suffixes = {".py", ".md", ".toml", ".txt", ".cfg", ""}
    listed = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=False
    )
    if listed.returncode == 0:
        names = listed.stdout.split()
    else:  # an unpacked source archive, not a git checkout: the shipped folders
        names = [
            str(path.relative_to(REPO))
            for folder in ("cnnbal", "tests", "docs", "benchmarks", "sample_data")
            for path in (REPO / folder).rglob("*")
            if "__pycache__" not in path.parts
        ] + [path.name for path in REPO.iterdir() if path.is_file() and path.name[0] != "."]
    return [REPO / name for name in names if Path(name).suffix in suffixes]


def method_sections() -> set[str]:
    """Section numbers of docs/method.md: "3" for "## 3. ...", "7.1" for "### 7.1 ..."."""
    text = METHOD.read_text(encoding="utf-8")
    return set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", text, flags=re.M))


def test_method_document_has_the_numbered_sections_code_cites():
    assert {"1", "2", "3", "4", "5", "6", "7", "8"} <= method_sections()


def test_no_reference_to_a_method_file_outside_the_repository():
    offenders = [
        f"{path.relative_to(REPO)}:{number}"
        for path in tracked_text_files()
        if path.is_file() and path != Path(__file__)
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if OLD_NAME in line
    ]
    assert offenders == []


def test_every_cited_section_exists():
    sections = method_sections()
    cited = set()
    pattern = re.compile(r"docs/method\.md,? sections? (\d+(?:\.\d+)?)(?:\s*-\s*(\d+))?")
    for path in tracked_text_files():
        if not path.is_file():
            continue
        for match in pattern.finditer(path.read_text(encoding="utf-8")):
            first, last = match.group(1), match.group(2)
            cited.add(first)
            if last:  # a range "sections 2-3"
                cited.update(str(n) for n in range(int(first), int(last) + 1))
    assert len(cited) >= 7  # the code really cites it, section by section
    assert cited <= sections, f"cited but missing: {sorted(cited - sections)}"


def test_readme_links_resolve_to_files():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if "://" not in link]
    assert "docs/method.md" in local
    missing = [link for link in local if not (REPO / link).exists()]
    assert missing == []
