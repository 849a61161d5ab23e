"""The README is the front door and the details live beside what they describe.

README.md stays short (at most README_MAX_LINES lines) and readable (no prose line over PROSE_MAX_CHARS characters;
tables and code blocks may be wider), links to every README beside the code, and no relative link or image in any of
these documents points at a file or heading that is not there — a moved section or renamed heading shows up here,
not as a dead link on the project page. In-process, text only.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250
PROSE_MAX_CHARS = 200
# the front door and the READMEs beside what they describe
FRONT_DOOR = "README.md"
BESIDE_THE_CODE = (
    "kernels/README.md",
    "kernels/pixart/README.md",
    "kernels/flux_easycontrol/README.md",
    "kernels/dit4sr/README.md",
    "kernels/controlar/README.md",
    "tests/README.md",
    "tests/benchmarks/README.md",
    "tests/training/README.md",
)
DOCS = (FRONT_DOOR,) + BESIDE_THE_CODE

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`[^`\n]*`")
# [text](target) and ![alt](target), with an optional "title"; <img src=...> / <a href=...>; [ref]: target
MD_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_LINK = re.compile(r"<(?:img|a)\b[^>]*?\b(?:src|href)\s*=\s*[\"']([^\"']+)[\"']", re.I)
REF_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def outside_code(text: str) -> list[tuple[int, str]]:
    """(line number, line) for every line that is not inside a fenced code block (fence lines dropped)."""
    lines, in_fence = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            lines.append((number, line))
    return lines


def long_prose_lines(text: str, limit: int = PROSE_MAX_CHARS) -> list[str]:
    """Prose lines longer than `limit` characters: tables (a line starting with '|') and code blocks may be wider,
    since a table row cannot wrap and a command must stay copyable."""
    return [f"line {n}: {len(line)} characters" for n, line in outside_code(text)
            if len(line) > limit and not line.lstrip().startswith("|")]


def link_targets(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every Markdown / HTML link and image outside code blocks and code spans."""
    found = []
    for number, line in outside_code(text):
        line = INLINE_CODE.sub("", line)
        for pattern in (MD_LINK, HTML_LINK, REF_LINK):
            found += [(number, m.group(1)) for m in pattern.finditer(line)]
    return found


def heading_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: link text kept, lower case, everything but letters, digits, '_', '-' and
    spaces dropped (so `code`, *emphasis*, '.', '(' and '—' vanish), spaces become '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor; a repeated heading gets -1, -2, … as on GitHub."""
    seen: dict[str, int] = {}
    for _, line in outside_code(text):
        m = HEADING.match(line)
        if not m:
            continue
        slug = heading_slug(m.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        if count:
            seen[f"{slug}-{count}"] = 1
    return set(seen)


def ignored_folders(repo: Path) -> list[tuple[str, bool]]:
    """(folder, only at the top) for each folder .gitignore keeps out of a clone: what set-up and runs make there."""
    gitignore = repo / ".gitignore"
    entries = gitignore.read_text().splitlines() if gitignore.exists() else []
    return [(e.strip().strip("/"), e.strip().startswith("/")) for e in entries
            if e.strip().endswith("/") and not re.search(r"[*?\[!]", e)]


def broken_links(doc: Path, repo: Path = REPO) -> list[str]:
    """Each relative link or image in `doc` that would not resolve in a fresh clone of `repo`: a missing file or
    folder, a path outside the repository or inside a git-ignored folder, or a #anchor with no such heading."""
    text = doc.read_text()
    ignored = ignored_folders(repo)
    problems = []
    for number, target in link_targets(text):
        if SCHEME.match(target):
            continue                                    # http(s), mailto: not a file of ours
        path_part, _, anchor = target.partition("#")
        where = f"line {number}: {target}"
        path = (doc.parent / path_part).resolve() if path_part else doc
        try:
            parts = path.relative_to(repo.resolve()).parts
        except ValueError:
            problems.append(f"{where}: outside the repository")
            continue
        if not path.exists():
            problems.append(f"{where}: no such file ({path.relative_to(repo.resolve())})")
            continue
        for folder, top_only in ignored:
            if (parts[:1] == (folder,)) if top_only else folder in parts[:-1]:
                problems.append(f"{where}: inside the git-ignored {folder}/, absent from a fresh clone")
        if anchor:
            if path.suffix != ".md":
                problems.append(f"{where}: an anchor into a file that is not Markdown")
            elif anchor not in anchors(path.read_text()):
                problems.append(f"{where}: {'/'.join(parts) or path.name} has no heading with the anchor #{anchor}")
    return problems


def test_readme_is_a_front_door():
    text = (REPO / FRONT_DOOR).read_text()
    lines = len(text.splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines, expected at most {README_MAX_LINES}: move details into the README beside "
        f"what they describe ({', '.join(BESIDE_THE_CODE)})")
    linked = {(REPO / target.partition("#")[0]).resolve() for _, target in link_targets(text)}
    unlinked = [d for d in BESIDE_THE_CODE if (REPO / d).resolve() not in linked]
    assert not unlinked, f"README.md does not link to {unlinked}: every README beside the code is reachable from it"


@pytest.mark.parametrize("doc", DOCS)
def test_prose_lines_are_readable(doc):
    path = REPO / doc
    assert path.exists(), f"{doc} is missing"
    too_long = long_prose_lines(path.read_text())
    assert not too_long, f"{doc}: prose lines over {PROSE_MAX_CHARS} characters (wrap them):\n" + "\n".join(too_long)


@pytest.mark.parametrize("doc", DOCS)
def test_links_and_images_resolve(doc):
    path = REPO / doc
    assert path.exists(), f"{doc} is missing"
    problems = broken_links(path)
    assert not problems, f"{doc}: links that do not resolve:\n" + "\n".join(problems)


@pytest.mark.parametrize("heading,slug", [
    ("Sizes, memory and bad input", "sizes-memory-and-bad-input"),
    ("EasyControl on core FLUX.1", "easycontrol-on-core-flux1"),
    ("VAE decode at 1024 px (`bench_vae_decode.py`)", "vae-decode-at-1024-px-bench_vae_decodepy"),
    ("PixArt-α and PixArt-δ", "pixart-α-and-pixart-δ"),
    ("Sampling PixArt-δ (LCM) in 4 steps: two routes, one latent",
     "sampling-pixart-δ-lcm-in-4-steps-two-routes-one-latent"),
    ("Quick start — **two** commands", "quick-start--two-commands"),
    ("See [the tests](tests/README.md)", "see-the-tests"),
])
def test_heading_slugs_follow_github(heading, slug):
    assert heading_slug(heading) == slug


def test_the_checks_catch_each_kind(tmp_path):
    """A small repository with one of each problem next to the cases that must pass."""
    (tmp_path / ".gitignore").write_text("/output/\n__pycache__/\n")
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / "demo.png").write_bytes(b"")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# Page\n\n## Page\n\n### Sizes, memory and bad input\n")
    (tmp_path / "pic.png").write_bytes(b"")
    doc = tmp_path / "README.md"
    doc.write_text("\n".join([
        "# Title",
        "[fine](docs/page.md#sizes-memory-and-bad-input) ![fine](pic.png) [fine](https://example.org/x)",
        "[fine, repeated heading](docs/page.md#page-1) [fine, own heading](#title) [fine](docs/)",
        "[missing file](docs/gone.md) ![missing image](gone.png) <img src=\"gone.jpg\">",
        "[missing anchor](docs/page.md#no-such-heading) [own missing anchor](#nowhere)",
        "[outside](../elsewhere.md) [ignored](output/demo.png) [anchor into an image](pic.png#x)",
        "`[not a link](in/a/code/span.md)`",
        "```",
        "[not a link](in/a/code/block.md)",
        "```",
    ]) + "\n")
    problems = "\n".join(broken_links(doc, repo=tmp_path))
    for expected in ("docs/gone.md: no such file", "gone.png: no such file", "gone.jpg: no such file",
                     "no heading with the anchor #no-such-heading", "no heading with the anchor #nowhere",
                     "../elsewhere.md: outside the repository", "inside the git-ignored output/",
                     "pic.png#x: an anchor into a file that is not Markdown"):
        assert expected in problems, f"{expected!r} not reported; got:\n{problems}"
    assert len(problems.splitlines()) == 8, problems          # and nothing of the fine lines or the code
    assert long_prose_lines("x" * 201 + "\n| " + "y" * 300 + " |\n```\n" + "z" * 300 + "\n```\n") == [
        "line 1: 201 characters"]
    assert long_prose_lines("x" * 200) == []
