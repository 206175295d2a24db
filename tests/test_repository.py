"""The repository's own rules, checked on every run: the README stays a five-minute read, every job flag is in
docs/jobs.md, no code comment keeps a dated measurement diary, no branch on a conditioning kind's or a demo task's
name outside their own modules, the rooms import one way, and functions stay readable."""
import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = [p for d in ("ldm", "pipeline", "jobs") for p in (ROOT / d).rglob("*.py")]
DATE = re.compile(r"20\d\d-\d\d-\d\d|\d\d:\d\d UTC")


def test_readme_is_short_and_points_at_the_docs():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    assert len(DATE.findall(text)) <= 10
    for doc in ("jobs.md", "benchmarks.md", "measurements.md", "architecture.md", "operations.md"):
        assert (ROOT / "docs" / doc).exists() and f"docs/{doc}" in text


def test_docs_jobs_md_holds_every_jobs_help_as_it_is():
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "_docs.py")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout in (ROOT / "docs" / "jobs.md").read_text(), "docs/jobs.md is stale: python jobs/_docs.py --write"
    for job in sorted(p.stem for p in (ROOT / "jobs").glob("*.py") if not p.stem.startswith("_")):
        assert f"### `jobs/{job}.py`" in r.stdout, f"jobs/{job}.py is missing from jobs/_docs.py's JOBS"


def test_no_dated_measurement_in_code_comments_or_docstrings():
    dated = [f"{p.relative_to(ROOT)}:{i}" for p in CODE for i, line in enumerate(p.read_text().splitlines(), 1)
             if DATE.search(line.replace("inception-2015-12-05", ""))]  # the Inception weights' file name is no date
    assert not dated, f"dated measurements belong in docs/measurements.md: {dated}"


def test_no_branch_on_a_kind_or_task_name_outside_their_modules():
    branch = re.compile(r"\b(kind|task|conditioner\.mode|sampler\.mode)\s*(==|!=|in\s*[(\[{])"
                        r"|(==|!=)\s*[\w.]*\b(kind|task)\b")
    allowed = ("ldm/kinds/", "pipeline/demo/tasks/")
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in CODE
            if not str(p.relative_to(ROOT)).startswith(allowed)
            for i, line in enumerate(p.read_text().splitlines(), 1) if branch.search(line)]
    assert not hits, hits


def test_rooms_import_one_way():
    for p in (ROOT / "pipeline" / "train").rglob("*.py"):
        assert "pipeline.encode" not in p.read_text(), f"{p}: train/ reads the cache through pipeline.cache"
    for p in (ROOT / "ldm").rglob("*.py"):
        text = p.read_text()
        assert not re.search(r"^\s*(import|from)\s+(ray|mlflow|deepspeed|pipeline)\b", text, re.M), p


def test_functions_stay_short_and_no_module_is_named_like_a_package_beside_it():
    long = []
    for p in [p for p in CODE if not p.name.startswith("_docs")]:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name not in ("parse", "add_run_args"):
                if node.end_lineno - node.lineno + 1 > 60:
                    long.append(f"{p.relative_to(ROOT)}:{node.name}")
    assert not long, f"functions over 60 lines: {long}"
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    clash = [p for p in (ROOT / "pipeline").rglob("*.py") if p.stem in packages]
    assert not clash, clash


def test_every_relative_link_in_the_readme_and_docs_resolves():
    link = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
    broken = [f"{md.relative_to(ROOT)}: {target}" for md in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
              for target in link.findall(md.read_text()) if "://" not in target
              and not (md.parent / target).exists()]
    assert not broken, broken


def test_the_product_stands_alone():
    texts = [ROOT / "README.md", ROOT / "pyproject.toml", *(ROOT / "docs").glob("*.md"), *CODE,
             *(ROOT / "infra").rglob("*.sh")]
    hits = [str(p.relative_to(ROOT)) for p in texts if "../shared" in p.read_text() or "DESIGN.md" in p.read_text()]
    assert not hits, hits
