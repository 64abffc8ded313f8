"""config.toml: one default per key (Settings'), an unknown key or section refused by every command at start with
the nearest valid name, and the README's configuration table and config.toml agreeing with Settings."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from indexer.config import KEYS, REPO_ROOT, ConfigError, Settings, load_settings

MISSPELT = '[index]\nfactroy = "Flat"\n'
# A README row: | `section.key` | `default, as a TOML literal` | ENV_VAR or nothing | what it does |
README_ROW = re.compile(r"^\|\s*`([a-z_]+\.[a-z_]+)`\s*\|\s*`([^`]*)`\s*\|\s*`?([A-Z_]*)`?\s*\|", re.MULTILINE)


def config_file(folder: Path, text: str) -> Path:
    path = folder / "config.toml"
    path.write_text(text)
    return path


def default(field: str) -> object:
    return next(f.default for f in dataclasses.fields(Settings) if f.name == field)


def parsed(key: str, value: object) -> object:
    """A key's value as its Settings field holds it (before load_settings resolves relative paths)."""
    return KEYS[key].parse(value, key)


def test_a_misspelt_key_is_refused_naming_the_key_it_is_close_to(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key index\.factroy; did you mean index\.factory\?"):
        load_settings(config_file(tmp_path, MISSPELT))


def test_a_key_in_the_wrong_section_is_refused_naming_the_section_that_has_it(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key index\.batch_size; did you mean model\.batch_size\?"):
        load_settings(config_file(tmp_path, "[index]\nbatch_size = 8\n"))


def test_an_unknown_key_with_no_near_name_is_refused_listing_its_sections_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key service\.colour; \[service\] holds host, port, ") as refused:
        load_settings(config_file(tmp_path, '[service]\ncolour = "blue"\n'))
    assert "did you mean" not in str(refused.value)


def test_an_unknown_section_is_refused_naming_the_section_it_is_close_to(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown section \[indexes\]; did you mean \[index\]\?"):
        load_settings(config_file(tmp_path, '[indexes]\nfactory = "Flat"\n'))
    with pytest.raises(ConfigError, match=r"unknown section \[web\]; the sections are catalog, index, model, service"):
        load_settings(config_file(tmp_path, "[web]\nport = 80\n"))


def test_a_key_above_every_section_is_refused_naming_the_keys_of_that_name(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key workers outside any \[section\]; did you mean index\.workers "
                       r"or service\.workers\?"):  # fmt: skip
        load_settings(config_file(tmp_path, "workers = 2\n"))


def test_a_value_that_is_not_a_number_is_a_config_error_naming_the_key(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"model\.batch_size = 'many': use a whole number"):
        load_settings(config_file(tmp_path, '[model]\nbatch_size = "many"\n'))
    monkeypatch.setenv("MEMORY_BUDGET_MB", "lots")
    with pytest.raises(ConfigError, match=r"service\.memory_budget_mb \(or MEMORY_BUDGET_MB\) = 'lots'"):
        load_settings(config_file(tmp_path, ""))


def test_an_empty_config_gives_settings_defaults_with_paths_in_the_config_files_folder(tmp_path, monkeypatch):
    for spec in KEYS.values():
        if spec.env:
            monkeypatch.delenv(spec.env, raising=False)
    settings = load_settings(config_file(tmp_path, ""))
    assert (settings.catalog_dir, settings.data_dir, settings.models_dir) == (
        tmp_path / "catalog",
        tmp_path / "data",
        tmp_path / "models",
    )
    relative = {"catalog_dir", "data_dir", "models_dir", "finetuned"}
    assert {f.name: getattr(settings, f.name) for f in dataclasses.fields(Settings) if f.name not in relative} == {
        f.name: f.default for f in dataclasses.fields(Settings) if f.name not in relative
    }


def test_every_settings_field_but_what_make_finetune_activated_is_set_by_one_key():
    fields = [spec.field for spec in KEYS.values()]
    assert len(fields) == len(set(fields))
    assert set(fields) == {f.name for f in dataclasses.fields(Settings)} - {"finetuned", "held_out_whitening"}


def test_config_toml_states_every_key_with_settings_default():
    """config.toml ships the defaults, every key with its comment: it sets nothing that Settings does not."""
    shipped = tomllib.loads((REPO_ROOT / "config.toml").read_text())
    stated = {f"{section}.{name}": value for section, table in shipped.items() for name, value in table.items()}
    assert sorted(set(stated) - set(KEYS)) == [], "config.toml keys that load_settings does not know"
    assert [key for key in KEYS if key not in stated] == [], "keys missing from config.toml"
    differing = {key: value for key, value in stated.items() if parsed(key, value) != default(KEYS[key].field)}
    assert differing == {}, "config.toml values that are not Settings' defaults"


def readme_rows(text: str) -> dict[str, tuple[str, str]]:
    """The configuration table's rows: key -> (default as a TOML literal, environment variable or "")."""
    rows: dict[str, tuple[str, str]] = {}
    for key, literal, env in README_ROW.findall(text):
        assert key not in rows, f"{key} has two rows"
        rows[key] = (literal, env)
    return rows


def check_readme_table(text: str) -> None:
    rows = readme_rows(text)
    assert [key for key in KEYS if key not in rows] == [], "keys missing from the README's configuration table"
    assert sorted(set(rows) - set(KEYS)) == [], "README rows for keys that load_settings does not know"
    for key, (literal, env) in rows.items():
        value = tomllib.loads(f"value = {literal}")["value"]
        assert parsed(key, value) == default(KEYS[key].field), f"README: {key}'s default is not {literal}"
        assert env == KEYS[key].env, f"README: {key} is overridden by {KEYS[key].env or 'no variable'}, not {env!r}"


def test_the_readme_configuration_table_gives_every_key_with_its_default_and_variable():
    check_readme_table((REPO_ROOT / "README.md").read_text())


def shipped_literals() -> dict[str, str]:
    """config.toml's keys with their values as written there: TOML literals."""
    literals, section = {}, ""
    for line in (REPO_ROOT / "config.toml").read_text().splitlines():
        if header := re.fullmatch(r"\[(\w+)\]", line):
            section = header[1]
        elif assignment := re.fullmatch(r"(\w+) = (.+)", line):
            literals[f"{section}.{assignment[1]}"] = assignment[2]
    return literals


def test_the_readme_check_fails_on_a_wrong_default_a_wrong_variable_or_a_missing_key():
    rows = [
        f"| `{key}` | `{literal}` | {KEYS[key].env} | what it does |" for key, literal in shipped_literals().items()
    ]
    check_readme_table("\n".join(rows))
    for wrong in ("| `model.batch_size` | `16` |  | what it does |", '| `index.data_dir` | `"data"` | DATA | it |'):
        key = wrong.split("`")[1]
        with pytest.raises(AssertionError, match=re.escape(key)):
            check_readme_table("\n".join(wrong if f"`{key}`" in row else row for row in rows))
    with pytest.raises(AssertionError, match="missing"):
        check_readme_table("\n".join(rows[1:]))


COMMANDS = [
    ["indexer", "index", "--catalog", "catalog"],
    ["indexer", "compact"],
    ["indexer", "import-vectors", "--vectors", "v.npy", "--products", "p.csv"],
    ["indexer", "weights"],
    ["indexer", "finetune"],
    ["indexer", "migrate"],
    ["indexer", "demo-catalog", "demo"],
    ["service"],
    ["bench"],
    ["bench.scale"],
    ["bench.soak"],
    ["eval", "--catalog", "catalog"],
    ["eval.compare", "--catalog", "catalog", "--queries", "queries.csv"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_stops_at_start_on_a_misspelt_key(tmp_path, command):
    """What `make index`, `make serve`, `make demo`, `make bench` and `make eval` run, with SEARCH_CONFIG naming a
    config.toml with a misspelt key: a one-line error naming it, no traceback, a non-zero status."""
    env = {**os.environ, "SEARCH_CONFIG": str(config_file(tmp_path, MISSPELT))}
    command = [sys.executable, "-m", *command]
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"error: {tmp_path / 'config.toml'}: unknown key index.factroy; did you mean index.factory?"
    )
    assert done.stdout == ""
