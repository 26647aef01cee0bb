"""The edge's Lua filter that captures a response's token usage as it streams to the client.

The control plane prices each request from the usage the provider reported, read from the edge
access log (control_plane/usage/normalise.py says what it expects): dynamic metadata
USAGE_METADATA_NAMESPACE / "text" holds the JSON body from its `"usage"` key on (at most
USAGE_TEXT_LIMIT bytes), or the SSE `data:` line(s) that carry a usage value (the last ones
within the limit). It must run in the edge's HCM, not in the provider clusters' upstream filters:
those write into the attempt's own stream info, which the edge access log does not see.

Reading the body must not delay the client: bodyChunks() hands each chunk on as it arrives (body()
would buffer the whole response, an SSE stream included). Per chunk the script copies the chunk
into a Lua string and runs one plain string.find on it; an SSE chunk is split into lines only when
it carries "usage" or does not end a line. A key split across chunks is found through the last
bytes of the previous chunk (JSON) or the carried incomplete line (SSE). A JSON body's last
`"usage"` wins (the top-level usage comes after the content in OpenAI's and Anthropic's bodies);
SSE lines whose usage is null (OpenAI's include_usage puts `"usage":null` on every chunk but the
last) are not kept. Responses that are not 2xx, are compressed, or are neither JSON nor an event
stream are passed on untouched. The metadata is written whenever a chunk changes the text, not
when the body ends: a client that hangs up after the usage chunk ends the iteration there, and
its request is still billed from what the provider reported.
"""

from __future__ import annotations

from control_plane.translate.names import USAGE_METADATA_NAMESPACE, USAGE_METADATA_TEXT_KEY
from control_plane.translate.upstream_lua import lua_string

USAGE_TEXT_LIMIT = 4096
"""Bytes of usage text kept per response (a usage object or its SSE line is well under this)."""

_CAPTURE = r"""
local KEY = '"usage"'
local OVERLAP = #KEY - 1
local NEWLINE = 10
local find, sub, byte, lower = string.find, string.sub, string.byte, string.lower

-- Position of the last KEY in s, or nil.
local function last_key(s)
  local last, at = nil, find(s, KEY, 1, true)
  while at ~= nil do
    last = at
    at = find(s, KEY, at + 1, true)
  end
  return last
end

-- Writes the usage text into the stream's metadata when it differs from what was `published`
-- (strings are interned: the comparison is a pointer's); returns what is published now. Called
-- per chunk, not once the body has ended: a client that hangs up after the usage chunk ends
-- the body iteration there.
local function publish(handle, text, published)
  if text ~= published then
    handle:streamInfo():dynamicMetadata():set(NAMESPACE, TEXT_KEY, text)
  end
  return text
end

-- Publishes a JSON body from its last KEY on, at most LIMIT bytes; nothing when it has none.
local function json_usage(handle)
  local text, tail, published = nil, "", nil
  for chunk in handle:bodyChunks() do
    local n = chunk:length()
    if n > 0 then
      local s = chunk:getBytes(0, n)
      local at = last_key(s)
      if at ~= nil then
        text = sub(s, at, at + LIMIT - 1)
      else
        -- A key split across chunks starts in the previous chunk's last OVERLAP bytes.
        local joined = tail .. sub(s, 1, OVERLAP)
        local split = find(joined, KEY, 1, true)
        if split ~= nil then
          local head = sub(tail, split)
          text = head .. sub(s, 1, LIMIT - #head)
        elseif text ~= nil and #text < LIMIT then
          text = text .. sub(s, 1, LIMIT - #text)
        end
      end
      if n >= OVERLAP then
        tail = sub(s, -OVERLAP)
      else
        tail = sub(tail .. s, -OVERLAP)
      end
      published = publish(handle, text, published)
    end
  end
end

-- `kept` with `line` appended, oldest lines dropped to stay within LIMIT.
local function keep(kept, line)
  if #line > LIMIT then
    return kept
  end
  kept = kept .. line
  while #kept > LIMIT do
    kept = sub(kept, find(kept, "\n", 1, true) + 1)
  end
  return kept
end

-- Adds the complete "data:" lines of `data` that carry a non-null usage to `kept`. Returns
-- kept, the incomplete last line (carried into the next chunk), and whether that line is
-- dropped for being longer than LIMIT (its rest is then skipped up to its end).
local function sse_lines(data, kept, skipping)
  local start = 1
  local nl = find(data, "\n", 1, true)
  if skipping then
    if nl == nil then
      return kept, "", true
    end
    start = nl + 1
    nl = find(data, "\n", start, true)
  end
  local at = find(data, KEY, start, true)
  while nl ~= nil do
    if at ~= nil and at < nl then
      if sub(data, start, start + 4) == "data:" and find(data, "^%s*:%s*null", at + #KEY) == nil then
        kept = keep(kept, sub(data, start, nl))
      end
      at = find(data, KEY, nl + 1, true)
    end
    start = nl + 1
    if at == nil and byte(data, -1) == NEWLINE then
      return kept, "", false
    end
    nl = find(data, "\n", start, true)
  end
  local carry = sub(data, start)
  if #carry > LIMIT then
    return kept, "", true
  end
  return kept, carry, false
end

-- Publishes the usage-carrying "data:" lines of an event stream, the last ones within LIMIT
-- bytes; nothing when it has none.
local function sse_usage(handle)
  local kept, carry, skipping, published = "", "", false, ""
  for chunk in handle:bodyChunks() do
    local n = chunk:length()
    if n > 0 then
      local s = chunk:getBytes(0, n)
      if carry ~= "" or skipping or byte(s, n) ~= NEWLINE or find(s, KEY, 1, true) ~= nil then
        kept, carry, skipping = sse_lines(carry .. s, kept, skipping)
        published = publish(handle, kept, published)
      end
    end
  end
  if carry ~= "" then
    -- A stream that ends without ending its last line.
    publish(handle, (sse_lines(carry .. "\n", kept, false)), published)
  end
end

function envoy_on_response(handle)
  local headers = handle:headers()
  local status = headers:get(":status")
  if status == nil or byte(status, 1) ~= 50 then -- "2"
    return
  end
  local encoding = headers:get("content-encoding")
  if encoding ~= nil and lower(encoding) ~= "identity" then
    return
  end
  local media = lower(headers:get("content-type") or "")
  if find(media, "application/json", 1, true) == 1 then
    json_usage(handle)
  elseif find(media, "text/event-stream", 1, true) == 1 then
    sse_usage(handle)
  end
end
"""


def usage_capture_lua() -> str:
    """The edge filter's Lua source (envoy_on_response only: requests pass untouched)."""
    return (
        "-- gpu-router: the response's usage text into dynamic metadata (generated).\n"
        f"local NAMESPACE = {lua_string(USAGE_METADATA_NAMESPACE)}\n"
        f"local TEXT_KEY = {lua_string(USAGE_METADATA_TEXT_KEY)}\n"
        f"local LIMIT = {USAGE_TEXT_LIMIT}\n"
        f"{_CAPTURE}"
    )
