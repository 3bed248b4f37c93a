"""Configuration: Config.load (defaults, INI file, environment, errors) and the CLI."""

from __future__ import annotations

import configparser
import os
import re
import subprocess
import sys

import pytest

from helpers import ROOT, scaled

import gridserver
from gridserver import Config, ConfigError

SCRIPT = os.path.join(ROOT, "gridserver.py")


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """An empty working directory, so no config.ini is picked up."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_ini(folder, text: str) -> str:
    path = folder / "test.ini"
    path.write_text(text, encoding="utf-8")
    return str(path)


# --------------------------------------------------------------------------- load

def test_defaults_without_any_file(in_tmp):
    cfg = Config.load(None, environ={})
    # the contract's table
    expected = {
        ("server", "host"): "127.0.0.1",
        ("server", "port"): 8080,
        ("server", "debug"): False,
        ("server", "debug_players"): "",
        ("database", "dsn"): "sqlite:///gridserver.db",
        ("auth", "min_password_length"): 8,
        ("auth", "session_ttl"): 0,
        ("tick", "interval"): 1.0,
        ("tick", "max_intents_per_player"): 10,
        ("persistence", "interval"): 5.0,
        ("game", "module"): "game_modules.walkers",
        ("server", "max_zone_size"): 10000,
    }
    for (section, key), value in expected.items():
        got = cfg.get(section, key)
        assert got == value and isinstance(got, bool) == isinstance(value, bool), (section, key, got)
    # every declared key has a value
    for opt in gridserver.OPTIONS:
        cfg.get(opt.section, opt.key)
    assert list(in_tmp.iterdir()) == []  # loading the config creates nothing


def test_config_ini_in_cwd_is_read(in_tmp):
    (in_tmp / "config.ini").write_text("[tick]\ninterval = 0.75\n")
    assert Config.load(None, environ={}).get("tick", "interval") == 0.75


def test_ini_file_value(in_tmp):
    path = write_ini(in_tmp, "[tick]\ninterval = 0.25\nmax_intents_per_player = 3\n"
                             "[server]\nport = 9001\ndebug = yes\ndebug_players = alice, bob\n"
                             "[database]\ndsn = postgresql://root@127.0.0.1/test\n")
    cfg = Config.load(path, environ={})
    assert cfg.get("tick", "interval") == 0.25
    assert cfg.get("tick", "max_intents_per_player") == 3
    assert cfg.get("server", "port") == 9001
    assert cfg.get("server", "debug") is True
    assert cfg.get("database", "dsn") == "postgresql://root@127.0.0.1/test"
    # keys not in the file keep their defaults
    assert cfg.get("persistence", "interval") == 5.0
    assert cfg.get("server", "host") == "127.0.0.1"


def test_env_wins_over_file(in_tmp):
    path = write_ini(in_tmp, "[tick]\ninterval = 0.25\n[server]\ndebug = true\nhost = 0.0.0.0\n")
    cfg = Config.load(path, environ={"GRIDSERVER_TICK_INTERVAL": "0.5", "GRIDSERVER_SERVER_DEBUG": "false",
                                     "GRIDSERVER_AUTH_MIN_PASSWORD_LENGTH": "12"})
    assert cfg.get("tick", "interval") == 0.5
    assert cfg.get("server", "debug") is False
    assert cfg.get("auth", "min_password_length") == 12
    assert cfg.get("server", "host") == "0.0.0.0"  # from the file, no env var for it
    # environment without a file
    cfg = Config.load(None, environ={"GRIDSERVER_SERVER_PORT": "7000"})
    assert cfg.get("server", "port") == 7000


def test_environ_defaults_to_process_environment(in_tmp, monkeypatch):
    monkeypatch.setenv("GRIDSERVER_TICK_INTERVAL", "0.125")
    assert Config.load().get("tick", "interval") == 0.125


BAD_FILES = [
    ("[server]\nport = abc\n", "[server] port"),               # bad int
    ("[server]\nport = 80.5\n", "[server] port"),              # a float is not an int
    ("[tick]\ninterval = fast\n", "[tick] interval"),          # bad float
    ("[tick]\ninterval = nan\n", "[tick] interval"),           # not a finite number
    ("[server]\ndebug = maybe\n", "[server] debug"),           # bad bool
    ("[tick]\ninterval = 0\n", "[tick] interval"),             # below minimum
    ("[tick]\ninterval = -1\n", "[tick] interval"),
    ("[tick]\nmax_intents_per_player = 0\n", "[tick] max_intents_per_player"),
    ("[auth]\nmin_password_length = 0\n", "[auth] min_password_length"),
    ("[auth]\nsession_ttl = -5\n", "[auth] session_ttl"),
    ("[persistence]\ninterval = 0\n", "[persistence] interval"),
    ("[tick]\nintervall = 1\n", "[tick] intervall"),           # unknown key in a known section
    ("[database]\ndsn = mysql://root@localhost/db\n", "[database] dsn"),  # bad dsn scheme
    ("[database]\ndsn = gridserver.db\n", "[database] dsn"),
]


@pytest.mark.parametrize("text, names", BAD_FILES)
def test_bad_file_values_raise_one_line(in_tmp, text, names):
    path = write_ini(in_tmp, text)
    with pytest.raises(ConfigError) as info:
        Config.load(path, environ={})
    message = str(info.value)
    assert "\n" not in message.strip(), message
    assert names in message, message


BAD_ENV = [
    ("GRIDSERVER_SERVER_PORT", "eighty", "[server] port"),
    ("GRIDSERVER_TICK_INTERVAL", "abc", "[tick] interval"),
    ("GRIDSERVER_SERVER_DEBUG", "2", "[server] debug"),
    ("GRIDSERVER_TICK_MAX_INTENTS_PER_PLAYER", "-1", "[tick] max_intents_per_player"),
    ("GRIDSERVER_DATABASE_DSN", "mongodb://x", "[database] dsn"),
    ("GRIDSERVER_PERSISTENCE_INTERVAL", "", "[persistence] interval"),
]


@pytest.mark.parametrize("var, value, names", BAD_ENV)
def test_bad_env_values_raise_one_line(in_tmp, var, value, names):
    with pytest.raises(ConfigError) as info:
        Config.load(None, environ={var: value})
    message = str(info.value)
    assert "\n" not in message.strip(), message
    assert names in message, message


def test_env_overrides_a_bad_file_value(in_tmp):
    # the environment wins, so a bad file value it replaces is never used
    path = write_ini(in_tmp, "[tick]\ninterval = 0.2\n")
    with pytest.raises(ConfigError) as info:
        Config.load(path, environ={"GRIDSERVER_TICK_INTERVAL": "zero"})
    assert "[tick] interval" in str(info.value)


def test_missing_file_raises_one_line(in_tmp):
    missing = str(in_tmp / "nope.ini")
    with pytest.raises(ConfigError) as info:
        Config.load(missing, environ={})
    assert "\n" not in str(info.value).strip()
    assert "nope.ini" in str(info.value)


def test_unparsable_file_raises_one_line(in_tmp):
    path = write_ini(in_tmp, "this is not\nan ini file [\n")
    with pytest.raises(ConfigError) as info:
        Config.load(path, environ={})
    assert "\n" not in str(info.value).strip()


def test_game_module_section_is_kept(in_tmp):
    path = write_ini(in_tmp, "[game]\nmodule = game_modules.walkers\n[game_modules.walkers]\nfog_radius = 3\n")
    cfg = Config.load(path, environ={"GRIDSERVER_GAME_MODULES_WALKERS_ITEMS": "4"})
    assert cfg.section("game_modules.walkers") == {"fog_radius": "3", "items": "4"}


# --------------------------------------------------------------------------- config.example.ini

def test_example_ini_lists_every_option_with_its_default():
    parser = configparser.ConfigParser(interpolation=None)
    with open(os.path.join(ROOT, "config.example.ini"), encoding="utf-8") as fh:
        parser.read_file(fh)
    for opt in gridserver.OPTIONS:
        assert parser.has_option(opt.section, opt.key), f"[{opt.section}] {opt.key} missing"
        assert parser.get(opt.section, opt.key).strip() == opt.default, (opt.section, opt.key)


def test_example_ini_loads_as_a_config(in_tmp):
    cfg = Config.load(os.path.join(ROOT, "config.example.ini"), environ={})
    default = Config.load(None, environ={})
    for opt in gridserver.OPTIONS:
        assert cfg.get(opt.section, opt.key) == default.get(opt.section, opt.key), (opt.section, opt.key)


# --------------------------------------------------------------------------- the CLI

def run_cli(args: list[str], cwd, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRIDSERVER_")}
    # should the server start by mistake, it stays off port 8080 and out of the repository
    env["GRIDSERVER_SERVER_PORT"] = "0"
    env["GRIDSERVER_DATABASE_DSN"] = f"sqlite:///{cwd}/cli.db"
    env.update(extra_env or {})
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=scaled(30))


def test_cli_help(tmp_path):
    proc = run_cli(["--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "--config" in proc.stdout


def test_cli_bad_env_value_exits_2_with_one_line(tmp_path):
    proc = run_cli([], tmp_path, {"GRIDSERVER_TICK_INTERVAL": "abc"})
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "[tick] interval" in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


def test_cli_missing_config_file(tmp_path):
    proc = run_cli(["--config", str(tmp_path / "missing.ini")], tmp_path)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "missing.ini" in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


def test_cli_bad_file_value(tmp_path):
    ini = tmp_path / "bad.ini"
    ini.write_text("[server]\ndebug = perhaps\n")
    proc = run_cli(["--config", str(ini)], tmp_path)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "[server] debug" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_print_config_matches_example_ini(tmp_path):
    proc = run_cli(["--print-config"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(proc.stdout)
    for opt in gridserver.OPTIONS:
        assert parser.get(opt.section, opt.key).strip() == opt.default


def test_readme_configuration_table_lists_every_option_as_declared():
    """The README's table is written from ``OPTIONS``: a key added or changed there without
    the README fails here."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        rows = [line for line in fh.read().splitlines()
                if re.match(r"\| [a-z_]+ \| [a-z_]+ \| `[^`]*` \| `GRIDSERVER_", line)]
    expected = [f"| {o.section} | {o.key} | `{o.default or '(empty)'}` | `{o.env}` | {o.help} |"
                for o in gridserver.OPTIONS]
    assert rows == expected
