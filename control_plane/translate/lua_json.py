"""A strict Lua reader of a JSON object's top level, shared by the edge's request reader and the
providers' per-attempt rewrite.

The edge routes and bills by the "model" it reads here while a provider reads the same bytes with
its own parser, so the body must mean one thing to every parser: exactly one JSON object (nothing
after it), strings that are UTF-8 with valid escapes and no lone surrogates, no control
characters but whitespace, brackets that pair up. What is not, the edge refuses
rather than guesses. The top level is parsed to the grammar (JSON_MEMBERS); nested values are
walked by their brackets and strings only (their inner grammar cannot move a top-level member,
and a provider refuses it anyway). The byte checks (JSON_CHECKS, after JSON_MEMBERS) are only
the edge's: the per-attempt rewrite reads bodies the edge let through.

The checks are one loop LuaJIT compiles (see `unreadable`); the structure is then walked with
plain searches: a long prompt string is jumped over with one search per quote (Envoy's
json_to_metadata filter, measured on Envoy 1.40, spent ~2 ms parsing a 200 KB body into a
Struct).
"""

JSON_MEMBERS = r"""
local find, match, sub, gsub, byte = string.find, string.match, string.sub, string.gsub, string.byte
local WS = "^[ \t\r\n]*()"
local CLOSE = {["{"] = "}", ["["] = "]"}
local SIMPLE_ESCAPES = {['"'] = '"', ["\\"] = "\\", ["/"] = "/", b = "\b", f = "\f",
                        n = "\n", r = "\r", t = "\t"}

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

JSON_CHECKS = r"""
-- The code unit of the \uXXXX escape whose backslash is at i; nil when it has no 4 hex digits.
local function unicode_escape(s, i)
  local code = 0
  for k = i + 2, i + 5 do
    local d = byte(s, k)
    if d == nil then
      return nil
    elseif d >= 48 and d <= 57 then
      d = d - 48
    elseif d >= 65 and d <= 70 then
      d = d - 55
    elseif d >= 97 and d <= 102 then
      d = d - 87
    else
      return nil
    end
    code = code * 16 + d
  end
  return code
end

-- Why the bytes of s could be read differently by two JSON parsers (nil when they cannot):
-- a control character, bytes that are not UTF-8 (overlongs, surrogates and code points above
-- U+10FFFF included), an invalid escape, a lone surrogate escape. One loop over the bytes, in
-- the order a JSON lexer reads them (so "\\u" is an escaped backslash and a letter). LuaJIT
-- compiles it to machine code: on Envoy 1.40 a 1 MiB body (ASCII, escape-dense or UTF-8) was
-- answered in 4-7 ms with it, as with the unchecked scanner before it, where each pattern pass
-- over a body (gsub, or find with a character class) cost 15-20 ms per MiB.
local function unreadable(s)
  local i, n = 1, #s
  while i <= n do
    local b = byte(s, i)
    if b == 92 then
      local c = byte(s, i + 1)
      if c == 117 then
        local code = unicode_escape(s, i)
        if code == nil then
          return "an invalid \\u escape"
        elseif code >= 0xD800 and code <= 0xDBFF then
          local low = byte(s, i + 6) == 92 and byte(s, i + 7) == 117 and unicode_escape(s, i + 6)
          if not low or low < 0xDC00 or low > 0xDFFF then
            return "a lone surrogate escape (\\uD800-\\uDFFF)"
          end
          i = i + 12
        elseif code >= 0xDC00 and code <= 0xDFFF then
          return "a lone surrogate escape (\\uD800-\\uDFFF)"
        else
          i = i + 6
        end
      elseif c == 34 or c == 92 or c == 47 or c == 98 or c == 102 or c == 110 or c == 114
          or c == 116 then
        i = i + 2
      else
        return "an invalid escape"
      end
    elseif b >= 32 and b < 127 then
      i = i + 1
    elseif b < 128 then
      if b ~= 9 and b ~= 10 and b ~= 13 then
        return "a control character (byte " .. b .. ") at offset " .. (i - 1)
      end
      i = i + 1
    else
      -- A UTF-8 sequence: its length and the range of its second byte follow from its first.
      local length, low, high = 0, 0x80, 0xBF
      if b >= 0xC2 and b <= 0xDF then
        length = 2
      elseif b >= 0xE0 and b <= 0xEF then
        length = 3
        if b == 0xE0 then
          low = 0xA0
        elseif b == 0xED then
          high = 0x9F
        end
      elseif b >= 0xF0 and b <= 0xF4 then
        length = 4
        if b == 0xF0 then
          low = 0x90
        elseif b == 0xF4 then
          high = 0x8F
        end
      else
        return "bytes that are not UTF-8"
      end
      local c = byte(s, i + 1)
      if c == nil or c < low or c > high then
        return "bytes that are not UTF-8"
      end
      for k = i + 2, i + length - 1 do
        c = byte(s, k)
        if c == nil or c < 0x80 or c > 0xBF then
          return "bytes that are not UTF-8"
        end
      end
      i = i + length
    end
  end
  return nil
end
"""
