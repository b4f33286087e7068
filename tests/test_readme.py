"""The README keeps exactly two set-up commands, CI runs the README's test command verbatim, and every file the
README names is in the repository."""

import re
import subprocess
import tomllib

from workflow_helpers import REPO


def readme_blocks():
    """The two commands as printed: each may be broken over lines with `\\` continuations."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)


def readme_commands():
    """The two commands as the shell reads them: continuations joined, runs of blanks made one."""
    return [" ".join(re.sub(r"\\\n", " ", block).split()) for block in readme_blocks()]


def test_readme_has_the_two_commands():
    main, tests = readme_commands()
    assert main.endswith("snakemake gen3_stratified_fpr.csv report/gen3_report.html --cores all")
    assert "pytest" in tests and "pip install -e '.[test]'" in tests


def test_the_commands_paste_as_one_command_each():
    """Every line but the last ends in a continuation, so a paste runs one command; bash parses it."""
    for block in readme_blocks():
        lines = block.splitlines()
        assert all(line.endswith(" \\") for line in lines[:-1]) and not lines[-1].endswith("\\"), block
        subprocess.run(["bash", "-n", "-c", block], check=True)


def test_ci_runs_the_readme_test_command():
    _, tests = readme_blocks()
    assert tests in (REPO / ".ci/run").read_text()


def readme_paths():
    """Relative link targets, and back-quoted names of repository files (a path with a file suffix the repository
    uses, or under one of its top-level folders); run outputs (results/..., runs/...) are not repository files."""
    text = (REPO / "README.md").read_text()
    links = [t.split("#", 1)[0] for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:|#", t)]
    top = {p.name for p in REPO.iterdir() if not p.name.startswith(".")} | {".ci"}
    names = [t for t in re.findall(r"`([\w./-]+)`", text)
             if "/" in t and (t.split("/", 1)[0] in top or re.search(r"\.(md|py|ya?ml|smk|toml|sh|csv)$", t))
             and not t.startswith(("results/", "runs/"))]
    return links + names


def test_every_file_the_readme_names_exists():
    paths = readme_paths()
    assert "docs/finder.md" in paths and "schemas/config.schema.yaml" in paths
    missing = [p for p in paths if not (REPO / p).exists()]
    assert not missing, f"README names files that are not in the repository: {missing}"


def test_env_pins_match_pyproject():
    pins = dict(re.findall(r'"([A-Za-z0-9_.\-]+)(?:\[[a-z]+\])?==([^"]+)"', (REPO / "pyproject.toml").read_text()))
    for env in (REPO / "envs").glob("*.yaml"):
        for name, version in re.findall(r"- ([A-Za-z0-9_.\-]+)==(\S+)", env.read_text()):
            assert pins.get(name) == version, f"{env.name}: {name}=={version} but pyproject pins {pins.get(name)}"


def test_no_deps_packages_are_installed_the_same_way_everywhere():
    """pyproject's no_deps list (lenscat, without the LIGO stack) is what README, CI and the evaluate env install."""
    no_deps = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["darkhaloscope"]["no_deps"]
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert no_deps and not {spec.split("==")[0] for spec in no_deps} & {d.split("==")[0] for d in dependencies}
    install = "pip install --no-deps " + " ".join(no_deps)
    main, tests = readme_commands()
    assert install in main and install in tests
    assert install in (REPO / "envs/evaluate.post-deploy.sh").read_text()


def test_the_readme_results_are_the_logged_run():
    """The README's Gen3 and Gen2 rows are the figures of the measured run it names in the log."""
    import csv

    text = (REPO / "README.md").read_text()
    run = re.search(r"row (\d+) of \[docs/measurements/finder_runs.csv\]", text).group(1)
    with (REPO / "docs/measurements/finder_runs.csv").open(newline="") as fh:
        log = {r["row_id"]: r for r in csv.DictReader(fh)}
    cols = ["auroc", None, "rb_tpr_1e-2", "rb_tpr_1e-3", "rb_tpr_1e-4"]
    for model, row_id in (("Gen3", run), ("Gen2", run + "'")):
        cells = re.search(rf"(?m)^\| {model} \|(.+)\|$", text).group(1).split("|")
        for cell, col in zip(cells, cols):
            if col is None:  # all-positives tpr@fpr1e-2: not a column of the log
                continue
            value, lo, hi = re.fullmatch(r"\s*([0-9.]+) \[([0-9.]+), ([0-9.]+)\]\s*", cell).groups()
            logged = log[row_id]
            assert (value, lo, hi) == (logged[col], logged[col + "_lo"], logged[col + "_hi"]), (model, col)
