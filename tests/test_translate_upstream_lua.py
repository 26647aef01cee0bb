"""The generated Lua of a provider's upstream filter: constants escaped for Lua, deterministic.

What the script does is exercised on the real Envoy in test_translate_envoy.py.
"""

from __future__ import annotations

import re

from translate_fixtures import provider, routing_config

from control_plane.policy.model import Credential, Model
from control_plane.translate.upstream_lua import (
    credential_headers,
    lua_string,
    model_aliases,
    provider_lua,
)


def lua_unescaped(literal: str) -> bytes:
    """What Lua makes of a string literal that uses only printable ASCII and \\ddd escapes."""
    assert literal[0] == literal[-1] == '"'
    out, body = bytearray(), literal[1:-1]
    for plain, escape in re.findall(r'([^"\\])|\\(\d{3})', body):
        out += plain.encode() if plain else bytes([int(escape)])
    assert len(out) == len(re.sub(r"\\\d{3}", "x", body))
    return bytes(out)


def test_lua_strings_carry_any_text_byte_for_byte() -> None:
    for value in ("", "/v1", 'a "b" \\ c', "é ü 模型", "]] %1 %%", "line\nbreak\t\x00", "\\123"):
        literal = lua_string(value)
        assert all(0x20 <= ord(c) < 0x7F for c in literal)
        assert lua_unescaped(literal) == value.encode()


def test_constants_are_the_providers() -> None:
    p = provider(
        "p",
        "http://127.0.0.1:1/base/",
        model_ids={"zeta": 'vendor/"zeta"', "alpha": "alpha"},
    )
    source = provider_lua(p, {}, ("authorization", "x-api-key"))
    assert 'local PATH_PREFIX = "/base"\n' in source
    assert 'local CREDENTIAL_HEADERS = {"authorization", "x-api-key"}\n' in source
    assert (
        "local MODEL_IDS = {\n"
        '  ["alpha"] = {id = "alpha", json = "\\034alpha\\034"},\n'
        '  ["zeta"] = {id = "vendor/\\034zeta\\034", '
        'json = "\\034vendor/\\092\\034zeta\\092\\034\\034"},\n'
        "}\n"
    ) in source
    assert 'local ROUTED = "gpu_router"\nlocal REQUEST = "gpu_router.request"\n' in source


def test_same_provider_gives_the_same_bytes_whatever_the_offering_order() -> None:
    forward = provider("p", "http://127.0.0.1:1", model_ids={"a": "1", "b": "2"})
    backward = provider("p", "http://127.0.0.1:1", model_ids={"b": "2", "a": "1"})
    assert provider_lua(forward, {}, ("authorization",)) == provider_lua(
        backward, {}, ("authorization",)
    )


def test_aliases_map_to_the_same_id_as_their_model() -> None:
    config = routing_config(
        provider("p", "http://127.0.0.1:1", model_ids={"big": "vendor/big", "small": "s"}),
        models=(Model(name="big", aliases=("large", "b")), Model(name="small")),
    )
    aliases = model_aliases(config)
    assert aliases == {"big": ("large", "b"), "small": ()}
    source = provider_lua(config.providers[0], aliases, ("authorization",))
    assert (
        "local MODEL_IDS = {\n"
        '  ["b"] = {id = "vendor/big", json = "\\034vendor/big\\034"},\n'
        '  ["big"] = {id = "vendor/big", json = "\\034vendor/big\\034"},\n'
        '  ["large"] = {id = "vendor/big", json = "\\034vendor/big\\034"},\n'
        '  ["small"] = {id = "s", json = "\\034s\\034"},\n'
        "}\n"
    ) in source


def test_credential_headers_are_authorization_and_every_providers_sorted() -> None:
    config = routing_config(
        provider("a", "http://127.0.0.1:1", credential=Credential(env="K", header="x-key")),
        provider("b", "http://127.0.0.1:2", credential=Credential(env="K")),
        provider("c", "http://127.0.0.1:3", credential=Credential(env="K", header="api-key")),
        provider("d", "http://127.0.0.1:4"),
    )
    assert credential_headers(config) == ("api-key", "authorization", "x-api-key", "x-key")
    assert credential_headers(routing_config()) == ("authorization", "x-api-key")
