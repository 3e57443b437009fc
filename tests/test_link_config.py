"""Configuration of the relay link: keys, defaults and refusals that name the key."""

from __future__ import annotations

from typing import Any

import pytest

from relay import config

LINK_OUT = {
    "name": "core",
    "peers": ["core1:2515"],
    "transport": "link+tls",
    "tls_ca": __file__,  # any readable file: the schema only checks that it exists
}


def test_defaults() -> None:
    cfg = config.parse({"relay": {"id": "edge"}, "forward": [LINK_OUT]})
    (fc,) = cfg.forward
    assert fc.is_link and fc.uses_tls and fc.acknowledged
    assert (fc.compression, fc.compression_level, fc.batch_size) == ("zstd", 1, 1 << 20)
    assert cfg.link == config.LinkConfig(16, 17 * 1024 * 1024, ("zstd", "none"))


def test_keys_parse() -> None:
    cfg = config.parse(
        {
            "relay": {"id": "core"},
            "forward": [
                dict(LINK_OUT, compression="none", compression_level=5, batch_size="256KiB")
            ],
            "link": {"window": 4, "max_batch_size": "32MiB", "compression": ["none"]},
        }
    )
    assert cfg.forward[0].compression == "none" and cfg.forward[0].batch_size == 256 * 1024
    assert cfg.link == config.LinkConfig(4, 32 * 1024 * 1024, ("none",))


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"forward": [dict(LINK_OUT, mode="balance")]}, "forward[0].mode: transport"),
        ({"forward": [dict(LINK_OUT, compression="lz4")]}, "forward[0].compression: must be"),
        ({"forward": [dict(LINK_OUT, compression_level=30)]}, "forward[0].compression_level"),
        ({"forward": [dict(LINK_OUT, batch_size="1KiB")]}, "forward[0].batch_size"),
        ({"forward": [dict(LINK_OUT, tls_ca="")]}, "forward[0].tls_ca: required"),
        ({"link": {"max_batch_size": "1MiB"}}, "link.max_batch_size: must be between"),
        ({"link": {"compression": ["brotli"]}}, "link.compression: unknown compression"),
        ({"link": {"compression": []}}, "link.compression: accept at least one"),
        ({"link": {"window": 0}}, "link.window: must be between"),
        (
            {"listen": [{"address": ":2515", "transport": "link+tls"}]},
            "tls.verify_clients: must be true",
        ),
        ({"listen": [{"address": ":2515", "transport": "link+tls"}]}, "tls.certificate: required"),
    ],
)
def test_refusals_name_the_key(data: dict[str, Any], expected: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        config.parse(dict(data, relay={"id": "r"}))
    assert any(line.startswith(expected) for line in err.value.lines()), err.value.lines()
