"""The configuration: the example validates, errors name their place, environment overrides."""

import subprocess
import sys
from pathlib import Path

import pytest

from node.core.settings import ConfigError, load_settings

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "config" / "ainode.example.yaml"


def test_example_config_is_valid():
    settings = load_settings(EXAMPLE, environ={})
    assert settings.node.ae_title == "AINODE"
    assert settings.storage.min_free_bytes == 2 * 1024**3
    assert [d.name for d in settings.destinations] == ["pacs"]


def test_errors_name_the_place_in_the_file(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        "node:\n  ae_title: THIS_TITLE_IS_TOO_LONG\n"
        "destinations:\n"
        "  - {name: a, ae_title: A, host: h, port: 104}\n"
        "  - name: b\n    ae_title: B\n    host: h\n    port: 70000\n"
        "bogus: 1\n"
    )
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, environ={})
    text = "\n".join(err.value.errors)
    assert f"{cfg}:8: destinations[1].port: must be 1..65535" in text
    assert f"{cfg}:2: node.ae_title: must be 1..16 characters" in text
    assert "bogus: unknown setting" in text


def test_environment_overrides_file(tmp_path):
    settings = load_settings(
        EXAMPLE,
        environ={
            "AINODE_NODE__PORT": "11999",
            "AINODE_BROKER__URL": "",
            "AINODE_PEERS": '[{"ae_title": "X", "hosts": ["10.0.0.0/8"]}]',
        },
    )
    assert settings.node.port == 11999
    assert settings.broker.url == ""
    assert settings.peers[0].ae_title == "X"


def test_errors_from_the_environment_name_the_variable(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("node:\n  port: 104\n")
    environ = {"AINODE_VENV": "/opt/venv", "AINODE_NODE__PORT": "70000", "AINODE_NODE__TLS": '{"bogus": 1}'}
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, environ=environ)
    assert sorted(err.value.errors) == [
        "environment variable AINODE_NODE__PORT: node.port: must be 1..65535",
        "environment variable AINODE_NODE__TLS: node.tls.bogus: unknown setting",
        "environment variable AINODE_VENV: venv: unknown setting",
    ]


def test_rule_must_name_known_destinations(tmp_path):
    cfg = tmp_path / "r.yaml"
    cfg.write_text("rules:\n  - name: r\n    analyses: [x]\n    destinations: [nowhere]\n")
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, environ={})
    assert "unknown destinations: nowhere" in "\n".join(err.value.errors)


def test_config_check_command_exit_codes(tmp_path):
    ok = subprocess.run(
        [sys.executable, "-m", "node.cli", "config", "check", str(EXAMPLE)], capture_output=True, text=True, cwd=ROOT
    )
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("node:\n  port: 0\n")
    res = subprocess.run(
        [sys.executable, "-m", "node.cli", "config", "check", str(bad)], capture_output=True, text=True, cwd=ROOT
    )
    assert res.returncode == 1
    assert "node.port: must be 1..65535" in res.stderr


def test_config_check_rejects_unknown_analysis(tmp_path):
    cfg = tmp_path / "a.yaml"
    cfg.write_text("rules:\n  - name: r\n    analyses: [ct-segmentation, no-such-model]\n")
    res = subprocess.run(
        [sys.executable, "-m", "node.cli", "config", "check", str(cfg)], capture_output=True, text=True, cwd=ROOT
    )
    assert res.returncode == 1
    assert "rules[0].analyses[1]: unknown analysis 'no-such-model'" in res.stderr
    assert "ct-segmentation" in res.stderr  # listed among the known ones, not reported
    assert "analyses[0]" not in res.stderr
