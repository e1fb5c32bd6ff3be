"""Pure parts of the pager's CLI and configuration (no processes)."""

from __future__ import annotations

import pytest

from gfvm.errors import ConfigError, UsageError
from gfvm.pager.cli import human_bytes, parse_size
from gfvm.pager.service import settings_from_config


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4096", 4096),
        ("512M", 512 << 20),
        ("2g", 2 << 30),
        ("1.5GiB", 3 << 29),
        ("64 KiB", 64 << 10),
    ],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "M", "12Q", "-5M", "1e9"])
def test_parse_size_refuses_garbage(text):
    with pytest.raises(UsageError, match="cannot read"):
        parse_size(text)


def test_human_bytes():
    assert human_bytes(None) == "-"
    assert human_bytes(512) == "512 B"
    assert human_bytes(3 << 20) == "3.0 MiB"


def test_pager_settings_from_cluster_toml_section():
    s = settings_from_config({"interval_ms": 500, "hot_bound_ms": 4000, "window_pages": 128})
    assert (s.interval, s.hot_bound, s.window_pages) == (0.5, 4.0, 128)
    assert settings_from_config(None).interval == 0.2


@pytest.mark.parametrize(
    "section",
    [{"interval_ms": 1}, {"interval_ms": 500, "hot_bound_ms": 100}, {"intervall_ms": 200}],
)
def test_pager_settings_refuse_bad_values(section):
    with pytest.raises(ConfigError):
        settings_from_config(section)
