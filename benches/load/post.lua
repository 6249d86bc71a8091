-- wrk script: POST one multipart body read from $BODY_FILE.
-- $CONTENT_TYPE is the multipart Content-Type; $API_KEY, when set, goes in X-Api-Key.
-- With $DISTINCT=1 each request's image differs (bytes after the JPEG's end), so a cache never hits.
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

if os.getenv("DISTINCT") == "1" then
  local tail = "\r\n--" .. os.getenv("BOUNDARY") .. "--\r\n"
  local head = body:sub(1, #body - #tail)
  local n = 0
  local id = "x"
  -- Each wrk thread runs this file in its own Lua state: seed from the state's own address.
  init = function(args)
    math.randomseed(tonumber(tostring({}):match("0x(%x+)") or "1", 16) % 2147483647)
    id = tostring(math.random(1, 1e9))
  end
  request = function()
    n = n + 1
    return wrk.format(nil, nil, nil, head .. id .. "-" .. n .. tail)
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
