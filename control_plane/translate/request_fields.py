"""The edge's Lua filter that reads the request body's fields ext_proc decides on, and refuses a
body that different parsers could read differently.

It puts the top-level "model" (escapes decoded), "max_tokens", "max_completion_tokens" and
"stream" of the JSON body of an inference request into the "gpu_router.request" dynamic metadata,
which Envoy forwards to ext_proc with the request headers, so the body itself never travels to
ext_proc. The edge routes and bills by that model while the provider reads the body itself, so
the filter answers by itself, before ext_proc or any fallback route sees the request:

- 400 for a body that is not exactly one JSON object every parser reads the same way (lua_json.py:
  trailing data, mismatched brackets, control characters, bad escapes, lone surrogates, non-UTF-8),
  for duplicate member names (however escaped; the last one wins in one parser, the first in
  another), for a member that is not "model" but case-folds to it ("Model", "MODEL": a
  case-insensitive provider reads it as the model) and for a "model" that is not a string;
- 415 for an inference body of any other content type than application/json: a provider may
  parse it as JSON anyway (many ignore the content type), and nothing at the edge would have read
  or rewritten its model. Refusing is safer than reading "+json" types as JSON too: the edge
  cannot know every type a provider's framework treats as JSON.

It also copies the client's own request id (the early header mutation moved it to
CLIENT_REQUEST_ID_HEADER, listeners.py) into the metadata as "client_request_id": the access
log, ledger and audit keep it next to the edge's own x-request-id.
"""

from __future__ import annotations

from control_plane.translate.lua_json import JSON_CHECKS, JSON_MEMBERS
from control_plane.translate.names import (
    CLIENT_REQUEST_ID_HEADER,
    INFERENCE_PATHS,
    REASON_RESPONSE_HEADER,
    REQUEST_METADATA_NAMESPACE,
)
from control_plane.translate.upstream_lua import lua_string

MAX_CLIENT_REQUEST_ID = 200
MAX_REASON_HEADER = 200
"""Characters of the client's request id kept (printable ASCII; anything else becomes "?")."""

_READ = r"""
local ESCAPED = {['"'] = '\\"', ["\\"] = "\\\\"}

local function json_quoted(text)
  return '"' .. string.gsub(text, '[%c"\\]', function(c)
    return ESCAPED[c] or string.format("\\u%04x", string.byte(c))
  end) .. '"'
end

-- The client's answer, OpenAI-style, without asking ext_proc or a provider; the reason header
-- as ext_proc's errors have it (printable ASCII, bounded).
local function refuse(handle, status, code, message)
  local reason = string.gsub(string.sub(message, 1, MAX_REASON), "[^ -~]", "?")
  handle:respond(
    {[":status"] = tostring(status), ["content-type"] = "application/json",
     [REASON_HEADER] = reason},
    '{"error":{"message":' .. json_quoted(message) ..
      ',"type":"invalid_request_error","param":null,"code":"' .. code .. '"}}')
end

-- The fields ext_proc reads from body s; nil and why when s may not be sent to a provider.
local function read(s)
  local problem = unreadable(s)
  if problem ~= nil then
    return nil, problem
  end
  local found, seen = {}, {}
  local ok
  ok, problem = members(s, function(raw, value, after)
    local key = unescape(raw)
    if seen[key] then
      return "it has more than one member named " .. json_quoted(key)
    end
    seen[key] = true
    if key == "model" then
      if string.sub(s, value, value) ~= '"' then
        return '"model" is not a string'
      end
      found.model = unescape(string.sub(s, value + 1, after - 2))
    elseif string.lower(key) == "model" then
      return "it has a member " .. json_quoted(key) ..
        ' that a case-insensitive provider reads as "model"; send only "model"'
    elseif key == "max_tokens" or key == "max_completion_tokens" then
      found[key] = tonumber(string.sub(s, value, after - 1))
    elseif key == "stream" then
      found.stream = string.sub(s, value, after - 1) == "true"
    end
  end)
  if not ok then
    return nil, problem
  end
  return found
end

function envoy_on_request(handle)
  local headers = handle:headers()
  local metadata = handle:streamInfo():dynamicMetadata()
  local client_id = headers:get(CLIENT_REQUEST_ID)
  if client_id ~= nil then
    client_id = string.gsub(string.sub(client_id, 1, MAX_CLIENT_ID), "[^ -~]", "?")
    metadata:set(REQUEST, "client_request_id", client_id)
  end
  local path = string.match(headers:get(":path") or "", "^[^?]*")
  if not INFERENCE_PATHS[path] then
    return
  end
  local content_type = headers:get("content-type")
  local body = handle:body()
  if body == nil or body:length() == 0 then
    return
  end
  if content_type ~= nil then
    local media = string.lower(string.match(content_type, "^%s*([^;%s]*)"))
    if media ~= "application/json" then
      refuse(handle, 415, "unsupported_media_type",
             "an inference request body must be application/json, not " ..
               string.gsub(string.sub(content_type, 1, 100), "[^ -~]", "?"))
      return
    end
  end
  local found, problem = read(body:getBytes(0, body:length()))
  if found == nil then
    refuse(handle, 400, "invalid_json",
           "the request body cannot be read one way only: " .. problem ..
             "; send one JSON object (UTF-8) with a single \"model\"")
    return
  end
  -- Handles taken before body() are no longer valid once it has waited for the body.
  metadata = handle:streamInfo():dynamicMetadata()
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
    paths = ", ".join(f"[{lua_string(p)}] = true" for p in INFERENCE_PATHS)
    return (
        "-- gpu-router: the request fields ext_proc decides on (generated).\n"
        f"local REQUEST = {lua_string(REQUEST_METADATA_NAMESPACE)}\n"
        f"local CLIENT_REQUEST_ID = {lua_string(CLIENT_REQUEST_ID_HEADER)}\n"
        f"local MAX_CLIENT_ID = {MAX_CLIENT_REQUEST_ID}\n"
        f"local REASON_HEADER = {lua_string(REASON_RESPONSE_HEADER)}\n"
        f"local MAX_REASON = {MAX_REASON_HEADER}\n"
        f"local INFERENCE_PATHS = {{{paths}}}\n"
        f"{JSON_MEMBERS}{JSON_CHECKS}{_READ}"
    )
