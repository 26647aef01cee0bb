"""The Lua upstream filter of a provider cluster: the per-attempt request rewrite.

Envoy re-runs only upstream filters on a retry, so whatever depends on the provider an attempt
lands on is done here: the provider's path prefix, its own model id in the JSON body, and the
removal of credential headers before credential_injector writes the provider's own.

Request-header edits made here carry into later attempts (the router shares one header map), so
every step starts from saved originals: ext_proc's "gpu_router" metadata (canonical model, original
:path, and the original content-length this filter saves there) and the edge's "gpu_router.request"
(the model string the client sent). Without the saved length, a retry onto a provider that needs no
rewrite went out with the previous rewrite's length and the original body, and hung to its per-try
timeout. Body edits
do not carry over: the router re-sends its buffered original. The body is only read (buffered)
when the provider's id differs from the client's model string; a body without "model" (the
model came in the x-gpu-router-model header) gets one, so no provider falls back on a default
model of its own. Without ext_proc (the fallback route) there is no canonical model: the model string the client sent is looked up instead, so the
table holds every alias too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from control_plane.policy.model import Provider, RoutingConfig
from control_plane.translate.lua_json import JSON_MEMBERS
from control_plane.translate.names import (
    CLIENT_KEY_HEADERS,
    METADATA_NAMESPACE,
    REQUEST_METADATA_NAMESPACE,
)

_REWRITE = r"""
local NONE = {}

-- The JSON object s with the string value of its "model" member (the edge let through one at
-- most) replaced by `json`, or with one added first when it has none; nil when s is not an object.
local function with_model(s, json)
  local copy
  members(s, function(key, value, after)
    if unescape(key) == "model" then
      copy = string.sub(s, 1, value - 1) .. json .. string.sub(s, after)
    end
  end)
  if copy ~= nil then
    return copy
  end
  local open = string.match(s, "^[ \t\r\n]*{()")
  if open == nil then
    return nil
  end
  local empty = string.match(s, "^[ \t\r\n]*}", open) ~= nil
  return string.sub(s, 1, open - 1) .. '"model":' .. json .. (empty and "" or ",") ..
    string.sub(s, open)
end

function envoy_on_request(handle)
  local headers = handle:headers()
  for _, name in ipairs(CREDENTIAL_HEADERS) do
    headers:remove(name)
  end
  local metadata = handle:streamInfo():dynamicMetadata()
  local routed = metadata:get(ROUTED) or NONE
  local path = routed.path
  if path == nil then
    -- No ext_proc answer (fallback route): save the original for later attempts.
    path = headers:get(":path")
    metadata:set(ROUTED, "path", path)
  end
  headers:replace(":path", PATH_PREFIX .. path)
  -- An earlier attempt's rewrite set its own content-length; the router re-sends the original
  -- body, so every attempt starts from the original length (none: chunked).
  local length = routed.length
  if length == nil then
    length = headers:get("content-length") or ""
    metadata:set(ROUTED, "length", length)
  end
  if length == "" then
    headers:remove("content-length")
  else
    headers:replace("content-length", length)
  end
  local sent = (metadata:get(REQUEST) or NONE).model
  local target = MODEL_IDS[routed.model or sent]
  if target == nil or target.id == sent then
    return
  end
  local body = handle:body()
  if body == nil or body:length() == 0 then
    return
  end
  local rewritten = with_model(body:getBytes(0, body:length()), target.json)
  if rewritten ~= nil then
    body:setBytes(rewritten)
    -- Handles taken before body() are no longer valid once it has waited for the body.
    handle:headers():replace("content-length", tostring(#rewritten))
  end
end
"""


def lua_string(value: str) -> str:
    """`value` as a Lua string literal that means exactly its UTF-8 bytes: printable ASCII as is,
    every other byte (quote, backslash, controls, non-ASCII) as a three-digit decimal escape."""
    escaped = "".join(
        chr(byte) if 0x20 <= byte < 0x7F and byte not in b'"\\' else f"\\{byte:03d}"
        for byte in value.encode()
    )
    return f'"{escaped}"'


def credential_headers(config: RoutingConfig) -> tuple[str, ...]:
    """Headers no attempt may carry to a provider, whether a client sent them or an earlier
    attempt's credential_injector set them: authorization and x-api-key (where clients send
    their gpu-router key, which no provider may see, whatever headers providers use) and every
    provider's credential header, sorted."""
    headers = set(CLIENT_KEY_HEADERS)
    headers.update(p.credential.header for p in config.providers if p.credential is not None)
    return tuple(sorted(headers))


def model_aliases(config: RoutingConfig) -> dict[str, tuple[str, ...]]:
    """Canonical model name -> its aliases."""
    return {model.name: model.aliases for model in config.models}


def provider_lua(
    provider: Provider, aliases: Mapping[str, tuple[str, ...]], strip_headers: tuple[str, ...]
) -> str:
    """The Lua source of `provider`'s upstream filter. MODEL_IDS maps each model it offers, by
    canonical name and by every alias in `aliases`, to its own id; in name order, so the same
    provider always gives the same bytes."""
    ids = {
        name: offering.provider_model_id
        for offering in provider.offerings
        for name in (offering.model, *aliases.get(offering.model, ()))
    }
    models = "".join(
        f"  [{lua_string(name)}] = {{id = {lua_string(own_id)}, "
        f"json = {lua_string(json.dumps(own_id))}}},\n"
        for name, own_id in sorted(ids.items())
    )
    headers = ", ".join(lua_string(h) for h in strip_headers)
    return (
        f"-- gpu-router: per-attempt rewrite for provider {provider.name} (generated).\n"
        f"local ROUTED = {lua_string(METADATA_NAMESPACE)}\n"
        f"local REQUEST = {lua_string(REQUEST_METADATA_NAMESPACE)}\n"
        f"local PATH_PREFIX = {lua_string(provider.upstream.path_prefix)}\n"
        f"local CREDENTIAL_HEADERS = {{{headers}}}\n"
        f"local MODEL_IDS = {{\n{models}}}\n"
        f"{JSON_MEMBERS}{_REWRITE}"
    )
