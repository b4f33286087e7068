"""The README keeps exactly two set-up commands, and CI runs the README's test command verbatim."""

import re
import tomllib

from workflow_helpers import REPO


def readme_commands():
    text = (REPO / "README.md").read_text()
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)


def test_readme_has_the_two_commands():
    main, tests = readme_commands()
    assert main.endswith("snakemake gen3_stratified_fpr.csv report/gen3_report.html --cores all")
    assert "pytest" in tests and "pip install -e '.[test]'" in tests


def test_ci_runs_the_readme_test_command():
    _, tests = readme_commands()
    ci = (REPO / ".ci/run").read_text().splitlines()
    assert tests in ci


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
