-- wrk script: POST one multipart body read from $BODY_FILE.
-- $CONTENT_TYPE is the multipart Content-Type; $API_KEY, when set, goes in X-Api-Key; $BEARER,
-- when set, goes in Authorization (an app token).
-- With $DISTINCT=1 each request's image differs (bytes after the JPEG's end), so a cache never hits.
-- With $TOKENS_FILE each request carries the next token of that file (one a line) in
-- Authorization, so no token is verified twice while the file lasts.
local f = assert(io.open(os.getenv("BODY_FILE"), "rb"))
local body = f:read("*a")
f:close()
wrk.method = "POST"
wrk.path = "/api/v1/backend/liveness/short/"
wrk.headers["Content-Type"] = os.getenv("CONTENT_TYPE")
local key = os.getenv("API_KEY")
if key and key ~= "" then
  wrk.headers["X-Api-Key"] = key
end
local bearer = os.getenv("BEARER")
if bearer and bearer ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. bearer
end

local tokens = nil
local tokens_file = os.getenv("TOKENS_FILE")
if tokens_file and tokens_file ~= "" then
  tokens = {}
  for line in io.lines(tokens_file) do
    tokens[#tokens + 1] = line
  end
end

local distinct = os.getenv("DISTINCT") == "1"
if distinct or tokens then
  local tail = "\r\n--" .. os.getenv("BOUNDARY") .. "--\r\n"
  local head = body:sub(1, #body - #tail)
  local n = 0
  local id = "x"
  local offset = 0
  -- Each wrk thread runs this file in its own Lua state: seed from the state's own address.
  init = function(args)
    math.randomseed(tonumber(tostring({}):match("0x(%x+)") or "1", 16) % 2147483647)
    id = tostring(math.random(1, 1e9))
    if tokens then
      offset = math.random(0, #tokens - 1)
    end
  end
  request = function()
    n = n + 1
    local headers = nil
    if tokens then
      -- wrk.format takes these instead of wrk.headers: carry those over.
      headers = {}
      for k, v in pairs(wrk.headers) do
        headers[k] = v
      end
      headers["Authorization"] = "Bearer " .. tokens[(offset + n) % #tokens + 1]
    end
    local b = body
    if distinct then
      b = head .. id .. "-" .. n .. tail
    end
    return wrk.format(nil, nil, headers, b)
  end
else
  wrk.body = body
end

-- With $DELAY_MS each connection waits that long before each request: a paced, moderate load
-- (wrk measures latency from sending a request to its answer, so the pause is not counted).
local pause = tonumber(os.getenv("DELAY_MS") or "")
if pause and pause > 0 then
  delay = function()
    return pause
  end
end
