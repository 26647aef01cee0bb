"""A Lua walk over the members of a JSON object's top level, shared by the edge's request
reader and the providers' per-attempt rewrite.

It is not a JSON parser: it finds the top-level members of a well-formed object without
decoding anything, jumping over each string value with one C-level search, so a 1 MiB
prompt costs a few searches, not a Lua loop per byte (Envoy's json_to_metadata filter,
measured on Envoy 1.40, spent ~2 ms parsing a 200 KB body into a Struct).
"""

JSON_MEMBERS = r"""
-- Index of the closing quote of the JSON string opening at `open` (the end of s if unclosed).
-- A plain find (memchr-fast) per quote, then the backslashes before it are counted: a
-- pattern with a character class would walk every byte of a long prompt in Lua's matcher.
local function string_end(s, open)
  local i = open + 1
  while true do
    local at = string.find(s, '"', i, true)
    if at == nil then
      return #s
    end
    local before = at - 1
    while string.byte(s, before) == 92 do
      before = before - 1
    end
    if (at - 1 - before) % 2 == 0 then
      return at
    end
    i = at + 1
  end
end

-- Calls visit(key, value_at) for each member of the top-level object s (key as written,
-- escapes kept); visit may return where to go on from. Returns whether s looked like one
-- balanced JSON object.
local function members(s, visit)
  local first = string.match(s, "^%s*(.)")
  if first ~= "{" then
    return false
  end
  local depth, i = 0, 1
  while true do
    local at, _, c = string.find(s, '([%[%]{}"])', i)
    if at == nil then
      break
    end
    i = at + 1
    if c == '"' then
      local close = string_end(s, at)
      i = close + 1
      if depth == 1 then
        local value = string.match(s, "^%s*:%s*()", i)
        if value ~= nil then
          i = visit(string.sub(s, at + 1, close - 1), value) or i
        end
      end
    elseif c == "{" or c == "[" then
      depth = depth + 1
    else
      depth = depth - 1
      if depth < 0 then
        return false
      end
    end
  end
  return depth == 0
end
"""
