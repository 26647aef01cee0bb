"""A strict Lua reader of a JSON object's top level, shared by the edge's request reader and the
providers' per-attempt rewrite.

The edge routes and bills by the "model" it reads here while a provider reads the same bytes with
its own parser, so the body must mean one thing to every parser: exactly one JSON object (nothing
after it), strings that are UTF-8 with valid escapes and no lone surrogates, no control
characters but whitespace, brackets that pair up. What is not, the edge refuses (READ_PROBLEMS)
rather than guesses. The top level is parsed to the grammar; nested values are walked by their
brackets and strings only (their inner grammar cannot move a top-level member, and a provider
refuses it anyway).

It costs a few C-level pattern passes over the body, never a Lua loop per byte: a long prompt
string is jumped over with one plain search per quote (Envoy's json_to_metadata filter, measured
on Envoy 1.40, spent ~2 ms parsing a 200 KB body into a Struct). The UTF-8 passes only run on a
body that has a non-ASCII byte at all.
"""

JSON_MEMBERS = r"""
local find, match, sub, gsub, byte = string.find, string.match, string.sub, string.gsub, string.byte
local WS = "^[ \t\r\n]*()"
local CLOSE = {["{"] = "}", ["["] = "]"}
local SIMPLE_ESCAPES = {['"'] = '"', ["\\"] = "\\", ["/"] = "/", b = "\b", f = "\f",
                        n = "\n", r = "\r", t = "\t"}
-- Every well-formed UTF-8 sequence of two to four bytes (no overlongs, no surrogates).
local UTF8_SEQUENCES = {
  "[\194-\223][\128-\191]",
  "\224[\160-\191][\128-\191]", "[\225-\236\238\239][\128-\191][\128-\191]",
  "\237[\128-\159][\128-\191]",
  "\240[\144-\191][\128-\191][\128-\191]", "[\241-\243][\128-\191][\128-\191][\128-\191]",
  "\244[\128-\143][\128-\191][\128-\191]",
}

-- Why the bytes of s could be read differently by two JSON parsers (nil when they cannot).
local function unreadable(s)
  local at = find(s, "[%z\1-\8\11\12\14-\31]")
  if at ~= nil then
    return "a control character (byte " .. byte(s, at) .. ") at offset " .. (at - 1)
  end
  if find(s, "\\", 1, true) then
    local t = gsub(s, "\\\\", "")
    if find(t, '\\[^"/bfnrtu]') or sub(t, -1) == "\\" then
      return "an invalid escape"
    end
    t = gsub(t, "\\u[dD][89abAB]%x%x\\u[dD][c-fC-F]%x%x", "")
    if find(t, "\\u[dD][89a-fA-F]") then
      return "a lone surrogate escape (\\uD800-\\uDFFF)"
    end
    if find((gsub(t, "\\u%x%x%x%x", "")), "\\u", 1, true) then
      return "an invalid \\u escape"
    end
  end
  if find(s, "[\128-\255]") then
    -- Each valid sequence becomes one ASCII byte, so no two leftovers can join into a new one.
    local t = s
    for _, sequence in ipairs(UTF8_SEQUENCES) do
      t = gsub(t, sequence, "_")
    end
    if find(t, "[\128-\255]") then
      return "bytes that are not UTF-8"
    end
  end
  return nil
end

-- Index of the closing quote of the JSON string opening at `open`; nil when it is unclosed.
-- A plain find (memchr-fast) per quote, then the backslashes before it are counted: a
-- pattern with a character class would walk every byte of a long prompt in Lua's matcher.
local function string_end(s, open)
  local i = open + 1
  while true do
    local at = find(s, '"', i, true)
    if at == nil then
      return nil
    end
    local before = at - 1
    while byte(s, before) == 92 do
      before = before - 1
    end
    if (at - 1 - before) % 2 == 0 then
      return at
    end
    i = at + 1
  end
end

-- Index just past the JSON value starting at i; nil and why when there is none. A container is
-- walked by its brackets, which must pair up, and its strings.
local function value_end(s, i)
  local c = sub(s, i, i)
  if c == '"' then
    local close = string_end(s, i)
    if close == nil then
      return nil, "an unterminated string"
    end
    return close + 1
  end
  if CLOSE[c] ~= nil then
    local open, depth = {CLOSE[c]}, 1
    i = i + 1
    while true do
      local at, _, b = find(s, '([%[%]{}"])', i)
      if at == nil then
        return nil, "unbalanced brackets"
      end
      i = at + 1
      if b == '"' then
        local close = string_end(s, at)
        if close == nil then
          return nil, "an unterminated string"
        end
        i = close + 1
      elseif CLOSE[b] ~= nil then
        depth = depth + 1
        open[depth] = CLOSE[b]
      elseif open[depth] ~= b then
        return nil, "mismatched brackets"
      else
        open[depth] = nil
        depth = depth - 1
        if depth == 0 then
          return i
        end
      end
    end
  end
  local after = match(s, "^true()", i) or match(s, "^false()", i) or match(s, "^null()", i)
  if after ~= nil then
    return after
  end
  after = match(s, "^-?0()", i) or match(s, "^-?[1-9]%d*()", i)
  if after == nil then
    return nil, "an invalid value"
  end
  after = match(s, "^%.%d+()", after) or after
  return match(s, "^[eE][-+]?%d+()", after) or after
end

-- Calls visit(key, value_at, value_end) for each member of the JSON object s (key as written,
-- escapes kept; value_end just past the value); visit may return a problem, which stops the
-- walk. Returns true, or nil and why s is not exactly one JSON object.
local function members(s, visit)
  local i = match(s, "^[ \t\r\n]*{[ \t\r\n]*()")
  if i == nil then
    return nil, "it is not a JSON object"
  end
  if sub(s, i, i) ~= "}" then
    while true do
      if sub(s, i, i) ~= '"' then
        return nil, "a member name is not a string"
      end
      local close = string_end(s, i)
      if close == nil then
        return nil, "an unterminated string"
      end
      local value = match(s, "^[ \t\r\n]*:[ \t\r\n]*()", close + 1)
      if value == nil then
        return nil, "a member name is not followed by ':'"
      end
      local after, problem = value_end(s, value)
      if after == nil then
        return nil, problem
      end
      problem = visit(sub(s, i + 1, close - 1), value, after)
      if problem ~= nil then
        return nil, problem
      end
      i = match(s, WS, after)
      local c = sub(s, i, i)
      if c == "}" then
        break
      elseif c ~= "," then
        return nil, "a member is not followed by ',' or '}'"
      end
      i = match(s, WS, i + 1)
    end
  end
  if match(s, WS, i + 1) <= #s then
    return nil, "there is data after the JSON object"
  end
  return true
end

-- UTF-8 bytes of a code point (JSON \uXXXX; surrogate halves as 3 bytes, paired by unescape).
local function utf8(code)
  if code < 0x80 then
    return string.char(code)
  elseif code < 0x800 then
    return string.char(0xC0 + math.floor(code / 0x40), 0x80 + code % 0x40)
  end
  return string.char(0xE0 + math.floor(code / 0x1000), 0x80 + math.floor(code / 0x40) % 0x40,
                     0x80 + code % 0x40)
end

-- A surrogate pair's two 3-byte halves as the 4-byte UTF-8 of the code point they make.
local function paired(hi1, hi2, lo1, lo2)
  local code = 0x10000 + ((byte(hi1) - 0xA0) * 0x40 + byte(hi2) - 0x80) * 0x400
                       + (byte(lo1) - 0xB0) * 0x40 + byte(lo2) - 0x80
  return string.char(0xF0 + math.floor(code / 0x40000), 0x80 + math.floor(code / 0x1000) % 0x40,
                     0x80 + math.floor(code / 0x40) % 0x40, 0x80 + code % 0x40)
end

-- The text of a JSON string's contents (between its quotes), escapes decoded. Only for a body
-- `unreadable` passed: its escapes are valid and its surrogates paired.
local function unescape(raw)
  if not find(raw, "\\", 1, true) then
    return raw
  end
  local text = gsub(raw, "\\(u?)(.)(%x?%x?%x?)", function(u, c, rest)
    if u == "u" then
      return utf8(tonumber(c .. rest, 16))
    end
    return (SIMPLE_ESCAPES[c] or c) .. rest
  end)
  return (gsub(text, "\237([\160-\175])([\128-\191])\237([\176-\191])([\128-\191])", paired))
end
"""
