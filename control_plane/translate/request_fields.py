"""The edge's Lua filter that reads the request body's fields ext_proc decides on.

It puts the top-level "model" (the string as sent), "max_tokens",
"max_completion_tokens" and "stream" of a JSON body into the "gpu_router.request"
dynamic metadata, which Envoy forwards to ext_proc with the request headers, so the body
itself never travels to ext_proc. A body that is not one balanced JSON object, or a
content type that is not JSON, sets "body_error" instead; ext_proc turns that into the
client's 400 (or, for a non-JSON type, routes by the x-gpu-router-model header).
"""

from __future__ import annotations

from control_plane.translate.lua_json import JSON_MEMBERS
from control_plane.translate.names import REQUEST_METADATA_NAMESPACE
from control_plane.translate.upstream_lua import lua_string

BODY_ERROR = "invalid JSON"
"""Value of "body_error" when the body is not one JSON object."""
NOT_JSON = "content type not read"
"""Value of "body_error" when the content type is not JSON (the body is not read)."""

_READ = r"""
local NUMBER = "^(-?%d+%.?%d*[eE]?[-+]?%d*)"
local SIMPLE_ESCAPES = {['"'] = '"', ["\\"] = "\\", ["/"] = "/", b = "\b", f = "\f",
                        n = "\n", r = "\r", t = "\t"}

-- UTF-8 bytes of a code point below U+10000 (JSON \uXXXX; surrogate halves stay as they are).
local function utf8(code)
  if code < 0x80 then
    return string.char(code)
  elseif code < 0x800 then
    return string.char(0xC0 + math.floor(code / 0x40), 0x80 + code % 0x40)
  end
  return string.char(0xE0 + math.floor(code / 0x1000), 0x80 + math.floor(code / 0x40) % 0x40,
                     0x80 + code % 0x40)
end

-- The text of a JSON string's contents (between its quotes), escapes decoded.
local function unescape(raw)
  if not string.find(raw, "\\", 1, true) then
    return raw
  end
  return (string.gsub(raw, "\\(u?)(.)(%x?%x?%x?)", function(u, c, rest)
    if u == "u" then
      return utf8(tonumber(c .. rest, 16))
    end
    return (SIMPLE_ESCAPES[c] or c) .. rest
  end))
end

function envoy_on_request(handle)
  local headers = handle:headers()
  if headers:get(":method") ~= "POST" then
    return
  end
  local content_type = headers:get("content-type")
  if content_type ~= nil then
    local media = string.lower(string.match(content_type, "^%s*([^;%s]*)"))
    if media ~= "application/json" then
      handle:streamInfo():dynamicMetadata():set(REQUEST, "body_error", NOT_JSON)
      return
    end
  end
  local body = handle:body()
  if body == nil or body:length() == 0 then
    return
  end
  -- Handles taken before body() are no longer valid once it has waited for the body.
  local metadata = handle:streamInfo():dynamicMetadata()
  local s = body:getBytes(0, body:length())
  local found = {}
  local object = members(s, function(key, value)
    if key == "model" then
      if string.sub(s, value, value) == '"' then
        found.model = unescape(string.sub(s, value + 1, string_end(s, value) - 1))
      end
    elseif key == "max_tokens" or key == "max_completion_tokens" then
      found[key] = tonumber(string.match(s, NUMBER, value))
    elseif key == "stream" then
      found.stream = string.sub(s, value, value + 3) == "true"
    end
  end)
  if not object then
    metadata:set(REQUEST, "body_error", BODY_ERROR)
    return
  end
  for key, value in pairs(found) do
    metadata:set(REQUEST, key, value)
  end
  if found.model ~= nil then
    -- The fallback routes (taken when ext_proc does not answer) match on the model.
    handle:clearRouteCache()
  end
end
"""


def request_fields_lua() -> str:
    return (
        "-- gpu-router: the request fields ext_proc decides on (generated).\n"
        f"local REQUEST = {lua_string(REQUEST_METADATA_NAMESPACE)}\n"
        f"local BODY_ERROR = {lua_string(BODY_ERROR)}\n"
        f"local NOT_JSON = {lua_string(NOT_JSON)}\n"
        f"{JSON_MEMBERS}{_READ}"
    )
